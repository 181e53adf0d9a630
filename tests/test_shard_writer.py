"""Write side: the shard tool on tiny corpora — format, manifest, determinism, resume, errors, ranks."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from spkr import storage
from spkr.features import FeatureConfig, LogMel, compute_logmel, load_audio
from spkr.shards import writer as shard_writer
from spkr.shards.checks import manifest_digest
from spkr.shards.format import Manifest
from spkr.shards.schema import ManifestError
from spkr.tools import shard as shard_tool

from .conftest import write_corpus


def run_shard(corpus: Path, out: Path, *extra: str) -> int:
    return shard_tool.main(
        [
            "--source",
            str(corpus),
            "--subsets",
            "train.100",
            "--out",
            str(out),
            "--shard-size",
            "5",
            "--no-progress",
        ]
        + list(extra)
    )


def manifest_without_time(out: Path) -> dict:
    data = json.loads((out / "manifest.json").read_text())
    data.pop("created"), data["digest"].pop("created")  # the time of writing and its digest
    return data


def test_shards_and_manifest_describe_everything(tiny_corpus, tmp_path):
    out = tmp_path / "shards"
    assert run_shard(tiny_corpus, out) == 0
    m = Manifest.load(str(out))
    assert m.labels == ["1", "2", "3", "4", "5", "6"]  # train + dev + test speakers
    n = {s: m.split(s).num_samples for s in ("train", "valid", "test")}
    assert n == {"train": 24, "valid": 6, "test": 6}  # original dev/test sizes restored
    cfg = FeatureConfig()
    lm = LogMel(cfg)
    all_keys, train_feats = [], []
    for split in ("train", "valid", "test"):
        for info in m.split(split).shards:
            blob = (out / info.name).read_bytes()
            assert len(blob) == info.bytes and hashlib.sha256(blob).hexdigest() == info.sha256
            with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
                names = [t.name for t in tf.getmembers()]
                assert names == [f"{k}.{e}" for k in info.keys for e in ("cls", "json", "mel.npy")]
                for i, key in enumerate(info.keys):
                    # the offset points at the sample's first header
                    header = tarfile.TarInfo.frombuf(
                        blob[info.offsets[i] : info.offsets[i] + 512], "utf-8", "strict"
                    )
                    assert header.name == f"{key}.cls"
                    assert int(tf.extractfile(f"{key}.cls").read()) == info.labels[i]
                    meta = json.loads(tf.extractfile(f"{key}.json").read())
                    assert m.labels[info.labels[i]] == meta["speaker"] == key.split("-")[0]
                    feats = np.load(io.BytesIO(tf.extractfile(f"{key}.mel.npy").read()), allow_pickle=False)
                    assert feats.dtype == np.float16 and feats.shape == (info.frames[i], 80)
                    spk, chapter, _ = key.split("-")
                    path = tiny_corpus / "LibriSpeech"
                    path = next(path.glob(f"*/{spk}/{chapter}/{key}.flac"))
                    np.testing.assert_array_equal(feats, compute_logmel(load_audio(path, cfg), lm))
                    if split == "train":
                        train_feats.append(feats.astype(np.float64))
            all_keys += info.keys
    assert len(all_keys) == len(set(all_keys)) == 36
    stacked = np.concatenate(train_feats)
    np.testing.assert_allclose(m.stats["mean"], stacked.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.stats["std"], stacked.std(0), rtol=1e-5, atol=1e-5)
    assert m.stats["min"] == stacked.min() and m.stats["max"] == stacked.max()
    assert m.data["feature_fingerprint"] == cfg.fingerprint()
    assert abs(np.mean(m.class_weights) - 1.0) < 1e-9


def test_deterministic_across_worker_counts(tiny_corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_shard(tiny_corpus, a) == 0
    assert run_shard(tiny_corpus, b, "--workers", "2") == 0
    assert manifest_without_time(a) == manifest_without_time(b)


def test_split_by_rank_then_merge(tiny_corpus, tmp_path):
    single, ranked = tmp_path / "single", tmp_path / "ranked"
    assert run_shard(tiny_corpus, single) == 0
    assert run_shard(tiny_corpus, ranked, "--rank", "0", "--world-size", "3") == 0
    assert not (ranked / "manifest.json").exists()  # other ranks' shards missing: no manifest yet
    with pytest.raises(ManifestError, match="incomplete"):
        Manifest.load(str(ranked))
    assert run_shard(tiny_corpus, ranked, "--rank", "2", "--world-size", "3") == 0
    assert not (ranked / "manifest.json").exists()
    assert run_shard(tiny_corpus, ranked, "--rank", "1", "--world-size", "3") == 0
    assert manifest_without_time(single) == manifest_without_time(ranked)


def test_crash_mid_shard_leaves_nothing_listed_and_resume_redoes_only_the_rest(
    tiny_corpus, tmp_path, monkeypatch
):
    out = tmp_path / "shards"
    real = shard_writer.load_audio
    calls = {"n": 0}

    def dying_load_audio(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:  # inside the third shard
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(shard_writer, "load_audio", dying_load_audio)
    with pytest.raises(KeyboardInterrupt):
        run_shard(tiny_corpus, out)
    assert not (out / "manifest.json").exists()
    tars = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar"))
    sidecars = sorted(p.relative_to(out).as_posix()[: -len(".json")] for p in out.rglob("*.tar.json"))
    assert tars == sidecars and len(tars) == 2  # the interrupted shard has no final name
    assert not list(out.rglob(".tmp-*"))  # its temporary file was removed
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    monkeypatch.setattr(shard_writer, "load_audio", real)
    assert run_shard(tiny_corpus, out) == 0
    for p, mtime in before.items():
        assert p.stat().st_mtime_ns == mtime  # complete shards were not rewritten
    fresh = tmp_path / "fresh"
    assert run_shard(tiny_corpus, fresh) == 0
    assert manifest_without_time(out) == manifest_without_time(fresh)


def _tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


@pytest.mark.parametrize(
    "change, says",
    [
        (["--seed", "1"], "seed: 0 -> 1"),
        (["--feature-config", '{"top_db": 40, "f_max": 6000}'], "feature_config.f_max: 7600.0 -> 6000"),
        (["--feature-backend", "torch"], "feature_backend: 'torchaudio' -> 'torch'"),
        (["--min-seconds", "0.2"], "write_options.min_seconds: 0.1 -> 0.2"),
    ],
)
def test_shards_of_another_identity_are_never_reused(tiny_corpus, tmp_path, capsys, change, says):
    """Regression (issue 10.1): re-running into the same --out with another feature config or seed
    printed "0 shards written, N already complete" and kept the old tars under a manifest declaring the
    new config. Now the run stops before writing anything and says what differs."""
    out = tmp_path / "shards"
    assert run_shard(tiny_corpus, out) == 0
    before, manifest_before = _tar_bytes(out), (out / "manifest.json").read_bytes()
    capsys.readouterr()
    if "feature_backend" in says and Manifest.load(str(out)).feature_backend == "torch":
        pytest.skip("torchaudio does not import here: the default backend already is torch")
    assert run_shard(tiny_corpus, out, *change) == 2
    err = capsys.readouterr().err
    assert "never reused" in err and says in err and "--overwrite" in err and "shard-000000.tar" in err
    assert _tar_bytes(out) == before and (out / "manifest.json").read_bytes() == manifest_before
    # --overwrite rewrites them: the result equals a fresh run with the new settings, byte for byte
    assert run_shard(tiny_corpus, out, *change, "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert run_shard(tiny_corpus, fresh, *change) == 0
    assert manifest_without_time(out) == manifest_without_time(fresh)
    assert _tar_bytes(out) == _tar_bytes(fresh)
    m_old, m_new = json.loads(manifest_before), Manifest.load(str(out))
    if "write_options" in says:  # no utterance was that short: the same samples, the same dataset
        assert m_new.dataset_id == m_old["dataset_id"]
    else:
        assert m_new.dataset_id != m_old["dataset_id"]
    if "feature_config" in says:
        assert m_new.feature_config.f_max == 6000 and m_new.feature_config.top_db == 40


def test_dataset_id_covers_features_labels_and_split_order(tiny_corpus, tmp_path):
    out = tmp_path / "shards"
    assert run_shard(tiny_corpus, out) == 0
    m = Manifest.load(str(out))
    data = json.loads(m.to_json())  # per-sample lists inline (version 2), to edit
    # same content written again elsewhere: same id; a re-run in place keeps it
    assert run_shard(tiny_corpus, tmp_path / "again") == 0
    assert Manifest.load(str(tmp_path / "again")).dataset_id == m.dataset_id
    # an edited manifest (two test keys swapped between splits, or another feature config) is refused
    edited = json.loads(json.dumps(data))
    edited["feature_config"]["top_db"] = 40.0
    edited["feature_fingerprint"] = FeatureConfig.from_dict(edited["feature_config"]).fingerprint()
    with pytest.raises(ManifestError, match="dataset_id .* does not match its contents"):
        Manifest(edited, url="edited.json")
    moved = json.loads(json.dumps(data))
    moved["splits"]["test"]["shards"][0]["keys"].reverse()
    with pytest.raises(ManifestError, match="does not match its contents"):
        Manifest(moved, url="moved.json")


def _edit_manifest(out: Path, edit) -> None:
    data = json.loads((out / "manifest.json").read_text())
    edit(data)
    (out / "manifest.json").write_text(json.dumps(data, indent=1))


def _relabel(d: dict, out: Path) -> None:
    """Another label for the first training sample: in its index file and in the index file's listed
    sha256 and size, so only the manifest's digest still tells."""
    entry = d["splits"]["train"]["index"]["labels"]
    labels = np.load(out / entry["path"])
    labels[0] = (labels[0] + 1) % len(d["labels"])
    buf = io.BytesIO()
    np.save(buf, labels)
    (out / entry["path"]).write_bytes(buf.getvalue())
    entry.update(bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())


@pytest.mark.parametrize(
    "field, edit",
    [
        ("stats", lambda d, out: d["stats"]["mean"].__setitem__(0, d["stats"]["mean"][0] + 5.0)),
        ("class_weights", lambda d, out: d["class_weights"].__setitem__(0, 100.0)),
        ("splits", _relabel),
        ("corpus", lambda d, out: d["corpus"].update(name="other")),
    ],
)
def test_every_manifest_field_is_under_its_digest(tiny_corpus, tmp_path, field, edit):
    """Fields outside the dataset_id (the statistics training normalises with, the class weights of its
    loss, the index files' digests) are covered by the manifest's digest: a hand edit is refused on
    every load, by the loader too, naming the field."""
    from spkr.stream import SpeakerLoader

    out = tmp_path / "shards"
    assert run_shard(tiny_corpus, out) == 0
    m = Manifest.load(str(out))
    assert m.data["digest"] == manifest_digest(json.loads((out / "manifest.json").read_text()))
    _edit_manifest(out, lambda d: edit(d, out))
    with pytest.raises(ManifestError) as e:
        Manifest.load(str(out))
    msg = str(e.value)
    assert msg.startswith(str(out / "manifest.json")) and "\n" not in msg
    assert f"'{field}' does not match the manifest's digest" in msg
    with pytest.raises(ManifestError, match="digest"):
        SpeakerLoader(str(out), "train", 2, rank=0, world_size=1)


def test_a_manifest_without_digest_loads_and_a_wrong_one_is_named(tiny_corpus, tmp_path):
    """Shard sets written before the digest (none in the manifest) load as before; a digest that is not
    64 hex digits is named."""
    out = tmp_path / "shards"
    assert run_shard(tiny_corpus, out) == 0
    dataset = Manifest.load(str(out)).dataset_id
    _edit_manifest(out, lambda d: d.pop("digest"))
    assert Manifest.load(str(out)).dataset_id == dataset
    _edit_manifest(out, lambda d: d.update(digest={**manifest_digest(d), "stats": 17}))
    with pytest.raises(ManifestError, match=r"manifest\.json: digest of 'stats' is 17, not 64 hex digits"):
        Manifest.load(str(out))
    _edit_manifest(out, lambda d: d.update(extra=1) or d.update(digest=manifest_digest(d)))
    assert Manifest.load(str(out)).data["extra"] == 1  # edited, then made coherent again: a new manifest
    _edit_manifest(out, lambda d: d.update(more=2))
    with pytest.raises(
        ManifestError, match=r"manifest\.json: field\(s\) \['more'\] are not under its digest"
    ):
        Manifest.load(str(out))


@pytest.mark.parametrize("key", ["2-21-0003 b", "2-21-0003\u00a0b", "2-21-0003.b"])
def test_keys_the_trial_format_cannot_hold_are_refused_before_any_work(tiny_corpus, tmp_path, capsys, key):
    """Trial lists separate keys by whitespace and the manifest refuses '.', so such an utterance id
    is named before anything is written (or skipped and listed with --on-error skip)."""
    d = tiny_corpus / "LibriSpeech" / "train-clean-100" / "2" / "21"
    (d / "2-21-0003.flac").rename(d / f"{key}.flac")
    trans = d / "2-21.trans.txt"
    trans.write_text(trans.read_text().replace("2-21-0003 ", f"{key} "))
    out = tmp_path / "shards"
    capsys.readouterr()
    assert run_shard(tiny_corpus, out) == 2
    err = capsys.readouterr().err
    assert f"{key}.flac: utterance id {key!r} holds whitespace, '.', '/', '\\' or an unprintable" in err, err
    assert not out.exists()
    assert run_shard(tiny_corpus, out, "--on-error", "skip") == 0
    assert [s["key"] for s in Manifest.load(str(out)).data["skipped"]] == [key]


def _break(corpus: Path, kind: str) -> str:
    """Damage one training utterance of speaker 2; returns the file name the error must name."""
    d = corpus / "LibriSpeech" / "train-clean-100" / "2" / "21"
    target = d / "2-21-0003.flac"
    if kind == "corrupt":
        target.write_bytes(b"fLaC" + b"\x00garbage" * 20)
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "short":
        sf.write(target, np.zeros(300, np.float32), 16000)
    elif kind == "rate":
        sf.write(target, np.zeros(8000, np.float32), 8000)
    elif kind == "stereo":
        sf.write(target, np.zeros((16000, 2), np.float32), 16000)
    elif kind == "transcript":
        trans = d / "2-21.trans.txt"
        trans.write_text("".join(x for x in trans.read_text().splitlines(True) if "0003" not in x))
    elif kind == "speaker":
        other = corpus / "LibriSpeech" / "train-clean-100" / "77" / "771"
        other.mkdir(parents=True)
        sf.write(other / "77-771-0000.flac", np.zeros(16000, np.float32), 16000)
        (other / "77-771.trans.txt").write_text("77-771-0000 HELLO\n")
        return "77-771-0000.flac"
    return target.name


@pytest.mark.parametrize(
    "kind, message",
    [
        ("corrupt", "cannot decode"),
        ("empty", "cannot decode|no samples"),
        ("short", "too short"),
        ("rate", "sample rate 8000 Hz"),
        ("stereo", "2 channels"),
        ("transcript", "no transcript"),
        ("speaker", "unknown speaker 77"),
    ],
)
def test_bad_input_named_and_skip_mode_counts(tiny_corpus, tmp_path, capsys, kind, message):
    name = _break(tiny_corpus, kind)
    out = tmp_path / "shards"
    assert run_shard(tiny_corpus, out) == 2
    err = capsys.readouterr().err
    assert name in err and any(m in err for m in message.split("|")), err
    assert not (out / "manifest.json").exists()
    assert run_shard(tiny_corpus, out, "--on-error", "skip") == 0
    m = Manifest.load(str(out))
    assert [s["path"].rsplit("/", 1)[-1] for s in m.data["skipped"]] == [name]
    assert "1 skipped" in capsys.readouterr().err
    keys = {k for s in ("train", "valid", "test") for sh in m.split(s).shards for k in sh.keys}
    assert name.removesuffix(".flac") not in keys and len(keys) == 36 - (kind != "speaker")


def test_resample_and_downmix_flags_convert(tiny_corpus, tmp_path):
    _break(tiny_corpus, "stereo")
    assert run_shard(tiny_corpus, tmp_path / "a", "--downmix") == 0
    _break(tiny_corpus, "rate")
    assert run_shard(tiny_corpus, tmp_path / "b", "--resample") == 0


def test_impossible_resplit_is_loud(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c", {"train-clean-100": [1], "dev-clean": [2], "test-clean": [3]}, 1)
    assert run_shard(corpus, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "[shard] error:" in err and "re-split" in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_subset_named(tiny_corpus, tmp_path, capsys):
    import shutil

    shutil.rmtree(tiny_corpus / "LibriSpeech" / "dev-clean")
    assert run_shard(tiny_corpus, tmp_path / "out") == 2
    assert "dev-clean" in capsys.readouterr().err


def test_shard_to_s3_on_a_loopback_server(tiny_corpus, tmp_path, monkeypatch):
    """--out s3://bucket/prefix through fsspec against a real S3 HTTP server on 127.0.0.1."""
    import socket

    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
            monkeypatch.setenv(k, v)
        endpoint = f"http://127.0.0.1:{port}"
        bucket = f"spkr-shards-{port}"  # moto's state is per process: keep clear of other tests' buckets
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        opts = json.dumps(
            {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
        )
        monkeypatch.setenv("SPKR_STORAGE_OPTIONS", opts)
        monkeypatch.setenv("SPKR_INDEX_CACHE", str(tmp_path / "index-cache"))
        assert run_shard(tiny_corpus, f"s3://{bucket}/demo") == 0
        remote = Manifest.load(f"s3://{bucket}/demo")
        local = tmp_path / "local"
        assert run_shard(tiny_corpus, local) == 0
        a, b = (json.loads(m.to_json()) for m in (remote, Manifest.load(str(local))))
        for d in (a, b):  # the time of writing, and its line in the digest
            d.pop("created"), d["digest"].pop("created")
        raw = json.loads(storage.read_bytes(f"s3://{bucket}/demo/manifest.json"))
        assert raw["version"] == 3 and raw["splits"] == manifest_without_time(local)["splits"]
        cached = {
            e["sha256"] + "." + e["path"].rsplit(".", 1)[1]
            for sd in raw["splits"].values()
            for e in sd["index"].values()
        }
        assert sorted(p.name for p in (tmp_path / "index-cache").iterdir()) == sorted(cached)  # fetched once
        assert a == b  # same shards, byte for byte (sha256 in the entries)
        assert run_shard(tiny_corpus, f"s3://{bucket}/demo") == 0  # re-run: everything already complete
    finally:
        server.stop()

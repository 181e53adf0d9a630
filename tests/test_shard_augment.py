"""Augmented copies written at shard time (issue 14, spkr.augment's wiring): K copies per training
utterance keyed ``<key>~aug<k>``, planned interleaved with the originals, described in each copy's json
meta and in ``augment.jsonl``, part of the run's identity (another noise set -> ShardConflict), never in
valid/test. Real shards of a tiny synthetic corpus; the noise set is tools/make_noise_corpus.py's."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from spkr.augment import AugmentConfig, augment, copy_key, description_json, load_sources, speed_speaker
from spkr.corpus.labels import class_weights
from spkr.corpus.protocols import make_protocol
from spkr.features import FeatureConfig, LogMel, compute_logmel, load_audio
from spkr.shards.format import Manifest
from spkr.shards.plan import with_copies
from spkr.shards.schema import ManifestError
from spkr.stream import SpeakerLoader
from spkr.tools import shard as shard_tool

from .conftest import write_corpus

K = 2


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory, noise_tool) -> Path:
    out = tmp_path_factory.mktemp("noise")
    noise_tool.make_noise_corpus(out, seed=1, noise=2, music=1, speech=3, rirs=2)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    layout = {"train-clean-100": [1, 2, 3, 4], "dev-clean": [5], "test-clean": [6]}
    return write_corpus(tmp_path_factory.mktemp("aug") / "corpus", layout, utts_per_speaker=4)


def run_shard(corpus: Path, out: Path, noise_dir: Path, *extra: str) -> int:
    args = ["--source", str(corpus), "--out", str(out), "--shard-size", "7", "--no-progress"]
    noise = ["--augment-copies", str(K), "--noise-dir", str(noise_dir), "--rir-dir", str(noise_dir / "rirs")]
    return shard_tool.main(args + noise + list(extra))


@pytest.fixture(scope="module")
def aug_shards(corpus, noise_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("aug-shards") / "shards"
    assert run_shard(corpus, out, noise_dir) == 0
    return out


def split_keys(m: Manifest, split: str) -> list[str]:
    return [k for info in m.split(split).shards for k in info.keys]


def tar_metas(out: Path, m: Manifest, split: str) -> dict[str, dict]:
    metas = {}
    for info in m.split(split).shards:
        with tarfile.open(out / info.name) as tf:
            for key in info.keys:
                metas[key] = json.loads(tf.extractfile(f"{key}.json").read())
    return metas


def shard_digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*/*.tar")}


def test_copies_only_in_train_planned_interleaved_and_described(aug_shards, corpus):
    m = Manifest.load(str(aug_shards))
    args = shard_tool.parse_args(["--source", str(corpus), "--out", "unused"])
    protocol = make_protocol("closed", *shard_tool.load_corpus(args, [])[:3], seed=0)
    originals = sorted(u.key for u in protocol.splits["train"].utterances)
    # (1 + K) x in train, in the seeded shuffle of (key, copy) order; valid/test untouched
    planned = [
        s.utterance.key if s.copy is None else copy_key(s.utterance.key, s.copy)
        for s in with_copies(protocol.splits["train"].utterances, AugmentConfig(copies=K, kinds=("reverb",)))
    ]
    random.Random("0:train").shuffle(planned)
    assert split_keys(m, "train") == planned and len(planned) == (1 + K) * len(originals)
    for split in ("valid", "test"):
        assert sorted(split_keys(m, split)) == sorted(u.key for u in protocol.splits[split].utterances)
    # labels: a copy is its speaker's class; json meta carries the description
    metas = tar_metas(aug_shards, m, "train")
    labels = dict(zip(split_keys(m, "train"), m.split("train").labels_array().tolist()))
    copies = [k for k in split_keys(m, "train") if "~aug" in k]
    for key in copies:
        source = key.split("~aug")[0]
        assert labels[key] == labels[source] and metas[key]["augment"]["source"] == source
        assert metas[key]["augment"]["key"] == key and "augment" not in metas[source]
    # augment.jsonl: one description per copy, manifest key order, digest in the manifest
    text = (aug_shards / "augment.jsonl").read_text()
    assert text.splitlines() == [description_json(metas[k]["augment"]) for k in copies]
    entry = m.data["augment"]
    assert entry["sha256"] == hashlib.sha256(text.encode()).hexdigest() and entry["count"] == len(copies)
    assert entry["split"] == "train" and entry["copies"] == K and entry["identity"]["sources"]
    assert m.read_augment_descriptions() == [metas[k]["augment"] for k in copies]
    assert m.data["corpus"]["num_samples"]["train"] == len(planned)


def test_a_copys_features_are_the_augmented_audio(aug_shards, noise_dir):
    m = Manifest.load(str(aug_shards))
    info = m.split("train").shards[0]
    key = next(k for k in info.keys if "~aug" in k)
    source, k = key.split("~aug")
    cfg = FeatureConfig()
    spk, chapter, _ = source.split("-")
    path = next(Path(m.data["corpus"]["source"]).glob(f"LibriSpeech/*/{spk}/{chapter}/{source}.flac"))
    aug_cfg = AugmentConfig(copies=K, noise_dir=str(noise_dir), rir_dir=str(noise_dir / "rirs"))
    wave, description = augment(
        load_audio(path, cfg),
        cfg.sample_rate,
        source,
        int(k),
        aug_cfg,
        load_sources(aug_cfg, cfg.sample_rate),
    )
    with tarfile.open(aug_shards / info.name) as tf:
        feats = np.load(io.BytesIO(tf.extractfile(f"{key}.mel.npy").read()), allow_pickle=False)
        meta = json.loads(tf.extractfile(f"{key}.json").read())
    np.testing.assert_array_equal(feats, compute_logmel(wave, LogMel(cfg)))
    assert meta["augment"] == json.loads(json.dumps(description))


def test_loader_reads_copies(aug_shards):
    keys = []
    for batch in SpeakerLoader(str(aug_shards), "train", 8, train=False, rank=0, world_size=1):
        keys += batch["keys"]
    assert sorted(keys) == sorted(split_keys(Manifest.load(str(aug_shards)), "train"))


@pytest.mark.slow
def test_workers_and_resume_write_identical_shards(aug_shards, corpus, noise_dir, tmp_path):
    two = tmp_path / "two"
    assert run_shard(corpus, two, noise_dir, "--workers", "2") == 0
    assert shard_digests(two) == shard_digests(aug_shards)
    assert (two / "augment.jsonl").read_bytes() == (aug_shards / "augment.jsonl").read_bytes()
    # resume: a lost shard (and the files written after it) are redone, identically
    for name in ("train/shard-000003.tar", "train/shard-000003.tar.json", "manifest.json", "augment.jsonl"):
        (two / name).unlink()
    assert run_shard(corpus, two, noise_dir) == 0
    assert shard_digests(two) == shard_digests(aug_shards)
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (two, aug_shards))
    a.pop("created"), b.pop("created")
    a.pop("digest"), b.pop("digest")  # of the fields compared here
    a["augment"].pop("folders"), b["augment"].pop("folders")
    assert a == b


def test_another_noise_set_is_a_conflict(aug_shards, corpus, noise_dir, tmp_path, capsys):
    out, other = tmp_path / "shards", tmp_path / "noise"
    shutil.copytree(aug_shards, out)
    shutil.copytree(noise_dir, other)
    assert run_shard(corpus, out, other) == 0  # the same files elsewhere: same identity, all reused
    assert "0 shards written" in capsys.readouterr().err
    shutil.copy(
        other / "noise" / "coloured" / "white-000.wav", other / "noise" / "coloured" / "white-999.wav"
    )
    assert run_shard(corpus, out, other) == 2
    err = capsys.readouterr().err
    assert "never reused" in err and "augment.sources" in err


def test_a_noise_set_rewritten_in_place_at_the_same_sizes_is_a_conflict(
    aug_shards, corpus, noise_dir, tmp_path, capsys
):
    """Source files are identified by their content: a noise file re-rendered in place (same name,
    same size: here at half the gain) makes the copies another identity, so the re-run stops before
    writing anything, as for another feature config."""
    out, other = tmp_path / "shards", tmp_path / "noise"
    shutil.copytree(aug_shards, out)
    shutil.copytree(noise_dir, other)
    path = next((other / "noise").rglob("*.wav"))
    size = path.stat().st_size
    data, sr = sf.read(path, dtype="int16")
    sf.write(path, data // 2, sr, subtype="PCM_16")
    assert path.stat().st_size == size
    before = shard_digests(out)
    capsys.readouterr()
    assert run_shard(corpus, out, other) == 2
    err = capsys.readouterr().err
    assert "never reused" in err and "augment.sources" in err and "Traceback" not in err
    assert shard_digests(out) == before and Manifest.load(str(out)).dataset_id  # nothing written


@pytest.mark.parametrize("speeds", [["--augment-config", '{"speeds": [0.9]}'], ["--augment-speeds", "0.9"]])
def test_speed_classes_are_appended_and_weighted(corpus, noise_dir, tmp_path, speeds):
    out = tmp_path / "shards"
    extra = ["--augment-kinds", "speed", "--speed-classes", *speeds]
    assert run_shard(corpus, out, noise_dir, *extra) == 0
    m = Manifest.load(str(out))
    speakers = [str(s) for s in range(1, 7)]
    assert m.labels == speakers + [speed_speaker(s, 0.9) for s in speakers]  # original ids unchanged
    metas = tar_metas(out, m, "train")
    train_labels = m.split("train").labels_array().tolist()
    for key, label in zip(split_keys(m, "train"), train_labels):
        copy = "~aug" in key
        assert m.labels[label] == (
            speed_speaker(metas[key]["speaker"], 0.9) if copy else metas[key]["speaker"]
        )
    named = [type("S", (), {"speaker": m.labels[lab]}) for lab in train_labels]
    assert m.class_weights == pytest.approx(class_weights(named, m.labels))
    assert max(m.split("valid").labels_array()) < len(speakers)


def test_speed_classes_without_copies_in_them_are_named(corpus, noise_dir, tmp_path, capsys):
    assert (
        run_shard(corpus, tmp_path / "s", noise_dir, "--augment-kinds", "speed,reverb", "--speed-classes")
        == 2
    )
    assert "speed classes get no copy" in capsys.readouterr().err


def test_changed_descriptions_are_refused(aug_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(aug_shards, out)
    m = Manifest.load(str(out))
    (out / "augment.jsonl").write_text((out / "augment.jsonl").read_text().replace("0", "1", 1))
    with pytest.raises(ManifestError, match=r"augment.jsonl: sha256 .* differs"):
        m.read_augment_descriptions()


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--noise-dir", "n"], "--noise-dir needs --augment-copies"),
        (["--speed-classes"], "--speed-classes needs --augment-copies"),
        (["--augment-kinds", "noise"], "--augment-kinds needs --augment-copies"),
        (["--augment-speeds", "0.9"], "--augment-speeds needs --augment-copies"),
        (
            ["--augment-copies", "1", "--augment-speeds", "0.9,fast"],
            "not a comma list of numbers: '0.9,fast'",
        ),
        (["--augment-copies", "1", "--augment-speeds", ","], "empty list of speed factors"),
    ],
)
def test_augment_options_need_copies(argv, says, capsys):
    with pytest.raises(SystemExit):
        shard_tool.parse_args(["--source", "x", "--out", "y"] + argv)
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--augment-kinds", "noise,thunder"], "augment kind 'thunder'"),
        (["--augment-config", '{"snr": 3}'], "snr"),
        (["--augment-kinds", "speed", "--augment-speeds", "0.9,1.0"], "augment speed 1.0 must be"),
    ],
)
def test_bad_augment_config_is_named(corpus, noise_dir, tmp_path, argv, says, capsys):
    assert run_shard(corpus, tmp_path / "s", noise_dir, *argv) == 2
    assert says in capsys.readouterr().err

"""Protocols in the shard tool (issue 14, docs/protocols.md): per-split label spaces, the manifest's
``protocol`` entry and its validation, trial files beside the shards, the Manifest accessors, and
verification splits read by the real loader.

Fast tests shard a tiny synthetic LibriSpeech tree with 2 dev and 2 test speakers; the ``slow`` ones
shard the bundled demo corpus (data/demo) with every protocol, once per module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from spkr.corpus.labels import build_splits
from spkr.corpus.protocols import make_protocol
from spkr.shards.format import Manifest, dataset_id
from spkr.shards.plan import plan_shards
from spkr.shards.schema import PROTOCOLS, ManifestError
from spkr.stream import SpeakerLoader
from spkr.tools import chart_dataset
from spkr.tools import shard as shard_tool

from .conftest import DEMO_ROOT, write_corpus

# plan hashes of the demo's closed split, shard size 150, identity {"pinned": "identity"}, computed
# with the shard planner before protocols existed (it took one label list for every split)
PINNED_CLOSED_PLAN = {
    "train/shard-000000.tar": "49570b0a7877efb2",
    "train/shard-000001.tar": "51a8d021cbd522f3",
    "train/shard-000002.tar": "0414dc4a7e60094b",
    "valid/shard-000000.tar": "56b5876db5689ca2",
    "test/shard-000000.tar": "e4303be95fa0b509",
    "test/shard-000001.tar": "4334348fa86e94cb",
}
# dataset_id of the demo's closed shards (default features, torchaudio backend) before protocols
PINNED_CLOSED_DATASET_ID = {"torchaudio": "b8631c280b8e7f3b"}


def run_shard(source: Path, out: Path, *extra: str) -> int:
    args = ["--source", str(source), "--out", str(out), "--shard-size", "200", "--no-progress"]
    return shard_tool.main(args + list(extra))


def demo_corpus():
    args = shard_tool.parse_args(["--source", str(DEMO_ROOT), "--out", "unused"])
    train, dev, test, _ = shard_tool.load_corpus(args, [])
    return train, dev, test


def check_shard_set(out: Path, protocol: str) -> Manifest:
    """Everything a protocol's shard set promises, read back through the real loader."""
    m = Manifest.load(str(out))
    assert m.protocol_name == protocol == m.data["corpus"]["protocol"]
    entry = m.data["protocol"]
    assert list(entry["splits"]) == m.split_names
    assert m.splits_with_role("train") == ["train"]
    for split in m.split_names:
        keys, labels = [], []
        for batch in SpeakerLoader(str(out), split, 16, train=False, rank=0, world_size=1):
            keys += batch["keys"]
            labels += batch["labels"].tolist()
        info = m.split(split)
        assert sorted(keys) == sorted(k for s in info.shards for k in s.keys)
        assert m.data["corpus"]["num_utterances"][split] == len(keys)
        speakers = m.split_speakers(split)
        assert 0 <= min(labels) and max(labels) < len(speakers)
        assert all(speakers[lab] == key.split("-")[0] for key, lab in zip(keys, labels))
        if m.split_kind(split) == "verification":
            assert speakers == entry["splits"][split]["speakers"] and len(speakers) < len(m.labels) + 10
            text = m.read_trials(split)
            assert m.trials_url(split) == str(out / "trials" / f"{split}.txt")
            assert hashlib.sha256(text.encode()).hexdigest() == entry["splits"][split]["trials"]["sha256"]
            trials = [line.split() for line in text.splitlines()]
            assert len(trials) == entry["splits"][split]["trials"]["count"] > 0
            assert {t[1] for t in trials} <= set(m.enroll_keys(split)) <= set(keys)
            assert {t[2] for t in trials} <= set(keys) - set(m.enroll_keys(split))
            assert all((t[0] == "1") == (t[1].split("-")[0] == t[2].split("-")[0]) for t in trials)
        else:
            assert speakers == m.labels
            with pytest.raises(ManifestError, match="classification split: it has no trial file"):
                m.trials_url(split)
    summary = chart_dataset.dataset_summary(m)
    assert summary["protocol"]["name"] == protocol
    assert any(line.startswith("protocol ") for line in chart_dataset.describe(summary))
    return m


# --------------------------------------------------------------------------- fast: planner and tiny corpus


def test_closed_plan_hashes_unchanged_with_per_split_label_spaces():
    train, dev, test = demo_corpus()
    s = build_splits(train, dev, test, seed=0)
    splits = {"train": s.train, "valid": s.valid, "test": s.test}
    spaces = make_protocol("closed", train, dev, test, seed=0).label_spaces()
    for speakers in (s.speakers, spaces):  # one list for all splits (as before) or {split: list}
        jobs = plan_shards(splits, speakers, 150, seed=0, identity={"pinned": "identity"})
        assert {j.name: j.plan_hash() for j in jobs} == PINNED_CLOSED_PLAN


@pytest.fixture(scope="module")
def open_corpus(tmp_path_factory) -> Path:
    """3 train, 2 dev and 2 test speakers, 5 utterances each: enough for an open protocol."""
    layout = {"train-clean-100": [1, 2, 3], "dev-clean": [4, 5], "test-clean": [6, 7]}
    return write_corpus(tmp_path_factory.mktemp("open") / "corpus", layout, utts_per_speaker=5)


@pytest.fixture(scope="module")
def open_shards(open_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("open-shards") / "shards"
    assert run_shard(open_corpus, out, "--protocol", "open", "--trials-per-speaker", "6") == 0
    return out


def test_open_protocol_on_a_tiny_corpus(open_shards):
    m = check_shard_set(open_shards, "open")
    assert m.labels == ["1", "2", "3"]  # unseen speakers never enter the class set
    assert len(m.class_weights) == 3
    assert m.split_names == ["train", "valid", "valid-verify", "test-verify"]
    assert [m.split_kind(s) for s in m.split_names] == ["classification"] * 2 + ["verification"] * 2
    assert m.splits_with_role("valid") == ["valid", "valid-verify"]
    assert m.splits_with_role("test") == ["test-verify"]
    assert m.split_speakers("valid-verify") == ["4", "5"] and m.split_speakers("test-verify") == ["6", "7"]
    assert m.data["protocol"]["params"]["trials_per_speaker"] == 6
    keys = {s: [k for i in m.split(s).shards for k in i.keys] for s in m.split_names}
    without_protocol = dataset_id(m.data["feature_fingerprint"], m.feature_backend, m.labels, keys)
    assert m.dataset_id != without_protocol  # open: the protocol entry is part of the identity


def test_other_trial_options_reuse_every_shard(open_corpus, open_shards, tmp_path, capsys):
    out = tmp_path / "shards"
    shutil.copytree(open_shards, out)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*.tar")}
    assert run_shard(open_corpus, out, "--protocol", "open", "--trials-per-speaker", "4") == 0
    assert "0 shards written" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.tar")} == before
    m = Manifest.load(str(out))
    assert m.data["protocol"]["splits"]["test-verify"]["trials"]["count"] == 8  # 2 speakers x 4
    assert len(m.read_trials("test-verify").splitlines()) == 8
    assert m.dataset_id != Manifest.load(str(open_shards)).dataset_id


def test_closed_session_on_a_tiny_corpus_is_loud_when_nothing_can_be_held_out(open_corpus, tmp_path, capsys):
    # one chapter per speaker: no chapter can be held out for valid/test
    assert run_shard(open_corpus, tmp_path / "s", "--protocol", "closed-session") == 2
    assert "chapter" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--trials-per-speaker", "10"], "--trials-per-speaker only applies to --protocol open"),
        (["--protocol", "closed-session", "--valid-fraction", "0.1"], "--valid-fraction only applies"),
        (["--enroll-per-speaker", "2"], "--enroll-per-speaker only applies"),
        (["--protocol", "sideways"], "invalid choice"),
    ],
)
def test_open_only_options_are_errors_otherwise(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        shard_tool.parse_args(["--source", "x", "--out", "y"] + argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err


def test_bad_open_options_are_named(open_corpus, tmp_path, capsys):
    assert run_shard(open_corpus, tmp_path / "s", "--protocol", "open", "--trials-per-speaker", "1") == 2
    assert "trials_per_speaker" in capsys.readouterr().err


# --------------------------------------------------------------------------- hostile manifests


def _edited(shards: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(shards, out)
    data = json.loads(Manifest.load(str(out)).to_json())  # per-sample lists inline (version 2), to edit
    edit(data)
    (out / "manifest.json").write_text(json.dumps(data))
    return out


def _verify_entry(d: dict, split: str = "valid-verify") -> dict:
    return d["protocol"]["splits"][split]


def _set_label(d: dict, value: int) -> None:
    d["splits"]["valid-verify"]["shards"][0]["labels"][0] = value


HOSTILE = [
    ("label = len(speakers)", lambda d: _set_label(d, 2), "labels holds 2, outside 0..1"),
    ("label = -1", lambda d: _set_label(d, -1), "outside 0..1"),
    (
        "trials path with ..",
        lambda d: _verify_entry(d)["trials"].update(path="trials/../../outside.txt"),
        "is not 'trials/valid-verify.txt'",
    ),
    (
        "absolute trials path",
        lambda d: _verify_entry(d)["trials"].update(path="/etc/passwd"),
        "is not 'trials/valid-verify.txt'",
    ),
    ("sha256 not hex", lambda d: _verify_entry(d)["trials"].update(sha256="x" * 64), "not 64 hex digits"),
    ("unknown protocol", lambda d: d["protocol"].update(name="half-open"), "is not one of"),
    ("unknown kind", lambda d: _verify_entry(d).update(kind="ranking"), "kind 'ranking'"),
    ("unknown role", lambda d: _verify_entry(d).update(role="final"), "role 'final'"),
    ("split missing", lambda d: d["protocol"]["splits"].pop("valid-verify"), "lists splits"),
    (
        "two train roles",
        lambda d: d["protocol"]["splits"]["valid"].update(role="train"),
        "exactly one classification split with role train",
    ),
    ("speaker twice", lambda d: _verify_entry(d)["speakers"].append("4"), "speakers lists a speaker twice"),
    ("enroll key elsewhere", lambda d: _verify_entry(d)["enroll_keys"].append("1-11-0000"), "enrolls 1 key"),
    ("protocol not an object", lambda d: d.update(protocol=[1]), "protocol is a list"),
    (
        "split named trials",
        lambda d: d["splits"].update(trials=d["splits"].pop("valid")),
        "is reserved",
    ),
    (
        "augmented copy outside train",
        lambda d: d["splits"]["valid"]["shards"][0]["keys"].__setitem__(0, "1-11-0000~aug0"),
        "copies belong only in the training split",
    ),
    ("edited protocol stats", lambda d: d["protocol"]["stats"].update(x=1), "dataset_id"),
]


@pytest.mark.parametrize("what, edit, says", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_protocol_entries_are_refused_at_load(open_shards, tmp_path, what, edit, says):
    out = _edited(open_shards, tmp_path, edit)
    with pytest.raises(ManifestError, match="manifest.json") as exc:
        Manifest.load(str(out))
    assert says in str(exc.value)


def test_trial_file_changed_or_missing_is_refused(open_shards, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(open_shards, out)
    m = Manifest.load(str(out))
    path = out / "trials" / "valid-verify.txt"
    path.write_text(path.read_text().replace("1 ", "0 ", 1))
    with pytest.raises(ManifestError, match=r"valid-verify.txt: sha256 .* differs from the manifest's"):
        m.read_trials("valid-verify")
    path.unlink()
    with pytest.raises(ManifestError, match="trial file of split 'valid-verify' is missing"):
        m.read_trials("valid-verify")
    assert m.read_trials("test-verify")  # the other split's file is fine


# --------------------------------------------------------------------------- slow: the demo corpus


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory) -> dict[str, Path]:
    outs = {}
    for protocol in PROTOCOLS:
        outs[protocol] = tmp_path_factory.mktemp("demo") / protocol
        assert run_shard(DEMO_ROOT, outs[protocol], "--protocol", protocol, "--workers", "2") == 0
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_demo_end_to_end(demo_shards, protocol):
    m = check_shard_set(demo_shards[protocol], protocol)
    train, dev, test = demo_corpus()
    expected = make_protocol(protocol, train, dev, test, seed=0)
    assert m.data["protocol"] == json.loads(json.dumps(expected.manifest_entry()))
    for path, text in expected.trial_files().items():
        assert (demo_shards[protocol] / path).read_text() == text
    if protocol == "closed-session":
        assert m.data["protocol"]["stats"]["held_out"] == {"valid": 65, "test": 114}
        assert {s: m.split(s).num_samples for s in m.split_names} == {"train": 461, "valid": 65, "test": 114}
    if protocol == "open":
        assert m.data["protocol"]["splits"]["test-verify"]["trials"]["count"] == 800


@pytest.mark.slow
def test_demo_closed_keeps_its_dataset_id_and_shards(demo_shards):
    m = Manifest.load(str(demo_shards["closed"]))
    keys = {s: [k for i in m.split(s).shards for k in i.keys] for s in m.split_names}
    assert m.dataset_id == dataset_id(m.data["feature_fingerprint"], m.feature_backend, m.labels, keys)
    if (
        m.feature_backend in PINNED_CLOSED_DATASET_ID
        and m.feature_config.to_dict() == m.data["feature_config"]
    ):
        assert m.dataset_id == PINNED_CLOSED_DATASET_ID[m.feature_backend]
    # a re-run with the closed protocol spelled out reuses every shard (plan hashes unchanged)
    tars = {p: p.read_bytes() for p in demo_shards["closed"].glob("*/*.tar")}
    assert run_shard(DEMO_ROOT, demo_shards["closed"], "--protocol", "closed") == 0
    assert {p: p.read_bytes() for p in demo_shards["closed"].glob("*/*.tar")} == tars

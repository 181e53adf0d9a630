"""spkr.corpus: subset names, the OpenSLR reader, class sets, the closed-set re-split and class weights."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from spkr.corpus import (
    Splits,
    Utterance,
    build_splits,
    class_set,
    class_weights,
    expand_subsets,
    iter_openslr,
    read_speakers_txt,
    training_combination,
)

SR = 16000

# ------------------------------------------------------------------------------------------ names


def test_expand_subsets():
    assert expand_subsets("train.100") == ["train-clean-100"]
    assert expand_subsets("train.460") == ["train-clean-100", "train-clean-360"]
    assert expand_subsets("train.960") == ["train-clean-100", "train-clean-360", "train-other-500"]
    assert expand_subsets(["train.460", "train-clean-100", "dev-clean"]) == [
        "train-clean-100",
        "train-clean-360",
        "dev-clean",
    ]
    assert expand_subsets("dev-clean,test-clean") == ["dev-clean", "test-clean"]
    with pytest.raises(ValueError, match="unknown LibriSpeech subset 'train-clean-200'"):
        expand_subsets("train-clean-200")


def test_training_combination():
    assert training_combination("train.960") == (
        ["train-clean-100", "train-clean-360", "train-other-500"],
        "dev-clean",
        "test-clean",
    )
    assert training_combination("train-other-500") == (["train-other-500"], "dev-clean", "test-clean")
    with pytest.raises(ValueError, match="not a training subset"):
        training_combination("dev-clean")


# ------------------------------------------------------------------------------------------ OpenSLR


def _write_audio(path: Path, seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.3 * np.sin(2 * np.pi * (200 + 10 * seed) * t) + 0.01 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x.astype(np.float32), SR, subtype="PCM_16")


SPEAKERS_TXT = """\
; Some comment
;ID  |SEX| SUBSET           |MINUTES| NAME
2    | F | train-clean-100  | 25.03 | Speaker Two
10   | M | train-clean-100  | 20.18 | |CBW|Simon
7    | F | dev-clean        |  8.00 | Seven
"""


@pytest.fixture
def openslr_tree(tmp_path):
    root = tmp_path / "corpus"
    ls = root / "LibriSpeech"
    layout = {"train-clean-100": {"10": ["100", "9"], "2": ["50"]}, "dev-clean": {"7": ["70"]}}
    expected = []
    seed = 0
    for subset, spks in layout.items():
        for spk, chapters in spks.items():
            for ch in chapters:
                lines = []
                for utt in (2, 0, 1):  # written out of order
                    key = f"{spk}-{ch}-{utt:04d}"
                    seconds = 0.25 + 0.05 * seed
                    _write_audio(ls / subset / spk / ch / f"{key}.flac", seconds, seed)
                    seed += 1
                    lines.append(f"{key} WORDS OF {key}")
                    expected.append((subset, spk, ch, key, seconds))
                (ls / subset / spk / ch / f"{spk}-{ch}.trans.txt").write_text("\n".join(lines) + "\n")
    (ls / "SPEAKERS.TXT").write_text(SPEAKERS_TXT)
    return root, expected


def test_iter_openslr(openslr_tree):
    root, expected = openslr_tree
    utts = list(iter_openslr(root, ["train.100", "dev-clean"]))
    assert [u.key for u in utts] == [
        "2-50-0000",
        "2-50-0001",
        "2-50-0002",
        "10-9-0000",
        "10-9-0001",
        "10-9-0002",
        "10-100-0000",
        "10-100-0001",
        "10-100-0002",
        "7-70-0000",
        "7-70-0001",
        "7-70-0002",
    ]
    by_key = {u.key: u for u in utts}
    for subset, spk, ch, key, seconds in expected:
        u = by_key[key]
        assert (u.subset, u.speaker, u.chapter) == (subset, spk, ch)
        assert u.duration == pytest.approx(seconds, abs=1e-3)
        assert u.transcript == f"WORDS OF {key}"
        assert Path(u.path).is_absolute() and Path(u.path).is_file()
        assert u.audio_bytes is None
    assert [u.duration for u in iter_openslr(root, "dev-clean", with_duration=False)] == [0.0] * 3


def test_iter_openslr_plain_layout_wav_and_missing_transcript(tmp_path):
    root = tmp_path / "plain"  # <root>/<subset>/..., no LibriSpeech/ level
    _write_audio(root / "test-clean" / "5" / "6" / "5-6-0000.wav", 0.5, 1)
    _write_audio(root / "test-clean" / "5" / "6" / "5-6-0001.flac", 0.5, 2)
    (root / "test-clean" / "5" / "6" / "5-6.trans.txt").write_text("5-6-0001 HELLO WORLD\n")
    utts = list(iter_openslr(root, "test-clean"))
    assert [(u.key, u.transcript) for u in utts] == [("5-6-0000", None), ("5-6-0001", "HELLO WORLD")]
    assert utts[0].path.endswith(".wav")


def test_iter_openslr_missing_subset(openslr_tree):
    root, _ = openslr_tree
    with pytest.raises(FileNotFoundError, match="test-clean"):
        list(iter_openslr(root, ["dev-clean", "test-clean"]))


def test_read_speakers_txt(openslr_tree):
    root, _ = openslr_tree
    spk = read_speakers_txt(root / "LibriSpeech" / "SPEAKERS.TXT")
    assert set(spk) == {"2", "10", "7"}
    assert spk["10"].name == "|CBW|Simon"
    assert (spk["2"].sex, spk["2"].subset, spk["2"].minutes) == ("F", "train-clean-100", 25.03)
    assert spk["7"].subset == "dev-clean"


# -------------------------------------------------------------------------- class-set arithmetic


def _utts(subset: str, speakers: range, per_speaker: int = 1) -> list[Utterance]:
    return [
        Utterance(f"{s}-1-{i:04d}", str(s), "1", subset, "", 0.0, None)
        for s in speakers
        for i in range(per_speaker)
    ]


def test_class_set_sizes_with_librispeech_structure():
    # LibriSpeech speaker counts: 251 / 921 / 1166 train, 40 dev-clean, 40 test-clean, all disjoint.
    ranges = {
        "train-clean-100": range(1000, 1251),
        "train-clean-360": range(2000, 2921),
        "train-other-500": range(4000, 5166),
    }
    train = {name: _utts(name, r) for name, r in ranges.items()}
    dev = _utts("dev-clean", range(8000, 8040))
    test = _utts("test-clean", range(9000, 9040))

    def n_classes(combination: str) -> int:
        subsets, _, _ = training_combination(combination)
        return len(class_set([u for s in subsets for u in train[s]], dev, test))

    assert n_classes("train-clean-100") == 331
    assert n_classes("train-clean-360") == 1001
    assert n_classes("train-other-500") == 1246
    assert n_classes("train.460") == 1252
    assert n_classes("train.960") == 2418
    assert n_classes("train.100") == 331


def test_class_set_sorted_numerically():
    utts = _utts("x", range(1)) + [Utterance("100-1-1", "100", "1", "x", "", 0.0, None)]
    utts += [Utterance("9-1-1", "9", "1", "x", "", 0.0, None)]
    assert class_set(utts, [], []) == ["0", "9", "100"]


# -------------------------------------------------------------------------------------- re-split


def _librispeech_like(seed: int = 0):
    """~LibriSpeech-shaped toy: 30 train speakers, 6 dev speakers, 6 test speakers, varying counts."""
    rng = np.random.default_rng(seed)
    train = [
        Utterance(f"{s}-{s}0-{i:04d}", str(s), f"{s}0", "train-clean-100", "", 1.0, None)
        for s in range(100, 130)
        for i in range(int(rng.integers(8, 40)))
    ]
    dev = _utts("dev-clean", range(200, 206), per_speaker=10)
    test = _utts("test-clean", range(300, 306), per_speaker=9)
    return train, dev, test


def _check(splits: Splits, train, dev, test):
    pool = train + dev + test
    assert len(splits.valid) == len(dev) and len(splits.test) == len(test)
    keys = [u.key for lst in (splits.train, splits.valid, splits.test) for u in lst]
    assert len(keys) == len(set(keys))
    assert set(keys) == {u.key for u in pool}
    train_spk = Counter(u.speaker for u in splits.train)
    for u in splits.valid + splits.test:
        assert train_spk[u.speaker] >= 1
    assert splits.speakers == class_set(train, dev, test)


def test_build_splits_closed_set():
    train, dev, test = _librispeech_like()
    splits = build_splits(train, dev, test, seed=0)
    _check(splits, train, dev, test)
    train_spk = Counter(u.speaker for u in splits.train)
    assert set(train_spk) == set(splits.speakers)  # every class is trainable
    assert min(train_spk.values()) >= 2  # default: 2 per speaker when feasible
    # held-out utterances are spread across speakers, including the original train speakers
    held = {u.speaker for u in splits.valid + splits.test}
    assert len(held) > len(splits.speakers) // 2
    assert any(u.subset == "train-clean-100" for u in splits.valid)
    # dev/test speakers' own utterances mostly move to train
    orig_dev_test = {u.key for u in dev + test}
    assert sum(u.key in orig_dev_test for u in splits.train) > len(orig_dev_test) // 2
    # class weights over the new train split
    w = class_weights(splits.train, splits.speakers)
    assert len(w) == len(splits.speakers)


def test_build_splits_deterministic_and_order_independent():
    train, dev, test = _librispeech_like()
    a = build_splits(train, dev, test, seed=3)
    b = build_splits(list(reversed(train)), dev[::-1], test, seed=3)
    assert a == b
    c = build_splits(train, dev, test, seed=4)
    _check(c, train, dev, test)
    assert [u.key for u in a.valid] != [u.key for u in c.valid]


def test_build_splits_min_train_fallback_and_impossible():
    # every speaker has 2 utterances: min 2 is infeasible, so the default falls back to 1
    train = _utts("train-clean-100", range(10, 20), per_speaker=2)
    dev = _utts("dev-clean", range(30, 32), per_speaker=2)
    test = _utts("test-clean", range(40, 42), per_speaker=2)
    splits = build_splits(train, dev, test, seed=0)
    _check(splits, train, dev, test)
    with pytest.raises(ValueError, match="cannot re-split"):
        build_splits(train, dev, test, seed=0, min_train_per_speaker=2)
    # a single utterance per speaker: nobody can spare one for valid/test
    single = _utts("train-clean-100", range(10, 20))
    with pytest.raises(ValueError, match="cannot re-split"):
        build_splits(single, _utts("dev-clean", range(30, 33)), _utts("test-clean", range(40, 43)))
    # requested sizes too large
    with pytest.raises(ValueError, match="cannot re-split"):
        build_splits(_utts("t", range(1, 3), 2), _utts("d", range(5, 7), 3), _utts("e", range(8, 10), 3))
    # duplicate keys
    with pytest.raises(ValueError, match="duplicate"):
        build_splits(train, train[:1], [])


def test_build_splits_keeps_single_utterance_speakers_in_train():
    train = _utts("train-clean-100", range(10, 20), per_speaker=6) + _utts("train-clean-100", range(50, 51))
    dev = _utts("dev-clean", range(30, 32), per_speaker=5)
    test = _utts("test-clean", range(40, 42), per_speaker=5)
    splits = build_splits(train, dev, test, seed=1)
    _check(splits, train, dev, test)
    assert [u.speaker for u in splits.train].count("50") == 1


# --------------------------------------------------------------------------------- class weights


def test_class_weights_inverse_frequency_mean_one():
    counts = {"1": 10, "2": 20, "3": 40, "4": 5}
    utts = [Utterance(f"{s}-1-{i}", s, "1", "x", "", 0.0, None) for s, n in counts.items() for i in range(n)]
    speakers = ["1", "2", "3", "4"]
    w = class_weights(utts, speakers)
    assert statistics.fmean(w) == pytest.approx(1.0)
    for (s1, n1), (s2, n2) in zip(list(counts.items())[:-1], list(counts.items())[1:]):
        i, j = speakers.index(s1), speakers.index(s2)
        assert w[i] * n1 == pytest.approx(w[j] * n2)  # inverse to counts
    # equal counts -> all ones; balanced scheme = N / (C n_c)
    eq = [Utterance(f"{s}-1-{i}", s, "1", "x", "", 0.0, None) for s in "12" for i in range(3)]
    assert class_weights(eq, ["1", "2"]) == pytest.approx([1.0, 1.0])
    n_total = sum(counts.values())
    assert class_weights(utts, speakers, scheme="balanced") == pytest.approx(
        [n_total / (4 * counts[s]) for s in speakers]
    )
    with pytest.raises(ValueError, match="no training utterances"):
        class_weights(utts, speakers + ["5"])
    with pytest.raises(ValueError, match="not in the class set"):
        class_weights(utts, speakers[:3])

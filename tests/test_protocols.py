"""spkr.corpus.protocols: closed (unchanged), closed-session (held-out chapters), open (unseen speakers,
enrollment, trial lists) on the bundled demo corpus and on synthetic utterance lists."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from spkr.corpus import Utterance, build_splits, iter_openslr
from spkr.corpus.protocols import (
    TEST_VERIFY,
    VALID_VERIFY,
    make_protocol,
    verification_split,
    verify_protocol,
)
from spkr.shards.schema import CLOSED_SESSION
from spkr.shards.trials import Trial, format_trials, parse_trials

from .conftest import DEMO_ROOT

# --------------------------------------------------------------------------------------- corpora


@pytest.fixture(scope="module")
def demo():
    """The bundled corpus: 10 train speakers, 2 dev, 4 test; 8 speakers have 2 chapters."""
    if not (DEMO_ROOT / "LibriSpeech").is_dir():
        pytest.skip(f"demo corpus missing: {DEMO_ROOT}")
    return tuple(
        list(iter_openslr(DEMO_ROOT, s, with_duration=False))
        for s in ("train.100", "dev-clean", "test-clean")
    )


def synthetic(seed: int = 0, train=range(100, 130), dev=range(200, 206), test=range(300, 306)):
    """Speakers with 1-3 chapters of 3-24 utterances each (the generator the golden digests used)."""
    rng = np.random.default_rng(seed)
    out = []
    for subset, speakers in (("train-clean-100", train), ("dev-clean", dev), ("test-clean", test)):
        utts = []
        for s in speakers:
            for c in range(int(rng.integers(1, 4))):
                ch = f"{s}{c}"
                for i in range(int(rng.integers(3, 25))):
                    utts.append(Utterance(f"{s}-{ch}-{i:04d}", str(s), ch, subset, "", 1.0, None))
        out.append(utts)
    return tuple(out)


def utts_of(speaker: int, chapters: dict[int, int], subset: str = "dev-clean") -> list[Utterance]:
    """``chapters``: chapter -> number of utterances."""
    return [
        Utterance(f"{speaker}-{ch}-{i:04d}", str(speaker), str(ch), subset, "", 1.0, None)
        for ch, n in chapters.items()
        for i in range(n)
    ]


def digest(train, valid, test, speakers) -> str:
    h = hashlib.sha256()
    for name, utts in (("train", train), ("valid", valid), ("test", test)):
        h.update(("\n[" + name + "]\n" + "\n".join(u.key for u in utts)).encode())
    h.update(json.dumps(speakers).encode())
    return h.hexdigest()[:16]


def chapters_of(utts) -> set[tuple[str, str]]:
    return {(u.speaker, u.chapter) for u in utts}


# ---------------------------------------------------------------------------------------- closed

# build_splits' output before spkr.corpus.protocols existed (git afd8304), as digests of the key lists
GOLDEN_DEMO = {0: "30f70178ec0768dd", 1: "ea8c7fc14bac490f", 7: "64aa38371d533490"}
GOLDEN_SYNTHETIC = {0: "15a82c72dc045a9b", 3: "b0b82dec18f7c80a"}


def test_closed_is_the_unchanged_resplit(demo):
    for seed, expected in GOLDEN_DEMO.items():
        s = build_splits(*demo, seed=seed)
        assert digest(s.train, s.valid, s.test, s.speakers) == expected
        p = make_protocol("closed", *demo, seed=seed)
        sp = p.splits
        assert (
            digest(sp["train"].utterances, sp["valid"].utterances, sp["test"].utterances, p.classes)
            == expected
        )
        assert (sp["train"].utterances, sp["valid"].utterances, sp["test"].utterances) == (
            s.train,
            s.valid,
            s.test,
        )
        assert list(p.splits) == ["train", "valid", "test"] and p.stats == {} and p.trial_files() == {}
    corpus = synthetic()
    assert [len(x) for x in corpus] == [853, 146, 190]
    for seed, expected in GOLDEN_SYNTHETIC.items():
        s = build_splits(*corpus, seed=seed)
        assert digest(s.train, s.valid, s.test, s.speakers) == expected


# -------------------------------------------------------------------------------- closed-session


def test_closed_session_on_demo(demo):
    closed = make_protocol("closed", *demo, seed=0)
    p = make_protocol(CLOSED_SESSION, *demo, seed=0)
    assert p.classes == closed.classes and len(p.classes) == 16
    train, valid, test = (p.splits[n].utterances for n in ("train", "valid", "test"))
    assert not chapters_of(train) & (chapters_of(valid) | chapters_of(test))
    assert not chapters_of(valid) & chapters_of(test)  # held-out chapters go whole to one split
    assert {u.speaker for u in train} == set(p.classes)  # every class is trainable
    single = ["1002", "1003", "1004", "1007", "1010", "1011", "1013", "1016"]
    assert p.stats["single_chapter"] == {"count": 8, "speakers": single, "treatment": "train-only"}
    assert not {u.speaker for u in valid + test} & set(single)
    # 8 speakers can give one chapter each: at most 20+24+22+24+23+24+21+21 = 179 of the 240 requested
    assert p.stats["requested"] == {"valid": 80, "test": 160}
    assert len(valid) + len(test) == 179 and p.stats["held_out"] == {"valid": len(valid), "test": len(test)}
    assert p.stats["speakers_with_held_out_chapters"] == 8
    assert 40 <= len(valid) <= 80 and len(test) > len(valid)
    assert sum(p.stats["chapters"].values()) == 24


def test_closed_session_deterministic_order_independent_and_seeded():
    corpus = synthetic(1)
    a = make_protocol(CLOSED_SESSION, *corpus, seed=5)
    b = make_protocol(CLOSED_SESSION, *(list(reversed(x)) for x in corpus), seed=5)
    assert a == b
    c = make_protocol(CLOSED_SESSION, *corpus, seed=6)
    assert chapters_of(c.splits["test"].utterances) != chapters_of(a.splits["test"].utterances)


def test_closed_session_sizes_close_to_closed():
    # LibriSpeech-like: chapters of 10-89 utterances, 1-5 per speaker
    rng = np.random.default_rng(2)
    parts = []
    for subset, speakers in (("train-clean-100", range(100, 251)), ("dev-clean", range(500, 520))):
        parts.append(
            [
                u
                for s in speakers
                for u in utts_of(
                    s, {10 * s + c: int(rng.integers(10, 90)) for c in range(rng.integers(1, 6))}, subset
                )
            ]
        )
    dev = parts[1][: len(parts[1]) // 2]
    test = parts[1][len(parts[1]) // 2 :]
    largest = max(Counter((u.speaker, u.chapter) for x in (parts[0], parts[1]) for u in x).values())
    for seed in range(3):
        p = make_protocol(CLOSED_SESSION, parts[0], dev, test, seed=seed)
        for name, want in (("valid", len(dev)), ("test", len(test))):
            assert abs(len(p.splits[name].utterances) - want) <= largest, (seed, name)


def test_closed_session_errors_and_checks():
    one_chapter = [u for s in range(10, 16) for u in utts_of(s, {1: 6}, "train-clean-100")]
    with pytest.raises(ValueError, match=r"no chapter could be held out for valid .* only 0 of 8 speakers"):
        make_protocol(CLOSED_SESSION, one_chapter, utts_of(20, {1: 4}), utts_of(30, {1: 4}))
    with pytest.raises(ValueError, match="duplicate"):
        make_protocol(CLOSED_SESSION, one_chapter, one_chapter[:1], [])
    # no dev/test utterances requested: everything is train, no error
    p = make_protocol(CLOSED_SESSION, one_chapter, [], [])
    assert len(p.splits["train"].utterances) == 36 and p.stats["single_chapter"]["count"] == 6
    # verify_protocol refuses a held-out chapter that also has a training utterance
    good = make_protocol(CLOSED_SESSION, *synthetic(), seed=0)
    leak = good.splits["valid"].utterances[0]
    broken_splits = dict(good.splits)
    broken_splits["train"] = dataclasses.replace(
        good.splits["train"], utterances=good.splits["train"].utterances + [leak]
    )
    broken_splits["valid"] = dataclasses.replace(
        good.splits["valid"], utterances=good.splits["valid"].utterances[1:]
    )
    with pytest.raises(ValueError, match="valid shares chapter"):
        verify_protocol(dataclasses.replace(good, splits=broken_splits), [u for x in synthetic() for u in x])


# ------------------------------------------------------------------------------------------ open


def test_open_on_demo(demo):
    train_utts, dev, test = demo
    p = make_protocol("open", *demo, seed=0, trials_per_speaker=40)
    assert list(p.splits) == ["train", "valid", VALID_VERIFY, TEST_VERIFY]
    assert p.classes == sorted({u.speaker for u in train_utts}) and len(p.classes) == 10
    assert len(p.splits["valid"].utterances) == 20 and len(p.splits["train"].utterances) == 380
    assert {u.speaker for u in p.splits["valid"].utterances} <= set(p.classes)
    for name, source in ((VALID_VERIFY, dev), (TEST_VERIFY, test)):
        sp = p.splits[name]
        assert sp.kind == "verification" and sp.utterances == sorted(
            source, key=lambda u: (int(u.speaker), u.key)
        )
        assert not set(sp.speakers) & set(p.classes)  # unseen speakers never become classes
        assert set(sp.labels()) == set(range(len(sp.speakers)))
        assert len(sp.enroll_keys) == 3 * len(sp.speakers)
    trials = p.splits[TEST_VERIFY].trials
    assert len(trials) == 4 * 40 and sum(t.target for t in trials) == 80
    read = parse_trials(p.splits[TEST_VERIFY].trials_text(), "test-verify.txt")  # the evaluation's reader
    assert [Trial(bool(t), e, x) for t, e, x in zip(read.target, read.enroll, read.test)] == trials
    # speaker 1014 has chapters of 21 and 19: its 20 target trials are all across chapters
    cross = [t for t in trials if t.target and t.enroll.startswith("1014-")]
    assert len(cross) == 20 and all(t.enroll.split("-")[1] != t.test.split("-")[1] for t in cross)
    entry = p.manifest_entry()
    json.dumps(entry)  # JSON-ready
    tv = entry["splits"][TEST_VERIFY]
    assert tv["trials"]["path"] == "trials/test-verify.txt" and tv["trials"]["count"] == 160
    assert (
        tv["trials"]["sha256"]
        == hashlib.sha256(p.trial_files()["trials/test-verify.txt"].encode()).hexdigest()
    )
    assert tv["stats"]["single_chapter_speakers"] == {"count": 3, "speakers": ["1003", "1004", "1011"]}
    assert entry["params"] == {"valid_fraction": 0.05, "enroll_per_speaker": 3, "trials_per_speaker": 40}


def test_open_trials_balanced_spread_and_consistent():
    # very unequal speakers (20 to 170 utterances): non-target trials must still spread evenly
    dev = [u for s in range(1, 7) for u in utts_of(s, {10 * s: 12, 10 * s + 1: 8 + 6 * (s - 1) ** 2})]
    sp = verification_split(VALID_VERIFY, "valid", dev, seed=3, enroll_per_speaker=2, trials_per_speaker=30)
    speaker_of = {u.key: u.speaker for u in dev}
    chapter_of = {u.key: u.chapter for u in dev}
    enroll = set(sp.enroll_keys)
    per_spk = defaultdict(Counter)
    others = defaultdict(Counter)
    for t in sp.trials:
        assert t.enroll in enroll and t.test not in enroll
        assert t.target == (speaker_of[t.enroll] == speaker_of[t.test])
        per_spk[speaker_of[t.enroll]][t.target] += 1
        if not t.target:
            others[speaker_of[t.enroll]][speaker_of[t.test]] += 1
    assert len({(t.enroll, t.test) for t in sp.trials}) == len(sp.trials)
    for s in map(str, range(1, 7)):
        assert per_spk[s][True] == per_spk[s][False] == 15  # balanced, trials_per_speaker in all
        counts = others[s].values()
        assert len(others[s]) == 5 and max(counts) - min(counts) <= 1  # spread over the other speakers
        mine = [k for k in sp.enroll_keys if speaker_of[k] == s]
        assert len(mine) == 2 and len({chapter_of[k] for k in mine}) == 1  # one enrollment session
    assert sp.stats["cross_chapter_target_trials"] == 6 * 15  # enough cross-chapter pairs for all
    assert sp.stats["speakers_below_quota"] == [] and sp.stats["speakers_without_enrollment"] == []


def test_open_small_speakers_are_reported():
    dev = utts_of(1, {10: 3}) + utts_of(2, {20: 1}) + utts_of(3, {30: 9, 31: 9})
    sp = verification_split(TEST_VERIFY, "test", dev, seed=0, enroll_per_speaker=3, trials_per_speaker=100)
    assert sp.stats["speakers_without_enrollment"] == ["2"]  # one utterance: test side only
    assert "2-20-0000" not in sp.enroll_keys
    assert sum(k.startswith("1-") for k in sp.enroll_keys) == 2  # min(3, 3 - 1)
    assert sp.stats["speakers_below_quota"] == ["1", "3"]
    assert sp.stats["single_chapter_speakers"] == {"count": 2, "speakers": ["1", "2"]}
    t1 = Counter(t.target for t in sp.trials if t.enroll.startswith("1-"))
    assert t1[True] == t1[False] == 2  # 2 enrollment x 1 test utterance: 2 target pairs, balanced


def test_open_deterministic_and_seeded():
    corpus = synthetic(4)
    a = make_protocol("open", *corpus, seed=1)
    b = make_protocol("open", *(list(reversed(x)) for x in corpus), seed=1)
    assert a == b and a.trial_files() == b.trial_files()
    c = make_protocol("open", *corpus, seed=2)
    assert c.splits[TEST_VERIFY].trials != a.splits[TEST_VERIFY].trials
    assert c.splits[TEST_VERIFY].enroll_keys != a.splits[TEST_VERIFY].enroll_keys


def test_open_errors():
    train, dev, test = synthetic(0)
    intruder = utts_of(100, {999: 2}, "dev-clean")  # a training speaker recorded in dev-clean
    with pytest.raises(
        ValueError, match=r"1 speaker\(s\) are shared: 100 in train \(train-clean-100\), dev \(dev-clean\)"
    ):
        make_protocol("open", train, dev + intruder, test)
    with pytest.raises(ValueError, match="speaker-disjoint"):
        make_protocol("open", train, dev, test + utts_of(200, {998: 3}, "test-clean"))
    with pytest.raises(ValueError, match=">= 2 speakers"):
        make_protocol("open", train, utts_of(200, {1: 5}), test)
    with pytest.raises(ValueError, match="no utterances"):
        make_protocol("open", train, dev, [])
    with pytest.raises(ValueError, match="trials_per_speaker"):
        make_protocol("open", train, dev, test, trials_per_speaker=1)
    with pytest.raises(ValueError, match="valid_fraction"):
        make_protocol("open", train, dev, test, valid_fraction=1.0)
    with pytest.raises(ValueError, match="unknown protocol 'opne'"):
        make_protocol("opne", train, dev, test)
    # verify_protocol refuses trials with a wrong target flag, or unseen speakers in the class set
    good = make_protocol("open", train, dev, test, seed=0)
    pool = train + dev + test
    sp = good.splits[TEST_VERIFY]
    flipped = [dataclasses.replace(sp.trials[0], target=not sp.trials[0].target)] + sp.trials[1:]
    bad = dataclasses.replace(
        good, splits={**good.splits, TEST_VERIFY: dataclasses.replace(sp, trials=flipped)}
    )
    with pytest.raises(ValueError, match="wrong target flag"):
        verify_protocol(bad, pool)
    with pytest.raises(ValueError, match="speakers that are training classes"):
        verify_protocol(dataclasses.replace(good, classes=good.classes + [sp.speakers[0]]), pool)


# ------------------------------------------------------------------------------------- trial files


def test_trial_file_format():
    trials = [Trial(True, "1-2-0001", "1-3-0004"), Trial(False, "1-2-0001", "7-8-0000")]
    text = format_trials(trials)
    assert text == "1 1-2-0001 1-3-0004\n0 1-2-0001 7-8-0000\n"
    read = parse_trials(text, "t.txt")
    assert read.target.tolist() == [True, False] and read.enroll == ("1-2-0001",) * 2
    assert read.test == ("1-3-0004", "7-8-0000")


def test_trial_flags_are_checked_against_the_speakers_when_read(open_shards, tmp_path):
    """A trial marked target whose two sides are different speakers (or non-target for one speaker)
    is a TrialListError naming the file and line, when evaluation reads the list; the trial file and
    manifest are edited coherently (sha256, dataset_id and digest recomputed), so only the labels tell."""
    import hashlib
    import json
    import shutil

    from spkr.run.evaluation import load_trials
    from spkr.shards.checks import with_digest
    from spkr.shards.format import Manifest, dataset_extras, dataset_id
    from spkr.shards.trials import TrialListError

    out = tmp_path / "shards"
    shutil.copytree(open_shards, out)
    m = Manifest.load(str(out))
    assert len(load_trials(m, "test-verify")) > 0  # as written: every flag right
    path = out / "trials" / "test-verify.txt"
    lines = path.read_text().splitlines(keepends=True)
    n = next(i for i, line in enumerate(lines) if line.startswith("1 "))
    lines[n] = "0" + lines[n][1:]
    path.write_text("".join(lines))
    data = json.loads((out / "manifest.json").read_text())
    entry = data["protocol"]["splits"]["test-verify"]["trials"]
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    keys = {s: [k for info in m.split(s).shards for k in info.keys] for s in m.split_names}
    extras = dataset_extras(data["protocol"], data.get("augment"))
    data["dataset_id"] = dataset_id(m.data["feature_fingerprint"], m.feature_backend, m.labels, keys, extras)
    (out / "manifest.json").write_text(json.dumps(with_digest(data), indent=1))
    _, a, b = lines[n].split()
    with pytest.raises(TrialListError) as e:
        load_trials(Manifest.load(str(out)), "test-verify")
    assert str(e.value).startswith(f"{path}:{n + 1}: a non-target trial, but {a} and {b} are both speaker ")

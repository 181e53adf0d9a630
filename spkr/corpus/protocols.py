"""Evaluation protocols: which utterance goes to which split, with which label, and the trial lists.

Three protocols, each a pure, seeded, deterministic function of the utterance lists (independent of
their order) that returns a :class:`Protocol` -- everything the shard tool writes and the manifest
records (see docs/protocols.md):

* ``closed`` -- the closed-set re-split of :func:`spkr.corpus.labels.build_splits`: splits
  ``train``/``valid``/``test``, classes = train ∪ dev ∪ test speakers.
* ``closed-session`` -- the same class set, but every valid/test utterance comes from a chapter (a
  LibriSpeech recording session) that has no training utterance: whole chapters are held out per
  speaker with >= 2 chapters, aiming at the ``closed`` sizes (``len(dev)``, ``len(test)``). Speakers
  with a single chapter cannot be held out: they are **train-only** (so every valid/test utterance is
  from an unseen session) and are counted and named in ``Protocol.stats``.
* ``open`` -- LibriSpeech's speaker-disjoint split: training speakers only in ``train`` and ``valid`` (a
  small utterance-level re-split for loss/accuracy monitoring; classes = training speakers only);
  dev-clean speakers in the verification split ``valid-verify``, test-clean speakers in ``test-verify``.
  Each unseen speaker's utterances are divided into enrollment and test utterances, and trials
  ``<1|0> <enroll_key> <test_key>`` pair them (per speaker: as many target as non-target trials, up to
  ``trials_per_speaker`` in all, target trials across chapters first).

Labels: a classification split's label is the class id (index into ``Protocol.classes``); a
verification split's label is the index into that split's own ``speakers`` -- unseen speakers never
enter the class set. Every builder checks its result (:func:`verify_protocol`) before returning it and
raises ``ValueError`` naming what is wrong with the input (duplicate keys, shared speakers, ...).
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from spkr.shards.schema import (
    CLASSIFICATION,
    CLOSED,
    CLOSED_SESSION,
    OPEN,
    PROTOCOLS,
    VERIFICATION,
    trials_path,
)
from spkr.shards.trials import Trial, format_trials

from .labels import _apportion, build_splits, check_unique_keys, resplit, sort_by_speaker, sort_speakers
from .librispeech import Utterance, numeric_sort_key

TRAIN, VALID, TEST = "train", "valid", "test"
VALID_VERIFY, TEST_VERIFY = "valid-verify", "test-verify"

DEFAULT_ENROLL_PER_SPEAKER = 3
DEFAULT_TRIALS_PER_SPEAKER = 200
DEFAULT_VALID_FRACTION = 0.05


@dataclass(frozen=True)
class ProtocolSplit:
    """One split: its utterances (sorted by speaker, key) and their label space."""

    name: str
    kind: str  # CLASSIFICATION | VERIFICATION
    role: str  # TRAIN | VALID | TEST: when train/evaluate use it
    utterances: list[Utterance]
    speakers: list[str]  # label space: the class set (classification) or this split's speakers
    enroll_keys: list[str] = field(default_factory=list)  # verification: the enrollment utterances
    trials: list[Trial] = field(default_factory=list)  # verification: sorted by (enroll, test) key
    stats: dict = field(default_factory=dict)

    def labels(self) -> list[int]:
        """Per utterance (same order as ``utterances``): the index of its speaker in ``speakers``."""
        index = {s: i for i, s in enumerate(self.speakers)}
        return [index[u.speaker] for u in self.utterances]

    def trials_text(self) -> str:
        """The trial file's content (``format_trials``); empty for classification splits."""
        return format_trials(self.trials)


@dataclass(frozen=True)
class Protocol:
    name: str
    seed: int
    classes: list[str]  # the training class set (class id = index); manifest ``labels``
    splits: dict[str, ProtocolSplit]  # in writing order
    params: dict = field(default_factory=dict)  # the protocol's options (trials_per_speaker, ...)
    stats: dict = field(default_factory=dict)  # closed-session: the held-out-chapter statistics

    def split_utterances(self) -> dict[str, list[Utterance]]:
        """``{split: utterances}`` as the shard planner takes them."""
        return {name: list(sp.utterances) for name, sp in self.splits.items()}

    def label_spaces(self) -> dict[str, list[str]]:
        """``{split: speakers}``: a sample's label is the index of its speaker in its split's list."""
        return {name: list(sp.speakers) for name, sp in self.splits.items()}

    def trial_files(self) -> dict[str, str]:
        """``{"trials/<split>.txt": content}`` for every verification split."""
        return {trials_path(n): sp.trials_text() for n, sp in self.splits.items() if sp.kind == VERIFICATION}

    def manifest_entry(self) -> dict:
        """The JSON-ready ``protocol`` object of the manifest (docs/protocols.md)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "params": dict(self.params),
            "num_classes": len(self.classes),
            "splits": {name: _split_entry(sp) for name, sp in self.splits.items()},
            "stats": self.stats,
        }


def _split_entry(sp: ProtocolSplit) -> dict:
    entry = {
        "kind": sp.kind,
        "role": sp.role,
        "subsets": sorted({u.subset for u in sp.utterances}),
        "num_utterances": len(sp.utterances),
        "num_speakers": len({u.speaker for u in sp.utterances}),
    }
    if sp.kind == VERIFICATION:
        text = sp.trials_text()
        entry.update(
            speakers=list(sp.speakers),
            enroll_keys=list(sp.enroll_keys),
            trials={
                "path": trials_path(sp.name),
                "sha256": hashlib.sha256(text.encode()).hexdigest(),
                "count": len(sp.trials),
                "target": sum(t.target for t in sp.trials),
                "nontarget": sum(not t.target for t in sp.trials),
            },
            stats=sp.stats,
        )
    return entry


# ------------------------------------------------------------------------------------------ entry


def make_protocol(
    name: str,
    train_utts: Sequence[Utterance],
    dev_utts: Sequence[Utterance],
    test_utts: Sequence[Utterance],
    seed: int = 0,
    *,
    trials_per_speaker: int = DEFAULT_TRIALS_PER_SPEAKER,
    enroll_per_speaker: int = DEFAULT_ENROLL_PER_SPEAKER,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
) -> Protocol:
    """Build protocol ``name`` (one of :data:`PROTOCOLS`) from a training combination's utterances
    (train subsets, dev-clean, test-clean). The keyword options only concern ``open``."""
    if name == CLOSED:
        return closed_protocol(train_utts, dev_utts, test_utts, seed)
    if name == CLOSED_SESSION:
        return closed_session_protocol(train_utts, dev_utts, test_utts, seed)
    if name == OPEN:
        return open_protocol(
            train_utts,
            dev_utts,
            test_utts,
            seed,
            trials_per_speaker=trials_per_speaker,
            enroll_per_speaker=enroll_per_speaker,
            valid_fraction=valid_fraction,
        )
    raise ValueError(f"unknown protocol {name!r} (one of: {', '.join(PROTOCOLS)})")


def _classification(classes: list[str], train, valid, test) -> dict[str, ProtocolSplit]:
    return {
        name: ProtocolSplit(name, CLASSIFICATION, name, utts, list(classes))
        for name, utts in ((TRAIN, train), (VALID, valid), (TEST, test))
    }


def closed_protocol(train_utts, dev_utts, test_utts, seed: int = 0) -> Protocol:
    """``closed``: :func:`build_splits` as it is (same splits, same order, same class set)."""
    s = build_splits(train_utts, dev_utts, test_utts, seed=seed)
    protocol = Protocol(CLOSED, seed, list(s.speakers), _classification(s.speakers, s.train, s.valid, s.test))
    verify_protocol(protocol, list(train_utts) + list(dev_utts) + list(test_utts))
    return protocol


# --------------------------------------------------------------------------------- closed-session


def closed_session_protocol(train_utts, dev_utts, test_utts, seed: int = 0) -> Protocol:
    """``closed-session``: the ``closed`` class set, valid/test made of whole held-out chapters.

    * Held-out sizes aim at ``len(dev_utts)`` and ``len(test_utts)`` (the ``closed`` sizes). Each speaker
      with >= 2 chapters (in a seeded order) is asked for a share proportional to its utterance count;
      it gives the chapter that brings the running total closest to the running target, again while
      that gets closer (error diffusion: the total lands within about a chapter of the request; ties
      go by a seeded chapter order), and always keeps at least one chapter for training. Held-out chapters then go whole to valid or test, whichever is further below
      its target. A corpus whose chapters are large compared with the request gets sizes that differ
      from ``closed``'s: ``stats`` has the requested and the actual sizes.
    * Speakers with one chapter are train-only (``stats["single_chapter"]``: count and ids).
    * ``ValueError`` when valid or test is requested but ends up empty (too few speakers with >= 2
      chapters), or for duplicate keys.
    """
    pool = list(train_utts) + list(dev_utts) + list(test_utts)
    check_unique_keys(pool)
    n_valid, n_test = len(dev_utts), len(test_utts)
    classes = sort_speakers(u.speaker for u in pool)
    chapters = _chapters_by_speaker(pool)
    single = [s for s in classes if len(chapters[s]) == 1]
    rng = random.Random(f"{seed}:{CLOSED_SESSION}")
    held = _hold_out_chapters(chapters, n_valid + n_test, rng)
    in_valid = _assign_valid(held, n_valid, n_test, rng)

    train: list[Utterance] = []
    valid: list[Utterance] = []
    test: list[Utterance] = []
    held_set = {(s, c) for s, c, _ in held}
    for s in classes:
        for c, utts in chapters[s].items():
            dest = train if (s, c) not in held_set else valid if (s, c) in in_valid else test
            dest.extend(utts)
    for name, lst, n in ((VALID, valid, n_valid), (TEST, test, n_test)):
        if n and not lst:
            holdable = len(classes) - len(single)
            raise ValueError(
                f"closed-session: no chapter could be held out for {name} ({n} utterances requested): only "
                f"{holdable} of {len(classes)} speakers have >= 2 chapters ({len(held)} chapters held out)"
            )
    stats = {
        "requested": {VALID: n_valid, TEST: n_test},
        "held_out": {VALID: len(valid), TEST: len(test)},
        "chapters": {
            TRAIN: sum(len(c) for c in chapters.values()) - len(held),
            VALID: len(in_valid),
            TEST: len(held) - len(in_valid),
        },
        "speakers_with_held_out_chapters": len({s for s, _, _ in held}),
        "single_chapter": {"count": len(single), "speakers": single, "treatment": "train-only"},
    }
    splits = _classification(classes, *(sort_by_speaker(x) for x in (train, valid, test)))
    protocol = Protocol(CLOSED_SESSION, seed, classes, splits, stats=stats)
    verify_protocol(protocol, pool)
    return protocol


def _chapters_by_speaker(utts: Iterable[Utterance]) -> dict[str, dict[str, list[Utterance]]]:
    """speaker -> chapter -> utterances, chapters and utterances sorted numerically."""
    grouped: dict[str, dict[str, list[Utterance]]] = defaultdict(lambda: defaultdict(list))
    for u in utts:
        grouped[u.speaker][u.chapter].append(u)
    out = {}
    for s, chs in grouped.items():
        out[s] = {
            c: sorted(chs[c], key=lambda u: numeric_sort_key(u.key))
            for c in sorted(chs, key=numeric_sort_key)
        }
    return out


def _hold_out_chapters(chapters: dict, n_hold: int, rng: random.Random) -> list[tuple[str, str, int]]:
    """``[(speaker, chapter, n_utterances)]`` to hold out: see :func:`closed_session_protocol`."""
    holdable = [s for s in sort_speakers(chapters) if len(chapters[s]) >= 2]
    rng.shuffle(holdable)
    total = sum(len(u) for s in holdable for u in chapters[s].values())
    target = done = 0.0
    held: list[tuple[str, str, int]] = []
    for s in holdable:
        target += n_hold * sum(len(u) for u in chapters[s].values()) / total
        left = list(chapters[s])
        rng.shuffle(left)  # the seeded order breaks ties between chapters of equal size
        while len(left) > 1:  # the speaker keeps at least one chapter for training
            best = min(left, key=lambda c: abs(done + len(chapters[s][c]) - target))
            size = len(chapters[s][best])
            if abs(done + size - target) >= abs(done - target):
                break
            held.append((s, best, size))
            done += size
            left.remove(best)
    return held


def _assign_valid(held: list[tuple[str, str, int]], n_valid: int, n_test: int, rng) -> set[tuple[str, str]]:
    """The held-out chapters that go to valid (the rest go to test): chapters in a seeded order, each
    to the split further below its share of the held-out total (valid : test = n_valid : n_test)."""
    n_held = sum(size for _, _, size in held)
    want_valid = n_held * n_valid / (n_valid + n_test) if n_valid + n_test else 0.0
    order = list(held)
    rng.shuffle(order)
    in_valid: set[tuple[str, str]] = set()
    got_valid = got_test = 0
    for s, c, size in order:
        if want_valid - got_valid > (n_held - want_valid) - got_test:
            in_valid.add((s, c))
            got_valid += size
        else:
            got_test += size
    return in_valid


# ------------------------------------------------------------------------------------------ open


def open_protocol(
    train_utts,
    dev_utts,
    test_utts,
    seed: int = 0,
    *,
    trials_per_speaker: int = DEFAULT_TRIALS_PER_SPEAKER,
    enroll_per_speaker: int = DEFAULT_ENROLL_PER_SPEAKER,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
) -> Protocol:
    """``open``: training speakers for training, dev/test speakers only for verification.

    * ``train``/``valid``: the training subsets' utterances, ``round(valid_fraction * n)`` of them
      re-split into ``valid`` as :func:`build_splits` does (classes = training speakers only);
    * ``valid-verify`` (dev speakers) and ``test-verify`` (test speakers): all their utterances, an
      enrollment/test division and a trial list per split (:func:`verification_split`).
    * ``ValueError`` when a speaker is in more than one of train/dev/test, a verification set is empty
      or has fewer than 2 speakers, keys repeat, or an option is out of range.
    """
    pool = list(train_utts) + list(dev_utts) + list(test_utts)
    check_unique_keys(pool)
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if trials_per_speaker < 2:
        raise ValueError(
            f"trials_per_speaker must be >= 2 (one target, one non-target), got {trials_per_speaker}"
        )
    if enroll_per_speaker < 1:
        raise ValueError(f"enroll_per_speaker must be >= 1, got {enroll_per_speaker}")
    check_speaker_disjoint({"train": train_utts, "dev": dev_utts, "test": test_utts})
    classes = sort_speakers(u.speaker for u in train_utts)
    n_valid = round(valid_fraction * len(train_utts))
    train, valid, _ = resplit(list(train_utts), n_valid, 0, seed, None)
    splits = {
        TRAIN: ProtocolSplit(TRAIN, CLASSIFICATION, TRAIN, train, list(classes)),
        VALID: ProtocolSplit(VALID, CLASSIFICATION, VALID, valid, list(classes)),
    }
    for name, role, utts in ((VALID_VERIFY, VALID, dev_utts), (TEST_VERIFY, TEST, test_utts)):
        splits[name] = verification_split(name, role, utts, seed, enroll_per_speaker, trials_per_speaker)
    params = {
        "valid_fraction": valid_fraction,
        "enroll_per_speaker": enroll_per_speaker,
        "trials_per_speaker": trials_per_speaker,
    }
    protocol = Protocol(OPEN, seed, classes, splits, params=params)
    verify_protocol(protocol, pool)
    return protocol


def check_speaker_disjoint(parts: dict[str, Sequence[Utterance]]) -> None:
    """Raise ``ValueError`` naming the speakers (and their subsets) found in more than one part."""
    where: dict[str, set[str]] = defaultdict(set)
    subsets: dict[tuple[str, str], set[str]] = defaultdict(set)
    for part, utts in parts.items():
        for u in utts:
            where[u.speaker].add(part)
            subsets[(u.speaker, part)].add(u.subset)
    shared = [s for s in sort_speakers(where) if len(where[s]) > 1]
    if shared:
        show = "; ".join(
            f"{s} in "
            + ", ".join(f"{p} ({'/'.join(sorted(subsets[(s, p)]))})" for p in parts if p in where[s])
            for s in shared[:5]
        )
        raise ValueError(
            f"open protocol needs speaker-disjoint train/dev/test, but {len(shared)} speaker(s) are shared: {show}"
        )


def verification_split(
    name: str,
    role: str,
    utts: Sequence[Utterance],
    seed: int,
    enroll_per_speaker: int = DEFAULT_ENROLL_PER_SPEAKER,
    trials_per_speaker: int = DEFAULT_TRIALS_PER_SPEAKER,
) -> ProtocolSplit:
    """A verification split of unseen speakers' utterances: enrollment division and trials.

    * Enrollment, per speaker (seeded by ``seed``, ``name`` and the speaker, so independent of the other
      speakers): with >= 2 chapters, ``enroll_per_speaker`` utterances of one seeded chapter (all of it
      if it has fewer); with 1 chapter, ``min(enroll_per_speaker, n - 1)`` utterances (a speaker with a
      single utterance has none: it only appears as a non-target test utterance). The rest are test
      utterances.
    * Trials, per enrolled speaker: ``n = min(trials_per_speaker // 2, its target pairs, its non-target
      pairs)`` target pairs (enrollment x own test utterances, other chapters first) and ``n`` non-target
      pairs (enrollment x other speakers' test utterances, spread evenly over those speakers), all
      distinct, seeded. ``stats`` counts what could not be met (single-chapter speakers, speakers below
      the quota or without enrollment).
    """
    if not utts:
        raise ValueError(f"{name}: no utterances for the verification split")
    check_unique_keys(utts, name)
    by_spk: dict[str, list[Utterance]] = defaultdict(list)
    for u in utts:
        by_spk[u.speaker].append(u)
    speakers = sort_speakers(by_spk)
    if len(speakers) < 2:
        raise ValueError(f"{name}: verification needs >= 2 speakers (non-target trials), got {speakers}")
    enroll: dict[str, list[Utterance]] = {}
    tests: dict[str, list[Utterance]] = {}
    for s in speakers:
        mine = sorted(by_spk[s], key=lambda u: numeric_sort_key(u.key))
        enroll[s] = _enrollment(mine, enroll_per_speaker, random.Random(f"{seed}:{name}:enroll:{s}"))
        chosen = {u.key for u in enroll[s]}
        tests[s] = [u for u in mine if u.key not in chosen]
    trials: list[Trial] = []
    for s in speakers:
        rng = random.Random(f"{seed}:{name}:trials:{s}")
        trials.extend(_speaker_trials(s, enroll, tests, trials_per_speaker, rng))
    trials.sort(key=lambda t: (numeric_sort_key(t.enroll), numeric_sort_key(t.test)))
    stats = _verification_stats(speakers, by_spk, enroll, tests, trials, trials_per_speaker)
    enroll_keys = sorted((u.key for s in speakers for u in enroll[s]), key=numeric_sort_key)
    all_utts = sort_by_speaker(list(utts))
    return ProtocolSplit(name, VERIFICATION, role, all_utts, speakers, enroll_keys, trials, stats)


def _enrollment(utts: list[Utterance], k: int, rng: random.Random) -> list[Utterance]:
    chapters = sort_speakers(u.chapter for u in utts)  # (numeric sort of chapter ids)
    if len(chapters) >= 2:
        chapter = rng.choice(chapters)
        pool = [u for u in utts if u.chapter == chapter]
        chosen = rng.sample(pool, min(k, len(pool)))
    else:
        chosen = rng.sample(utts, min(k, len(utts) - 1))
    return sorted(chosen, key=lambda u: numeric_sort_key(u.key))


def _speaker_trials(spk: str, enroll: dict, tests: dict, per_speaker: int, rng: random.Random) -> list[Trial]:
    """``spk``'s trials (``spk``'s enrollment utterances on the enroll side): see verification_split."""
    mine = enroll[spk]
    if not mine:
        return []
    cross = [(e, t) for e in mine for t in tests[spk] if e.chapter != t.chapter]
    same = [(e, t) for e in mine for t in tests[spk] if e.chapter == t.chapter]
    caps = {o: len(mine) * len(tests[o]) for o in sort_speakers(tests) if o != spk}
    n = min(per_speaker // 2, len(cross) + len(same), sum(caps.values()))
    pairs = rng.sample(cross, min(n, len(cross)))
    pairs += rng.sample(same, n - len(pairs))
    trials = [Trial(True, e.key, t.key) for e, t in pairs]
    quota = _apportion({o: 1.0 for o in caps}, caps, n, rng)  # even over the other speakers
    for o in caps:
        theirs = tests[o]
        for i in sorted(rng.sample(range(caps[o]), quota[o])):
            trials.append(Trial(False, mine[i // len(theirs)].key, theirs[i % len(theirs)].key))
    return trials


def _verification_stats(speakers, by_spk, enroll, tests, trials: list[Trial], per_speaker: int) -> dict:
    chapter_of = {u.key: u.chapter for s in speakers for u in by_spk[s]}
    targets = [t for t in trials if t.target]
    per_enroll_speaker: dict[str, int] = defaultdict(int)
    spk_of = {u.key: s for s in speakers for u in enroll[s]}
    for t in targets:
        per_enroll_speaker[spk_of[t.enroll]] += 1
    single = [s for s in speakers if len({u.chapter for u in by_spk[s]}) == 1]
    return {
        "enroll_utterances": sum(len(enroll[s]) for s in speakers),
        "test_utterances": sum(len(tests[s]) for s in speakers),
        "cross_chapter_target_trials": sum(chapter_of[t.enroll] != chapter_of[t.test] for t in targets),
        "single_chapter_speakers": {"count": len(single), "speakers": single},
        "speakers_without_enrollment": [s for s in speakers if not enroll[s]],
        "speakers_below_quota": [
            s for s in speakers if enroll[s] and per_enroll_speaker[s] < per_speaker // 2
        ],
    }


# ----------------------------------------------------------------------------------------- checks


def verify_protocol(protocol: Protocol, pool: Sequence[Utterance]) -> None:
    """Raise ``ValueError`` unless ``protocol`` is a consistent split of ``pool``: every utterance in
    exactly one split; classification labels are training classes with training utterances; no
    chapter shared by train and valid/test (``closed-session``); no speaker shared by the class set and
    a verification split, and trials that pair an enrollment key with a test key of that split, marked
    target iff same speaker, without repeats (``open``)."""
    problems: list[str] = []
    keys = [u.key for sp in protocol.splits.values() for u in sp.utterances]
    if len(keys) != len(set(keys)) or set(keys) != {u.key for u in pool}:
        problems.append("the splits are not a partition of the input utterances")
    train_spk = {u.speaker for u in protocol.splits[TRAIN].utterances}
    classes = set(protocol.classes)
    for sp in protocol.splits.values():
        spk = {u.speaker for u in sp.utterances}
        if sp.kind == CLASSIFICATION and not spk <= (train_spk & classes):
            problems.append(f"{sp.name}: speakers without training utterances or class")
        elif sp.kind == VERIFICATION:
            problems.extend(_verification_problems(sp, classes))
    if protocol.name == CLOSED_SESSION:
        train_ch = {(u.speaker, u.chapter) for u in protocol.splits[TRAIN].utterances}
        for name in (VALID, TEST):
            shared = {(u.speaker, u.chapter) for u in protocol.splits[name].utterances} & train_ch
            if shared:
                problems.append(f"{name} shares chapter(s) with train: {sorted(shared)[:5]}")
    if problems:
        raise ValueError(f"invalid {protocol.name} protocol: " + "; ".join(problems))


def _verification_problems(sp: ProtocolSplit, classes: set[str]) -> list[str]:
    problems = []
    speaker_of = {u.key: u.speaker for u in sp.utterances}
    if set(speaker_of.values()) & classes:
        problems.append(f"{sp.name}: speakers that are training classes")
    enroll = set(sp.enroll_keys)
    if not enroll <= set(speaker_of):
        problems.append(f"{sp.name}: enrollment keys outside the split")
    pairs = {(t.enroll, t.test) for t in sp.trials}
    if len(pairs) != len(sp.trials):
        problems.append(f"{sp.name}: a trial is listed twice")
    for t in sp.trials:
        if t.enroll not in enroll or t.test in enroll or t.test not in speaker_of:
            problems.append(f"{sp.name}: trial {t.line()!r} does not pair an enrollment and a test key")
            break
        if t.target != (speaker_of[t.enroll] == speaker_of[t.test]):
            problems.append(f"{sp.name}: trial {t.line()!r} has the wrong target flag")
            break
    return problems


__all__ = [
    "TEST_VERIFY",
    "VALID_VERIFY",
    "Protocol",
    "ProtocolSplit",
    "check_speaker_disjoint",
    "closed_protocol",
    "closed_session_protocol",
    "make_protocol",
    "open_protocol",
    "verification_split",
    "verify_protocol",
]

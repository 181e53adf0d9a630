"""Label handling of the original research scripts: class set, closed-set re-split, class weights.

* The class set of a training combination is ``train speakers | dev-clean speakers | test-clean speakers``
  (LibriSpeech: 331 / 1001 / 1246 / 1252 / 2418 classes for train-clean-100 / train-clean-360 /
  train-other-500 / train.460 / train.960). Class id = index in the numerically sorted speaker list.
* LibriSpeech's dev/test speakers never occur in train, so a closed-set classifier cannot be evaluated on
  the official dev/test lists. :func:`build_splits` pools train+dev+test and re-splits so that valid and
  test only contain speakers that also have training utterances, restoring the original split sizes.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .librispeech import Utterance, numeric_sort_key


@dataclass(frozen=True)
class Splits:
    train: list[Utterance]
    valid: list[Utterance]
    test: list[Utterance]
    speakers: list[str]  # class id -> speaker id

    @property
    def class_index(self) -> dict[str, int]:
        """speaker id -> class id."""
        return {s: i for i, s in enumerate(self.speakers)}


def sort_speakers(speakers: Iterable[str]) -> list[str]:
    """Unique speaker ids sorted by ``int`` when numeric, else lexicographically (after numeric ones)."""
    return sorted(set(speakers), key=numeric_sort_key)


def class_set(
    train_utts: Iterable[Utterance], dev_utts: Iterable[Utterance], test_utts: Iterable[Utterance]
) -> list[str]:
    """The classes of a training combination: train ∪ dev ∪ test speakers, sorted numerically."""
    speakers: set[str] = set()
    for utts in (train_utts, dev_utts, test_utts):
        speakers.update(u.speaker for u in utts)
    return sort_speakers(speakers)


def _apportion(weights: dict[str, float], caps: dict[str, int], total: int, rng: random.Random) -> dict:
    """Integer allocation of ``total`` proportional to ``weights`` with per-key upper bounds ``caps``
    (water-filling, then largest remainders; ties broken by ``rng``). Requires ``sum(caps) >= total``."""
    alloc: dict[str, float] = {}
    free = {k for k in weights if caps[k] > 0}
    remaining = float(total)
    while free:
        wsum = sum(weights[k] for k in free)
        lam = remaining / wsum if wsum > 0 else 0.0
        capped = {k for k in free if lam * weights[k] >= caps[k]}
        if not capped:
            for k in free:
                alloc[k] = lam * weights[k]
            break
        for k in capped:
            alloc[k] = float(caps[k])
            remaining -= caps[k]
        free -= capped
    out = {k: min(caps[k], int(math.floor(alloc.get(k, 0.0) + 1e-9))) for k in weights}
    short = total - sum(out.values())
    if short > 0:
        keys = sorted(weights, key=numeric_sort_key)
        tiebreak = {k: rng.random() for k in keys}
        order = sorted(
            (k for k in keys if out[k] < caps[k]),
            key=lambda k: (-(alloc.get(k, 0.0) - out[k]), tiebreak[k]),
        )
        if len(order) < short:
            raise ValueError("internal error: allocation exceeds capacity")
        for k in order[:short]:
            out[k] += 1
    return out


def check_unique_keys(utts: Iterable[Utterance], what: str = "train/dev/test") -> None:
    """Raise ``ValueError`` naming up to 5 utterance keys that occur more than once in ``utts``."""
    dup = [k for k, c in Counter(u.key for u in utts).items() if c > 1]
    if dup:
        raise ValueError(f"duplicate utterance keys across {what}: {sorted(dup)[:5]}")


def build_splits(
    train_utts: Sequence[Utterance],
    dev_utts: Sequence[Utterance],
    test_utts: Sequence[Utterance],
    seed: int = 0,
    min_train_per_speaker: int | None = None,
) -> Splits:
    """Pool train+dev+test and re-split into (train, valid, test) for closed-set speaker classification.

    * ``len(valid) == len(dev_utts)`` and ``len(test) == len(test_utts)`` (original sizes restored);
    * every valid/test speaker has training utterances; every speaker keeps at least
      ``min_train_per_speaker`` utterances in train (a speaker with no more utterances than that is
      train-only). ``None`` (default) means 2 when that is feasible, else 1;
    * held-out utterances are spread over speakers proportionally to each speaker's utterance count
      (capped by what the speaker can spare), then split between valid and test in the ratio of the
      requested sizes, per speaker -- so most of the official dev/test speakers' utterances move to train;
    * deterministic for a given ``seed`` (independent of input order); ``speakers`` is the class set.

    Raises ``ValueError`` when impossible (duplicate keys, or the speakers cannot spare enough utterances
    -- e.g. every speaker has a single utterance) and verifies the result before returning it.
    """
    pool = list(train_utts) + list(dev_utts) + list(test_utts)
    n_valid, n_test = len(dev_utts), len(test_utts)
    check_unique_keys(pool)
    speakers = class_set(train_utts, dev_utts, test_utts)
    train, valid, test = resplit(pool, n_valid, n_test, seed, min_train_per_speaker)
    splits = Splits(train=train, valid=valid, test=test, speakers=speakers)
    verify_splits(splits, pool, n_valid=n_valid, n_test=n_test)
    return splits


def resplit(
    pool: Sequence[Utterance], n_valid: int, n_test: int, seed: int, min_train_per_speaker: int | None
) -> tuple[list[Utterance], list[Utterance], list[Utterance]]:
    """The utterance-level re-split of :func:`build_splits` (see there) of an already pooled list:
    ``(train, valid, test)`` with exactly ``n_valid`` / ``n_test`` held-out utterances, each list
    sorted by (speaker, key). Keys must be unique (not checked here)."""
    by_spk: dict[str, list[Utterance]] = defaultdict(list)
    for u in pool:
        by_spk[u.speaker].append(u)
    for s in by_spk:
        by_spk[s].sort(key=lambda u: numeric_sort_key(u.key))
    counts = {s: len(v) for s, v in by_spk.items()}
    n_hold = n_valid + n_test

    def capacity(m: int) -> dict[str, int]:
        return {s: max(0, n - m) for s, n in counts.items()}

    if min_train_per_speaker is None:
        mins = [2, 1]
    else:
        if min_train_per_speaker < 1:
            raise ValueError(f"min_train_per_speaker must be >= 1, got {min_train_per_speaker}")
        mins = [min_train_per_speaker]
    caps = None
    for m in mins:
        if sum(capacity(m).values()) >= n_hold:
            caps = capacity(m)
            break
    if caps is None:
        m = mins[-1]
        raise ValueError(
            f"cannot re-split: valid+test need {n_hold} utterances ({n_valid}+{n_test}) but keeping "
            f">= {m} training utterance(s) per speaker leaves only {sum(capacity(m).values())} to hold "
            f"out ({len(counts)} speakers, {len(pool)} utterances)"
        )

    rng = random.Random(seed)
    hold = _apportion({s: float(n) for s, n in counts.items()}, caps, n_hold, rng)
    frac_valid = n_valid / n_hold if n_hold else 0.0
    n_valid_of = _apportion({s: hold[s] * frac_valid for s in counts}, dict(hold), n_valid, rng)

    train: list[Utterance] = []
    valid: list[Utterance] = []
    test: list[Utterance] = []
    for s in sorted(by_spk, key=numeric_sort_key):
        utts = list(by_spk[s])
        rng.shuffle(utts)
        k, v = hold[s], n_valid_of[s]
        valid.extend(utts[:v])
        test.extend(utts[v:k])
        train.extend(utts[k:])
    for lst in (train, valid, test):
        sort_by_speaker(lst)
    return train, valid, test


def sort_by_speaker(utts: list[Utterance]) -> list[Utterance]:
    """Sort ``utts`` in place by (speaker, key), numerically; returns it."""
    utts.sort(key=lambda u: (numeric_sort_key(u.speaker), numeric_sort_key(u.key)))
    return utts


def verify_splits(splits: Splits, pool: Sequence[Utterance], *, n_valid: int, n_test: int) -> None:
    """Raise ``ValueError`` unless ``splits`` is a valid closed-set re-split of ``pool``."""
    problems = []
    if len(splits.valid) != n_valid:
        problems.append(f"valid has {len(splits.valid)} utterances, expected {n_valid}")
    if len(splits.test) != n_test:
        problems.append(f"test has {len(splits.test)} utterances, expected {n_test}")
    keys = [u.key for lst in (splits.train, splits.valid, splits.test) for u in lst]
    if len(keys) != len(set(keys)):
        problems.append("an utterance is in more than one split")
    if set(keys) != {u.key for u in pool}:
        problems.append("the splits' union differs from the pooled utterances")
    train_spk = {u.speaker for u in splits.train}
    missing = sorted({u.speaker for u in splits.valid + splits.test} - train_spk, key=numeric_sort_key)
    if missing:
        problems.append(f"valid/test speakers without training utterances: {missing[:10]}")
    unknown = sorted({u.speaker for u in pool} - set(splits.speakers), key=numeric_sort_key)
    if unknown:
        problems.append(f"speakers missing from the class set: {unknown[:10]}")
    if problems:
        raise ValueError("invalid re-split: " + "; ".join(problems))


def class_weights(
    train_utts: Iterable[Utterance], speakers: Sequence[str], scheme: str = "inverse_frequency"
) -> list[float]:
    """Per-class loss weights (index = class id), as passed to ``CrossEntropyLoss(weight=...)``.

    The original scripts passed inverse-frequency weights to ``CrossEntropyLoss``; this is the scheme
    used here (manifest ``class_weight_scheme = "inverse_frequency_mean1"``):

    * ``"inverse_frequency"`` (default): ``w_c ∝ 1 / n_c`` normalised to mean 1 over the classes,
      i.e. ``w_c = (1/n_c) / mean_k(1/n_k)``. (This equals ``N_train / (C * n_c)`` exactly when all
      classes have the same count; in general ``N/(C n_c)`` has mean 1 *weighted by samples*.)
    * ``"balanced"``: ``w_c = N_train / (C * n_c)`` (scikit-learn's "balanced"; sum_c n_c w_c = N_train).
    * ``"none"``: all ones.

    Every class must have training utterances (guaranteed by :func:`build_splits`); otherwise, or when a
    training speaker is not in ``speakers``, ``ValueError`` is raised.
    """
    counts = Counter(u.speaker for u in train_utts)
    unknown = sorted(set(counts) - set(speakers), key=numeric_sort_key)
    if unknown:
        raise ValueError(f"training speakers not in the class set: {unknown[:10]}")
    n = [counts.get(s, 0) for s in speakers]
    empty = [s for s, c in zip(speakers, n) if c == 0]
    if empty:
        raise ValueError(
            f"{len(empty)} classes have no training utterances (e.g. {empty[:5]}); use build_splits()"
        )
    num_classes, total = len(speakers), sum(n)
    if scheme == "inverse_frequency":
        inv = [1.0 / c for c in n]
        mean = sum(inv) / num_classes
        return [x / mean for x in inv]
    if scheme == "balanced":
        return [total / (num_classes * c) for c in n]
    if scheme == "none":
        return [1.0] * num_classes
    raise ValueError(f"unknown class weight scheme {scheme!r} (inverse_frequency, balanced, none)")

"""The trial-list format, written and read here: :class:`Trial` (one trial, as a protocol makes it),
:class:`TrialList` (a list of trials as arrays, as scoring takes it), :func:`format_trials` /
:func:`write_trials` (the writer), :func:`parse_trials` / :func:`read_trials` /
:func:`make_trial_list` (the reader and its checks) and :func:`check_trial_keys` /
:func:`check_trial_labels` (a list against the keys and speakers it is scored on).

**Format** (text, UTF-8, VoxCeleb style), one trial per line::

    <1|0> <enroll_key> <test_key>

``1`` = target (same speaker), ``0`` = non-target; the keys are sample keys (the shards' ``__key__``,
e.g. ``1272-128104-0000``) or any other names the embeddings are looked up by; fields are separated
by whitespace, so keys contain none. Lines that are empty or start with ``#`` are comments. A key
never meets itself and a pair occurs once (in either order). :func:`read_trials` / :func:`parse_trials`
reject anything else naming the file and line. A shard set's verification splits keep theirs at
:func:`spkr.shards.schema.trials_path`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spkr import atomic
from spkr.errors import SpkrError


class TrialListError(SpkrError, ValueError):
    """A trial list that does not follow the format (names the file and line)."""


@dataclass(frozen=True)
class Trial:
    """One verification trial: is ``test`` spoken by the speaker of ``enroll``?"""

    target: bool
    enroll: str  # utterance key (an enrollment utterance)
    test: str  # utterance key (a test utterance)

    def line(self) -> str:
        """The trial's line in a trial list (without its newline)."""
        return _line(self.target, self.enroll, self.test)


@dataclass(frozen=True)
class TrialList:
    """Trials ``(target[n], enroll[n], test[n])``: target flags (bool) and the two sides' keys."""

    target: np.ndarray
    enroll: tuple[str, ...]
    test: tuple[str, ...]
    source: str = "trial list"  # the file it was read from, for error messages
    lines: tuple[int, ...] = ()  # each trial's line in that file (empty: made in memory)

    def __len__(self) -> int:
        return len(self.target)

    def keys(self) -> list[str]:
        """Every key the trials use, sorted."""
        return sorted(set(self.enroll) | set(self.test))


def make_trial_list(target, enroll, test, source: str = "trial list") -> TrialList:
    """A checked TrialList: at least one trial, flags 0/1 (or bools), keys non-empty without
    whitespace, no key paired with itself, no pair twice (in either order). Errors name ``source`` and the trial (0-based)."""
    target = np.asarray(target)
    enroll, test = tuple(enroll), tuple(test)
    if not (len(target) == len(enroll) == len(test)):
        raise TrialListError(
            f"{source}: {len(target)} flags, {len(enroll)} enroll keys, {len(test)} test keys"
        )
    if target.ndim != 1 or not np.isin(target, (0, 1)).all():
        raise TrialListError(f"{source}: target flags must be a 1-D array of 0/1 or booleans")
    if len(target) == 0:
        raise TrialListError(f"{source}: no trials")
    seen: dict[tuple[str, str], str] = {}
    for n, (a, b) in enumerate(zip(enroll, test)):
        problem = _trial_problem(a, b, seen, f"trial {n}")
        if problem:
            raise TrialListError(f"{source}: trial {n}: {problem}")
    return TrialList(target.astype(bool), enroll, test, source)


def _trial_problem(a, b, seen: dict, where: str) -> str | None:
    """What is wrong with the trial (a, b) at ``where`` given the pairs ``seen`` so far (which it
    joins, mapped to ``where``)."""
    for key in (a, b):
        if not isinstance(key, str) or key.split() != [key]:
            return f"key {key!r} is not a non-empty string without whitespace"
    if a == b:
        return f"key {a} is paired with itself"
    pair = (a, b) if a < b else (b, a)
    if pair in seen:
        return f"pair {a} {b} repeats {seen[pair]}"
    seen[pair] = where
    return None


def parse_trials(text: str | bytes, source: str = "trial list") -> TrialList:
    """A TrialList from the text of a trial list (format in the module docstring); errors name
    ``source`` (the file or URL) and the 1-based line."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TrialListError(f"{source}: not UTF-8 text ({e})") from None
    flags: list[bool] = []
    enroll: list[str] = []
    test: list[str] = []
    lines: list[int] = []
    seen: dict[tuple[str, str], str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 3:
            raise TrialListError(
                f"{source}:{lineno}: expected '<1|0> <enroll_key> <test_key>', got {len(fields)} "
                f"field(s): {line.strip()[:120]!r}"
            )
        if fields[0] not in ("0", "1"):
            raise TrialListError(f"{source}:{lineno}: target flag {fields[0]!r} is not 1 or 0")
        problem = _trial_problem(fields[1], fields[2], seen, f"line {lineno}")
        if problem:
            raise TrialListError(f"{source}:{lineno}: {problem}")
        flags.append(fields[0] == "1")
        enroll.append(fields[1])
        test.append(fields[2])
        lines.append(lineno)
    if not flags:
        raise TrialListError(f"{source}: no trials (every line is empty or a comment)")
    return TrialList(np.array(flags, dtype=bool), tuple(enroll), tuple(test), source, tuple(lines))


def format_trials(trials: TrialList | Iterable[Trial], header: str | None = None) -> str:
    """The text of a trial list: one ``<1|0> <enroll_key> <test_key>`` line per trial (``\\n``-terminated),
    the format :func:`parse_trials` reads; ``header`` (may span lines) is written first as ``#``
    comments."""
    head = "".join(f"# {line}\n" for line in header.splitlines()) if header else ""
    if isinstance(trials, TrialList):
        rows = zip(trials.target, trials.enroll, trials.test)
    else:
        rows = ((t.target, t.enroll, t.test) for t in trials)
    return head + "".join(_line(t, a, b) + "\n" for t, a, b in rows)


def _line(target, enroll: str, test: str) -> str:
    return f"{int(target)} {enroll} {test}"


def read_trials(path: str | os.PathLike, known_keys=None) -> TrialList:
    """Read a local trial list; with ``known_keys`` (the keys there are embeddings for), a key that
    is not one of them is an error naming it and its line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TrialListError(f"{path}: cannot read trial list ({e.strerror or e})") from None
    trials = parse_trials(data, str(path))
    if known_keys is not None:
        check_trial_keys(trials, known_keys)
    return trials


def check_trial_keys(trials: TrialList, known_keys) -> None:
    """TrialListError naming the first trial (its file and line when read from one) whose key is not
    in ``known_keys`` (a set or mapping), and how many of the list's keys are unknown."""
    known = known_keys if isinstance(known_keys, (AbstractSet, Mapping)) else set(known_keys)
    keys = trials.keys()
    unknown = [k for k in keys if k not in known]
    if not unknown:
        return
    n = next(
        n for n, (a, b) in enumerate(zip(trials.enroll, trials.test)) if a not in known or b not in known
    )
    key = trials.enroll[n] if trials.enroll[n] not in known else trials.test[n]
    where = f"{trials.source}:{trials.lines[n]}" if trials.lines else f"{trials.source}: trial {n}"
    raise TrialListError(
        f"{where}: unknown key {key} ({len(unknown)} of the list's {len(keys)} keys have no "
        f"embedding, e.g. {', '.join(unknown[:3])})"
    )


def check_trial_labels(trials: TrialList, speaker_of: Mapping) -> None:
    """TrialListError naming the first trial (its file and line when read from one) whose target flag
    disagrees with its sides' speakers (``speaker_of``: key -> speaker label, every key of the list):
    a target trial pairs two utterances of one speaker, a non-target trial two speakers'."""
    same = np.fromiter(
        (speaker_of[a] == speaker_of[b] for a, b in zip(trials.enroll, trials.test)), bool, len(trials)
    )
    wrong = np.flatnonzero(same != trials.target)
    if not len(wrong):
        return
    n = int(wrong[0])
    a, b = trials.enroll[n], trials.test[n]
    where = f"{trials.source}:{trials.lines[n]}" if trials.lines else f"{trials.source}: trial {n}"
    sides = f"both speaker {speaker_of[a]}" if same[n] else f"speakers {speaker_of[a]} and {speaker_of[b]}"
    raise TrialListError(
        f"{where}: a {'target' if trials.target[n] else 'non-target'} trial, but {a} and {b} are {sides} "
        f"({len(wrong)} of {len(trials)} trials flagged against their speakers)"
    )


def write_trials(path: str | os.PathLike, trials: TrialList, header: str | None = None) -> None:
    """Write a trial list atomically (checked first: a list this module cannot read is never written)."""
    trials = make_trial_list(trials.target, trials.enroll, trials.test, str(path))
    atomic.write_bytes(path, format_trials(trials, header).encode("utf-8"))

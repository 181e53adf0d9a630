"""The shard plan: which samples go to which shard, in which order, with which labels; deterministic
(seeded) and free of I/O, so every rank of a run plans the same jobs and a re-run recognises the
shards it already wrote (:meth:`ShardJob.plan_hash`, stored in each shard's sidecar).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from spkr.augment import AugmentConfig, copy_key, copy_speaker
from spkr.corpus.librispeech import Utterance
from spkr.shards.schema import shard_name


@dataclass
class ShardJob:
    split: str
    index: int
    utterances: list[Utterance]
    labels: list[int]
    identity: dict = field(default_factory=dict)  # the run's identity (run_identity) [+ "augment"]
    copies: list[int | None] | None = None  # per utterance: augmented copy index, None = the original

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    def copy_indices(self) -> list[int | None]:
        return self.copies if self.copies is not None else [None] * len(self.utterances)

    def keys(self) -> list[str]:
        """The sample keys in order: the utterance key, or ``<key>~aug<k>`` for copy k."""
        return [
            u.key if k is None else copy_key(u.key, k) for u, k in zip(self.utterances, self.copy_indices())
        ]

    def plan_hash(self) -> str:
        """What this shard must hold: the run's identity, then its sample keys and labels in order."""
        h = hashlib.sha256()
        h.update(json.dumps(self.identity, sort_keys=True).encode() + b"\n")
        for key, lab in zip(self.keys(), self.labels):
            h.update(f"{key}\t{lab}\n".encode())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class PlannedSample:
    """One sample to write: an utterance, or augmented copy ``copy`` of it, and its class name."""

    utterance: Utterance
    copy: int | None
    speaker: str  # the label's name: the utterance's speaker, or its speed class


def with_copies(utts: Iterable[Utterance], augment: AugmentConfig | None) -> list[PlannedSample]:
    """The utterances and (when ``augment.copies``) their copies, sorted by (key, copy) with the
    original first; copies labelled by :func:`spkr.augment.copy_speaker`."""
    out = []
    for u in sorted(utts, key=lambda u: u.key):
        out.append(PlannedSample(u, None, u.speaker))
        for k in range(augment.copies if augment is not None else 0):
            out.append(PlannedSample(u, k, copy_speaker(u.speaker, u.key, k, augment)))
    return out


def plan_shards(
    splits: dict[str, list[Utterance]],
    speakers: list[str] | dict[str, list[str]],
    shard_size: int,
    seed: int = 0,
    identity: dict | None = None,
    *,
    augment: AugmentConfig | None = None,
    augment_split: str = "train",
    augment_identity: dict | None = None,
) -> list[ShardJob]:
    """Deterministic shard plan: each split's samples sorted by (key, copy), shuffled (seeded, so
    shards mix speakers and copies) and cut into ceil(n / shard_size) shards whose sizes differ by at
    most one. ``speakers``: the label space (a sample's label is its speaker's index), one list for
    every split or ``{split: list}``. ``identity`` (:func:`spkr.shards.writer.run_identity`) goes into every job's plan
    hash; with ``augment.copies`` > 0, ``augment_split`` also gets the copies and its jobs'
    identity ``augment_identity`` (:func:`spkr.augment.augment_identity`) under ``"augment"``."""
    identity = {**(identity or {}), "seed": int(seed)}
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    copying = augment is not None and augment.copies > 0
    jobs: list[ShardJob] = []
    for split, utts in splits.items():
        space = speakers[split] if isinstance(speakers, dict) else speakers
        label_of = {spk: i for i, spk in enumerate(space)}
        order = with_copies(utts, augment if copying and split == augment_split else None)
        random.Random(f"{seed}:{split}").shuffle(order)
        copies_here = copying and split == augment_split
        job_identity = {**identity, "augment": augment_identity} if copies_here else identity
        n_shards = max(1, math.ceil(len(order) / shard_size)) if order else 0
        for i in range(n_shards):
            part = order[i * len(order) // n_shards : (i + 1) * len(order) // n_shards]
            unknown = [s for s in part if s.speaker not in label_of]
            if unknown:
                u = unknown[0].utterance
                raise ValueError(
                    f"{u.path or u.key}: speaker {unknown[0].speaker} not in split {split}'s labels"
                )
            copies = [s.copy for s in part] if copies_here else None
            utterances = [s.utterance for s in part]
            jobs.append(
                ShardJob(split, i, utterances, [label_of[s.speaker] for s in part], job_identity, copies)
            )
    return jobs

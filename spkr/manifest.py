"""The manifest: the contract between the write side (shard_writer) and the read side (stream).

A shards directory (local or URL) holds ``manifest.json`` and, per split, tar shards::

    <out>/manifest.json
    <out>/<split>/shard-000000.tar        WebDataset tar: <key>.cls, <key>.json, <key>.mel.npy per sample
    <out>/<split>/shard-000000.tar.json   sidecar: that shard's manifest entry, written after the tar

A shard is complete iff its sidecar exists (it is written last); ``manifest.json`` is written only
when every planned shard is complete, so nothing half-written is ever listed. Everything the loader
and the charts need is here, so neither opens audio: per-sample keys, frame counts, labels and byte
offsets, per-shard bytes and sha256, the feature config, the label map, class weights and the
training split's per-mel-bin statistics.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from spkr import storage
from spkr.features import FeatureConfig

FORMAT = "spkr-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"
SIDECAR_SUFFIX = ".json"  # shard-000000.tar -> shard-000000.tar.json
SPLITS = ("train", "valid", "test")
# Tar members of one sample, in the order they are written. Nothing else is ever decoded.
MEMBER_EXTS = ("cls", "json", "mel.npy")


class ManifestError(ValueError):
    """A manifest that is missing, malformed, or inconsistent with its shards."""


class ManifestMismatch(ManifestError):
    """Shards that do not fit a model (other feature config or label map)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:06d}.tar"


@dataclass
class ShardInfo:
    name: str  # relative to the shards directory, e.g. "train/shard-000000.tar"
    num_samples: int
    bytes: int
    sha256: str
    keys: list[str]
    frames: list[int]
    labels: list[int]
    offsets: list[int]  # byte offset of each sample's first tar header

    @classmethod
    def from_dict(cls, d: dict, where: str) -> ShardInfo:
        try:
            info = cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except KeyError as e:
            raise ManifestError(f"{where}: shard entry lacks {e}") from None
        n = info.num_samples
        for name in ("keys", "frames", "labels", "offsets"):
            if len(getattr(info, name)) != n:
                raise ManifestError(
                    f"{where}: shard {info.name} lists {len(getattr(info, name))} {name} for {n} samples"
                )
        return info

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class SplitInfo:
    name: str
    shards: list[ShardInfo]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_frames(self) -> int:
        return sum(sum(s.frames) for s in self.shards)

    def frames_array(self) -> np.ndarray:
        return np.asarray([f for s in self.shards for f in s.frames], dtype=np.int64)

    def labels_array(self) -> np.ndarray:
        return np.asarray([lab for s in self.shards for lab in s.labels], dtype=np.int64)


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
    def from_dict(cls, d: dict) -> RunningStats:
        s = cls(d["n_mels"])
        s.count = d["count"]
        s.total = np.asarray(d["total"], np.float64)
        s.total_sq = np.asarray(d["total_sq"], np.float64)
        s.min = d["min"] if d["min"] is not None else math.inf
        s.max = d["max"] if d["max"] is not None else -math.inf
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


class Manifest:
    """A loaded manifest.json (``self.data`` is the raw dict) with typed accessors."""

    def __init__(self, data: dict, url: str = "<memory>"):
        self.data = data
        self.url = url
        self.validate()

    # ---------------------------------------------------------------- I/O
    @classmethod
    def load(cls, shards: str, storage_options: dict | None = None) -> Manifest:
        """Load ``<shards>/manifest.json``; ``shards`` is a directory or URL prefix."""
        url = storage.join(str(shards), MANIFEST_NAME)
        fs, path = storage.get_fs(url, storage_options)
        try:
            with fs.open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            hint = ""
            try:
                if fs.exists(path.rsplit("/", 1)[0]) and fs.glob(path.rsplit("/", 1)[0] + "/*/*.tar"):
                    hint = " (shards exist but no manifest: the shard run is incomplete; re-run it to finish)"
            except Exception:
                pass
            raise ManifestError(f"{url}: no manifest found{hint}") from None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{url}: manifest is not valid JSON: {e}") from None
        return cls(data, url=url)

    def to_json(self) -> str:
        return json.dumps(self.data, indent=1, sort_keys=False)

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        d, where = self.data, self.url
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a {FORMAT} manifest")
        if d.get("version") != VERSION:
            raise ManifestError(f"{where}: manifest version {d.get('version')} (this spkr reads {VERSION})")
        for key in ("feature_config", "labels", "splits", "class_weights"):
            if key not in d:
                raise ManifestError(f"{where}: manifest lacks '{key}'")
        FeatureConfig.from_dict(d["feature_config"])
        n_classes = len(d["labels"])
        if len(d["class_weights"]) != n_classes:
            raise ManifestError(f"{where}: {len(d['class_weights'])} class weights for {n_classes} labels")
        seen: set[str] = set()
        for split, sd in d["splits"].items():
            for s in sd.get("shards", []):
                info = ShardInfo.from_dict(s, f"{where} [{split}]")
                if info.labels and (min(info.labels) < 0 or max(info.labels) >= n_classes):
                    raise ManifestError(f"{where}: shard {info.name} has labels outside 0..{n_classes - 1}")
                dup = seen.intersection(info.keys)
                if dup:
                    raise ManifestError(f"{where}: sample key(s) listed twice, e.g. {sorted(dup)[:3]}")
                seen.update(info.keys)

    def check_compatible(self, feature_config: dict | None = None, labels: list[str] | None = None) -> None:
        """Raise ManifestMismatch when these shards were made differently from what a model expects."""
        if feature_config is not None and FeatureConfig.from_dict(feature_config) != self.feature_config:
            mine = self.feature_config.to_dict()
            diff = {k: (feature_config.get(k), mine.get(k)) for k in mine if feature_config.get(k) != mine[k]}
            raise ManifestMismatch(
                f"{self.url}: shards were made with a different feature config than the model expects "
                f"(key: (model, shards)) {diff}"
            )
        if labels is not None and list(labels) != self.labels:
            raise ManifestMismatch(
                f"{self.url}: label map differs from the model's ({len(labels)} vs {len(self.labels)} "
                "classes, or a different order)"
            )

    # ---------------------------------------------------------------- accessors
    @property
    def feature_config(self) -> FeatureConfig:
        return FeatureConfig.from_dict(self.data["feature_config"])

    @property
    def labels(self) -> list[str]:
        return list(self.data["labels"])

    @property
    def class_weights(self) -> list[float]:
        return list(self.data["class_weights"])

    @property
    def stats(self) -> dict:
        return self.data["stats"]

    @property
    def split_names(self) -> list[str]:
        return list(self.data["splits"])

    def split(self, name: str) -> SplitInfo:
        if name not in self.data["splits"]:
            raise ManifestError(f"{self.url}: no split '{name}' (have {self.split_names})")
        shards = [ShardInfo.from_dict(s, self.url) for s in self.data["splits"][name]["shards"]]
        return SplitInfo(name=name, shards=shards)


def split_summary(shards: list[ShardInfo], sample_rate: int, hop_length: int) -> dict:
    frames = sum(sum(s.frames) for s in shards)
    return {
        "num_samples": sum(s.num_samples for s in shards),
        "num_frames": frames,
        "hours": frames * hop_length / sample_rate / 3600.0,
        "shards": [s.to_dict() for s in shards],
    }

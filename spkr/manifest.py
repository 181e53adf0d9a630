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

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import xxhash

from spkr import storage
from spkr.features import FeatureConfig

FORMAT = "spkr-shards"
VERSION = 2  # 2: dataset_id + per-sample checksums
SAMPLE_CHECKSUM = "xxh3_64"  # the per-sample checksum's algorithm, as named in the manifest
MANIFEST_NAME = "manifest.json"
SIDECAR_SUFFIX = ".json"  # shard-000000.tar -> shard-000000.tar.json
SPLITS = ("train", "valid", "test")
# Tar members of one sample, in the order they are written. Nothing else is ever decoded.
MEMBER_EXTS = ("cls", "json", "mel.npy")


class ManifestError(ValueError):
    """A manifest that is missing, malformed, or inconsistent with its shards."""


class ManifestMismatch(ManifestError):
    """Shards that do not fit a model (other feature config or label map)."""


class DatasetMismatch(ManifestMismatch):
    """Shards that are not the dataset a checkpoint or loader state was made from."""


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:06d}.tar"


def sample_checksum(span) -> int:
    """xxh3-64 of one sample's tar bytes (any bytes-like object; ~7 GB/s here)."""
    return xxhash.xxh3_64_intdigest(span)


def dataset_id(feature_fingerprint: str, feature_backend: str, labels: list[str], split_keys: dict) -> str:
    """The identity of a shard set: what its features are and which utterance is in which split, in
    which order. ``split_keys``: {split: ordered keys}. Two shard sets with the same id hold the same
    samples computed the same way; another seed, source split, feature config or label map differs."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}\n{feature_fingerprint}\n{feature_backend}\n".encode())
    h.update(json.dumps(list(labels)).encode())
    for split in sorted(split_keys):
        h.update(f"\n[{split}]\n".encode())
        h.update("\n".join(split_keys[split]).encode())
    return h.hexdigest()[:16]


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
    checksums: list[int]  # sample_checksum of each sample's byte span (see the module docstring)

    @classmethod
    def from_dict(cls, d: dict, where: str, split: str | None = None) -> ShardInfo:
        """A shard entry (of a manifest or a sidecar) with every field type- and range-checked, else
        ManifestError naming ``where`` and the shard: a safe name inside ``split``'s folder (a sidecar's
        own ``split`` when not given, see :func:`shard_name_problem`), int counts, per-sample lists of
        length ``num_samples`` (keys: strings without '.', '/'; frames, labels: ints >= 0; offsets:
        increasing, on tar blocks, inside ``bytes``; checksums: 0 <= c < 2**64)."""
        return _shard_from_dict(cls, d, where, split)

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
        _string_keys(d, "stats", where)
        missing = [k for k in ("n_mels", "count", "total", "total_sq", "min", "max") if k not in d]
        if missing:
            raise ManifestError(f"{at} lacks {missing}")
        n_mels = _count(d["n_mels"], "n_mels", at, lo=1, hi=2**31)
        total = _floats(d["total"], "total", at, n_mels)
        total_sq = _floats(d["total_sq"], "total_sq", at, n_mels, lo=0.0)
        s = cls(n_mels)
        s.count = _count(d["count"], "count", at)
        s.total, s.total_sq = total, total_sq
        for k in ("min", "max"):
            if d[k] is None and s.count:
                raise ManifestError(f"{at}: {k} is null for {s.count} frames")
        s.min = _number(d["min"], "min", at) if d["min"] is not None else math.inf
        s.max = _number(d["max"], "max", at) if d["max"] is not None else -math.inf
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
    def load(
        cls, shards: str, storage_options: dict | None = None, retry: storage.RetryPolicy | None = None
    ) -> Manifest:
        """Load ``<shards>/manifest.json``; ``shards`` is a directory or URL prefix. A remote manifest
        is read under ``retry`` (default ``storage.RetryPolicy()``; the same retries as the shards:
        resumed at the byte reached); a read that keeps failing is a ManifestError naming the URL."""
        url = storage.join(str(shards), MANIFEST_NAME)
        try:
            raw = storage.read_bytes(url, storage_options, retry)
        except storage.ReadFailed as e:
            raise ManifestError(f"cannot read the manifest: {e}") from e
        except FileNotFoundError:
            fs, path = storage.get_fs(url, storage_options)
            hint = ""
            try:
                if fs.exists(path.rsplit("/", 1)[0]) and fs.glob(path.rsplit("/", 1)[0] + "/*/*.tar"):
                    hint = " (shards exist but no manifest: the shard run is incomplete; re-run it to finish)"
            except Exception:
                pass
            raise ManifestError(f"{url}: no manifest found{hint}") from None
        try:
            data = json.loads(raw)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of > 4300 digits
            raise ManifestError(f"{url}: manifest is not valid JSON: {e}") from None
        except RecursionError:
            raise ManifestError(f"{url}: manifest JSON is nested too deeply") from None
        return cls(data, url=url)

    def to_json(self) -> str:
        return json.dumps(self.data, indent=1, sort_keys=False)

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Check everything the code reads from the manifest (types, shapes, ranges, shard names that
        stay inside the shards directory), else ManifestError naming the file and what is wrong."""
        d, where = self.data, self.url
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a {FORMAT} manifest")
        _string_keys(d, "manifest", where)
        version = d.get("version")
        if type(version) is not int or version != VERSION:
            old = type(version) is int and version < VERSION
            raise ManifestError(
                f"{where}: manifest version {_show(version)} (this spkr reads {VERSION})"
                + (f": the manifest predates this spkr version; {_REMAKE}" if old else "")
            )
        for key in ("feature_config", "labels", "splits", "class_weights"):
            if key not in d:
                raise ManifestError(f"{where}: manifest lacks '{key}'")
        cfg = _check_feature_config(d["feature_config"], where)
        labels = _strs(d["labels"], "labels", where)
        n_classes = len(labels)
        if len(set(labels)) != n_classes:
            raise ManifestError(f"{where}: labels lists a label twice")
        if type(d["class_weights"]) is list and len(d["class_weights"]) != n_classes:
            raise ManifestError(f"{where}: {len(d['class_weights'])} class weights for {n_classes} labels")
        _floats(d["class_weights"], "class_weights", where, n_classes, lo=0.0)
        if d.get("stats") is not None:
            _check_stats(d["stats"], where, cfg.n_mels)
        if "skipped" in d and type(d["skipped"]) is not list:
            raise ManifestError(f"{where}: skipped is a {type(d['skipped']).__name__}, not a list")
        _string_keys(d["splits"], "splits", where)
        seen: set[str] = set()
        n_keys = 0
        self._checked: dict[str, list[ShardInfo]] = {}  # split() hands out copies: validated once
        for split, sd in d["splits"].items():
            problem = split_name_problem(split)
            if problem:
                raise ManifestError(f"{where}: split name {_show(split)} {problem}")
            if not isinstance(sd, dict) or type(sd.get("shards")) is not list:
                raise ManifestError(f"{where}: split '{split}' is not an object with a 'shards' list")
            infos = self._checked[split] = []
            for s in sd["shards"]:
                info = _shard_from_dict(ShardInfo, s, f"{where} [{split}]", split, n_classes)
                infos.append(info)
                seen.update(info.keys)
                n_keys += info.num_samples
                if len(seen) != n_keys:
                    counts = Counter(k for lst in self._checked.values() for i in lst for k in i.keys)
                    dup = [k for k, c in counts.items() if c > 1]
                    raise ManifestError(
                        f"{where}: sample key(s) listed twice, e.g. {sorted(dup)[:3]} (again in {info.name})"
                    )
        self._check_identity()

    def _check_identity(self) -> None:
        """The stored dataset_id must be the one its own contents give (a hand-edited or mixed-up
        manifest is refused), and the checksum algorithm one this spkr knows."""
        d, where = self.data, self.url
        for key in ("dataset_id", "feature_fingerprint", "feature_backend", "sample_checksum"):
            if not isinstance(d.get(key), str):
                raise ManifestError(
                    f"{where}: manifest lacks '{key}' (a string): made by an older spkr? re-run "
                    "python -m spkr.tools.shard into a new --out"
                )
        if d.get("sample_checksum") != SAMPLE_CHECKSUM:
            raise ManifestError(
                f"{where}: per-sample checksum {d.get('sample_checksum')!r} (this spkr checks {SAMPLE_CHECKSUM!r})"
            )
        expected = dataset_id(
            d["feature_fingerprint"],
            d["feature_backend"],
            d["labels"],
            {name: [k for s in sd["shards"] for k in s["keys"]] for name, sd in d["splits"].items()},
        )
        if d["dataset_id"] != expected:
            raise ManifestError(
                f"{where}: dataset_id {d['dataset_id']} does not match its contents ({expected}): the "
                "manifest was edited or assembled from another shard set; re-run python -m spkr.tools.shard"
            )

    def check_dataset(self, expected_id: str | None, what: str, *, allow_other: bool = False) -> bool:
        """Refuse (DatasetMismatch) shards that are not the dataset ``what`` (e.g. "checkpoint x.pt")
        was made from; with ``allow_other`` only return False (the caller warns). True when they are."""
        if expected_id is None or expected_id == self.dataset_id:
            return True
        msg = (
            f"{self.url}: dataset {self.dataset_id} is not the dataset of {what} ({expected_id}): other "
            "features, labels, split assignment (shard --seed, corpus) or order"
        )
        if allow_other:
            return False
        raise DatasetMismatch(msg)

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
    def dataset_id(self) -> str:
        return self.data["dataset_id"]

    @property
    def feature_backend(self) -> str:
        return self.data["feature_backend"]

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
        if self.data.get("stats") is None:
            raise ManifestError(f"{self.url}: manifest has no feature statistics")
        return self.data["stats"]

    @property
    def split_names(self) -> list[str]:
        return list(self.data["splits"])

    def split(self, name: str) -> SplitInfo:
        if name not in self.data["splits"]:
            raise ManifestError(f"{self.url}: no split '{name}' (have {self.split_names})")
        shards = [ShardInfo(**vars(s)) for s in self._checked[name]]  # copies of those validated
        return SplitInfo(name=name, shards=shards)


def split_summary(shards: list[ShardInfo], sample_rate: int, hop_length: int) -> dict:
    frames = sum(sum(s.frames) for s in shards)
    return {
        "num_samples": sum(s.num_samples for s in shards),
        "num_frames": frames,
        "hours": frames * hop_length / sample_rate / 3600.0,
        "shards": [s.to_dict() for s in shards],
    }


# --------------------------------------------------------------------------- validation
# Everything read from outside (manifest.json, sidecars) is type-, shape- and range-checked here before
# it is used: a malformed or hostile file fails at load time with a ManifestError naming the file and
# what is wrong (never a TypeError, KeyError or RecursionError later, never a read outside the shards
# directory). bool is not an int. Per-sample lists are checked with C-level passes (set(map(type, x)),
# min/max, numpy), not a Python loop per element: every loader worker loads the manifest, and a
# LibriSpeech-960 one lists 281k samples.

INT64_END = 2**63
_SAFE_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_KEY_CHAR = re.compile(r"[./\\\x00-\x1f\x7f]")
_REMAKE = "re-make the shards (python -m spkr.tools.shard into a new --out)"


def _show(value, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def shard_name_problem(name, split: str | None = None) -> str | None:
    """Why ``name`` is not a safe shard name, or None when it is one. A shard name is relative and lies
    in its split's folder: ``<split>/<file>.tar``, exactly one '/', no URL scheme, no '..', no leading
    '/', no backslash, no empty component, no control character, only ``A-Z a-z 0-9 . _ -`` (each
    component starting with a letter or digit). Joined to the shards directory or URL such a name can
    only be a file inside it: never ``/etc/x.tar``, ``../x.tar`` or, under ``s3://bucket-a/prefix``,
    another bucket. ``split``: the split it is listed under (the folder it must be in)."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if _CONTROL.search(name):
        return "contains a control character"
    if "://" in name:
        return "has a URL scheme (shard names are relative to the shards directory)"
    if name.startswith("/"):
        return "is absolute (shard names are relative to the shards directory)"
    if "\\" in name:
        return "contains a backslash"
    if ".." in name:
        return "contains '..'"
    parts = name.split("/")
    if "" in parts:
        return "has an empty path component"
    if len(parts) != 2:
        return "is not <split>/<file>.tar (exactly one '/')"
    if split is not None and parts[0] != split:
        return f"lies outside its split's folder '{split}/'"
    if not all(_SAFE_PART.fullmatch(p) for p in parts):
        return "has characters other than A-Z a-z 0-9 . _ - (or a part not starting with A-Z a-z 0-9)"
    if not parts[1].endswith(".tar"):
        return "does not end in .tar"
    return None


def split_name_problem(split) -> str | None:
    """Why ``split`` cannot be a split name (a folder of the shards directory), or None."""
    if not isinstance(split, str):
        return f"is a {type(split).__name__}, not a string"
    if ".." in split or not _SAFE_PART.fullmatch(split):
        return "is not a plain folder name (A-Z a-z 0-9 . _ -, starting with a letter or digit)"
    return None


def _list(x, what: str, at: str, n: int | None = None) -> list:
    if type(x) is not list:
        raise ManifestError(f"{at}: {what} is a {type(x).__name__}, not a list")
    if n is not None and len(x) != n:
        raise ManifestError(f"{at}: lists {len(x)} {what} for {n} samples")
    return x


def _count(v, what: str, at: str, lo: int = 0, hi: int = INT64_END) -> int:
    if type(v) is not int:
        raise ManifestError(f"{at}: {what} is {_show(v)} (a {type(v).__name__}), not an integer")
    if not lo <= v < hi:
        raise ManifestError(f"{at}: {what} is {v}, outside {lo}..{hi - 1}")
    return v


def _number(v, what: str, at: str) -> float:
    if type(v) not in (int, float):
        raise ManifestError(f"{at}: {what} is {_show(v)} (a {type(v).__name__}), not a number")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ManifestError(f"{at}: {what} is {_show(v)}, not a finite number")
    return f


def _ints(x, what: str, at: str, n: int | None = None, lo: int = 0, hi: int = INT64_END) -> np.ndarray | None:
    """A list of ints (not bools) in lo..hi-1, checked without a Python loop per element; returned as
    int64 when hi <= 2**63 (else None)."""
    _list(x, what, at, n)
    if x and set(map(type, x)) != {int}:
        bad = next(v for v in x if type(v) is not int)
        raise ManifestError(f"{at}: {what} holds {_show(bad)} (a {type(bad).__name__}), not integers")
    if hi > INT64_END:
        a, b = (min(x), max(x)) if x else (lo, lo)
    else:
        try:
            arr = np.fromiter(x, np.int64, len(x))
        except OverflowError:
            bad = next(v for v in x if not -INT64_END <= v < INT64_END)
            raise ManifestError(f"{at}: {what} holds {_show(bad)}, outside {lo}..{hi - 1}") from None
        else:
            a, b = (int(arr.min()), int(arr.max())) if len(arr) else (lo, lo)
    if a < lo or b >= hi:
        raise ManifestError(f"{at}: {what} holds {_show(a if a < lo else b)}, outside {lo}..{hi - 1}")
    return arr if hi <= INT64_END else None


def _floats(x, what: str, at: str, n: int | None = None, lo: float = -math.inf) -> np.ndarray:
    """A list of finite numbers (ints or floats, not bools) >= lo, as float64."""
    if type(x) is not list:
        raise ManifestError(f"{at}: {what} is a {type(x).__name__}, not a list")
    if n is not None and len(x) != n:
        raise ManifestError(f"{at}: {what} has {len(x)} values, expected {n}")
    if x and not set(map(type, x)) <= {int, float}:
        bad = next(v for v in x if type(v) not in (int, float))
        raise ManifestError(f"{at}: {what} holds {_show(bad)} (a {type(bad).__name__}), not numbers")
    try:
        a = np.asarray(x, dtype=np.float64)
    except OverflowError:
        raise ManifestError(f"{at}: {what} holds a number too large for a float") from None
    if not np.isfinite(a).all():
        raise ManifestError(f"{at}: {what} holds a non-finite value")
    if a.size and a.min() < lo:
        raise ManifestError(f"{at}: {what} holds {a.min()}, below {lo}")
    return a


def _strs(x, what: str, at: str, n: int | None = None) -> list[str]:
    _list(x, what, at, n)
    if x and set(map(type, x)) != {str}:
        bad = next(v for v in x if type(v) is not str)
        raise ManifestError(f"{at}: {what} holds {_show(bad)} (a {type(bad).__name__}), not strings")
    return x


def _string_keys(d: dict, what: str, at: str) -> None:
    if not isinstance(d, dict):
        raise ManifestError(f"{at}: {what} is a {type(d).__name__}, not an object")
    if d and set(map(type, d)) != {str}:
        bad = next(k for k in d if type(k) is not str)
        raise ManifestError(f"{at}: {what} has a key {_show(bad)} that is not a string")


def _shard_from_dict(cls, d, where: str, split: str | None, n_classes: int | None = None):
    """ShardInfo.from_dict's checks (see there); labels below ``n_classes`` when given."""
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: a shard entry is a {type(d).__name__}, not an object")
    name = d.get("name")
    if split is None and isinstance(d.get("split"), str):
        split = d["split"]  # a sidecar names its split
    problem = shard_name_problem(name, split)
    if problem:
        raise ManifestError(f"{where}: shard name {_show(name)} {problem}")
    at = f"{where}: shard {name}"
    fields = cls.__dataclass_fields__
    missing = [k for k in fields if k not in d]
    if "checksums" in missing:
        raise ManifestError(
            f"{at} lacks per-sample 'checksums': the manifest predates this spkr version; {_REMAKE}"
        )
    if missing:
        raise ManifestError(f"{at}: shard entry lacks {missing}")
    n = _count(d["num_samples"], "num_samples", at)
    size = _count(d["bytes"], "bytes", at)
    if "sha256" in fields and not isinstance(d["sha256"], str):
        raise ManifestError(f"{at}: sha256 is {_show(d['sha256'])}, not a string")
    keys = _strs(d["keys"], "keys", at, n)
    joined = "".join(keys)  # str.isprintable and `in` scan in C (a regex takes 2.5x as long)
    if not joined.isprintable() or "." in joined or "/" in joined or "\\" in joined or "" in keys:
        bad = next(k for k in keys if not k or not k.isprintable() or _BAD_KEY_CHAR.search(k))
        raise ManifestError(
            f"{at}: sample key {_show(bad)} is empty or holds '.', '/', '\\' or an unprintable character"
        )
    _ints(d["frames"], "frames", at, n)
    _ints(d["labels"], "labels", at, n, hi=INT64_END if n_classes is None else max(n_classes, 1))
    off = _ints(d["offsets"], "offsets", at, n, hi=max(size, 1))
    if n:
        if n > 1 and not (np.diff(off) > 0).all():
            raise ManifestError(f"{at}: offsets are not increasing")
        if (off % 512).any():
            raise ManifestError(f"{at}: offsets are not on 512-byte tar block boundaries")
        if off[-1] >= size:
            raise ManifestError(f"{at}: offset {int(off[-1])} lies beyond the shard's {size} bytes")
    if "checksums" in fields or "checksums" in d:
        _ints(d.get("checksums"), "checksums", at, n, hi=2**64)
    return cls(**{k: d[k] for k in fields})


def _check_feature_config(fc, where: str) -> FeatureConfig:
    at = f"{where}: feature_config"
    _string_keys(fc, "feature_config", where)
    for name, f in FeatureConfig.__dataclass_fields__.items():
        if name not in fc:
            continue
        v, t = fc[name], type(f.default)
        if t is float:
            _number(v, name, at)
        elif t is int:
            _count(v, name, at, lo=1, hi=2**31)
        elif type(v) is not t:
            raise ManifestError(f"{at}: {name} is {_show(v)} (a {type(v).__name__}), not a {t.__name__}")
    try:
        return FeatureConfig.from_dict(fc)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{at}: {e}") from None


def _check_stats(st, where: str, n_mels: int) -> None:
    at = f"{where}: stats"
    _string_keys(st, "stats", where)
    missing = [k for k in ("mean", "std", "min", "max") if k not in st]
    if missing:
        raise ManifestError(f"{at} lacks {missing}")
    _floats(st["mean"], "mean", at, n_mels)
    _floats(st["std"], "std", at, n_mels, lo=0.0)
    _number(st["min"], "min", at)
    _number(st["max"], "max", at)
    if "num_frames" in st:
        _count(st["num_frames"], "num_frames", at)
    if "split" in st and not isinstance(st["split"], str):
        raise ManifestError(f"{at}: split is {_show(st['split'])}, not a string")

"""The shard format: the manifest schema, its validation, constants and errors; the contract between
the write side (:mod:`spkr.shards.writer`) and the read side (:mod:`spkr.stream`).

A shards directory (local or URL) holds ``manifest.json`` and, per split, tar shards::

    <out>/manifest.json
    <out>/<split>/shard-000000.tar        WebDataset tar: <key>.cls, <key>.json, <key>.mel.npy per sample
    <out>/<split>/shard-000000.tar.json   sidecar: that shard's manifest entry, written after the tar
    <out>/trials/<split>.txt              verification splits' trial lists (protocol ``open``)
    <out>/augment.jsonl                   one description per augmented copy (``<key>~aug<k>``)
    <out>/index/<split>.<field>.npy|.txt  the per-sample fields (version 3; the table below)

``manifest.json``'s ``digest`` holds the sha256 of every other top-level field (:func:`manifest_digest`),
checked on every load: a field outside the ``dataset_id`` (``stats``, ``class_weights``, the index files'
digests, ...) edited by hand is refused, naming the field. A manifest without ``digest`` (written before
it) loads as before if it holds only the fields such a manifest held (a renamed digest key is refused).

A shard is complete iff its sidecar exists (it is written last); ``manifest.json`` is written only
when every planned shard is complete, and after the trial files, ``augment.jsonl`` and the index
files, so nothing half-written is ever listed.

Optional top-level entries (docs/protocols.md): ``protocol`` (absent = ``closed``): each split's kind
(classification: labels are class ids < ``len(labels)``; verification: labels index that split's own
``speakers``), role (train/valid/test), enrollment keys and trial file (path ``trials/<split>.txt``,
sha256); ``augment``: the copies' split, count per utterance, recipe identity and ``augment.jsonl``'s
sha256. Copies appear only in the split with role train. The split name ``trials`` is reserved. Everything the loader
and the charts need is here, so neither opens audio: per-sample keys, frame counts, labels and byte
offsets, per-shard bytes and sha256, the feature config, the label map, class weights and the
training split's per-mel-bin statistics. The tar layout of a sample is :mod:`spkr.shards.codec`'s.

Version 3 keeps a shard entry's per-sample fields out of ``manifest.json``: they are per-split index
files beside it, written (atomically) before it, listed in the split's ``index`` object (each file's
``path``, ``bytes`` and ``sha256``, checked at load) and memory-mapped by every reader (a remote shard
set's index files are fetched once into a local cache keyed by their sha256,
``$SPKR_INDEX_CACHE`` or ``$XDG_CACHE_HOME/spkr/index``). N: samples in the split, S: its shards.

================================  =========  ========  ============================================================
file (``<out>/index/``)           dtype      shape     holds
================================  =========  ========  ============================================================
``<split>.keys.txt``              UTF-8      bytes     the split's keys joined by ``\\n`` (what dataset_id hashes)
``<split>.key_ends.npy``          uint       (N,)      end of each key in its shard's part of keys.txt
``<split>.frames.npy``            uint       (N,)      frame count of each sample
``<split>.labels.npy``            uint       (N,)      label of each sample (see ``protocol``)
``<split>.offsets.npy``           uint       (N,)      byte offset of each sample's first tar header
``<split>.checksums.npy``         uint64     (N,)      xxh3_64 of each sample's byte span
``<split>.shard_starts.npy``      uint       (S + 1,)  index of each shard's first sample; last = N
================================  =========  ========  ============================================================

``.npy`` files are little-endian, 1-D, in the smallest unsigned dtype that holds their values, read
with ``allow_pickle=False``. A shard's part of keys.txt starts after the previous non-empty shard's
part and its newline. Version 2 (per-sample lists inline in each shard entry) still loads.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spkr import atomic, storage
from spkr.augment import COPY_SEPARATOR
from spkr.config import TooDeep, loads_json
from spkr.corpus.protocols import CLASSIFICATION, CLOSED, PROTOCOLS, TRIALS_DIR, VERIFICATION, trials_path
from spkr.errors import SpkrError
from spkr.features import FeatureConfig

FORMAT = "spkr-shards"
VERSION = 3  # 2: dataset_id + per-sample checksums; 3: per-sample fields in index files
INLINE_VERSION = 2  # per-sample fields inline: what build_manifest assembles and older shard sets hold
READ_VERSIONS = (INLINE_VERSION, VERSION)
INDEX_DIR = "index"
# The index files of a split (module docstring): field -> file suffix.
INDEX_FILES = {
    "keys": "keys.txt",
    "key_ends": "key_ends.npy",
    "frames": "frames.npy",
    "labels": "labels.npy",
    "offsets": "offsets.npy",
    "checksums": "checksums.npy",
    "shard_starts": "shard_starts.npy",
}
SAMPLE_CHECKSUM = "xxh3_64"  # the per-sample checksum's algorithm, as named in the manifest
MANIFEST_NAME = "manifest.json"
DIGEST = "digest"  # the manifest field holding the other fields' sha256 (manifest_digest)
# The top-level fields a manifest written before the digest can hold: one without a digest holding any
# other (a digest key renamed by a typo, a field added by hand) is refused, as a digest would refuse it.
PRE_DIGEST_FIELDS = frozenset(
    "format version created dataset_id corpus identity feature_config feature_fingerprint feature_backend "
    "sample_checksum labels class_weights class_weight_scheme splits stats skipped protocol augment".split()
)
AUGMENT_NAME = "augment.jsonl"  # one description per augmented copy (spkr.augment), manifest key order
ROLES = ("train", "valid", "test")
_SHA256 = re.compile(r"[0-9a-f]{64}")
SIDECAR_SUFFIX = ".json"  # shard-000000.tar -> shard-000000.tar.json
# Tar members of one sample, in the order they are written. Nothing else is ever decoded.
MEMBER_EXTS = ("cls", "json", "mel.npy")


class ManifestError(SpkrError, ValueError):
    """A manifest that is missing, malformed, or inconsistent with its shards."""


class ManifestMismatch(ManifestError):
    """Shards that do not fit a model (other feature config or label map)."""


class DatasetMismatch(ManifestMismatch):
    """Shards that are not the dataset a checkpoint or loader state was made from."""


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:06d}.tar"


def dataset_id(
    feature_fingerprint: str,
    feature_backend: str,
    labels: list[str],
    split_keys: dict,
    extras: dict | None = None,
) -> str:
    """The identity of a shard set: what its features are and which utterance is in which split, in
    which order. ``split_keys``: {split: ordered keys, or their UTF-8 joined by newlines}. Two shard
    sets with the same id hold the same samples computed the same way; another seed, source split,
    feature config or label map differs. ``extras`` (:func:`dataset_extras`: a non-closed protocol,
    augmentation) is hashed too when given, so shard sets made before protocols and augmentation keep
    their ids."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}\n{feature_fingerprint}\n{feature_backend}\n".encode())
    h.update(json.dumps(list(labels)).encode())
    for split in sorted(split_keys):
        h.update(f"\n[{split}]\n".encode())
        keys = split_keys[split]
        h.update(keys if isinstance(keys, bytes) else "\n".join(keys).encode())
    for name in sorted(extras or {}):
        h.update(f"\n{{{name}}}\n".encode() + json.dumps(extras[name], sort_keys=True).encode())
    return h.hexdigest()[:16]


def dataset_extras(protocol: dict | None, augment: dict | None) -> dict:
    """What besides features, labels and keys decides a shard set's identity: the protocol entry
    (verification label spaces, enrollment keys, trial digests) unless it is ``closed``, and the
    augmentation entry without its folder locations (the source contents are in its identity)."""
    extras = {}
    if protocol is not None and protocol.get("name") != CLOSED:
        extras["protocol"] = protocol
    if augment is not None:
        extras["augment"] = {k: v for k, v in augment.items() if k != "folders"}
    return extras


def manifest_digest(data: dict) -> dict[str, str]:
    """What a manifest's ``digest`` holds: {field: sha256 of its canonical JSON (sorted keys, no spaces,
    packed sequences as the lists they are)} for every top-level field of ``data`` but ``digest``."""
    return {k: _field_sha256(v) for k, v in sorted(data.items()) if k != DIGEST}


def with_digest(data: dict) -> dict:
    """Manifest ``data`` with its ``digest`` (re)computed, as the last field."""
    rest = {k: v for k, v in data.items() if k != DIGEST}
    return {**rest, DIGEST: manifest_digest(rest)}


def _field_sha256(value) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_plain, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _narrowed(a: np.ndarray) -> np.ndarray:
    """``a`` read-only, in the smallest unsigned dtype that holds its values when none is negative
    (a frame count or label in 1-2 bytes, an offset in 4, not 8)."""
    if len(a) and a.dtype != np.uint64 and a.min() >= 0:
        top = a.max()
        a = next((a.astype(t) for t in (np.uint8, np.uint16, np.uint32) if top <= np.iinfo(t).max), a)
    a.flags.writeable = False
    return a


class PackedInts(Sequence):
    """A read-only sequence of ints held in one numpy array (the smallest unsigned dtype that holds
    them): a loaded manifest's per-sample numbers.
    No Python object per sample, so a forked DataLoader worker never writes (so never copies) its
    pages, and it pickles as one array. Items are Python ints, slices lists; ``np.asarray`` gives the
    array without a copy; it equals any sequence of the same ints (the JSON's list included)."""

    __slots__ = ("array", "source")

    def __init__(self, array: np.ndarray):
        self.array, self.source = _narrowed(array), None

    @classmethod
    def mapped(cls, array: np.ndarray, source: tuple) -> PackedInts:
        """A view of a memory-mapped index array, as is; ``source`` (path, bytes, start, stop) is what
        it pickles as, so a spawned worker maps the file again instead of receiving the numbers."""
        obj = cls.__new__(cls)
        obj.array, obj.source = array, source
        return obj

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        return self.array[i].tolist()  # a Python int, or a list for a slice

    def __iter__(self):
        return iter(self.array.tolist())

    def __array__(self, dtype=None, copy=None):
        a = self.array if dtype is None else self.array.astype(dtype, copy=False)
        return a.copy() if copy else a

    def tolist(self) -> list[int]:
        return self.array.tolist()

    def __eq__(self, other):
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and self.tolist() == list(other)

    __hash__ = None

    def __reduce__(self):
        if self.source is not None:
            return _remap_ints, self.source
        return type(self), (np.ascontiguousarray(self.array),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tolist()})"


class PackedStrs(Sequence):
    """A read-only sequence of strings without a newline held as one UTF-8 buffer (``text``: the
    strings joined by ``\\n``) and the int64 end of each in it (``ends``): a loaded manifest's keys.
    An item is decoded when asked for; otherwise as :class:`PackedInts`."""

    __slots__ = ("text", "ends", "source")

    def __init__(self, text: bytes, ends: np.ndarray):
        self.text, self.ends, self.source = text, _narrowed(ends), None

    @classmethod
    def mapped(cls, text: np.ndarray, ends: np.ndarray, source: tuple) -> PackedStrs:
        """Views of memory-mapped index files (``text``: uint8 bytes of keys.txt); ``source``: (text
        path, bytes, start, stop, ends path, bytes, start, stop), what it pickles as."""
        obj = cls.__new__(cls)
        obj.text, obj.ends, obj.source = text, ends, source
        return obj

    @classmethod
    def pack(cls, strs: list[str]) -> PackedStrs:
        text = "\n".join(strs).encode()
        lengths = np.fromiter(map(len, strs), np.int64, len(strs))
        if len(text) != int(lengths.sum()) + max(len(strs) - 1, 0):  # not all ASCII: count bytes
            lengths = np.fromiter((len(s.encode()) for s in strs), np.int64, len(strs))
        return cls(text, np.cumsum(lengths + 1) - 1)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.tolist()[i]
        n = len(self.ends)
        i = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= i < n:
            raise IndexError(f"index {i} outside {n} strings")
        return bytes(self.text[int(self.ends[i - 1]) + 1 if i else 0 : int(self.ends[i])]).decode()

    def __iter__(self):
        return iter(self.tolist())

    def tolist(self) -> list[str]:
        return bytes(self.text).decode().split("\n") if len(self.ends) else []

    def lengths(self) -> np.ndarray:
        """The UTF-8 byte length of each string."""
        return np.diff(self.ends.astype(np.int64), prepend=-1) - 1

    __eq__ = PackedInts.__eq__
    __hash__ = None

    def __reduce__(self):
        if self.source is not None:
            return _remap_strs, self.source
        return type(self), (bytes(self.text), np.ascontiguousarray(self.ends))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tolist()})"


_PACKED = (PackedInts, PackedStrs)
_MAPPED: dict[tuple, np.ndarray] = {}  # (path, device, inode, mtime, size) -> this process's map of it
# Maps the cache keeps (oldest dropped first; arrays still in use keep their own map): one open file
# each, so a process that loads many shard sets does not run out of file descriptors.
MAPPED_MAX = 256


def _map_file(path: str, size: int) -> np.ndarray:
    """``path`` memory-mapped read-only (once per process): a ``.npy`` as its array, else its bytes as
    uint8. ``size``: the bytes the manifest says it has (a file changed since is refused)."""
    try:
        st = os.stat(path)
    except OSError:
        raise ManifestError(f"{path}: index file is missing") from None
    key = (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)  # a file replaced since is mapped anew
    arr = _MAPPED.get(key)
    if arr is None:
        actual = st.st_size
        if actual != size:
            raise ManifestError(f"{path}: index file has {actual} bytes, the manifest says {size}")
        try:
            if path.endswith(".npy"):
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            else:
                arr = np.memmap(path, np.uint8, "r") if size else np.zeros(0, np.uint8)
        except (ValueError, OSError, EOFError) as e:
            raise ManifestError(f"{path}: not a valid index file: {e}") from None
        for old in [k for k in _MAPPED if k[0] == path]:  # a replaced file: its views keep their map
            del _MAPPED[old]
        _MAPPED[key] = arr
        while len(_MAPPED) > MAPPED_MAX:
            del _MAPPED[next(iter(_MAPPED))]
    return arr


def _remap_ints(path: str, size: int, start: int, stop: int) -> PackedInts:
    return PackedInts.mapped(_map_file(path, size)[start:stop], (path, size, start, stop))


def _remap_strs(tpath, tsize, tstart, tstop, epath, esize, estart, estop) -> PackedStrs:
    text = _map_file(tpath, tsize)[tstart:tstop]
    ends = _map_file(epath, esize)[estart:estop]
    return PackedStrs.mapped(text, ends, (tpath, tsize, tstart, tstop, epath, esize, estart, estop))


PER_SAMPLE_FIELDS = ("keys", "frames", "labels", "offsets", "checksums")  # a shard entry's packed lists


def _pack_shard_entry(d: dict) -> dict:
    """``json.loads``' object_hook: a shard entry's per-sample lists are packed as soon as the entry is
    parsed, so a load never holds every sample as Python objects at once. Only what packs exactly is
    packed (keys: strings without a newline; numbers: ints that fit int64, checksums uint64); the
    rest stays a list, for validation to report as it would anyway."""
    if not all(type(d.get(k)) is list and d[k] for k in PER_SAMPLE_FIELDS):
        return d
    keys = d["keys"]
    if set(map(type, keys)) == {str}:
        try:
            packed = PackedStrs.pack(keys)
        except UnicodeEncodeError:  # a lone surrogate: validation refuses it
            packed = None
        if packed is not None and packed.text.count(b"\n") == len(keys) - 1:
            d["keys"] = packed
    for field in PER_SAMPLE_FIELDS[1:]:
        values = d[field]
        if set(map(type, values)) == {int}:
            try:
                array = np.fromiter(values, np.uint64 if field == "checksums" else np.int64, len(values))
            except OverflowError:
                continue
            d[field] = PackedInts(array)
    return d


def _check_unique_keys(checked: dict[str, list[ShardInfo]], where: str) -> None:
    """No sample key listed twice in the manifest (all splits), in a pass of its own: the keys it
    decodes are freed together, not interleaved with what the manifest keeps."""
    seen: set[str] = set()
    n_keys = 0
    for infos in checked.values():
        for info in infos:
            seen.update(info.keys)
            n_keys += info.num_samples
            if len(seen) != n_keys:
                counts = Counter(k for lst in checked.values() for i in lst for k in i.keys)
                dup = [k for k, c in counts.items() if c > 1]
                raise ManifestError(
                    f"{where}: sample key(s) listed twice, e.g. {sorted(dup)[:3]} (again in {info.name})"
                )


def _joined_keys(shards: list[ShardInfo]) -> bytes:
    """The keys of checked (packed) shards, in order, joined by newlines, as UTF-8."""
    return b"\n".join(s.keys.text for s in shards if len(s.keys))


def _plain(value):
    """``value`` with a packed sequence as a list (what the JSON holds); json.dumps' ``default``."""
    if isinstance(value, _PACKED):
        return value.tolist()
    return value


@dataclass
class ShardInfo:
    """One shard's entry. Read from a manifest or sidecar (:meth:`from_dict`), the per-sample fields
    are :class:`PackedStrs` / :class:`PackedInts` (equal to the lists they were read from); the
    writer builds it with lists. :meth:`to_dict` gives lists either way."""

    name: str  # relative to the shards directory, e.g. "train/shard-000000.tar"
    num_samples: int
    bytes: int
    sha256: str
    keys: Sequence[str]
    frames: Sequence[int]
    labels: Sequence[int]
    offsets: Sequence[int]  # byte offset of each sample's first tar header
    checksums: Sequence[int]  # spkr.shards.codec.sample_checksum of each sample's byte span

    @classmethod
    def from_dict(cls, d: dict, where: str, split: str | None = None) -> ShardInfo:
        """A shard entry (of a manifest or a sidecar) with every field type- and range-checked, else
        ManifestError naming ``where`` and the shard: a safe name inside ``split``'s folder (a sidecar's
        own ``split`` when not given, see :func:`shard_name_problem`), int counts, per-sample lists of
        length ``num_samples`` (keys: strings without '.', '/'; frames, labels: ints >= 0; offsets:
        increasing, on tar blocks, inside ``bytes``; checksums: 0 <= c < 2**64)."""
        return _shard_from_dict(cls, d, where, split)

    def to_dict(self) -> dict:
        return {k: _plain(getattr(self, k)) for k in self.__dataclass_fields__}


@dataclass
class SplitInfo:
    name: str
    shards: list[ShardInfo]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_frames(self) -> int:
        return int(self.frames_array().sum())

    def frames_array(self) -> np.ndarray:
        return self._concat("frames")

    def labels_array(self) -> np.ndarray:
        return self._concat("labels")

    def _concat(self, field: str) -> np.ndarray:
        return np.concatenate(
            [np.zeros(0, np.int64)] + [np.asarray(getattr(s, field), np.int64) for s in self.shards]
        )


class Manifest:
    """A loaded manifest.json with typed accessors. ``self.data`` is the JSON's dict, but that each
    shard entry's per-sample lists are the packed sequences its :class:`ShardInfo` holds (equal to
    those lists; a sample costs its key's bytes + 48 and no Python object; :meth:`to_json` writes
    them as the lists they were)."""

    def __init__(
        self,
        data: dict,
        url: str = "<memory>",
        storage_options: dict | None = None,
        retry: storage.RetryPolicy | None = None,
    ):
        self.data = data
        self.url = url
        self._index_access = (storage_options, retry)  # where a version-3 manifest's index files are read
        self.validate()
        del self._index_access

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
            data = loads_json(raw, object_hook=_pack_shard_entry)
        except TooDeep:
            raise ManifestError(f"{url}: manifest JSON is nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of > 4300 digits, NaN
            raise ManifestError(f"{url}: manifest is not valid JSON: {e}") from None
        return cls(data, url=url, storage_options=storage_options, retry=retry)

    def to_json(self) -> str:
        """The manifest as one JSON with every per-sample list inline (a version-2 manifest;
        :func:`index_files` splits it into manifest.json + index files)."""
        splits = {
            name: {k: v for k, v in sd.items() if k != "index"} for name, sd in self.data["splits"].items()
        }
        data = with_digest({**self.data, "version": INLINE_VERSION, "splits": splits})
        return json.dumps(data, indent=1, sort_keys=False, default=_plain)

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Check everything the code reads from the manifest (types, shapes, ranges, shard names that
        stay inside the shards directory), else ManifestError naming the file and what is wrong."""
        d, where = self.data, self.url
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a {FORMAT} manifest")
        raw = d  # the fields as read: what the digest covers
        _string_keys(d, "manifest", where)
        version = d.get("version")
        if type(version) is not int or version not in READ_VERSIONS:
            old = type(version) is int and version < INLINE_VERSION
            raise ManifestError(
                f"{where}: manifest version {_show(version)} (this spkr reads {' and '.join(map(str, READ_VERSIONS))})"
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
        for split in d["splits"]:
            problem = split_name_problem(split)
            if problem:
                raise ManifestError(f"{where}: split name {_show(split)} {problem}")
        label_bounds = _check_protocol(d.get("protocol"), list(d["splits"]), n_classes, where)
        if version == VERSION:  # the per-sample fields are in index files: mapped into the shard entries
            d = {**d, "splits": {k: self._attach_index(k, sd) for k, sd in d["splits"].items()}}
        self._checked: dict[str, list[ShardInfo]] = {}  # split() hands out copies: validated once
        packed_splits = {}
        for split, sd in d["splits"].items():
            if not isinstance(sd, dict) or type(sd.get("shards")) is not list:
                raise ManifestError(f"{where}: split '{split}' is not an object with a 'shards' list")
            infos = self._checked[split] = []
            entries = []
            for s in sd["shards"]:
                info = _shard_from_dict(ShardInfo, s, f"{where} [{split}]", split, label_bounds[split])
                infos.append(info)
                entries.append({k: getattr(info, k) if k in PER_SAMPLE_FIELDS else v for k, v in s.items()})
            packed_splits[split] = {**sd, "shards": entries}
        self.data = d = {**d, "splits": packed_splits}  # the JSON's lists dropped: packed, as checked
        _check_unique_keys(self._checked, where)
        self._check_split_keys()
        _check_augment_entry(d.get("augment"), where)
        self._check_identity()
        _check_digest(raw, where)

    def _attach_index(self, split: str, sd) -> dict:
        """Split entry ``sd`` of a version-3 manifest with its index files checked (bytes, sha256,
        dtype, shape, key separators) and mapped: each shard entry gets its per-sample fields as
        views of them (checked further, as inline ones are, by the caller)."""
        where = f"{self.url} [{split}]"
        if not isinstance(sd, dict) or type(sd.get("shards")) is not list:
            raise ManifestError(f"{where}: split '{split}' is not an object with a 'shards' list")
        shards, index = sd["shards"], sd.get("index")
        if index is not None:
            _string_keys(index, "index", where)
        if index is None or sorted(index) != sorted(INDEX_FILES):
            raise ManifestError(
                f"{where}: split '{split}' lists index files {sorted(index or [])}, not {sorted(INDEX_FILES)} "
                f"(a version-{VERSION} manifest)"
            )
        for s in shards:
            inline = sorted(set(PER_SAMPLE_FIELDS) & set(s)) if isinstance(s, dict) else []
            if inline:
                raise ManifestError(
                    f"{where}: a shard entry lists {inline} inline (a version-{VERSION} manifest)"
                )
        maps, sources = {}, {}
        for field, suffix in INDEX_FILES.items():
            entry, at = index[field], f"{where}: index '{field}'"
            _string_keys(entry, f"index '{field}'", where)
            expected = f"{INDEX_DIR}/{split}.{suffix}"
            if entry.get("path") != expected:
                raise ManifestError(f"{at}: path {_show(entry.get('path'))} is not {expected!r}")
            size = _count(entry.get("bytes"), "bytes", at)
            if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
                raise ManifestError(f"{at}: sha256 {_show(entry.get('sha256'))} is not 64 hex digits")
            path = self._index_file(storage.join(self._base(), expected), size, entry["sha256"])
            arr = _map_file(path, size)
            if field != "keys" and (arr.ndim != 1 or arr.dtype.kind not in "iu"):
                raise ManifestError(
                    f"{path}: holds a {arr.dtype} array of shape {arr.shape}, not 1-D integers"
                )
            maps[field], sources[field] = arr, (path, size)
        starts, n = maps["shard_starts"], len(maps["frames"])
        if len(starts) != len(shards) + 1 or (len(starts) and (starts[0] != 0 or int(starts[-1]) != n)):
            raise ManifestError(
                f"{sources['shard_starts'][0]}: {len(starts)} shard starts for {len(shards)} shards of {n} "
                "samples (needs S + 1, from 0 to N)"
            )
        starts = starts.astype(np.int64)
        if (np.diff(starts) < 0).any():
            raise ManifestError(f"{sources['shard_starts'][0]}: shard starts are not increasing")
        for field in ("key_ends", "labels", "offsets", "checksums"):
            if len(maps[field]) != n:
                raise ManifestError(f"{sources[field][0]}: lists {len(maps[field])} values for {n} samples")
        text, ends = maps["keys"], maps["key_ends"].astype(np.int64)
        counts = np.diff(starts)
        lasts = np.where(counts > 0, ends[np.maximum(starts[1:] - 1, 0)] if n else 0, -1)  # -1: empty shard
        bases = np.concatenate([[0], np.cumsum(lasts + 1)])[:-1]  # each shard's first byte in keys.txt
        seps = (np.repeat(bases, counts) + ends)[:-1]  # where each key but the last ends: a newline
        text_bytes = int((lasts + 1).sum()) - 1 if n else 0  # every key and a newline between two
        if len(text) != text_bytes or not np.array_equal(np.flatnonzero(text == 10), seps):
            raise ManifestError(
                f"{sources['keys'][0]}: keys, {INDEX_FILES['key_ends']} and {INDEX_FILES['shard_starts']} "
                "disagree (a key end that is not a newline, a newline inside a key, or bytes left over)"
            )
        try:
            bytes(text).decode()
        except UnicodeDecodeError as e:
            raise ManifestError(f"{sources['keys'][0]}: keys are not UTF-8 ({e})") from None
        out = []
        for i, s in enumerate(shards):
            if not isinstance(s, dict):
                out.append(s)  # refused by the caller's checks
                continue
            a, b, t0 = int(starts[i]), int(starts[i + 1]), int(bases[i])
            t1 = t0 + max(int(lasts[i]), 0)
            fields = {f: _remap_ints(*sources[f], a, b) for f in ("frames", "labels", "offsets", "checksums")}
            fields["keys"] = _remap_strs(*sources["keys"], t0, t1, *sources["key_ends"], a, b)
            out.append({**s, **fields})
        return {**sd, "shards": out}

    def _base(self) -> str:
        return self.url.rsplit("/", 1)[0] if "/" in self.url else "."

    def _index_file(self, url: str, size: int, sha256: str) -> str:
        """A local path of index file ``url`` whose bytes and sha256 are the manifest's: the file
        itself for a local shard set, else a copy fetched once into the index cache (named by its
        sha256, written atomically)."""
        storage_options, retry = getattr(self, "_index_access", (None, None))
        if storage.is_url(url):
            path = os.path.join(index_cache_dir(), sha256 + os.path.splitext(url)[1])
            if not (os.path.exists(path) and _file_sha256(path) == sha256):
                raw = _read_listed(url, "index file", storage_options, retry)
                _check_index_bytes(url, len(raw), hashlib.sha256(raw).hexdigest(), size, sha256)
                atomic.write_bytes(path, raw, fsync=False)
            return path
        if not os.path.exists(url):
            raise ManifestError(f"{url}: index file is missing")
        _check_index_bytes(url, os.path.getsize(url), _file_sha256(url), size, sha256)
        return url

    def _check_split_keys(self) -> None:
        """Augmented copies (``<key>~aug<k>``) only in the training split; enrollment keys of a
        verification split are keys of that split."""
        where = self.url
        for split in self.split_names:
            text = _joined_keys(self._checked[split]).decode()  # keys decoded only when a check needs them
            if self.split_role(split) != "train" and COPY_SEPARATOR in text:
                copies = [k for k in text.split("\n") if COPY_SEPARATOR in k]
                if copies:
                    raise ManifestError(
                        f"{where}: split '{split}' holds augmented copies (e.g. {copies[0]!r}): copies belong "
                        "only in the training split"
                    )
            if self.split_kind(split) == VERIFICATION:
                missing = sorted(set(self.enroll_keys(split)) - set(text.split("\n")))
                if missing:
                    raise ManifestError(
                        f"{where}: protocol split '{split}' enrolls {len(missing)} key(s) it does not hold, "
                        f"e.g. {missing[0]!r}"
                    )

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
        fingerprint = self.feature_config.fingerprint()
        if d["feature_fingerprint"] != fingerprint:
            raise ManifestError(
                f"{where}: feature_fingerprint {d['feature_fingerprint']} does not match its feature_config "
                f"({fingerprint}): the manifest was edited; re-run python -m spkr.tools.shard"
            )
        expected = dataset_id(
            d["feature_fingerprint"],
            d["feature_backend"],
            d["labels"],
            {name: _joined_keys(self._checked[name]) for name in d["splits"]},
            dataset_extras(d.get("protocol"), d.get("augment")),
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
        self._require_split(name)
        shards = [ShardInfo(**vars(s)) for s in self._checked[name]]  # copies of those validated
        return SplitInfo(name=name, shards=shards)

    def _require_split(self, name: str) -> None:
        if name not in self.data["splits"]:
            raise ManifestError(f"{self.url}: no split '{name}' (have {self.split_names})")

    # ---------------------------------------------------------------- protocol (docs/protocols.md)
    @property
    def protocol_name(self) -> str:
        """``closed``, ``closed-session`` or ``open``; ``closed`` when the manifest has no protocol."""
        return (self.data.get("protocol") or {}).get("name", CLOSED)

    def _protocol_split(self, name: str) -> dict:
        self._require_split(name)
        return ((self.data.get("protocol") or {}).get("splits") or {}).get(name, {})

    def split_kind(self, name: str) -> str:
        """``classification`` (labels are class ids) or ``verification`` (labels index
        :meth:`split_speakers`; scored on trials)."""
        return self._protocol_split(name).get("kind", CLASSIFICATION)

    def split_role(self, name: str) -> str | None:
        """``train``, ``valid`` or ``test``: when train/evaluate use the split. Without a protocol:
        the split's name when it is one of these, else None."""
        entry = self._protocol_split(name)
        return entry["role"] if entry else (name if name in ROLES else None)

    def splits_with_role(self, role: str) -> list[str]:
        """The splits with ``role``, in manifest order (``open``: ``valid`` and ``valid-verify``)."""
        return [s for s in self.split_names if self.split_role(s) == role]

    def split_speakers(self, name: str) -> list[str]:
        """The split's label space: ``labels`` for a classification split, the split's own speakers
        for a verification split."""
        entry = self._protocol_split(name)
        return list(entry["speakers"]) if entry.get("kind") == VERIFICATION else self.labels

    def _verification(self, name: str, what: str) -> dict:
        entry = self._protocol_split(name)
        if entry.get("kind") != VERIFICATION:
            raise ManifestError(
                f"{self.url}: split '{name}' is a {self.split_kind(name)} split: it has no {what} "
                f"(verification splits: {[s for s in self.split_names if self.split_kind(s) == VERIFICATION]})"
            )
        return entry

    def enroll_keys(self, name: str) -> list[str]:
        """The enrollment utterances' keys of verification split ``name``."""
        return list(self._verification(name, "enrollment keys")["enroll_keys"])

    @property
    def base_url(self) -> str:
        """The shards directory (or URL prefix) this manifest was loaded from."""
        suffix = "/" + MANIFEST_NAME
        if not self.url.endswith(suffix):
            raise ManifestError(f"{self.url}: an in-memory manifest has no shards directory")
        return self.url[: -len(suffix)]

    def trials_url(self, name: str) -> str:
        """Where verification split ``name``'s trial file is (``<shards>/trials/<split>.txt``)."""
        return storage.join(self.base_url, self._verification(name, "trial file")["trials"]["path"])

    def read_trials(
        self, name: str, storage_options: dict | None = None, retry: storage.RetryPolicy | None = None
    ) -> str:
        """The trial file's text (``<1|0> <enroll_key> <test_key>`` lines; parse it with
        ``spkr.scoring.parse_trials``), after checking its sha256 against the manifest's."""
        entry = self._verification(name, "trial file")["trials"]
        url = self.trials_url(name)
        raw = _read_listed(url, f"trial file of split '{name}'", storage_options, retry)
        return _checked_text(raw, entry["sha256"], url)

    def read_augment_descriptions(
        self, storage_options: dict | None = None, retry: storage.RetryPolicy | None = None
    ) -> list[dict]:
        """The augmented copies' descriptions (``augment.jsonl``, sha256 checked), one per copy in
        manifest key order; [] when the shards hold no copies."""
        entry = self.data.get("augment")
        if entry is None:
            return []
        url = storage.join(self.base_url, entry["path"])
        raw = _read_listed(url, "augmentation descriptions file", storage_options, retry)
        lines = _checked_text(raw, entry["sha256"], url).splitlines()
        try:
            return [json.loads(line) for line in lines]
        except ValueError as e:
            raise ManifestError(f"{url}: not JSON lines: {e}") from None


def index_cache_dir() -> str:
    """Where remote index files are cached: ``$SPKR_INDEX_CACHE``, else ``$XDG_CACHE_HOME/spkr/index``
    (``~/.cache/spkr/index``)."""
    if os.environ.get("SPKR_INDEX_CACHE"):
        return os.environ["SPKR_INDEX_CACHE"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "spkr", "index")


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_index_bytes(url: str, size: int, sha256: str, want_size: int, want_sha256: str) -> None:
    if size != want_size:
        raise ManifestError(f"{url}: index file has {size} bytes, the manifest says {want_size}")
    if sha256 != want_sha256:
        raise ManifestError(
            f"{url}: sha256 {sha256[:16]}... differs from the manifest's {want_sha256[:16]}...: the index "
            "file was changed or belongs to another shard set"
        )


def index_files(data: dict) -> tuple[dict, dict[str, bytes]]:
    """Split manifest ``data`` with per-sample lists inline (:func:`spkr.shards.writer.build_manifest`,
    version 2) into a version-3 manifest and its index files ({path relative to the shards directory:
    bytes}); see the module docstring."""
    files, splits = {}, {}
    for split, sd in data["splits"].items():
        shards = sd["shards"]
        keys = [list(s["keys"]) for s in shards]
        arrays = {
            "key_ends": np.concatenate(
                [np.zeros(0, np.int64)]
                + [
                    np.cumsum(np.fromiter((len(k.encode()) + 1 for k in ks), np.int64, len(ks))) - 1
                    for ks in keys
                ]
            ),
            "shard_starts": np.cumsum([0] + [len(ks) for ks in keys], dtype=np.int64),
        }
        for field in ("frames", "labels", "offsets"):
            arrays[field] = np.concatenate(
                [np.zeros(0, np.int64)] + [np.asarray(s[field], np.int64) for s in shards]
            )
        arrays["checksums"] = np.concatenate(
            [np.zeros(0, np.uint64)] + [np.asarray(s["checksums"], np.uint64) for s in shards]
        )
        index = {}
        for field, suffix in INDEX_FILES.items():
            path = f"{INDEX_DIR}/{split}.{suffix}"
            if field == "keys":
                payload = "\n".join(k for ks in keys for k in ks).encode()
            else:
                buf = io.BytesIO()
                a = _narrowed(arrays[field])
                np.save(buf, a.astype(a.dtype.newbyteorder("<"), copy=False), allow_pickle=False)
                payload = buf.getvalue()
            files[path] = payload
            index[field] = {
                "path": path,
                "bytes": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
            }
        entries = [{k: v for k, v in s.items() if k not in PER_SAMPLE_FIELDS} for s in shards]
        splits[split] = {**sd, "shards": entries, "index": index}
    return with_digest({**data, "version": VERSION, "splits": splits}), files


def _read_listed(url: str, what: str, storage_options: dict | None, retry) -> bytes:
    """The bytes of a file the manifest lists (index file, trial file, augment.jsonl), read under
    ``retry``; missing or unreadable is a ManifestError naming ``what`` and the URL."""
    try:
        return storage.read_bytes(url, storage_options, retry)
    except FileNotFoundError:
        raise ManifestError(f"{url}: {what} is missing") from None
    except storage.ReadFailed as e:
        raise ManifestError(f"cannot read the {what} {url}: {e}") from e


def _checked_text(raw: bytes, sha256: str, url: str) -> str:
    actual = hashlib.sha256(raw).hexdigest()
    if actual != sha256:
        raise ManifestError(
            f"{url}: sha256 {actual[:16]}... differs from the manifest's {sha256[:16]}...: the file was "
            "changed or belongs to another shard set"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{url}: not UTF-8 text: {e}") from None


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


def sample_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a new sample's key, or None: empty, or holding whitespace (trial lists
    separate keys by it), '.', '/', '\\' or an unprintable character (the manifest refuses those)."""
    if not key:
        return "is empty"
    if not key.isprintable() or _BAD_KEY_CHAR.search(key) or any(c.isspace() for c in key):
        return "holds whitespace, '.', '/', '\\' or an unprintable character"
    return None


def split_name_problem(split) -> str | None:
    """Why ``split`` cannot be a split name (a folder of the shards directory), or None."""
    if not isinstance(split, str):
        return f"is a {type(split).__name__}, not a string"
    if ".." in split or not _SAFE_PART.fullmatch(split):
        return "is not a plain folder name (A-Z a-z 0-9 . _ -, starting with a letter or digit)"
    if split == TRIALS_DIR:
        return f"is reserved ('{TRIALS_DIR}/' holds the trial files)"
    return None


def _list(x, what: str, at: str, n: int | None = None) -> list:
    if type(x) is not list and not isinstance(x, _PACKED):  # packed: a list as parsed
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


def _ints(x, what: str, at: str, n: int | None = None, lo: int = 0, hi: int = INT64_END) -> np.ndarray:
    """A list of ints (not bools) in lo..hi-1, checked without a Python loop per element; returned as
    int64 when hi <= 2**63, else (lo >= 0, hi <= 2**64) as uint64."""
    _list(x, what, at, n)
    arr = None
    if isinstance(x, PackedInts):  # packed while parsing or mapped: ints; checked as int64 / uint64
        if x.array.dtype.kind not in "iu":
            raise ManifestError(f"{at}: {what} are {x.array.dtype} numbers, not integers")
        a, b = (int(x.array.min()), int(x.array.max())) if len(x.array) else (lo, lo)
        if a >= lo and b < hi:
            arr = x.array.astype(np.int64 if hi <= INT64_END else np.uint64, copy=False)
    elif x and set(map(type, x)) != {int}:
        bad = next(v for v in x if type(v) is not int)
        raise ManifestError(f"{at}: {what} holds {_show(bad)} (a {type(bad).__name__}), not integers")
    elif hi > INT64_END:
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
    return arr if arr is not None else np.fromiter(x, np.uint64, len(x))


def _kept(x, arr: np.ndarray) -> PackedInts:
    """The checked numbers as packed: a packed (or mapped) input as it is, else ``arr`` packed."""
    return x if isinstance(x, PackedInts) else PackedInts(arr)


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
    if x and not isinstance(x, PackedStrs) and set(map(type, x)) != {str}:
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
    """ShardInfo.from_dict's checks (see there); labels below ``n_classes`` when given. The
    per-sample fields come out packed (:class:`PackedStrs`, :class:`PackedInts`)."""
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
    if isinstance(keys, PackedStrs):  # packed while parsing or mapped: no key holds a newline
        try:
            joined = bytes(keys.text).decode().replace("\n", "")
        except UnicodeDecodeError as e:
            raise ManifestError(f"{at}: keys are not UTF-8 ({e})") from None
        empty = n and not keys.lengths().all()
    else:
        joined, empty = "".join(keys), "" in keys
    # str.isprintable and `in` scan in C (a regex takes 2.5x as long)
    if not joined.isprintable() or "." in joined or "/" in joined or "\\" in joined or empty:
        bad = next(k for k in keys if not k or not k.isprintable() or _BAD_KEY_CHAR.search(k))
        raise ManifestError(
            f"{at}: sample key {_show(bad)} is empty or holds '.', '/', '\\' or an unprintable character"
        )
    label_end = INT64_END if n_classes is None else max(n_classes, 1)
    packed = {
        "keys": keys if isinstance(keys, PackedStrs) else PackedStrs.pack(keys),
        "frames": _kept(d["frames"], _ints(d["frames"], "frames", at, n)),
        "labels": _kept(d["labels"], _ints(d["labels"], "labels", at, n, hi=label_end)),
    }
    off = _ints(d["offsets"], "offsets", at, n, hi=max(size, 1))
    if n:
        if n > 1 and not (np.diff(off) > 0).all():
            raise ManifestError(f"{at}: offsets are not increasing")
        if (off % 512).any():
            raise ManifestError(f"{at}: offsets are not on 512-byte tar block boundaries")
        if off[-1] >= size:
            raise ManifestError(f"{at}: offset {int(off[-1])} lies beyond the shard's {size} bytes")
    packed["offsets"] = _kept(d["offsets"], off)
    if "checksums" in fields or "checksums" in d:
        sums = d.get("checksums")
        packed["checksums"] = _kept(sums, _ints(sums, "checksums", at, n, hi=2**64))
    return cls(**{k: packed.get(k, d[k]) for k in fields})


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


def _check_protocol(p, split_names: list[str], n_classes: int, where: str) -> dict[str, int]:
    """Check the manifest's ``protocol`` entry (docs/protocols.md) against its splits; return each
    split's label bound: ``len(labels)`` for classification, ``len(speakers)`` for verification."""
    bounds = {s: max(n_classes, 1) for s in split_names}
    if p is None:
        return bounds
    at = f"{where}: protocol"
    _string_keys(p, "protocol", where)
    if p.get("name") not in PROTOCOLS:
        raise ManifestError(f"{at}: name {_show(p.get('name'))} is not one of {list(PROTOCOLS)}")
    splits = p.get("splits")
    _string_keys(splits, "protocol splits", where)
    if sorted(splits) != sorted(split_names):
        raise ManifestError(f"{at}: lists splits {sorted(splits)} but the manifest has {sorted(split_names)}")
    for name, entry in splits.items():
        _string_keys(entry, f"protocol split '{name}'", where)
        kind, role = entry.get("kind"), entry.get("role")
        if kind not in (CLASSIFICATION, VERIFICATION) or role not in ROLES:
            raise ManifestError(
                f"{at}: split '{name}' has kind {_show(kind)} / role {_show(role)} (kinds: {CLASSIFICATION}, "
                f"{VERIFICATION}; roles: {', '.join(ROLES)})"
            )
        if kind == VERIFICATION:
            bounds[name] = max(_check_verification_entry(entry, name, f"{at}: split '{name}'"), 1)
    train = [n for n, e in splits.items() if e["role"] == "train"]
    if len(train) != 1 or splits[train[0]]["kind"] != CLASSIFICATION:
        raise ManifestError(f"{at}: needs exactly one classification split with role train, has {train}")
    return bounds


def _check_verification_entry(entry: dict, name: str, at: str) -> int:
    """A verification split's speakers, enrollment keys and trial file entry; returns len(speakers)."""
    speakers = _strs(entry.get("speakers"), "speakers", at)
    if len(set(speakers)) != len(speakers):
        raise ManifestError(f"{at}: speakers lists a speaker twice")
    _strs(entry.get("enroll_keys"), "enroll_keys", at)
    trials = entry.get("trials")
    _string_keys(trials, "trials", at)
    if trials.get("path") != trials_path(name):
        raise ManifestError(f"{at}: trials path {_show(trials.get('path'))} is not {trials_path(name)!r}")
    if not isinstance(trials.get("sha256"), str) or not _SHA256.fullmatch(trials["sha256"]):
        raise ManifestError(f"{at}: trials sha256 {_show(trials.get('sha256'))} is not 64 hex digits")
    for count in ("count", "target", "nontarget"):
        _count(trials.get(count), f"trials {count}", at)
    return len(speakers)


def _check_digest(d: dict, where: str) -> None:
    """Every field of manifest ``d`` (as read) has the sha256 its ``digest`` lists; else ManifestError
    naming the field. Without a digest: a manifest written before it, whose fields are not checked
    but must be ones such a manifest holds (:data:`PRE_DIGEST_FIELDS`)."""
    if DIGEST not in d:
        unknown = sorted(set(d) - PRE_DIGEST_FIELDS)
        if unknown:
            raise ManifestError(
                f"{where}: field(s) {unknown} in a manifest without its {DIGEST!r}: the manifest was "
                f"edited; {_REMAKE}"
            )
        return
    listed = d[DIGEST]
    _string_keys(listed, DIGEST, where)
    for field, sha in listed.items():
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ManifestError(f"{where}: digest of {field!r} is {_show(sha)}, not 64 hex digits")
    fields = sorted(set(d) - {DIGEST})
    extra, gone = sorted(set(fields) - set(listed)), sorted(set(listed) - set(fields))
    if extra or gone:
        problem = (
            f"field(s) {extra} are not under its digest"
            if extra
            else f"field(s) {gone} of its digest are missing"
        )
        raise ManifestError(f"{where}: {problem}: the manifest was edited; {_REMAKE}")
    try:
        actual = manifest_digest(d)
    except (ValueError, RecursionError) as e:  # NaN or infinity, or nesting too deep, in a free-form field
        raise ManifestError(f"{where}: a field cannot be digested ({type(e).__name__}: {e})") from None
    for field in fields:
        if actual[field] != listed[field]:
            raise ManifestError(
                f"{where}: {field!r} does not match the manifest's digest (sha256 {actual[field][:16]}..., "
                f"listed {listed[field][:16]}...): the manifest was edited by hand or assembled from "
                f"another shard set; {_REMAKE}"
            )


def _check_augment_entry(a, where: str) -> None:
    """The ``augment`` entry: where the copies' descriptions are, their digest and count."""
    if a is None:
        return
    at = f"{where}: augment"
    _string_keys(a, "augment", where)
    if a.get("path") != AUGMENT_NAME:
        raise ManifestError(f"{at}: path {_show(a.get('path'))} is not {AUGMENT_NAME!r}")
    if not isinstance(a.get("sha256"), str) or not _SHA256.fullmatch(a["sha256"]):
        raise ManifestError(f"{at}: sha256 {_show(a.get('sha256'))} is not 64 hex digits")
    _count(a.get("count"), "count", at)
    _count(a.get("copies"), "copies", at, lo=1)

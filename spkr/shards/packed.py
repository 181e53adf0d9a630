"""Packed per-sample sequences: a loaded manifest's keys and numbers held in numpy arrays (one array
per field, no Python object per sample), parsed straight into them or mapped from index files.

:class:`PackedInts` and :class:`PackedStrs` equal the lists they stand for and pickle as one array,
or, when mapped from an index file, as where to map it again (:func:`map_file`: each file mapped
once per process, at most :data:`MAPPED_MAX` kept open).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from spkr.shards.schema import PER_SAMPLE_FIELDS, ManifestError


def narrowed(a: np.ndarray) -> np.ndarray:
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
        self.array, self.source = narrowed(array), None

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
            return remap_ints, self.source
        return type(self), (np.ascontiguousarray(self.array),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tolist()})"


class PackedStrs(Sequence):
    """A read-only sequence of strings without a newline held as one UTF-8 buffer (``text``: the
    strings joined by ``\\n``) and the int64 end of each in it (``ends``): a loaded manifest's keys.
    An item is decoded when asked for; otherwise as :class:`PackedInts`."""

    __slots__ = ("text", "ends", "source")

    def __init__(self, text: bytes, ends: np.ndarray):
        self.text, self.ends, self.source = text, narrowed(ends), None

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
            return remap_strs, self.source
        return type(self), (bytes(self.text), np.ascontiguousarray(self.ends))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tolist()})"


PACKED = (PackedInts, PackedStrs)
_MAPPED: dict[tuple, np.ndarray] = {}  # (path, device, inode, mtime, size) -> this process's map of it
# Maps the cache keeps (oldest dropped first; arrays still in use keep their own map): one open file
# each, so a process that loads many shard sets does not run out of file descriptors.
MAPPED_MAX = 256


def map_file(path: str, size: int) -> np.ndarray:
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


def remap_ints(path: str, size: int, start: int, stop: int) -> PackedInts:
    return PackedInts.mapped(map_file(path, size)[start:stop], (path, size, start, stop))


def remap_strs(tpath, tsize, tstart, tstop, epath, esize, estart, estop) -> PackedStrs:
    text = map_file(tpath, tsize)[tstart:tstop]
    ends = map_file(epath, esize)[estart:estop]
    return PackedStrs.mapped(text, ends, (tpath, tsize, tstart, tstop, epath, esize, estart, estop))


def pack_shard_entry(d: dict) -> dict:
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


def plain(value):
    """``value`` with a packed sequence as a list (what the JSON holds); json.dumps' ``default``."""
    if isinstance(value, PACKED):
        return value.tolist()
    return value

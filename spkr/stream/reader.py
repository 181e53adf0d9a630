"""Reading spkr shards: local paths or fsspec URLs, byte ranges, retries, safe member decoding.

A reader reads, per shard, only a contiguous sample range ``[a, b)``: the single byte range
``[offsets[a], offsets[b])`` (or to the shard's end), fetched sequentially in chunks (remote
chunks are fetched one ahead by a helper thread) and parsed here, 512-byte tar blocks at a time.

Safety: a sample's members must be exactly ``<key>.cls`` (ASCII int, at most 18 digits),
``<key>.json`` (a UTF-8 JSON object, at most 64 KiB, nested at most 32 deep) and ``<key>.mel.npy``
(parsed with ``allow_pickle=False`` semantics: little-endian float16/float32 only, 2-D, ``n_mels``
columns, C or Fortran order, exact size). Anything else — ``.pth``, ``.pkl``, ``.pickle`` or any other
extension, links, directories, pax/GNU headers — is refused with :class:`ShardError` and never
deserialised. Shard names that could reach outside ``base`` are refused (:meth:`ShardReader.url`).

Retries: every shard byte comes through one fetch loop (``spkr.storage.fill``, under
the ``spkr.storage.RetryPolicy`` that also reads ``manifest.json`` and the sidecars). A transient
error (dropped or refused connection, timeout, HTTP 5xx/429, short response) closes the source,
waits ``backoff * 2**(k-1)`` seconds (k-th retry in a row, at most 10 s) and reopens at the exact byte
reached: a remote shard is streamed (one HTTP/S3 range request per byte range) and the bytes that
arrived before a break are kept, so nothing is fetched twice and no sample is lost or repeated.
``retries`` bounds the CONSECUTIVE failures WITHOUT PROGRESS: any byte received resets it, so a long
read over a link that breaks every few MB completes. After the budget a :class:`ShardError` names
the shard, the byte offset and the URL; not found / access denied fail at once.

Integrity: every sample's whole byte span is checked against the manifest's per-sample checksum
(xxh3-64, ~7 GB/s) before anything in it is parsed, on every read, in both read paths (mmap and
streaming) and so in every layout (any world size, worker count, local or remote); ``checksums=False``
turns it off (benchmarks only). Corruption (truncated shard, checksum mismatch, bad header, unknown
member, bad npy header, key/label/frames not matching the manifest) raises :class:`ShardError` naming
the shard, the sample key or member, and the byte offset. With ``on_error="skip"`` the sample is
skipped instead (the reader goes on at the next sample's manifest offset), counted in
``reader.stats.skipped`` as ``{"shard", "key", "error"}``.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import re
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from spkr import storage
from spkr.manifest import MEMBER_EXTS, ShardInfo, sample_checksum, shard_name_problem
from spkr.stream import sources

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)  # a tar end-of-archive block
DEFAULT_CHUNK = 4 << 20
FAULT_AROUND = 128 << 10  # >= the kernel's fault_around_bytes (64 kB default): see release_sample
RELEASE_BYTES = 8 << 20  # released sample bytes per unmapping sweep (random-access reads)
PICKLE_EXTS = ("pth", "pt", "pkl", "pickle", "ckpt", "bin", "npz")


class ShardError(RuntimeError):
    """A shard that cannot be read: corrupt, truncated, unsafe, or unreachable."""

    def __init__(self, shard: str, message: str, member: str | None = None, offset: int | None = None):
        self.shard, self.member, self.offset, self.reason = shard, member, offset, message
        where = (
            shard + (f" [{member}]" if member else "") + (f" at byte {offset}" if offset is not None else "")
        )
        super().__init__(f"{where}: {message}")


class Record(NamedTuple):
    index: int  # sample index within the shard
    key: str
    label: int
    meta: dict
    feats: np.ndarray  # (frames, n_mels), on-disk dtype (float16), read-only view


@dataclass
class ReadStats:
    retries: int = 0
    bytes: int = 0
    skipped: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- member decoding


def split_member(name: str) -> tuple[str, str]:
    """'19-198-0001.mel.npy' -> ('19-198-0001', 'mel.npy')."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


def check_member_name(name: str, shard: str, offset: int | None = None) -> tuple[str, str]:
    """(key, ext) of an allowed member name, else ShardError (the name shown escaped when it holds
    control or undecodable characters, so that it cannot forge log lines)."""
    key, ext = split_member(name)
    if "/" in name or ext not in MEMBER_EXTS:
        low = ext.lower().rsplit(".", 1)[-1]
        why = "pickle-based formats are never deserialised" if low in PICKLE_EXTS else "unknown member type"
        shown = name if name.isprintable() else repr(name)[1:-1]
        raise ShardError(
            shard,
            f"refusing member '{shown}' ({why}; spkr decodes only .cls, .json and .mel.npy)",
            member=shown,
            offset=offset,
        )
    return key, ext


# .mel.npy dtypes: little-endian float16 / float32 only (what the writer stores). Anything else -- big
# endian, float64/float128, '<e2' (which np.dtype cannot even parse) -- is refused as a ShardError here
# rather than failing later (a TypeError, or a crash in collate).
NPY_DTYPES = (np.dtype("<f2"), np.dtype("<f4"))
_NPY_FAST = re.compile(
    rb"\{'descr': '(<f[24])', 'fortran_order': (False|True), 'shape': \((\d{1,18}), (\d{1,18})\), \} *\n"
)
_DTYPES: dict[bytes, np.dtype] = {b"<f2": NPY_DTYPES[0], b"<f4": NPY_DTYPES[1]}


def _npy_header(mv: memoryview):
    """(shape, fortran, dtype, data offset) of np.save's usual header (an allowed dtype, 2-D) via a
    regex, else None: numpy's safe parser then reads it, and decode_npy refuses what is not allowed."""
    if len(mv) >= 10 and bytes(mv[:8]) == b"\x93NUMPY\x01\x00":
        hlen = int.from_bytes(mv[8:10], "little")
        m = _NPY_FAST.fullmatch(bytes(mv[10 : 10 + hlen]))
        if m:
            dt = _DTYPES[m.group(1)]
            return (int(m.group(3)), int(m.group(4))), m.group(2) == b"True", dt, 10 + hlen
    return None


def decode_npy(payload, *, shard: str = "?", member: str = "?", n_mels: int | None = None) -> np.ndarray:
    """A ``.npy`` payload -> array view, without ever unpickling (object dtypes are refused)."""
    mv = memoryview(payload)
    fast = _npy_header(mv)
    if fast is not None:
        shape, fortran, dtype, off = fast
        if n_mels is None or shape[1] == n_mels:
            count = shape[0] * shape[1]
            if len(mv) - off == count * dtype.itemsize:
                arr = np.frombuffer(mv, dtype=dtype, count=count, offset=off)
                return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    try:
        if bytes(mv[:6]) != b"\x93NUMPY" or len(mv) < 10:
            raise ValueError("no .npy magic")
        major = mv[6]
        if major == 1:
            hlen, hstart = int.from_bytes(mv[8:10], "little"), 10
        elif major in (2, 3):
            hlen, hstart = int.from_bytes(mv[8:12], "little"), 12
        else:
            raise ValueError(f"unsupported .npy version {major}")
        f = io.BytesIO(bytes(mv[: hstart + hlen]))
        np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
    except Exception as e:
        raise ShardError(shard, f"bad .npy header: {e}", member=member) from None
    if dtype.hasobject or dtype not in NPY_DTYPES:
        raise ShardError(
            shard, f"refusing .npy of dtype {dtype} (little-endian float16/float32 only)", member=member
        )
    if len(shape) != 2 or (n_mels is not None and shape[1] != n_mels):
        raise ShardError(shard, f".npy shape {shape}, expected (frames, {n_mels})", member=member)
    count = int(shape[0]) * int(shape[1])
    if len(mv) - hstart - hlen != count * dtype.itemsize:
        raise ShardError(
            shard, f".npy holds {len(mv) - hstart - hlen} data bytes for shape {shape}", member=member
        )
    arr = np.frombuffer(mv, dtype=dtype, count=count, offset=hstart + hlen)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


MAX_CLS_BYTES = 32
MAX_JSON_BYTES = 64 << 10
MAX_JSON_DEPTH = 32
_CLS = re.compile(rb"\s*(\d{1,18})\s*")


def _json_depth_exceeds(obj, limit: int) -> bool:
    """Whether containers nest deeper than ``limit`` (the top level is depth 1); no recursion."""
    todo = [(obj, 1)] if isinstance(obj, (dict, list)) else []
    while todo:
        o, depth = todo.pop()
        children = o.values() if isinstance(o, dict) else o
        if depth > limit:
            return True
        todo.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def decode_member(ext: str, payload, *, shard: str = "?", member: str = "?", n_mels: int | None = None):
    """Decode one allowed member; anything else is refused (never deserialised). ``.cls``: an ASCII
    integer (at most 18 digits, in at most MAX_CLS_BYTES); ``.json``: a UTF-8 JSON object of at most
    MAX_JSON_BYTES nested at most MAX_JSON_DEPTH deep; ``.mel.npy``: see :func:`decode_npy`. Every
    problem is a ShardError naming shard and member (so ``on_error="skip"`` can skip it)."""
    if ext == "cls":
        m = _CLS.fullmatch(bytes(payload)) if len(payload) <= MAX_CLS_BYTES else None
        if m is None:
            raise ShardError(
                shard,
                f"bad .cls payload (expected an ASCII integer of at most 18 digits; got {len(payload)} bytes)",
                member=member,
            )
        return int(m.group(1))
    if ext == "json":
        if len(payload) > MAX_JSON_BYTES:
            raise ShardError(
                shard, f"bad .json payload: {len(payload)} bytes (at most {MAX_JSON_BYTES})", member=member
            )
        raw = bytes(payload)
        try:
            meta = json.loads(raw.decode("utf-8"))
            # at most MAX_JSON_DEPTH brackets cannot nest deeper; only then is the parsed object walked
            deep = raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and _json_depth_exceeds(
                meta, MAX_JSON_DEPTH
            )
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of > 4300 digits
            raise ShardError(shard, f"bad .json payload: {e}", member=member) from None
        except RecursionError:
            deep = True
        if deep:
            raise ShardError(
                shard, f"bad .json payload: nested deeper than {MAX_JSON_DEPTH} levels", member=member
            )
        if not isinstance(meta, dict):
            raise ShardError(
                shard, f"bad .json payload: a {type(meta).__name__}, not an object", member=member
            )
        return meta
    if ext == "mel.npy":
        return decode_npy(payload, shard=shard, member=member, n_mels=n_mels)
    check_member_name(member, shard)
    raise ShardError(shard, f"refusing member type '{ext}'", member=member)


# --------------------------------------------------------------------------- byte sources
# _LocalSource, _FsspecSource, _FileSource live in spkr.stream.sources; the fetch loop is storage.fill.


class _Stream:
    """Sequential reader over the byte range [start, end) of one shard, chunked, with retries and
    (for remote sources) one chunk of read-ahead. Given ``mapped`` (a view of the whole local file,
    see ``ShardReader._shard_map``) it hands out views of the page cache itself instead."""

    def __init__(
        self,
        reader: ShardReader,
        shard: ShardInfo,
        start: int,
        end: int,
        readahead: bool,
        mapped: memoryview | None = None,
    ):
        self.reader, self.shard = reader, shard
        self.pos, self.end = start, end  # pos: next byte handed out
        self.buf, self.buf_pos = memoryview(b""), start
        self.fetch_pos = start  # next byte to fetch
        self.pool = reader._pool if readahead else None
        self.pending = None
        self.mapped = mapped
        if mapped is not None:  # a file shorter than the manifest says ends early: the parser reports it
            self.end = min(end, len(mapped))

    def _fill(self, mv: memoryview) -> int:
        """Fill ``mv`` with the bytes from ``fetch_pos`` on (fewer only at the end of the file)."""
        pos, done = self.fetch_pos, 0
        if self.pending is not None:
            fut, fpos = self.pending
            self.pending = None
            if fpos == pos:
                data = fut.result()
                done = min(len(data), len(mv))
                mv[:done] = data[:done]
                if done < len(data):  # more than needed (cannot happen: chunks are sized to need)
                    done = len(mv)
        if done < len(mv):
            done += self.reader._fetch_into(self.shard, pos + done, mv[done:], self.end)
        self.fetch_pos = pos + done
        if self.pool is not None and done == len(mv) and self.fetch_pos < self.end:
            nxt = min(self.reader.chunk_size, self.end - self.fetch_pos)
            self.pending = (
                self.pool.submit(self.reader._fetch, self.shard, self.fetch_pos, nxt, self.end),
                self.fetch_pos,
            )
        return done

    def take(self, n: int) -> memoryview:
        """The next n bytes (fewer only at the end of the data), as a writable view (of the privately
        mapped file, or of a buffer)."""
        if self.mapped is not None:
            a = self.pos
            self.pos = min(self.end, a + n)
            self.reader.stats.bytes += self.pos - a
            return self.mapped[a : self.pos]
        off = self.pos - self.buf_pos
        if off + n <= len(self.buf):
            self.pos += n
            return self.buf[off : off + n]
        tail = self.buf[off:]
        want = max(0, min(max(n - len(tail), self.reader.chunk_size), self.end - self.fetch_pos))
        new = bytearray(len(tail) + want)
        new[: len(tail)] = tail
        got = len(tail) + (self._fill(memoryview(new)[len(tail) :]) if want else 0)
        self.buf_pos = self.pos
        self.buf = memoryview(new)[:got]
        got = min(n, got)
        self.pos += got
        return self.buf[:got]

    def seek(self, pos: int) -> None:
        """Jump forward to ``pos`` (skip mode); drops buffered bytes."""
        if self.mapped is not None:
            self.pos = min(pos, self.end)
            return
        if self.buf_pos <= pos <= self.buf_pos + len(self.buf):
            self.pos = pos
            return
        self.pending = None
        self.pos = self.buf_pos = self.fetch_pos = pos
        self.buf = memoryview(b"")


# --------------------------------------------------------------------------- the reader


class ShardReader:
    """Reads samples from the shards under ``base`` (a directory or URL prefix)."""

    def __init__(
        self,
        base: str,
        storage_options: dict | None = None,
        *,
        n_mels: int | None = None,
        retries: int = 5,
        backoff: float = 0.2,
        chunk_size: int = DEFAULT_CHUNK,
        readahead: bool | None = None,
        cache_dir: str | None = None,
        checksums: bool = True,
        on_error: str = "fail",
        sleep: Callable[[float], None] = time.sleep,
        use_mmap: bool = True,
    ):
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        self.base, self.storage_options = str(base), storage_options
        self.n_mels, self.retries, self.backoff = n_mels, int(retries), float(backoff)
        self.chunk_size, self.cache_dir = int(chunk_size), cache_dir
        self.checksums, self.on_error, self.sleep = bool(checksums), on_error, sleep
        self.use_mmap = use_mmap  # local shards: views of the page cache instead of buffered reads
        self.remote = storage.is_url(self.base)
        self.readahead = self.remote if readahead is None else readahead
        self.stats = ReadStats()
        self._fs = None
        self._pid = None
        self._open: tuple[str, object] | None = None
        self._pool_obj = None
        self._maps: dict[str, tuple[mmap.mmap | None, memoryview]] = {}  # random access mappings
        self._released: dict[str, tuple[int, int]] = {}  # shard -> byte span released, not yet unmapped
        self._released_bytes = 0
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- sources
    def __getstate__(self):
        d = self.__dict__.copy()
        d.update(_fs=None, _pid=None, _open=None, _pool_obj=None, _lock=None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    @property
    def _pool(self):
        if self._pool_obj is None or self._pid != os.getpid():
            self._pool_obj = ThreadPoolExecutor(1, thread_name_prefix="spkr-readahead")
        return self._pool_obj

    def url(self, shard: ShardInfo | str) -> str:
        """The shard's path or URL under ``base``. A name that could reach outside it (absolute, '..',
        a URL scheme, under s3://bucket-a/p a '/bucket-b/...' name, ...: see
        :func:`spkr.manifest.shard_name_problem`) is refused, even for a ShardInfo made by hand."""
        name = shard if isinstance(shard, str) else shard.name
        problem = shard_name_problem(name)
        if problem:
            shown = name if isinstance(name, str) and name.isprintable() else repr(name)
            raise ShardError(shown, f"refusing shard name {name!r}: it {problem}")
        return storage.join(self.base, name)

    def _filesystem(self):
        if self._fs is None or self._pid != os.getpid():
            self._pid, self._open = os.getpid(), None
            self._pool_obj = None
            if not self.remote:
                self._fs = "local"
            elif self.cache_dir:
                import fsspec

                protocol = self.base.split("://", 1)[0]
                opts = storage.storage_options_from_env(self.storage_options)
                self._fs = fsspec.filesystem(
                    "filecache", target_protocol=protocol, target_options=opts, cache_storage=self.cache_dir
                )
            else:
                self._fs = storage.get_fs(self.base, self.storage_options)[0]
        return self._fs

    def _source(self, shard: ShardInfo):
        """The shard's open source (spkr.stream.sources), opened when needed (no request yet for a
        remote one). Called by the fetch loop with ``self._lock`` held."""
        fs = self._filesystem()
        if self._open is not None and self._open[0] == shard.name:
            return self._open[1]
        self._drop_source()
        src = sources.open_source(fs, self.url(shard), shard.bytes, cached=bool(self.cache_dir))
        self._open = (shard.name, src)
        return src

    def _drop_source(self):
        if self._open is not None:
            try:
                self._open[1].close()
            except Exception:
                pass
            self._open = None

    def _close_open(self):
        """Close the open source (after a fetch in progress, e.g. the read-ahead's, has finished)."""
        with self._lock:
            self._drop_source()

    def close(self):
        self._close_open()
        self._maps.clear()
        self._released.clear()

    def _fetch(self, shard: ShardInfo, pos: int, n: int, end: int | None = None) -> memoryview:
        """Bytes [pos, pos+n) of the shard (fewer only at its end), through :meth:`_fetch_into`."""
        buf = bytearray(n)
        return memoryview(buf)[: self._fetch_into(shard, pos, memoryview(buf), end)]

    def _fetch_into(self, shard: ShardInfo, pos: int, mv: memoryview, end: int | None = None) -> int:
        """Fill ``mv`` with the shard's bytes from ``pos`` on (fewer only at the end of the file),
        reading on towards ``end``: every shard byte comes through here, i.e. through the one fetch
        loop :func:`spkr.storage.fill` under this reader's retry policy (``retries``
        consecutive failures without progress, ``backoff``; see the module docstring). One fetch at a
        time per reader: the read-ahead thread and the parser share the open source."""
        url = self.url(shard)
        policy = storage.RetryPolicy(self.retries, self.backoff, sleep=self.sleep)
        try:
            with self._lock:
                return storage.fill(
                    lambda: self._source(shard),
                    pos,
                    mv,
                    policy,
                    url=url,
                    end=end,
                    drop=self._drop_source,
                    stats=self.stats,
                )
        except FileNotFoundError:
            raise ShardError(shard.name, f"shard not found ({url})") from None
        except PermissionError as e:
            raise ShardError(shard.name, f"access denied ({url}): {e}") from e
        except storage.ReadFailed as e:
            raise ShardError(shard.name, f"{e.reason} ({url})", offset=e.offset) from e

    # ---------------------------------------------------------------- random access (local shards)
    @property
    def random_access(self) -> bool:
        """Local shards through mmap: :meth:`read_sample` parses any sample in place, in any order, and
        :meth:`iter_range` hands out views of the page cache instead of buffered copies."""
        return self.use_mmap and not self.remote

    def _shard_map(self, shard: ShardInfo) -> tuple[mmap.mmap | None, memoryview]:
        got = self._maps.get(shard.name)
        if got is None:
            path = self.url(shard)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise ShardError(shard.name, f"shard not found ({path})") from None
            try:  # private (copy-on-write) mapping: writable views that never change the file
                size = os.fstat(fd).st_size
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if size else None
            finally:
                os.close(fd)
            got = self._maps[shard.name] = (mm, memoryview(mm) if mm is not None else memoryview(b""))
        return got

    def _sample_end(self, shard: ShardInfo, i: int) -> int:
        return shard.offsets[i + 1] if i + 1 < shard.num_samples else shard.bytes

    def read_sample(self, shard: ShardInfo, i: int) -> Record:
        """Sample ``i`` of a local shard, parsed and checked in place: its arrays are views of the
        mapped file (valid as long as they are referenced). A file shorter than the manifest says is
        reported by the parser as truncated. See :meth:`release_sample`."""
        if not 0 <= i < shard.num_samples:
            raise ValueError(f"{shard.name}: sample {i} outside 0..{shard.num_samples}")
        _, view = self._shard_map(shard)
        start, end = shard.offsets[i], self._sample_end(shard, i)
        return self._parse_sample(_Stream(self, shard, start, end, False, mapped=view), shard, i)

    def release_sample(self, shard: ShardInfo, i: int) -> None:
        """Sample ``i`` is done with: its pages may leave this process. Released ranges are unmapped
        (``MADV_DONTNEED``: they stay in the page cache; a view still in use faults them back in) in
        sweeps of ~RELEASE_BYTES, one call per shard covering its released span plus a margin for the
        pages the kernel mapped around its faults (fault-around, 64 kB by default). Resident memory
        stays at about RELEASE_BYTES, however many shards are open; a madvise per sample costs more
        than parsing it."""
        a, b = shard.offsets[i], self._sample_end(shard, i)
        lo, hi = self._released.get(shard.name, (a, b))
        self._released[shard.name] = (min(lo, a), max(hi, b))
        self._released_bytes += b - a
        if self._released_bytes >= RELEASE_BYTES:
            self._sweep()

    def _sweep(self) -> None:
        for name, (lo, hi) in self._released.items():
            mm = self._maps.get(name, (None, None))[0]
            if mm is None or not hasattr(mm, "madvise"):
                continue
            a = max(0, lo - FAULT_AROUND)
            a -= a % mmap.PAGESIZE
            b = min(len(mm), hi + FAULT_AROUND)
            if b > a:
                mm.madvise(mmap.MADV_DONTNEED, a, b - a)
        self._released.clear()
        self._released_bytes = 0

    def close_shard(self, shard: ShardInfo) -> None:
        """Forget a shard's mapping (unmapped once no view of it is left)."""
        self._maps.pop(shard.name, None)
        self._released.pop(shard.name, None)

    # ---------------------------------------------------------------- samples
    def read_shard(self, shard: ShardInfo) -> list[Record]:
        """Every sample of the shard."""
        return list(self.iter_range(shard, 0, shard.num_samples))

    def iter_range(self, shard: ShardInfo, start: int = 0, stop: int | None = None) -> Iterator[Record]:
        """Samples ``start..stop-1`` of the shard, reading one byte range."""
        stop = shard.num_samples if stop is None else stop
        if not 0 <= start <= stop <= shard.num_samples:
            raise ValueError(f"{shard.name}: range [{start}, {stop}) outside 0..{shard.num_samples}")
        if start == stop:
            return
        end = shard.offsets[stop] if stop < shard.num_samples else shard.bytes
        mapped = self._shard_map(shard)[1] if self.random_access else None
        stream = _Stream(self, shard, shard.offsets[start], end, self.readahead, mapped=mapped)
        try:
            i = start
            while i < stop:
                try:
                    yield self._parse_sample(stream, shard, i)
                except ShardError as e:
                    if self.on_error != "skip":
                        raise
                    self._skip(shard, i, e)
                    if i + 1 < stop:
                        stream.seek(shard.offsets[i + 1])
                i += 1
        finally:
            if mapped is not None:
                self.close_shard(shard)  # the records' views keep the mapping as long as they need it

    def _skip(self, shard: ShardInfo, i: int, err: ShardError) -> None:
        self.stats.skipped.append({"shard": shard.name, "key": shard.keys[i], "error": str(err)})

    def _parse_sample(self, stream: _Stream, shard: ShardInfo, i: int) -> Record:
        """Take sample ``i``'s whole byte span from the stream, check its length and checksum, then
        parse its three members from the span (views: no copy)."""
        key, start = shard.keys[i], shard.offsets[i]
        n = self._sample_end(shard, i) - start
        span = stream.take(n)
        if len(span) < n:
            raise ShardError(
                shard.name,
                f"truncated shard: sample needs {n} bytes, the file ends after {len(span)}",
                key,
                start,
            )
        if self.checksums and sample_checksum(span) != shard.checksums[i]:
            raise ShardError(
                shard.name,
                f"checksum mismatch: the {n} bytes of sample {key} are not what was written (corrupt shard)",
                key,
                start,
            )
        values, pos = {}, 0
        for ext in MEMBER_EXTS:
            expected, hpos = f"{key}.{ext}", start + pos
            hdr = span[pos : pos + BLOCK]
            if len(hdr) < BLOCK:
                raise ShardError(
                    shard.name, "truncated sample: its span ends inside a header", expected, hpos
                )
            if hdr[0] == 0 and bytes(hdr) == _ZERO_BLOCK:
                raise ShardError(shard.name, "unexpected end of archive", expected, hpos)
            name, size, typeflag = _parse_header(hdr, shard.name, expected, hpos)
            if typeflag not in (b"0", b"\0"):
                raise ShardError(
                    shard.name,
                    f"refusing member '{name}' of tar type {typeflag!r} (regular files only)",
                    name,
                    hpos,
                )
            if name != expected:
                check_member_name(name, shard.name, hpos)  # a refused type is reported as such
                raise ShardError(
                    shard.name, f"found member '{name}' where the manifest expects '{expected}'", name, hpos
                )
            pos += BLOCK
            payload = span[pos : pos + size]
            if len(payload) < size:
                raise ShardError(
                    shard.name, f"truncated sample: member needs {size} bytes, its span ends", name, hpos
                )
            pos += size + (-size % BLOCK)
            values[ext] = decode_member(ext, payload, shard=shard.name, member=name, n_mels=self.n_mels)
        feats = values["mel.npy"]
        if values["cls"] != shard.labels[i]:
            raise ShardError(
                shard.name, f"label {values['cls']} but manifest says {shard.labels[i]}", f"{key}.cls"
            )
        if feats.shape[0] != shard.frames[i]:
            raise ShardError(
                shard.name, f"{feats.shape[0]} frames but manifest says {shard.frames[i]}", f"{key}.mel.npy"
            )
        return Record(i, key, values["cls"], values["json"], feats)


def byte_sum(raw: bytes) -> int:
    """sum(raw) for up to 513 bytes (a tar header block), ~10x faster than Python's sum() of bytes.

    The sum is at most 513 * 255 < 65521 * 2: Adler-32's low half gives it modulo 65521 (a prime),
    which leaves two candidates, and they differ modulo 255 (65521 % 255 = 241), which the big-endian
    integer of the bytes gives (256 = 1 mod 255, so that integer = its digit sum mod 255)."""
    if len(raw) > 513:
        return sum(raw)
    s = (zlib.adler32(raw) & 0xFFFF) - 1
    s %= 65521
    return s if (s - int.from_bytes(raw, "big")) % 255 == 0 else s + 65521


def _parse_header(hdr: memoryview, shard: str, expected: str, hpos: int) -> tuple[str, int, bytes]:
    """(name, size, typeflag) of a ustar/v7 header block, checksum verified."""
    raw = bytes(hdr)
    try:
        chk = int(raw[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        chk = -1
    if chk != byte_sum(raw) - sum(raw[148:156]) + 8 * 32:
        raise ShardError(shard, "bad tar header (checksum mismatch)", expected, hpos)
    if raw[124] & 0x80:
        size = tarfile.nti(raw[124:136])
    else:
        size = int(raw[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    name = raw[0:100].split(b"\0", 1)[0]
    if raw[257:262] == b"ustar" and raw[345] != 0:
        name = raw[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, raw[156:157]


# --------------------------------------------------------------------------- webdataset


def _fsspec_gopen(storage_options: dict | None):
    def gopen(url, mode="rb", bufsize=8192, **kw):
        fs, path = storage.get_fs(url, storage_options)
        return fs.open(path, mode)

    return gopen


FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "r2")


def register_webdataset_fsspec(storage_options: dict | None = None, schemes=FSSPEC_SCHEMES) -> None:
    """Let ``webdataset.WebDataset("s3://...")`` (and gs://, az://, ...) open shards through fsspec
    (webdataset 1.0.2 has no s3 scheme and shells out to gsutil for gs). ``storage_options`` (or
    ``SPKR_STORAGE_OPTIONS``) configure endpoint/credentials."""
    import importlib

    module = importlib.import_module("webdataset.gopen")
    opener = _fsspec_gopen(storage_options)
    for scheme in schemes:
        module.gopen_schemes[scheme] = opener


__all__ = [
    "ShardError",
    "ShardReader",
    "Record",
    "ReadStats",
    "decode_member",
    "decode_npy",
    "check_member_name",
    "register_webdataset_fsspec",
]

"""Byte sources of shards, THE retrying fetch of shard bytes, and the sequential byte-range buffer.

Contract of a source (one shard, opened by :func:`open_source`):

- ``size``: the shard's length in bytes (None while unknown);
- ``read_into(pos, mv) -> int``: copy the shard's bytes from ``pos`` into ``mv``, return how many:
  at least 1 before the end, 0 at it, possibly fewer than ``len(mv)`` (the caller asks again). A
  failure raises; bytes returned before it are final and never fetched again;
- ``expect(end)`` (optional): the caller reads on sequentially up to byte ``end``;
- ``close()``: drop any open connection (the source stays usable).

Sources: :class:`_LocalSource` (``pread`` on a local file), :class:`_FsspecSource` (a remote
shard streamed through fsspec, see :class:`spkr.storage.RemoteFile`: one ranged GET kept open while
the reads follow each other, every byte that arrived before a dropped connection kept) and
:class:`_FileSource` (a seekable file object: fsspec's ``filecache`` copy with ``cache_dir``, whose
download restarts from byte 0 if it breaks).

:meth:`ShardFetcher.fetch_into` is the one way shard bytes are fetched: through
:func:`spkr.storage.fill`, the one retrying read loop (the same policy and loop that read
``manifest.json`` and the sidecars): a transient failure closes the source and resumes at the exact
byte reached; the budget counts consecutive failures without progress; after it,
:class:`spkr.storage.ReadFailed` becomes a ``ShardError`` naming the shard, the offset and the URL;
not found / access denied fail at once. Shard names that could reach outside ``base`` are refused
(:meth:`ShardFetcher.url`). :class:`ByteRange` hands out one shard's byte range ``[start, end)``
sequentially: buffered chunks fetched through the fetcher (one chunk ahead on a helper thread for
remote shards), or views of a mapped local file.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from spkr import storage
from spkr.shards.codec import ShardError
from spkr.shards.format import ShardInfo
from spkr.shards.schema import shard_name_problem

DEFAULT_CHUNK = 4 << 20


class _LocalSource:
    """A local shard file, read with ``pread``."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def read_into(self, pos: int, mv: memoryview) -> int:
        return os.preadv(self.fd, [mv], pos)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _FsspecSource(storage.RemoteFile):
    """A remote shard (HTTP Range / S3 GetObject Range, streamed; other fsspec backends piecewise)."""


class _FileSource:
    """A seekable file object (e.g. fsspec filecache's local copy)."""

    def __init__(self, f):
        self.f = f
        self.size = f.seek(0, os.SEEK_END)

    def read_into(self, pos: int, mv: memoryview) -> int:
        self.f.seek(pos)
        return self.f.readinto(mv)

    def close(self):
        self.f.close()


def open_source(
    fs,
    url: str,
    size: int | None,
    *,
    cached: bool = False,
    timeout: float | None = storage.RetryPolicy.timeout,
):
    """The source for the shard at ``url`` on ``fs`` ("local" for a local path); ``size`` from the
    manifest (None: learnt from the first response); ``timeout``: seconds without a byte after which a
    remote response counts as failed. Opening a remote source costs no request. Raises
    FileNotFoundError for a missing local or cached shard."""
    if fs == "local":
        return _LocalSource(url)
    if cached:
        path = url if "://" not in url else url.split("://", 1)[1]
        return _FileSource(fs.open(path, "rb"))
    return _FsspecSource(fs, fs._strip_protocol(url), size, timeout=timeout)


@dataclass
class ReadStats:
    """What a reader did: transient errors recovered, bytes read, samples skipped (``on_error="skip"``,
    each ``{"shard", "key", "error"}``)."""

    retries: int = 0
    bytes: int = 0
    skipped: list[dict] = field(default_factory=list)


class ShardFetcher:
    """Fetches byte ranges of the shards under ``base`` (a directory or URL prefix), one open source at
    a time, under one retry policy (``retries`` consecutive failures without progress, ``backoff``).
    Picklable: a DataLoader worker reopens its filesystem, source and thread pool."""

    def __init__(
        self,
        base: str,
        storage_options: dict | None,
        *,
        retries: int,
        backoff: float,
        sleep: Callable[[float], None],
        cache_dir: str | None,
        stats: ReadStats,
    ):
        self.base, self.storage_options, self.cache_dir = base, storage_options, cache_dir
        self.policy = storage.RetryPolicy(retries, backoff, sleep=sleep)
        self.remote = storage.is_url(base)
        self.stats = stats
        self._reset()

    def _reset(self):
        self._fs, self._pid, self._open, self._pool = None, None, None, None
        self._lock = threading.Lock()

    def __getstate__(self):
        d = self.__dict__.copy()
        d.update(_fs=None, _pid=None, _open=None, _pool=None, _lock=None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def url(self, shard: ShardInfo | str) -> str:
        """The shard's path or URL under ``base``. A name that could reach outside it (absolute, '..',
        a URL scheme, under s3://bucket-a/p a '/bucket-b/...' name, ...: see
        :func:`spkr.shards.schema.shard_name_problem`) is refused, even for a ShardInfo made by hand."""
        name = shard if isinstance(shard, str) else shard.name
        problem = shard_name_problem(name)
        if problem:
            shown = name if isinstance(name, str) and name.isprintable() else repr(name)
            raise ShardError(shown, f"refusing shard name {name!r}: it {problem}")
        return storage.join(self.base, name)

    def readahead_pool(self) -> ThreadPoolExecutor:
        """This process's one read-ahead thread."""
        self._filesystem()  # a new process (DataLoader worker) starts afresh
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="spkr-readahead")
        return self._pool

    def fetch_into(self, shard: ShardInfo, pos: int, mv: memoryview, end: int | None = None) -> int:
        """Fill ``mv`` with the shard's bytes from ``pos`` on (fewer only at the end of the file),
        reading on towards ``end``, through :func:`spkr.storage.fill` under this fetcher's policy. One
        fetch at a time: the read-ahead thread and the parser share the open source."""
        url = self.url(shard)
        try:
            with self._lock:
                return storage.fill(
                    lambda: self._source(shard),
                    pos,
                    mv,
                    self.policy,
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

    def close(self):
        """Close the open source (after a fetch in progress, e.g. the read-ahead's, has finished)."""
        with self._lock:
            self._drop_source()

    def _filesystem(self):
        if self._fs is None or self._pid != os.getpid():
            self._pid, self._open, self._pool = os.getpid(), None, None
            if not self.remote:
                self._fs = "local"
            else:
                self._fs = storage.get_fs(self.base, self.storage_options, cache_dir=self.cache_dir)[0]
        return self._fs

    def _source(self, shard: ShardInfo):
        """The shard's open source, opened when needed (no request yet for a remote one). Called by the
        fetch loop with ``self._lock`` held."""
        fs = self._filesystem()
        if self._open is not None and self._open[0] == shard.name:
            return self._open[1]
        self._drop_source()
        src = open_source(
            fs, self.url(shard), shard.bytes, cached=bool(self.cache_dir), timeout=self.policy.timeout
        )
        self._open = (shard.name, src)
        return src

    def _drop_source(self):
        if self._open is not None:
            try:
                self._open[1].close()
            except Exception:
                pass
            self._open = None


class ByteRange:
    """Sequential reader over the byte range [start, end) of one shard, in chunks of ``chunk_size``
    fetched through ``fetcher`` (with ``readahead``, the next chunk is fetched on the fetcher's helper
    thread while this one is parsed). Given ``mapped`` (a view of the whole local file) it hands out
    views of the page cache itself instead (a file shorter than the manifest says ends early: the
    caller reports it as truncated)."""

    def __init__(
        self,
        fetcher: ShardFetcher,
        shard: ShardInfo,
        start: int,
        end: int,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        readahead: bool = False,
        mapped: memoryview | None = None,
    ):
        self.fetcher, self.shard, self.chunk_size = fetcher, shard, chunk_size
        self.pos, self.end = start, end  # pos: next byte handed out
        self.buf, self.buf_pos = memoryview(b""), start
        self.fetch_pos = start  # next byte to fetch
        self.pool = fetcher.readahead_pool() if readahead and mapped is None else None
        self.pending = None  # (future of the next chunk, its position)
        self.mapped = mapped
        if mapped is not None:
            self.end = min(end, len(mapped))

    def _fetch_chunk(self, pos: int, n: int) -> memoryview:
        buf = memoryview(bytearray(n))
        return buf[: self.fetcher.fetch_into(self.shard, pos, buf, self.end)]

    def _fill(self, mv: memoryview) -> int:
        """Fill ``mv`` with the bytes from ``fetch_pos`` on (fewer only at the end of the file)."""
        pos, done = self.fetch_pos, 0
        if self.pending is not None:
            fut, fpos = self.pending
            self.pending = None
            if fpos == pos:  # the chunk read ahead is the one needed (chunks are sized to need)
                data = fut.result()
                done = min(len(data), len(mv))
                mv[:done] = data[:done]
        if done < len(mv):
            done += self.fetcher.fetch_into(self.shard, pos + done, mv[done:], self.end)
        self.fetch_pos = pos + done
        if self.pool is not None and done == len(mv) and self.fetch_pos < self.end:
            nxt = min(self.chunk_size, self.end - self.fetch_pos)
            self.pending = (self.pool.submit(self._fetch_chunk, self.fetch_pos, nxt), self.fetch_pos)
        return done

    def take(self, n: int) -> memoryview:
        """The next n bytes (fewer only at the end of the data), as a writable view (of the privately
        mapped file, or of a buffer)."""
        if self.mapped is not None:
            a = self.pos
            self.pos = min(self.end, a + n)
            self.fetcher.stats.bytes += self.pos - a
            return self.mapped[a : self.pos]
        off = self.pos - self.buf_pos
        if off + n <= len(self.buf):
            self.pos += n
            return self.buf[off : off + n]
        tail = self.buf[off:]
        want = max(0, min(max(n - len(tail), self.chunk_size), self.end - self.fetch_pos))
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


__all__ = ["open_source", "ShardFetcher", "ByteRange", "ReadStats", "DEFAULT_CHUNK"]

"""Byte sources of shards and the one loop that fetches shard bytes through them.

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

:class:`~spkr.stream.reader.ShardReader` fetches every shard byte from these sources through
:func:`spkr.storage.fill`, the one retrying read loop (the same policy and loop that read
``manifest.json`` and the sidecars): a transient failure closes the source and resumes at the exact
byte reached; the budget counts consecutive failures without progress; after it,
:class:`spkr.storage.ReadFailed` names the URL and the offset, which the reader turns into a
``ShardError`` naming the shard.
"""

from __future__ import annotations

import os

from spkr import storage


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


__all__ = ["open_source"]

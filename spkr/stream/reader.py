"""Reading spkr shards: the reader's lifecycle, random access and ranged reads, checksums, records.

A :class:`ShardReader` reads the shards under ``base`` (a local directory or an fsspec URL prefix)
and returns :class:`Record` s. Two ways in:

- :meth:`ShardReader.iter_range`: samples ``[a, b)`` of one shard as the single byte range
  ``[offsets[a], offsets[b])`` (or to the shard's end), through a
  :class:`~spkr.stream.sources.ByteRange` (chunks fetched sequentially, one ahead for remote shards;
  views of the page cache for local shards read through mmap);
- :meth:`ShardReader.read_sample` (local shards, ``random_access``): any sample parsed in place from a
  private mapping of the file, in any order; :meth:`release_sample` / :meth:`close_shard` let its pages
  go.

Every shard byte comes through :meth:`spkr.stream.sources.ShardFetcher.fetch_into` (the one retrying
fetch: see :mod:`spkr.stream.sources`; ``retries`` bounds the CONSECUTIVE failures WITHOUT PROGRESS,
``backoff * 2**(k-1)`` seconds before the k-th retry in a row, at most 10 s; nothing is fetched twice
and no sample is lost or repeated).

Integrity: every sample's whole byte span is checked against the manifest's per-sample checksum
(xxh3-64, ~7 GB/s) before anything in it is parsed, on every read, in both ways in and so in every
layout (any world size, worker count, local or remote); ``checksums=False`` turns it off (benchmarks
only). Members are decoded by :mod:`spkr.shards.codec` (safe decoding: no pickle, dtype/shape
checks). Corruption (truncated shard, checksum mismatch, bad header, unknown member, bad npy header,
key/label/frames not matching the manifest) raises :class:`ShardError` naming the shard, the sample
key or member, and the byte offset. With ``on_error="skip"`` the sample is skipped instead (the
reader goes on at the next sample's manifest offset), counted in ``reader.stats.skipped`` as
``{"shard", "key", "error"}`` (:meth:`ShardReader.skip`).
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from spkr.shards.codec import ShardError, decode_sample, sample_checksum
from spkr.shards.format import ShardInfo
from spkr.stream.sources import DEFAULT_CHUNK, ByteRange, ReadStats, ShardFetcher

FAULT_AROUND = 128 << 10  # >= the kernel's fault_around_bytes (64 kB default): see release_sample
RELEASE_BYTES = 8 << 20  # released sample bytes per unmapping sweep (random-access reads)


class Record(NamedTuple):
    index: int  # sample index within the shard
    key: str
    label: int
    meta: dict
    feats: np.ndarray  # (frames, n_mels), on-disk dtype (float16), read-only view


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
        self.base, self.n_mels = str(base), n_mels
        self.chunk_size, self.checksums, self.on_error = int(chunk_size), bool(checksums), on_error
        self.stats = ReadStats()
        self.fetcher = ShardFetcher(
            self.base,
            storage_options,
            retries=int(retries),
            backoff=float(backoff),
            sleep=sleep,
            cache_dir=cache_dir,
            stats=self.stats,
        )
        self.remote = self.fetcher.remote
        self.readahead = self.remote if readahead is None else readahead
        self.use_mmap = use_mmap  # local shards: views of the page cache instead of buffered reads
        self._maps: dict[str, tuple[mmap.mmap | None, memoryview]] = {}  # random access mappings
        self._released: dict[str, tuple[int, int]] = {}  # shard -> byte span released, not yet unmapped
        self._released_bytes = 0

    def url(self, shard: ShardInfo | str) -> str:
        """The shard's path or URL under ``base`` (unsafe names refused: :meth:`ShardFetcher.url`)."""
        return self.fetcher.url(shard)

    def close(self):
        self.fetcher.close()
        self._maps.clear()
        self._released.clear()

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
        return self._parse_sample(ByteRange(self.fetcher, shard, start, end, mapped=view), shard, i)

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
        byte_range = ByteRange(
            self.fetcher,
            shard,
            shard.offsets[start],
            end,
            chunk_size=self.chunk_size,
            readahead=self.readahead,
            mapped=mapped,
        )
        try:
            for i in range(start, stop):
                try:
                    yield self._parse_sample(byte_range, shard, i)
                except ShardError as e:
                    self.skip(shard, i, e)
                    if i + 1 < stop:
                        byte_range.seek(shard.offsets[i + 1])
        finally:
            if mapped is not None:
                self.close_shard(shard)  # the records' views keep the mapping as long as they need it

    def skip(self, shard: ShardInfo, i: int, err: ShardError) -> None:
        """Sample ``i`` could not be read: re-raise ``err``, or (``on_error="skip"``) record it."""
        if self.on_error != "skip":
            raise err
        self.stats.skipped.append({"shard": shard.name, "key": shard.keys[i], "error": str(err)})

    def _parse_sample(self, byte_range: ByteRange, shard: ShardInfo, i: int) -> Record:
        """Take sample ``i``'s whole byte span, check its length and checksum, then decode its
        members from the span (views: no copy) and check them against the manifest."""
        key, start = shard.keys[i], shard.offsets[i]
        n = self._sample_end(shard, i) - start
        span = byte_range.take(n)
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
        label, meta, feats = decode_sample(span, shard=shard.name, key=key, start=start, n_mels=self.n_mels)
        if label != shard.labels[i]:
            raise ShardError(shard.name, f"label {label} but manifest says {shard.labels[i]}", f"{key}.cls")
        if feats.shape[0] != shard.frames[i]:
            raise ShardError(
                shard.name, f"{feats.shape[0]} frames but manifest says {shard.frames[i]}", f"{key}.mel.npy"
            )
        return Record(i, key, label, meta, feats)


__all__ = ["ShardError", "ShardReader", "Record", "ReadStats"]

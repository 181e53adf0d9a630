"""One rank's epoch as a torch IterableDataset: which records each DataLoader worker reads, in which
batches, and what its reader did.

Each DataLoader worker ``w`` plays logical plan worker ``v = (w + k) % W`` (``k``: batches already
consumed this epoch, so round-robin continues exactly at batch ``k``) and skips its consumed batches
by plan, without reading them (:meth:`EpochPlan.batches_before`). It reads its records one of two
ways, which give the same batches:

- :func:`read_in_place` (local shards through mmap): only stream positions wait in the bucketing
  pool; each batch's samples are parsed in place when the batch is made, then their pages released;
- :func:`read_streamed` (remote shards, or ``mmap=False``): each plan window's byte span is read
  sequentially and its samples copied into the pool until their batch is made.

A sample that cannot be read (``on_error="skip"``) is ``None`` in its batch's record list.

The dataset yields :class:`WorkerBatch` ``(batch, report)``: ``batch`` is what ``collate`` made of
the records (the loader's batch dict, nothing else in it), ``report`` a :class:`ReadReport` of what
this worker's reader did since its previous batch (retries, skipped samples) and in total (bytes);
:class:`~spkr.stream.loader.SpeakerLoader` unwraps it. A spkr error in a DataLoader worker ends that
worker's epoch with a last ``WorkerBatch(None, report, error)``, which the loader raises in order: the
error's own type and message, not torch's ``Caught ShardError in DataLoader worker ...`` traceback.
Reports travel with their batch, so they are ordered, complete and need no second channel between
worker processes and the main process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from spkr.errors import SpkrError
from spkr.shards.codec import ShardError
from spkr.shards.format import ShardInfo
from spkr.stream.plan import EpochPlan
from spkr.stream.reader import Record, ShardReader
from spkr.stream.sources import ReadStats


class ReadReport(NamedTuple):
    """What a worker's reader did since its previous batch."""

    retries: int  # transient read errors recovered
    skipped: list[dict]  # samples skipped ({"shard", "key", "error"})
    bytes: int  # shard bytes this worker read this epoch (a running total)


class WorkerBatch(NamedTuple):
    batch: dict | None
    report: ReadReport
    # The spkr error that ended a DataLoader worker's epoch (then ``batch`` is None), handed over whole
    # for the loader to raise: torch would re-raise it with the worker's traceback as its message.
    error: SpkrError | None = None


class _Reporter:
    """Successive :class:`ReadReport` s of one reader's statistics."""

    def __init__(self, stats: ReadStats):
        self.stats, self.retries, self.skipped = stats, 0, 0

    def report(self) -> ReadReport:
        st = self.stats
        out = ReadReport(st.retries - self.retries, st.skipped[self.skipped :], st.bytes)
        self.retries, self.skipped = st.retries, len(st.skipped)
        return out


def _consumed_mask(plan: EpochPlan, worker: int, skip: int) -> np.ndarray | None:
    """For a resumed worker (``skip`` > 0): which stream positions of its range lie in its first
    ``skip`` batches (already consumed: not read again), one bool per position; None when ``skip`` is
    0. Found by walking the plan's windows up to batch ``skip`` (the plan is pure: the same windows
    as the walk that reads)."""
    if skip <= 0:
        return None
    start, stop = plan.worker_range(worker)
    mask = np.zeros(stop - start, dtype=bool)
    t = 0
    for window in plan.windows(worker):
        for positions in window.batches:
            if t >= skip:
                return mask
            mask[positions - start] = True
            t += 1
    return mask


def _read_or_skip(reader: ShardReader, shard: ShardInfo, i: int) -> Record | None:
    try:
        return reader.read_sample(shard, i)
    except ShardError as e:
        reader.skip(shard, i, e)
        return None


def read_in_place(
    reader: ShardReader, shards: list[ShardInfo], plan: EpochPlan, worker: int, skip: int
) -> Iterator[tuple[int, list[Record | None]]]:
    """(batch index within the worker, records) of worker ``worker``'s batches from its ``skip``-th
    on, each sample parsed in place (``reader.random_access``) when its batch is made. Once the caller
    has made its batch (the batch holds copies), a batch's pages are released and a shard none of
    whose samples is still to come is closed. The plan is walked window by window
    (:meth:`EpochPlan.windows`): memory per shard and per pool, not per sample of the range."""
    samples_left = plan.shard_counts(*plan.worker_range(worker))  # consumed batches count down too
    t = 0
    for window in plan.windows(worker):
        for batch in window.batches:
            shard_idx, sample_idx = plan.locate(batch)
            where = list(zip(shard_idx.tolist(), sample_idx.tolist()))
            if t >= skip:
                yield t, [_read_or_skip(reader, shards[s], i) for s, i in where]
            for s, i in where:
                if t >= skip:
                    reader.release_sample(shards[s], i)
                samples_left[s] -= 1
                if not samples_left[s]:
                    reader.close_shard(shards[s])
            t += 1


def read_streamed(
    reader: ShardReader, shards: list[ShardInfo], plan: EpochPlan, worker: int, skip: int
) -> Iterator[tuple[int, list[Record | None]]]:
    """(batch index within the worker, records) of worker ``worker``'s batches from its ``skip``-th
    on: per plan window, the span the remaining batches need is read sequentially (one byte range per
    run of consecutive samples of a shard) into the bucketing pool, then the window's batches are
    taken from the pool. The plan is walked window by window (:meth:`EpochPlan.windows`); a resumed
    worker also holds one bool per position of its range (:func:`_consumed_mask`)."""
    start, _ = plan.worker_range(worker)
    consumed = _consumed_mask(plan, worker, skip)
    pool: dict[int, Record] = {}
    t = 0
    for window in plan.windows(worker):
        needed = np.arange(window.start, window.stop, dtype=np.int64)
        if consumed is not None:
            needed = needed[~consumed[needed - start]]  # consumed batches' samples: not read
        shard_idx, sample_idx = plan.locate(needed)
        for s, a, b, first in _runs(shard_idx, sample_idx, needed):
            for rec in reader.iter_range(shards[s], a, b):
                # own copy: a view would pin its read chunk for as long as it waits in the pool,
                # so memory would grow with the number of shards
                pool[first + rec.index - a] = rec._replace(feats=rec.feats.copy())
        for batch in window.batches:
            if t >= skip:
                yield t, [pool.pop(int(p), None) for p in batch]
            t += 1


def _runs(shard_idx: np.ndarray, sample_idx: np.ndarray, positions: np.ndarray):
    """Sorted stream positions -> (shard, a, b, first position) runs of consecutive samples."""
    n = len(positions)
    if n == 0:
        return
    brk = np.flatnonzero((np.diff(shard_idx) != 0) | (np.diff(sample_idx) != 1)) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [n]])
    for s, e in zip(starts, ends):
        yield int(shard_idx[s]), int(sample_idx[s]), int(sample_idx[e - 1]) + 1, int(positions[s])


class ShardDataset(IterableDataset):
    """One rank's epoch of ``plan_args`` (the :class:`EpochPlan` arguments but ``epoch``) over
    ``shards`` as :class:`WorkerBatch` es; ``collate(records, batch id, epoch) -> batch``. Set
    ``epoch`` and ``start_batch`` (batches already consumed) before iterating."""

    def __init__(
        self,
        base: str,
        shards: list[ShardInfo],
        *,
        plan_args: dict,
        collate: Callable[[list, int, int], dict],
        reader_kwargs: dict,
    ):
        self.base, self.shards, self.plan_args = base, shards, plan_args
        self.collate, self.reader_kwargs = collate, reader_kwargs
        self.counts = [s.num_samples for s in shards]
        self.frames = [s.frames for s in shards]
        self.epoch = 0
        self.start_batch = 0

    def plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        return EpochPlan(self.counts, self.frames, epoch=epoch, **self.plan_args)

    def __iter__(self) -> Iterator[WorkerBatch]:
        info = get_worker_info()
        dataloader_worker, dataloader_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        plan = self.plan()
        num_workers = plan.num_workers
        if dataloader_workers != num_workers:
            raise RuntimeError(
                f"plan made for {num_workers} workers but DataLoader runs {dataloader_workers}"
            )
        consumed = self.start_batch
        worker = (dataloader_worker + consumed) % num_workers
        skip = EpochPlan.batches_before(worker, consumed, num_workers)
        reader = ShardReader(self.base, **self.reader_kwargs)
        read = read_in_place if reader.random_access else read_streamed
        reporter = _Reporter(reader.stats)
        try:
            for t, records in read(reader, self.shards, plan, worker, skip):
                batch = self.collate(records, worker + t * num_workers, plan.epoch)
                yield WorkerBatch(batch, reporter.report())
        except SpkrError as e:
            if info is None:
                raise
            yield WorkerBatch(None, reporter.report(), e)
        finally:
            reader.close()


__all__ = ["ShardDataset", "WorkerBatch", "ReadReport", "read_in_place", "read_streamed"]

"""SpeakerLoader: spkr shards -> padded log-mel batches, for one process or many (torchrun).

Guarantees (``train=True``): every sample of the split exactly once per epoch except fewer than
``world_size`` dropped from the end of the shuffled stream (``loader.dropped``, other samples each
epoch); the same number of batches on every rank (``len(loader)``), so DDP never hangs at the end of
an epoch; exact mid-epoch resume via ``state_dict()`` / ``load_state_dict()``; local paths or any
fsspec URL (``s3://``, ``gs://``, ``http://``). See :mod:`spkr.stream.plan` for the plan.

Batches are collated inside the DataLoader workers (``DataLoader(batch_size=None)``) into
``{"mel": (B, T_max, n_mels) normalised and zero padded, float32 (or float16 with ``dtype="float16"``),
"lengths": int64 (B,), "labels": int64 (B,), "keys": list[str]}``. Raw audio is never opened.

Resume: ``state_dict()`` = ``{epoch, batches (consumed this epoch), seed, world_size, num_workers,
batch_size, bucket_window, train, split, dataset_id, num_samples, ...}``; a state of another dataset
(``manifest.dataset_id``) is refused. After ``load_state_dict`` the next
iteration yields exactly the batches not yet consumed, in the uninterrupted order; workers skip
consumed batches by plan, without reading them. Mid-epoch, the batch composition depends on
``(seed, world_size, num_workers, batch_size, bucket_window)``, so loading a mid-epoch state with any
of these changed raises ``ValueError`` (finish the epoch, or resume with the saved values); a state
taken at an epoch boundary (0 or all batches consumed) loads under any world size / worker count.

Reads: local shards are read in place (``ShardReader.read_sample`` through mmap) when each batch is made,
so only positions wait in the bucketing pool; remote shards (or ``mmap=False``) are streamed: each
window's byte span is read and its samples copied into the pool. Both give the same batches.

Normalisation: per-mel-bin ``(x - mean) / std`` with the manifest's training statistics, or with
``stats={"mean", "std"}`` given by the caller (evaluation passes the checkpoint's, so a model always
sees its training normalisation). Every sample is checked against its manifest checksum on every
read (``checksums=True``), in every layout.

Skipped samples (``on_error="skip"``): a sample that cannot be read is dropped from its batch (the
batch gets smaller; a batch whose samples were all skipped is yielded with B = 0 so that batch counts
stay equal across ranks) and recorded in ``loader.skipped``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from spkr import storage
from spkr.manifest import Manifest, ShardInfo
from spkr.stream.plan import EpochPlan
from spkr.stream.reader import ShardError, ShardReader

_TAG_CROP = 0xC209
_TAG_WORKER_SEED = 0x5EED
# Batch dtypes. A DataLoader worker hands each batch over in a fresh shared-memory segment, and
# faulting its pages in costs ~3 us per 4 kB page here (12 ms for a 15 MB float32 batch: the
# bottleneck with workers). float16 halves that (2 workers: ~1.4x the samples/s, tools/bench_loader.py)
# and loses nothing the shards kept (features are stored as float16; the normalised values are
# rounded once). spkr.train and spkr.evaluate ask for float16 and cast to float32 on the device.
BATCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def default_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed if initialised, else env RANK/WORLD_SIZE, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardDataset(IterableDataset):
    """One rank's epoch as an IterableDataset of collated batches (one logical plan worker per
    DataLoader worker). Configure ``epoch`` and ``start_batch`` before iterating."""

    def __init__(
        self,
        base: str,
        shards: list[ShardInfo],
        *,
        n_mels: int,
        batch_size: int,
        train: bool,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        bucket_window: int | None,
        crop_frames: int | None,
        mean: np.ndarray | None,
        std: np.ndarray | None,
        reader_kwargs: dict,
        dtype: torch.dtype = torch.float32,
    ):
        self.base, self.shards, self.n_mels = base, shards, n_mels
        self.dtype = dtype
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.bucket_window, self.crop_frames = bucket_window, crop_frames
        self.mean = None if mean is None else np.asarray(mean, np.float32)
        self.inv_std = None if std is None else (1.0 / np.maximum(np.asarray(std, np.float32), 1e-5))
        self.reader_kwargs = reader_kwargs
        self._mean_t = None if mean is None else torch.from_numpy(self.mean)
        self._inv_std_t = None if std is None else torch.from_numpy(self.inv_std.astype(np.float32))
        # (x - mean) * inv_std == x * inv_std + shift: one fused float32 pass per row in collate
        self._shift_t = None if mean is None else -self._mean_t * self._inv_std_t
        self.counts = [s.num_samples for s in shards]
        self.frames = [s.frames for s in shards]
        self.epoch = 0
        self.start_batch = 0

    def plan(self, epoch: int | None = None) -> EpochPlan:
        return EpochPlan(
            self.counts,
            self.frames,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
            world_size=self.world_size,
            rank=self.rank,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            train=self.train,
            bucket_window=self.bucket_window,
        )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, n_dl = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        plan = self.plan()
        W = plan.num_workers
        if n_dl != W:
            raise RuntimeError(f"plan made for {W} workers but DataLoader runs {n_dl}")
        k = self.start_batch
        v = (wid + k) % W  # logical worker: round-robin then continues exactly at batch k
        yield from self._iter_worker(plan, v, EpochPlan.batches_before(v, k, W))

    def _iter_worker(self, plan: EpochPlan, v: int, skip: int) -> Iterator[dict]:
        reader = ShardReader(self.base, n_mels=self.n_mels, **self.reader_kwargs)
        wp = plan.worker(v)
        W = plan.num_workers
        # batch index (within this worker) of every position of the worker's range
        owner = np.empty(wp.stop - wp.start, dtype=np.int64)
        t = 0
        for window in wp.windows:
            for b in window.batches:
                owner[b - wp.start] = t
                t += 1
        t = 0
        n_retries, n_skipped = 0, 0
        records: dict[int, object] = {}
        direct = reader.random_access  # local shards: read each sample in place when its batch is made
        left: dict[int, int] = {}  # direct mode: samples still to read per shard (then it is closed)
        if direct:
            todo = np.arange(wp.start, wp.stop, dtype=np.int64)
            shard_idx, _ = plan.locate(todo[owner >= skip])
            left = dict(zip(*(x.tolist() for x in np.unique(shard_idx, return_counts=True))))

        def read_direct(s: int, i: int):
            shard = self.shards[s]
            try:
                return reader.read_sample(shard, i)
            except ShardError as e:
                if reader.on_error != "skip":
                    raise
                reader._skip(shard, i, e)
                return None

        try:
            for window in wp.windows:
                nwb = len(window.batches)
                span = np.arange(window.start, window.stop, dtype=np.int64)
                need = span[owner[span - wp.start] >= skip]  # consumed batches' samples: not read
                if len(need) and not direct:  # streaming: read the window's span into the pool
                    shard_idx, sample_idx = plan.locate(need)
                    for s, a, b, p0 in _runs(shard_idx, sample_idx, need):
                        shard = self.shards[s]
                        for rec in reader.iter_range(shard, a, b):
                            # own copy: a view would pin its read chunk for as long as it waits in
                            # the bucketing pool, so memory would grow with the number of shards
                            records[p0 + rec.index - a] = rec._replace(feats=rec.feats.copy())
                for i, b in enumerate(window.batches):
                    tt = t + i
                    if tt < skip:
                        continue
                    if direct:
                        shard_idx, sample_idx = plan.locate(b)
                        where = list(zip(shard_idx.tolist(), sample_idx.tolist()))
                        batch = self.collate([read_direct(s, k) for s, k in where], v + tt * W, plan.epoch)
                        for s, k in where:  # the batch holds copies: unmap the samples' pages
                            reader.release_sample(self.shards[s], k)
                            left[s] -= 1
                            if not left[s]:
                                reader.close_shard(self.shards[s])
                    else:
                        batch = self.collate([records.pop(int(p), None) for p in b], v + tt * W, plan.epoch)
                    batch["_stats"] = {
                        "retries": reader.stats.retries - n_retries,
                        "skipped": reader.stats.skipped[n_skipped:],
                        "bytes": reader.stats.bytes,
                    }
                    n_retries, n_skipped = reader.stats.retries, len(reader.stats.skipped)
                    yield batch
                t += nwb
        finally:
            reader.close()

    def collate(self, records: list, j: int, epoch: int) -> dict:
        """Pad, normalise and convert (to ``dtype``) into one batch tensor, on one thread:
        these small per-row copies run ~25x slower when torch splits them over OpenMP threads (measured
        on 2 cores). DataLoader workers already use one thread; in-process loading borrows it."""
        threads = torch.get_num_threads()
        if threads != 1:
            torch.set_num_threads(1)
        try:
            return self._collate(records, j, epoch)
        finally:
            if threads != 1:
                torch.set_num_threads(threads)

    def _collate(self, records: list, j: int, epoch: int) -> dict:
        recs = [r for r in records if r is not None]
        feats = [r.feats for r in recs]
        if self.crop_frames:
            c = int(self.crop_frames)
            rng = np.random.default_rng([_TAG_CROP, self.seed & 0xFFFFFFFF, epoch, self.rank, j])
            u = rng.random(len(feats))
            for i, f in enumerate(feats):
                if f.shape[0] > c:
                    s = int(u[i] * (f.shape[0] - c + 1))
                    feats[i] = f[s : s + c]
        lengths = np.array([f.shape[0] for f in feats], dtype=np.int64)
        T = int(lengths.max()) if len(lengths) else 0
        mel = torch.empty((len(feats), T, self.n_mels), dtype=self.dtype)
        if get_worker_info() is not None:  # build the batch in shared memory: no copy on transfer
            mel.share_memory_()
        for i, f in enumerate(feats):
            mel[i, f.shape[0] :] = 0
            row = mel[i, : f.shape[0]]
            src = torch.from_numpy(f) if f.flags.writeable else torch.from_numpy(f.copy())
            if self.mean is None:
                row.copy_(src)
            elif self.dtype == torch.float32:  # copy (vectorised float16 -> float32), then normalise
                row.copy_(src)  # in place: (x - mean) * inv_std as x * inv_std + shift, one pass
                torch.addcmul(self._shift_t, row, self._inv_std_t, out=row)
            else:  # normalised in float32 arithmetic, rounded once to float16
                torch.addcmul(self._shift_t, src, self._inv_std_t, out=row)
        return {
            "mel": mel,
            "lengths": torch.from_numpy(lengths),
            "labels": torch.tensor([r.label for r in recs], dtype=torch.int64),
            "keys": [r.key for r in recs],
        }


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


class SpeakerLoader:
    """Streams one split of a spkr shards directory as batches; see the module docstring."""

    def __init__(
        self,
        shards: str,
        split: str = "train",
        batch_size: int = 32,
        *,
        train: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        bucket_window: int | None = None,
        crop_frames: int | None = None,
        normalize: bool = True,
        dtype: str = "float32",
        storage_options: dict | None = None,
        prefetch_factor: int | None = None,
        pin_memory: bool = False,
        on_error: str = "fail",
        checksums: bool = True,
        stats: dict | None = None,
        cache_dir: str | None = None,
        retries: int = 5,
        backoff: float = 0.2,
        chunk_size: int | None = None,
        mmap: bool = True,
        multiprocessing_context=None,
        manifest: Manifest | None = None,
    ):
        if rank is None or world_size is None:
            r, w = default_rank_world()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        if dtype not in BATCH_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(BATCH_DTYPES)}, not {dtype!r}")
        self.shards_url, self.split = str(shards), split
        self.manifest = manifest or Manifest.load(
            self.shards_url, storage_options, retry=storage.RetryPolicy(retries, backoff)
        )
        self.split_info = self.manifest.split(split)
        n_mels = int(self.manifest.data["feature_config"].get("n_mels", 80))
        if stats is None:  # training: the shards' own; evaluation passes the checkpoint's
            stats = self.manifest.data.get("stats") or {}
        if normalize and not stats.get("mean"):
            raise ValueError(f"{self.manifest.url}: no feature statistics; pass normalize=False")
        if normalize and (len(stats["mean"]) != n_mels or len(stats.get("std") or []) != n_mels):
            raise ValueError(f"feature statistics for {len(stats['mean'])} mel bins, shards have {n_mels}")
        reader_kwargs = dict(
            storage_options=storage_options,
            retries=retries,
            backoff=backoff,
            cache_dir=cache_dir,
            checksums=checksums,
            on_error=on_error,
            use_mmap=mmap,
        )
        if chunk_size:
            reader_kwargs["chunk_size"] = chunk_size
        self.dataset = ShardDataset(
            self.shards_url,
            self.split_info.shards,
            n_mels=n_mels,
            batch_size=batch_size,
            train=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            bucket_window=bucket_window,
            crop_frames=crop_frames,
            mean=stats.get("mean") if normalize else None,
            std=stats.get("std") if normalize else None,
            reader_kwargs=reader_kwargs,
            dtype=BATCH_DTYPES[dtype],
        )
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.multiprocessing_context = multiprocessing_context
        self.epoch = 0
        self._consumed = 0
        self._resume: int | None = None
        self._plan_cache: tuple[int, EpochPlan] | None = None
        self.skipped: list[dict] = []  # samples skipped (on_error="skip"), all epochs
        self.retries = 0  # transient read errors recovered, all epochs
        self.bytes_read = 0  # this epoch, summed over workers (last report of each)
        self._bytes_by_worker: dict[int, int] = {}

    # ---------------------------------------------------------------- plan
    @property
    def plan(self) -> EpochPlan:
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            self._plan_cache = (self.epoch, self.dataset.plan(self.epoch))
        return self._plan_cache[1]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a pending resume point survives only if it is for this epoch."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._resume = None
            self._consumed = 0

    def __len__(self) -> int:
        """Batches this rank yields in a full pass of the current epoch."""
        return self.plan.num_batches

    @property
    def dropped(self) -> int:
        """Samples dropped this epoch so that all ranks get the same count (< world_size)."""
        return self.plan.dropped

    @property
    def num_samples(self) -> int:
        """Samples this rank yields this epoch (before skips)."""
        return self.plan.num_samples

    @property
    def n_mels(self) -> int:
        return self.dataset.n_mels

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:
        start = self._resume or 0
        self._resume = None
        self._consumed = start
        self.bytes_read = 0
        plan = self.plan
        if start >= plan.num_batches:
            return
        self.dataset.epoch, self.dataset.start_batch = self.epoch, start
        if self.num_workers == 0:
            source = iter(self.dataset)
        else:
            kwargs = {}
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
            # The DataLoader's own generator (it draws the workers' base seed): without one, creating
            # the iterator draws from the global torch RNG, so a resumed run (RNG restored, then a new
            # iterator mid-epoch) would get other dropout / SpecAugment draws than an uninterrupted one.
            gen = torch.Generator()
            gen.manual_seed(
                int(
                    np.random.SeedSequence(
                        [_TAG_WORKER_SEED, self.seed & 0xFFFFFFFF, self.epoch, self.rank]
                    ).generate_state(1, np.uint64)[0]
                )
            )
            source = iter(
                DataLoader(
                    self.dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory,
                    persistent_workers=False,
                    multiprocessing_context=self.multiprocessing_context,
                    generator=gen,
                    **kwargs,
                )
            )
        j = start
        for batch in source:
            st = batch.pop("_stats")
            self.retries += st["retries"]
            self.skipped.extend(st["skipped"])
            self._bytes_by_worker[j % plan.num_workers] = st["bytes"]
            self.bytes_read = sum(self._bytes_by_worker.values())
            if self.num_workers == 0 and self.pin_memory and torch.cuda.is_available():
                batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            j += 1
            self._consumed = j
            yield batch

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        plan = self.plan
        return {
            "epoch": self.epoch,
            "batches": self._consumed if self._resume is None else self._resume,
            "num_batches": plan.num_batches,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": plan.num_workers,
            "batch_size": self.batch_size,
            "bucket_window": plan.bucket_window,
            "train": self.train,
            "split": self.split,
            "dataset_id": self.manifest.dataset_id,
            "num_samples": plan.total,
            "skipped": len(self.skipped),
        }

    def load_state_dict(self, state: dict) -> None:
        epoch, k = int(state["epoch"]), int(state["batches"])
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this loader seed {self.seed}")
        if state.get("split", self.split) != self.split:
            raise ValueError(f"loader state is for split {state['split']!r}, not {self.split!r}")
        if state.get("dataset_id", self.manifest.dataset_id) != self.manifest.dataset_id:
            raise ValueError(
                f"loader state is for dataset {state['dataset_id']}, these shards are dataset "
                f"{self.manifest.dataset_id} ({self.manifest.url}): its positions would repeat or miss samples"
            )
        self.set_epoch(epoch)
        plan = self.plan
        mid_epoch = 0 < k < int(state.get("num_batches", plan.num_batches))
        if mid_epoch:
            mine = {
                "world_size": self.world_size,
                "num_workers": plan.num_workers,
                "batch_size": self.batch_size,
                "bucket_window": plan.bucket_window,
                "train": self.train,
                "num_samples": plan.total,
            }
            diff = {key: (state.get(key), val) for key, val in mine.items() if state.get(key, val) != val}
            if diff:
                what = ", ".join(f"{key}: saved {a} vs now {b}" for key, (a, b) in diff.items())
                raise ValueError(
                    f"cannot resume mid-epoch ({k} of {state.get('num_batches')} batches of epoch {epoch}) "
                    f"with a different layout ({what}); the batches depend on it. Resume with the saved "
                    f"values, or from an epoch boundary"
                )
            self._resume = k
        else:
            self._resume = plan.num_batches if k > 0 else 0
        self._consumed = self._resume


__all__ = ["SpeakerLoader", "ShardDataset", "default_rank_world"]

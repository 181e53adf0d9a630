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
(``manifest.dataset_id``), or naming none, is refused (``DatasetMismatch``). After ``load_state_dict`` the next
iteration yields exactly the batches not yet consumed, in the uninterrupted order; workers skip
consumed batches by plan, without reading them. Mid-epoch, the batch composition depends on
``(seed, world_size, num_workers, batch_size, bucket_window)``, so loading a mid-epoch state with any
of these changed raises ``ValueError`` (finish the epoch, or resume with the saved values); a state
taken at an epoch boundary (0 or all batches consumed) loads under any world size / worker count.

Parts: :class:`~spkr.stream.dataset.ShardDataset` decides which records each DataLoader worker reads
and in which batches (local shards read in place through mmap, remote ones streamed: both give the
same batches); :class:`Collate` makes a batch of records; this class wires them into a DataLoader,
sums the workers' read reports (``retries``, ``skipped``, ``bytes_read``) and keeps the resume state.

Normalisation: per-mel-bin ``(x - mean) / std`` with the manifest's training statistics, or with
``stats={"mean", "std"}`` given by the caller (evaluation passes the checkpoint's, so a model always
sees its training normalisation). Every sample is checked against its manifest checksum on every
read (``checksums=True``), in every layout.

Worker start (``multiprocessing_context``, default ``"auto"``): inside a torch.distributed process
group DataLoader workers start from a fork server, a single-threaded process this process starts
once, never forked from the rank itself, which runs threads by then (gloo's transport loops, a
previous iterator's queue feeder). A child forked from a multi-threaded process can inherit a lock
one of them held and never return from ``fork()``: its rank then waits for batches forever and the
others wait in a collective until the process group's timeout (docs/loader.md). The server has
this module's imports loaded, so a worker starts in milliseconds; the dataset reaches it pickled
(~0.1 MB: index files are mapped again, not copied). Like any forkserver or spawn start, it runs the
main script's top level again in the server: a script that iterates a loader under torchrun needs
the ``if __name__ == "__main__":`` guard (spkr's CLIs have it). Outside a process group ``"auto"``
forks (workers share this process's pages; no guard needed); ``"fork"``, ``"forkserver"``,
``"spawn"`` or a context force one.

Skipped samples (``on_error="skip"``): a sample that cannot be read is dropped from its batch (the
batch gets smaller; a batch whose samples were all skipped is yielded with B = 0 so that batch counts
stay equal across ranks) and recorded in ``loader.skipped``.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from spkr import runtime, storage
from spkr.shards.format import Manifest
from spkr.shards.schema import DatasetMismatch
from spkr.stream.dataset import ShardDataset
from spkr.stream.plan import EpochPlan

_TAG_CROP = 0xC209
_TAG_WORKER_SEED = 0x5EED
# Batch dtypes. A DataLoader worker hands each batch over in a fresh shared-memory segment whose pages
# are faulted in one by one (with workers, the loader's bottleneck). float16 halves those pages and
# loses nothing the shards kept (features are stored as float16; the normalised values are rounded
# once). spkr.train and spkr.evaluate ask for float16 and cast to float32 on the device.
BATCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def default_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed if initialised, else from the environment
    (:func:`spkr.runtime.env_rank_world`: RANK/WORLD_SIZE, else (0, 1)). The run side imports it from
    :mod:`spkr.stream`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return runtime.env_rank_world()


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The given rank and world size, each defaulting to :func:`default_rank_world`'s, checked."""
    if rank is None or world_size is None:
        default_rank, default_world = default_rank_world()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size


WORKER_START = "auto"
START_METHODS = ("auto", "fork", "forkserver", "spawn")
_PRELOAD = ["spkr.stream.loader"]  # what the fork server imports once (torch, numpy, the dataset)


def check_worker_start(start) -> None:
    if isinstance(start, str) and start not in START_METHODS:
        raise ValueError(f"multiprocessing_context must be one of {', '.join(START_METHODS)}, not {start!r}")


def worker_context(start):
    """The multiprocessing context DataLoader workers start in, for ``start`` = a context, a
    start-method name, ``"auto"`` (forkserver inside a torch.distributed process group, else the
    platform's default) or None (the platform's default). A start method the platform lacks falls
    back to its default (forkserver exists on Linux and macOS)."""
    if start == "auto":
        import torch.distributed as dist

        start = "forkserver" if dist.is_available() and dist.is_initialized() else None
    if start is None or not isinstance(start, str):
        return start
    check_worker_start(start)
    if start not in mp.get_all_start_methods():
        return None
    ctx = mp.get_context(start)
    if start == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _check_choices(on_error: str, dtype: str) -> None:
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if dtype not in BATCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(BATCH_DTYPES)}, not {dtype!r}")


def normalisation(manifest: Manifest, n_mels: int, stats: dict | None = None) -> dict:
    """``{"mean", "std"}`` per mel bin: ``stats`` given by the caller (evaluation passes the
    checkpoint's), else the shards' own training statistics; checked against ``n_mels``."""
    if stats is None:
        stats = manifest.data.get("stats") or {}
    if not stats.get("mean"):
        raise ValueError(f"{manifest.url}: no feature statistics; pass normalize=False")
    if len(stats["mean"]) != n_mels or len(stats.get("std") or []) != n_mels:
        raise ValueError(f"feature statistics for {len(stats['mean'])} mel bins, shards have {n_mels}")
    return stats


class Collate:
    """Records -> one padded batch: ``{"mel": (B, T_max, n_mels) normalised with ``mean``/``std``
    (None: raw) and zero padded, in ``dtype``, "lengths", "labels", "keys"}``; a None record (a
    skipped sample) is left out. With ``crop_frames``, a longer sample is cropped at a random offset
    drawn from (seed, epoch, rank, batch id), so the crops do not depend on the worker layout."""

    def __init__(
        self,
        n_mels: int,
        *,
        mean: np.ndarray | None,
        std: np.ndarray | None,
        crop_frames: int | None = None,
        seed: int = 0,
        rank: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        self.n_mels, self.crop_frames, self.seed, self.rank, self.dtype = (
            n_mels,
            crop_frames,
            seed,
            rank,
            dtype,
        )
        self.normalize = mean is not None
        if self.normalize:
            # (x - mean) * inv_std == x * inv_std + shift: one fused float32 pass per row
            self._inv_std = torch.from_numpy(
                (1.0 / np.maximum(np.asarray(std, np.float32), 1e-5)).astype(np.float32)
            )
            self._shift = -torch.from_numpy(np.asarray(mean, np.float32)) * self._inv_std

    def __call__(self, records: list, j: int, epoch: int) -> dict:
        """The batch of ``records`` (batch id ``j`` of ``epoch``), made on one thread: these small
        per-row copies run many times slower when torch splits them over OpenMP threads. DataLoader
        workers already use one thread; in-process loading borrows it."""
        threads = torch.get_num_threads()
        if threads != 1:
            torch.set_num_threads(1)
        try:
            return self._collate([r for r in records if r is not None], j, epoch)
        finally:
            if threads != 1:
                torch.set_num_threads(threads)

    def _crop(self, feats: list[np.ndarray], j: int, epoch: int) -> list[np.ndarray]:
        c = int(self.crop_frames)
        u = np.random.default_rng([_TAG_CROP, self.seed & 0xFFFFFFFF, epoch, self.rank, j]).random(len(feats))
        for i, f in enumerate(feats):
            if f.shape[0] > c:
                s = int(u[i] * (f.shape[0] - c + 1))
                feats[i] = f[s : s + c]
        return feats

    def _collate(self, recs: list, j: int, epoch: int) -> dict:
        feats = [r.feats for r in recs]
        if self.crop_frames:
            feats = self._crop(feats, j, epoch)
        lengths = np.array([f.shape[0] for f in feats], dtype=np.int64)
        T = int(lengths.max()) if len(lengths) else 0
        mel = torch.empty((len(feats), T, self.n_mels), dtype=self.dtype)
        if get_worker_info() is not None:  # build the batch in shared memory: no copy on transfer
            mel.share_memory_()
        for i, f in enumerate(feats):
            mel[i, f.shape[0] :] = 0
            row = mel[i, : f.shape[0]]
            src = torch.from_numpy(f) if f.flags.writeable else torch.from_numpy(f.copy())
            if not self.normalize:
                row.copy_(src)
            elif self.dtype == torch.float32:  # copy (vectorised float16 -> float32), then normalise
                row.copy_(src)  # in place: (x - mean) * inv_std as x * inv_std + shift, one pass
                torch.addcmul(self._shift, row, self._inv_std, out=row)
            else:  # normalised in float32 arithmetic, rounded once to float16
                torch.addcmul(self._shift, src, self._inv_std, out=row)
        return {
            "mel": mel,
            "lengths": torch.from_numpy(lengths),
            "labels": torch.tensor([r.label for r in recs], dtype=torch.int64),
            "keys": [r.key for r in recs],
        }


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
        multiprocessing_context=WORKER_START,
        manifest: Manifest | None = None,
    ):
        rank, world_size = _rank_world(rank, world_size)
        _check_choices(on_error, dtype)
        self.shards_url, self.split = str(shards), split
        self.manifest = manifest or Manifest.load(
            self.shards_url, storage_options, retry=storage.RetryPolicy(retries, backoff)
        )
        self.split_info = self.manifest.split(split)
        self.n_mels = self.manifest.feature_config.n_mels
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        check_worker_start(multiprocessing_context)
        self.multiprocessing_context = multiprocessing_context  # resolved when workers start
        stats = normalisation(self.manifest, self.n_mels, stats) if normalize else {}
        collate = Collate(self.n_mels, mean=stats.get("mean"), std=stats.get("std"), crop_frames=crop_frames,
                          seed=seed, rank=rank, dtype=BATCH_DTYPES[dtype])  # fmt: skip
        reader_kwargs = dict(
            n_mels=self.n_mels, storage_options=storage_options, retries=retries, backoff=backoff,
            cache_dir=cache_dir, checksums=checksums, on_error=on_error, use_mmap=mmap,
            **({"chunk_size": chunk_size} if chunk_size else {}),
        )  # fmt: skip
        self.dataset = self._dataset(bucket_window, collate, reader_kwargs)
        self.epoch = 0
        self._consumed = 0
        self._resume: int | None = None
        self._plan_cache: tuple[int, EpochPlan] | None = None
        self.skipped: list[dict] = []  # samples skipped (on_error="skip"), all epochs
        self.retries = 0  # transient read errors recovered, all epochs
        self.bytes_read = 0  # this epoch, summed over workers (last report of each)
        self._bytes_by_worker: dict[int, int] = {}

    def _dataset(self, bucket_window: int | None, collate: Collate, reader_kwargs: dict) -> ShardDataset:
        plan_args = dict(
            seed=self.seed,
            world_size=self.world_size,
            rank=self.rank,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            train=self.train,
            bucket_window=bucket_window,
        )
        shards = self.split_info.shards
        return ShardDataset(
            self.shards_url, shards, plan_args=plan_args, collate=collate, reader_kwargs=reader_kwargs
        )

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

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:
        start = self._resume or 0
        self._resume = None
        self._consumed = start
        self.bytes_read = 0
        self._bytes_by_worker = {}
        plan = self.plan
        if start >= plan.num_batches:
            return
        self.dataset.epoch, self.dataset.start_batch = self.epoch, start
        source = iter(self.dataset) if self.num_workers == 0 else self._start_workers()
        for j, (batch, report, error) in enumerate(source, start):
            self.retries += report.retries
            self.skipped.extend(report.skipped)
            self._bytes_by_worker[j % plan.num_workers] = report.bytes
            self.bytes_read = sum(self._bytes_by_worker.values())
            if error is not None:  # a worker's error, as it was raised there
                raise error
            if self.num_workers == 0 and self.pin_memory and torch.cuda.is_available():
                batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            self._consumed = j + 1
            yield batch

    def _start_workers(self) -> Iterator:
        """The DataLoader's iterator, its workers started with this process's objects frozen: a worker
        forked from this process (``"fork"``) then skips them in a full garbage collection instead of
        writing to every page that holds one (copying the parent's whole heap, tools/bench_scale.py)."""
        gc.freeze()
        try:
            return iter(self._dataloader())
        finally:
            gc.unfreeze()

    def _dataloader(self) -> DataLoader:
        """The DataLoader over the dataset's worker batches (collated in the workers)."""
        kwargs = {}
        if self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        # The DataLoader's own generator (it draws the workers' base seed): without one, creating
        # the iterator draws from the global torch RNG, so a resumed run (RNG restored, then a new
        # iterator mid-epoch) would get other dropout / SpecAugment draws than an uninterrupted one.
        seed = np.random.SeedSequence([_TAG_WORKER_SEED, self.seed & 0xFFFFFFFF, self.epoch, self.rank])
        generator = torch.Generator()
        generator.manual_seed(int(seed.generate_state(1, np.uint64)[0]))
        return DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            multiprocessing_context=worker_context(self.multiprocessing_context),
            generator=generator,
            **kwargs,
        )

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
        if "dataset_id" not in state:
            raise DatasetMismatch(
                f"loader state names no dataset_id: its positions may be in any shard set, not these "
                f"({self.manifest.url}, dataset {self.manifest.dataset_id})"
            )
        if state["dataset_id"] != self.manifest.dataset_id:
            raise DatasetMismatch(
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


__all__ = ["SpeakerLoader", "Collate", "default_rank_world", "normalisation"]

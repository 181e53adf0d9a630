"""Iterate the loader without a model: throughput, and a record of which keys every rank consumed.

    python -m spkr.stream.data_only --shards DIR --split train --batch-size 32 --epochs 2 --workers 2 \
        --log-keys OUTDIR [--seed 0] [--crop-frames 200] [--step-ms 50]
    torchrun --nproc_per_node 3 -m spkr.stream.data_only ...

Under torchrun (WORLD_SIZE > 1) a gloo process group is initialised from the environment and all
ranks meet at a barrier after every epoch, so a rank yielding a different number of batches would
hang there (tests bound this with a timeout). Per rank ``OUTDIR/rank{r}.jsonl`` gets one line per
step: ``{"epoch", "step", "keys": [...]}``. ``spkr.train --data-only`` calls :func:`run` with its
[train] settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass

from spkr.errors import EXIT_ERROR, KNOWN_ERRORS, one_line


@dataclass(frozen=True)
class DataOnly:
    """What :func:`run` iterates (the command-line flags, plus ``storage_options``)."""

    shards: str
    split: str = "train"
    batch_size: int = 32
    epochs: int = 1
    workers: int = 2
    seed: int = 0
    crop_frames: int | None = None
    bucket_window: int | None = None
    eval: bool = False  # evaluation order: no shuffle, no drop
    log_keys: str | None = None  # directory for rank{r}.jsonl key logs
    max_steps: int | None = None  # stop each epoch after this many steps
    step_ms: float = 0.0  # a model step of this many ms after each batch (the consumer's pace)
    timeout: float = 300.0  # process-group timeout (s)
    storage_options: dict | None = None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="spkr.stream.data_only", description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, help="shards directory or URL (s3://bucket/prefix)")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop-frames", type=int, default=None)
    p.add_argument("--bucket-window", type=int, default=None)
    p.add_argument("--eval", action="store_true", help="evaluation order: no shuffle, no drop")
    p.add_argument("--log-keys", default=None, help="directory for rank{r}.jsonl key logs")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    p.add_argument(
        "--step-ms", type=float, default=0.0, help="sleep this long after each batch (a model's pace)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="process-group timeout (s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Errors: one line ``[data_only] error: ...`` and exit 2, like every spkr CLI."""
    args = build_parser().parse_args(argv)
    try:
        return run(DataOnly(**vars(args)))
    except KNOWN_ERRORS as e:
        print(one_line("data_only", e), file=sys.stderr, flush=True)
        return EXIT_ERROR


def run_epoch(loader, epoch: int, args: DataOnly, log) -> None:
    """One epoch of ``loader``: its keys to ``log`` (a jsonl file or None), a model's pace of
    ``args.step_ms`` per batch, and one line of throughput and data wait (the share of the epoch spent
    waiting for the next batch)."""
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    samples = frames = steps = 0
    wait = 0.0  # seconds spent waiting for the next batch
    t_ask = time.perf_counter()
    for step, batch in enumerate(loader):
        wait += time.perf_counter() - t_ask
        samples += len(batch["keys"])
        frames += int(batch["lengths"].sum())
        steps += 1
        if log:
            log.write(json.dumps({"epoch": epoch, "step": step, "keys": batch["keys"]}) + "\n")
        if args.max_steps and steps >= args.max_steps:
            break
        if args.step_ms:
            time.sleep(args.step_ms / 1e3)
        t_ask = time.perf_counter()
    dt = max(time.perf_counter() - t0, 1e-9)
    if log:
        log.flush()
    mb = loader.bytes_read / 1e6
    print(
        f"[rank {loader.rank}/{loader.world_size}] epoch {epoch}: {steps} steps (plan {len(loader)}), "
        f"{samples} samples, {frames} frames in {dt:.2f}s = {samples / dt:.1f} samples/s, "
        f"{mb / dt:.1f} MB/s; dropped {loader.dropped} (< world {loader.world_size}), "
        f"skipped {len(loader.skipped)}, retries {loader.retries}; data wait {100 * wait / dt:.1f} %",
        flush=True,
    )


def run(args: DataOnly) -> int:
    """Iterate the loader for ``args.epochs`` epochs, logging keys and throughput per rank."""
    import torch.distributed as dist

    from spkr.stream.loader import SpeakerLoader, default_rank_world

    _, world = default_rank_world()
    initialised_here = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
        initialised_here = True
    loader = SpeakerLoader(
        args.shards,
        args.split,
        args.batch_size,
        train=not args.eval,
        seed=args.seed,
        num_workers=args.workers,
        crop_frames=args.crop_frames,
        bucket_window=args.bucket_window,
        storage_options=args.storage_options,
    )
    rank = loader.rank
    log = None
    if args.log_keys:
        os.makedirs(args.log_keys, exist_ok=True)
        log = open(os.path.join(args.log_keys, f"rank{rank}.jsonl"), "w")
    try:
        for epoch in range(args.epochs):
            run_epoch(loader, epoch, args, log)
            if dist.is_initialized():
                dist.barrier()
    finally:
        if log:
            log.close()
        if initialised_here:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a speaker classifier from log-mel shards — one file, nanoGPT style.

    torchrun -m spkr.train --shards shards/train.960          # -> runs/train.960, the device's default config
    python -m spkr.train --shards shards/demo --config tiny --out runs/demo
    torchrun --nproc_per_node 2 -m spkr.train --shards shards/demo --config configs/tiny.toml --out runs/demo
    torchrun --nnodes 2 --nproc_per_node 8 ... -m spkr.train --shards s3://bucket/train.960 ...

Without ``--out`` the run directory is ``runs/<last part of --shards>``, or the next free
``runs/<name>-N`` when that one already holds a run; without ``--config`` the config is the bundled
``mamba-ssm`` on CUDA with the mamba_ssm kernels, else ``mamba-torch`` (``--config`` takes a file or a
bundled config's name: ``tiny``, ``mamba2-torch`` ...).

DDP is on when torchrun's environment is present (RANK/WORLD_SIZE/LOCAL_RANK): nccl on GPUs, gloo on
CPU. Settings come from the config file's ``[train]`` table (:class:`TrainConfig`), then from the
command line (one flag per field, ``--batch-size 64``, ``--no-compile``, ``--dtype fp32`` ...).

Loop: AdamW, linear warmup + cosine decay per optimizer step, gradient accumulation (DDP ``no_sync``
on the non-final micro-steps), class-weighted cross-entropy (the manifest's class weights), gradient
clipping, autocast (``dtype = "auto"``: :func:`spkr.run.distributed.resolve_dtype`, bf16 where the device
computes it natively, fp16 + GradScaler on older GPUs, fp32 on CPUs without native bf16), torch.compile
(``compile = "auto"``: on CUDA only).
Every epoch: ``valid`` loss/accuracy (each sample exactly once over the ranks, sums all-reduced once),
``<out>/ckpt-epochNNN.pt`` and ``<out>/last.pt``; every ``--ckpt-every`` steps ``<out>/last.pt``. At the
end: ``test`` loss/accuracy and verification EER/minDCF. Metrics: ``<out>/metrics.jsonl`` (rank 0).

Layout: this file is the command line and :func:`train`, read top to bottom; the parts live in
:mod:`spkr.run` (distributed, configs, rundir, checkpoint, metrics, evaluation, mel_augment, trainer).
Errors the user can fix are one line on stderr and exit status 2 (:func:`spkr.run.cli.cli_main`).

Resume: ``--resume``, or automatically when torchrun restarts the job (TORCHELASTIC_RESTART_COUNT > 0)
or an explicit ``--out`` holds ``last.pt`` (``--fresh`` ignores it): model, optimizer, schedule, scaler,
RNG and every rank's loader position are restored, so training continues mid-epoch with exactly the
samples not yet consumed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from spkr.config import ConfigError, add_storage_options
from spkr.run import trainer
from spkr.run.checkpoint import Position
from spkr.run.cli import cli_main
from spkr.run.configs import (
    TrainConfig,
    bundled_configs,
    compile_setting,
    config_source,
    load_configs,
    resolve_compile,
    resolve_config,
)
from spkr.run.distributed import DTYPE_CHOICES, resolve_dtype, restart_count, setup, teardown
from spkr.run.metrics import Logger
from spkr.run.rundir import (
    agree_on_run_dir,
    release_unused_run_dir,
)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (usage errors exit 2, an unknown ``--config`` among them)."""
    p = argparse.ArgumentParser(
        prog="python -m spkr.train",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shards", required=True, help="shards directory or URL (s3://bucket/prefix)")
    p.add_argument(
        "--config",
        default=None,
        help="TOML config with [model] and [train] tables: a file, or the name of a bundled config ("
        + ", ".join(bundled_configs())
        + "). Default: mamba-ssm on CUDA when mamba_ssm imports, else mamba-torch",
    )
    p.add_argument(
        "--out",
        default=None,
        help="run directory (checkpoints, metrics.jsonl). Default: runs/<last part of --shards>, or the "
        "next free runs/<name>-N when that one already holds a run",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="resume from <out>/last.pt (error if absent); without --out: the latest run of "
        "runs/<name>[-N] that has a checkpoint",
    )
    p.add_argument("--fresh", action="store_true", help="start over even if <out>/last.pt exists")
    add_storage_options(p)
    p.add_argument(
        "--profile", action="store_true", help="write a torch.profiler Chrome trace of a few steps, exit"
    )
    p.add_argument(
        "--data-only", action="store_true", help="only run the data pipeline (spkr.stream.data_only)"
    )
    p.add_argument("--log-keys", default=None, help="with --data-only: write the keys each rank reads here")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no rich progress bar")
    p.add_argument(
        "--stop-at-step",
        type=int,
        default=0,
        metavar="N",
        help="pause after optimizer step N: write <out>/last.pt and exit unfinished (the schedule is "
        "unchanged); run again with the same --out (or with --resume) to continue exactly where it stopped",
    )
    add_train_overrides(p)
    args = p.parse_args(argv)
    if args.config is not None:
        try:
            resolve_config(args.config)
        except ConfigError as e:
            p.error(str(e))
    return args


def add_train_overrides(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field (``--batch-size``, ``--compile``/``--no-compile`` ...)."""
    g = p.add_argument_group("[train] overrides (default: the config file, else the value shown)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "compile":  # --compile [auto|true|false], --no-compile
            g.add_argument(
                flag, dest=f.name, nargs="?", const=True, type=compile_setting, default=None,
                metavar="auto|true|false", help='(default "auto": on for CUDA, off on CPU)',
            )  # fmt: skip
            g.add_argument("--no-compile", dest=f.name, action="store_const", const=False)
        elif f.type in ("bool", bool):
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "dtype":
            g.add_argument(flag, dest=f.name, choices=DTYPE_CHOICES, default=None)
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            g.add_argument(flag, dest=f.name, type=typ, default=None, help=f"(default {f.default})")


def run_data_only(args) -> int:
    """``--data-only``: the data pipeline alone (:func:`spkr.stream.data_only.run`) with the run's
    [train] settings and ``--storage-options``."""
    from spkr.stream.data_only import DataOnly
    from spkr.stream.data_only import run as data_only

    _, cfg = load_configs(args)
    return data_only(
        DataOnly(
            args.shards, batch_size=cfg.batch_size, epochs=cfg.epochs, workers=cfg.num_workers,
            seed=cfg.seed, crop_frames=cfg.crop_frames or None, log_keys=args.log_keys,
            max_steps=cfg.max_steps or None, storage_options=args.storage_options,
        )
    )  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.data_only:
        return cli_main("train", run_data_only, args)

    def cleanup() -> None:
        release_unused_run_dir(args)
        teardown()

    return cli_main("train", train, args, cleanup=cleanup)


def train(args) -> int:
    """One training run, top to bottom (each part: :mod:`spkr.run.trainer`)."""
    t_start = time.time()
    model_cfg, cfg = load_configs(args)
    _, config_note = config_source(args)
    trainer.check_shards(args.shards)
    env = setup(args.device)

    # where: the run directory, and whether this is a resume
    restart = restart_count()
    out, resume, notes = agree_on_run_dir(args, restart, env)
    out.mkdir(parents=True, exist_ok=True)
    logger = Logger(out, env.master, progress=not args.no_progress)
    for line in (*notes, config_note):
        logger.log(line)
    amp_dtype, dtype_reason = resolve_dtype(cfg.dtype, env.device)
    trainer.seed_rank(cfg.seed, env.rank)

    # what: data, model, optimizer, schedule (restored from last.pt on a resume), compiled and wrapped
    data = trainer.build_data(args.shards, cfg, env, args.storage_options)
    t = trainer.Trainer(model_cfg, cfg, env, data, amp_dtype, logger, out, args.shards)
    pos = t.restore(restart) if resume else Position()
    planned_samples = data.total_steps * cfg.grad_accum * cfg.batch_size * env.world
    use_compile = resolve_compile(cfg.compile, env.device, planned_samples)
    t.wrap(use_compile[0])
    t.log_start(pos.step if resume else None, use_compile, dtype_reason)
    profiler = trainer.StepProfiler(out, env.rank, env.device, logger) if args.profile else None

    # the loop: epochs of optimizer steps; validation and checkpoints at each epoch's end
    t.model.train()
    stop, outcome = pos.finished or pos.step >= data.total_steps, "end"
    while not stop and outcome != "paused" and pos.epoch < cfg.epochs:
        outcome = t.train_epoch(pos, args.stop_at_step, profiler)
        if outcome == "profiled":
            logger.close()
            return 0
        stop = t.end_epoch(pos, outcome)
    if outcome == "paused" and not stop:
        again = f"--out {out}" if args.out is not None else f"--out {out} (or --resume)"
        logger.log(f"paused after step {pos.step} (--stop-at-step): run again with {again} to continue")
        logger.close()
        return 0

    t.final_test(pos)
    logger.log(f"done in {time.time() - t_start:.1f} s; checkpoint {t.last}")
    logger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

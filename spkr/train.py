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
clipping, autocast (bf16 on CPU and on GPUs that have it, else fp16 + GradScaler), torch.compile
(``compile = "auto"``: on CUDA only).
Every epoch: ``valid`` loss/accuracy (each sample exactly once over the ranks, sums all-reduced once),
``<out>/ckpt-epochNNN.pt`` and ``<out>/last.pt``; every ``--ckpt-every`` steps ``<out>/last.pt``. At the
end: ``test`` loss/accuracy and verification EER/minDCF. Metrics: ``<out>/metrics.jsonl`` (rank 0).

Resume: ``--resume``, or automatically when torchrun restarts the job (TORCHELASTIC_RESTART_COUNT > 0)
or an explicit ``--out`` holds ``last.pt`` (``--fresh`` ignores it): model, optimizer, schedule, scaler,
RNG and every rank's loader position are restored, so training continues mid-epoch with exactly the
samples not yet consumed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from spkr import storage
from spkr.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    check_dataset,
    rng_state,
    save_atomic,
    set_rng_state,
    to_plain,
    weights_fingerprint,
)
from spkr.checkpoint import load as load_checkpoint
from spkr.config import ConfigError, add_storage_options, from_dict, load_toml, to_dict
from spkr.evaluate import autocast_ctx, run_split, summarise
from spkr.manifest import ManifestError
from spkr.scoring import verification


@dataclass
class TrainConfig:
    """The ``[train]`` table of a config file; every field is also a command-line flag."""

    epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    batch_size: int = 32  # per rank and micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    eval_batch_size: int = 64
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of lr
    warmup_steps: int = 100
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    label_smoothing: float = 0.0
    class_weighted: bool = True  # cross-entropy weighted by the manifest's class weights
    crop_frames: int = 300  # random training crops of this many frames (0 = whole utterances)
    freq_masks: int = 0  # SpecAugment: this many frequency masks per training utterance ...
    freq_mask_width: int = 8  # ... each up to this many mel bins wide
    time_masks: int = 0  # SpecAugment: this many time masks per training utterance ...
    time_mask_width: int = 20  # ... each up to this many frames long
    num_workers: int = 2  # DataLoader workers per rank
    seed: int = 0
    dtype: str = "auto"  # "auto" | "bf16" | "fp16" | "fp32" (autocast dtype; auto = bf16 if supported)
    compile: bool | str = "auto"  # torch.compile the training model: true | false | "auto" (CUDA only)
    ckpt_every: int = 0  # also write last.pt every N optimizer steps (0 = only at epoch ends)
    log_every: int = 10  # steps between metrics lines
    eval_every: int = 1  # validate every N epochs (and after the last)
    verify_pairs: int = 200_000  # trial pairs for the final EER/minDCF (0 = all pairs)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise ValueError(f'compile must be true, false or "auto", got {self.compile!r}')
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_steps", "warmup_steps", "crop_frames", "num_workers", "ckpt_every", "verify_pairs",
            "freq_masks", "freq_mask_width", "time_masks", "time_mask_width",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need lr > 0 and 0 <= min_lr_ratio <= 1")


def spec_augment(mel: torch.Tensor, lengths: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """SpecAugment masking (zero = the normalised mean) of a (B, T, F) batch, within each utterance's
    length; widths uniform in [0, width]. Uses the global torch RNG (saved in checkpoints)."""
    if not cfg.freq_masks and not cfg.time_masks:
        return mel
    B, T, n_freq = mel.shape
    keep = torch.ones(B, T, n_freq, dtype=torch.bool)
    f_idx = torch.arange(n_freq)[None, :]
    t_idx = torch.arange(T)[None, :]
    for _ in range(cfg.freq_masks):
        w = torch.randint(0, cfg.freq_mask_width + 1, (B, 1))
        f0 = (torch.rand(B, 1) * (n_freq - w + 1)).long()
        keep &= ~((f_idx >= f0) & (f_idx < f0 + w))[:, None, :]
    lens = lengths.cpu()[:, None]
    for _ in range(cfg.time_masks):
        w = torch.minimum(torch.randint(0, cfg.time_mask_width + 1, (B, 1)), lens // 5)
        t0 = (torch.rand(B, 1) * (lens - w + 1).clamp(min=1)).long()
        keep &= ~((t_idx >= t0) & (t_idx < t0 + w))[:, :, None]
    return mel * keep.to(mel.device, mel.dtype)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr before optimizer step ``step`` (0-based): linear warmup to 1 over
    ``warmup_steps`` steps ((step+1)/warmup), then cosine from 1 down to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def new_log_window() -> dict:
    """Running sums between two metrics lines (time, data wait, steps, samples, loss, correct)."""
    return {
        "t": time.perf_counter(),
        "wait": 0.0,
        "steps": 0,
        "samples": 0,
        "loss": 0.0,
        "correct": 0,
        "n": 0,
    }


# --------------------------------------------------------------------------- command line


class TrainError(RuntimeError):
    """A problem the user can fix (bad input, incompatible checkpoint); printed without a traceback."""


# --------------------------------------------------------------------------- configs, compile, run directory

RUNS_ROOT = Path("runs")  # default run directories: runs/<name of --shards>[-N], relative to the cwd
RUN_MARKER = "run.json"  # written first into a default run directory: which job claimed it


def compile_setting(text: str) -> bool | str:
    """``type=`` of ``--compile [auto|true|false]``."""
    v = text.strip().lower()
    if v == "auto":
        return "auto"
    if v in ("true", "on", "yes", "1"):
        return True
    if v in ("false", "off", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}")


# CPU: torch.compile trains the demo config 1.23x (cold inductor cache) - 1.29x (warm) faster, but the
# first step comes 191 s later with a cold cache (26 s warm) on 2 cores (tools/bench_train.py; README):
# it pays back after ~40k training samples with a cold cache. "auto" compiles on CPU from this many.
CPU_COMPILE_MIN_SAMPLES = 50_000


def resolve_compile(
    setting: bool | str, device: torch.device, planned_samples: int | None = None
) -> tuple[bool, str]:
    """(compile or not, why). "auto": on for CUDA; on CPU only when the run trains on at least
    CPU_COMPILE_MIN_SAMPLES samples (``planned_samples``), where the compile time pays back."""
    if setting != "auto":
        return bool(setting), "as configured"
    if device.type == "cuda":
        return True, "auto: on for CUDA"
    if planned_samples is not None and planned_samples >= CPU_COMPILE_MIN_SAMPLES:
        return True, f"auto: on for CPU, {planned_samples} training samples repay the compile time"
    return False, (
        f"auto: off on CPU for {planned_samples if planned_samples is not None else 'an unknown number of'} "
        f"training samples (a cold compile takes minutes; it pays back from ~{CPU_COMPILE_MIN_SAMPLES})"
    )


def wants_cuda(device_arg: str | None) -> bool:
    """Whether the run will use CUDA (``--device``, else whether a GPU is visible)."""
    return torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")


def bundled_configs_dir() -> Path:
    """The configs shipped inside the package (spkr/configs/; the repo's top-level ``configs`` is a
    symlink to it, so an edit there is what an editable install reads)."""
    return Path(__file__).resolve().parent / "configs"


def bundled_configs() -> dict[str, Path]:
    """{name: path} of the bundled configs (``tiny`` -> .../spkr/configs/tiny.toml)."""
    d = bundled_configs_dir()
    return {p.stem: p for p in sorted(d.glob("*.toml"))} if d.is_dir() else {}


def resolve_config(spec: str) -> Path:
    """A ``--config`` value as a file: an existing path as given, else the bundled config of that name
    (``tiny``, ``mamba2-torch``, ``tiny.toml``). Otherwise a ConfigError listing the bundled names."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    available = bundled_configs()
    name = spec[: -len(".toml")] if spec.endswith(".toml") else spec
    if "/" not in spec and os.sep not in spec and name in available:
        return available[name]
    what = "is a directory" if path.is_dir() else "no such file"
    names = ", ".join(available) or "none found"
    raise ConfigError(
        f"--config {spec}: {what}, and no bundled config of that name (bundled: {names}, in {bundled_configs_dir()})"
    )


def default_config(device_arg: str | None) -> tuple[str, str]:
    """(bundled config name, why) used without ``--config``: mamba-ssm where its CUDA kernels run,
    else the pure-PyTorch Mamba-1 with the same weights, mamba-torch."""
    if not wants_cuda(device_arg):
        return "mamba-torch", "default for cpu; mamba-ssm needs CUDA"
    from spkr.models import mamba_ssm_available

    why = mamba_ssm_available()
    if why is None:
        return "mamba-ssm", "default for cuda with the mamba_ssm kernels"
    return "mamba-torch", f"default for cuda without mamba_ssm: {why}"


def config_source(args) -> tuple[Path, str]:
    """(config file, log line) for ``args``: ``--config`` resolved, else :func:`default_config`."""
    if args.config is not None:
        path = resolve_config(args.config)
        return path, f"config: {args.config}" + ("" if str(path) == args.config else f" ({path})")
    name, why = default_config(args.device)
    path = bundled_configs().get(name)
    if path is None:
        raise ConfigError(f"default config {name!r} missing from {bundled_configs_dir()}; use --config")
    return path, f"config: {name} ({why}; {path}; --config NAME|FILE picks another)"


def shards_name(shards: str) -> str:
    """The default run name of a shards location: its last path component (``shards/train.960`` ->
    ``train.960``, ``s3://bucket/sets/train.960/`` -> ``train.960``, ``s3://bucket`` -> ``bucket``)."""
    s = str(shards).rstrip("/") or str(shards)
    if storage.is_url(s):
        from urllib.parse import urlsplit

        u = urlsplit(s)
        name = u.path.rstrip("/").rsplit("/", 1)[-1] or u.netloc
    else:
        name = Path(os.path.abspath(s or ".")).name  # "." -> the directory's own name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def _job_identity() -> dict:
    """What a torchrun restart of this job has in common with its first attempt: the rendezvous run id
    (a fresh uuid per single-node torchrun) and the agent (host, pid) that spawns this worker."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return {"run_id": run_id, "agent": f"{socket.gethostname()}:{os.getppid()}" if run_id else None}


def _same_job(run_dir: Path, me: dict) -> bool:
    """Whether ``run_dir`` was claimed by an earlier attempt of this torchrun job."""
    if not me["run_id"]:
        return False
    try:
        marker = json.loads((run_dir / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("run_id") != me["run_id"]:
        return False
    # torchrun's default --rdzv-id on several nodes is the literal "none": then the agent must match too
    return me["run_id"] != "none" or marker.get("agent") == me["agent"]


def _runs_of(base: Path) -> list[Path]:
    """Existing run directories ``base``, ``base-2``, ``base-3`` ... in that order."""
    pattern = re.compile(re.escape(base.name) + r"(?:-(\d+))?")
    found = []
    if base.parent.is_dir():
        for p in base.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and p.is_dir() and (m.group(1) is None or int(m.group(1)) >= 2):
                found.append((int(m.group(1) or 1), p))
    return [p for _, p in sorted(found)]


def _claim(run_dir: Path, marker: dict, take_over: bool = False) -> bool:
    """Make ``run_dir`` this job's: True if it is new or empty (or ``take_over``) and no other process
    claimed it first (the marker is created exclusively)."""
    if run_dir.exists() and not take_over:
        if not run_dir.is_dir() or any(run_dir.iterdir()):
            return False
    run_dir.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(marker, indent=1) + "\n").encode()
    if take_over:
        from spkr.atomic import write_bytes

        write_bytes(run_dir / RUN_MARKER, data)
        return True
    try:
        with open(run_dir / RUN_MARKER, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


def decide_run_dir(args, restart: int) -> tuple[Path, bool, list[str]]:
    """(run directory, resume, log lines); rank 0 decides, the other ranks receive the result.

    ``--out DIR``: that directory; resume with ``--resume`` (an error without ``DIR/last.pt``), after a
    torchrun restart, or whenever ``DIR/last.pt`` exists, unless ``--fresh``.

    Without ``--out``: ``runs/<name of --shards>`` when it is new or empty, else the next free
    ``runs/<name>-N`` (a second run never writes into another's directory). ``--resume`` continues
    the latest of them that has a ``last.pt``. A torchrun restart (TORCHELASTIC_RESTART_COUNT > 0)
    returns to the directory its first attempt claimed (``run.json`` names the job) and resumes
    from its ``last.pt`` if one was written.
    """
    if args.out is not None:
        out = Path(args.out)
        last = out / "last.pt"
        if args.resume and not last.exists():
            raise TrainError(f"--resume: no checkpoint at {last}")
        resume = not args.fresh and (args.resume or restart > 0 or last.exists())
        if restart > 0 and not last.exists():
            resume = False  # restarted before the first checkpoint: start over
        return out, resume, [f"run dir {out}"]

    base = RUNS_ROOT / shards_name(args.shards)
    me = _job_identity()
    marker = {"shards": str(args.shards), **me, "time": time.time()}
    runs = _runs_of(base)
    if restart > 0:
        for d in reversed(runs):
            if _same_job(d, me):
                resume = (d / "last.pt").exists()
                return d, resume, [f"run dir {d} (torchrun restart {restart} of the job that started it)"]
    if args.resume:
        with_ckpt = [d for d in runs if (d / "last.pt").exists()]
        if not with_ckpt:
            raise TrainError(
                f"--resume: no run directory {base} or {base}-N holds a checkpoint (last.pt); "
                "--out DIR names the run to resume"
            )
        out = with_ckpt[-1]
        _claim(out, marker, take_over=True)  # a torchrun restart of this job finds it again
        return out, True, [f"run dir {out} (--resume: the latest run of {base.name} with a checkpoint)"]
    n = 1
    while True:
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if _claim(out, marker):
            break
        n += 1
    args.run_claim = (out, marker)  # released by main() if the run fails before writing anything
    notes = [f"run dir {out} (default for --shards {args.shards}: runs/<its name>; --out DIR picks another)"]
    if out != base:
        notes.append(
            f"{base} already holds a run, so this one goes to {out} (--resume continues the latest run "
            "instead, --out DIR picks a directory)"
        )
    return out, False, notes


def release_unused_run_dir(args) -> None:
    """Remove the default run directory this process claimed if nothing but its own ``run.json`` was
    written (the run failed at start, e.g. on the manifest): the next attempt gets that name again."""
    claim = getattr(args, "run_claim", None)
    if claim is None:
        return
    out, marker = claim
    args.run_claim = None
    try:
        unused = [p.name for p in out.iterdir()] == [RUN_MARKER]
        if unused and json.loads((out / RUN_MARKER).read_text()) == marker:
            (out / RUN_MARKER).unlink()
            out.rmdir()
    except (OSError, ValueError):
        pass


def agree_on_run_dir(args, restart: int, ddp: bool, master: bool) -> tuple[Path, bool, list[str]]:
    """:func:`decide_run_dir` on rank 0, broadcast to every rank (they could race each other to the
    directory otherwise); an error there is raised on every rank."""
    decision = None
    if master:
        try:
            out, resume, notes = decide_run_dir(args, restart)
            decision = (str(out), resume, notes, None)
        except TrainError as e:
            decision = (None, False, [], str(e))
        except OSError as e:
            decision = (None, False, [], f"run directory: {e}")
    if ddp:
        box = [decision]
        dist.broadcast_object_list(box, src=0)
        decision = box[0]
    out, resume, notes, error = decision
    if error is not None:
        raise TrainError(error)
    return Path(out), resume, notes


def parse_args(argv=None) -> argparse.Namespace:
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
            g.add_argument(flag, dest=f.name, choices=("auto", "bf16", "fp16", "fp32"), default=None)
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            g.add_argument(flag, dest=f.name, type=typ, default=None, help=f"(default {f.default})")
    args = p.parse_args(argv)
    if args.config is not None:
        try:
            resolve_config(args.config)
        except ConfigError as e:
            p.error(str(e))
    return args


def load_configs(args):
    """(ModelConfig, TrainConfig) from --config (default: :func:`config_source`) and the command-line
    overrides."""
    from spkr.models.config import ModelConfig

    path, _ = config_source(args)
    data = load_toml(path)
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown} (known: ['model', 'train'])")
    model_cfg = from_dict(ModelConfig, data.get("model"), f"{path} [model]")
    train_dict = dict(data.get("train") or {})
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            train_dict[f.name] = v
    train_cfg = from_dict(TrainConfig, train_dict, f"{path} [train]")
    return model_cfg, train_cfg


# --------------------------------------------------------------------------- distributed helpers


def setup_distributed(device_arg: str | None):
    ddp = (
        int(os.environ.get("RANK", -1)) != -1
        and int(os.environ.get("WORLD_SIZE", 1)) >= 1
        and "MASTER_ADDR" in os.environ
    )
    use_cuda = wants_cuda(device_arg)
    if ddp:
        rank, world, local = (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
        if use_cuda:
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        backend = "nccl" if use_cuda else "gloo"
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restart > 0:
            # After a torchrun restart the agent's store still holds the previous attempt's gloo
            # addresses under the same keys (connectFullMesh then dials dead workers): use a
            # fresh key prefix per attempt.
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                world,
                is_master=not agent_store and rank == 0,
                timeout=datetime.timedelta(minutes=10),
            )
            store = dist.PrefixStore(f"spkr/attempt{restart}", store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
        else:
            dist.init_process_group(backend=backend)
    else:
        rank, world, local = 0, 1, 0
        device = torch.device("cuda" if use_cuda else "cpu")
    return ddp, rank, world, local, device


def cpu_has_native_bf16() -> bool:
    """x86 AVX512-BF16 / AMX-BF16 or the Arm ``bf16`` feature (from /proc/cpuinfo). Elsewhere autocast
    emulates bf16: the tiny model's fwd+bwd ran 2.3-3x slower than fp32 on an AVX2-only Zen 3."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "Features"))]
    except OSError:
        return False
    flags = {flag for ln in lines for flag in ln.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(autocast dtype, why): "auto" is bf16 where the device computes it natively (CUDA with bf16,
    CPUs with AVX512-BF16/AMX), fp16 + GradScaler on older GPUs, fp32 on other CPUs."""
    if name != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name], "as configured"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU supports bf16"
        return torch.float16, "auto: the GPU has no bf16"
    if cpu_has_native_bf16():
        return torch.bfloat16, "auto: the CPU has native bf16 (AVX512-BF16/AMX)"
    return torch.float32, "auto: the CPU has no native bf16 (it would be emulated, ~2-3x slower)"


def all_reduce_sums(values: list[float], device, ddp: bool) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather(obj, ddp: bool, world: int):
    if not ddp:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- logging


class Logger:
    """metrics.jsonl + console lines (rank 0 only)."""

    def __init__(self, out: Path | None, enabled: bool, progress: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl" if out else None
        self.progress = None
        self.task = None
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True, highlight=False)
            if progress and self.console.is_terminal:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.progress = Progress(
                    TextColumn("[bold]epoch {task.fields[epoch]}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"),
                    TimeRemainingColumn(),
                    console=self.console,
                    transient=False,
                )
                self.progress.start()

    def log(self, msg: str) -> None:
        if self.enabled:
            self.console.print(f"[train] {msg}", markup=False, soft_wrap=True)

    def metrics(self, row: dict) -> None:
        if self.enabled and self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def start_epoch(self, epoch: int, total: int, done: int) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task("train", total=total, completed=done, epoch=epoch, stats="")

    def advance(self, n: int, stats: str | None = None) -> None:
        if self.progress is not None and self.task is not None:
            kw = {"stats": stats} if stats is not None else {}
            self.progress.update(self.task, advance=n, **kw)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# --------------------------------------------------------------------------- training


def make_loader(
    args, cfg: TrainConfig, split: str, train: bool, rank: int, world: int, opts: dict, manifest=None
):
    """A split's loader; evaluation loaders share the training loader's manifest (one dataset, one
    normalisation, even if the directory changes under the run)."""
    from spkr.stream.loader import SpeakerLoader

    return SpeakerLoader(
        args.shards,
        split,
        cfg.batch_size if train else cfg.eval_batch_size,
        train=train,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
        num_workers=cfg.num_workers,
        crop_frames=(cfg.crop_frames or None) if train else None,
        normalize=True,
        dtype="float16",  # half the shared-memory pages per batch; cast to float32 on the device
        storage_options=opts,
        manifest=manifest,
    )


def check_shards(shards: str, opts: dict) -> None:
    """Clear errors for a missing/empty shards directory before anything else reads it."""
    if storage.is_url(shards):
        return
    p = Path(shards)
    if not p.exists():
        raise TrainError(f"{shards}: shards directory not found (make it with python -m spkr.tools.shard)")
    if not p.is_dir():
        raise TrainError(f"{shards}: not a directory")
    if not any(p.iterdir()):
        raise TrainError(f"{shards}: shards directory is empty (make it with python -m spkr.tools.shard)")


def evaluate_distributed(
    raw_model, loader, device, amp_dtype, ddp: bool, embeddings: bool = False, world: int = 1
):
    """Each rank evaluates its own samples with the unwrapped model; sums are all-reduced once."""
    sums = run_split(raw_model, loader, device, amp_dtype, embeddings=embeddings)
    loss_sum, correct, count = all_reduce_sums(
        [sums["loss_sum"], sums["correct"], sums["count"]], device, ddp
    )
    res = summarise({"loss_sum": loss_sum, "correct": correct, "count": count})
    if embeddings:
        parts = gather((sums["emb"], sums["labels"]), ddp, world)
        embs = [e for e, _ in parts if len(e)]
        labs = [lab for _, lab in parts if len(lab)]
        res["emb"] = np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)
        res["labels"] = np.concatenate(labs) if labs else np.zeros(0, np.int64)
    return res


def measured(raw_model, manifest, amp_dtype) -> dict:
    """The fields of a valid/test row of metrics.jsonl that say what it measured: the dataset, the
    exact weights (``weights_fingerprint`` of the state dict; the checkpoint written next holds the
    same) and the autocast dtype. ``chart_losses`` reuses a row for a checkpoint only when they match."""
    return {
        "dataset_id": manifest.dataset_id,
        "weights": weights_fingerprint(raw_model.state_dict()),
        "eval_dtype": str(amp_dtype or torch.float32).replace("torch.", ""),
    }


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.data_only:
        from spkr.stream.data_only import main as data_only_main

        try:
            _, cfg = load_configs(args)
        except ConfigError as e:
            raise SystemExit(f"[train] error: {e}") from None
        d_argv = ["--shards", args.shards, "--batch-size", str(cfg.batch_size), "--epochs", str(cfg.epochs)]
        d_argv += ["--workers", str(cfg.num_workers), "--seed", str(cfg.seed)]
        if cfg.crop_frames:
            d_argv += ["--crop-frames", str(cfg.crop_frames)]
        if args.log_keys:
            d_argv += ["--log-keys", args.log_keys]
        if cfg.max_steps:
            d_argv += ["--max-steps", str(cfg.max_steps)]
        return data_only_main(d_argv) or 0
    try:
        return train(args)
    except (TrainError, ConfigError, ManifestError, CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"[train] error: {e}") from None
    finally:
        release_unused_run_dir(args)
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def train(args) -> int:
    t_start = time.time()
    model_cfg, cfg = load_configs(args)
    _, config_note = config_source(args)
    opts = storage.storage_options_from_env(args.storage_options)
    check_shards(args.shards, opts)

    ddp, rank, world, local_rank, device = setup_distributed(args.device)
    master = rank == 0
    # ------------------------------------------------------------ run directory and resume decision
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    out, resume, run_notes = agree_on_run_dir(args, restart, ddp, master)
    last = out / "last.pt"
    out.mkdir(parents=True, exist_ok=True)
    amp_dtype, dtype_reason = resolve_dtype(cfg.dtype, device)
    use_scaler = amp_dtype == torch.float16
    logger = Logger(out, master, progress=not args.no_progress)
    for line in (*run_notes, config_note):
        logger.log(line)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed((cfg.seed + rank) % 2**32)

    # ------------------------------------------------------------ data
    train_loader = make_loader(args, cfg, "train", True, rank, world, opts)
    manifest = train_loader.manifest
    valid_loader = make_loader(args, cfg, "valid", False, rank, world, opts, train_loader.manifest)
    test_loader = make_loader(args, cfg, "test", False, rank, world, opts, train_loader.manifest)
    labels = manifest.labels
    n_mels = manifest.feature_config.n_mels
    train_loader.set_epoch(0)
    micro_per_epoch = len(train_loader)
    if micro_per_epoch == 0:
        raise TrainError(f"{args.shards}: no training batches for rank {rank} (world size {world})")
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    planned = total_steps * cfg.grad_accum * cfg.batch_size * world
    use_compile, compile_reason = resolve_compile(cfg.compile, device, planned)

    # ------------------------------------------------------------ model, optimizer, schedule
    from spkr.models import build_model

    raw_model = build_model(model_cfg, n_mels, len(labels)).to(device)
    n_params = sum(p.numel() for p in raw_model.parameters())
    optimizer = torch.optim.AdamW(
        raw_model.param_groups(cfg.weight_decay),  # the model's: norms, biases, A_log, D not decayed
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    class_weights = torch.tensor(manifest.class_weights, dtype=torch.float32, device=device)

    step, epoch, batches_done, finished = 0, 0, 0, False
    loader_state = None
    if resume:
        ckpt = load_checkpoint(last, map_location=device)
        try:  # the same dataset (features, labels, split assignment), or the resume would mix data
            check_dataset(ckpt, manifest, f"checkpoint {last}")
        except ManifestError as e:
            raise TrainError(f"cannot resume from {last}: {e}") from None
        if ckpt["model_config"] != to_dict(model_cfg):
            diff = sorted(
                k for k in ckpt["model_config"] if ckpt["model_config"][k] != to_dict(model_cfg).get(k)
            )
            raise TrainError(
                f"cannot resume from {last}: the [model] config differs from the checkpoint's in {diff}"
            )
        if ckpt["world_size"] != world and ckpt["batches_done"] > 0:
            raise TrainError(
                f"cannot resume {last} mid-epoch with world size {world}: it was written by {ckpt['world_size']} ranks"
            )
        raw_model.load_state_dict(ckpt["model"])
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # e.g. Mamba-1's A_log moved to the no-decay group (issue 13)
            raise TrainError(
                f"cannot resume from {last}: its optimizer parameter groups differ from this model's "
                f"weight-decay groups ({e}); start over with --fresh"
            ) from None
        scheduler.load_state_dict(ckpt["scheduler"])
        if use_scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, epoch, batches_done = ckpt["step"], ckpt["epoch"], ckpt["batches_done"]
        finished = bool(ckpt.get("finished"))
        if ckpt["world_size"] == world and rank < len(ckpt["rng"]):
            set_rng_state(ckpt["rng"][rank])
        if batches_done > 0:
            loader_state = ckpt["loader"][rank]
        logger.log(
            f"resumed from {last} (restart {restart}): epoch {epoch}, step {step}, "
            f"{batches_done}/{micro_per_epoch} batches of the epoch done"
        )
        del ckpt

    model = raw_model
    if use_compile:
        model = torch.compile(model, dynamic=True)  # crops and eval vary T: one graph, no recompiles
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    dropped = train_loader.dropped
    logger.log(
        f"world size {world} ({'DDP ' + dist.get_backend() if ddp else 'single process'}), device {device}, "
        f"backend {raw_model.backend_name()}, compile {'on' if use_compile else 'off'} ({compile_reason}), "
        f"dtype {str(amp_dtype).replace('torch.', '')}{' + GradScaler' if use_scaler else ''} ({dtype_reason}), "
        f"{n_params / 1e6:.2f}M params, {len(labels)} classes"
    )
    logger.log(
        f"train: dataset {manifest.dataset_id}, {manifest.split('train').num_samples} samples, {dropped} dropped per epoch for equal rank shares, "
        f"{micro_per_epoch} batches/rank/epoch of {cfg.batch_size} x {cfg.grad_accum} accum, "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps"
    )
    if master:
        logger.metrics(
            {
                "kind": "config",
                "time": time.time(),
                "dataset_id": manifest.dataset_id,
                "shards": str(args.shards),
                "world_size": world,
                "backend": raw_model.backend_name(),
                "compile": use_compile,
                "dtype": str(amp_dtype).replace("torch.", ""),
                "dropped": dropped,
                "params": n_params,
                "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps,
                "resumed_step": step if resume else None,
                "train": to_dict(cfg),
                "model": to_dict(model_cfg),
            }
        )

    def checkpoint(paths: list[Path], done: int, ep: int, fin: bool = False) -> None:
        loader_states = gather(to_plain(train_loader.state_dict()) if done else None, ddp, world)
        rngs = gather(rng_state(), ddp, world)
        if not master:
            return
        obj = {
            "format": FORMAT,
            "version": VERSION,
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": to_plain(scheduler.state_dict()),
            "scaler": scaler.state_dict() if use_scaler else None,
            "rng": rngs,
            "loader": loader_states,
            "step": step,
            "epoch": ep,
            "batches_done": done,
            "finished": fin,
            "world_size": world,
            "labels": labels,
            "class_weights": manifest.class_weights,
            "feature_config": manifest.feature_config.to_dict(),
            "feature_fingerprint": manifest.feature_config.fingerprint(),
            "dataset_id": manifest.dataset_id,
            "stats": to_plain(manifest.stats),
            "model_config": to_dict(model_cfg),
            "train_config": to_dict(cfg),
            "shards": str(args.shards),
            "backend": raw_model.backend_name(),
            "torch_version": str(torch.__version__),
        }
        save_atomic(obj, *paths)

    # ------------------------------------------------------------ profiler
    prof = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile, schedule

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        trace = out / f"trace-rank{rank}.json"
        prof = profile(
            activities=acts,
            schedule=schedule(wait=1, warmup=2, active=3, repeat=1),
            on_trace_ready=lambda p: p.export_chrome_trace(str(trace)),
            record_shapes=True,
        )
        prof.start()
        profile_steps = 6

    # ------------------------------------------------------------ loop
    model.train()
    stop = finished or step >= total_steps
    paused = False  # --stop-at-step reached: checkpoint and exit unfinished
    while not stop and not paused and epoch < cfg.epochs:
        train_loader.set_epoch(epoch)
        if loader_state is not None:
            try:
                train_loader.load_state_dict(loader_state)
            except ValueError as e:
                raise TrainError(f"cannot resume from {last}: {e}") from None
            loader_state = None
        micro = batches_done
        logger.start_epoch(epoch, micro_per_epoch, micro)
        it = iter(train_loader)
        win = new_log_window()
        while micro < micro_per_epoch:
            group_start = micro - (micro % cfg.grad_accum)
            group_size = min(cfg.grad_accum, micro_per_epoch - group_start)
            for _ in range(micro - group_start, group_size):
                t0 = time.perf_counter()
                batch = next(it)
                win["wait"] += time.perf_counter() - t0
                mel = batch["mel"].to(device, non_blocking=True).float()
                lengths = batch["lengths"].to(device, non_blocking=True)
                y = batch["labels"].to(device, non_blocking=True)
                mel = spec_augment(mel, lengths, cfg)
                last_micro = micro - group_start == group_size - 1
                sync = contextlib.nullcontext() if (not ddp or last_micro) else model.no_sync()
                with sync:
                    with autocast_ctx(device, amp_dtype):
                        logits = model(mel, lengths, y)
                    loss = F.cross_entropy(
                        logits.float(),
                        y,
                        weight=class_weights if cfg.class_weighted else None,
                        label_smoothing=cfg.label_smoothing,
                    )
                    scaler.scale(loss / group_size).backward()
                micro += 1
                win["loss"] += float(loss.detach()) * y.numel()
                win["correct"] += int((logits.detach().argmax(-1) == y).sum())
                win["n"] += y.numel()
                win["samples"] += y.numel() * world
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            win["steps"] += 1
            if prof is not None:
                prof.step()
                if step >= profile_steps:
                    prof.stop()
                    logger.log(f"profiler trace written: {trace}")
                    return 0
            logger.advance(group_size)

            if step % cfg.log_every == 0 or micro == micro_per_epoch:
                dt = time.perf_counter() - win["t"]
                row = {
                    "kind": "train",
                    "time": time.time(),
                    "epoch": epoch,
                    "step": step,
                    "loss": win["loss"] / max(win["n"], 1),
                    "acc": win["correct"] / max(win["n"], 1),
                    "lr": scheduler.get_last_lr()[0],
                    "steps_per_s": win["steps"] / dt,
                    "samples_per_s": win["samples"] / dt,
                    "data_wait": win["wait"] / dt,
                }
                logger.metrics(row)
                stats = (
                    f"loss {row['loss']:.3f} acc {100 * row['acc']:.1f}% lr {row['lr']:.2e} "
                    f"{row['steps_per_s']:.2f} steps/s {row['samples_per_s']:.0f} samples/s "
                    f"data-wait {100 * row['data_wait']:.0f}%"
                )
                if logger.progress is not None:
                    logger.advance(0, stats)
                else:
                    logger.log(f"epoch {epoch} step {step}/{total_steps} {stats}")
                win = new_log_window()

            if step >= total_steps:
                stop = True
                break
            if step == args.stop_at_step:
                paused = True
                break
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and micro < micro_per_epoch:
                checkpoint([last], micro, epoch)
        end_of_epoch = micro >= micro_per_epoch
        del it
        # ---------------------------------------------------- end of epoch (or of training)
        next_epoch, next_done = (epoch + 1, 0) if end_of_epoch else (epoch, micro)
        if ((epoch + 1) % cfg.eval_every == 0 or stop or next_epoch >= cfg.epochs) and not (
            paused and not end_of_epoch
        ):
            valid_loader.set_epoch(epoch)
            res = evaluate_distributed(raw_model, valid_loader, device, amp_dtype, ddp)
            row = {"kind": "valid", "time": time.time(), "epoch": epoch, "step": step, **res}
            if master:  # what was measured: the checkpoint written below holds these very weights
                row.update(measured(raw_model, manifest, amp_dtype))
            logger.metrics(row)
            logger.log(
                f"epoch {epoch} valid: loss {res['loss']:.4f} acc {100 * res['acc']:.2f}% ({res['n']} samples)"
            )
        stop = stop or next_epoch >= cfg.epochs
        paths = [last]
        if end_of_epoch:
            paths.insert(0, out / f"ckpt-epoch{epoch:03d}.pt")
        checkpoint(paths, next_done, next_epoch, fin=stop)
        if master:
            logger.log(f"checkpoint {', '.join(str(p) for p in paths)}")
        epoch, batches_done = next_epoch, next_done

    if paused and not stop:
        again = f"--out {out}" if args.out is not None else f"--out {out} (or --resume)"
        logger.log(f"paused after step {step} (--stop-at-step): run again with {again} to continue")
        logger.close()
        return 0

    # ------------------------------------------------------------ final test + verification
    test_loader.set_epoch(0)
    res = evaluate_distributed(raw_model, test_loader, device, amp_dtype, ddp, embeddings=True, world=world)
    emb, labs = res.pop("emb"), res.pop("labels")
    row = {"kind": "test", "time": time.time(), "epoch": epoch, "step": step, **res}
    if master:
        row.update(measured(raw_model, manifest, amp_dtype))
        try:
            row["verification"] = verification(emb, labs, cfg.verify_pairs, cfg.seed)
        except ValueError as e:
            row["verification"] = {"error": str(e)}
        logger.metrics(row)
        (out / "test.json").write_text(json.dumps(row, indent=1) + "\n")
        v = row["verification"]
        ver = (
            f"  EER {100 * v['eer']:.2f}%  minDCF(0.01) {v['min_dcf']:.4f}"
            if "eer" in v
            else f" ({v['error']})"
        )
        logger.log(f"test: loss {res['loss']:.4f} acc {100 * res['acc']:.2f}% ({res['n']} samples){ver}")
        logger.log(f"done in {time.time() - t_start:.1f} s; checkpoint {last}")
    logger.close()
    if ddp:
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())

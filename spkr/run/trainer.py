"""The training parts, each usable (and tested) alone; ``spkr.train.train`` composes them top to bottom.

    data = build_data(shards, cfg, env, storage_options)      # loaders, manifest, steps per epoch
    t = build(model_cfg, cfg, env, data, amp_dtype, logger, out, shards)   # model, AdamW, schedule, scaler
    pos = restore(t, restart)  or  Position()                  # from <out>/last.pt
    wrap(t, use_compile)                                       # torch.compile, then DDP
    outcome = train_epoch(t, pos, stop_at_step, profiler)      # "end" | "done" | "paused" | "profiled"
    stop = end_epoch(t, pos, outcome)                          # validate when due, checkpoint, advance
    final_test(t, pos)                                         # test loss/acc + EER/minDCF, test.json
                                                               # (protocol open: test-verify's trials)

One optimizer step (:func:`train_step`) is ``grad_accum`` micro-batches (fewer at an epoch's end): each
one's loss is divided by the group's size, DDP synchronises gradients on the group's last micro-batch
only (``no_sync`` before), then clipping, the (GradScaler-wrapped) AdamW step and the schedule step.
Loss: cross-entropy weighted by the manifest's class weights (``class_weighted``), label smoothing.
Schedule (:func:`lr_factor`): linear warmup, cosine decay to ``min_lr_ratio`` per optimizer step.
Checkpoints are written after optimizer steps only, so a resume always starts at a group boundary.
Each step's wall time is split into phases (data wait, forward, backward, exposed all-reduce,
optimizer, other) by ``t.clock`` (:mod:`spkr.run.phases`), logged in the ``train`` rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spkr import storage
from spkr.checkpoint import load as load_checkpoint
from spkr.checkpoint import rng_state, save_atomic, to_plain
from spkr.config import to_dict
from spkr.features import mel_centres
from spkr.run import TrainError
from spkr.run import checkpoint as state
from spkr.run.checkpoint import Position
from spkr.run.configs import TrainConfig
from spkr.run.distributed import DistEnv, autocast, barrier, describe_dtype, dtype_name, gather, make_scaler
from spkr.run.evaluation import eval_loader, evaluate_distributed, load_trials, verify_split
from spkr.run.metrics import Logger, TrainWindow, eval_line, eval_row, train_line
from spkr.run.phases import PhaseClock
from spkr.scoring import verification
from spkr.stream.loader import normalisation


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


EQ_BUMPS = 3  # Gaussian bumps of the random EQ curve (besides its tilt)
EQ_ORDER = 4  # Butterworth order of the random band limit (24 dB per octave beyond the cutoff)


def eq_active(cfg: TrainConfig) -> bool:
    return bool(cfg.eq_db or cfg.eq_lowpass_hz or cfg.eq_highpass_hz)


def eq_augment(
    mel: torch.Tensor, lengths: torch.Tensor, cfg: TrainConfig, stats: dict, features
) -> torch.Tensor:
    """Random microphone of a normalised (B, T, F) batch. A linear filter (microphone, EQ, a telephone
    or codec band) multiplies the power spectrum, so it adds a per-bin offset g(f) in dB to the log-mels;
    per utterance, with x = f / (F - 1) in [0, 1] and h the mel centre in Hz:

        g = a (2x - 1) + sum of EQ_BUMPS  b exp(-(x - c)^2 / 2w^2)     (``eq_db``: a, b in +-eq_db dB,
                                                                         c in [0, 1], w in [0.03, 0.15])
            - 10 log10(1 + (h / lp)^8)     (``eq_lowpass_hz``: lp log-uniform in [eq_lowpass_hz, f_max])
            - 10 log10(1 + (hp / h)^8)     (``eq_highpass_hz``: hp log-uniform in [f_min, eq_highpass_hz])

    added in dB (``stats``: the loader's per-bin mean/std; ``features``: the shards' FeatureConfig) within
    the utterance's length, floored like the features at (its peak - top_db). This teaches the embedding
    to ignore a recording's colouring and bandwidth without removing each speaker's own average spectrum
    as per-utterance mean normalisation (``input_norm = "utterance"``) does. Global torch RNG (saved in
    checkpoints), like :func:`spec_augment`."""
    if not eq_active(cfg):
        return mel
    B, T, n_freq = mel.shape
    x = torch.linspace(0.0, 1.0, n_freq)[None, :]
    hz = mel_centres(features)[None, :]
    curve = torch.zeros(B, n_freq)

    def log_uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.exp(math.log(lo) + torch.rand(B, 1) * (math.log(hi) - math.log(lo)))

    if cfg.eq_db:

        def gain() -> torch.Tensor:
            return (torch.rand(B, 1) * 2 - 1) * cfg.eq_db

        curve = curve + gain() * (2 * x - 1)
        for _ in range(EQ_BUMPS):
            b, c, w = gain(), torch.rand(B, 1), 0.03 + 0.12 * torch.rand(B, 1)
            curve = curve + b * torch.exp(-0.5 * ((x - c) / w) ** 2)
    if cfg.eq_lowpass_hz:
        lp = log_uniform(min(cfg.eq_lowpass_hz, features.f_max), features.f_max)
        curve = curve - 10 * torch.log10(1 + (hz / lp) ** (2 * EQ_ORDER))
    if cfg.eq_highpass_hz:
        f_min = max(features.f_min, 1.0)
        hp = log_uniform(f_min, max(cfg.eq_highpass_hz, f_min))
        curve = curve - 10 * torch.log10(1 + (hp / hz) ** (2 * EQ_ORDER))
    device = mel.device
    mean, std = (torch.tensor(stats[k], dtype=torch.float32, device=device) for k in ("mean", "std"))
    inside = (torch.arange(T, device=device)[None, :] < lengths[:, None])[:, :, None]  # (B, T, 1)
    db = mel.float() * std + mean
    peak = db.masked_fill(~inside, -math.inf).amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    coloured = torch.maximum(db + curve.to(device)[:, None, :], peak - features.top_db)
    return torch.where(inside, ((coloured - mean) / std).to(mel.dtype), mel)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr before optimizer step ``step`` (0-based): linear warmup to 1 over
    ``warmup_steps`` steps ((step+1)/warmup), then cosine from 1 down to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- build


@dataclass
class Data:
    """The run's loaders (valid/test share the training loader's manifest) and its step counts."""

    train: object
    valid: object
    test: object
    micro_per_epoch: int  # training batches per rank and epoch
    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int
    valid_verify: object = None  # protocol open: the valid-role verification split (trials every epoch)
    storage_options: dict | None = None  # for the trial files

    @property
    def manifest(self):
        return self.train.manifest


def check_shards(shards: str) -> None:
    """Clear errors for a missing/empty local shards directory before anything else reads it."""
    if storage.is_url(shards):
        return
    p = Path(shards)
    if not p.exists():
        raise TrainError(f"{shards}: shards directory not found (make it with python -m spkr.tools.shard)")
    if not p.is_dir():
        raise TrainError(f"{shards}: not a directory")
    if not any(p.iterdir()):
        raise TrainError(f"{shards}: shards directory is empty (make it with python -m spkr.tools.shard)")


def seed_rank(seed: int, rank: int) -> None:
    """torch and numpy global RNGs of this rank (their states are saved in checkpoints)."""
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def build_data(shards: str, cfg: TrainConfig, env: DistEnv, storage_options: dict) -> Data:
    """The training loader (random crops, float16 batches cast on the device) and the evaluation
    loaders over the same manifest (:func:`eval_splits`: ``valid``/``test``; protocol open also
    ``valid-verify``, and ``test-verify`` as the test split); TrainError if this rank gets no batch."""
    from spkr.stream.loader import SpeakerLoader

    train = SpeakerLoader(
        shards, "train", cfg.batch_size, train=True, seed=cfg.seed, rank=env.rank, world_size=env.world,
        num_workers=cfg.num_workers, crop_frames=cfg.crop_frames or None, normalize=True, dtype="float16",
        storage_options=storage_options, pin_memory=env.device.type == "cuda",
    )  # fmt: skip
    evals = [
        eval_loader(
            shards,
            split,
            cfg.eval_batch_size,
            num_workers=cfg.num_workers,
            storage_options=storage_options,
            rank=env.rank,
            world=env.world,
            manifest=train.manifest,
        )  # fmt: skip
        for split in eval_splits(train.manifest)
    ]
    for loader in evals[2:]:  # a verification split's trial file: readable and its own, before training
        try:
            load_trials(loader.manifest, loader.split, storage_options)
        except ValueError as e:
            raise TrainError(str(e)) from None
    train.set_epoch(0)
    micro = len(train)
    if micro == 0:
        raise TrainError(f"{shards}: no training batches for rank {env.rank} (world size {env.world})")
    steps = math.ceil(micro / cfg.grad_accum)
    total = cfg.epochs * steps if not cfg.max_steps else min(cfg.epochs * steps, cfg.max_steps)
    return Data(train, *evals[:2], micro, steps, total, *evals[2:], storage_options=storage_options)


def eval_splits(manifest) -> list[str]:
    """[classification split of role valid, the split of role test] + [verification split of role
    valid] when there is one: ``valid``, ``test`` without a protocol; ``valid``, ``test-verify``,
    ``valid-verify`` with protocol open (docs/protocols.md)."""
    valid = [s for s in manifest.splits_with_role("valid") if manifest.split_kind(s) == "classification"]
    verify = [s for s in manifest.splits_with_role("valid") if manifest.split_kind(s) == "verification"]
    test = manifest.splits_with_role("test")
    if not valid or not test:
        raise TrainError(
            f"{manifest.url}: needs a classification split of role valid and a split of role test"
        )
    return [valid[0], test[0], *verify[:1]]


@dataclass
class Trainer:
    """Everything one rank trains with. ``raw_model`` is the plain module (saved, evaluated);
    ``model`` the one stepped (compiled and/or DDP-wrapped by :func:`wrap`)."""

    cfg: TrainConfig
    model_cfg: object
    env: DistEnv
    data: Data
    raw_model: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    class_weights: torch.Tensor | None
    amp_dtype: torch.dtype
    logger: Logger
    out: Path
    shards: str
    thresholds: dict | None = None  # verification thresholds of the last validation (protocol open)
    clock: PhaseClock = field(default_factory=PhaseClock)  # step phase timing (spkr.run.phases)
    eq_stats: dict | None = None  # the loader's normalisation {"mean", "std"} when eq_augment is on

    @property
    def last(self) -> Path:
        return self.out / "last.pt"


def build(model_cfg, cfg: TrainConfig, env: DistEnv, data: Data, amp_dtype, logger, out, shards) -> Trainer:
    """The model, AdamW over the model's own parameter groups (norms, biases, A_log, D not decayed),
    the warmup+cosine schedule, the GradScaler (fp16 only) and the class weights."""
    from spkr.models import build_model

    manifest = data.manifest
    model = build_model(model_cfg, manifest.feature_config.n_mels, len(manifest.labels)).to(env.device)
    optimizer = torch.optim.AdamW(
        model.param_groups(cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=env.device.type == "cuda",
    )
    total = data.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.min_lr_ratio)
    )
    weights = torch.tensor(manifest.class_weights, dtype=torch.float32, device=env.device)
    eq_stats = normalisation(manifest, manifest.feature_config.n_mels) if eq_active(cfg) else None
    return Trainer(
        cfg, model_cfg, env, data, model, model, optimizer, scheduler, make_scaler(env.device, amp_dtype),
        weights if cfg.class_weighted else None, amp_dtype, logger, Path(out), str(shards), eq_stats=eq_stats,
    )  # fmt: skip


def restore(t: Trainer, restart: int) -> Position:
    """The position (and model/optimizer/schedule/scaler/RNG state) of ``<out>/last.pt``."""
    ckpt = load_checkpoint(t.last, map_location=t.env.device)
    pos = state.restore(
        ckpt, model=t.raw_model, optimizer=t.optimizer, scheduler=t.scheduler, scaler=t.scaler,
        manifest=t.data.manifest, model_cfg=t.model_cfg, rank=t.env.rank, world=t.env.world, where=str(t.last),
    )  # fmt: skip
    t.thresholds = ckpt.get("verification_thresholds")
    t.logger.log(
        f"resumed from {t.last} (restart {restart}): epoch {pos.epoch}, step {pos.step}, "
        f"{pos.batches_done}/{t.data.micro_per_epoch} batches of the epoch done"
    )
    return pos


def wrap(t: Trainer, use_compile: bool) -> None:
    """torch.compile (dynamic shapes: crops and evaluation vary T, one graph) and DDP, in that order;
    the step phase clock for the device (with DDP, timing the gradient all-reduces)."""
    model = t.raw_model
    t.clock = PhaseClock(t.env.device)
    if use_compile:
        model = torch.compile(model, dynamic=True)
    if t.env.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[t.env.local_rank] if t.env.device.type == "cuda" else None)
        t.clock.hook_ddp(model)  # the same reduction as DDP's default, timed
    t.model = model


def log_start(
    t: Trainer, resumed_step: int | None, compile_note: tuple[bool, str], dtype_reason: str
) -> None:
    """The run's opening log lines and its ``config`` row of metrics.jsonl."""
    env, data, manifest, raw = t.env, t.data, t.data.manifest, t.raw_model
    use_compile, compile_reason = compile_note
    n_params = sum(p.numel() for p in raw.parameters())
    where = f"DDP {torch.distributed.get_backend()}" if env.ddp else "single process"
    t.logger.log(
        f"world size {env.world} ({where}), device {env.device}, backend {raw.backend_name()}, "
        f"compile {'on' if use_compile else 'off'} ({compile_reason}), {describe_dtype(t.amp_dtype, dtype_reason)}, "
        f"{n_params / 1e6:.2f}M params, {len(manifest.labels)} classes"
    )
    t.logger.log(
        f"train: dataset {manifest.dataset_id}, {manifest.split('train').num_samples} samples, "
        f"{data.train.dropped} dropped per epoch for equal rank shares, {data.micro_per_epoch} batches/rank/epoch "
        f"of {t.cfg.batch_size} x {t.cfg.grad_accum} accum, {data.steps_per_epoch} steps/epoch, {data.total_steps} steps"
    )
    t.logger.metrics(
        {
            "kind": "config", "time": time.time(), "dataset_id": manifest.dataset_id, "shards": t.shards,
            "world_size": env.world, "backend": raw.backend_name(), "compile": use_compile,
            "dtype": dtype_name(t.amp_dtype), "dropped": data.train.dropped, "params": n_params,
            "steps_per_epoch": data.steps_per_epoch, "total_steps": data.total_steps, "resumed_step": resumed_step,
            "train": to_dict(t.cfg), "model": to_dict(t.model_cfg),
        }
    )  # fmt: skip
    if manifest.protocol_name == "open" and getattr(t.model_cfg, "head", None) == "softmax":
        t.logger.log(
            "note: protocol open (verification of unseen speakers) trains best with a margin head; this "
            'config has head = "softmax" (set head = "aam" in [model], the default)'
        )


# --------------------------------------------------------------------------- steps and epochs


def micro_step(t: Trainer, batch: dict, group_size: int, sync: bool) -> tuple[float, int, int]:
    """Forward and backward of one micro-batch (its loss / ``group_size``, gradients accumulate;
    DDP all-reduces only when ``sync``). Returns (mean loss, correct predictions, batch size)."""
    device = t.env.device
    mel = batch["mel"].to(device, non_blocking=True).float()
    lengths = batch["lengths"].to(device, non_blocking=True)
    y = batch["labels"].to(device, non_blocking=True)
    if t.eq_stats is not None:
        mel = eq_augment(mel, lengths, t.cfg, t.eq_stats, t.data.manifest.feature_config)
    mel = spec_augment(mel, lengths, t.cfg)
    no_sync = t.env.ddp and not sync
    with t.model.no_sync() if no_sync else contextlib.nullcontext():
        with autocast(device, t.amp_dtype):
            logits = t.model(mel, lengths, y)
        loss = F.cross_entropy(
            logits.float(), y, weight=t.class_weights, label_smoothing=t.cfg.label_smoothing
        )
        t.clock.lap("forward")
        t.scaler.scale(loss / group_size).backward()
        t.clock.lap_backward()
    return float(loss.detach()), int((logits.detach().argmax(-1) == y).sum()), y.numel()


def optimizer_step(t: Trainer) -> None:
    """Clip the global gradient norm (unscaled), step AdamW through the scaler, zero the gradients,
    advance the schedule."""
    if t.cfg.grad_clip > 0:
        t.scaler.unscale_(t.optimizer)
        torch.nn.utils.clip_grad_norm_(t.raw_model.parameters(), t.cfg.grad_clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()


def train_step(t: Trainer, batches, n_micro: int, group_size: int, window: TrainWindow) -> None:
    """One optimizer step over the next ``n_micro`` batches of ``batches`` (the rest of a group of
    ``group_size``; gradients are synchronised on the last one)."""
    for i in range(n_micro):
        t.clock.lap("other")
        t0 = time.perf_counter()
        batch = next(batches)
        wait = time.perf_counter() - t0
        t.clock.lap("data_wait")
        loss, correct, n = micro_step(t, batch, group_size, sync=i == n_micro - 1)
        window.add_batch(loss, correct, n, wait)
    t.clock.lap("other")
    optimizer_step(t)
    t.clock.lap("optimizer")
    window.steps += 1


def train_epoch(t: Trainer, pos: Position, stop_at_step: int = 0, profiler=None) -> str:
    """Train from ``pos`` to the end of its epoch, advancing ``pos.step`` / ``pos.batches_done``.
    Returns why it stopped: "end" (epoch done), "done" (total steps reached), "paused"
    (``stop_at_step``), "profiled" (the profiler has its steps)."""
    cfg, data = t.cfg, t.data
    data.train.set_epoch(pos.epoch)
    if pos.loader_state is not None:
        try:
            data.train.load_state_dict(pos.loader_state)
        except ValueError as e:
            raise TrainError(f"cannot resume from {t.last}: {e}") from None
        pos.loader_state = None
    t.logger.start_epoch(pos.epoch, data.micro_per_epoch, pos.batches_done)
    batches = iter(data.train)
    window = TrainWindow(t.env.world)
    t.clock.reset()
    while pos.batches_done < data.micro_per_epoch:
        group_start = pos.batches_done - pos.batches_done % cfg.grad_accum
        group_size = min(cfg.grad_accum, data.micro_per_epoch - group_start)
        n_micro = group_start + group_size - pos.batches_done
        train_step(t, batches, n_micro, group_size, window)
        pos.batches_done += n_micro
        pos.step += 1
        if profiler is not None and profiler.step(pos.step):
            return "profiled"
        t.logger.advance(group_size)
        if pos.step % cfg.log_every == 0 or pos.batches_done == data.micro_per_epoch:
            phases = t.clock.take(window.steps)
            log_train(t, window.row(pos.epoch, pos.step, t.scheduler.get_last_lr()[0], phases))
            window = TrainWindow(t.env.world)
        if pos.step >= data.total_steps:
            return "done"
        if pos.step == stop_at_step:
            return "paused"
        if cfg.ckpt_every and pos.step % cfg.ckpt_every == 0 and pos.batches_done < data.micro_per_epoch:
            save_checkpoint(t, pos, [t.last])
    return "end"


def log_train(t: Trainer, row: dict) -> None:
    t.logger.metrics(row)
    if t.logger.progress is not None:
        t.logger.advance(0, train_line(row))
    else:
        t.logger.log(f"epoch {row['epoch']} step {row['step']}/{t.data.total_steps} {train_line(row)}")


def end_epoch(t: Trainer, pos: Position, outcome: str) -> bool:
    """After :func:`train_epoch`: validate when due (every ``eval_every`` epochs and at the end; not
    after a pause mid-epoch), write ``ckpt-epochNNN.pt`` (a finished epoch) and ``last.pt`` for the
    position to continue from, and move ``pos`` there. Returns whether training is over."""
    end_of_epoch = pos.batches_done >= t.data.micro_per_epoch
    next_pos = (
        Position(pos.step, pos.epoch + 1, 0)
        if end_of_epoch
        else Position(pos.step, pos.epoch, pos.batches_done)
    )
    stop = outcome == "done" or next_pos.epoch >= t.cfg.epochs
    if ((pos.epoch + 1) % t.cfg.eval_every == 0 or stop) and (end_of_epoch or outcome != "paused"):
        validate(t, pos)
    next_pos.finished = stop
    paths = [t.out / f"ckpt-epoch{pos.epoch:03d}.pt", t.last] if end_of_epoch else [t.last]
    save_checkpoint(t, next_pos, paths)
    t.logger.log(f"checkpoint {', '.join(str(p) for p in paths)}")
    pos.epoch, pos.batches_done, pos.finished = next_pos.epoch, next_pos.batches_done, stop
    return stop


def save_checkpoint(t: Trainer, pos: Position, paths: list[Path]) -> None:
    """Every rank's loader position (mid-epoch) and RNG state, gathered; rank 0 writes ``paths``."""
    loaders = gather(to_plain(t.data.train.state_dict()) if pos.batches_done else None, t.env)
    rngs = gather(rng_state(), t.env)
    if t.env.master:
        ckpt = state.pack(
            model=t.raw_model, optimizer=t.optimizer, scheduler=t.scheduler, scaler=t.scaler, position=pos,
            rngs=rngs, loaders=loaders, world=t.env.world, manifest=t.data.manifest, model_cfg=t.model_cfg,
            train_cfg=t.cfg, shards=t.shards,
        )  # fmt: skip
        if t.thresholds is not None:
            ckpt["verification_thresholds"] = t.thresholds
        save_atomic(ckpt, *paths)


# --------------------------------------------------------------------------- evaluation


def validate(t: Trainer, pos: Position) -> dict:
    """``valid`` loss/accuracy over every sample once (all ranks), logged with what it measured; with a
    verification split of role valid (protocol open) also its trials' EER/minDCF and the thresholds
    calibrated on them (:func:`verify_pass`), kept for the checkpoints of these weights."""
    t.data.valid.set_epoch(pos.epoch)
    res = evaluate_distributed(t.raw_model, t.data.valid, t.env, t.amp_dtype)
    if t.data.valid_verify is not None:
        res["verification"] = verify_pass(t, t.data.valid_verify, calibrate=True)
    row = eval_row("valid", pos.epoch, pos.step, res, *_measured(t))
    thresholds = (res.get("verification") or {}).get("thresholds")
    if t.env.master and thresholds is not None:
        split = t.data.valid_verify.split
        where = {"split": split, "weights": row["weights"], "epoch": pos.epoch, "step": pos.step}
        t.thresholds = {**thresholds, **where}
    t.logger.metrics(row)
    t.logger.log(f"epoch {pos.epoch} {eval_line('valid', res)}")
    return row


def verify_pass(t: Trainer, loader, calibrate: bool = False) -> dict | None:
    """Embeddings of every utterance of a verification split (all ranks, gathered); rank 0 scores the
    split's trial list (:func:`spkr.run.evaluation.verify_split`; an unusable list is an ``error``
    entry, not a crash), the other ranks return None."""
    loader.set_epoch(0)
    emb = evaluate_distributed(t.raw_model, loader, t.env, t.amp_dtype, embeddings=True, classify=False)
    if not t.env.master:
        return None
    try:
        return verify_split(
            emb, t.data.manifest, loader.split, storage_options=t.data.storage_options, calibrate=calibrate
        )
    except ValueError as e:
        return {"split": loader.split, "error": str(e)}


def final_test(t: Trainer, pos: Position) -> dict:
    """The split of role test: ``test`` loss/accuracy and verification EER/minDCF over every rank's
    embeddings, or (protocol open) ``test-verify``'s trial list; rank 0 writes the row to
    metrics.jsonl and ``<out>/test.json``."""
    split = t.data.test.split
    if t.data.manifest.split_kind(split) == "verification":
        row = eval_row("test", pos.epoch, pos.step, {"n": t.data.test.split_info.num_samples}, *_measured(t))
        row["verification"] = verify_pass(t, t.data.test)
    else:
        t.data.test.set_epoch(0)
        res = evaluate_distributed(t.raw_model, t.data.test, t.env, t.amp_dtype, embeddings=True)
        emb, labels = res.pop("emb"), res.pop("labels")
        res.pop("keys")
        row = eval_row("test", pos.epoch, pos.step, res, *_measured(t))
        if t.env.master:
            try:
                row["verification"] = verification(emb, labels, t.cfg.verify_pairs, t.cfg.seed)
            except ValueError as e:
                row["verification"] = {"error": str(e)}
    if t.env.master:
        t.logger.metrics(row)
        (t.out / "test.json").write_text(json.dumps(row, indent=1) + "\n")
        t.logger.log(eval_line("test", row))
    barrier(t.env)
    return row


def _measured(t: Trainer) -> tuple:
    """eval_row's (model, manifest, dtype) on rank 0 (which records what it measured), else ()."""
    return (t.raw_model, t.data.manifest, t.amp_dtype) if t.env.master else ()


class StepProfiler:
    """``--profile``: a torch.profiler Chrome trace of steps 2-6 to ``<out>/trace-rank<r>.json``."""

    STEPS = 6

    def __init__(self, out: Path, rank: int, device: torch.device, logger: Logger):
        from torch.profiler import ProfilerActivity, profile, schedule

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.trace, self.logger = out / f"trace-rank{rank}.json", logger
        self.prof = profile(
            activities=acts,
            schedule=schedule(wait=1, warmup=2, active=3, repeat=1),
            on_trace_ready=lambda p: p.export_chrome_trace(str(self.trace)),
            record_shapes=True,
        )
        self.prof.start()

    def step(self, step: int) -> bool:
        """Record one optimizer step; True (trace written) after the last."""
        self.prof.step()
        if step < self.STEPS:
            return False
        self.prof.stop()
        self.logger.log(f"profiler trace written: {self.trace}")
        return True

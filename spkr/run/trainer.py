"""The training parts, each usable (and tested) alone; ``spkr.train.train`` composes them top to bottom.

    data = build_data(shards, cfg, env, storage_options)      # loaders, manifest, steps per epoch
    t = Trainer(model_cfg, cfg, env, data, amp_dtype, logger, out, shards)  # model, AdamW, schedule, scaler
    pos = t.restore(restart)  or  Position()                  # from <out>/last.pt
    t.wrap(use_compile)                                        # torch.compile, then DDP
    outcome = t.train_epoch(pos, stop_at_step, profiler)      # "end" | "done" | "paused" | "profiled"
    stop = t.end_epoch(pos, outcome)                           # validate when due, checkpoint, advance
    t.final_test(pos)                                          # test loss/acc + EER/minDCF, test.json
                                                               # (protocol open: test-verify's trials;
                                                               # select = "valid": best.pt's weights)

One optimizer step (:meth:`Trainer.train_step`) is ``grad_accum`` micro-batches (fewer at an epoch's
end): each one's loss is divided by the group's size, DDP synchronises gradients on the group's last
micro-batch only (``no_sync`` before), then clipping, the (GradScaler-wrapped) AdamW step and the
schedule step. Loss: cross-entropy weighted by the manifest's class weights (``class_weighted``),
label smoothing; the batches are augmented first (:mod:`spkr.run.mel_augment`).
Schedule (:func:`lr_factor`): linear warmup, cosine decay to ``min_lr_ratio`` per optimizer step.
Checkpoints are written after optimizer steps only, so a resume always starts at a group boundary.
Each step's wall time is split into phases (data wait, forward, backward, exposed all-reduce,
optimizer, other) by ``t.clock`` (:mod:`spkr.run.phases`), logged in the ``train`` rows.
Validation and the final test are :func:`spkr.run.evaluation.evaluate_split`, as in spkr.evaluate.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spkr import storage
from spkr.checkpoint import load as load_checkpoint
from spkr.checkpoint import rng_state, save_atomic, to_plain, weights_fingerprint
from spkr.config import to_dict
from spkr.run import TrainError
from spkr.run import checkpoint as state
from spkr.run.checkpoint import Position
from spkr.run.configs import TrainConfig
from spkr.run.distributed import (
    DistEnv,
    autocast,
    barrier,
    broadcast,
    describe_dtype,
    dtype_name,
    gather,
    make_scaler,
)
from spkr.run.evaluation import EvalOptions, eval_loader, eval_splits, evaluate_split, load_trials
from spkr.run.mel_augment import eq_active, eq_augment, noise_augment, spec_augment
from spkr.run.metrics import Logger, TrainWindow, eval_line, eval_row, train_line
from spkr.run.phases import PhaseClock
from spkr.stream.loader import normalisation


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr before optimizer step ``step`` (0-based): linear warmup to 1 over
    ``warmup_steps`` steps ((step+1)/warmup), then cosine from 1 down to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- the data


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


def build_data(shards: str, cfg: TrainConfig, env: DistEnv, storage_options: dict | None) -> Data:
    """The training loader (random crops, float16 batches cast on the device) and the evaluation
    loaders over the same manifest (:func:`training_splits`: ``valid``/``test``; protocol open also
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
        for split in training_splits(train.manifest)
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


def training_splits(manifest) -> list[str]:
    """[classification split of role valid, the split of role test] + [verification split of role
    valid] when there is one (:func:`spkr.run.evaluation.eval_splits`): ``valid``, ``test`` without a
    protocol; ``valid``, ``test-verify``, ``valid-verify`` with protocol open (docs/protocols.md)."""
    splits = eval_splits(manifest)
    if splits.valid is None or splits.test is None:
        raise TrainError(
            f"{manifest.url}: needs a classification split of role valid and a split of role test"
        )
    return [splits.valid, splits.test, *([splits.valid_verify] if splits.valid_verify else [])]


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Everything one rank trains with, and the steps it takes. ``raw_model`` is the plain module
    (saved, evaluated); ``model`` the one stepped (compiled and/or DDP-wrapped by :meth:`wrap`)."""

    def __init__(self, model_cfg, cfg: TrainConfig, env: DistEnv, data: Data, amp_dtype, logger: Logger,
                 out, shards):  # fmt: skip
        """The model, AdamW over the model's own parameter groups (norms, biases, A_log, D not
        decayed), the warmup+cosine schedule, the GradScaler (fp16 only) and the class weights."""
        from spkr.models import build_model

        manifest = data.manifest
        n_mels = manifest.feature_config.n_mels
        self.cfg, self.model_cfg, self.env, self.data = cfg, model_cfg, env, data
        self.amp_dtype, self.logger, self.out, self.shards = amp_dtype, logger, Path(out), str(shards)
        self.raw_model = self.model = build_model(model_cfg, n_mels, len(manifest.labels)).to(env.device)
        self.optimizer = torch.optim.AdamW(
            self.raw_model.param_groups(cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            fused=env.device.type == "cuda",
        )
        total = data.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.min_lr_ratio)
        )
        self.scaler = make_scaler(env.device, amp_dtype)
        weights = torch.tensor(manifest.class_weights, dtype=torch.float32, device=env.device)
        self.class_weights = weights if cfg.class_weighted else None
        self.thresholds: dict | None = None  # verification thresholds of the last validation (protocol open)
        # select = "valid": the best validation so far, {"metric", "value", "score", "epoch", "step", "weights"}
        self.best: dict | None = None
        self.clock = PhaseClock()  # step phase timing (spkr.run.phases)
        # the loader's normalisation {"mean", "std"} when noise_augment or eq_augment is on
        self.db_stats = normalisation(manifest, n_mels) if cfg.noise or eq_active(cfg) else None

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    def restore(self, restart: int) -> Position:
        """The position (and model/optimizer/schedule/scaler/RNG state) of ``<out>/last.pt``."""
        ckpt = load_checkpoint(self.last, map_location=self.env.device)
        pos = state.restore(
            ckpt, model=self.raw_model, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, manifest=self.data.manifest, model_cfg=self.model_cfg, rank=self.env.rank,
            world=self.env.world,
            where=str(self.last),
        )  # fmt: skip
        self.thresholds = ckpt.get("verification_thresholds")
        self.best = ckpt.get("best")
        self.logger.log(
            f"resumed from {self.last} (restart {restart}): epoch {pos.epoch}, step {pos.step}, "
            f"{pos.batches_done}/{self.data.micro_per_epoch} batches of the epoch done"
        )
        return pos

    def wrap(self, use_compile: bool) -> None:
        """torch.compile (dynamic shapes: crops and evaluation vary T, one graph) and DDP, in that order;
        the step phase clock for the device (with DDP, timing the gradient all-reduces)."""
        model = self.raw_model
        self.clock = PhaseClock(self.env.device)
        if use_compile:
            model = torch.compile(model, dynamic=True)
        if self.env.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[self.env.local_rank] if self.env.device.type == "cuda" else None)
            self.clock.hook_ddp(model)  # the same reduction as DDP's default, timed
        self.model = model

    def log_start(self, resumed_step: int | None, compile_note: tuple[bool, str], dtype_reason: str) -> None:
        """The run's opening log lines and its ``config`` row of metrics.jsonl."""
        env, data, manifest, raw = self.env, self.data, self.data.manifest, self.raw_model
        use_compile, compile_reason = compile_note
        n_params = sum(p.numel() for p in raw.parameters())
        where = f"DDP {torch.distributed.get_backend()}" if env.ddp else "single process"
        self.logger.log(
            f"world size {env.world} ({where}), device {env.device}, backend {raw.backend_name()}, "
            f"compile {'on' if use_compile else 'off'} ({compile_reason}), "
            f"{describe_dtype(self.amp_dtype, dtype_reason)}, {n_params / 1e6:.2f}M params, "
            f"{len(manifest.labels)} classes"
        )
        self.logger.log(
            f"train: dataset {manifest.dataset_id}, {manifest.split('train').num_samples} samples, "
            f"{data.train.dropped} dropped per epoch for equal rank shares, "
            f"{data.micro_per_epoch} batches/rank/epoch of {self.cfg.batch_size} x {self.cfg.grad_accum} "
            f"accum, {data.steps_per_epoch} steps/epoch, {data.total_steps} steps"
        )
        self.logger.metrics(
            {
                "kind": "config", "time": time.time(), "dataset_id": manifest.dataset_id,
                "shards": self.shards, "world_size": env.world, "backend": raw.backend_name(),
                "compile": use_compile, "dtype": dtype_name(self.amp_dtype), "dropped": data.train.dropped,
                "params": n_params, "steps_per_epoch": data.steps_per_epoch, "total_steps": data.total_steps,
                "resumed_step": resumed_step, "train": to_dict(self.cfg), "model": to_dict(self.model_cfg),
            }
        )  # fmt: skip
        if manifest.protocol_name == "open" and getattr(self.model_cfg, "head", None) == "softmax":
            self.logger.log(
                "note: protocol open (verification of unseen speakers) trains best with a margin head; this "
                'config has head = "softmax" (set head = "aam" in [model], the default)'
            )

    # ----------------------------------------------------------------------- steps and epochs

    def micro_step(self, batch: dict, group_size: int, sync: bool) -> tuple[float, int, int]:
        """Forward and backward of one micro-batch (its loss / ``group_size``, gradients accumulate;
        DDP all-reduces only when ``sync``). Returns (mean loss, correct predictions, batch size)."""
        device = self.env.device
        mel = batch["mel"].to(device, non_blocking=True).float()
        lengths = batch["lengths"].to(device, non_blocking=True)
        y = batch["labels"].to(device, non_blocking=True)
        if self.db_stats is not None:
            features = self.data.manifest.feature_config
            mel = noise_augment(mel, lengths, self.cfg, self.db_stats, features)  # noise, then the microphone
            mel = eq_augment(mel, lengths, self.cfg, self.db_stats, features)
        mel = spec_augment(mel, lengths, self.cfg)
        no_sync = self.env.ddp and not sync
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast(device, self.amp_dtype):
                logits = self.model(mel, lengths, y)
            loss = F.cross_entropy(
                logits.float(), y, weight=self.class_weights, label_smoothing=self.cfg.label_smoothing
            )
            self.clock.lap("forward")
            self.scaler.scale(loss / group_size).backward()
            self.clock.lap_backward()
        return float(loss.detach()), int((logits.detach().argmax(-1) == y).sum()), y.numel()

    def optimizer_step(self) -> None:
        """Clip the global gradient norm (unscaled), step AdamW through the scaler, zero the gradients,
        advance the schedule."""
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def train_step(self, batches, n_micro: int, group_size: int, window: TrainWindow) -> None:
        """One optimizer step over the next ``n_micro`` batches of ``batches`` (the rest of a group of
        ``group_size``; gradients are synchronised on the last one)."""
        for i in range(n_micro):
            self.clock.lap("other")
            t0 = time.perf_counter()
            batch = next(batches)
            wait = time.perf_counter() - t0
            self.clock.lap("data_wait")
            loss, correct, n = self.micro_step(batch, group_size, sync=i == n_micro - 1)
            window.add_batch(loss, correct, n, wait)
        self.clock.lap("other")
        self.optimizer_step()
        self.clock.lap("optimizer")
        window.steps += 1

    def train_epoch(self, pos: Position, stop_at_step: int = 0, profiler=None) -> str:
        """Train from ``pos`` to the end of its epoch, advancing ``pos.step`` / ``pos.batches_done``.
        Returns why it stopped: "end" (epoch done), "done" (total steps reached), "paused"
        (``stop_at_step``), "profiled" (the profiler has its steps)."""
        cfg, data = self.cfg, self.data
        batches = self._start_epoch(pos)
        window = TrainWindow(self.env.world)
        while pos.batches_done < data.micro_per_epoch:
            group_start = pos.batches_done - pos.batches_done % cfg.grad_accum
            group_size = min(cfg.grad_accum, data.micro_per_epoch - group_start)
            n_micro = group_start + group_size - pos.batches_done
            self.train_step(batches, n_micro, group_size, window)
            pos.batches_done += n_micro
            pos.step += 1
            if profiler is not None and profiler.step(pos.step):
                return "profiled"
            self.logger.advance(group_size)
            if pos.step % cfg.log_every == 0 or pos.batches_done == data.micro_per_epoch:
                phases = self.clock.take(window.steps)
                self.log_train(window.row(pos.epoch, pos.step, self.scheduler.get_last_lr()[0], phases))
                window = TrainWindow(self.env.world)
            if pos.step >= data.total_steps:
                return "done"
            if pos.step == stop_at_step:
                return "paused"
            if cfg.ckpt_every and pos.step % cfg.ckpt_every == 0 and pos.batches_done < data.micro_per_epoch:
                self.save_checkpoint(pos, [self.last])
        return "end"

    def _start_epoch(self, pos: Position):
        """The training batches of ``pos``'s epoch from ``pos`` on (a resumed loader position restored)."""
        self.data.train.set_epoch(pos.epoch)
        if pos.loader_state is not None:
            try:
                self.data.train.load_state_dict(pos.loader_state)
            except ValueError as e:
                raise TrainError(f"cannot resume from {self.last}: {e}") from None
            pos.loader_state = None
        self.logger.start_epoch(pos.epoch, self.data.micro_per_epoch, pos.batches_done)
        batches = iter(self.data.train)
        self.clock.reset()
        return batches

    def log_train(self, row: dict) -> None:
        self.logger.metrics(row)
        if self.logger.progress is not None:
            self.logger.advance(0, train_line(row))
        else:
            self.logger.log(
                f"epoch {row['epoch']} step {row['step']}/{self.data.total_steps} {train_line(row)}"
            )

    def end_epoch(self, pos: Position, outcome: str) -> bool:
        """After :meth:`train_epoch`: validate when due (every ``eval_every`` epochs and at the end; not
        after a pause mid-epoch), write ``ckpt-epochNNN.pt`` (a finished epoch) and ``last.pt`` for the
        position to continue from, and move ``pos`` there. Returns whether training is over."""
        end_of_epoch = pos.batches_done >= self.data.micro_per_epoch
        next_pos = (
            Position(pos.step, pos.epoch + 1, 0)
            if end_of_epoch
            else Position(pos.step, pos.epoch, pos.batches_done)
        )
        stop = outcome == "done" or next_pos.epoch >= self.cfg.epochs
        improved = False
        if ((pos.epoch + 1) % self.cfg.eval_every == 0 or stop) and (end_of_epoch or outcome != "paused"):
            improved = self.track_best(pos, self.validate(pos))
        next_pos.finished = stop
        paths = [self.out / f"ckpt-epoch{pos.epoch:03d}.pt", self.last] if end_of_epoch else [self.last]
        paths += [self.best_path] if improved else []
        self.save_checkpoint(next_pos, paths)
        self.logger.log(f"checkpoint {', '.join(str(p) for p in paths)}")
        pos.epoch, pos.batches_done, pos.finished = next_pos.epoch, next_pos.batches_done, stop
        return stop

    def save_checkpoint(self, pos: Position, paths: list[Path]) -> None:
        """Every rank's loader position (mid-epoch) and RNG state, gathered; rank 0 writes ``paths``."""
        loaders = gather(to_plain(self.data.train.state_dict()) if pos.batches_done else None, self.env)
        rngs = gather(rng_state(), self.env)
        if self.env.master:
            ckpt = state.pack(
                model=self.raw_model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                position=pos, rngs=rngs, loaders=loaders, world=self.env.world, manifest=self.data.manifest,
                model_cfg=self.model_cfg, train_cfg=self.cfg, shards=self.shards,
            )  # fmt: skip
            if self.thresholds is not None:
                ckpt["verification_thresholds"] = self.thresholds
            if self.best is not None:
                ckpt["best"] = self.best
            save_atomic(ckpt, *paths)

    # ----------------------------------------------------------------------- evaluation

    def _eval(self, loader, **options) -> dict:
        """:func:`spkr.run.evaluation.evaluate_split` of the raw model on every rank (an unusable trial
        list is an ``error`` entry: the run goes on)."""
        opts = EvalOptions(
            self.amp_dtype, storage_options=self.data.storage_options, trial_errors=True, **options
        )
        return evaluate_split(self.raw_model, loader, self.env, opts)

    def validate(self, pos: Position) -> dict:
        """``valid`` loss/accuracy over every sample once (all ranks), logged with what it measured; with
        a verification split of role valid (protocol open) also its trials' EER/minDCF and the
        thresholds calibrated on them, kept for the checkpoints of these weights."""
        res = self._eval(self.data.valid)
        if self.data.valid_verify is not None:
            res["verification"] = self._eval(self.data.valid_verify, calibrate=True).get("verification")
        row = eval_row("valid", pos.epoch, pos.step, res, *self._measured())
        thresholds = (res.get("verification") or {}).get("thresholds")
        if self.env.master and thresholds is not None:
            split = self.data.valid_verify.split
            where = {"split": split, "weights": row["weights"], "epoch": pos.epoch, "step": pos.step}
            self.thresholds = {**thresholds, **where}
        self.logger.metrics(row)
        self.logger.log(f"epoch {pos.epoch} {eval_line('valid', res)}")
        return row

    def track_best(self, pos: Position, row: dict) -> bool:
        """``select = "valid"``: whether the validation ``row`` beats :attr:`best` (a tie keeps the
        earlier). Rank 0 decides (its row has the verification figures), every rank gets the record."""
        if self.cfg.select != "valid":
            return False
        record = None
        if self.env.master:
            score = self._score(row)
            if score is not None and (self.best is None or score["score"] > self.best["score"]):
                record = {**score, "epoch": pos.epoch, "step": pos.step, "weights": row["weights"]}
        record = broadcast(record, self.env)
        if record is not None:
            self.best = record
        return record is not None

    def _score(self, row: dict) -> dict | None:
        """``{"metric", "value", "score"}`` (higher score is better) of a validation row: the role-valid
        verification split's EER with protocol open, else valid accuracy; None for an unusable trial
        list (an ``error`` entry)."""
        if self.data.valid_verify is None:
            return {"metric": "valid accuracy", "value": float(row["acc"]), "score": float(row["acc"])}
        v = row.get("verification") or {}
        if "eer" not in v:
            return None
        return {
            "metric": f"{v.get('split', 'valid-verify')} EER",
            "value": float(v["eer"]),
            "score": -float(v["eer"]),
        }

    def load_best(self) -> None:
        """``select = "valid"``: the weights of the best validation back into the model from ``best.pt``,
        proven on every rank to be the ones validated (the model's weights fingerprint after loading,
        gathered) before any is tested: another file there is the same error on every rank."""
        barrier(self.env)  # rank 0 wrote best.pt
        ckpt = load_checkpoint(self.best_path, map_location=self.env.device)
        self.raw_model.load_state_dict(ckpt["model"])
        held = gather(weights_fingerprint(self.raw_model.state_dict()), self.env)
        wrong = [rank for rank, fp in enumerate(held) if fp != self.best["weights"]]
        if wrong:
            raise TrainError(
                f"{self.best_path}: not the weights of the best validation (epoch {self.best['epoch']}, "
                f"weights {self.best['weights'][:16]}): rank {wrong[0]} holds {held[wrong[0]][:16]}; "
                "train again with --fresh"
            )
        self.logger.log(
            f"final test with the weights of epoch {self.best['epoch']} ({self.best_path}): best "
            f"{self.best['metric']} {self.best['value']:.4f}"
        )

    def final_test(self, pos: Position) -> dict:
        """The split of role test: ``test`` loss/accuracy and label-pair EER/minDCF over every rank's
        embeddings, or (protocol open) ``test-verify``'s trial list; rank 0 writes the row to
        metrics.jsonl and ``<out>/test.json``. With ``select = "valid"`` it measures the weights of the
        best validation (``best.pt``; the row's ``selected`` says which) instead of the last ones."""
        selected = self.cfg.select == "valid" and self.best is not None
        if selected:
            self.load_best()
        res = self._eval(self.data.test, pairs=self.cfg.verify_pairs, seed=self.cfg.seed)
        verification = res.pop("verification", None)
        row = eval_row("test", pos.epoch, pos.step, res, *self._measured())
        if self.env.master:
            row["verification"] = verification
            if selected:
                row["selected"] = dict(self.best)
            self.logger.metrics(row)
            (self.out / "test.json").write_text(json.dumps(row, indent=1) + "\n")
            self.logger.log(eval_line("test", row))
        barrier(self.env)
        return row

    def _measured(self) -> tuple:
        """eval_row's (model, manifest, dtype) on rank 0 (which records what it measured), else ()."""
        return (self.raw_model, self.data.manifest, self.amp_dtype) if self.env.master else ()


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

"""Training state <-> checkpoint dict: what a run saves and how a resume puts it back.

    state = pack(model=..., optimizer=..., scheduler=..., scaler=..., position=Position(...),
                 rngs=[per rank], loaders=[per rank], world=..., manifest=..., model_cfg=..., train_cfg=...,
                 shards=...)
    spkr.checkpoint.save_atomic(state, path, ...)  # written with spkr.atomic: temp file + rename
    position = restore(ckpt, model=..., optimizer=..., scheduler=..., scaler=..., manifest=...,
                       model_cfg=..., rank=..., world=..., where="runs/x/last.pt")

The file format (keys, version, weights_only loading) is :mod:`spkr.checkpoint`'s; this module only fills
and empties it. A resume is refused with :class:`spkr.run.TrainError` when the checkpoint is of another
dataset (features, labels, split assignment), the shards' feature statistics or class weights are not the
checkpoint's, another ``[model]`` config, other optimizer parameter groups, or was written mid-epoch by
another number of ranks (the loader positions would not fit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spkr.checkpoint import FORMAT, VERSION, check_dataset, set_rng_state, to_plain
from spkr.config import to_dict
from spkr.run import TrainError
from spkr.shards.schema import ManifestError


@dataclass
class Position:
    """Where training stands: optimizer steps taken, the epoch, micro-batches of it consumed, whether
    training finished, and (after a mid-epoch resume) this rank's loader state to restore."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    finished: bool = False
    loader_state: dict | None = None


def pack(
    *, model, optimizer, scheduler, scaler, position: Position, rngs: list, loaders: list, world: int,
    manifest, model_cfg, train_cfg, shards: str,
) -> dict:  # fmt: skip
    """The checkpoint dict of :mod:`spkr.checkpoint`'s format (``model`` is the unwrapped model)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": to_plain(scheduler.state_dict()),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "rng": rngs,
        "loader": loaders,
        "step": position.step,
        "epoch": position.epoch,
        "batches_done": position.batches_done,
        "finished": position.finished,
        "world_size": world,
        "labels": manifest.labels,
        "class_weights": manifest.class_weights,
        "feature_config": manifest.feature_config.to_dict(),
        "feature_fingerprint": manifest.feature_config.fingerprint(),
        "dataset_id": manifest.dataset_id,
        "stats": to_plain(manifest.stats),
        "model_config": to_dict(model_cfg),
        "train_config": to_dict(train_cfg),
        "shards": str(shards),
        "backend": model.backend_name(),
        "torch_version": str(torch.__version__),
    }


def check_resumable(ckpt: dict, manifest, model_cfg, world: int, where: str) -> None:
    """TrainError unless ``ckpt`` can continue here: same dataset, same [model] config, and the same
    world size when it stopped mid-epoch."""
    try:  # the same dataset (features, labels, split assignment), or the resume would mix data
        check_dataset(ckpt, manifest, f"checkpoint {where}")
    except ManifestError as e:
        raise TrainError(f"cannot resume from {where}: {e}") from None
    _check_training_values(ckpt, manifest, where)
    mine = to_dict(model_cfg)
    if ckpt["model_config"] != mine:
        diff = sorted(k for k in ckpt["model_config"] if ckpt["model_config"][k] != mine.get(k))
        raise TrainError(
            f"cannot resume from {where}: the [model] config differs from the checkpoint's in {diff}"
        )
    if ckpt["world_size"] != world and ckpt["batches_done"] > 0:
        raise TrainError(
            f"cannot resume {where} mid-epoch with world size {world}: it was written by {ckpt['world_size']} ranks"
        )


def _check_training_values(ckpt: dict, manifest, where: str) -> None:
    """TrainError unless the shards' feature statistics (mean, std: the loader's normalisation) and
    class weights (the loss's) are the checkpoint's, value for value: a resumed run continues under
    the normalisation and weights it started with, the ones evaluation and prediction will use."""
    stats = manifest.data.get("stats") or {}
    saved = ckpt.get("stats") or {}
    pairs = [(f"feature statistics ({k})", stats.get(k), saved.get(k)) for k in ("mean", "std")]
    pairs.append(("class weights", manifest.class_weights, ckpt.get("class_weights")))
    for what, mine, theirs in pairs:
        if mine is not None and theirs is not None and list(mine) == list(theirs):
            continue
        at = _first_difference(mine, theirs)
        raise TrainError(
            f"cannot resume from {where}: the shards' {what} differ from the checkpoint's ({at}); the run "
            f"would continue under other values than it started with: resume with the shards it was trained on"
        )


def _first_difference(mine, theirs) -> str:
    if mine is None or theirs is None:
        return f"{'the shards have none' if mine is None else 'the checkpoint has none'}"
    if len(mine) != len(theirs):
        return f"{len(mine)} values vs {len(theirs)}"
    i = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
    return f"entry {i}: {mine[i]!r} vs {theirs[i]!r}"


def restore(
    ckpt: dict, *, model, optimizer, scheduler, scaler, manifest, model_cfg, rank: int, world: int, where: str
) -> Position:
    """Load a checked checkpoint into the training objects; this rank's RNG (same world size) and,
    mid-epoch, its loader state (returned in the Position, applied when the epoch starts)."""
    check_resumable(ckpt, manifest, model_cfg, world, where)
    model.load_state_dict(ckpt["model"])
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as e:  # e.g. A_log in another weight-decay group
        raise TrainError(
            f"cannot resume from {where}: its optimizer parameter groups differ from this model's "
            f"weight-decay groups ({e}); start over with --fresh"
        ) from None
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt["world_size"] == world and rank < len(ckpt["rng"]):
        set_rng_state(ckpt["rng"][rank])
    done = ckpt["batches_done"]
    return Position(
        step=ckpt["step"],
        epoch=ckpt["epoch"],
        batches_done=done,
        finished=bool(ckpt.get("finished")),
        loader_state=ckpt["loader"][rank] if done > 0 else None,
    )

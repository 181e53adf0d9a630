"""Checkpoints: plain containers of tensors/numbers/strings, written atomically, read with weights_only.

A checkpoint (``<run>/last.pt``, ``<run>/ckpt-epoch001.pt``, ...) is one ``torch.save`` of a dict::

    format "spkr-checkpoint", version 2 (2: dataset_id)
    model          model.state_dict()                 (unwrapped: no "module."/"_orig_mod." prefixes)
    optimizer      optimizer.state_dict()
    scheduler      LambdaLR.state_dict()              (plain numbers)
    scaler         GradScaler.state_dict() or None    (fp16 only)
    rng            [per rank] {"torch": ByteTensor, "cuda": [ByteTensor] , "numpy": {...}, "python": LongTensor}
    loader         [per rank] SpeakerLoader.state_dict() (made plain: numpy -> lists/ints)
    step, epoch, batches_done, world_size, finished
    labels, class_weights, feature_config (dict), feature_fingerprint, stats (manifest feature stats)
    dataset_id     the training shards' manifest dataset_id: resume, evaluate and chart_losses refuse
                   other shards; stats are the normalisation every later use of the model applies
    model_config (dict), train_config (dict), shards (str), backend, torch_version

Nothing else (no classes, no functions), so ``torch.load(path, weights_only=True)`` reads it and a
file carrying any other pickle payload is refused before anything in it runs.
"""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spkr import atomic

FORMAT = "spkr-checkpoint"
VERSION = 2


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe or from something else."""


def to_plain(obj: Any) -> Any:
    """Recursively turn numpy values into Python ones / lists so weights_only loading accepts them."""
    if isinstance(obj, dict):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [to_plain(v) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_atomic(obj: dict, *paths: str | Path) -> None:
    """Serialise ``obj`` once and write it to each path via temp file + fsync + rename (mode 0666 &
    ~umask, like any new file: see spkr.atomic)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    for path in paths:
        atomic.write_bytes(path, data)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; anything else is refused with CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "global" in ln.lower()]
        first = lines[0] if lines else type(e).__name__
        raise CheckpointError(
            f"{path}: refusing to load: not a plain-weights checkpoint (weights_only load failed: {first})"
        ) from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an spkr checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')} (this spkr reads {VERSION})")
    return ckpt


# --------------------------------------------------------------------------- RNG states as tensors


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": torch.tensor([py_state[0], *py_state[1]], dtype=torch.int64),
        "python_gauss": None if py_state[2] is None else float(py_state[2]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"].tolist()
    random.setstate((py[0], tuple(py[1:]), state.get("python_gauss")))


def strip_prefixes(state_dict: dict) -> dict:
    """Remove DDP's "module." and torch.compile's "_orig_mod." prefixes."""
    out = {}
    for k, v in state_dict.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def check_dataset(ckpt: dict, manifest, what: str, *, allow_other_dataset: bool = False) -> str | None:
    """Shards fit this checkpoint: the same feature config and label map always (else
    ManifestMismatch), the very dataset it was trained on (manifest.dataset_id) unless
    ``allow_other_dataset`` — then the returned warning says so (None when they are the same)."""
    manifest.check_compatible(ckpt["feature_config"], ckpt["labels"])
    if manifest.check_dataset(ckpt["dataset_id"], what, allow_other=allow_other_dataset):
        return None
    return (
        f"warning: {manifest.url} is dataset {manifest.dataset_id}, not the training dataset "
        f"{ckpt['dataset_id']} of {what}; its valid/test utterances may have been training utterances"
    )


def build_model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu"):
    """(model in eval mode, ModelConfig) from a loaded checkpoint."""
    from spkr.config import from_dict
    from spkr.models import build_model
    from spkr.models.config import ModelConfig

    cfg = from_dict(ModelConfig, ckpt["model_config"], "checkpoint model_config")
    model = build_model(cfg, ckpt["feature_config"]["n_mels"], len(ckpt["labels"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg

"""Checkpoints: the file FORMAT — plain containers of tensors/numbers/strings, written atomically
(:mod:`spkr.atomic`: temp file + fsync + rename), read with weights_only. What a training run puts in
and takes out is :mod:`spkr.run.checkpoint`'s; this module owns the table below, loading, the RNG
state encoding, the dataset check and building a model from a checkpoint on any device.

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
    verification_thresholds   (protocol open only, optional) the decision thresholds spkr.predict uses,
                   calibrated (spkr.scoring.calibrate_thresholds) at the last validation on the role-valid
                   verification split's trials scored as a gallery scores them (enrollment means vs.
                   utterances, raw cosine): {"eer_threshold", "min_dcf_threshold", "p_target", "eer",
                   "min_dcf", "trials", "target_trials", "nontarget_trials", "split", "weights" (the
                   weights_fingerprint they were measured on: spkr.predict uses them only when it equals
                   this checkpoint's), "epoch", "step"}
    best           (``select = "valid"`` only, optional) the best validation so far, whose weights are in
                   ``<run>/best.pt``: {"metric", "value", "score" (higher is better), "epoch", "step",
                   "weights" (their weights_fingerprint)}

Nothing else (no classes, no functions), so ``torch.load(path, weights_only=True)`` reads it and a
file carrying any other pickle payload is refused before anything in it runs.
"""

from __future__ import annotations

import io
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spkr import atomic
from spkr.errors import SpkrError

FORMAT = "spkr-checkpoint"
VERSION = 2


class CheckpointError(SpkrError, RuntimeError):
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


def check_archive(path: Path) -> None:
    """Every member of the checkpoint's zip archive against its CRC-32 (torch.load checks none, so a
    flipped bit in a tensor would load as a different weight); CheckpointError naming the member."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as e:  # not a zip, truncated, a broken directory, a corrupt deflate stream
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: checkpoint is corrupt: member {bad!r} fails its CRC-32 check")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; anything else is refused with CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    check_archive(path)
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
    """This process's torch / CUDA / numpy / Python RNG states as tensors and numbers (weights_only-safe)."""
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
    """Restore the RNG states of :func:`rng_state` (CUDA only with the same device count)."""
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"].tolist()
    random.setstate((py[0], tuple(py[1:]), state.get("python_gauss")))


def weights_fingerprint(state_dict: dict) -> str:
    """xxh3-128 hex digest of a model state dict: every entry's name, dtype, shape and bytes, in name
    order, device-independent. Training records it with each evaluation row of metrics.jsonl (the
    checkpoint written right after holds the same weights), so ``chart_losses`` can prove that a row
    measured exactly the weights of a checkpoint before reusing it."""
    import xxhash

    h = xxhash.xxh3_128()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


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


def inference_config(ckpt: dict, device: str | torch.device = "cpu", backend: str = "auto"):
    """The checkpoint's ModelConfig with the Mamba backend to run it with on ``device``.

    The backend (model_config "backend": auto | torch | triton | mamba_ssm) only picks the scan kernel;
    all run the same parameters (spkr.models.mamba), so this is the one place that chooses it for
    inference, whatever the checkpoint was trained with: ``backend="auto"`` (default) = on CUDA
    mamba_ssm's kernels if they import, else spkr's Triton scan, else the pure-torch scan; elsewhere the
    pure-torch scan -- a GPU-trained checkpoint evaluates on CPU, a CPU-trained one uses the kernels on a
    GPU. ``"torch"``, ``"triton"``, ``"mamba_ssm"`` insist on one (BackendUnavailable where it cannot
    run). The returned ``backend`` is concrete: "torch" | "triton" | "mamba_ssm"."""
    import dataclasses

    from spkr.config import from_dict
    from spkr.models.config import ModelConfig
    from spkr.models.mamba import check_backend, resolve_backend

    check_backend(backend)
    cfg = from_dict(ModelConfig, ckpt["model_config"], "checkpoint model_config")
    return dataclasses.replace(cfg, backend=resolve_backend(backend, torch.device(device)))


def build_model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu", backend: str = "auto"):
    """(model in eval mode on ``device``, the ModelConfig it was built with) from a loaded checkpoint,
    on any device, with the backend :func:`inference_config` picks (``model.backend_name()``)."""
    from spkr.models import build_model

    cfg = inference_config(ckpt, device, backend)
    model = build_model(cfg, ckpt["feature_config"]["n_mels"], len(ckpt["labels"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def describe_backend(ckpt: dict, device: str | torch.device) -> str:
    """One line for logs: the device and Mamba backend a checkpoint runs with there (as built by
    :func:`build_model_from_checkpoint`) and the backend it was trained with."""
    cfg = inference_config(ckpt, device)
    used = "none (transformer)" if cfg.arch == "transformer" else cfg.backend
    trained = ckpt.get("backend") or ckpt["model_config"].get("backend")
    return f"device {torch.device(device)}, backend {used} (checkpoint trained with backend {trained})"


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The torch.device for a ``--device`` option: None / "auto" = cuda when available, else cpu.
    A device this machine does not have is a one-line ValueError (CLIs exit with code 2)."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a device (cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise ValueError(
                f"--device {name}: CUDA is not available here (torch {built}, no GPU); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        try:  # a real round trip: a backend torch lacks raises, so does "meta" (no data)
            torch.zeros(1, device=device).cpu()
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
            raise ValueError(f"--device {name}: not available here ({first})") from None
    return device

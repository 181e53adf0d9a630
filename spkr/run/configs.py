"""The ``[train]`` settings of a run and where they come from.

    TrainConfig                  the ``[train]`` table of a config file (every field is also a flag)
    config_source(args)          (file, log line): ``--config`` as a file or a bundled name, else the
                                 device's default (:func:`default_config`)
    load_configs(args)           (ModelConfig, TrainConfig): the file, then the command-line overrides
    resolve_compile(setting, device, planned_samples)   (compile or not, why): the "auto" policy

Bundled configs live in ``spkr/configs/`` (package data; the repo's ``configs`` is a symlink to it).
Bad files, unknown keys and bad values raise :class:`spkr.config.ConfigError` naming the file and key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from spkr.config import ConfigError, check_fields, from_dict, in_range, load_toml
from spkr.run.distributed import DTYPE_CHOICES, wants_cuda


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
    eq_db: float = 0.0  # random microphone EQ: per training utterance a smooth gain curve over the mel
    #   bins (tilt + 3 bumps, each gain uniform in +-eq_db dB) added to its log-mels (0 = off) ...
    eq_lowpass_hz: float = 0.0  # ... and a band limit: a low-pass at a cutoff log-uniform in [this, f_max]
    eq_highpass_hz: float = 0.0  # ... and a high-pass at a cutoff log-uniform in [f_min, this] (0 = off)
    noise: float = 0.0  # additive noise: this share of training utterances gets a coloured noise
    #   (tilt, hum/fan tones, a syllabic level modulation) added in the power spectrum (0 = off) ...
    noise_snr_min_db: float = 5.0  # ... at an SNR uniform in [noise_snr_min_db, noise_snr_max_db]
    noise_snr_max_db: float = 30.0
    num_workers: int = 2  # DataLoader workers per rank
    seed: int = 0
    dtype: str = "auto"  # "auto" | "bf16" | "fp16" | "fp32" (spkr.run.distributed.resolve_dtype)
    compile: bool | str = "auto"  # torch.compile the training model: true | false | "auto" (CUDA only)
    ckpt_every: int = 0  # also write last.pt every N optimizer steps (0 = only at epoch ends)
    log_every: int = 10  # steps between metrics lines
    eval_every: int = 1  # validate every N epochs (and after the last)
    select: str = "last"  # the weights the final test measures: "last" | "valid" (those of the best
    #   validation: valid-verify EER with protocol open, else valid accuracy; kept in <out>/best.pt)
    verify_pairs: int = 200_000  # trial pairs for the final EER/minDCF (0 = all pairs)

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("weight_decay", "grad_clip"):
            in_range(getattr(self, name), name, 0)
        for name in ("beta1", "beta2", "label_smoothing"):
            in_range(getattr(self, name), name, 0)
            if not getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} is not < 1")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.select not in ("last", "valid"):
            raise ValueError(f'select must be "last" or "valid", got {self.select!r}')
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
        if not 0 <= self.eq_db <= 40:
            raise ValueError(f"eq_db must be in [0, 40] dB, got {self.eq_db}")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise must be a share in [0, 1], got {self.noise}")
        if not -20 <= self.noise_snr_min_db <= self.noise_snr_max_db <= 80:
            raise ValueError(
                f"noise SNRs must satisfy -20 <= noise_snr_min_db <= noise_snr_max_db <= 80 dB, got "
                f"{self.noise_snr_min_db} and {self.noise_snr_max_db}"
            )
        if self.eq_lowpass_hz < 0 or self.eq_highpass_hz < 0:
            raise ValueError("eq_lowpass_hz and eq_highpass_hz must be >= 0 (0 = off)")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need lr > 0 and 0 <= min_lr_ratio <= 1")


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


# "auto" compiles on CPU for runs of at least this many training samples: there torch.compile steps the
# demo config 1.23x (cold inductor cache) to 1.29x (warm) as fast as eager, and its first step waits
# 191 s for a cold cache (26 s warm) on 2 cores (tools/bench_train.py), which ~40k samples repay.
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


def bundled_configs_dir() -> Path:
    """The configs shipped inside the package (spkr/configs/; the repo's top-level ``configs`` is a
    symlink to it, so an edit there is what an editable install reads)."""
    return Path(__file__).resolve().parents[1] / "configs"


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
    else mamba-torch, the Mamba-1 with the same weights and no compiled extension (spkr's Triton scan on
    CUDA, the pure-torch scan on CPU)."""
    if not wants_cuda(device_arg):
        return "mamba-torch", "default for cpu; mamba-ssm needs CUDA"
    from spkr.models import mamba_ssm_available

    why = mamba_ssm_available()
    if why is None:
        return "mamba-ssm", "default for cuda with the mamba_ssm kernels"
    return "mamba-torch", f"default for cuda without mamba_ssm, spkr's Triton scan: {why}"


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

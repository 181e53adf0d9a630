"""Augmentation of normalised log-mel training batches, on the device, with the global torch RNG
(saved in checkpoints, so a resumed run draws the same masks and curves).

    mel = eq_augment(mel, lengths, cfg, stats, features)   # random microphone: a dB curve per utterance
    mel = spec_augment(mel, lengths, cfg)                   # SpecAugment frequency and time masks

Both return ``mel`` itself when the config turns them off (:func:`eq_active`; no masks).
"""

from __future__ import annotations

import math

import torch

from spkr.features import mel_centres
from spkr.run.configs import TrainConfig


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

"""Augmentation of normalised log-mel training batches, on the device, with the global torch RNG
(saved in checkpoints, so a resumed run draws the same masks and curves).

    mel = noise_augment(mel, lengths, cfg, stats, features)  # additive noise in the power spectrum
    mel = eq_augment(mel, lengths, cfg, stats, features)     # random microphone: a dB curve per utterance
    mel = spec_augment(mel, lengths, cfg)                    # SpecAugment frequency and time masks

Each returns ``mel`` itself when the config turns it off (``noise = 0``, :func:`eq_active`, no masks).
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
    db = InDecibels(mel, lengths, stats)
    return db.back(db.db + curve.to(mel.device)[:, None, :], features.top_db)


class InDecibels:
    """A normalised (B, T, F) batch in dB (``stats``: the loader's per-bin mean/std) with its length mask
    ``inside`` (B, T, 1) and each utterance's peak (B, 1, 1); :meth:`back` floors new dB values like the
    features (at peak - top_db) and normalises them again, leaving the padding as it was."""

    def __init__(self, mel: torch.Tensor, lengths: torch.Tensor, stats: dict):
        device = mel.device
        self.mel = mel
        self.mean, self.std = (
            torch.tensor(stats[k], dtype=torch.float32, device=device) for k in ("mean", "std")
        )
        T = mel.shape[1]
        self.inside = (torch.arange(T, device=device)[None, :] < lengths[:, None])[:, :, None]
        self.db = mel.float() * self.std + self.mean
        self.peak = self.db.masked_fill(~self.inside, -math.inf).amax(dim=(1, 2), keepdim=True)

    def back(self, db: torch.Tensor, top_db: float) -> torch.Tensor:
        floored = torch.maximum(db, self.peak - top_db)
        return torch.where(self.inside, ((floored - self.mean) / self.std).to(self.mel.dtype), self.mel)


NOISE_TONES = 2  # narrow bumps of the noise spectrum (mains hum, fan blade) besides its tilt


def noise_augment(
    mel: torch.Tensor, lengths: torch.Tensor, cfg: TrainConfig, stats: dict, features
) -> torch.Tensor:
    """Additive noise of a normalised (B, T, F) batch. Noise adds in the power spectrum, so in dB

        m'(t, f) = 10 log10(10^(m(t, f) / 10) + 10^(n(t, f) / 10))

    (exact for the expected power; the cross term of speech and noise averages out within a mel band).
    An utterance gets noise with probability ``noise``; its noise, with x = f / (F - 1) in [0, 1]:

        n(t, f) = L + s (2x - 1) + sum of NOISE_TONES  b exp(-(x - c)^2 / 2w^2) + a sin(2 pi t / P + phi)

    s in [-12, 3] dB (brown to white over the mel band), tones b in [0, 12] dB, c in [0, 0.3] (low
    frequencies), w in [0.01, 0.04]; a level modulation of a in [0, 6] dB with a period P of 20-100 frames
    (syllabic, babble-like); L sets the utterance's SNR, 10 log10(speech power / noise power) summed over
    bins and averaged over its frames, uniform in [``noise_snr_min_db``, ``noise_snr_max_db``]. Within the
    utterance's length only, floored like the features; global torch RNG (saved in checkpoints)."""
    if not cfg.noise:
        return mel
    B, T, n_freq = mel.shape
    device = mel.device

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(B, *shape)

    x = torch.linspace(0.0, 1.0, n_freq)[None, :]
    shape = uniform(-12.0, 3.0, 1) * (2 * x - 1)
    for _ in range(NOISE_TONES):
        b, c, w = uniform(0.0, 12.0, 1), uniform(0.0, 0.3, 1), uniform(0.01, 0.04, 1)
        shape = shape + b * torch.exp(-0.5 * ((x - c) / w) ** 2)  # (B, F)
    t = torch.arange(T, dtype=torch.float32)[None, :]
    level = uniform(0.0, 6.0, 1) * torch.sin(
        2 * math.pi * t / uniform(20.0, 100.0, 1) + uniform(0, 2 * math.pi, 1)
    )
    snr = uniform(cfg.noise_snr_min_db, cfg.noise_snr_max_db, 1, 1)  # (B, 1, 1)
    chosen = (torch.rand(B) < cfg.noise).to(device)
    noise = (shape[:, None, :] + level[:, :, None]).to(device)  # (B, T, F), before its level L
    db = InDecibels(mel, lengths, stats)
    frames = lengths.clamp(min=1).to(device, torch.float32)[:, None, None]

    def power(decibels: torch.Tensor) -> torch.Tensor:  # summed over bins, mean over the utterance's frames
        per_frame = torch.pow(10.0, decibels / 10).masked_fill(~db.inside, 0).sum(dim=2, keepdim=True)
        return per_frame.sum(dim=1, keepdim=True) / frames

    L = 10 * torch.log10(power(db.db) / power(noise)) - snr.to(device)
    noisy = 10 * torch.log10(torch.pow(10.0, db.db / 10) + torch.pow(10.0, (noise + L) / 10))
    return torch.where(chosen[:, None, None], db.back(noisy, features.top_db), mel)

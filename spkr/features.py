"""Log-mel features: one module for the shard tool (write side) and for inference.

    waveform (samples,) float32, 16 kHz mono
      -> power spectrogram |STFT|^2          (freq=n_fft//2+1, frames)
      -> mel filterbank (HTK scale)          (n_mels, frames)
      -> dB: 10*log10(max(x, 1e-10)), floored at (max - top_db) per utterance
      -> transposed to time-major            (frames, n_mels)

Two backends compute the same thing: ``torchaudio`` (MelSpectrogram + AmplitudeToDB) when it
imports, and ``torch`` (torch.stft + a filterbank built here), which needs nothing but torch. Tests
check they agree on real speech. Audio is read with soundfile (never torchaudio.load), downmixed to
mono and resampled when the caller allows it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from spkr.config import ConfigError, check_fields, in_range
from spkr.errors import SpkrError

AMIN = 1e-10  # power floor before log10, as torchaudio's AmplitudeToDB(stype="power")
MAX_SIZE = 2**31 - 1  # the largest sample rate, FFT size, hop or mel count a config may hold


@dataclass(frozen=True)
class FeatureConfig:
    """How waveforms become log-mel features. Written into every shard manifest and checkpoint."""

    sample_rate: int = 16000
    n_fft: int = 400
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    f_min: float = 20.0
    f_max: float = 7600.0
    top_db: float = 80.0
    center: bool = True
    mel_scale: str = "htk"
    dtype: str = "float16"  # on-disk dtype of the features

    def __post_init__(self):
        """Every field checked before any work: its type (ints are ints, floats finite numbers), its
        range, and how fields relate; else a ConfigError ``<field>: <problem>``."""
        check_fields(self)
        for name in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels"):
            in_range(getattr(self, name), name, 1, MAX_SIZE)
        in_range(self.top_db, "top_db", above=0)
        if self.mel_scale not in ("htk", "slaney"):
            raise ConfigError(f"mel_scale: must be 'htk' or 'slaney', got {self.mel_scale!r}")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"dtype: must be 'float16' or 'float32', got {self.dtype!r}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ConfigError(
                f"f_min, f_max: need 0 <= f_min < f_max <= sample_rate/2, got {self.f_min}, {self.f_max}"
            )
        if self.win_length > self.n_fft:
            raise ConfigError(f"win_length: {self.win_length} is above n_fft {self.n_fft}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "feature config") -> FeatureConfig:
        """From a mapping (a manifest's, a checkpoint's, ``--feature-config`` over the defaults): an
        unknown key or a bad value is a ConfigError naming ``where`` and the key. Values are kept as
        given (``top_db`` 40 stays an int: the fingerprint hashes them as written)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{where} {e}") from None

    def fingerprint(self) -> str:
        """Short hash of the canonical JSON: equal iff the features are computed identically."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def num_frames(self, num_samples: int) -> int:
        """Frames the STFT yields for a waveform of ``num_samples``."""
        if self.center:
            return 1 + num_samples // self.hop_length
        return 1 + (num_samples - self.n_fft) // self.hop_length

    @property
    def min_samples(self) -> int:
        """The shortest waveform that has features: one analysis frame (``n_fft`` >= ``win_length``
        samples). A shorter clip would be mostly centre padding (reflect padding needs more than
        n_fft // 2 samples to exist at all), i.e. invented signal."""
        return self.n_fft


class AudioError(SpkrError, ValueError):
    """An audio file that cannot become features; the message names the file and the problem."""


# --------------------------------------------------------------------------- audio input


def _resample_kernels(orig: int, new: int, lowpass_width: int = 6, rolloff: float = 0.99):
    """Windowed-sinc polyphase filters for orig->new (both already divided by their gcd).
    Returns (kernels (new, 1, K), width)."""
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_width * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new + idx[None, :]
    t = (t * base).clamp(-lowpass_width, lowpass_width)
    window = torch.cos(t * math.pi / lowpass_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernels = sinc * window * (base / orig)
    return kernels.to(torch.float32)[:, None, :], width


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited (windowed-sinc) resampling of a mono float32 waveform (samples,)."""
    if orig_sr == new_sr:
        return wave
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    kernels, width = _resample_kernels(orig, new)
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    n = x.shape[0]
    x = torch.nn.functional.pad(x[None, None], (width, width + orig))
    y = torch.nn.functional.conv1d(x, kernels, stride=orig)  # (1, new, blocks)
    y = y[0].t().reshape(-1)
    return y[: math.ceil(new * n / orig)].numpy()


def load_audio(
    source: str | Path | bytes,
    cfg: FeatureConfig,
    *,
    name: str | None = None,
    allow_resample: bool = True,
    allow_downmix: bool = True,
    min_seconds: float = 0.0,
) -> np.ndarray:
    """Decode audio with soundfile -> float32 mono waveform at ``cfg.sample_rate``.

    ``source`` is a path or the encoded file's bytes. Problems raise AudioError naming ``name``
    (default: the path): unreadable/corrupt data, no samples, shorter than ``min_seconds``, a sample
    rate other than cfg.sample_rate when ``allow_resample`` is False, several channels when
    ``allow_downmix`` is False.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        data, sr = sf.read(handle, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError ...
        raise AudioError(f"{name}: cannot decode audio ({type(e).__name__}: {e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{name}: audio file has no samples")
    if data.shape[1] > 1:
        if not allow_downmix:
            raise AudioError(f"{name}: {data.shape[1]} channels, expected mono (allow downmix to convert)")
        wave = data.mean(axis=1)
    else:
        wave = data[:, 0]
    if sr != cfg.sample_rate:
        if not allow_resample:
            raise AudioError(
                f"{name}: sample rate {sr} Hz, expected {cfg.sample_rate} Hz (allow resampling to convert)"
            )
        wave = resample(wave, sr, cfg.sample_rate)
    seconds = wave.shape[0] / cfg.sample_rate
    if seconds < min_seconds:
        raise AudioError(f"{name}: too short ({seconds:.3f} s < {min_seconds} s)")
    if not np.isfinite(wave).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    return np.ascontiguousarray(wave, dtype=np.float32)


# --------------------------------------------------------------------------- log-mel


def _hz_to_mel(f: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    # slaney: linear below 1 kHz, logarithmic above
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    lin = f / f_sp
    return torch.where(f >= min_log_hz, min_log_mel + torch.log(f / min_log_hz) / logstep, lin)


def _mel_to_hz(m: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_centres(cfg: FeatureConfig) -> torch.Tensor:
    """Centre frequency in Hz of each mel filter, (n_mels,)."""
    m_min = _hz_to_mel(torch.tensor(float(cfg.f_min)), cfg.mel_scale)
    m_max = _hz_to_mel(torch.tensor(float(cfg.f_max)), cfg.mel_scale)
    return _mel_to_hz(torch.linspace(float(m_min), float(m_max), cfg.n_mels + 2), cfg.mel_scale)[1:-1]


def mel_filterbank(cfg: FeatureConfig) -> torch.Tensor:
    """Triangular mel filters, (n_freqs, n_mels), unnormalised (torchaudio's norm=None)."""
    n_freqs = cfg.n_fft // 2 + 1
    all_freqs = torch.linspace(0, cfg.sample_rate // 2, n_freqs)
    m_min = _hz_to_mel(torch.tensor(float(cfg.f_min)), cfg.mel_scale)
    m_max = _hz_to_mel(torch.tensor(float(cfg.f_max)), cfg.mel_scale)
    f_pts = _mel_to_hz(torch.linspace(float(m_min), float(m_max), cfg.n_mels + 2), cfg.mel_scale)
    f_diff = f_pts[1:] - f_pts[:-1]  # (n_mels + 1,)
    slopes = f_pts[None, :] - all_freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0)


def _to_db(power_mel: torch.Tensor, top_db: float) -> torch.Tensor:
    """(..., frames, n_mels) power -> dB, floored at max - top_db per utterance (last two dims)."""
    db = 10.0 * torch.log10(torch.clamp(power_mel, min=AMIN))
    peak = db.amax(dim=(-2, -1), keepdim=True)
    return torch.maximum(db, peak - top_db)


def torchaudio_available() -> bool:
    try:
        import torchaudio.transforms  # noqa: F401
    except Exception:  # ImportError, or OSError from a torch/torchaudio ABI mismatch
        return False
    return True


def resolve_backend(backend: str = "auto") -> str:
    """The backend that ``backend`` means here: "auto" is torchaudio when it imports, else torch (the
    resolved name is recorded in manifests: it is part of a dataset's identity)."""
    if backend == "auto":
        backend = "torchaudio" if torchaudio_available() else "torch"
    if backend not in ("torchaudio", "torch"):
        raise ValueError(f"unknown feature backend {backend!r} (torchaudio, torch, auto)")
    if backend == "torchaudio" and not torchaudio_available():
        raise RuntimeError("feature backend 'torchaudio' requested but torchaudio does not import")
    return backend


class LogMel(torch.nn.Module):
    """waveform (samples,) or (batch, samples) float32 -> log-mel (frames, n_mels) / (batch, frames, n_mels).

    backend: "torchaudio" (MelSpectrogram + AmplitudeToDB), "torch" (pure torch), or "auto"
    (torchaudio when it imports). Note: top_db is applied per utterance; for a batch pass
    equal-length waveforms only when that is what you mean (the shard tool passes one at a time).
    """

    def __init__(self, cfg: FeatureConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.backend = backend = resolve_backend(backend)
        if backend == "torchaudio":
            import torchaudio.transforms as T

            self.mel = T.MelSpectrogram(
                sample_rate=cfg.sample_rate,
                n_fft=cfg.n_fft,
                win_length=cfg.win_length,
                hop_length=cfg.hop_length,
                f_min=cfg.f_min,
                f_max=cfg.f_max,
                n_mels=cfg.n_mels,
                power=2.0,
                center=cfg.center,
                pad_mode="reflect",
                norm=None,
                mel_scale=cfg.mel_scale,
            )
            self.db = T.AmplitudeToDB(stype="power", top_db=cfg.top_db)
        else:
            # torch.stft's convention: a win_length window centred in n_fft
            window = torch.hann_window(cfg.win_length)
            left = (cfg.n_fft - cfg.win_length) // 2
            window = torch.nn.functional.pad(window, (left, cfg.n_fft - cfg.win_length - left))
            self.register_buffer("window", window, persistent=False)
            self.register_buffer("fb", mel_filterbank(cfg), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        single = wave.dim() == 1
        x = wave[None] if single else wave  # (batch, samples)
        if self.backend == "torchaudio":
            # AmplitudeToDB floors a 3-D input with one max: apply it per utterance
            mel_db = torch.stack([self.db(self.mel(w)) for w in x])  # (batch, n_mels, frames)
            out = mel_db.transpose(-1, -2).contiguous()
        else:
            out = self._torch_logmel(x)
        return out[0] if single else out

    def _torch_logmel(self, x: torch.Tensor) -> torch.Tensor:
        """The same STFT as torch.stft(center, reflect, onesided), computed time-major: frame with
        unfold, window, rfft. |X|^2 as re^2 + im^2 (cheaper than abs().pow(2))."""
        cfg = self.cfg
        if cfg.center:
            pad = cfg.n_fft // 2
            x = torch.nn.functional.pad(x[:, None], (pad, pad), mode="reflect")[:, 0]
        frames = x.unfold(-1, cfg.n_fft, cfg.hop_length)  # (batch, frames, n_fft)
        spec = torch.fft.rfft(frames * self.window, n=cfg.n_fft)  # (batch, frames, n_freqs)
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(power, self.fb)  # (batch, frames, n_mels)
        return _to_db(mel, cfg.top_db)


def compute_logmel(wave: np.ndarray, logmel: LogMel) -> np.ndarray:
    """Waveform (samples,) -> features (frames, n_mels) in the config's on-disk dtype."""
    with torch.inference_mode():
        feats = logmel(torch.from_numpy(wave))
    return feats.numpy().astype(logmel.cfg.dtype)

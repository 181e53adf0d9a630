"""Waveform augmentation at shard time: K corrupted copies of each training utterance, computed once.

Place in the pipeline: corpus -> audio decode (``spkr.features.load_audio``) -> **augment** -> log-mel
-> shards. Waveforms in, waveforms out (float32 mono at the corpus sample rate); nothing here knows about
features, shards or manifests, and training never sees raw audio.

Contract
    ``augment(wave, sr, key, copy_index, cfg, sources) -> (wave, description)``
    * deterministic: the result is a pure function of (cfg, the source files' contents, ``wave``, ``sr``,
      ``key``, ``copy_index``) - every random draw comes from a generator seeded by
      sha256(cfg.seed, key, copy_index), so a resumed, re-ranked or parallel shard run writes identical
      bytes whatever order utterances are processed in;
    * ``description`` says exactly what was applied (JSON-serialisable; every drawn number is rounded
      *before* it is applied, so the recorded value is the applied one), see :func:`augment`;
    * copy ``k`` (0-based) of utterance ``key`` is stored under :func:`copy_key` ``"<key>~aug<k>"``.

Kinds (``AugmentConfig.kinds``; each copy applies one entry, an entry may chain kinds with ``+``, e.g.
``"reverb+noise"``; chained steps always run in the order speed -> reverb -> additive sources)
    noise / music / babble  additive sources from a MUSAN-style folder ``<noise_dir>/{noise,music,speech}/``
                            (``**/*.wav|flac``) at a uniform random SNR (Kaldi/SpeechBrain ranges: noise
                            0-15 dB, music 5-15 dB, babble = 3-7 summed ``speech/`` files at 13-20 dB).
                            SNR = 10 log10(mean(speech^2) / mean(added^2)) over the whole utterance. A
                            longer source gives a random segment; a shorter one is tiled (from a random
                            offset). Sources at another sample rate are resampled (band-limited sinc);
                            multi-channel sources are downmixed.
    reverb                  a room impulse response from ``rir_dir`` (``**/*.wav|flac``, first channel;
                            e.g. RIRS_NOISES/simulated_rirs) or, without it, a synthetic one (exponentially
                            decaying Gaussian noise reaching -60 dB at RT60, a unit direct path, drawn
                            direct-to-reverberant ratio). FFT convolution; the output is aligned on the
                            direct path (the RIR's largest sample), keeps the input's length, and is
                            rescaled to the input's power.
    speed                   Kaldi/sox ``speed`` perturbation: resampled by 1/factor, so duration and pitch
                            change (factor 1.1 -> 1/1.1 as long). Factors are drawn from ``cfg.speeds``;
                            with ``cfg.speed_classes`` a copy at factor f belongs to the class
                            :func:`speed_speaker` ``"<spk>@sp<f>"`` (see :func:`speed_classes`).

Which entry copy k applies: ``kinds[(r + k) % len(kinds)]`` with r drawn from (seed, key) alone, so an
utterance's copies use distinct entries (while K <= len(kinds)) and entries are spread evenly over the
corpus; :func:`copy_recipe` tells the entry and speed factor without the audio (for labels). Folder errors (missing, no audio of a needed category) raise :class:`AugmentError`; an
unreadable or empty audio file raises ``spkr.features.AudioError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from spkr.config import check_fields, from_dict
from spkr.errors import SpkrError
from spkr.features import AudioError, resample
from spkr.shards.schema import COPY_SEPARATOR

KINDS: tuple[str, ...] = ("speed", "reverb", "noise", "music", "babble")  # also the order of chained steps
ADDITIVE_CATEGORY: dict[str, str] = {"noise": "noise", "music": "music", "babble": "speech"}  # kind -> folder
AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac")
SPEED_SEPARATOR = "@sp"


class AugmentError(SpkrError, ValueError):
    """An augmentation config or source folder that cannot be used; the message says what and where."""


@dataclass(frozen=True)
class AugmentConfig:
    """What the shard tool's augmented copies are. ``copies`` = K copies per *training* utterance."""

    copies: int = 0
    kinds: tuple[str, ...] = ("noise", "music", "babble", "reverb", "speed")
    noise_dir: str | None = None  # MUSAN-style root: noise/ music/ speech/
    rir_dir: str | None = None  # RIR wavs/flacs; None: synthetic RIRs
    noise_snr_db: tuple[float, ...] = (0.0, 15.0)
    music_snr_db: tuple[float, ...] = (5.0, 15.0)
    babble_snr_db: tuple[float, ...] = (13.0, 20.0)
    babble_speakers: tuple[int, ...] = (3, 7)  # inclusive
    rt60_s: tuple[float, ...] = (0.2, 0.8)  # synthetic RIRs
    drr_db: tuple[float, ...] = (0.0, 10.0)  # synthetic RIRs: direct-to-reverberant energy ratio
    speeds: tuple[float, ...] = (0.9, 1.1)
    speed_classes: bool = False  # a speed copy at factor f is speaker "<spk>@sp<f>" (a new class)
    seed: int = 0

    def __post_init__(self):
        check_fields(self)
        if self.copies < 0:
            raise AugmentError(f"augment copies must be >= 0, got {self.copies}")
        if self.copies and not self.kinds:
            raise AugmentError("augment kinds is empty but copies > 0")
        for entry in self.kinds:
            parts = entry.split("+")
            unknown = [p for p in parts if p not in KINDS]
            if unknown or len(set(parts)) != len(parts):
                raise AugmentError(f"augment kind {entry!r}: parts must be distinct, from {list(KINDS)}")
        for name in ("noise_snr_db", "music_snr_db", "babble_snr_db", "rt60_s", "drr_db", "babble_speakers"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not lo_hi[0] <= lo_hi[1]:
                raise AugmentError(f"augment {name} must be [low, high] with low <= high, got {list(lo_hi)}")
        if self.babble_speakers[0] < 1 or self.rt60_s[0] <= 0:
            raise AugmentError("augment babble_speakers must be >= 1 and rt60_s > 0")
        if self.copies and "speed" in self.used_kinds():
            if not self.speeds:
                raise AugmentError("augment speeds is empty but a kind uses speed")
            for f in self.speeds:
                speed_ratio(f)  # raises on an unusable factor
        if self.copies and self.used_kinds() & set(ADDITIVE_CATEGORY) and not self.noise_dir:
            raise AugmentError("augment kinds noise/music/babble need noise_dir (a MUSAN-style folder)")

    def used_kinds(self) -> set[str]:
        return {p for entry in self.kinds for p in entry.split("+")}

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "augment config") -> AugmentConfig:
        """From a TOML table / JSON object; unknown keys and wrong types raise ConfigError naming them."""
        return from_dict(cls, d, where)


# --------------------------------------------------------------------------- names and seeds


def copy_key(key: str, copy_index: int) -> str:
    """Sample key of copy ``copy_index`` (0-based) of utterance ``key``: ``"19-198-0001~aug0"``."""
    return f"{key}{COPY_SEPARATOR}{int(copy_index)}"


def source_key(key: str) -> tuple[str, int | None]:
    """``"19-198-0001~aug2" -> ("19-198-0001", 2)``; an original key -> (key, None)."""
    base, sep, index = key.rpartition(COPY_SEPARATOR)
    return (base, int(index)) if sep and index.isdigit() else (key, None)


def speed_speaker(speaker: str, factor: float) -> str:
    """Class name of ``speaker`` at speed ``factor`` (Kaldi's ``sp0.9-`` prefix, as a suffix): ``"19@sp0.9"``."""
    return f"{speaker}{SPEED_SEPARATOR}{factor:g}"


def speed_classes(speakers: list[str], cfg: AugmentConfig) -> list[str]:
    """The extra classes speed copies create (append them after the original classes, whose ids stay
    unchanged): per factor in ``cfg.speeds`` order, every speaker in ``speakers`` order. Empty unless
    ``cfg.speed_classes`` and some kind uses speed."""
    if not (cfg.copies and cfg.speed_classes and "speed" in cfg.used_kinds()):
        return []
    return [speed_speaker(s, f) for f in cfg.speeds for s in speakers]


def copy_recipe(key: str, copy_index: int, cfg: AugmentConfig) -> tuple[str, float | None]:
    """(kind entry, speed factor or None) of copy ``copy_index`` of ``key``, known without the audio (the
    shard planner labels speed copies with it). Entry ``(r + copy_index) % len(kinds)``, r drawn from
    (seed, key); the factor has its own stream, so the other draws never shift it."""
    if not 0 <= copy_index < cfg.copies:
        raise AugmentError(f"{key}: copy index {copy_index} outside 0..{cfg.copies - 1}")
    start = int(_rng(cfg.seed, key, "kinds").integers(len(cfg.kinds)))
    kind = cfg.kinds[(start + copy_index) % len(cfg.kinds)]
    if "speed" not in kind.split("+"):
        return kind, None
    speed_rng = _rng(cfg.seed, key, f"speed{copy_index}")
    return kind, float(cfg.speeds[int(speed_rng.integers(len(cfg.speeds)))])


def copy_speaker(speaker: str, key: str, copy_index: int, cfg: AugmentConfig) -> str:
    """The class copy ``copy_index`` of ``key`` (spoken by ``speaker``) belongs to: ``speaker``, or its
    speed class :func:`speed_speaker` when ``cfg.speed_classes`` and the copy is speed-perturbed."""
    factor = copy_recipe(key, copy_index, cfg)[1]
    return speed_speaker(speaker, factor) if cfg.speed_classes and factor is not None else speaker


def _rng(seed: int, key: str, salt: str) -> np.random.Generator:
    digest = hashlib.sha256(f"spkr-augment\0{int(seed)}\0{key}\0{salt}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def speed_ratio(factor: float) -> tuple[int, int]:
    """factor = p / q exactly with q <= 100 (0.9 -> (9, 10)): the resampler's polyphase ratio."""
    if not 0.5 <= factor <= 2.0 or factor == 1.0:
        raise AugmentError(f"augment speed {factor} must be in [0.5, 2] and not 1 (the original is kept)")
    ratio = Fraction(factor).limit_denominator(100)
    if abs(float(ratio) - factor) > 1e-9:
        raise AugmentError(f"augment speed {factor} is not a ratio p/q with q <= 100 (e.g. 0.9, 1.05)")
    return ratio.numerator, ratio.denominator


# --------------------------------------------------------------------------- source folders


def _scan(root: Path, what: str) -> list[str]:
    """Audio files under ``root`` as sorted relative POSIX paths (the same on every machine)."""
    if not root.is_dir():
        raise AugmentError(f"{root}: {what} folder not found")
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
    )


_CONTENT: dict[tuple[str, int, int], str] = {}  # (absolute path, size, mtime_ns) -> sha256 of the bytes


def content_sha256(path: Path) -> str:
    """sha256 of the file's bytes, hashed once per (path, size, mtime_ns) in this process (a file
    rewritten in place gets a new mtime, so it is hashed again); unreadable is an AugmentError."""
    name = os.path.abspath(path)
    try:
        st = os.stat(name)
        key = (name, st.st_size, st.st_mtime_ns)
        if key not in _CONTENT:
            with open(name, "rb") as f:
                _CONTENT[key] = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise AugmentError(f"{path}: cannot read the augmentation source ({e.strerror or e})") from None
    return _CONTENT[key]


def known_contents() -> dict[tuple[str, int, int], str]:
    """This process's source hashes (:func:`content_sha256`), to hand to worker processes."""
    return dict(_CONTENT)


def remember_contents(known: dict[tuple[str, int, int], str]) -> None:
    """Take another process's source hashes (:func:`known_contents`): files unchanged since (same
    path, size and mtime) are not read again."""
    _CONTENT.update(known)


class AugmentSources:
    """The noise and RIR files a config draws from (indexed once), with a bounded cache of decoded audio."""

    def __init__(self, cfg: AugmentConfig, sample_rate: int, cache_bytes: int = 256 << 20):
        self.sample_rate, self.cache_bytes = int(sample_rate), cache_bytes
        self.noise_root = Path(cfg.noise_dir) if cfg.noise_dir else None
        self.rir_root = Path(cfg.rir_dir) if cfg.rir_dir else None
        self.files: dict[str, list[str]] = {}  # category -> paths relative to noise_root
        if not cfg.copies:  # augmentation off: nothing to index
            cfg = dataclasses.replace(cfg, kinds=())
        for kind in sorted(cfg.used_kinds() & set(ADDITIVE_CATEGORY)):
            category = ADDITIVE_CATEGORY[kind]
            folder = self.noise_root / category
            found = _scan(folder, f"{kind} ({category}/)")
            if not found:
                raise AugmentError(f"{folder}: no {'/'.join(AUDIO_EXTENSIONS)} files for augment kind {kind}")
            self.files[category] = [f"{category}/{rel}" for rel in found]
        self.rirs: list[str] = []
        if self.rir_root is not None and "reverb" in cfg.used_kinds():
            self.rirs = _scan(self.rir_root, "RIR")
            if not self.rirs:
                raise AugmentError(f"{self.rir_root}: no {'/'.join(AUDIO_EXTENSIONS)} RIR files")
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._frames: dict[str, int] = {}  # additive source -> its length at the sample rate (-1: other rate)
        self._cached_bytes = 0

    def fingerprint(self) -> str:
        """sha256[:16] of every indexed file's relative path and content sha256 (:func:`content_sha256`):
        equal iff the same source sets, byte for byte (wherever the folders are); goes into the shard
        run's identity, so into every copy's plan hash, the manifest's ``augment`` entry and the
        dataset_id."""
        h = hashlib.sha256()
        indexed = [("noise", self.noise_root, rel) for rels in self.files.values() for rel in rels]
        indexed += [("rir", self.rir_root, rel) for rel in self.rirs]
        for label, root, rel in indexed:
            h.update(f"{label}\t{rel}\t{content_sha256(root / rel)}\n".encode())
        return h.hexdigest()[:16]

    def noise(self, rel: str) -> np.ndarray:
        """Decoded additive source ``rel`` (relative to noise_dir): mono (downmixed), at the sample rate."""
        return self._load("noise", rel)

    def noise_segment(self, rel: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, int, bool]:
        """``segment(self.noise(rel), n, rng)`` plus whether it was tiled, but a long source at the sample
        rate is not decoded whole: only its ``n`` samples are read (MUSAN music files last minutes)."""
        path = self.noise_root / rel
        if rel not in self._frames:
            try:
                info = sf.info(str(path))
            except Exception as e:
                raise AudioError(f"{path}: cannot decode audio ({type(e).__name__}: {e})") from None
            self._frames[rel] = info.frames if info.samplerate == self.sample_rate else -1
        frames = self._frames[rel]
        if frames < n:  # another rate (resampled whole), or shorter than n (tiled): decode it all
            source = self.noise(rel)
            return (*segment(source, n, rng), len(source) < n)
        offset = int(rng.integers(0, frames - n + 1))  # the draw segment() makes for this length
        return read_source(path, self.sample_rate, start=offset, frames=n), offset, False

    def rir(self, rel: str) -> np.ndarray:
        """Decoded RIR ``rel`` (relative to rir_dir): its first channel, at the sample rate."""
        return self._load("rir", rel)

    def _load(self, what: str, rel: str) -> np.ndarray:
        hit = self._cache.get((what, rel))
        if hit is not None:
            self._cache.move_to_end((what, rel))
            return hit
        root = self.noise_root if what == "noise" else self.rir_root
        wave = read_source(root / rel, self.sample_rate, first_channel=what == "rir")
        self._cache[(what, rel)] = wave
        self._cached_bytes += wave.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return wave


def augment_identity(cfg: AugmentConfig, sources: AugmentSources) -> dict:
    """What decides the copies' bytes, for the shard run's identity (plan hash): the config without the
    folder locations, plus :meth:`AugmentSources.fingerprint` of their contents (moving the noise set
    keeps the identity; adding, removing or changing a file changes it)."""
    return {**cfg.to_dict(), "noise_dir": None, "rir_dir": None, "sources": sources.fingerprint()}


@functools.lru_cache(maxsize=4)
def load_sources(cfg: AugmentConfig, sample_rate: int) -> AugmentSources:
    """One :class:`AugmentSources` per (config, rate) per process (shard workers index folders once)."""
    return AugmentSources(cfg, sample_rate)


def read_source(
    path: Path, sample_rate: int, *, first_channel: bool = False, start: int = 0, frames: int = -1
) -> np.ndarray:
    """A noise/RIR file (or ``frames`` samples of it from ``start``, at its own rate) -> float32 mono at
    ``sample_rate`` (downmix, or its first channel for RIRs); unreadable, empty, short or non-finite
    audio raises AudioError naming the file."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True, start=start, frames=frames)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError ...
        raise AudioError(f"{path}: cannot decode audio ({type(e).__name__}: {e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: audio file has no samples")
    if frames >= 0 and data.shape[0] != frames:
        raise AudioError(f"{path}: {data.shape[0]} samples from {start}, expected {frames} (truncated file?)")
    wave = data[:, 0] if first_channel else data.mean(axis=1)
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    return np.ascontiguousarray(resample(wave, sr, sample_rate), dtype=np.float32)


# --------------------------------------------------------------------------- signal operations


def power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64)))


def mix_at_snr(
    speech: np.ndarray, added: np.ndarray, snr_db: float, powers: tuple[float, float] | None = None
) -> np.ndarray:
    """speech + g * added with g such that 10 log10(power(speech) / power(g * added)) = snr_db.
    Both must have non-zero power and equal length; ``powers``: their powers when already known."""
    p_speech, p_added = powers or (power(speech), power(added))
    gain = math.sqrt(p_speech / (p_added * 10.0 ** (snr_db / 10.0)))
    return (speech.astype(np.float64) + gain * added.astype(np.float64)).astype(np.float32)


def segment(source: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``n`` samples of ``source`` from a random offset: a plain segment (a view) when the source is
    long enough, else the source tiled (wrapping around) from an offset in [0, len).
    Returns (segment, offset)."""
    if len(source) >= n:
        offset = int(rng.integers(0, len(source) - n + 1))
        return source[offset : offset + n], offset
    offset = int(rng.integers(0, len(source)))
    return np.resize(np.concatenate([source[offset:], source[:offset]]), n), offset


def synthetic_rir(sample_rate: int, rt60: float, drr_db: float, rng: np.random.Generator) -> np.ndarray:
    """A unit direct path at sample 0, then (from 2 ms) Gaussian noise decaying 60 dB by ``rt60`` s,
    scaled so that direct / tail energy = ``drr_db``. Length: ``rt60`` s."""
    n = max(2, int(round(rt60 * sample_rate)))
    t = np.arange(n) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60)
    tail[: max(1, int(0.002 * sample_rate))] = 0.0
    energy = float(np.sum(tail**2))
    if energy > 0:
        tail *= math.sqrt(10.0 ** (-drr_db / 10.0) / energy)
    tail[0] = 1.0
    return tail.astype(np.float32)


def fft_convolve(wave: np.ndarray, ir: np.ndarray) -> np.ndarray:
    """Full linear convolution (float32, at least len(wave) + len(ir) - 1 samples, zeros after) by
    overlap-add: blocks of ``step`` >= len(ir) - 1 samples, FFTs of 2 * step (3x faster than one FFT of
    the whole utterance for 12 s / 0.8 s). numpy's FFT, not torch's: torch.fft's result depends on the
    thread count (measured: torch 2.14 CPU, 1 vs 2 threads), which would break byte-identical shards."""
    step = 1 << max((len(ir) - 1).bit_length(), 11)
    blocks = -(-len(wave) // step)
    x = np.zeros(blocks * step, np.float32)
    x[: len(wave)] = wave
    spectrum = np.fft.rfft(x.reshape(blocks, step), 2 * step) * np.fft.rfft(ir, 2 * step)
    y = np.fft.irfft(spectrum, 2 * step).astype(np.float32)  # (blocks, 2 * step): block b starts at b * step
    out = np.zeros((blocks + 1, step), np.float32)
    out[:blocks] += y[:, :step]
    out[1:] += y[:, step:]
    return out.reshape(-1)


def reverberate(wave: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolution with ``rir``, aligned on its direct path (largest |sample|), cut to the input's
    length and rescaled to the input's power."""
    peak = int(np.argmax(np.abs(rir)))
    wet = fft_convolve(wave, np.asarray(rir, np.float32))[peak : peak + len(wave)]
    p_wet = power(wet)
    scale = math.sqrt(power(wave) / p_wet) if p_wet > 0 else 1.0
    return (wet.astype(np.float64) * scale).astype(np.float32)


def speed_perturb(wave: np.ndarray, factor: float) -> np.ndarray:
    """sox ``speed factor``: resampled so it plays ``factor`` times faster at the same rate (length
    ceil(n / factor); pitch scales by ``factor``)."""
    p, q = speed_ratio(factor)
    return resample(wave, p, q)


# --------------------------------------------------------------------------- the steps


def _draw(rng: np.random.Generator, low_high: tuple[float, ...], digits: int) -> float:
    return round(float(rng.uniform(low_high[0], low_high[1])), digits)


def _add(wave, kind, cfg, rng, sources) -> tuple[np.ndarray, dict]:
    """One additive step (noise, music or babble) at a drawn SNR."""
    category = ADDITIVE_CATEGORY[kind]
    files = sources.files[category]
    snr = _draw(rng, getattr(cfg, f"{kind}_snr_db"), 3)
    count = int(rng.integers(cfg.babble_speakers[0], cfg.babble_speakers[1] + 1)) if kind == "babble" else 1
    picks = rng.choice(len(files), size=count, replace=len(files) < count)
    added = np.zeros(len(wave), dtype=np.float64)
    used = []
    for i in picks:
        rel = files[int(i)]
        part, offset, tiled = sources.noise_segment(rel, len(wave), rng)
        level = math.sqrt(power(part)) if kind == "babble" else 1.0  # babble: every talker at one level
        if level > 0:
            added += part / level if kind == "babble" else part
        used.append({"file": rel, "offset": offset, "tiled": tiled})
    step = {"type": kind, "snr_db": snr, "sources": used}
    p_speech, p_added = power(wave), power(added)
    if p_speech == 0 or p_added == 0:
        return wave, {**step, "skipped": "silent utterance" if p_speech == 0 else "silent source segment"}
    return mix_at_snr(wave, added, snr, (p_speech, p_added)), step


def _reverb(wave, sr, cfg, rng, sources) -> tuple[np.ndarray, dict]:
    if sources.rirs:
        rel = sources.rirs[int(rng.integers(len(sources.rirs)))]
        return reverberate(wave, sources.rir(rel)), {"type": "reverb", "rir": rel}
    rt60, drr = _draw(rng, cfg.rt60_s, 3), _draw(rng, cfg.drr_db, 2)
    rir = synthetic_rir(sr, rt60, drr, rng)
    return reverberate(wave, rir), {"type": "reverb", "synthetic": {"rt60_s": rt60, "drr_db": drr}}


def augment(
    wave: np.ndarray, sr: int, key: str, copy_index: int, cfg: AugmentConfig, sources: AugmentSources
) -> tuple[np.ndarray, dict]:
    """Copy ``copy_index`` of utterance ``key`` (its waveform ``wave`` at ``sr``) -> (float32 waveform,
    description). The description (JSON-serialisable; offsets in samples at ``sr`` after resampling)::

        {"key": "19-198-0001~aug1", "source": "19-198-0001", "copy": 1, "seed": 0, "kind": "reverb+noise",
         "steps": [{"type": "speed", "factor": 0.9},
                   {"type": "reverb", "rir": "smallroom/Room001/Room001-00001.wav"}
                     | {"type": "reverb", "synthetic": {"rt60_s": 0.431, "drr_db": 5.12}},
                   {"type": "noise"|"music"|"babble", "snr_db": 7.25,
                    "sources": [{"file": "noise/free-sound/n1.wav", "offset": 1234, "tiled": false}, ...]}]}

    A step on silent input or a silent source segment adds nothing and says so (``"skipped": why``).
    A synthetic RIR is not stored: its noise is re-drawn from (seed, key, copy) and the parameters.
    """
    if sr != sources.sample_rate:
        raise AugmentError(
            f"{key}: audio at {sr} Hz but the augment sources were loaded at {sources.sample_rate} Hz"
        )
    kind, factor = copy_recipe(key, copy_index, cfg)
    rng = _rng(cfg.seed, key, f"copy{copy_index}")
    steps = []
    out = np.asarray(wave, dtype=np.float32)
    for part in sorted(kind.split("+"), key=KINDS.index):
        if part == "speed":
            out, step = speed_perturb(out, factor), {"type": "speed", "factor": factor}
        elif part == "reverb":
            out, step = _reverb(out, sr, cfg, rng, sources)
        else:
            out, step = _add(out, part, cfg, rng, sources)
        steps.append(step)
    description = {
        "key": copy_key(key, copy_index),
        "source": key,
        "copy": int(copy_index),
        "seed": int(cfg.seed),
        "kind": kind,
        "steps": steps,
    }
    return out, description


def description_json(description: dict[str, Any]) -> str:
    """Canonical JSON of a description (sorted keys, no spaces), as stored in shards/manifests."""
    return json.dumps(description, sort_keys=True, separators=(",", ":"))


__all__ = [
    "AugmentConfig",
    "AugmentError",
    "AugmentSources",
    "KINDS",
    "augment",
    "augment_identity",
    "copy_key",
    "copy_recipe",
    "copy_speaker",
    "description_json",
    "load_sources",
    "mix_at_snr",
    "read_source",
    "reverberate",
    "segment",
    "source_key",
    "speed_classes",
    "speed_perturb",
    "speed_speaker",
    "synthetic_rir",
]

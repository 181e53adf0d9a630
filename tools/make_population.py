#!/usr/bin/env python3
"""Synthesise a population of N distinct speakers in the LibriSpeech layout (for quality work at scale).

    python tools/make_population.py --speakers 200 --utts 20 --out /tmp/pop200 --seed 0
    python tools/make_demo_corpus.py --voice-set population --speakers 200 --out /tmp/pop200   # the same

writes (replacing any previous ``<out>/LibriSpeech``) the tree of tools/make_demo_corpus.py
(``SPEAKERS.TXT``, ``<subset>/<spk>/<chapter>/<spk>-<chapter>-<utt:04d>.flac`` + ``.trans.txt``) and
``<out>/population.json`` (every speaker's voice parameters, every chapter's channel, the command).

Every speaker is a point in a continuous voice space (docs/population.md):

- **espeak-ng speakers** (the share ``1 - --recorded-share``): one espeak-ng voice variant file per
  speaker, written into private espeak-ng data directories (links to the system's, ``--path``;
  nothing is written under /usr), on one of seven English accent bases (en, en-us, en-029, en-gb-scotland, en-gb-x-rp,
  en-gb-x-gbclan, en-gb-x-gbcwmd: each honours ``+variant``, unlike en-gb). The variant draws a sex, a
  vocal-tract scale for formants 1-8 with a per-formant jitter, per-formant height and width, pitch base
  and range, breath, flutter, roughness, voicing, consonant strength, one of espeak-ng's six voice
  sources (``klatt`` 0-5) and a speaking rate.
- **recorded pseudo-speakers**: one of the 14 recorded people of the demo corpus (flite / festival),
  warped by a sox ``pitch`` shift of 1-4.5 semitones up or down (formants and pitch together), for the
  flite voices an independent F0 mean and spread, and a speaking rate. Pseudo-speakers of one person
  are meant to be hard to tell apart, as similar voices are. Festival runs as one persistent process
  per thread (text2wave's audio, byte for byte), except for the Czech voices (a text2wave each).

Speaker ``i`` (id ``10001 + i``) depends only on (seed, id): a population of 200 is the first 200
voices of one of 1,000 with the same seed. Like LibriSpeech, ``dev-clean`` and ``test-clean`` hold
speakers that are in no other subset (``--dev-speakers`` / ``--test-speakers``, default N/10 and N/5),
so ``python -m spkr.tools.shard --protocol open`` works on it. Each speaker has ``--chapters``
chapters (sessions, default 2), and each chapter its own channel, drawn the way sessions differ:
a room (reverberation time, early reflections, source distance as a direct-to-reverberant ratio), a
noise (kind and SNR), a microphone (EQ, tilt), a band limit (telephone to wideband) and a codec round
trip through sox (none, GSM, mu-law, AMR-NB, Ogg Vorbis at low quality); each utterance then varies
a little around its chapter (speed, SNR, EQ, level). Deterministic given ``--seed``: per-utterance
random streams are keyed by (seed, speaker, chapter, utterance), so ``--jobs`` does not change a byte.

Needs: espeak-ng and sox (with GSM, AMR-NB and Vorbis), and for ``--recorded-share`` > 0 flite and
festival with the festvox voices of tools/make_demo_corpus.py (and coreutils' stdbuf). Developer tool
only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo_corpus as demo  # noqa: E402  (sentences, recorded voices, trimming, filters)

SR = demo.SR
FIRST_ID = 10001
ACCEPT_DUR = (1.2, 3.5)  # trimmed speech, seconds (re-drawn sentences until inside)
ACCEPT_CHARS = (22, 52)  # sentence length drawn first (~0.06 s a character): fewer syntheses re-drawn
MAX_DUR = 4.0
ACCENTS = ("en", "en-us", "en-029", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
RECORDED = [v for v in demo.VOICES if v.engine != "espeak"]  # 14 recorded people
# approximate F0 means (Hz) of the flite voices: the F0 target a flite pseudo-speaker scales
FLITE_F0 = {"kal16": 105.0, "awb": 110.0, "rms": 100.0, "slt": 170.0}
CODECS = ("none", "gsm", "mu-law", "amr-nb", "vorbis")
CODEC_P = (0.4, 0.15, 0.15, 0.15, 0.15)
SOX_CODEC_ARGS = {  # sox output options of the round trip (decoded back to 16 kHz)
    "gsm": ["-t", "gsm", "-r", "8000", "-c", "1"],
    "mu-law": ["-t", "wav", "-e", "mu-law", "-r", "8000", "-c", "1"],
    "amr-nb": ["-t", "amr-nb", "-r", "8000", "-c", "1", "-C", "0"],
    "vorbis": ["-t", "ogg", "-C", "-1"],
}
NOISES = ("coloured", "babble", "hum", "fan")
# festival voices whose audio from one persistent process equals text2wave's whatever came before
# (checked); the Czech voices' does not (their state carries over), so they get a text2wave each
FESTIVAL_PIPE = {
    "ked_diphone",
    "upc_ca_ona_hts",
    "lp_diphone",
    "pc_diphone",
    "suo_fi_lj_diphone",
    "hy_fi_mv_diphone",
}


# ---------------------------------------------------------------------------------------------------
# Voice space


@dataclass(frozen=True)
class Speaker:
    spk: int
    sex: str  # "M" | "F"
    engine: str  # "espeak" | "flite" | "festival"
    base: str  # espeak accent base, or the recorded voice's name
    rate: float  # speaking-rate factor (>1 faster)
    variant: str = ""  # espeak-ng variant file text
    pitch_cents: int = 0  # recorded: sox pitch shift (formants and F0)
    f0_mean: float = 0.0  # flite: int_f0_target_mean (Hz), before the sox shift; 0: the voice's own
    f0_std: float = 0.0  # flite: int_f0_target_stddev (Hz)

    @property
    def label(self) -> str:
        if self.engine == "espeak":
            return f"espeak-{self.base}+p{self.spk}"
        return f"{self.engine}-{self.base}{self.pitch_cents:+d}c"


def _espeak_variant(spk: int, sex: str, rng: np.random.Generator) -> str:
    """An espeak-ng variant file (voices/!v layout) drawn from the voice space."""
    male = sex == "M"
    scale = rng.uniform(0.86, 1.04) if male else rng.uniform(1.02, 1.20)  # vocal-tract length
    lines = ["language variant", f"name p{spk}", f"gender {'male' if male else 'female'}"]
    base = rng.uniform(70, 135) if male else rng.uniform(145, 235)
    lines.append(f"pitch {base:.0f} {base * rng.uniform(1.05, 1.9):.0f}")
    for k in range(9):
        freq = 100.0 if k == 0 else 100 * scale * (rng.normal(1.0, 0.035) if k <= 5 else 1.0)
        height = np.clip(100 * np.exp(rng.normal(0, 0.2)), 50, 180)
        width = np.clip(100 * np.exp(rng.normal(0.1 if not male else 0, 0.25)), 50, 200)
        lines.append(f"formant {k} {freq:.0f} {height:.0f} {width:.0f}")
    if rng.random() < 0.35:
        b = rng.uniform(1, 6)
        lines.append("breath " + " ".join(f"{b * w:.0f}" for w in (0, 0.6, 1, 1, 1, 1, 1, 0.8)))
    lines.append(f"flutter {int(rng.integers(0, 31))}")
    lines.append(f"roughness {int(rng.integers(0, 8))}")
    lines.append(f"voicing {int(rng.integers(60, 141))}")
    lines.append(f"consonants {int(rng.integers(60, 141))} {int(rng.integers(60, 141))}")
    klatt = 0 if rng.random() < 0.4 else int(rng.integers(1, 6))
    lines.append(f"klatt {klatt}")
    return "\n".join(lines) + "\n"


def make_speaker(seed: int, spk: int, recorded_share: float) -> Speaker:
    rng = np.random.default_rng([seed, spk, 0])
    recorded = rng.random() < recorded_share
    sex = "M" if rng.random() < 0.5 else "F"
    rate = float(np.exp(rng.normal(0, 0.1)))
    if not recorded:
        accent = ACCENTS[int(rng.integers(len(ACCENTS)))]
        return Speaker(spk, sex, "espeak", accent, rate, variant=_espeak_variant(spk, sex, rng))
    voice = RECORDED[int(rng.integers(len(RECORDED)))]
    cents = int(round(rng.choice([-1, 1]) * rng.uniform(100, 450)))
    f0_mean = f0_std = 0.0
    if voice.engine == "flite":
        f0_mean = round(FLITE_F0[voice.name] * float(rng.uniform(0.8, 1.25)), 1)
        f0_std = round(f0_mean * float(rng.uniform(0.08, 0.25)), 1)
    return Speaker(
        spk, voice.sex, voice.engine, voice.name, rate, pitch_cents=cents, f0_mean=f0_mean, f0_std=f0_std
    )


# ---------------------------------------------------------------------------------------------------
# Sessions: per-chapter channel


@dataclass(frozen=True)
class Channel:
    rt60: float  # 0: close talk, no room
    drr_db: float  # direct-to-reverberant ratio (distance)
    reflections: tuple  # (delay s, gain) early reflections
    noise: str
    snr_db: float
    noise_colour: float
    hp: float
    lp: float
    tilt: float
    peaks: tuple
    codec: str
    speed: float
    level_db: float


def make_channel(rng: np.random.Generator) -> Channel:
    roomy = rng.random() < 0.8
    band = rng.choice(["phone", "mid", "wide"], p=[0.2, 0.3, 0.5])
    lp = {"phone": rng.uniform(3000, 3600), "mid": rng.uniform(4000, 6000), "wide": rng.uniform(6500, 7800)}[
        str(band)
    ]
    return Channel(
        rt60=float(rng.uniform(0.15, 0.9)) if roomy else 0.0,
        drr_db=float(rng.uniform(-4, 14)),
        reflections=tuple(
            (float(rng.uniform(0.002, 0.03)), float(rng.uniform(0.1, 0.6)))
            for _ in range(int(rng.integers(2, 6)))
        ),
        noise=str(rng.choice(NOISES)),
        snr_db=float(rng.uniform(5, 30)),
        noise_colour=float(rng.uniform(0.0, 2.0)),
        hp=float(rng.uniform(50, 300)),
        lp=float(lp),
        tilt=float(rng.uniform(-4, 3)),
        peaks=tuple(
            (float(rng.uniform(300, 5000)), float(rng.uniform(-9, 9)), float(rng.uniform(0.3, 1.0)))
            for _ in range(int(rng.integers(1, 4)))
        ),
        codec=str(rng.choice(CODECS, p=CODEC_P)),
        speed=float(rng.uniform(0.97, 1.03)),
        level_db=float(rng.uniform(-38, -24)),
    )


def _room_ir(ch: Channel, rng: np.random.Generator) -> np.ndarray:
    """Direct path, early reflections and an exponentially decaying tail (highs decay faster), scaled to
    the channel's direct-to-reverberant ratio."""
    n = int(ch.rt60 * SR)
    t = np.arange(n) / SR
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / ch.rt60)
    tail = demo.fft_filter(tail, lambda f: 1.0 / np.sqrt(1.0 + (f / 2500.0) ** 2))
    tail[: int(0.005 * SR)] = 0.0
    for delay, gain in ch.reflections:
        tail[int(delay * SR)] += gain * (1 if rng.random() < 0.5 else -1)
    tail *= 10 ** (-ch.drr_db / 20) / (np.linalg.norm(tail) + 1e-12)
    tail[0] = 1.0
    return tail


def _noise(ch: Channel, n: int, rng: np.random.Generator) -> np.ndarray:
    if ch.noise == "coloured":
        return demo.fft_filter(
            rng.standard_normal(n), lambda f: np.maximum(f, 20.0) ** (-ch.noise_colour / 2)
        )
    if ch.noise == "babble":  # speech-shaped noise under a slow syllabic envelope
        x = demo.fft_filter(rng.standard_normal(n), lambda f: 1.0 / (1.0 + (f / 700.0) ** 2))
        env = demo.fft_filter(rng.standard_normal(n), lambda f: (f < 5.0).astype(float))
        return x * (1.0 + 2.0 * np.abs(env) / (np.std(env) + 1e-12))
    t = np.arange(n) / SR
    if ch.noise == "hum":  # mains hum with harmonics, plus a little hiss
        f0 = 50.0 if ch.noise_colour < 1.0 else 60.0
        x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 8))
        return x + 0.05 * rng.standard_normal(n)
    # fan: brown noise plus a blade tone
    x = demo.fft_filter(rng.standard_normal(n), lambda f: np.maximum(f, 20.0) ** -1.0)
    return x / (np.std(x) + 1e-12) + 0.5 * np.sin(2 * np.pi * (90 + 80 * ch.noise_colour) * t)


def codec_round_trip(x: np.ndarray, codec: str, workdir: Path, tag: str) -> np.ndarray:
    """Encode with sox to ``codec`` and decode back to 16 kHz float (peak-safe scaled in and out)."""
    if codec == "none":
        return x
    scale = 0.9 / (np.max(np.abs(x)) + 1e-12)
    src, enc, dec = (workdir / f"{tag}.{s}" for s in ("in.wav", "enc", "dec.wav"))
    sf.write(src, (x * scale).astype(np.float32), SR, subtype="FLOAT")
    demo._run(["sox", "-D", "-R", str(src), *SOX_CODEC_ARGS[codec], str(enc)])
    kind = SOX_CODEC_ARGS[codec][1]
    demo._run(
        ["sox", "-t", kind, str(enc), "-e", "floating-point", "-b", "32", str(dec), "rate", "-h", str(SR)]
    )
    y, sr = sf.read(dec, dtype="float64")
    for p in (src, enc, dec):
        p.unlink(missing_ok=True)
    if sr != SR:
        raise RuntimeError(f"codec {codec}: decoded at {sr} Hz, expected {SR}")
    y = y[: len(x)] if len(y) >= len(x) else np.pad(y, (0, len(x) - len(y)))
    return y / scale


def apply_channel(
    x: np.ndarray, ch: Channel, rng: np.random.Generator, workdir: Path, tag: str
) -> np.ndarray:
    """Speed, room, noise, microphone and band limit, codec, gain: around the chapter's channel."""
    speed = ch.speed * float(rng.uniform(0.98, 1.02))
    if speed > 1.0:
        x = demo.fft_filter(x, lambda f: 1.0 / np.sqrt(1.0 + (f / (0.45 * SR / speed)) ** 16))
    x = np.interp(np.arange(int(round(len(x) / speed))) * speed, np.arange(len(x)), x)
    if ch.rt60 > 0:
        x = demo.fft_convolve(x, _room_ir(ch, rng))
    noise = _noise(ch, len(x), rng)
    snr = ch.snr_db + float(rng.uniform(-3, 3))
    x = x + noise * demo.rms(x) / demo.rms(noise) * 10 ** (-snr / 20)
    hp = ch.hp * float(rng.uniform(0.85, 1.15))
    lp = min(ch.lp * float(rng.uniform(0.95, 1.05)), 7800.0)
    tilt = ch.tilt + float(rng.uniform(-1, 1))
    peaks = list(ch.peaks) + [(float(rng.uniform(300, 5000)), float(rng.uniform(-3, 3)), 0.5)]
    x = demo.fft_filter(x, lambda f: demo._response(f, hp, lp, tilt, peaks))
    x = codec_round_trip(x, ch.codec, workdir, tag)
    x = x * (10 ** ((ch.level_db + float(rng.uniform(-3, 3))) / 20) / demo.rms(x))
    peak = np.max(np.abs(x))
    return x * (0.97 / peak) if peak > 0.97 else x


# ---------------------------------------------------------------------------------------------------
# Plan and render


@dataclass
class Job:
    speaker: Speaker
    subset: str
    chapter: int
    utt: int
    channel: Channel
    key: str


def plan(
    n_speakers: int,
    utts: int,
    seed: int,
    n_dev: int,
    n_test: int,
    *,
    chapters: int = 2,
    recorded_share: float = 0.2,
) -> tuple[list[Job], dict]:
    """Speakers ``FIRST_ID ..``; a seeded permutation puts ``n_dev`` in dev-clean, ``n_test`` in
    test-clean, the rest in train-clean-100; ``chapters`` chapters per speaker (ids ``10*spk + k``),
    utterances split over them as evenly as possible."""
    if n_dev < 1 or n_test < 1 or n_dev + n_test >= n_speakers:
        raise ValueError(
            f"need 1 <= dev, 1 <= test and dev + test < speakers, got {n_dev}, {n_test}, {n_speakers}"
        )
    if not 1 <= chapters <= utts:
        raise ValueError(f"chapters must be in 1..utts ({utts}), got {chapters}")
    if not 0.0 <= recorded_share <= 1.0:
        raise ValueError(f"recorded_share must be in [0, 1], got {recorded_share}")
    order = [int(i) for i in np.random.default_rng([seed, 26]).permutation(n_speakers)]
    subset_of = {i: "train-clean-100" for i in range(n_speakers)}
    for j, i in enumerate(order[: n_dev + n_test]):
        subset_of[i] = "dev-clean" if j < n_dev else "test-clean"
    jobs: list[Job] = []
    speakers: dict = {}
    for i in range(n_speakers):
        spk = FIRST_ID + i
        sp = make_speaker(seed, spk, recorded_share)
        chs = [10 * spk + k for k in range(1, chapters + 1)]
        speakers[spk] = {"voice": sp, "subset": subset_of[i], "chapters": chs, "channels": {}}
        for k, c in enumerate(chs):
            channel = make_channel(np.random.default_rng([seed, spk, c]))
            speakers[spk]["channels"][c] = channel
            for u in range(utts // chapters + (k < utts % chapters)):
                jobs.append(Job(sp, subset_of[i], c, u, channel, f"{spk}-{c}-{u:04d}"))
    return jobs, speakers


def synthesise(
    sp: Speaker, text: str, stretch: float, workdir: Path, tag: str, espeak_root: Path
) -> np.ndarray:
    """TTS ``text`` in speaker ``sp``'s voice; float64 mono at 16 kHz, untrimmed."""
    raw = workdir / f"{tag}.raw.wav"
    stretch = stretch / sp.rate
    if sp.engine == "espeak":
        wpm = str(int(round(165 / stretch)))
        demo._run(
            [
                "espeak-ng",
                "--path",
                str(espeak_path(espeak_root, sp.spk)),
                "-v",
                f"{sp.base}+p{sp.spk}",
                "-s",
                wpm,
                "-w",
                str(raw),
                text,
            ]
        )
        x, sr = sf.read(raw, dtype="float64")
        raw.unlink()
        if x.ndim > 1:
            x = x.mean(axis=1)
        g = np.gcd(SR, sr)
        return resample_poly(x, SR // g, sr // g)
    if sp.engine == "flite":
        f0 = ["--setf", f"int_f0_target_mean={sp.f0_mean}", "--setf", f"int_f0_target_stddev={sp.f0_std}"]
        cmd = ["flite", "-voice", sp.base, "--setf", f"duration_stretch={stretch:.3f}", *f0, "-t", text]
        demo._run([*cmd, "-o", str(raw)])
    elif sp.base in FESTIVAL_PIPE:
        festival_wave(sp.base, text, stretch, raw)
    else:
        txt = workdir / f"{tag}.txt"
        txt.write_text(text + "\n")
        ev = f"(begin (voice_{sp.base}) (Parameter.set 'Duration_Stretch {stretch:.3f}))"
        demo._run(["text2wave", "-eval", ev, str(txt), "-o", str(raw)])
        txt.unlink()
    out = workdir / f"{tag}.wav"
    cmd = ["sox", str(raw), "-e", "floating-point", "-b", "32", str(out), "remix", "-"]
    demo._run([*cmd, "pitch", str(sp.pitch_cents), "rate", "-h", str(SR)])
    x, _ = sf.read(out, dtype="float64")
    for p in (raw, out):
        p.unlink(missing_ok=True)
    return x


_FESTIVAL = threading.local()
_FESTIVALS: list[subprocess.Popen] = []


def festival_wave(voice: str, text: str, stretch: float, path: Path) -> None:
    """Festival voice ``voice`` saying ``text`` into the RIFF file ``path``, through one persistent
    ``festival --pipe`` per thread, its stdout line-buffered by ``stdbuf`` (a fresh text2wave costs ~0.3 s of start-up an utterance; the audio
    is text2wave's, byte for byte: the voice and the stretch are set again before every utterance)."""
    proc = getattr(_FESTIVAL, "proc", None)
    if proc is None or proc.poll() is not None:
        proc = subprocess.Popen(
            ["stdbuf", "-oL", "festival", "--pipe"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        _FESTIVAL.proc = proc
        _FESTIVALS.append(proc)
    path.unlink(missing_ok=True)
    proc.stdin.write(
        f"(voice_{voice}) (Parameter.set 'Duration_Stretch {stretch:.3f}) "
        f'(utt.save.wave (utt.synth (eval (list \'Utterance \'Text "{text}"))) "{path}" \'riff) '
        '(print "spkr-done")\n'
    )
    proc.stdin.flush()
    for line in proc.stdout:
        if "spkr-done" in line:
            break
    if not path.is_file():
        raise RuntimeError(f"festival voice_{voice} wrote no audio for {text!r}")


def close_festivals() -> None:
    while _FESTIVALS:
        proc = _FESTIVALS.pop()
        proc.stdin.close()
        proc.wait()


def render(
    job: Job, seed: int, workdir: Path, espeak_root: Path, channel: bool = True
) -> tuple[str, np.ndarray, str]:
    """One utterance: sentence and rate from stream (seed, spk, chapter, utt, 1), channel from (..., 2).
    ``channel=False`` returns the clean trimmed speech (for checks of the voices alone)."""
    sp = job.speaker
    rng = np.random.default_rng([seed, sp.spk, job.chapter, job.utt, 1])
    last = None
    for _attempt in range(12):
        text = demo.make_sentence(rng)
        while not ACCEPT_CHARS[0] <= len(text) <= ACCEPT_CHARS[1]:
            text = demo.make_sentence(rng)
        stretch = float(rng.uniform(0.85, 1.15))
        x = demo.trim_silence(synthesise(sp, text, stretch, workdir, job.key, espeak_root))
        last = (text, x)
        if ACCEPT_DUR[0] <= len(x) / SR <= ACCEPT_DUR[1]:
            break
    text, x = last
    if channel:
        x = apply_channel(
            x, job.channel, np.random.default_rng([seed, sp.spk, job.chapter, job.utt, 2]), workdir, job.key
        )
    else:
        x = x * (10 ** (-30 / 20) / demo.rms(x))
    x = x[: int(MAX_DUR * SR)]
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
    return job.key, pcm, text.upper()


ESPEAK_GROUP = 100  # variant files per private data directory


def espeak_data_dir(root: Path, speakers: list[Speaker]) -> Path:
    """Private espeak-ng data directories under ``root``, one per ``ESPEAK_GROUP`` speaker ids: links to
    the system's files, its language voices, and a ``voices/!v`` holding only those speakers' variant
    files (espeak-ng 1.51 lists at most 349 voices and then fails to find the base voice, so neither
    the system's own variants nor the mbrola voices are linked). Returns ``root``; a speaker's
    ``--path`` is :func:`espeak_path`."""
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    system = Path(out.split("Data at:")[-1].strip()) if "Data at:" in out else None
    if system is None or not system.is_dir():
        raise SystemExit(f"make_population: cannot find espeak-ng's data directory in {out.strip()!r}")
    for sp in speakers:
        if sp.engine != "espeak":
            continue
        data = espeak_path(root, sp.spk) / "espeak-ng-data"
        if not data.is_dir():
            (data / "voices" / "!v").mkdir(parents=True)
            for entry in system.iterdir():
                if entry.name != "voices":
                    (data / entry.name).symlink_to(entry)
        (data / "voices" / "!v" / f"p{sp.spk}").write_text(sp.variant)
    return root


def espeak_path(root: Path, spk: int) -> Path:
    return root / f"g{(spk - FIRST_ID) // ESPEAK_GROUP}"


def check_tools(speakers: list[Speaker]) -> None:
    """SystemExit naming what is missing: espeak-ng and sox always; flite/festival for recorded voices."""
    need = ["espeak-ng", "sox"]
    if not shutil.which("espeak-ng") or not shutil.which("sox"):
        missing = [b for b in need if not shutil.which(b)]
        raise SystemExit(f"make_population: missing {', '.join(missing)}; install with: {demo.APT_HINT}")
    used = {sp.base for sp in speakers if sp.engine != "espeak"}
    demo.check_tools([v for v in RECORDED if v.name in used])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", required=True, help="output root; writes <out>/LibriSpeech and <out>/population.json"
    )
    ap.add_argument("--speakers", type=int, required=True, help="number of speakers (>= 3)")
    ap.add_argument("--utts", type=int, default=20, help="utterances per speaker (default 20)")
    ap.add_argument("--chapters", type=int, default=2, help="chapters (sessions) per speaker (default 2)")
    ap.add_argument(
        "--dev-speakers", type=int, default=None, help="speakers only in dev-clean (default N/10)"
    )
    ap.add_argument(
        "--test-speakers", type=int, default=None, help="speakers only in test-clean (default N/5)"
    )
    ap.add_argument(
        "--recorded-share",
        type=float,
        default=0.2,
        help="expected share of recorded pseudo-speakers (flite/festival, warped); the rest espeak-ng (default 0.2)",
    )
    ap.add_argument(
        "--clean",
        action="store_true",
        help="no channel (clean speech at -30 dB RMS; same voices and sentences): the voices' own difficulty",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel synthesis threads")
    args = ap.parse_args(argv)
    if args.speakers < 3:
        ap.error("--speakers must be >= 3")
    if args.utts < 2:
        ap.error("--utts must be >= 2")
    n_dev = args.dev_speakers if args.dev_speakers is not None else max(1, args.speakers // 10)
    n_test = args.test_speakers if args.test_speakers is not None else max(1, args.speakers // 5)
    try:
        jobs, speakers = plan(
            args.speakers,
            args.utts,
            args.seed,
            n_dev,
            n_test,
            chapters=args.chapters,
            recorded_share=args.recorded_share,
        )
    except ValueError as e:
        ap.error(str(e))
    voices = [s["voice"] for s in speakers.values()]
    check_tools(voices)
    out = Path(args.out)
    t0, c0 = time.time(), _cpu_seconds()
    final, seconds = demo.write_tree(
        out,
        rendered(jobs, args.seed, voices, channel=not args.clean, workers=args.jobs),
        lambda path, secs: write_speakers_txt(path, speakers, secs),
    )
    meta = {
        "command": ["python", "tools/make_population.py", *(sys.argv[1:] if argv is None else argv)],
        "seed": args.seed,
        "channel": not args.clean,
        "speakers": {
            str(spk): {
                "subset": s["subset"],
                "voice": asdict(s["voice"]),
                "label": s["voice"].label,
                "channels": {str(c): asdict(ch) for c, ch in s["channels"].items()},
            }
            for spk, s in speakers.items()
        },
    }
    (out / "population.json").write_text(json.dumps(meta, indent=1) + "\n")
    wall, cpu = time.time() - t0, _cpu_seconds() - c0
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    kinds = {e: sum(v.engine == e for v in voices) for e in ("espeak", "flite", "festival")}
    print(f"wrote {final} in {wall:.0f} s wall, {cpu:.0f} s CPU (this process and its children)")
    for subset in ("train-clean-100", "dev-clean", "test-clean"):
        n_spk = sum(s["subset"] == subset for s in speakers.values())
        print(f"  {subset:<16} {n_spk:5d} speakers {sum(j.subset == subset for j in jobs):7d} utterances")
    print(
        f"  total: {len(speakers)} speakers ({kinds}), {len(jobs)} utterances, "
        f"{sum(seconds.values()) / 3600:.2f} h, {size / 1e6:.1f} MB"
    )
    return 0


def rendered(jobs: list, seed: int, voices: list, channel: bool, workers: int):
    """(subset, speaker, chapter, key, pcm, text) of each job, in order, rendered ``workers`` at a time
    (not all held in memory); espeak-ng's private data directory and the festival servers live as long as
    the iteration."""
    with tempfile.TemporaryDirectory() as tmp:
        espeak_root = espeak_data_dir(Path(tmp) / "espeak", voices)
        work = Path(tmp) / "work"
        work.mkdir()
        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                done = pool.map(lambda j: render(j, seed, work, espeak_root, channel), jobs)
                for job, (key, pcm, text) in zip(jobs, done):
                    yield job.subset, job.speaker.spk, job.chapter, key, pcm, text
        finally:
            close_festivals()


def write_speakers_txt(path: Path, speakers: dict, seconds: dict[int, float]) -> None:
    rows = [
        "; spkr synthetic speaker population in the LibriSpeech layout (tools/make_population.py)",
        "; NAME is the engine and voice: espeak-<accent>+p<id> (a variant file, see ../population.json)",
        ";ID   |SEX| SUBSET           |MINUTES| NAME",
    ]
    for spk, s in speakers.items():
        v = s["voice"]
        rows.append(f"{spk:<6}| {v.sex} | {s['subset']:<16} | {seconds[spk] / 60:5.2f} | {v.label}")
    path.write_text("\n".join(rows) + "\n")


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


if __name__ == "__main__":
    sys.exit(main())

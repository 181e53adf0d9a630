#!/usr/bin/env python3
"""Synthesise spkr's bundled demo corpus: a small multi-speaker corpus in the LibriSpeech layout.

    python tools/make_demo_corpus.py --out data/demo --speakers 16 --utts 40 --seed 0   # the bundled one
    python tools/make_demo_corpus.py --out /tmp/other --voice-set other --speakers 36 --min-chapters 2

writes (replacing any previous ``<out>/LibriSpeech``)::

    <out>/LibriSpeech/SPEAKERS.TXT
    <out>/LibriSpeech/<subset>/<spk>/<chapter>/<spk>-<chapter>-<utt:04d>.flac   16 kHz mono 16-bit
    <out>/LibriSpeech/<subset>/<spk>/<chapter>/<spk>-<chapter>.trans.txt

Every speaker is one Debian text-to-speech voice (flite, festival/festvox, espeak-ng), most distinct
voices first. Like LibriSpeech, most speakers are in ``train-clean-100`` and a few *other* speakers only
in ``dev-clean`` / ``test-clean``. Sentences come from seeded templates. Each chapter is a "session"
with its own microphone colouring; each utterance then gets its own speaking rate, small speed
perturbation, optional reverb, noise at a random SNR, band-limiting/EQ and gain, so that speakers are
not trivially separable by channel. Everything is deterministic given ``--seed``; per-utterance random
streams are keyed by (seed, speaker, chapter, utterance) so the result does not depend on ``--jobs``.

``--voice-set other`` makes a corpus the same way from 36 *other* voices (none in the default set;
``OTHER_VOICES``): the 14 recorded people each once, turned into another speaker by a sox pitch and
formant shift of 2.5-3.5 semitones up or down, plus 22 espeak-ng variants the default set does not
use, on the en / en-us / en-029 / en-gb-scotland accent bases; speaker ids 2001+ (so sentences and
sessions differ too); dev/test speakers drawn from both kinds of voices in proportion. Same channel
simulation (per chapter and per utterance) as the bundled corpus. ``--voice-set population`` hands
the other arguments to tools/make_population.py (N speakers from a continuous voice space, per-chapter
rooms, noises and codecs). ``--min-chapters 2`` gives every
speaker two chapters (sessions; the default draws 1 or 2, and the bundled demo has 8 of 16 speakers
with one), so protocol ``closed-session`` can hold out a session of every speaker; speakers that drew
two chapters anyway keep them unchanged.

Needs: espeak-ng, flite, festival (text2wave) with the festvox voices, sox. Developer tool only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from spkr import atomic

SR = 16000
MAX_DUR = 4.0  # hard cap (seconds) on an utterance
# sentences are re-drawn until the trimmed speech lasts this long (before speed perturbation); short
# utterances keep the committed corpus under ~10 MB (FLAC of noisy speech costs ~15 kB/s)
ACCEPT_DUR = (1.05, 2.6)
FESTIVAL_VOICE_DIR = Path("/usr/share/festival/voices")
APT_HINT = (
    "apt-get install -y --no-install-recommends espeak-ng flite sox libsox-fmt-base festival "
    "festvox-kdlpc16k festvox-italp16k festvox-itapc16k festvox-suopuhe-lj festvox-suopuhe-mv "
    "festvox-ca-ona-hts festvox-czech-dita festvox-czech-krb festvox-czech-machac festvox-czech-ph"
)


@dataclass(frozen=True)
class Voice:
    engine: str  # "flite" | "festival" | "espeak"
    name: str  # flite voice, festival voice (voice_<name>), or espeak-ng voice spec
    sex: str  # "M" | "F"
    package: str  # Debian package providing it
    pitch_cents: int = 0  # sox "pitch" shift after synthesis (pitch and formants, same tempo); 0: none

    @property
    def label(self) -> str:
        shift = f"{self.pitch_cents:+d}c" if self.pitch_cents else ""
        return f"{self.engine}-{self.name}{shift}"


# Most distinct first: recordings of different people, then espeak-ng formant variants (one engine;
# checked to differ in pitch/formants -- never use "en-gb+X", espeak-ng 1.51 ignores the variant there).
VOICES: list[Voice] = [
    Voice("flite", "kal16", "M", "flite"),
    Voice("flite", "awb", "M", "flite"),
    Voice("flite", "rms", "M", "flite"),
    Voice("flite", "slt", "F", "flite"),
    Voice("festival", "ked_diphone", "M", "festvox-kdlpc16k"),
    Voice("festival", "upc_ca_ona_hts", "F", "festvox-ca-ona-hts"),
    Voice("festival", "lp_diphone", "F", "festvox-italp16k"),
    Voice("festival", "pc_diphone", "M", "festvox-itapc16k"),
    Voice("festival", "suo_fi_lj_diphone", "F", "festvox-suopuhe-lj"),
    Voice("festival", "hy_fi_mv_diphone", "M", "festvox-suopuhe-mv"),
    Voice("festival", "czech_dita", "F", "festvox-czech-dita"),
    Voice("festival", "czech_krb", "F", "festvox-czech-krb"),
    Voice("festival", "czech_machac", "M", "festvox-czech-machac"),
    Voice("festival", "czech_ph", "M", "festvox-czech-ph"),
    Voice("espeak", "en+m3", "M", "espeak-ng"),
    Voice("espeak", "en+f3", "F", "espeak-ng"),
    Voice("espeak", "en+m1", "M", "espeak-ng"),
    Voice("espeak", "en+f1", "F", "espeak-ng"),
    Voice("espeak", "en+m7", "M", "espeak-ng"),
    Voice("espeak", "en+f5", "F", "espeak-ng"),
    Voice("espeak", "en+m4", "M", "espeak-ng"),
    Voice("espeak", "en+f2", "F", "espeak-ng"),
    Voice("espeak", "en-us+klatt3", "M", "espeak-ng"),
    Voice("espeak", "en+m5", "M", "espeak-ng"),
]

# ``--voice-set other``: 36 speakers none of which is in VOICES, for measuring on a corpus nothing was
# tuned on. The 14 recorded people once each, made into other speakers by one sox pitch+formant shift
# (each person once: a shifted copy beside its original would be easily confused with it), then
# espeak-ng variants VOICES does not use, on four accent bases (en, en-us, en-029, en-gb-scotland: each
# honours "+variant", unlike en-gb). Checked on clean sentences (mean/std-MFCC nearest centroid over
# both sets): en-us+john ~ en-us+Alex, en+aunty ~ en+f4/en+linda and en-us+steph ~ *+steph2 were too
# close, so none of those pairs is here.
OTHER_VOICES: list[Voice] = [
    Voice("flite", "kal16", "M", "flite", +300),
    Voice("flite", "awb", "M", "flite", -250),
    Voice("flite", "rms", "M", "flite", +350),
    Voice("flite", "slt", "F", "flite", -300),
    Voice("festival", "ked_diphone", "M", "festvox-kdlpc16k", -300),
    Voice("festival", "upc_ca_ona_hts", "F", "festvox-ca-ona-hts", +250),
    Voice("festival", "lp_diphone", "F", "festvox-italp16k", -250),
    Voice("festival", "pc_diphone", "M", "festvox-itapc16k", +300),
    Voice("festival", "suo_fi_lj_diphone", "F", "festvox-suopuhe-lj", +300),
    Voice("festival", "hy_fi_mv_diphone", "M", "festvox-suopuhe-mv", -300),
    Voice("festival", "czech_dita", "F", "festvox-czech-dita", -300),
    Voice("festival", "czech_krb", "F", "festvox-czech-krb", +300),
    Voice("festival", "czech_machac", "M", "festvox-czech-machac", +250),
    Voice("festival", "czech_ph", "M", "festvox-czech-ph", -250),
    Voice("espeak", "en+m2", "M", "espeak-ng"),
    Voice("espeak", "en+f4", "F", "espeak-ng"),
    Voice("espeak", "en-us+Annie", "F", "espeak-ng"),
    Voice("espeak", "en+m6", "M", "espeak-ng"),
    Voice("espeak", "en-029+belinda", "F", "espeak-ng"),
    Voice("espeak", "en-us+Alex", "M", "espeak-ng"),
    Voice("espeak", "en+linda", "F", "espeak-ng"),
    Voice("espeak", "en-gb-scotland+gustave", "M", "espeak-ng"),
    Voice("espeak", "en-us+steph", "F", "espeak-ng"),
    Voice("espeak", "en+Andy", "M", "espeak-ng"),
    Voice("espeak", "en-gb-scotland+Alicia", "F", "espeak-ng"),
    Voice("espeak", "en-029+david", "M", "espeak-ng"),
    Voice("espeak", "en+Storm", "M", "espeak-ng"),
    Voice("espeak", "en+iven", "M", "espeak-ng"),
    Voice("espeak", "en+Andrea", "F", "espeak-ng"),
    Voice("espeak", "en-029+boris", "M", "espeak-ng"),
    Voice("espeak", "en+anika", "F", "espeak-ng"),
    Voice("espeak", "en+michel", "M", "espeak-ng"),
    Voice("espeak", "en-029+quincy", "M", "espeak-ng"),
    Voice("espeak", "en+zac", "M", "espeak-ng"),
    Voice("espeak", "en-us+Lee", "M", "espeak-ng"),
    Voice("espeak", "en+paul", "M", "espeak-ng"),
]


@dataclass(frozen=True)
class VoiceSet:
    """The voices of ``--voice-set``, the first speaker id (the sets' ids differ, so their corpora never
    mix up, and, per-speaker random streams being keyed by the id, their sentences and sessions differ),
    and how dev/test speakers are drawn: ``recorded_first`` among the recorded (non-espeak) voices
    first (the bundled corpus), else recorded and espeak voices in proportion (so that neither the
    training nor the held-out speakers are mostly of one engine)."""

    voices: list[Voice]
    first_id: int
    recorded_first: bool


VOICE_SETS: dict[str, VoiceSet] = {
    "default": VoiceSet(VOICES, 1001, recorded_first=True),
    "other": VoiceSet(OTHER_VOICES, 2001, recorded_first=False),
}

# ---------------------------------------------------------------------------------------------------
# Sentences: seeded templates over small word lists (plain ASCII letters only: the Czech/Finnish/Italian
# festival front ends must not meet digits or punctuation they would spell out differently).

NAMES = "anna peter maria john clara thomas helen robert alice david laura martin sarah george emma".split()
ADJ = (
    "old small bright quiet heavy green narrow warm empty golden broken distant gentle cold "
    "yellow strange simple careful wooden silent busy clever tired happy"
).split()
NOUNS = (
    "garden window river letter basket mountain kitchen teacher village doctor bridge candle "
    "market engine forest wagon island picture station horse pocket ladder harbour mirror "
    "blanket bottle hammer farmer castle chapel meadow sailor lantern orchard"
).split()
PLACES = "the station|the market|the harbour|the old mill|the village|the forest|the church|the school".split(
    "|"
)
VERBS_PAST = (
    "carried found painted opened watched followed cleaned repaired borrowed noticed visited "
    "dropped carried pushed lifted counted"
).split()
VERBS = "carry find paint open watch follow clean repair borrow visit lift count bring sell".split()
TIMES = "in the morning|after dinner|last winter|every evening|on sunday|before the rain|at noon".split("|")
ADV = "slowly quietly quickly carefully softly gladly suddenly".split()
PREP = "near|behind|under|beside|across|inside".split("|")

TEMPLATES = [
    "{name} {vpast} the {adj} {noun}",
    "the {adj} {noun} stood {prep} the {noun2}",
    "{name} {vpast} a {noun} {time}",
    "we will {verb} the {adj} {noun} {time}",
    "did you see the {noun} {prep} {place}",
    "{name} walked {adv} to {place} {time}",
    "the {noun} was {adj} and the {noun2} was {adj2}",
    "please {verb} the {noun} before {name} comes home",
    "{name} and {name2} {vpast} the {noun} {prep} {place}",
    "nobody knew why the {noun} was so {adj}",
    "my {noun}",
    "the {adj} {noun}",
    "{name} smiled {adv}",
    "a {adj} {noun} for {name}",
    "{time} the {noun} looked {adj}",
    "they {vpast} the {adj} {noun} and the {adj2} {noun2} {prep} {place}",
    "she told {name} that the {noun} was {adj} {time}",
    "where is the {adj} {noun}",
    "{name} {vpast} it",
    "not the {noun}",
    "the {noun} {prep} {place}",
    "{adv} {name} {vpast} the {noun}",
    "is this your {noun}",
    "{name} was {adj}",
    "bring the {noun} {time}",
    "the {noun} is {adj}",
]


def make_sentence(rng: np.random.Generator) -> str:
    def pick(words: list[str]) -> str:
        return words[int(rng.integers(len(words)))]

    template = pick(TEMPLATES)
    name = pick(NAMES)
    noun = pick(NOUNS)
    adj = pick(ADJ)
    fields = {
        "name": name,
        "name2": pick([n for n in NAMES if n != name]),
        "adj": adj,
        "adj2": pick([a for a in ADJ if a != adj]),
        "noun": noun,
        "noun2": pick([n for n in NOUNS if n != noun]),
        "place": pick(PLACES),
        "vpast": pick(VERBS_PAST),
        "verb": pick(VERBS),
        "time": pick(TIMES),
        "adv": pick(ADV),
        "prep": pick(PREP),
    }
    return template.format(**fields)


# ---------------------------------------------------------------------------------------------------
# Synthesis


def check_tools(voices: list[Voice]) -> None:
    """Raise SystemExit naming what is missing (binaries or festival voices)."""
    need = {"sox"}
    for v in voices:
        need.add({"flite": "flite", "festival": "text2wave", "espeak": "espeak-ng"}[v.engine])
    missing = sorted(b for b in need if shutil.which(b) is None)
    problems = [f"program {b!r} not found on PATH" for b in missing]
    if shutil.which("flite"):
        listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout.split()
        for v in voices:
            if v.engine == "flite" and v.name not in listed:
                problems.append(f"flite voice {v.name!r} not available (flite -lv)")
    for v in voices:
        if v.engine == "festival" and not list(FESTIVAL_VOICE_DIR.glob(f"*/{v.name}")):
            problems.append(f"festival voice {v.name!r} not found under {FESTIVAL_VOICE_DIR} ({v.package})")
    if problems:
        raise SystemExit(
            "make_demo_corpus: missing speech synthesis tools:\n  - "
            + "\n  - ".join(problems)
            + f"\nOn Debian/Ubuntu install them with:\n  {APT_HINT}"
        )


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}")


def synthesise(voice: Voice, text: str, stretch: float, workdir: Path, tag: str) -> np.ndarray:
    """TTS ``text`` with ``voice`` at duration stretch ``stretch``; returns float64 mono at 16 kHz."""
    raw = workdir / f"{tag}.raw.wav"
    out = workdir / f"{tag}.wav"
    if voice.engine == "flite":
        _run(
            [
                "flite",
                "-voice",
                voice.name,
                "--setf",
                f"duration_stretch={stretch:.3f}",
                "-t",
                text,
                "-o",
                str(raw),
            ]
        )
    elif voice.engine == "festival":
        txt = workdir / f"{tag}.txt"
        txt.write_text(text + "\n")
        ev = f"(begin (voice_{voice.name}) (Parameter.set 'Duration_Stretch {stretch:.3f}))"
        _run(["text2wave", "-eval", ev, str(txt), "-o", str(raw)])
    else:
        wpm = int(round(165 / stretch))
        _run(["espeak-ng", "-v", voice.name, "-s", str(wpm), "-w", str(raw), text])
    # Resample to 16 kHz mono float with sox (high quality), independent of the engine's rate.
    shift = ["pitch", str(voice.pitch_cents)] if voice.pitch_cents else []
    _run(
        [
            "sox",
            str(raw),
            "-e",
            "floating-point",
            "-b",
            "32",
            str(out),
            "remix",
            "-",
            *shift,
            "rate",
            "-h",
            str(SR),
        ]
    )
    x, sr = sf.read(out, dtype="float64")
    assert sr == SR
    for p in (raw, out, workdir / f"{tag}.txt"):
        p.unlink(missing_ok=True)
    return x


def trim_silence(x: np.ndarray, top_db: float = 40.0, pad: float = 0.08, max_gap: float = 0.3) -> np.ndarray:
    """Energy trim: drop leading/trailing silence (keep ``pad`` s) and shorten inner pauses to ``max_gap`` s."""
    hop = int(0.01 * SR)
    n = len(x) // hop
    if n == 0:
        return x
    e = 10 * np.log10(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-12)
    active = e > e.max() - top_db
    if not active.any():
        return x
    idx = np.flatnonzero(active)
    p = int(pad / 0.01)
    keep = np.zeros(n, dtype=bool)
    keep[max(0, idx[0] - p) : min(n, idx[-1] + p + 1)] = True
    # inner pauses longer than max_gap: keep only max_gap of them (half each side)
    g = int(max_gap / 0.01)
    run_start = None
    for i in range(idx[0], idx[-1] + 1):
        if not active[i] and run_start is None:
            run_start = i
        elif active[i] and run_start is not None:
            if i - run_start > g:
                keep[run_start + g // 2 : i - g // 2] = False
            run_start = None
    frames = np.repeat(keep, hop)
    return x[: n * hop][frames]


# ---------------------------------------------------------------------------------------------------
# Channel simulation (numpy, zero-phase FFT filters)


def _response(freqs: np.ndarray, hp: float, lp: float, tilt_db_oct: float, peaks: list[tuple]) -> np.ndarray:
    """Magnitude response: Butterworth-like high/low pass, spectral tilt around 1 kHz, Gaussian peaks."""
    f = np.maximum(freqs, 1.0)
    h = 1.0 / np.sqrt(1.0 + (hp / f) ** 4)  # 2nd order high-pass
    h *= 1.0 / np.sqrt(1.0 + (f / lp) ** 8)  # 4th order low-pass
    db = tilt_db_oct * np.log2(f / 1000.0)
    for fc, gain_db, oct_bw in peaks:
        db += gain_db * np.exp(-0.5 * (np.log2(f / fc) / oct_bw) ** 2)
    return h * 10 ** (db / 20)


def fft_filter(x: np.ndarray, h_of_f) -> np.ndarray:
    n = 1 << int(np.ceil(np.log2(len(x) + 1)))
    spec = np.fft.rfft(x, n)
    spec *= h_of_f(np.fft.rfftfreq(n, 1 / SR))
    return np.fft.irfft(spec, n)[: len(x)]


def fft_convolve(x: np.ndarray, ir: np.ndarray) -> np.ndarray:
    n = 1 << int(np.ceil(np.log2(len(x) + len(ir))))
    return np.fft.irfft(np.fft.rfft(x, n) * np.fft.rfft(ir, n), n)[: len(x)]


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2) + 1e-20))


@dataclass(frozen=True)
class Session:
    """Chapter-level recording conditions (the "microphone and room" of one chapter)."""

    hp: float
    lp: float
    tilt: float
    peaks: tuple
    speed: float
    level_db: float


def make_session(rng: np.random.Generator) -> Session:
    peaks = tuple(
        (float(rng.uniform(300, 5000)), float(rng.uniform(-8, 8)), float(rng.uniform(0.3, 1.0)))
        for _ in range(int(rng.integers(1, 3)))
    )
    return Session(
        hp=float(rng.uniform(60, 250)),
        lp=float(rng.uniform(3400, 7200)),
        tilt=float(rng.uniform(-3, 2)),
        peaks=peaks,
        speed=float(rng.uniform(0.97, 1.03)),
        level_db=float(rng.uniform(-37, -29)),
    )


def apply_channel(x: np.ndarray, sess: Session, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Per-utterance channel: speed perturbation, reverb, noise, EQ/band-limit, gain. Returns int16-ready."""
    info: dict = {}
    # speed (pitch + tempo) perturbation by linear-phase resampling around the session's speed
    speed = sess.speed * float(rng.uniform(0.97, 1.03))
    if abs(speed - 1.0) > 1e-3:
        n_out = int(round(len(x) / speed))
        # band-limit before (if speeding up) to avoid aliasing, then interpolate
        if speed > 1.0:
            x = fft_filter(x, lambda f: 1.0 / np.sqrt(1.0 + (f / (0.45 * SR / speed)) ** 16))
        x = np.interp(np.arange(n_out) * speed, np.arange(len(x)), x)
    info["speed"] = speed
    # reverb: exponentially decaying noise IR with a direct path
    if rng.random() < 0.6:
        rt60 = float(rng.uniform(0.15, 0.6))
        n_ir = int(rt60 * SR)
        t = np.arange(n_ir) / SR
        ir = rng.standard_normal(n_ir) * np.exp(-6.9 * t / rt60)
        ir[: int(0.002 * SR)] = 0.0
        wet = float(rng.uniform(0.2, 0.8))
        ir *= wet / (np.linalg.norm(ir) + 1e-12)
        ir[0] = 1.0
        x = fft_convolve(x, ir)
        info["rt60"] = rt60
    # noise at a random SNR, coloured (pink-ish / brown-ish / white mixture), added before the mic filter
    snr = float(rng.uniform(15, 35))
    colour = float(rng.uniform(0.7, 2.0))  # spectral slope: 0 white, 1 pink, 2 brown
    noise = fft_filter(rng.standard_normal(len(x)), lambda f: np.maximum(f, 20.0) ** (-colour / 2))
    noise *= rms(x) / rms(noise) * 10 ** (-snr / 20)
    x = x + noise
    info["snr"] = snr
    # microphone/EQ: session response plus a small per-utterance variation
    hp = sess.hp * float(rng.uniform(0.7, 1.4))
    lp = min(sess.lp * float(rng.uniform(0.85, 1.15)), 7800.0)
    tilt = sess.tilt + float(rng.uniform(-3, 3))
    peaks = list(sess.peaks) + [
        (float(rng.uniform(200, 6000)), float(rng.uniform(-12, 12)), float(rng.uniform(0.2, 1.0)))
        for _ in range(int(rng.integers(1, 5)))
    ]
    x = fft_filter(x, lambda f: _response(f, hp, lp, tilt, peaks))
    # gain around the session level
    level = sess.level_db + float(rng.uniform(-3, 3))
    x = x * (10 ** (level / 20) / rms(x))
    peak = np.max(np.abs(x))
    if peak > 0.97:
        x *= 0.97 / peak
    info["level_db"] = level
    return x, info


# ---------------------------------------------------------------------------------------------------
# Corpus plan


def held_out_speakers(voices: list[Voice], order: list[int], count: int, recorded_first: bool) -> list[int]:
    """``count`` voice indices for dev/test (dev first), from the seeded permutation ``order``: the
    recorded (non-espeak) voices first, or both kinds in proportion to their numbers at every prefix
    (so dev-clean and test-clean each get their share)."""
    recorded = [i for i in order if voices[i].engine != "espeak"]
    others = [i for i in order if voices[i].engine == "espeak"]
    if recorded_first:
        return (recorded + others)[:count]
    share = len(recorded) / len(voices)
    held: list[int] = []
    n_recorded = 0
    for j in range(count):
        take_recorded = (np.floor((j + 1) * share + 0.5) > n_recorded and n_recorded < len(recorded)) or (
            len(held) - n_recorded >= len(others)
        )
        held.append(recorded[n_recorded] if take_recorded else others[len(held) - n_recorded])
        n_recorded += take_recorded
    return held


@dataclass
class Job:
    speaker: int
    voice: Voice
    subset: str
    chapter: int
    utt: int
    session: Session
    key: str


def plan(
    n_speakers: int,
    utts: int,
    seed: int,
    n_heldout: int,
    n_test: int | None = None,
    *,
    voice_set: str = "default",
    min_chapters: int = 1,
) -> tuple[list[Job], dict]:
    """``n_heldout`` speakers in dev-clean and ``n_test`` (default the same) in test-clean; the first
    ``n_speakers`` voices of ``voice_set``; each speaker has 1 or 2 chapters (seeded), at least
    ``min_chapters`` (1 or 2)."""
    n_test = n_heldout if n_test is None else n_test
    if min_chapters not in (1, 2):
        raise ValueError(f"min_chapters must be 1 or 2, got {min_chapters}")
    vset = VOICE_SETS[voice_set]
    voices = vset.voices[:n_speakers]
    rng = np.random.default_rng([seed, 7])
    order = [int(i) for i in rng.permutation(n_speakers)]
    held = held_out_speakers(voices, order, n_heldout + n_test, vset.recorded_first)
    subset_of = {i: "train-clean-100" for i in range(n_speakers)}
    for j, i in enumerate(held):
        subset_of[i] = "dev-clean" if j < n_heldout else "test-clean"
    chapters_used: set[int] = set()
    jobs: list[Job] = []
    speakers: dict = {}
    for i, voice in enumerate(voices):
        spk = vset.first_id + i
        srng = np.random.default_rng([seed, spk])
        n_ch = max(min_chapters, int(srng.integers(1, 3)))  # the same draw whatever min_chapters
        chapters = []
        while len(chapters) < n_ch:
            c = int(srng.integers(100, 10000))
            if c not in chapters_used:
                chapters_used.add(c)
                chapters.append(c)
        chapters.sort()
        # split the speaker's utterances over its chapters
        cut = int(round(utts * srng.uniform(0.35, 0.65))) if n_ch == 2 else utts
        counts = [cut, utts - cut] if n_ch == 2 else [utts]
        speakers[spk] = {"voice": voice, "subset": subset_of[i], "chapters": chapters}
        for c, cnt in zip(chapters, counts):
            sess = make_session(np.random.default_rng([seed, spk, c]))
            for u in range(cnt):
                key = f"{spk}-{c}-{u:04d}"
                jobs.append(Job(spk, voice, subset_of[i], c, u, sess, key))
    return jobs, speakers


def render(job: Job, seed: int, workdir: Path) -> tuple[str, np.ndarray, str]:
    rng = np.random.default_rng([seed, job.speaker, job.chapter, job.utt, 1])
    last = None
    for _attempt in range(12):
        text = make_sentence(rng)
        stretch = float(rng.uniform(0.8, 1.05))
        x = synthesise(job.voice, text, stretch, workdir, job.key)
        x = trim_silence(x)
        dur = len(x) / SR / job.session.speed
        last = (text, x)
        if ACCEPT_DUR[0] <= dur <= ACCEPT_DUR[1]:
            break
    text, x = last
    crng = np.random.default_rng([seed, job.speaker, job.chapter, job.utt, 2])
    y, _ = apply_channel(x, job.session, crng)
    y = y[: int(MAX_DUR * SR)]
    pcm = np.clip(np.round(y * 32767), -32768, 32767).astype(np.int16)
    return job.key, pcm, text.upper()


def write_tree(out: Path, utterances, speakers_txt) -> tuple[Path, dict[int, float]]:
    """Write ``<out>/LibriSpeech`` from ``utterances``, (subset, speaker, chapter, key, pcm, text) in
    order, each FLAC written as it comes; then a ``.trans.txt`` per chapter and ``SPEAKERS.TXT``
    (``speakers_txt(path, seconds of speech per speaker)``). Staged beside it and renamed into place
    (umask modes), replacing a previous tree. Returns the tree and the seconds per speaker."""
    final = out / "LibriSpeech"
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(atomic.mkdtemp(prefix=".LibriSpeech.", dir=out))
    try:
        transcripts: dict[tuple, list[str]] = {}
        seconds: dict[int, float] = {}
        for subset, spk, chapter, key, pcm, text in utterances:
            d = staging / subset / str(spk) / str(chapter)
            d.mkdir(parents=True, exist_ok=True)
            sf.write(d / f"{key}.flac", pcm, SR, format="FLAC", subtype="PCM_16", compression_level=1.0)
            transcripts.setdefault((subset, spk, chapter), []).append(f"{key} {text}")
            seconds[spk] = seconds.get(spk, 0.0) + len(pcm) / SR
        for (subset, spk, ch), lines in transcripts.items():
            (staging / subset / str(spk) / str(ch) / f"{spk}-{ch}.trans.txt").write_text(
                "\n".join(lines) + "\n"
            )
        speakers_txt(staging / "SPEAKERS.TXT", seconds)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return final, seconds


def write_speakers_txt(path: Path, speakers: dict, minutes: dict) -> None:
    lines = [
        "; spkr demo corpus: synthetic speakers in the LibriSpeech layout (see ../README.md)",
        "; NAME is the TTS engine and voice the speaker was synthesised with",
        ";ID  |SEX| SUBSET           |MINUTES| NAME",
    ]
    for spk, s in sorted(speakers.items()):
        lines.append(
            f"{spk:<5}| {s['voice'].sex} | {s['subset']:<16} | {minutes[spk]:5.2f} | {s['voice'].label}"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "population" in (argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--voice-set") or (
        "--voice-set=population" in argv
    ):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import make_population  # a sibling tool: N speakers drawn from a voice space

        rest = [
            a
            for i, a in enumerate(argv)
            if a != "--voice-set=population"
            and not (a == "--voice-set" or (i > 0 and argv[i - 1] == "--voice-set"))
        ]
        return make_population.main(rest)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", default="data/demo", help="output root; writes <out>/LibriSpeech (default data/demo)"
    )
    ap.add_argument(
        "--voice-set",
        choices=[*sorted(VOICE_SETS), "population"],
        default="default",
        help=f"'default': the bundled corpus' voices ({len(VOICES)}, ids from 1001); 'other': "
        f"{len(OTHER_VOICES)} voices none of which is in 'default' (ids from 2001); 'population': N "
        "speakers drawn from a voice space (tools/make_population.py, its own options)",
    )
    ap.add_argument(
        "--speakers", type=int, default=16, help="number of speakers, 4..size of the voice set (default 16)"
    )
    ap.add_argument(
        "--min-chapters",
        type=int,
        choices=(1, 2),
        default=1,
        help="chapters (sessions) per speaker at least: 1 (default; 1 or 2 drawn) or 2 (every speaker "
        "has two, so protocol closed-session can hold a chapter out for every speaker)",
    )
    ap.add_argument("--utts", type=int, default=40, help="utterances per speaker (default 40)")
    ap.add_argument(
        "--heldout",
        type=int,
        default=None,
        help="speakers in dev-clean and in test-clean each (default speakers//8)",
    )
    ap.add_argument(
        "--heldout-test",
        type=int,
        default=None,
        help="speakers in test-clean (default: 2 x --heldout); the re-split's test size is theirs x --utts",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel synthesis processes")
    args = ap.parse_args(argv)
    voice_set = VOICE_SETS[args.voice_set].voices
    if not 4 <= args.speakers <= len(voice_set):
        ap.error(f"--speakers must be in 4..{len(voice_set)} for --voice-set {args.voice_set}")
    if args.utts < 2:
        ap.error("--utts must be >= 2")
    n_held = args.heldout if args.heldout is not None else max(1, args.speakers // 8)
    n_test = args.heldout_test if args.heldout_test is not None else 2 * n_held
    if n_held + n_test >= args.speakers:
        ap.error("--heldout/--heldout-test too large: train-clean-100 would have no speakers")

    check_tools(voice_set[: args.speakers])
    jobs, speakers = plan(
        args.speakers,
        args.utts,
        args.seed,
        n_held,
        n_test,
        voice_set=args.voice_set,
        min_chapters=args.min_chapters,
    )
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda j: render(j, args.seed, Path(tmp)), jobs))
    final, seconds = write_tree(
        Path(args.out),
        ((j.subset, j.speaker, j.chapter, *r) for j, r in zip(jobs, results)),
        lambda path, secs: write_speakers_txt(path, speakers, {s: v / 60 for s, v in secs.items()}),
    )

    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    per_subset: dict[str, int] = {}
    for s in speakers.values():
        per_subset[s["subset"]] = per_subset.get(s["subset"], 0) + 1
    total_s = sum(seconds.values())
    durs = [len(r[1]) / SR for r in results]
    print(f"wrote {final} in {time.time() - t0:.0f} s")
    for subset in ("train-clean-100", "dev-clean", "test-clean"):
        n_utt = sum(1 for j in jobs if j.subset == subset)
        print(f"  {subset:<16} {per_subset.get(subset, 0):3d} speakers {n_utt:5d} utterances")
    print(
        f"  total: {len(speakers)} speakers, {len(jobs)} utterances, {total_s / 60:.2f} min "
        f"(utterance {min(durs):.2f}-{max(durs):.2f} s, mean {np.mean(durs):.2f} s), {size / 1e6:.2f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

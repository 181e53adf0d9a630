"""Write a tiny MUSAN-like noise set and synthetic room impulse responses (seeded) for tests and demos.

    python tools/make_noise_corpus.py --out data/noise-demo [--seed 0] [--demo data/demo]

Layout (what ``spkr.augment`` reads: ``noise_dir=<out>``, ``rir_dir=<out>/rirs``)::

    <out>/noise/coloured/<colour>-<n>.wav   Gaussian noise with a 1/f^a spectrum (white, pink, brown, blue),
                                            0.5-8 s: some shorter than an utterance (so they get tiled)
    <out>/music/tonal/music-<n>.wav         chords of harmonic tones changing every 0.2-0.6 s with a decaying
                                            envelope; one file at 22.05 kHz stereo (exercises resample +
                                            downmix)
    <out>/speech/demo/<key>.flac            utterances copied from the bundled demo corpus (babble sources)
    <out>/rirs/synthetic/rir-<n>.wav        spkr.augment.synthetic_rir at RT60 0.2-0.9 s, DRR 0-10 dB (24-bit)
    <out>/README.txt                        what was written and with which seed

Everything is a pure function of ``--seed`` (and the demo corpus), 16 kHz 16-bit unless stated; ~3 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from spkr.augment import synthetic_rir  # noqa: E402

SR = 16000
REPO = Path(__file__).resolve().parents[1]
COLOURS = {"white": 0.0, "pink": 1.0, "brown": 2.0, "blue": -1.0}


def coloured_noise(n: int, slope: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise whose power spectrum falls as 1/f^slope (above 20 Hz), peak-normalised to 0.5."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.maximum(np.fft.rfftfreq(n, 1 / SR), 20.0)
    x = np.fft.irfft(spec * freqs ** (-slope / 2), n)
    return 0.5 * x / np.max(np.abs(x))


def tonal_music(seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A sequence of 3-note chords of harmonic tones with plucked envelopes, peak-normalised to 0.5."""
    n = int(seconds * sr)
    out = np.zeros(n)
    start = 0
    while start < n:
        length = min(n - start, int(rng.uniform(0.2, 0.6) * sr))
        t = np.arange(length) / sr
        root = 110.0 * 2 ** (int(rng.integers(0, 24)) / 12)
        chord = sum(
            sum(0.5**h * np.sin(2 * np.pi * (h + 1) * root * 2 ** (step / 12) * t) for h in range(4))
            for step in (0, 4, 7)
        )
        out[start : start + length] = chord * np.exp(-3.0 * t)
        start += length
    return 0.5 * out / np.max(np.abs(out))


def write_noise(out: Path, rng: np.random.Generator, files: int) -> list[Path]:
    written = []
    for i in range(files):
        colour = list(COLOURS)[i % len(COLOURS)]
        seconds = 0.5 if i == 0 else float(rng.uniform(2.0, 8.0))  # the first one is tiled
        path = out / "noise" / "coloured" / f"{colour}-{i:03d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, coloured_noise(int(seconds * SR), COLOURS[colour], rng), SR, subtype="PCM_16")
        written.append(path)
    return written


def write_music(out: Path, rng: np.random.Generator, files: int) -> list[Path]:
    written = []
    for i in range(files):
        sr = 22050 if i == 0 else SR
        wave = tonal_music(float(rng.uniform(3.0, 8.0)), sr, rng)
        if i == 0:
            wave = np.stack([wave, np.roll(wave, 100)], axis=1)
        path = out / "music" / "tonal" / f"music-{i:03d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wave, sr, subtype="PCM_16")
        written.append(path)
    return written


def copy_speech(out: Path, demo: Path, rng: np.random.Generator, files: int) -> list[Path]:
    sources = sorted(demo.rglob("*.flac"))
    if len(sources) < files:
        raise SystemExit(f"{demo}: need {files} .flac files for babble, found {len(sources)}")
    written = []
    for i in sorted(rng.choice(len(sources), size=files, replace=False)):
        path = out / "speech" / "demo" / sources[i].name
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources[i], path)
        written.append(path)
    return written


def write_rirs(out: Path, rng: np.random.Generator, files: int) -> list[Path]:
    written = []
    for i in range(files):
        rt60, drr = round(float(rng.uniform(0.2, 0.9)), 3), round(float(rng.uniform(0.0, 10.0)), 2)
        rir = synthetic_rir(SR, rt60, drr, rng)
        path = out / "rirs" / "synthetic" / f"rir-{i:03d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        # 24-bit PCM: a FLOAT wav gets a PEAK chunk with a timestamp (bytes would differ per run)
        sf.write(path, 0.99 * rir / np.max(np.abs(rir)), SR, subtype="PCM_24")
        written.append(path)
    return written


def make_noise_corpus(
    out: Path,
    seed: int = 0,
    demo: Path = REPO / "data" / "demo",
    noise: int = 6,
    music: int = 4,
    speech: int = 12,
    rirs: int = 8,
) -> dict[str, int]:
    """Write the set into ``out`` (an existing set there is replaced); returns files per category."""
    for sub in ("noise", "music", "speech", "rirs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    rng = np.random.default_rng(seed)
    counts = {
        "noise": len(write_noise(out, rng, noise)),
        "music": len(write_music(out, rng, music)),
        "speech": len(copy_speech(out, demo, rng, speech)),
        "rirs": len(write_rirs(out, rng, rirs)),
    }
    (out / "README.txt").write_text(
        f"Synthetic MUSAN-like noise set + RIRs written by tools/make_noise_corpus.py --seed {seed}\n"
        + "".join(f"{k}: {v} files\n" for k, v in counts.items())
    )
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder (noise_dir; RIRs in <out>/rirs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--demo", type=Path, default=REPO / "data" / "demo", help="corpus whose flacs make babble")
    p.add_argument("--noise", type=int, default=6, help="coloured-noise files")
    p.add_argument("--music", type=int, default=4, help="tonal music files")
    p.add_argument("--speech", type=int, default=12, help="speech files (babble) copied from --demo")
    p.add_argument("--rirs", type=int, default=8, help="synthetic RIR files")
    args = p.parse_args(argv)
    counts = make_noise_corpus(args.out, args.seed, args.demo, args.noise, args.music, args.speech, args.rirs)
    print(f"{args.out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

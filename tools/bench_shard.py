"""Benchmark the write side: audio-seconds processed per wall-second per core (x realtime).

Runs, in one process on one core (torch.set_num_threads(1)) and on the same audio, side by side:
  original   the original scripts' way: per utterance soundfile load -> MelSpectrogram -> dB ->
             one torch.save file per utterance
  spkr       spkr.shards.writer: decode -> log-mel -> float16 .npy -> tar shards + sidecars + sha256
  limit      soundfile FLAC decode + spkr's pure-torch log-mel alone (nothing written): the ceiling
spkr is run with both feature backends (torchaudio's MelSpectrogram and spkr's pure-torch twin).
Rounds alternate (original, spkr, limit, ...) so machine noise hits all alike; the median is printed.
The demo corpus' utterances are short (1-4 s); with ``--concat 12`` (default) consecutive utterances of a
chapter are first joined into ~12 s files, LibriSpeech's mean length, so per-utterance costs weigh as
they would on LibriSpeech (``--concat 0`` benchmarks the files as they are).

    python tools/bench_shard.py [--source data/demo] [--rounds 3] [--backend auto] [--concat 12]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from spkr import runtime  # noqa: E402

runtime.configure()  # SPKR_HUGEPAGES=1 takes effect only before torch loads (spkr/runtime.py)

import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from spkr.corpus.labels import build_splits  # noqa: E402
from spkr.corpus.librispeech import iter_openslr, training_combination  # noqa: E402
from spkr.features import FeatureConfig, LogMel, compute_logmel, load_audio  # noqa: E402
from spkr.shards.plan import plan_shards  # noqa: E402
from spkr.shards.writer import WriteOptions, run_jobs  # noqa: E402


def concat_corpus(utts, root: str, seconds: float) -> str:
    """Join consecutive utterances of each chapter into files of >= ``seconds`` (LibriSpeech layout)."""
    import numpy as np

    groups: dict[tuple, list] = {}
    for u in utts:
        groups.setdefault((u.subset, u.speaker, u.chapter), []).append(u)
    for (subset, spk, chapter), members in groups.items():
        d = os.path.join(root, "LibriSpeech", subset, spk, chapter)
        os.makedirs(d, exist_ok=True)
        lines, buf, n = [], [], 0
        for i, u in enumerate(members):
            data, sr = sf.read(u.path, dtype="float32")
            buf.append(data)
            if sum(len(b) for b in buf) >= seconds * sr or i == len(members) - 1:
                key = f"{spk}-{chapter}-{n:04d}"
                sf.write(os.path.join(d, key + ".flac"), np.concatenate(buf), sr, subtype="PCM_16")
                lines.append(f"{key} CONCATENATED")
                buf, n = [], n + 1
        with open(os.path.join(d, f"{spk}-{chapter}.trans.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


def original_way(utts, out_dir: str, cfg: FeatureConfig) -> None:
    import torchaudio.transforms as T

    mel = T.MelSpectrogram(
        sample_rate=cfg.sample_rate,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        n_mels=cfg.n_mels,
        f_min=cfg.f_min,
        f_max=cfg.f_max,
    )
    db = T.AmplitudeToDB(top_db=cfg.top_db)
    for u in utts:
        data, sr = sf.read(u.path, dtype="float32")
        spec = db(mel(torch.from_numpy(data)))
        torch.save({"mel": spec, "speaker": u.speaker}, os.path.join(out_dir, f"{u.key}.pt"))


def limit_way(utts, cfg: FeatureConfig, logmel: LogMel) -> None:
    for u in utts:
        compute_logmel(load_audio(u.path, cfg), logmel)


def bench_augment(args) -> None:
    """``--augment``: the cost of spkr.augment per kind and combined, in x realtime (seconds of audio
    augmented per second, 1 thread), beside decoding and log-mel on the same (train) audio; waveforms are
    decoded once before timing. Noise: ``--noise-dir`` (MUSAN layout) or a set written by
    tools/make_noise_corpus.py; RIR files: ``--rir-dir`` or that set's rirs/. Rounds alternate the
    variants; medians. Ends with the shard-time estimate for K copies per utterance, each copy planned as
    its own sample (so its source is decoded again): (1+K) x (decode + log-mel) + K x augment."""
    import importlib.util

    from spkr.augment import AugmentConfig, AugmentSources, augment
    from spkr.features import resolve_backend

    torch.set_num_threads(1)
    cfg, sr = FeatureConfig(), FeatureConfig().sample_rate
    train_subsets, dev, test = training_combination(args.subsets)
    source = args.source
    if args.concat > 0:
        src = list(iter_openslr(source, train_subsets, with_duration=False))
        source = concat_corpus(src, tempfile.mkdtemp(prefix="bench-corpus-"), args.concat)
    utts = list(iter_openslr(source, train_subsets))
    noise_dir = args.noise_dir
    if noise_dir is None:
        spec = importlib.util.spec_from_file_location(
            "mnc", os.path.join(os.path.dirname(__file__), "make_noise_corpus.py")
        )
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        noise_dir = tempfile.mkdtemp(prefix="bench-noise-")
        tool.make_noise_corpus(tool.Path(noise_dir))
    rir_dir = args.rir_dir or os.path.join(noise_dir, "rirs")
    waves = [(u.key, load_audio(u.path, cfg)) for u in utts]
    audio = sum(len(w) for _, w in waves) / sr
    logmel = LogMel(cfg, backend=resolve_backend(args.backend))

    def augmenter(kinds: tuple, copies: int = 1, rir: str | None = None):
        acfg = AugmentConfig(copies=copies, kinds=kinds, noise_dir=noise_dir, rir_dir=rir)
        sources = AugmentSources(acfg, sr)
        return lambda: [
            augment(w, sr, key, k, acfg, sources) for key, w in waves for k in range(copies)
        ], copies

    variants = {  # name -> (run, audio multiple)
        "decode (soundfile)": (lambda: [load_audio(u.path, cfg) for u in utts], 1),
        f"log-mel ({logmel.backend})": (lambda: [compute_logmel(w, logmel) for _, w in waves], 1),
        "noise": augmenter(("noise",)),
        "music": augmenter(("music",)),
        "babble": augmenter(("babble",)),
        "reverb (synthetic RIR)": augmenter(("reverb",)),
        "reverb (RIR files)": augmenter(("reverb",), rir=rir_dir),
        "speed": augmenter(("speed",)),
        "speed+reverb+noise": augmenter(("speed+reverb+noise",)),
        "5 kinds, K=5 (per copy)": augmenter(AugmentConfig().kinds, copies=5),
    }
    print(f"{len(utts)} train utterances, {audio / 60:.1f} min of audio, 1 thread, noise set {noise_dir}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, (run, _) in variants.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    rt = {name: audio * variants[name][1] / statistics.median(v) for name, v in times.items()}
    mel = rt[f"log-mel ({logmel.backend})"]
    print(f"\n{'variant':<28}{'x realtime':>12}{'time / log-mel':>16}")
    for name in variants:
        print(f"{name:<28}{rt[name]:>12.0f}{mel / rt[name]:>16.2f}")
    per_second = {
        "decode": 1 / rt["decode (soundfile)"],
        "mel": 1 / mel,
        "aug": 1 / rt["5 kinds, K=5 (per copy)"],
    }
    print("\nshard-time estimate per source second (decode + log-mel per sample, augment per copy; no tar):")
    for k in (0, 1, 3, 5):
        cost = (1 + k) * (per_second["decode"] + per_second["mel"]) + k * per_second["aug"]
        print(
            f"  K={k}: {1 / cost:6.0f} x realtime of source audio ({(1 + k) / cost:6.0f} x of written audio)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=os.path.join(os.path.dirname(__file__), "..", "data", "demo"))
    p.add_argument("--subsets", default="train.100")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "torchaudio"))
    p.add_argument("--concat", type=float, default=12.0, help="join utterances to this many seconds (0: off)")
    p.add_argument("--augment", action="store_true", help="benchmark spkr.augment instead (bench_augment)")
    p.add_argument("--noise-dir", default=None, help="--augment: MUSAN-style folder (default: synthesised)")
    p.add_argument("--rir-dir", default=None, help="--augment: RIR folder (default: the noise set's rirs/)")
    args = p.parse_args()
    if args.augment:
        return bench_augment(args)
    torch.set_num_threads(1)
    cfg = FeatureConfig()
    train_subsets, dev, test = training_combination(args.subsets)
    if args.concat > 0:
        src = list(iter_openslr(args.source, train_subsets + [dev, test], with_duration=False))
        args.source = concat_corpus(src, tempfile.mkdtemp(prefix="bench-corpus-"), args.concat)
    train = list(iter_openslr(args.source, train_subsets))
    dev_u, test_u = list(iter_openslr(args.source, [dev])), list(iter_openslr(args.source, [test]))
    splits = build_splits(train, dev_u, test_u)
    utts = splits.train + splits.valid + splits.test
    audio = sum(u.duration for u in utts)
    logmel = LogMel(cfg, backend="torch" if args.backend == "auto" else args.backend)
    print(
        f"{len(utts)} utterances, {audio / 60:.1f} min of audio, feature backend {logmel.backend}, 1 thread, "
        f"{runtime.describe()}"
    )
    backends = ["torchaudio", "torch"] if args.backend == "auto" else [args.backend]
    times = {"original": [], **{f"spkr[{b}]": [] for b in backends}, "limit": []}
    for r in range(args.rounds):
        tmp = tempfile.mkdtemp(prefix="bench-shard-")
        try:
            os.makedirs(os.path.join(tmp, "orig"))
            t0 = time.perf_counter()
            original_way(utts, os.path.join(tmp, "orig"), cfg)
            times["original"].append(time.perf_counter() - t0)

            jobs = plan_shards(
                {"train": splits.train, "valid": splits.valid, "test": splits.test}, splits.speakers, 1000
            )
            for backend in backends:
                t0 = time.perf_counter()
                run_jobs(os.path.join(tmp, backend), jobs, cfg, WriteOptions(feature_backend=backend))
                times[f"spkr[{backend}]"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            limit_way(utts, cfg, logmel)
            times["limit"].append(time.perf_counter() - t0)
        finally:
            shutil.rmtree(tmp)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    rt = {k: audio / v for k, v in med.items()}
    print()
    print(f"{'way':<20}{'x realtime / core':>20}")
    for k in times:
        print(f"{k:<20}{rt[k]:>20.0f}")
    print()
    for b in backends:
        k = f"spkr[{b}]"
        print(f"{k:<18} / original   = {rt[k] / rt['original']:.2f}x   (target >= 3x)")
        print(f"{k:<18} / limit      = {rt[k] / rt['limit']:.2f}    (share of the decode+log-mel ceiling)")
        print(f"{k:<18} x realtime   = {rt[k]:.0f}x  per core (target >= 1200x)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""torch.compile's cost and gain in training: compile on/off (cold and warm inductor cache) x bf16/fp32.
(Phase shares, baselines and rank counts: tools/bench_train.py.)

    python tools/bench_compile.py --shards shards/demo [--config configs/tiny.toml] [--steps 60] [--nproc 2]
    python tools/bench_compile.py --synthetic 600 --crop-frames 300    # LibriSpeech-like lengths, 3 s crops

Each variant is a real ``spkr.train`` run (``--max-steps``; torchrun when --nproc > 1) logging every
step; samples/s and the data-wait share are averaged over the steps after the first ``--skip`` (which
include compilation). "first step" is the wall time from launching the command to the end of the first
optimizer step (imports, loaders, model build and, with compile, compilation). Variants name the mode,
dtype and, for compile, the inductor cache: ``compile-fp32-cold`` runs with an empty
``TORCHINDUCTOR_CACHE_DIR`` (what a new machine sees), ``compile-fp32-warm`` again with the cache the
cold run filled. Every variant trains the same model on the same batches (same seed, epoch plan and
steps); that the compiled model computes what the eager one does is checked in
tests/test_models.py::test_tiny_config_compiles_and_matches_eager, not here (compiled dropout draws
other masks, so per-step losses are not comparable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args, compile_: bool, dtype: str, out: Path, cache_dir: Path) -> dict:
    train = [
        "-m", "spkr.train", "--shards", args.shards, "--config", args.config, "--out", str(out), "--fresh",
        "--epochs", "1000", "--max-steps", str(args.steps), "--log-every", "1", "--dtype", dtype,
        "--compile" if compile_ else "--no-compile", "--no-progress", "--ckpt-every", "0",
        "--crop-frames", str(args.crop_frames), "--num-workers", str(args.num_workers),
    ]  # fmt: skip
    if args.nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(args.nproc),
        ]
    else:
        cmd = [sys.executable]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        TORCHINDUCTOR_CACHE_DIR=str(cache_dir),
    )
    t0 = time.time()
    subprocess.run(
        cmd + train, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r["time"] for r in rows if r["kind"] == "config")
    steps = [r for r in rows if r["kind"] == "train"]
    warm = steps[args.skip :]
    first = steps[args.skip - 1]["time"] - start if args.skip else 0.0
    return {
        "first_step_s": steps[0]["time"] - t0,
        "compile": compile_,
        "dtype": dtype,
        "samples_per_s": sum(r["samples_per_s"] for r in warm) / len(warm),
        "data_wait": sum(r["data_wait"] for r in warm) / len(warm),
        "first_steps_s": first,
        "wall_s": time.time() - t0,
    }


def synthetic_shards(out: Path, n: int) -> str:
    """n training samples of LibriSpeech-like lengths (log-normal, mean ~12 s, up to ~35 s), 40 classes,
    plus small valid/test splits, written with the real shard writer (tests/shardkit.py)."""
    sys.path.insert(0, str(REPO / "tests"))
    from shardkit import make_shards

    per = 100
    counts = [per] * (n // per) + ([n % per] if n % per else [])
    make_shards(
        out, splits={"train": counts, "valid": [40], "test": [40]}, n_classes=40, mean_frames=1230, sigma=0.45
    )
    return str(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default=None, help="a shards directory (or --synthetic N)")
    p.add_argument(
        "--synthetic", type=int, default=0, help="N synthetic LibriSpeech-like training samples (12 s mean)"
    )
    p.add_argument("--crop-frames", type=int, default=0, help="random crops of this many frames (300 = 3 s)")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.toml"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="steps excluded from the averages (warm-up, compile)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument(
        "--variants", default="eager-fp32,compile-fp32-cold,compile-fp32-warm,eager-bf16,compile-bf16-warm"
    )
    args = p.parse_args()
    res = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.shards:
            if not args.synthetic:
                p.error("give --shards DIR or --synthetic N")
            args.shards = synthetic_shards(Path(tmp) / "shards", args.synthetic)
        caches = {}
        for v in args.variants.split(","):
            mode, dtype, *cache = v.split("-")
            key = (dtype, cache[0] if cache else "warm")
            if key[1] == "cold" or key not in caches:  # cold: a new empty cache; warm: the one filled
                caches[(dtype, "warm")] = caches[key] = Path(tempfile.mkdtemp(dir=tmp, prefix="inductor-"))
            r = run(args, mode == "compile", dtype, Path(tmp) / v, caches[key])
            res.append(r)
            print(
                f"{v:18s} {r['samples_per_s']:8.1f} samples/s  data-wait {100 * r['data_wait']:4.1f}%  "
                f"first step after {r['first_step_s']:6.1f} s  first {args.skip} steps {r['first_steps_s']:6.1f} s  "
                f"wall {r['wall_s']:6.1f} s",
                flush=True,
            )
    base = res[0]["samples_per_s"]
    print("ratios vs " + args.variants.split(",")[0] + ": " + ", ".join(
        f"{v} {r['samples_per_s'] / base:.2f}x" for v, r in zip(args.variants.split(","), res)))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Training throughput on this machine: compile on/off x bf16/fp32, one run each, ratios in one table.

    python tools/bench_train.py --shards shards/demo [--config configs/tiny.toml] [--steps 60] [--nproc 1]

Each variant is a real ``spkr.train`` run (``--max-steps``; torchrun when --nproc > 1) logging every
step; samples/s and the data-wait share are averaged over the steps after the first ``--skip`` (which
include compilation). Compile time is reported separately (wall time of the first steps).
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


def run(args, compile_: bool, dtype: str, out: Path) -> dict:
    train = [
        "-m", "spkr.train", "--shards", args.shards, "--config", args.config, "--out", str(out), "--fresh",
        "--epochs", "1000", "--max-steps", str(args.steps), "--log-every", "1", "--dtype", dtype,
        "--compile" if compile_ else "--no-compile", "--no-progress", "--ckpt-every", "0",
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
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
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
        "compile": compile_,
        "dtype": dtype,
        "samples_per_s": sum(r["samples_per_s"] for r in warm) / len(warm),
        "data_wait": sum(r["data_wait"] for r in warm) / len(warm),
        "first_steps_s": first,
        "wall_s": time.time() - t0,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.toml"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="steps excluded from the averages (warm-up, compile)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--variants", default="eager-fp32,eager-bf16,compile-fp32,compile-bf16")
    args = p.parse_args()
    res = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants.split(","):
            mode, dtype = v.split("-")
            r = run(args, mode == "compile", dtype, Path(tmp) / v)
            res.append(r)
            print(
                f"{v:14s} {r['samples_per_s']:8.1f} samples/s  data-wait {100 * r['data_wait']:4.1f}%  "
                f"first {args.skip} steps {r['first_steps_s']:6.1f} s  wall {r['wall_s']:6.1f} s",
                flush=True,
            )
    base = res[0]["samples_per_s"]
    print("ratios vs " + args.variants.split(",")[0] + ": " + ", ".join(
        f"{v} {r['samples_per_s'] / base:.2f}x" for v, r in zip(args.variants.split(","), res)))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

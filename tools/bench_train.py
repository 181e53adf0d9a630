#!/usr/bin/env python3
"""Training throughput where users feel it: real ``spkr.train`` runs, Mamba beside a Transformer of
similar size, 3 s crops and whole utterances, 1 and 2 ranks, dtype auto vs fp32 — in one run.

    python tools/bench_train.py --json bench.json                # the default grid: 24 runs, ~40 min here
    python tools/bench_train.py --pairs tiny --nprocs 1 --dtypes auto --rounds 1 --json out.json

Pairs (Mamba config / Transformer baseline of similar parameter count, both trained alike):
``tiny`` = bundled ``tiny`` / bundled ``tiny-transformer`` (the bundled transformer's
architecture at tiny's sizes, d_model 96, 2 layers, 4 heads, ff x4, front-end [128], embedding 128,
softmax head); ``mamba-torch`` = bundled ``mamba-torch`` / bundled ``transformer``. The table prints
every model's parameter count (the ``params`` of its run's config row).

Data: ``--synthetic N`` LibriSpeech-like training samples written with the real shard writer
(tests/shardkit.py): log-normal lengths, mean ~12.3 s, capped at 35 s (3500 frames; the uncapped draw
reaches ~65 s), 80 mels, 40 classes; ``--shards DIR`` uses existing shards instead. Lengths:
``crop`` = random 300-frame (3 s) crops (``--crop-frames 300``), ``full`` = whole utterances, batched
by length (``--crop-frames 0``). Batch sizes per rank: ``--batch`` (``PAIR:LENGTH=B``), the same for
both models of a pair.

Each variant is one ``python -m spkr.train`` run (torchrun --standalone for 2 ranks, gloo), eager,
``--max-steps --steps``, ``--log-every 1``, ``--threads`` intra-op threads per rank (default 1, as
torchrun sets: on this shared 2-core machine 2 threads per process ran the tiny step 10-30x slower,
its OpenMP threads waiting for each other whenever one was descheduled). Figures are over the steps after the first ``--skip``: samples/s = samples trained
(all ranks) / wall time of those steps; phase shares = each phase's time over rank 0's step time,
from the ``phases`` of metrics.jsonl train rows (spkr/run/phases.py says what each phase holds;
``allreduce`` is the all-reduce wait backward did not hide). ``dtype auto`` is what
``spkr.run.distributed.resolve_dtype`` picks on this machine (the table prints the resolved dtype).
Noise: variants run interleaved (each Mamba run next to its baseline, the pair's order swapped every
round), ``--rounds`` times; every round is reported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # spkr, and shardkit (the real shard writer)
CONFIGS = REPO / "spkr" / "configs"
MAX_FRAMES = 3500  # 35 s: LibriSpeech's longest training utterances
PAIRS = {"tiny": ("tiny", "tiny-transformer"), "mamba-torch": ("mamba-torch", "transformer")}
CROPS = {"crop": 300, "full": 0}


@dataclass
class Variant:
    pair: str
    model: str  # config name
    length: str  # "crop" | "full"
    nproc: int
    dtype: str  # as asked: "auto" | "fp32" | "bf16"
    batch: int  # per rank

    @property
    def name(self) -> str:
        return f"{self.model}/{self.length}/{self.nproc}r/{self.dtype}"


def synthetic_shards(out: Path, n: int) -> Path:
    """n LibriSpeech-like training samples (log-normal lengths, mean ~12.3 s, capped at 35 s) in shards
    of 100, plus 8-sample valid/test splits (the end-of-run evaluation stays short)."""
    import numpy as np
    from shardkit import make_shards, sample_frames

    counts = [100] * (n // 100) + ([n % 100] if n % 100 else [])
    rng = np.random.default_rng(0)
    frames = [np.minimum(sample_frames(rng, c, 1230, 0.45), MAX_FRAMES) for c in counts]
    make_shards(
        out, splits={"train": counts, "valid": [8], "test": [8]}, n_classes=40, frames=frames, sigma=0.45,
        mean_frames=1230,
    )  # fmt: skip
    lengths = np.concatenate(frames)
    print(
        f"synthetic shards: {n} training samples, frames mean {lengths.mean():.0f} median "
        f"{np.median(lengths):.0f} p95 {np.percentile(lengths, 95):.0f} max {lengths.max()} (cap {MAX_FRAMES})",
        flush=True,
    )
    return out


def command(v: Variant, args, config: Path, out: Path) -> tuple[list[str], dict]:
    """The spkr.train command line of a variant and its environment."""
    train = [
        "-m", "spkr.train", "--shards", str(args.shards), "--config", str(config), "--out", str(out),
        "--fresh", "--epochs", "1000", "--max-steps", str(args.steps), "--log-every", "1",
        "--dtype", v.dtype, "--no-compile", "--no-progress", "--ckpt-every", "0",
        "--crop-frames", str(CROPS[v.length]), "--batch-size", str(v.batch), "--eval-batch-size", str(v.batch),
        "--num-workers", str(args.num_workers), "--verify-pairs", "0",
    ]  # fmt: skip
    launcher = [sys.executable]
    if v.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(v.nproc)]
    threads = str(args.threads)
    return launcher + train, dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)


def summarise(rows: list[dict], skip: int) -> dict:
    """samples/s and phase shares over the train rows after the first ``skip`` (one row per step)."""
    config = next(r for r in rows if r["kind"] == "config")
    steps = [r for r in rows if r["kind"] == "train"][skip:]
    if not steps:
        raise RuntimeError(f"no train rows after the first {skip}")
    wall = sum(1 / r["steps_per_s"] for r in steps)
    samples = sum(r["samples_per_s"] / r["steps_per_s"] for r in steps)
    phases = {k: sum(r["phases"][k] for r in steps) for k in steps[0]["phases"]}
    total = sum(phases.values())
    return {
        "params": config["params"],
        "dtype_resolved": config["dtype"],
        "timed_steps": len(steps),
        "step_s": wall / len(steps),
        "samples_per_s": samples / wall,
        "shares": {k: v / total for k, v in phases.items()},
        "allreduce_inflight_share": sum(r["allreduce_inflight"] for r in steps) / total,
    }


def run_variant(v: Variant, args, config: Path, out: Path) -> dict:
    cmd, env = command(v, args, config, out)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    result = {**asdict(v), "wall_s": time.time() - t0, "command": " ".join(cmd[1:])}
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()] or ["(no message)"]
        return {**result, "error": f"exit {proc.returncode}: {errors[0].strip()}"}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {**result, **summarise(rows, args.skip)}


def grid(args) -> list[list[Variant]]:
    """Cases in run order, each a list of the pair's two variants (Mamba first)."""
    batch = dict(item.split("=") for item in args.batch.split(","))
    cases = []
    for pair, length, nproc, dtype in itertools.product(
        args.pairs.split(","), args.lengths.split(","), args.nprocs, args.dtypes.split(",")
    ):
        if dtype != args.dtypes.split(",")[0] and nproc not in args.dtype_nprocs:
            continue
        b = int(batch[f"{pair}:{length}"])
        cases.append([Variant(pair, model, length, nproc, dtype, b) for model in PAIRS[pair]])
    return cases


def line(r: dict) -> str:
    if "error" in r:
        return f"{r['name']:38s} FAILED: {r['error']}"
    s = r["shares"]
    return (
        f"{r['name']:38s} {r['params'] / 1e6:5.2f}M {r['dtype_resolved']:8s} B{r['batch']:<3d} "
        f"{r['samples_per_s']:7.2f} {r['step_s']:7.2f}  "
        + " ".join(f"{100 * s[k]:5.1f}" for k in ("data_wait", "forward", "backward", "allreduce", "optimizer", "other"))
        + f"  {100 * r['allreduce_inflight_share']:5.1f}"
    )  # fmt: skip


def ratios(results: list[dict]) -> list[str]:
    """Mamba / its Transformer baseline (same case), and each asked dtype / fp32 (same model and case),
    in samples/s, per round."""
    ok = {
        (r["round"], r["model"], r["length"], r["nproc"], r["dtype"]): r["samples_per_s"]
        for r in results
        if "error" not in r
    }
    out = []
    for (rnd, model, length, nproc, dtype), sps in ok.items():
        pair = next((pr for pr in PAIRS.values() if pr[0] == model), None)
        base = ok.get((rnd, pair[1], length, nproc, dtype)) if pair else None
        if base:
            out.append(f"round {rnd} {model}/{length}/{nproc}r/{dtype}: {sps / base:.2f}x {pair[1]}")
        fp32 = ok.get((rnd, model, length, nproc, "fp32"))
        if dtype != "fp32" and fp32:
            out.append(f"round {rnd} {model}/{length}/{nproc}r: {dtype} {sps / fp32:.2f}x fp32")
    return out


HEADER = (
    f"{'model/length/ranks/dtype':38s} {'params':>6s} {'dtype':8s} {'B':4s} {'smp/s':>7s} {'step s':>7s}  "
    "wait%  fwd%  bwd%   ar%  opt% othr%  ar-inflight%"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default=None, help="a shards directory (default: --synthetic shards)")
    p.add_argument("--synthetic", type=int, default=600, help="synthetic LibriSpeech-like training samples")
    p.add_argument("--pairs", default="tiny,mamba-torch", help=f"of {', '.join(PAIRS)}")
    p.add_argument("--lengths", default="crop,full", help="crop (300 frames) and/or full")
    p.add_argument("--nprocs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--dtypes", default="auto,fp32", help="the first at every rank count, the rest ...")
    p.add_argument("--dtype-nprocs", type=lambda s: [int(x) for x in s.split(",")], default=[1],
                   help="... only at these rank counts")  # fmt: skip
    p.add_argument(
        "--batch",
        default="tiny:crop=16,tiny:full=8,mamba-torch:crop=8,mamba-torch:full=2",
        help="per-rank batch size of each PAIR:LENGTH",
    )
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the figures (warm-up)")
    p.add_argument("--rounds", type=int, default=1, help="times the whole grid runs (pair order swapped)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (OMP_NUM_THREADS)")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--json", default=None, help="write every result here")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        args.shards = args.shards or str(synthetic_shards(Path(tmp) / "shards", args.synthetic))
        configs = {name: CONFIGS / f"{name}.toml" for pair in PAIRS.values() for name in pair}
        print(HEADER, flush=True)
        for rnd in range(args.rounds):
            print(f"-- round {rnd + 1}", flush=True)
            for case in grid(args):
                for v in case if rnd % 2 == 0 else case[::-1]:
                    out = Path(tmp) / f"run-{len(results)}"
                    r = {"round": rnd + 1, "name": v.name, **run_variant(v, args, configs[v.model], out)}
                    results.append(r)
                    print(line(r), flush=True)
                    if args.json:  # after every variant: a cut-short run keeps what it measured
                        Path(args.json).write_text(
                            json.dumps({"settings": vars(args), "results": results}, indent=1) + "\n"
                        )
    print("\n".join(ratios(results)))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

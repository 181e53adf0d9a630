"""Training-step throughput of the Mamba classifiers: this working tree vs a baseline git revision.

    python tools/bench_step.py [--baseline-rev afd8304|DIR] [--configs tiny,mamba-torch]
                               [--dtypes fp32,bf16] [--threads 1,2] [--repeats 5]

One training step = what spkr.train does per micro-batch on CPU, eager: forward of the classifier built
from ``spkr/configs/<config>.toml``'s [model] table on a batch of ``--batch`` x ``--frames`` frames x 80
mels (default 16 x 300 = 3 s crops), cross-entropy, backward, AdamW step (the model's param_groups), in
float32 or under bf16 autocast, with 1 or 2 intra-op threads (1 = what each of 2 torchrun ranks uses).

The baseline is the same three modules (spkr/models/ssm.py, mamba.py, classifier.py) read from
``git show REV:...`` (or, when ``--baseline-rev`` is a directory, from DIR/spkr/models/...: e.g. a
copy of the working tree with one change undone) and imported under other names (its custom ops
renamed ``spkr_baseline::``), so both run in this process on the same torch. Both models get
identical weights; before timing, one float32 step of each on the same batch and dropout masks must
give the same logits, loss and parameter gradients (up to float32 rounding: ``--rtol`` of each
tensor's scale), else the tool stops. Then each setting warms both sides alike (``--warmup`` steps
each) and alternates them ``--repeats`` times; it prints each side's median step time with its
[min-max], the ratio of the medians (baseline / current: > 1 means faster now) and the range and
median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spkr import runtime  # noqa: E402

runtime.configure()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from spkr.models import ModelConfig, build_model  # noqa: E402
from spkr.run.configs import load_configs  # noqa: E402
from spkr.train import parse_args  # noqa: E402

N_MELS, N_CLASSES = 80, 100
# (module file, name it is imported under, {text in the baseline source: replacement}); every
# replacement must apply, so a baseline whose imports differ fails with a clear message
BASELINE_MODULES = [
    ("spkr/models/ssm.py", "_spkr_baseline_ssm", {'"spkr::': '"spkr_baseline::'}),
    ("spkr/models/mamba.py", "_spkr_baseline_mamba", {"from spkr.models import ssm": "import _spkr_baseline_ssm as ssm"}),
    ("spkr/models/classifier.py", "_spkr_baseline_classifier", {"from spkr.models.mamba import": "from _spkr_baseline_mamba import"}),
]  # fmt: skip


def read_source(rev: str, path: str) -> str:
    """``path`` at git revision ``rev``, or under directory ``rev`` if it is one."""
    if Path(rev).is_dir():
        try:
            return (Path(rev) / path).read_text()
        except OSError as e:
            sys.exit(f"bench_step: cannot read {path} under {rev}: {e}")
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
        ).stdout
    except subprocess.CalledProcessError as e:
        sys.exit(f"bench_step: cannot read {path} at revision {rev!r}: {e.stderr.strip()}")


def load_baseline(rev: str) -> types.ModuleType:
    """The classifier module of ``rev`` (a git revision or a directory; with its own mamba and ssm
    modules); returns the classifier."""
    module = None
    for path, name, replacements in BASELINE_MODULES:
        src = read_source(rev, path)
        for old, new in replacements.items():
            if old not in src:
                sys.exit(f"bench_step: {rev}:{path} has no {old!r}; cannot import it beside the current code")
            src = src.replace(old, new)
        module = types.ModuleType(name)
        module.__file__ = f"{rev}:{path}"
        sys.modules[name] = module
        exec(compile(src, module.__file__, "exec"), module.__dict__)
    return module


def model_config(name: str) -> ModelConfig:
    """The [model] table of bundled config ``name`` (or a config file), read the way spkr.train reads
    --config."""
    return load_configs(parse_args(["--shards", "x", "--config", name]))[0]


class Side:
    """One implementation's model, optimizer and step function on a fixed batch."""

    def __init__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]):
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-3)
        self.mel, self.lengths, self.labels = batch

    def step(self, bf16: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step (dropout masks drawn from ``seed``); returns logits and loss, detached."""
        torch.manual_seed(seed)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = self.model(self.mel, self.lengths, self.labels)
        loss = F.cross_entropy(logits.float(), self.labels)
        loss.backward()
        self.opt.step()
        return logits.detach().float(), loss.detach()


def check_same(base: Side, cur: Side, rtol: float) -> float:
    """One float32 step of each on identical weights must agree; returns the largest relative difference."""

    def grab(side):
        side.opt.step = lambda: None  # keep the weights: this call only compares
        try:
            logits, loss = side.step(bf16=False)
        finally:
            del side.opt.step
        return logits, loss, {n: p.grad.clone() for n, p in side.model.named_parameters()}

    want, got = grab(base), grab(cur)
    worst = 0.0
    pairs = [("logits", got[0], want[0]), ("loss", got[1], want[1])]
    pairs += [(f"grad {n}", g, want[2][n]) for n, g in got[2].items()]
    # a gradient that is zero in exact arithmetic (e.g. a bias before a softmax over time) is float
    # noise on both sides: scales are floored at 1e-4 of the largest gradient
    floor = 1e-4 * max(w.abs().max().item() for w in want[2].values())
    for name, g, w in pairs:
        scale = max(w.abs().max().item(), floor if name.startswith("grad") else 1e-12)
        diff = (g - w).abs().max().item() / scale
        worst = max(worst, diff)
        if diff > rtol:
            sys.exit(f"bench_step: {name} differs from the baseline: max |diff| / max |value| = {diff:.3g}")
    return worst


def time_pair(
    base: Side, cur: Side, bf16: bool, warmup: int, repeats: int
) -> tuple[list[float], list[float]]:
    """Step times of the two sides: ``warmup`` steps each, then ``repeats`` alternating rounds."""
    for _ in range(warmup):
        base.step(bf16), cur.step(bf16)
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(repeats):
        order = (0, 1) if r % 2 == 0 else (1, 0)  # neither side always runs right after the other
        for i in order:
            t0 = time.perf_counter()
            (base, cur)[i].step(bf16)
            times[i].append(time.perf_counter() - t0)
    return times[0], times[1]


def spread(times: list[float]) -> str:
    """median [min-max] in ms."""
    return f"{statistics.median(times) * 1e3:6.0f} [{min(times) * 1e3:.0f}-{max(times) * 1e3:.0f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-rev", default="afd8304", help="a git revision, or a directory")
    ap.add_argument("--configs", default="tiny,mamba-torch")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rtol", type=float, default=1e-3)
    args = ap.parse_args()
    baseline = load_baseline(args.baseline_rev)
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(args.batch, args.frames, N_MELS, generator=g),
        torch.full((args.batch,), args.frames),
        torch.randint(0, N_CLASSES, (args.batch,), generator=g),
    )
    print(f"torch {torch.__version__}, {runtime.describe()}")
    print(
        f"baseline {args.baseline_rev} vs working tree; batch {args.batch} x {args.frames} frames x {N_MELS}"
    )
    print(f"median [min-max] of {args.repeats} alternating steps after {args.warmup} warm-up steps each\n")
    print(
        f"{'config':<12s} {'dtype':<5s} {'thr':>3s} {'baseline ms':>20s} {'current ms':>20s} {'speed-up':>9s}"
        f" {'ratios of pairs [min-max]':>26s}"
    )
    for name in args.configs.split(","):
        cfg = model_config(name)
        torch.manual_seed(0)
        cur_model = build_model(cfg, N_MELS, N_CLASSES)
        base_model = baseline.build_model(cfg, N_MELS, N_CLASSES)
        base_model.load_state_dict(cur_model.state_dict())
        base, cur = Side(base_model, batch), Side(cur_model, batch)
        torch.set_num_threads(1)
        worst = check_same(base, cur, args.rtol)
        print(f"{name}: fp32 logits, loss and all parameter gradients equal (max rel diff {worst:.2g})")
        for dtype in args.dtypes.split(","):
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                tb, tc = time_pair(base, cur, dtype == "bf16", args.warmup, args.repeats)
                ratio = statistics.median(tb) / statistics.median(tc)
                pairs = [b / c for b, c in zip(tb, tc)]  # round r: both sides timed back to back
                print(
                    f"{name:<12s} {dtype:<5s} {threads:>3d} {spread(tb):>20s} {spread(tc):>20s} {ratio:8.2f}x"
                    f" {min(pairs):11.2f}-{max(pairs):.2f}x (median {statistics.median(pairs):.2f}x)"
                )
                sys.stdout.flush()


if __name__ == "__main__":
    main()

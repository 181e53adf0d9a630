"""python -m spkr.tools.chart_losses --run DIR — per-epoch loss/accuracy of a run's checkpoints.

    python -m spkr.tools.chart_losses --run runs/demo [--shards shards/demo] [--splits valid test]

Loss and top-1 accuracy of every per-epoch checkpoint (``<run>/ckpt-epochNNN.pt``) on the chosen
splits (default shards: the ones the run trained on) go to ``<run>/losses.json``; ``<run>/losses.png``
shows those curves next to the training curves from ``<run>/metrics.jsonl``.

A point training already measured is reused from ``<run>/metrics.jsonl`` instead of re-evaluated: the
``valid`` row of each epoch, and the final ``test`` row. A row is reused for a checkpoint only when it
proves it measured that very checkpoint on the very dataset being charted: the same weights (the
``weights`` fingerprint training records with each evaluation row against
:func:`spkr.checkpoint.weights_fingerprint` of the checkpoint's state dict), the same step and epoch,
the same ``dataset_id`` (the checkpoint's, which is also the charted shards'), and every sample of the
split (``n``). Anything else (epochs training did not validate, runs older than the fingerprint, other
shards, ``--no-reuse``) is evaluated here with :func:`spkr.run.evaluation.eval_loader` (training's
evaluation batches) under ``--dtype`` (default auto: training's precision policy,
:func:`spkr.run.distributed.resolve_dtype`, logged); each point in losses.json says which
(``"source": "metrics.jsonl" | "evaluated"``) and its autocast dtype. Errors: one line, exit status 2.

Training evaluates ``test`` only once, at the end, so by default ``test`` is charted for the last
epoch's checkpoint only; ``--test-epochs all`` evaluates it for every epoch checkpoint (one pass over
the test split per checkpoint).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from spkr.run.metrics import read_metrics

EPOCH_RE = re.compile(r"ckpt-epoch(\d+)\.pt$")
COUNTS = {"checkpoints": 0, "reused": 0, "evaluated": 0}  # of the last main() call: loads, points


def epoch_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """[(epoch, path)] of the run's ``ckpt-epochNNN.pt`` files, by epoch."""
    found = [(int(m.group(1)), p) for p in run.glob("ckpt-epoch*.pt") if (m := EPOCH_RE.search(p.name))]
    return sorted(found)


def measured_row(
    rows: list[dict], split: str, epoch: int, ckpt: dict, weights: str, dataset_id: str, n: int
) -> dict | None:
    """The last metrics.jsonl row that measured ``split`` with exactly this checkpoint, else None:
    kind == split, the checkpoint's weights fingerprint, step and dataset_id (which must also be the
    charted shards' ``dataset_id``), all ``n`` samples of the split, and the epoch of the checkpoint
    (its file name's for a per-epoch row; the epoch counter saved in it for the final test row)."""
    for r in reversed(rows):
        if (
            r.get("kind") == split
            and r.get("weights") == weights
            and r.get("step") == ckpt.get("step")
            and r.get("epoch") in (epoch, ckpt.get("epoch"))
            and r.get("dataset_id") == ckpt.get("dataset_id") == dataset_id
            and r.get("n") == n
            and all(isinstance(r.get(k), (int, float)) for k in ("loss", "acc"))
        ):
            return r
    return None


def chart(losses: dict, metrics: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_l, ax_a, ax_t = axes
    for split, rows in losses["splits"].items():
        ep = [r["epoch"] for r in rows]
        last_only = split == "test" and losses.get("test_epochs") == "last"
        label = f"{split} (last epoch only)" if last_only else split
        ax_l.plot(ep, [r["loss"] for r in rows], marker="o", label=label)
        ax_a.plot(ep, [100 * r["acc"] for r in rows], marker="o", label=label)
    ax_l.set(title="loss per epoch (checkpoints)", xlabel="epoch", ylabel="cross-entropy")
    ax_a.set(title="top-1 accuracy per epoch (checkpoints)", xlabel="epoch", ylabel="%")
    train = [r for r in metrics if r.get("kind") == "train"]
    if train:
        ax_t.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (weighted CE)")
        ax2 = ax_t.twinx()
        ax2.plot([r["step"] for r in train], [100 * r["acc"] for r in train], color="tab:green", alpha=0.6)
        ax2.set_ylabel("train accuracy % (green)")
    ax_t.set(title="training curves (metrics.jsonl)", xlabel="optimizer step", ylabel="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    ax_l.legend()
    ax_a.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    from spkr.config import add_storage_options
    from spkr.run.distributed import DTYPE_CHOICES

    p = argparse.ArgumentParser(prog="python -m spkr.tools.chart_losses", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory (with ckpt-epochNNN.pt files)")
    p.add_argument("--shards", default=None, help="shards directory or URL (default: the run's)")
    p.add_argument("--splits", nargs="+", default=["valid", "test"])
    p.add_argument(
        "--test-epochs",
        choices=("last", "all"),
        default="last",
        help="chart the test split for the last epoch's checkpoint only (training's final test row; "
        "default) or for every epoch checkpoint (one evaluation of the test split each)",
    )
    p.add_argument(
        "--no-reuse",
        action="store_true",
        help="evaluate every point, also those training measured (default: reuse metrics.jsonl rows "
        "proven to be of the same checkpoint and dataset)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument(
        "--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)"
    )
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="autocast dtype of evaluated points"
    )
    add_storage_options(p)
    p.add_argument(
        "--allow-other-dataset",
        action="store_true",
        help="evaluate on shards that are not the run's training dataset (warns; default: refuse)",
    )
    return p.parse_args(argv)


@dataclass
class Chart:
    """What one chart_losses call works with: the loaders per split, which epochs each split is
    charted for, the reusable metrics rows, and per-split tallies."""

    args: argparse.Namespace
    ckpts: list[tuple[int, Path]]
    first: dict  # the first epoch checkpoint (its stats normalise every split)
    loaders: dict
    charted: dict[str, set[int]]
    metrics: list[dict]
    device: object
    amp_dtype: object
    reused: dict = field(default_factory=dict)
    evaluated: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def manifest(self):
        return self.loaders[self.args.splits[0]].manifest


def open_chart(args) -> Chart:
    """Checkpoints, shards, precision and loaders of the run (ValueError when there is nothing to chart)."""
    from spkr import storage
    from spkr.checkpoint import describe_backend, resolve_device
    from spkr.checkpoint import load as load_ckpt
    from spkr.run.distributed import describe_dtype, resolve_dtype
    from spkr.run.evaluation import eval_loader

    run = Path(args.run)
    device = resolve_device(args.device)
    ckpts = epoch_checkpoints(run)
    if not ckpts:
        raise ValueError(f"{run}: no per-epoch checkpoints (ckpt-epochNNN.pt)")
    opts = storage.storage_options_from_env(args.storage_options)
    first = load_ckpt(ckpts[0][1])
    shards = args.shards or first.get("shards")
    if not shards:
        raise ValueError("no --shards and the checkpoint does not name its shards")
    amp_dtype, why = resolve_dtype(args.dtype, device)
    print(f"[chart_losses] {describe_backend(first, device)}, {describe_dtype(amp_dtype, why)}")
    loaders = {  # normalised with the run's training statistics (the checkpoint's)
        split: eval_loader(
            shards,
            split,
            args.batch_size,
            num_workers=args.num_workers,
            storage_options=opts,
            stats=first["stats"],
        )
        for split in args.splits
    }
    last_epoch = ckpts[-1][0]
    charted = {  # the epochs each split is charted for: test only at the end unless --test-epochs all
        s: {e for e, _ in ckpts if s != "test" or args.test_epochs == "all" or e == last_epoch}
        for s in args.splits
    }
    metrics = [] if args.no_reuse else read_metrics(run)
    zero = {s: 0 for s in args.splits}
    return Chart(args, ckpts, first, loaders, charted, metrics, device, amp_dtype, dict(zero), dict(zero),
                 {s: 0.0 for s in args.splits})  # fmt: skip


def chart_checkpoint(c: Chart, epoch: int, path: Path, losses: dict) -> None:
    """The points of one epoch checkpoint: reused from metrics.jsonl when proven, else evaluated."""
    from spkr.checkpoint import build_model_from_checkpoint, check_dataset, weights_fingerprint
    from spkr.checkpoint import load as load_ckpt
    from spkr.run.distributed import dtype_name
    from spkr.run.evaluation import run_split, summarise

    ckpt = load_ckpt(path)
    COUNTS["checkpoints"] += 1
    if ckpt["stats"] != c.first["stats"]:
        raise ValueError(f"{path}: other feature statistics than {c.ckpts[0][1].name}: not one run")
    warning = check_dataset(ckpt, c.manifest, str(path), allow_other_dataset=c.args.allow_other_dataset)
    if warning and epoch == c.ckpts[0][0]:
        print(f"[chart_losses] {warning}", file=sys.stderr)
    weights = weights_fingerprint(ckpt["model"]) if c.metrics else None
    model = None  # built only if a point of this checkpoint has to be evaluated
    line = []
    for split, loader in c.loaders.items():
        if epoch not in c.charted[split]:
            continue
        point = {"epoch": epoch, "step": ckpt.get("step"), "checkpoint": path.name}
        n = loader.manifest.split(split).num_samples
        row = weights and measured_row(c.metrics, split, epoch, ckpt, weights, c.manifest.dataset_id, n)
        if row:
            res = {"loss": row["loss"], "acc": row["acc"], "n": row["n"]}
            point.update(res, source="metrics.jsonl", dtype=row.get("eval_dtype"))
            COUNTS["reused"] += 1
            c.reused[split] += 1
            how = "reused"
        else:
            if model is None:
                model, _ = build_model_from_checkpoint(ckpt, c.device)
            t0 = time.perf_counter()
            res = summarise(run_split(model, loader, c.device, c.amp_dtype))
            secs = time.perf_counter() - t0
            point.update(res, source="evaluated", dtype=dtype_name(c.amp_dtype), seconds=round(secs, 3))
            COUNTS["evaluated"] += 1
            c.evaluated[split] += 1
            c.seconds[split] += secs
            how = f"evaluated {secs:.1f} s"
        losses["splits"][split].append(point)
        line.append(f"{split} loss {res['loss']:.4f} acc {100 * res['acc']:.2f}% ({how})")
    print(f"[chart_losses] epoch {epoch}: " + "  ".join(line))


def report(c: Chart) -> None:
    """Per split: how many points were reused and how many evaluated (and how long that took)."""
    for split in c.args.splits:
        took = f" in {c.seconds[split]:.1f} s" if c.evaluated[split] else ""
        print(
            f"[chart_losses] {split}: {c.reused[split]} point(s) reused from metrics.jsonl (measured by "
            f"training, same weights and dataset), {c.evaluated[split]} evaluated{took}"
        )
    if "test" in c.args.splits and c.args.test_epochs == "last" and len(c.ckpts) > 1:
        print(
            f"[chart_losses] test: last epoch only (training tests once, at the end); --test-epochs all "
            f"evaluates the other {len(c.ckpts) - 1} epoch checkpoints on the test split"
        )


def run(args) -> int:
    """The command: chart every epoch checkpoint, then write losses.json and losses.png."""
    run_dir = Path(args.run)
    COUNTS.update(checkpoints=0, reused=0, evaluated=0)
    c = open_chart(args)
    shards = args.shards or c.first.get("shards")
    losses: dict = {"run": str(run_dir), "shards": str(shards), "splits": {s: [] for s in args.splits}}
    for epoch, path in c.ckpts:
        if any(epoch in c.charted[s] for s in args.splits):
            chart_checkpoint(c, epoch, path, losses)
    report(c)
    losses["reuse"] = {"reused": COUNTS["reused"], "evaluated": COUNTS["evaluated"]}
    losses["test_epochs"] = args.test_epochs
    metrics = read_metrics(run_dir)
    losses["train"] = [
        {k: r.get(k) for k in ("epoch", "step", "loss", "acc", "lr")}
        for r in metrics
        if r.get("kind") == "train"
    ]
    (run_dir / "losses.json").write_text(json.dumps(losses, indent=1) + "\n")
    chart(losses, metrics, run_dir / "losses.png")
    print(f"[chart_losses] written {run_dir / 'losses.json'} and {run_dir / 'losses.png'}")
    return 0


def main(argv=None) -> int:
    from spkr.run.cli import cli_main

    return cli_main("chart_losses", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

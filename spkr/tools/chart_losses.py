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
shards, ``--no-reuse``) is evaluated here, in fp32; each point in losses.json says which
(``"source": "metrics.jsonl" | "evaluated"``) and its autocast dtype.

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
from pathlib import Path

EPOCH_RE = re.compile(r"ckpt-epoch(\d+)\.pt$")
COUNTS = {"checkpoints": 0, "reused": 0, "evaluated": 0}  # of the last main() call: loads, points


def epoch_checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in run.glob("ckpt-epoch*.pt") if (m := EPOCH_RE.search(p.name))]
    return sorted(found)


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
    return rows


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


def main(argv=None) -> int:
    from spkr import storage
    from spkr.checkpoint import (
        CheckpointError,
        build_model_from_checkpoint,
        check_dataset,
        describe_backend,
        resolve_device,
        weights_fingerprint,
    )
    from spkr.checkpoint import load as load_ckpt
    from spkr.config import add_storage_options
    from spkr.evaluate import run_split, summarise
    from spkr.manifest import ManifestError
    from spkr.stream.loader import SpeakerLoader

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
    add_storage_options(p)
    p.add_argument(
        "--allow-other-dataset",
        action="store_true",
        help="evaluate on shards that are not the run's training dataset (warns; default: refuse)",
    )
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        device = resolve_device(args.device)
        ckpts = epoch_checkpoints(run)
        if not ckpts:
            raise ValueError(f"{run}: no per-epoch checkpoints (ckpt-epochNNN.pt)")
        opts = storage.storage_options_from_env(args.storage_options)
        first = load_ckpt(ckpts[0][1])
        shards = args.shards or first.get("shards")
        if not shards:
            raise ValueError("no --shards and the checkpoint does not name its shards")
        print(f"[chart_losses] {describe_backend(first, device)}")
        loaders = {}
        for split in args.splits:  # normalised with the run's training statistics (the checkpoint's)
            loaders[split] = SpeakerLoader(
                shards, split, args.batch_size, train=False, rank=0, world_size=1,
                num_workers=args.num_workers, storage_options=opts, stats=first["stats"],
                dtype="float16",  # as training's and evaluate's loaders: the same batches they measured
            )  # fmt: skip
        losses: dict = {"run": str(run), "shards": str(shards), "splits": {s: [] for s in args.splits}}
        last_epoch = ckpts[-1][0]
        charted = {  # the epochs each split is charted for: test only at the end unless --test-epochs all
            s: {e for e, _ in ckpts if s != "test" or args.test_epochs == "all" or e == last_epoch}
            for s in args.splits
        }
        metrics = [] if args.no_reuse else read_metrics(run)
        n_samples = {s: ld.manifest.split(s).num_samples for s, ld in loaders.items()}
        manifest = loaders[args.splits[0]].manifest
        COUNTS.update(checkpoints=0, reused=0, evaluated=0)
        reused = {s: 0 for s in args.splits}
        evaluated = {s: 0 for s in args.splits}
        eval_seconds = {s: 0.0 for s in args.splits}
        for epoch, path in ckpts:
            if not any(epoch in charted[s] for s in args.splits):
                continue
            ckpt = load_ckpt(path)
            COUNTS["checkpoints"] += 1
            if ckpt["stats"] != first["stats"]:
                raise ValueError(f"{path}: other feature statistics than {ckpts[0][1].name}: not one run")
            warning = check_dataset(ckpt, manifest, str(path), allow_other_dataset=args.allow_other_dataset)
            if warning and epoch == ckpts[0][0]:
                print(f"[chart_losses] {warning}", file=sys.stderr)
            weights = weights_fingerprint(ckpt["model"]) if metrics else None
            model = None  # built only if a point of this checkpoint has to be evaluated
            line = []
            for split, loader in loaders.items():
                if epoch not in charted[split]:
                    continue
                point = {"epoch": epoch, "step": ckpt.get("step"), "checkpoint": path.name}
                row = weights and measured_row(
                    metrics, split, epoch, ckpt, weights, manifest.dataset_id, n_samples[split]
                )
                if row:
                    res = {"loss": row["loss"], "acc": row["acc"], "n": row["n"]}
                    point.update(res, source="metrics.jsonl", dtype=row.get("eval_dtype"))
                    COUNTS["reused"] += 1
                    reused[split] += 1
                    how = "reused"
                else:
                    if model is None:
                        model, _ = build_model_from_checkpoint(ckpt, device)
                    t0 = time.perf_counter()
                    res = summarise(run_split(model, loader, device))
                    secs = time.perf_counter() - t0
                    point.update(res, source="evaluated", dtype="float32", seconds=round(secs, 3))
                    COUNTS["evaluated"] += 1
                    evaluated[split] += 1
                    eval_seconds[split] += secs
                    how = f"evaluated {secs:.1f} s"
                losses["splits"][split].append(point)
                line.append(f"{split} loss {res['loss']:.4f} acc {100 * res['acc']:.2f}% ({how})")
            print(f"[chart_losses] epoch {epoch}: " + "  ".join(line))
    except (CheckpointError, ManifestError, ValueError, FileNotFoundError) as e:
        print(f"[chart_losses] error: {e}", file=sys.stderr)
        return 2
    for split in args.splits:
        took = f" in {eval_seconds[split]:.1f} s" if evaluated[split] else ""
        print(
            f"[chart_losses] {split}: {reused[split]} point(s) reused from metrics.jsonl (measured by "
            f"training, same weights and dataset), {evaluated[split]} evaluated{took}"
        )
    if "test" in args.splits and args.test_epochs == "last" and len(ckpts) > 1:
        print(
            f"[chart_losses] test: last epoch only (training tests once, at the end); --test-epochs all "
            f"evaluates the other {len(ckpts) - 1} epoch checkpoints on the test split"
        )
    losses["reuse"] = {"reused": COUNTS["reused"], "evaluated": COUNTS["evaluated"]}
    losses["test_epochs"] = args.test_epochs
    metrics = read_metrics(run)
    losses["train"] = [
        {k: r.get(k) for k in ("epoch", "step", "loss", "acc", "lr")}
        for r in metrics
        if r.get("kind") == "train"
    ]
    (run / "losses.json").write_text(json.dumps(losses, indent=1) + "\n")
    chart(losses, metrics, run / "losses.png")
    print(f"[chart_losses] written {run / 'losses.json'} and {run / 'losses.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m spkr.tools.chart_losses --run DIR — per-epoch loss/accuracy of a run's checkpoints.

    python -m spkr.tools.chart_losses --run runs/demo [--shards shards/demo] [--splits valid test]

Runs every per-epoch checkpoint (``<run>/ckpt-epochNNN.pt``) over the chosen splits (default shards:
the ones the run trained on) and records loss and top-1 accuracy per epoch in ``<run>/losses.json``;
``<run>/losses.png`` shows those curves next to the training curves from ``<run>/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

EPOCH_RE = re.compile(r"ckpt-epoch(\d+)\.pt$")


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


def chart(losses: dict, metrics: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_l, ax_a, ax_t = axes
    for split, rows in losses["splits"].items():
        ep = [r["epoch"] for r in rows]
        ax_l.plot(ep, [r["loss"] for r in rows], marker="o", label=split)
        ax_a.plot(ep, [100 * r["acc"] for r in rows], marker="o", label=split)
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
    from spkr.checkpoint import CheckpointError, build_model_from_checkpoint, check_dataset
    from spkr.checkpoint import load as load_ckpt
    from spkr.config import add_storage_options
    from spkr.evaluate import run_split, summarise
    from spkr.manifest import ManifestError
    from spkr.stream.loader import SpeakerLoader

    p = argparse.ArgumentParser(prog="python -m spkr.tools.chart_losses", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory (with ckpt-epochNNN.pt files)")
    p.add_argument("--shards", default=None, help="shards directory or URL (default: the run's)")
    p.add_argument("--splits", nargs="+", default=["valid", "test"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    add_storage_options(p)
    p.add_argument(
        "--allow-other-dataset",
        action="store_true",
        help="evaluate on shards that are not the run's training dataset (warns; default: refuse)",
    )
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        ckpts = epoch_checkpoints(run)
        if not ckpts:
            raise ValueError(f"{run}: no per-epoch checkpoints (ckpt-epochNNN.pt)")
        opts = storage.storage_options_from_env(args.storage_options)
        first = load_ckpt(ckpts[0][1])
        shards = args.shards or first.get("shards")
        if not shards:
            raise ValueError("no --shards and the checkpoint does not name its shards")
        loaders = {}
        for split in args.splits:  # normalised with the run's training statistics (the checkpoint's)
            loaders[split] = SpeakerLoader(
                shards, split, args.batch_size, train=False, rank=0, world_size=1,
                num_workers=args.num_workers, storage_options=opts, stats=first["stats"],
            )  # fmt: skip
        losses: dict = {"run": str(run), "shards": str(shards), "splits": {s: [] for s in args.splits}}
        for epoch, path in ckpts:
            ckpt = load_ckpt(path)
            if ckpt["stats"] != first["stats"]:
                raise ValueError(f"{path}: other feature statistics than {ckpts[0][1].name}: not one run")
            manifest = loaders[args.splits[0]].manifest
            warning = check_dataset(ckpt, manifest, str(path), allow_other_dataset=args.allow_other_dataset)
            if warning and epoch == ckpts[0][0]:
                print(f"[chart_losses] {warning}", file=sys.stderr)
            model, _ = build_model_from_checkpoint(ckpt)
            line = []
            for split, loader in loaders.items():
                res = summarise(run_split(model, loader, torch.device("cpu")))
                losses["splits"][split].append(
                    {"epoch": epoch, "step": ckpt.get("step"), "checkpoint": path.name, **res}
                )
                line.append(f"{split} loss {res['loss']:.4f} acc {100 * res['acc']:.2f}%")
            print(f"[chart_losses] epoch {epoch}: " + "  ".join(line))
    except (CheckpointError, ManifestError, ValueError, FileNotFoundError) as e:
        print(f"[chart_losses] error: {e}", file=sys.stderr)
        return 2
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

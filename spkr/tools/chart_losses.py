"""python -m spkr.tools.chart_losses --run DIR — per-epoch loss/accuracy/EER of a run's checkpoints.

    python -m spkr.tools.chart_losses --run runs/demo [--shards shards/demo] [--splits valid test]

The figures of every per-epoch checkpoint (``<run>/ckpt-epochNNN.pt``) on the chosen splits (default
shards: the ones the run trained on) go to ``<run>/losses.json``; ``<run>/losses.png`` shows those
curves next to the training curves from ``<run>/metrics.jsonl``. What a split gets depends on its
kind in the manifest (docs/protocols.md): a classification split loss and top-1 accuracy, a
verification split (protocol ``open``) EER and minDCF (p_target 0.01, 0.05) on its trial list
(:func:`spkr.run.evaluation.verify_split`, cosine scores of every utterance's embedding).

``--splits`` defaults to every split of the manifest except the one of role train, in manifest order:
``valid test`` (closed, closed-session) or ``valid valid-verify test-verify`` (open). A split the
manifest does not have is an error naming the manifest and the splits it has.

A point training already measured is reused from ``<run>/metrics.jsonl`` instead of re-evaluated: the
``valid`` row of each epoch (loss/accuracy; on open, also the EER of the role-valid verification
split), and the final ``test`` row. A row is reused for a checkpoint only when it proves it measured
that very checkpoint on the very dataset being charted: the same weights (the ``weights`` fingerprint
training records with each evaluation row against :func:`spkr.checkpoint.weights_fingerprint` of the
checkpoint's state dict), the same step and epoch, the same ``dataset_id`` (the checkpoint's, which is
also the charted shards'), and every sample of the split (``n``; for a verification split: its split
name and every trial of its list). Anything else (epochs training did not validate, rows without a
weights fingerprint, other shards, ``--no-reuse``) is evaluated here by
:func:`spkr.run.evaluation.evaluate_split` on :func:`spkr.run.evaluation.eval_loader`'s batches (as
training and spkr.evaluate) under ``--dtype`` (default auto: training's precision policy,
:func:`spkr.run.distributed.resolve_dtype`, logged); each point in losses.json says which
(``"source": "metrics.jsonl" | "evaluated"``) and its autocast dtype, and ``reuse`` counts both.
Errors: one line, exit status 2.

Training evaluates the split of role test (``test``, ``test-verify``) only once, at the end, so by
default it is charted for the last epoch's checkpoint only; ``--test-epochs all`` evaluates it for
every epoch checkpoint (one pass over the split per checkpoint).
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


def measured_verification_row(
    rows: list[dict], split: str, role: str | None, epoch: int, ckpt: dict, weights: str, dataset_id: str,
    trials: int,
) -> dict | None:  # fmt: skip
    """The ``verification`` entry of the last metrics.jsonl row that scored verification split
    ``split``'s whole trial list (``trials`` trials) with exactly this checkpoint, else None: a row of
    kind ``role`` (training's ``valid`` rows score the role-valid verification split, its ``test`` row
    the role-test one) with the checkpoint's weights, step, epoch and dataset_id (as
    :func:`measured_row`), and a verification entry of ``split`` with an EER and every trial."""
    for r in reversed(rows):
        v = r.get("verification") or {}
        if (
            r.get("kind") == role
            and r.get("weights") == weights
            and r.get("step") == ckpt.get("step")
            and r.get("epoch") in (epoch, ckpt.get("epoch"))
            and r.get("dataset_id") == ckpt.get("dataset_id") == dataset_id
            and v.get("split") == split
            and v.get("trials") == trials
            and all(isinstance(v.get(k), (int, float)) for k in VERIFICATION_FIGURES)
        ):
            return {**v, "eval_dtype": r.get("eval_dtype")}
    return None


VERIFICATION_FIGURES = ("eer", "min_dcf_0.01", "min_dcf_0.05")


def default_splits(manifest) -> list[str]:
    """Every split of the manifest but the one of role train (manifest order): ``valid``, ``test``;
    on an ``open`` shard set ``valid``, ``valid-verify``, ``test-verify``
    (:func:`spkr.run.evaluation.eval_splits`)."""
    from spkr.run.evaluation import eval_splits

    return eval_splits(manifest).every


def check_splits(manifest, splits: list[str]) -> None:
    """ValueError naming the manifest, the splits it has and the default when a split is not one of them."""
    unknown = [s for s in splits if s not in manifest.split_names]
    if unknown:
        have = ", ".join(f"{s} ({manifest.split_kind(s)})" for s in manifest.split_names)
        raise ValueError(
            f"--splits {' '.join(unknown)}: no such split in {manifest.url} (protocol "
            f"{manifest.protocol_name}; its splits: {have}; default --splits {' '.join(default_splits(manifest))})"
        )


def chart(losses: dict, metrics: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = losses.get("kinds", {})
    verify = [s for s in losses["splits"] if kinds.get(s) == "verification"]
    fig, axes = plt.subplots(1, 4 if verify else 3, figsize=(21 if verify else 16, 4.5))
    ax_l, ax_a, ax_t = axes[:3]
    for split, rows in losses["splits"].items():
        ep = [r["epoch"] for r in rows]
        last_only = split in losses.get("last_epoch_only", []) and losses.get("test_epochs") == "last"
        label = f"{split} (last epoch only)" if last_only else split
        if split in verify:
            axes[3].plot(ep, [100 * r["eer"] for r in rows], marker="o", label=f"{label} EER")
            continue
        ax_l.plot(ep, [r["loss"] for r in rows], marker="o", label=label)
        ax_a.plot(ep, [100 * r["acc"] for r in rows], marker="o", label=label)
    ax_l.set(title="loss per epoch (checkpoints)", xlabel="epoch", ylabel="cross-entropy")
    ax_a.set(title="top-1 accuracy per epoch (checkpoints)", xlabel="epoch", ylabel="%")
    if verify:
        axes[3].set(title="verification EER per epoch (trial lists)", xlabel="epoch", ylabel="EER %")
        axes[3].legend()
    train = [r for r in metrics if r.get("kind") == "train"]
    if train:
        ax_t.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (weighted CE)")
        ax2 = ax_t.twinx()
        ax2.plot([r["step"] for r in train], [100 * r["acc"] for r in train], color="tab:green", alpha=0.6)
        ax2.set_ylabel("train accuracy % (green)")
    ax_t.set(title="training curves (metrics.jsonl)", xlabel="optimizer step", ylabel="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in (ax_l, ax_a):
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    from spkr.config import add_storage_options
    from spkr.run.distributed import DTYPE_CHOICES

    p = argparse.ArgumentParser(prog="python -m spkr.tools.chart_losses", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory (with ckpt-epochNNN.pt files)")
    p.add_argument("--shards", default=None, help="shards directory or URL (default: the run's)")
    p.add_argument(
        "--splits",
        nargs="+",
        default=None,
        help="splits to chart (default: every split but the training one, as the manifest lists them: "
        "valid test, or valid valid-verify test-verify on an open shard set)",
    )
    p.add_argument(
        "--test-epochs",
        choices=("last", "all"),
        default="last",
        help="chart the split of role test for the last epoch's checkpoint only (training's final test "
        "row; default) or for every epoch checkpoint (one evaluation of that split each)",
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
    manifest: object  # spkr.shards.format.Manifest of the charted shards
    splits: list[str]  # --splits, or the manifest's default_splits
    storage_options: dict | None
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

    def last_only(self) -> list[str]:
        """The splits charted for the last epoch only (role test, unless ``--test-epochs all``)."""
        if self.args.test_epochs == "all":
            return []
        return [s for s in self.splits if self.manifest.split_role(s) == "test"]

    @classmethod
    def open(cls, args) -> Chart:
        """Checkpoints, shards, precision and loaders of the run (ValueError when there is nothing to chart)."""
        from spkr.checkpoint import describe_backend, resolve_device
        from spkr.checkpoint import load as load_ckpt
        from spkr.run.distributed import describe_dtype, resolve_dtype
        from spkr.run.evaluation import eval_loader
        from spkr.shards.format import Manifest

        run = Path(args.run)
        device = resolve_device(args.device)
        ckpts = epoch_checkpoints(run)
        if not ckpts:
            raise ValueError(f"{run}: no per-epoch checkpoints (ckpt-epochNNN.pt)")
        opts = args.storage_options
        first = load_ckpt(ckpts[0][1])
        shards = args.shards or first.get("shards")
        if not shards:
            raise ValueError("no --shards and the checkpoint does not name its shards")
        manifest = Manifest.load(shards, opts)
        splits = args.splits or default_splits(manifest)
        check_splits(manifest, splits)
        if not splits:
            raise ValueError(f"{manifest.url}: no split of role valid or test to chart; give --splits")
        amp_dtype, why = resolve_dtype(args.dtype, device)
        print(f"[chart_losses] {describe_backend(first, device)}, {describe_dtype(amp_dtype, why)}")
        print("[chart_losses] splits: " + ", ".join(f"{s} ({manifest.split_kind(s)})" for s in splits))
        loaders = {  # normalised with the run's training statistics (the checkpoint's)
            split: eval_loader(
                shards,
                split,
                args.batch_size,
                num_workers=args.num_workers,
                storage_options=opts,
                stats=first["stats"],
                manifest=manifest,
            )
            for split in splits
        }
        last_epoch = ckpts[-1][0]
        last_only = {s for s in splits if manifest.split_role(s) == "test" and args.test_epochs == "last"}
        charted = {  # the epochs each split is charted for: role test only at the end unless --test-epochs all
            s: {e for e, _ in ckpts if s not in last_only or e == last_epoch} for s in splits
        }
        metrics = [] if args.no_reuse else read_metrics(run)
        zero = {s: 0 for s in splits}
        return cls(args, manifest, splits, opts, ckpts, first, loaders, charted, metrics, device, amp_dtype,
                     dict(zero), dict(zero), {s: 0.0 for s in splits})  # fmt: skip

    def evaluate_point(self, model, loader) -> dict:
        """The figures of one split for a model (:func:`spkr.run.evaluation.evaluate_split`): loss/acc/n
        (classification), or EER, minDCF(0.01, 0.05), their thresholds and trial counts and n
        (verification: every utterance embedded once, the trial list scored)."""
        from spkr.run.evaluation import EvalOptions, evaluate_split, local_env

        opts = EvalOptions(self.amp_dtype, storage_options=self.storage_options)
        res = evaluate_split(model, loader, local_env(self.device), opts)
        return verification_point(res["verification"], res["n"]) if "verification" in res else res

    def chart_checkpoint(self, epoch: int, path: Path, losses: dict) -> None:
        """The points of one epoch checkpoint: reused from metrics.jsonl when proven, else evaluated."""
        from spkr.checkpoint import build_model_from_checkpoint, check_dataset, weights_fingerprint
        from spkr.checkpoint import load as load_ckpt
        from spkr.run.distributed import dtype_name

        ckpt = load_ckpt(path)
        if ckpt["stats"] != self.first["stats"]:
            raise ValueError(f"{path}: other feature statistics than {self.ckpts[0][1].name}: not one run")
        warning = check_dataset(
            ckpt, self.manifest, str(path), allow_other_dataset=self.args.allow_other_dataset
        )
        if warning and epoch == self.ckpts[0][0]:
            print(f"[chart_losses] {warning}", file=sys.stderr)
        weights = weights_fingerprint(ckpt["model"]) if self.metrics else None
        model = None  # built only if a point of this checkpoint has to be evaluated
        line = []
        for split, loader in self.loaders.items():
            if epoch not in self.charted[split]:
                continue
            point = {"epoch": epoch, "step": ckpt.get("step"), "checkpoint": path.name}
            n = loader.manifest.split(split).num_samples
            row = weights and self.measured(split, epoch, ckpt, weights, n)
            if row:
                res = (
                    {"loss": row["loss"], "acc": row["acc"], "n": row["n"]} if "loss" in row else row["point"]
                )
                point.update(res, source="metrics.jsonl", dtype=row.get("eval_dtype"))
                self.reused[split] += 1
                how = "reused"
            else:
                if model is None:
                    model, _ = build_model_from_checkpoint(ckpt, self.device)
                t0 = time.perf_counter()
                res = self.evaluate_point(model, loader)
                secs = time.perf_counter() - t0
                point.update(
                    res, source="evaluated", dtype=dtype_name(self.amp_dtype), seconds=round(secs, 3)
                )
                self.evaluated[split] += 1
                self.seconds[split] += secs
                how = f"evaluated {secs:.1f} s"
            losses["splits"][split].append(point)
            line.append(f"{point_text(split, res)} ({how})")
        print(f"[chart_losses] epoch {epoch}: " + "  ".join(line))

    def measured(self, split: str, epoch: int, ckpt: dict, weights: str, n: int) -> dict | None:
        """What training measured of ``split`` with this checkpoint (:func:`measured_row`, or for a
        verification split :func:`measured_verification_row` as ``{"point", "eval_dtype"}``), else None."""
        dataset_id = self.manifest.dataset_id
        if self.manifest.split_kind(split) != "verification":
            return measured_row(self.metrics, split, epoch, ckpt, weights, dataset_id, n)
        trials = self.manifest.data["protocol"]["splits"][split]["trials"]["count"]
        role = self.manifest.split_role(split)
        v = measured_verification_row(self.metrics, split, role, epoch, ckpt, weights, dataset_id, trials)
        return v and {"point": verification_point(v, n), "eval_dtype": v["eval_dtype"]}

    def report(self) -> None:
        """Per split: how many points were reused and how many evaluated (and how long that took)."""
        for split in self.splits:
            took = f" in {self.seconds[split]:.1f} s" if self.evaluated[split] else ""
            print(
                f"[chart_losses] {split}: {self.reused[split]} point(s) reused from metrics.jsonl (measured by "
                f"training, same weights and dataset), {self.evaluated[split]} evaluated{took}"
            )
        for split in self.last_only():
            if len(self.ckpts) > 1:
                print(
                    f"[chart_losses] {split}: last epoch only (training tests once, at the end); --test-epochs "
                    f"all evaluates the other {len(self.ckpts) - 1} epoch checkpoints on it"
                )


def verification_point(v: dict, n: int) -> dict:
    """The figures a chart point keeps of a verification result (:func:`spkr.run.evaluation.verify_split`)."""
    keep = (*VERIFICATION_FIGURES, "eer_threshold", "trials", "target_trials")
    return {**{k: v[k] for k in keep if k in v}, "n": n}


def point_text(split: str, res: dict) -> str:
    if "eer" in res:
        return f"{split} EER {100 * res['eer']:.2f}% minDCF(0.01) {res['min_dcf_0.01']:.4f}"
    return f"{split} loss {res['loss']:.4f} acc {100 * res['acc']:.2f}%"


def run(args) -> int:
    """The command: chart every epoch checkpoint, then write losses.json and losses.png."""
    run_dir = Path(args.run)
    c = Chart.open(args)
    shards = args.shards or c.first.get("shards")
    losses: dict = {"run": str(run_dir), "shards": str(shards), "splits": {s: [] for s in c.splits}}
    losses["kinds"] = {s: c.manifest.split_kind(s) for s in c.splits}
    losses["last_epoch_only"] = c.last_only()
    for epoch, path in c.ckpts:
        if any(epoch in c.charted[s] for s in c.splits):
            c.chart_checkpoint(epoch, path, losses)
    c.report()
    losses["reuse"] = {"reused": sum(c.reused.values()), "evaluated": sum(c.evaluated.values())}
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

"""What a run reports: ``<out>/metrics.jsonl`` rows and console lines (rank 0 only).

metrics.jsonl holds one JSON object per line, appended (a killed run leaves at most a torn last line):

    {"kind": "config", "time", "dataset_id", "shards", "world_size", "backend", "compile", "dtype",
     "dropped", "params", "steps_per_epoch", "total_steps", "resumed_step", "train": {...}, "model": {...}}
    {"kind": "train", "time", "epoch", "step", "loss", "acc", "lr", "steps_per_s", "samples_per_s",
     "data_wait"}                       # means over the steps since the previous train row
        + "phases": {"data_wait", "forward", "backward", "allreduce", "optimizer", "other"},
          "allreduce_inflight"          # seconds per optimizer step (spkr.run.phases; CPU runs)
        + "gpu_mem_peak_gib"            # CUDA runs: this rank's peak allocated GPU memory so far
    {"kind": "valid" | "test", "time", "epoch", "step", "loss", "acc", "n",
     "dataset_id", "weights", "eval_dtype"}   # + "verification" on the test row
    {"kind": "valid", ..., "verification": {"split": "valid-verify", "eer", "min_dcf_0.01",
     "min_dcf_0.05", ..., "identification", "thresholds"}}   # open protocol: the valid-role trials
    {"kind": "test", "time", "epoch", "step", "n", "verification": {"split": "test-verify", ...},
     "dataset_id", "weights", "eval_dtype"}   # open protocol: no loss/acc (unseen speakers)

``weights`` (:func:`spkr.checkpoint.weights_fingerprint`) proves which weights a row measured: the
checkpoint written right after holds the same, and ``chart_losses`` reuses a row only when they match.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spkr.checkpoint import weights_fingerprint
from spkr.run.distributed import dtype_name


class Logger:
    """metrics.jsonl + console lines (rank 0 only)."""

    def __init__(self, out: Path | None, enabled: bool, progress: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl" if out else None
        self.progress = None
        self.task = None
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True, highlight=False)
            if progress and self.console.is_terminal:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.progress = Progress(
                    TextColumn("[bold]epoch {task.fields[epoch]}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"),
                    TimeRemainingColumn(),
                    console=self.console,
                    transient=False,
                )
                self.progress.start()

    def log(self, msg: str) -> None:
        if self.enabled:
            self.console.print(f"[train] {msg}", markup=False, soft_wrap=True)

    def metrics(self, row: dict) -> None:
        if self.enabled and self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def start_epoch(self, epoch: int, total: int, done: int) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task("train", total=total, completed=done, epoch=epoch, stats="")

    def advance(self, n: int, stats: str | None = None) -> None:
        if self.progress is not None and self.task is not None:
            kw = {"stats": stats} if stats is not None else {}
            self.progress.update(self.task, advance=n, **kw)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@dataclass
class TrainWindow:
    """Running sums between two ``train`` rows: wall time, data wait, steps, samples, loss, correct."""

    world: int
    start: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    steps: int = 0
    samples: int = 0
    loss: float = 0.0
    correct: int = 0
    n: int = 0

    def add_batch(self, loss: float, correct: int, n: int, wait: float) -> None:
        """One micro-batch of this rank: its mean loss, correct predictions, size and data wait."""
        self.loss += loss * n
        self.correct += correct
        self.n += n
        self.samples += n * self.world
        self.wait += wait

    def row(self, epoch: int, step: int, lr: float, phases: tuple[dict, float] | None = None) -> dict:
        """The ``train`` row of metrics.jsonl for the steps since the window started (+ ``phases``
        and ``allreduce_inflight`` given :meth:`spkr.run.phases.PhaseClock.take`'s result)."""
        dt = time.perf_counter() - self.start
        extra = {"phases": phases[0], "allreduce_inflight": phases[1]} if phases is not None else {}
        if torch.cuda.is_initialized():
            extra["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return {
            "kind": "train",
            "time": time.time(),
            "epoch": epoch,
            "step": step,
            "loss": self.loss / max(self.n, 1),
            "acc": self.correct / max(self.n, 1),
            "lr": lr,
            "steps_per_s": self.steps / dt,
            "samples_per_s": self.samples / dt,
            "data_wait": self.wait / dt,
            **extra,
        }


def train_line(row: dict) -> str:
    """The console summary of a ``train`` row."""
    return (
        f"loss {row['loss']:.3f} acc {100 * row['acc']:.1f}% lr {row['lr']:.2e} "
        f"{row['steps_per_s']:.2f} steps/s {row['samples_per_s']:.0f} samples/s "
        f"data-wait {100 * row['data_wait']:.0f}%"
    )


def eval_row(kind: str, epoch: int, step: int, res: dict, model=None, manifest=None, amp_dtype=None) -> dict:
    """A ``valid``/``test`` row; with ``model`` (rank 0) also what it measured: the dataset, the exact
    weights and the autocast dtype."""
    row = {"kind": kind, "time": time.time(), "epoch": epoch, "step": step, **res}
    if model is not None:
        row["dataset_id"] = manifest.dataset_id
        row["weights"] = weights_fingerprint(model.state_dict())
        row["eval_dtype"] = dtype_name(amp_dtype)
    return row


def eval_line(kind: str, res: dict, digits: int = 4) -> str:
    """``valid: loss 1.2345 acc 67.89% (200 samples)`` (+ EER/minDCF when the result has them; a
    verification split's result has no loss: ``test-verify: 50 utterances  EER ...``)."""
    if "loss" in res:
        line = f"{kind}: loss {res['loss']:.{digits}f} acc {100 * res['acc']:.2f}% ({res['n']} samples)"
    else:
        line = f"{kind}: {res['n']} utterances"
    v = res.get("verification")
    if v is not None:
        line += verification_text(v) if "eer" in v else f" ({v['error']})"
    return line


def verification_text(v: dict) -> str:
    """``  EER 1.23%  minDCF(0.01) 0.1234  minDCF(0.05) 0.0567`` of a verification result, with its
    AS-norm'ed EER/minDCF and identification accuracy when it has them."""
    text = f"  EER {100 * v['eer']:.2f}%  minDCF(0.01) {v['min_dcf_0.01']:.4f}  minDCF(0.05) {v['min_dcf_0.05']:.4f}"
    if "as_norm" in v:
        n = v["as_norm"]
        text += f"  AS-norm: EER {100 * n['eer']:.2f}% minDCF(0.01) {n['min_dcf_0.01']:.4f}"
    ident = v.get("identification")
    if ident and ident.get("acc") is not None:
        text += f"  identification {100 * ident['acc']:.2f}% ({ident['n']} utterances)"
    return text


def read_metrics(run: Path) -> list[dict]:
    """The rows of ``<run>/metrics.jsonl`` ([] without one); a torn last line is skipped."""
    path = Path(run) / "metrics.jsonl"
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

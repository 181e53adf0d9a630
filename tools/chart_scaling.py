#!/usr/bin/env python3
"""The scaling curve of ``tools/bench_quality.py --train-speakers``: figures against training speakers.

    python tools/chart_scaling.py runs.json [more.json ...] --out docs/scaling.png [--md table.md] \
        [--label 'tiny@epochs=8@noise=0.5=tiny + noise' ...]

Left: open-protocol test EER (unseen speakers) per model; right: closed-session test accuracy (new
sessions of the training speakers). A point is a model's mean over its seeds at that size (the
vertical bar spans the seeds' min..max) or its single run. Rows from several JSON files are pooled;
the same (size, protocol, model, seed) twice must agree (one measurement, not two), else it exits; with
the same figures on the same data it is pooled once, also when another source hash reproduced it (e.g.
the baseline re-measured after a change elsewhere in spkr). A model's ``[last]`` rows (its last epoch
beside the selected one) are drawn dashed in the model's colour (``--no-last`` leaves them out);
``--label MODEL=NAME`` names a model in the legend and the table (the split is at the last ``=``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

PANELS = (
    ("open", "eer", "test EER, unseen speakers (%)"),
    ("closed-session", "acc", "test accuracy, new sessions (%)"),
)


def load_rows(paths: list[Path]) -> list[dict]:
    """Single-run rows (no seed means: they are recomputed here) with ``train_speakers``, deduplicated
    (the first of a measurement and its reproductions is kept)."""
    seen: dict[tuple, dict] = {}
    for path in paths:
        for r in json.loads(path.read_text()):
            if r.get("train_speakers") is None or r.get("seed") == "mean":
                continue
            key = (
                r["corpus"],
                r["train_speakers"],
                r["protocol"],
                r["model"],
                r.get("seed"),
                r["augment_copies"],
            )
            old = seen.setdefault(key, r)
            if old is not r and any(old.get(f) != r.get(f) for f in ("eer", "acc", "dataset_id")):
                sys.exit(f"chart_scaling: {key} measured twice with different results ({path})")
    return list(seen.values())


def curves(
    rows: list[dict], protocol: str, figure: str
) -> dict[str, list[tuple[int, float, float, float, int]]]:
    """{model: [(speakers, mean, min, max, runs)]} of ``figure`` (x100) for ``protocol``, by size."""
    runs = defaultdict(list)
    for r in rows:
        if r["protocol"] == protocol and figure in r:
            runs[r["model"], r["train_speakers"]].append(100 * r[figure])
    out = defaultdict(list)
    for (model, n), vals in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out[model].append((n, sum(vals) / len(vals), min(vals), max(vals), len(vals)))
    return dict(out)


LAST = "[last]"


def parse_labels(items: list[str]) -> dict[str, str]:
    """``["tiny@epochs=8=tiny, 8 epochs"]`` -> ``{"tiny@epochs=8": "tiny, 8 epochs"}``."""
    labels = {}
    for item in items:
        model, sep, name = item.rpartition("=")
        if not sep or not model or not name:
            sys.exit(f"chart_scaling: --label {item!r} is not MODEL=NAME")
        labels[model] = name
    return labels


def label_of(model: str, labels: dict[str, str]) -> str:
    """The legend name of ``model``; a ``[last]`` row is named after its model."""
    base = model.removesuffix(LAST)
    name = labels.get(base, base)
    return f"{name} (last epoch)" if model.endswith(LAST) else name


def table(rows: list[dict], labels: dict[str, str] | None = None) -> str:
    lines = [
        "| training speakers | model | open test EER (runs) | closed-session test acc (runs) |",
        "|---|---|---|---|",
    ]
    cells = {p: curves(rows, p, f) for p, f, _ in PANELS}
    keys = sorted({(n, m) for c in cells.values() for m, pts in c.items() for n, *_ in pts})
    for n, m in keys:
        out = []
        for p, _, _ in PANELS:
            pt = next((x for x in cells[p].get(m, []) if x[0] == n), None)
            if pt is None:
                out.append("")
            elif pt[4] > 1:
                out.append(f"{pt[1]:.2f} % ({pt[2]:.2f}-{pt[3]:.2f}, {pt[4]} seeds)")
            else:
                out.append(f"{pt[1]:.2f} %")
        lines.append(f"| {n} | {label_of(m, labels or {})} | {out[0]} | {out[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, nargs="+", help="bench_quality.py --json files")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--md", type=Path, default=None, help="also write the table as markdown")
    ap.add_argument(
        "--label", action="append", default=[], help="MODEL=NAME: the model's name in legend and table"
    )
    ap.add_argument("--no-last", action="store_true", help="leave out the models' [last] rows")
    args = ap.parse_args(argv)
    labels = parse_labels(args.label)
    rows = load_rows(args.json)
    if args.no_last:
        rows = [r for r in rows if not r["model"].endswith(LAST)]
    if not rows:
        sys.exit("chart_scaling: no rows with train_speakers (run bench_quality.py --train-speakers ...)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    bases = sorted({r["model"].removesuffix(LAST) for r in rows})
    color = {m: f"C{i}" for i, m in enumerate(bases)}  # a model and its [last] rows alike, in both panels
    sizes = sorted({r["train_speakers"] for r in rows})
    for ax, (protocol, figure, label) in zip(axes, PANELS, strict=True):
        for model, pts in curves(rows, protocol, figure).items():
            xs, mean, lo, hi = ([p[i] for p in pts] for i in range(4))
            yerr = [
                [m - a for m, a in zip(mean, lo, strict=True)],
                [b - m for m, b in zip(mean, hi, strict=True)],
            ]
            last = model.endswith(LAST)
            ax.errorbar(xs, mean, yerr=yerr, marker="o", capsize=3, label=label_of(model, labels),
                        color=color[model.removesuffix(LAST)], linestyle="--" if last else "-",
                        alpha=0.6 if last else 1.0)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training speakers")
        ax.set_ylabel(label)
        ax.set_title(protocol)
        ax.grid(True, which="both", alpha=0.3)
    handles = {}  # one legend for both panels, below them
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize="small")
    legend_rows = (len(handles) + 2) // 3
    fig.tight_layout(rect=(0, 0.02 + 0.045 * legend_rows, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    md = table(rows, labels)
    print(md, end="")
    if args.md:
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The scaling curve of ``tools/bench_quality.py --train-speakers``: figures against training speakers.

    python tools/chart_scaling.py runs.json [more.json ...] --out docs/scaling.png [--md table.md]

Left: open-protocol test EER (unseen speakers) per model; right: closed-session test accuracy (new
sessions of the training speakers). A point is a model's mean over its seeds at that size (the
vertical bar spans the seeds' min..max) or its single run. Rows from several JSON files are pooled;
the same (size, protocol, model, seed) twice must agree (one measurement, not two), else it exits; with
the same figures on the same data it is pooled once, also when another source hash reproduced it (e.g.
the baseline re-measured after a change elsewhere in spkr).
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


def table(rows: list[dict]) -> str:
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
        lines.append(f"| {n} | {m} | {out[0]} | {out[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, nargs="+", help="bench_quality.py --json files")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--md", type=Path, default=None, help="also write the table as markdown")
    args = ap.parse_args(argv)
    rows = load_rows(args.json)
    if not rows:
        sys.exit("chart_scaling: no rows with train_speakers (run bench_quality.py --train-speakers ...)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    color = {m: f"C{i}" for i, m in enumerate(sorted({r["model"] for r in rows}))}  # same in both panels
    sizes = sorted({r["train_speakers"] for r in rows})
    for ax, (protocol, figure, label) in zip(axes, PANELS, strict=True):
        for model, pts in curves(rows, protocol, figure).items():
            xs, mean, lo, hi = ([p[i] for p in pts] for i in range(4))
            yerr = [
                [m - a for m, a in zip(mean, lo, strict=True)],
                [b - m for m, b in zip(mean, hi, strict=True)],
            ]
            ax.errorbar(xs, mean, yerr=yerr, marker="o", capsize=3, label=model, color=color[model])
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training speakers")
        ax.set_ylabel(label)
        ax.set_title(protocol)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    md = table(rows)
    print(md, end="")
    if args.md:
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m spkr.tools.chart_dataset --shards DIR — the original chart_dataset.py, from the manifest.

Reads only ``manifest.json`` (never audio, never the shards): min/max of the log-mel values, per-bin
mean/std, the speaker (label) distribution per split and the duration histogram, and the evaluation
protocol (docs/protocols.md: name, each split's kind/role/speakers, closed-session hold-out statistics,
trial counts) and augmentation (copies per training utterance). Writes
``<out>/dataset.png`` and ``<out>/dataset.json`` (default out: the shards directory when local, else
the current directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from spkr import storage
from spkr.run.cli import cli_main
from spkr.shards.format import Manifest


def dataset_summary(manifest: Manifest) -> dict:
    """Everything the chart shows, as plain numbers."""
    cfg = manifest.feature_config
    seconds_per_frame = cfg.hop_length / cfg.sample_rate
    n_classes = len(manifest.labels)
    splits = {}
    for name in manifest.split_names:
        split = manifest.split(name)
        frames = split.frames_array()
        counts = np.bincount(split.labels_array(), minlength=len(manifest.split_speakers(name)))
        seconds = frames * seconds_per_frame
        splits[name] = {
            "kind": manifest.split_kind(name),
            "role": manifest.split_role(name),
            "label_space": len(manifest.split_speakers(name)),
            "num_samples": int(split.num_samples),
            "num_shards": len(split.shards),
            "hours": float(seconds.sum() / 3600),
            "duration_seconds": {
                "min": float(seconds.min()) if len(seconds) else 0.0,
                "mean": float(seconds.mean()) if len(seconds) else 0.0,
                "max": float(seconds.max()) if len(seconds) else 0.0,
            },
            "speakers_present": int((counts > 0).sum()),
            "utterances_per_speaker": {"min": int(counts.min()), "max": int(counts.max())},
            "label_counts": counts.tolist(),
        }
    stats = manifest.stats
    return {
        "manifest": manifest.url,
        "dataset_id": manifest.dataset_id,
        "identity": manifest.data.get("identity", {}),
        "num_classes": n_classes,
        "mel_min": stats["min"],
        "mel_max": stats["max"],
        "mel_mean": stats["mean"],
        "mel_std": stats["std"],
        "feature_config": manifest.feature_config.to_dict(),
        "skipped": len(manifest.data.get("skipped", [])),
        "protocol": protocol_summary(manifest),
        "augment": augment_summary(manifest),
        "splits": splits,
    }


def protocol_summary(manifest: Manifest) -> dict:
    """The protocol's name, options and statistics (closed-session: held-out chapters, single-chapter
    speakers), and per verification split its trial counts and enrollment statistics."""
    entry = manifest.data.get("protocol") or {}
    summary = {
        "name": manifest.protocol_name,
        "params": entry.get("params", {}),
        "stats": entry.get("stats", {}),
    }
    for name, sp in (entry.get("splits") or {}).items():
        if sp.get("kind") == "verification":
            trials = {k: sp["trials"][k] for k in ("count", "target", "nontarget")}
            summary.setdefault("verification", {})[name] = {**trials, "stats": sp.get("stats", {})}
    return summary


def augment_summary(manifest: Manifest) -> dict | None:
    entry = manifest.data.get("augment")
    if entry is None:
        return None
    kinds = entry.get("identity", {}).get("kinds")
    return {"split": entry.get("split"), "copies": entry["copies"], "count": entry["count"], "kinds": kinds}


def describe(summary: dict) -> list[str]:
    """Human-readable lines: the protocol, each split's kind/role/speakers, augmentation."""
    p = summary["protocol"]
    lines = [f"protocol {p['name']}" + (f" {p['params']}" if p["params"] else "")]
    held = p["stats"].get("held_out")
    if held:
        single = p["stats"]["single_chapter"]
        lines.append(
            f"  held out {sum(held.values())}/{sum(p['stats']['requested'].values())} utterances in whole "
            f"chapters {held}; {single['count']} single-chapter speakers {single.get('treatment', 'train-only')}"
        )
    for name, sp in summary["splits"].items():
        trials = (p.get("verification") or {}).get(name)
        lines.append(
            f"  {name}: {sp['kind']}, role {sp['role']}, {sp['num_samples']} samples, "
            f"{sp['speakers_present']}/{sp['label_space']} speakers"
            + (f", {trials['count']} trials ({trials['target']} target)" if trials else "")
        )
    if summary["augment"]:
        a = summary["augment"]
        lines.append(
            f"augment: {a['copies']} copies per {a['split']} utterance ({a['count']} copies; {a['kinds']})"
        )
    return lines


def plot(manifest: Manifest, summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = manifest.feature_config
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    for name in manifest.split_names:
        ax.plot(summary["splits"][name]["label_counts"], ".", label=name, markersize=3)
    ax.set(title="utterances per speaker (label)", xlabel="label (class id; verification: split speaker)")
    ax.set_ylabel("utterances")
    ax.legend()
    ax = axes[0, 1]
    for name in manifest.split_names:
        seconds = manifest.split(name).frames_array() * cfg.hop_length / cfg.sample_rate
        ax.hist(seconds, bins=40, alpha=0.6, label=name)
    ax.set(title="duration histogram", xlabel="seconds", ylabel="utterances")
    ax.legend()
    ax = axes[1, 0]
    mean, std = np.asarray(summary["mel_mean"]), np.asarray(summary["mel_std"])
    ax.plot(mean, label="mean")
    ax.fill_between(np.arange(len(mean)), mean - std, mean + std, alpha=0.3, label="±1 std")
    ax.axhline(summary["mel_min"], color="k", ls=":", label=f"min {summary['mel_min']:.1f} dB")
    ax.axhline(summary["mel_max"], color="r", ls=":", label=f"max {summary['mel_max']:.1f} dB")
    ax.set(title="log-mel values per bin (train)", xlabel="mel bin", ylabel="dB")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    names = manifest.split_names
    ax.bar(names, [summary["splits"][n]["hours"] for n in names])
    title = f"hours per split ({summary['num_classes']} classes, protocol {summary['protocol']['name']})"
    ax.set(title=title, ylabel="hours")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m spkr.tools.chart_dataset", description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, help="shards directory or URL (reads manifest.json only)")
    p.add_argument("--out", default=None, help="where to write dataset.png/json")
    return cli_main("chart_dataset", run, p.parse_args(argv))


def run(args) -> int:
    """The command: read the manifest, write dataset.png and dataset.json, print the summary."""
    manifest = Manifest.load(args.shards)
    out = args.out or (args.shards if not storage.is_url(args.shards) else ".")
    os.makedirs(out, exist_ok=True)
    summary = dataset_summary(manifest)
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(manifest, summary, os.path.join(out, "dataset.png"))
    for line in describe(summary):
        print(f"[chart_dataset] {line}", file=sys.stderr)
    print(f"[chart_dataset] wrote {os.path.join(out, 'dataset.png')} and dataset.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

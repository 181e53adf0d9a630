#!/usr/bin/env python3
"""Model quality of issue 14, measured: protocols x augmentation x models beside the simple baseline.

    python tools/bench_quality.py --corpus data/demo --name bundled --work /tmp/quality \\
        --protocols closed-session,open --augment 0,3 --models tiny,tiny-transformer --json q.json

For every cell (corpus, protocol, augmentation) it runs, with the real CLIs and nothing else:

1. ``python -m spkr.tools.shard --source CORPUS --protocol P`` (+ ``--augment-copies K`` and a recipe
   when K > 0) -> ``<work>/<name>/<P>-aug<K>/`` or ``<P>-<recipe><K>/``. ``--augment`` entries are
   ``K`` (recipe ``mixed``) or ``RECIPE:K``; the recipes (:data:`RECIPES`):
   ``mixed`` = ``--augment-kinds speed,noise,reverb --speed-classes`` with noise/RIRs from
   ``tools/make_noise_corpus.py``'s set (Kaldi's speeds 0.9/1.1); ``speed`` = ``--augment-kinds speed
   --speed-classes --augment-speeds 0.6,0.65,...,1.5`` (18 factors: each copy a new pseudo-speaker);
2. ``tools/baseline_features.py`` (mean/std of MFCC + logistic regression; cosine on open) on them;
3. per model: ``torchrun --nproc_per_node 2 -m spkr.train`` (2 CPU ranks like the demo) with the
   bundled config (``tiny``; ``tiny-transformer`` = the Transformer at tiny's sizes and training;
   ``NAME@key=value@...`` overrides ``[model]`` or ``[train]`` keys, e.g. ``tiny@input_norm=utterance``,
   ``tiny@eq_db=6``), once per ``--seeds`` seed (rows per seed and their mean), the head by protocol
   (``softmax`` on closed protocols; ``aam`` on ``open``: issue 14's margin head), the same number of
   optimizer steps with and without copies (epochs / (1 + K)); then ``python -m spkr.evaluate`` on the split of role test (``--as-norm`` on
   open) with the run's ``best.pt`` when it wrote one (``@select=valid``; then also its ``last.pt``,
   a row of model ``NAME[last]``), else ``last.pt``.

Scaling curve (``--train-speakers 50,100,200,500,1000``): per N, the cells run on a view of the
corpus (:func:`corpus_view`, symlinks under ``<work>/<name>/n<N>/``) holding its first N training
speakers by id: for ``open`` with every dev-clean/test-clean speaker (the same unseen speakers at
every N), for the closed protocols the N speakers alone. Rows carry ``train_speakers``;
``tools/chart_scaling.py`` draws EER and closed-session accuracy against it.

Reuse: the shard tool always runs (it keeps the complete shards written under the same config, seed
and source, and stops on any other). Every other step writes ``spec.json`` (its command, the config
text, the shards' ``dataset_id`` and a hash of spkr's source files) and is skipped only when a finished step's spec is identical, so an
edited spkr, config or shard set re-runs what it affects. Every row of the table (and ``--json``)
says which source hash, dataset and config measured it. Developer tool; CPU-heavy (a tiny run on
the bundled corpus ~2-3 min on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "spkr" / "configs"
SPEEDS = ",".join(f"{f / 100:g}" for f in range(60, 155, 5) if f != 100)  # 0.6, 0.65, ..., 1.5: 18
# recipe -> shard flags after --augment-copies K ({noise}: the make_noise_corpus.py set under --work)
RECIPES = {
    "mixed": ["--augment-kinds", "speed,noise,reverb", "--speed-classes", "--noise-dir", "{noise}",
              "--rir-dir", "{noise}/rirs"],
    "speed": ["--augment-kinds", "speed", "--speed-classes", "--augment-speeds", SPEEDS],
}  # fmt: skip


def parse_augment(entries: str) -> list[tuple[str, int]]:
    """``--augment`` "0,3,speed:6" -> [("mixed", 0), ("mixed", 3), ("speed", 6)] (K alone = mixed)."""
    out = []
    for entry in entries.split(","):
        recipe, _, k = entry.strip().rpartition(":")
        recipe = recipe or "mixed"
        if recipe not in RECIPES or not k.isdigit():
            raise SystemExit(
                f"bench_quality: --augment entry {entry!r}: want K or RECIPE:K, RECIPE in {list(RECIPES)}"
            )
        out.append((recipe, int(k)))
    return out


def cell_name(protocol: str, recipe: str, copies: int) -> str:
    """``open-aug3`` (mixed, the directories earlier runs wrote) or ``open-speed6``."""
    return f"{protocol}-{'aug' if recipe == 'mixed' or not copies else recipe}{copies}"


def source_hash() -> str:
    """sha256 (16 hex) over spkr/**/*.py (path + bytes): what code measured a row."""
    h = hashlib.sha256()
    for p in sorted((REPO / "spkr").rglob("*.py")):
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def toml_value(v: str) -> str:
    """A flag value as a TOML literal: numbers and booleans as they are, anything else a string."""
    if v in ("true", "false"):
        return v
    try:
        float(v)
        return v
    except ValueError:
        return json.dumps(v)


def model_config(spec: str, head: str) -> str:
    """Config text of model ``spec`` = ``NAME[@key=value...]`` (NAME a bundled config) with ``[model]
    head = head`` and the overrides, each put in the table whose dataclass has the key (``[model]``:
    ModelConfig, e.g. ``input_norm``; ``[train]``: TrainConfig, e.g. ``eq_db``); another key exits."""
    from dataclasses import fields

    from spkr.models import ModelConfig
    from spkr.run.configs import TrainConfig

    model, *pairs = spec.split("@")
    tables = {"model": {"head": toml_value(head)}, "train": {}}
    known = {t: {f.name for f in fields(c)} for t, c in (("model", ModelConfig), ("train", TrainConfig))}
    for k, v in (p.split("=", 1) if "=" in p else (p, "") for p in pairs):
        table = next((t for t in ("model", "train") if k in known[t]), None)
        if table is None or not v:
            raise SystemExit(f"bench_quality: model {spec!r}: {k!r} is not key=value of [model] or [train]")
        tables[table][k] = toml_value(v)
    lines = (CONFIGS / f"{model}.toml").read_text().splitlines()
    for table, overrides in tables.items():
        start = lines.index(f"[{table}]")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
        body = [ln for ln in lines[start + 1 : end] if ln.split("=")[0].strip() not in overrides]
        lines[start + 1 : end] = [f"{k} = {v}" for k, v in overrides.items()] + body
    return "\n".join(lines) + "\n"


def config_epochs(text: str) -> int:
    import tomllib

    return int(tomllib.loads(text)["train"]["epochs"])


def run_step(out: Path, spec: dict, cmd: list[str], log: Path, env: dict | None = None) -> float | None:
    """Run ``cmd`` unless ``out/spec.json`` (written after success) equals ``spec``; -> seconds or None."""
    done = out / "spec.json"
    if done.exists() and json.loads(done.read_text()) == spec:
        print(f"  reuse {out} (same spec)", flush=True)
        return None
    out.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    print("  $ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if rc != 0:
        sys.exit(f"bench_quality: step failed (exit {rc}): {' '.join(cmd)}; see {log}")
    done.write_text(json.dumps(spec, indent=1))
    return time.perf_counter() - t0


SUBSETS = ("train-clean-100", "dev-clean", "test-clean")


def corpus_view(corpus: Path, out: Path, n: int, protocol: str) -> Path:
    """A LibriSpeech tree of speaker-directory symlinks at ``out`` holding the first ``n`` training
    speakers of ``corpus`` (numeric id order; populations are nested by id, docs/population.md).

    ``open``: the n speakers in train-clean-100 and every dev-clean / test-clean speaker, so each N is
    tested on the same unseen speakers. Closed protocols: the n speakers alone, every 10th in dev-clean
    and every 5th other in test-clean (make_population's N/10 and N/5): those placements only set how
    many utterances ``closed-session`` holds out (whole chapters of every speaker: docs/protocols.md),
    so valid/test ask about the same n classes that train. Rebuilt when missing or different.
    """
    root = corpus / "LibriSpeech" if (corpus / "LibriSpeech").is_dir() else corpus
    train = sorted((p for p in (root / SUBSETS[0]).iterdir() if p.is_dir()), key=lambda p: int(p.name))
    if n > len(train):
        raise SystemExit(
            f"bench_quality: --train-speakers {n}: {root / SUBSETS[0]} has {len(train)} speakers"
        )
    if protocol == "open":
        placed = [(SUBSETS[0], p) for p in train[:n]]
        placed += [(sub, p) for sub in SUBSETS[1:] for p in sorted((root / sub).iterdir()) if p.is_dir()]
    else:
        placed = [(SUBSETS[1] if i % 10 == 0 else SUBSETS[2] if i % 5 == 2 else SUBSETS[0], p)
                  for i, p in enumerate(train[:n])]  # fmt: skip
    want = sorted(f"{sub}/{p.name} -> {p.resolve()}" for sub, p in placed)
    listing = out / "view.txt"
    if listing.exists() and listing.read_text().splitlines() == want:
        return out
    tree = out / "LibriSpeech"
    for sub in SUBSETS:
        if (tree / sub).exists():
            for link in (tree / sub).iterdir():
                link.unlink()
        (tree / sub).mkdir(parents=True, exist_ok=True)
    for sub, p in placed:
        (tree / sub / p.name).symlink_to(p.resolve(), target_is_directory=True)
    speakers = root / "SPEAKERS.TXT"
    if speakers.exists():
        subset_of = {p.name: sub for sub, p in placed}
        lines = [ln if ln.startswith(";") else _speaker_line(ln, subset_of)
                 for ln in speakers.read_text().splitlines()]  # fmt: skip
        (tree / "SPEAKERS.TXT").write_text("\n".join(ln for ln in lines if ln is not None) + "\n")
    listing.write_text("\n".join(want) + "\n")
    return out


def _speaker_line(line: str, subset_of: dict[str, str]) -> str | None:
    """A SPEAKERS.TXT line with the view's subset, or None for a speaker outside the view."""
    cols = line.split("|")
    sid = cols[0].strip()
    if sid not in subset_of:
        return None
    cols[2] = f" {subset_of[sid]:<16} "
    return "|".join(cols)


def dataset_id(shards: Path) -> str:
    return json.loads((shards / "manifest.json").read_text())["dataset_id"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="LibriSpeech-layout corpus (e.g. data/demo)")
    ap.add_argument("--name", required=True, help="corpus name in the table and under --work")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--protocols", default="closed,closed-session,open")
    ap.add_argument(
        "--augment", default="0,3", help="copies per training utterance, K or RECIPE:K: 0,3,speed:6"
    )
    ap.add_argument("--models", default="tiny,tiny-transformer")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seeds", default="0", help="training seeds, one run each: 0,1,2 (rows + their mean)")
    ap.add_argument(
        "--train-speakers", default="", help="scaling curve: cut to N training speakers: 50,100,200"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    src = source_hash()
    work = args.work / args.name
    noise = args.work / "noise"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    rows = []
    augment = parse_augment(args.augment)
    seeds = [int(x) for x in args.seeds.split(",")]
    if any(k and recipe == "mixed" for recipe, k in augment):
        run_step(noise, {"cmd": "make_noise_corpus", "seed": 0, "demo": "data/demo"},
                 [sys.executable, "tools/make_noise_corpus.py", "--out", str(noise), "--seed", "0",
                  "--demo", str(REPO / "data" / "demo")], args.work / "noise.log", env)  # fmt: skip
    sizes = [int(x) for x in args.train_speakers.split(",") if x] or [None]
    for n in sizes:
        for protocol in args.protocols.split(","):
            base = work if n is None else work / f"n{n}"
            corpus = (
                args.corpus
                if n is None
                else str(corpus_view(Path(args.corpus), base / f"view-{protocol}", n, protocol))
            )
            for recipe, copies in augment:
                cell = base / cell_name(protocol, recipe, copies)
                ctx = {
                    "corpus": args.name,
                    "protocol": protocol,
                    "augment": (recipe, copies),
                    "train_speakers": n,
                }
                rows += run_cell(args, ctx, corpus, cell, seeds, src, env, noise)
                if len(seeds) > 1:
                    rows += seed_means(rows, args.name, protocol, (recipe, copies), n)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def run_cell(args, ctx: dict, corpus: str, cell: Path, seeds, src: str, env: dict, noise: Path) -> list[dict]:
    """Shard ``corpus`` under ``protocol`` (+ copies), then the baseline and every model x seed on it."""
    protocol, (recipe, copies) = ctx["protocol"], ctx["augment"]
    shards = cell / "shards"
    cmd = [sys.executable, "-m", "spkr.tools.shard", "--source", corpus, "--subsets", "train.100",
           "--protocol", protocol, "--out", str(shards), "--workers", "2"]  # fmt: skip
    if copies:
        cmd += ["--augment-copies", str(copies)] + [a.format(noise=noise) for a in RECIPES[recipe]]
    print(f"== {args.name} {cell.relative_to(args.work / args.name)}", flush=True)
    shard_log = cell / "shard.log"
    shard_log.parent.mkdir(parents=True, exist_ok=True)
    with open(shard_log, "a") as f:  # always run: the tool itself keeps complete shards of this config
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode:
            sys.exit(f"bench_quality: sharding failed; see {shard_log}")
    did = dataset_id(shards)
    base_json = cell / "baseline.json"
    cmd = [sys.executable, "tools/baseline_features.py", "--shards", str(shards), "--json", str(base_json)]
    run_step(
        cell / "baseline-step",
        {"cmd": cmd[1:], "dataset_id": did, "src": src},
        cmd,
        cell / "baseline.log",
        env,
    )
    figures = base_figures(json.loads(base_json.read_text()), protocol)
    rows = [row(**ctx, model="baseline", figures=figures, did=did, src=src, secs=None)]
    for model, seed in ((m, sd) for m in args.models.split(",") for sd in seeds):
        text = model_config(model, "aam" if protocol == "open" else "softmax")
        cfg = cell / f"{model}.toml"
        cfg.write_text(text)
        name = run_name(model, seed)
        run = cell / f"run-{name}"
        epochs = max(1, math.ceil(config_epochs(text) / (1 + copies)))
        cmd = ["torchrun", "--standalone", "--nproc_per_node", str(args.nproc), "-m", "spkr.train",
               "--config", str(cfg), "--shards", str(shards), "--out", str(run), "--fresh",
               "--no-progress", "--epochs", str(epochs), "--seed", str(seed)]  # fmt: skip
        spec = {"cmd": cmd, "config": text, "dataset_id": did, "src": src}
        secs = run_step(run / "train-step", spec, cmd, cell / f"train-{name}.log", env)
        figures = evaluate_run(
            run, run / "eval-test.json", shards, protocol, spec, cell / f"eval-{name}.log", env
        )
        rows.append(row(**ctx, model=model, figures=figures, did=did, src=src, secs=secs, seed=seed))
        if figures["checkpoint"] == "best.pt":  # select = "valid": the last weights too, beside them
            log = cell / f"eval-last-{name}.log"
            figures = evaluate_run(run, run / "eval-last.json", shards, protocol, spec, log, env, last=True)
            rows.append(
                row(**ctx, model=f"{model}[last]", figures=figures, did=did, src=src, secs=None, seed=seed)
            )
    return rows


def evaluate_run(run: Path, out: Path, shards: Path, protocol: str, train_spec: dict, log: Path, env: dict,
                 last: bool = False) -> dict:  # fmt: skip
    """``python -m spkr.evaluate`` of a run on the split of role test (``--as-norm`` on open) -> its
    figures + ``checkpoint``: the run's ``best.pt`` when it wrote one (``@select=valid``) unless
    ``last``, else ``last.pt``."""
    ckpt = run / ("best.pt" if (run / "best.pt").exists() and not last else "last.pt")
    cmd = [sys.executable, "-m", "spkr.evaluate", "--checkpoint", str(ckpt),
           "--shards", str(shards), "--out", str(out)] + (["--as-norm"] if protocol == "open" else [])  # fmt: skip
    step = run / ("eval-last-step" if last else "eval-step")
    run_step(step, {"cmd": cmd[1:], "train": train_spec}, cmd, log, env)
    return {**eval_figures(json.loads(out.read_text())), "checkpoint": ckpt.name}


def base_figures(base: dict, protocol: str) -> dict:
    if protocol == "open":
        v = base["verification"]["test-verify"]
        return {"eer": v["eer"], "min_dcf_0.01": v["min_dcf_0.01"], "trials": v["trials"]}
    t = base["logreg"]["test"]
    return {"acc": t["acc"], "n": t["n"]}


def eval_figures(ev: dict) -> dict:
    v = ev.get("verification") or {}
    if ev.get("kind") == "verification":
        out = {"eer": v["eer"], "min_dcf_0.01": v["min_dcf_0.01"], "trials": v["trials"]}
        if "as_norm" in v:
            out["eer_as_norm"] = v["as_norm"]["eer"]
        return out
    return {"acc": ev["acc"], "n": ev["n"]}


def run_name(model: str, seed: int) -> str:
    """``tiny`` for seed 0 (the directories earlier runs wrote), ``tiny-seed1`` for others."""
    return model if seed == 0 else f"{model}-seed{seed}"


def row(corpus, protocol, augment, model, figures, did, src, secs, seed=None, train_speakers=None) -> dict:
    recipe, copies = augment
    return {"corpus": corpus, "protocol": protocol, "augment_copies": copies,
            "augment_recipe": recipe if copies else None, "train_speakers": train_speakers, "model": model,
            "seed": seed, **figures, "dataset_id": did, "src": src, "train_seconds": secs}  # fmt: skip


FIGURES = ("acc", "eer", "eer_as_norm", "min_dcf_0.01")


def seed_means(rows: list[dict], corpus, protocol, augment, train_speakers=None) -> list[dict]:
    """Per model of this cell, a row with the mean of each figure over its seeds' rows (``seed`` =
    "mean", ``seeds`` = them, ``<figure>_range`` = [min, max])."""
    recipe, copies = augment
    out = []
    for model in dict.fromkeys(r["model"] for r in rows if isinstance(r["seed"], int)):
        runs = [r for r in rows if r["corpus"] == corpus and r["protocol"] == protocol and r["model"] == model
                and r["augment_copies"] == copies and r["augment_recipe"] == (recipe if copies else None)
                and r.get("train_speakers") == train_speakers and isinstance(r["seed"], int)]  # fmt: skip
        if len(runs) < 2:
            continue
        mean = {**runs[0], "seed": "mean", "seeds": [r["seed"] for r in runs], "train_seconds": None}
        for f in FIGURES:
            if f in runs[0]:
                vals = [r[f] for r in runs]
                mean[f], mean[f + "_range"] = sum(vals) / len(vals), [min(vals), max(vals)]
        out.append(mean)
    return out


def copies(r: dict) -> str:
    return f"{r['augment_copies']} {r['augment_recipe']}" if r["augment_copies"] else "0"


def seed(r: dict) -> str:
    if r.get("seed") == "mean":
        return "mean of " + ",".join(map(str, r["seeds"]))
    return "" if r.get("seed") is None else str(r["seed"])


def print_table(rows: list[dict]) -> None:
    print(
        "| corpus | speakers | protocol | copies | model | seed | test acc | EER | EER AS-norm | minDCF(0.01) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{100 * r['acc']:.2f} % ({r['n']})" if "acc" in r else ""
        eer = f"{100 * r['eer']:.2f} %" if "eer" in r else ""
        asn = f"{100 * r['eer_as_norm']:.2f} %" if "eer_as_norm" in r else ""
        dcf = f"{r['min_dcf_0.01']:.3f}" if "min_dcf_0.01" in r else ""
        print(
            f"| {r['corpus']} | {r.get('train_speakers') or ''} | {r['protocol']} | {copies(r)} | {r['model']} | {seed(r)} | {acc} | {eer} | {asn} "
            f"| {dcf} |"
        )


if __name__ == "__main__":
    sys.exit(main())

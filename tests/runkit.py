"""Runs, checkpoints and corpora shared by the training / evaluation / prediction tests, built once per
test session under pytest's base temp (like shardkit for shards): the small demo shards, a real 2-rank
torchrun run that is kill -9'ed mid-epoch and resumes, a tiny in-process run, an untrained checkpoint.
The session fixtures over these live in tests/conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from spkr.run.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "LibriSpeech"
UTTS_PER_SPEAKER = 10  # keep the shard fixture small
RUN_EPOCHS = 12


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def small_corpus(dst: Path) -> Path:
    """A LibriSpeech-layout copy of the demo corpus (symlinks) with the first utterances of each chapter."""
    if (dst / "LibriSpeech").exists():
        return dst
    assert DEMO.is_dir(), f"bundled demo corpus missing under {DEMO}"
    for ch_dir in sorted(p for p in DEMO.glob("*/*/*") if p.is_dir()):
        out = dst / "LibriSpeech" / ch_dir.relative_to(DEMO)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(ch_dir.glob("*.flac"))[:UTTS_PER_SPEAKER]:
            (out / f.name).symlink_to(f)
        for t in ch_dir.glob("*.trans.txt"):
            (out / t.name).symlink_to(t)
    for f in DEMO.glob("*.TXT"):
        (dst / "LibriSpeech" / f.name).symlink_to(f)
    return dst


def demo_shards(base: Path) -> Path:
    """Shards of the small demo corpus, built once per session with the shard tool."""
    out = base / "demo_shards"
    if (out / "manifest.json").exists():
        return out
    from spkr.tools.shard import main as shard_main

    corpus = small_corpus(base / "demo_corpus")
    argv = ["--source", str(corpus), "--subsets", "train.100", "--out", str(out), "--workers", "2"]
    rc = shard_main(argv + ["--no-progress"])
    assert rc == 0 and (out / "manifest.json").exists()
    return out


def killed_run(base: Path) -> dict:
    """2-rank torchrun, compile on, --max-restarts 1; one worker is kill -9'ed after a mid-epoch step
    checkpoint; returns {"run": dir, "killed": pid, "rc": rc, "log": text}. Built once per session."""
    run = base / "killed_run"
    info_file = base / "killed_run.json"
    if info_file.exists():
        return json.loads(info_file.read_text())
    shards = demo_shards(base)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
        "--standalone",
        "-m", "spkr.train", "--config", str(REPO / "configs" / "tiny.toml"), "--shards", str(shards),
        "--out", str(run), "--epochs", str(RUN_EPOCHS), "--batch-size", "8", "--warmup-steps", "5",
        "--lr", "3e-3", "--ckpt-every", "2", "--log-every", "1", "--num-workers", "1", "--crop-frames", "0",
        "--compile", "--no-progress",
    ]  # fmt: skip
    log_path = base / "killed_run.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO)
        killed = None
        deadline = time.monotonic() + 600
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                rows = read_metrics(run)
                cfg = next((r for r in rows if r.get("kind") == "config"), None)
                steps = [r["step"] for r in rows if r.get("kind") == "train"]
                if killed is None and cfg and steps:
                    spe = cfg["steps_per_epoch"]
                    s = max(steps)
                    # past the first step checkpoint of epoch 1, well inside the epoch
                    if s >= spe + 3 and s % spe not in (0, spe - 1) and (run / "last.pt").exists():
                        import psutil

                        workers = psutil.Process(proc.pid).children(recursive=False)
                        assert workers, "no torchrun workers found"
                        victim = sorted(w.pid for w in workers)[-1]
                        os.kill(victim, signal.SIGKILL)
                        killed = victim
                time.sleep(0.2)
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
    info = {"run": str(run), "killed": killed, "rc": rc, "log": log_path.read_text()[-20000:]}
    info_file.write_text(json.dumps(info))
    return info


TINY_MODEL = """
[model]
arch = "mamba"
d_model = 16
n_layers = 1
d_state = 4
chunk_size = 8
frontend_channels = [16]
embedding_dim = 16
dropout = 0.1
"""


# the e2e tests' tiny model, deterministic (no dropout) and with a plain softmax head
TINY_RUN_MODEL = (
    TINY_MODEL.replace("dropout = 0.1", "dropout = 0.0") + 'backend = "torch"\nhead = "softmax"\n'
)


def tiny_run(base: Path) -> dict:
    """A real run directory, built once per session in ~2 s: synthetic shards, the tiny Mamba-1 above
    trained in-process (fp32, eager) for 3 epochs, validated every 2nd epoch (so epoch 0 has no valid
    row), twice into the same directory: seed 1, then --fresh with seed 0 (which removes the first
    run's outputs). The first run's metrics rows are then put back in front of the second's, as a
    torchrun restart of a --fresh job leaves its first attempt's: metrics.jsonl holds rows of both runs
    with the same epochs, steps and dataset_id, but only the second run's weights are in the
    checkpoints. Returns {"run", "shards", "rows" (the second run's metrics rows), "stale"}."""
    from spkr.train import main as train_main
    from tests.shardkit import make_shards

    run, info_file = base / "tiny_run", base / "tiny_run.json"
    if info_file.exists():
        return json.loads(info_file.read_text())
    splits = {"train": [16, 16], "valid": [10], "test": [8]}
    shards = make_shards(base / "tiny_run_shards", splits=splits, n_mels=16, n_classes=3, mean_frames=30, seed=5)  # fmt: skip
    cfg = base / "tiny_run.toml"
    cfg.write_text(TINY_RUN_MODEL)
    args = [
        "--shards", str(shards), "--config", str(cfg), "--out", str(run), "--no-progress", "--no-compile",
        "--dtype", "fp32", "--epochs", "3", "--eval-every", "2", "--batch-size", "4", "--eval-batch-size", "3",
        "--warmup-steps", "2", "--lr", "1e-2", "--crop-frames", "0", "--num-workers", "0", "--log-every", "1",
        "--verify-pairs", "0",
    ]  # fmt: skip
    assert train_main(args + ["--seed", "1"]) == 0
    first = (run / "metrics.jsonl").read_text()
    n_first = len(first.splitlines())
    assert train_main(args + ["--seed", "0", "--fresh"]) == 0
    second = (run / "metrics.jsonl").read_text()
    assert not second.startswith(first)  # --fresh removed the first run's rows
    (run / "metrics.jsonl").write_text(first + second)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    info = {"run": str(run), "shards": str(shards), "rows": rows[n_first:], "stale": rows[:n_first]}
    info_file.write_text(json.dumps(info))
    return info


def untrained_checkpoint(path: Path, seed: int = 0) -> Path:
    """A real checkpoint of a small, untrained model (as tests/test_predict.py makes one)."""

    from spkr.checkpoint import FORMAT as CKPT_FORMAT
    from spkr.checkpoint import VERSION as CKPT_VERSION
    from spkr.checkpoint import save_atomic
    from spkr.config import to_dict
    from spkr.features import FeatureConfig
    from spkr.models import build_model
    from spkr.models.config import ModelConfig

    torch.manual_seed(seed)
    fc = FeatureConfig(n_mels=16)
    cfg = ModelConfig(
        d_model=16, n_layers=1, d_state=4, frontend_channels=[16], embedding_dim=16, subsample=2
    )
    model = build_model(cfg, fc.n_mels, 3)
    ckpt = {
        "format": CKPT_FORMAT, "version": CKPT_VERSION, "model": model.state_dict(),
        "model_config": to_dict(cfg), "labels": ["7", "8", "9"], "feature_config": fc.to_dict(),
        "stats": {"mean": [0.0] * fc.n_mels, "std": [1.0] * fc.n_mels},
    }  # fmt: skip
    save_atomic(ckpt, path)
    return path


def chart_counts(run: Path) -> dict:
    """What the last chart_losses call on ``run`` did, from its losses.json: checkpoints charted (each
    loaded once) and points reused from metrics.jsonl or evaluated."""
    losses = json.loads((Path(run) / "losses.json").read_text())
    charted = {p["checkpoint"] for points in losses["splits"].values() for p in points}
    return {"checkpoints": len(charted), **losses["reuse"]}

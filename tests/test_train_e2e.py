"""End-to-end training: a real 2-rank torchrun (gloo, compile on) that is kill -9'ed mid-epoch and
resumes under ``--max-restarts 1``; a run streaming its shards from a loopback S3 server.

The helpers here build, once per test session (under pytest's session base temp), the small shards
of the bundled demo corpus and the trained run that test_predict / test_evaluate / test_train reuse.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "LibriSpeech"
UTTS_PER_SPEAKER = 10  # keep the shard fixture small
RUN_EPOCHS = 12


def _env(**extra) -> dict:
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
    rc = shard_main(
        [
            "--source",
            str(corpus),
            "--subsets",
            "train.100",
            "--out",
            str(out),
            "--workers",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0 and (out / "manifest.json").exists()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run: Path) -> list[dict]:
    if not (run / "metrics.jsonl").exists():
        return []
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


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
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
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


@pytest.fixture(scope="session")
def session_base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.mark.slow
def test_torchrun_kill9_resume_then_evaluate(session_base):
    info = killed_run(session_base)
    run = Path(info["run"])
    assert info["killed"] is not None, "the run finished before a worker could be killed:\n" + info["log"]
    assert info["rc"] == 0, info["log"]
    rows = read_metrics(run)
    configs = [r for r in rows if r["kind"] == "config"]
    assert len(configs) == 2, "expected one start and one restart"
    assert configs[0]["compile"] is True and configs[0]["world_size"] == 2
    resumed = configs[1]["resumed_step"]
    spe = configs[0]["steps_per_epoch"]
    assert resumed is not None and resumed % spe != 0, "resume should be mid-epoch (step checkpoint)"
    # every optimizer step after the resume point is logged once more, and training finished
    after = [r["step"] for r in rows[rows.index(configs[1]) :] if r["kind"] == "train"]
    assert after == list(range(resumed + 1, RUN_EPOCHS * spe + 1))
    assert "resumed from" in info["log"]
    tests = [r for r in rows if r["kind"] == "test"]
    assert len(tests) == 1 and tests[0]["n"] > 0 and "eer" in tests[0]["verification"]
    for e in range(RUN_EPOCHS):
        assert (run / f"ckpt-epoch{e:03d}.pt").exists()
    # evaluate CLI on the final checkpoint
    out = session_base / "eval.json"
    r = subprocess.run(
        [sys.executable, "-m", "spkr.evaluate", "--checkpoint", str(run / "last.pt"), "--out", str(out)],
        env=_env(), capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["acc"] == pytest.approx(tests[0]["acc"])
    assert 0.0 <= res["verification"]["eer"] <= 0.5
    assert "EER" in r.stdout


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


@pytest.mark.parametrize("workers", [0, 2], ids=["workers0", "workers2"])  # ~1-2 s each: not slow
def test_mid_epoch_resume_is_bit_exact(tmp_path, workers):
    """fp32 eager, one process: a run paused mid-epoch (--stop-at-step) and resumed logs exactly (==)
    the per-step losses of an uninterrupted run and ends with identical weights and test results.
    Dropout, SpecAugment and random crops all draw random numbers. With workers, creating the
    DataLoader iterator on resume used to draw from the just-restored global torch RNG."""
    from spkr.checkpoint import load
    from spkr.train import main
    from tests.shardkit import make_shards

    splits = {"train": [12, 12], "valid": [4], "test": [4]}
    shards = make_shards(tmp_path / "shards", splits=splits, n_mels=16, n_classes=3, mean_frames=30, seed=3)
    (tmp_path / "tiny.toml").write_text(TINY_MODEL)
    common = [
        "--shards", str(shards), "--config", str(tmp_path / "tiny.toml"), "--no-progress", "--no-compile",
        "--dtype", "fp32", "--epochs", "2", "--batch-size", "4", "--warmup-steps", "2", "--crop-frames", "20",
        "--freq-masks", "1", "--time-masks", "1", "--num-workers", str(workers), "--log-every", "1",
        "--verify-pairs", "0",
    ]  # fmt: skip
    whole, paused = tmp_path / "whole", tmp_path / "paused"
    assert main(common + ["--out", str(whole)]) == 0
    assert main(common + ["--out", str(paused), "--stop-at-step", "8"]) == 0
    rows = read_metrics(paused)
    spe = rows[0]["steps_per_epoch"]
    ckpt = load(paused / "last.pt")
    assert spe == 6 and ckpt["step"] == 8 and ckpt["epoch"] == 1 and ckpt["batches_done"] == 2  # mid-epoch
    assert not ckpt["finished"] and not any(r["kind"] == "test" for r in rows)
    assert main(common + ["--out", str(paused)]) == 0  # continues from last.pt
    a, b = read_metrics(whole), read_metrics(paused)
    assert [r["resumed_step"] for r in b if r["kind"] == "config"] == [None, 8]

    def series(rows: list[dict], kind: str) -> list[tuple]:
        return [(r["step"], r["loss"], r.get("acc")) for r in rows if r["kind"] == kind]

    assert [s for s, _, _ in series(a, "train")] == list(range(1, 2 * spe + 1))
    assert series(b, "train") == series(a, "train")
    assert series(b, "valid") == series(a, "valid") and len(series(a, "valid")) == 2
    assert series(b, "test") == series(a, "test") and len(series(a, "test")) == 1
    wa, wb = load(whole / "last.pt")["model"], load(paused / "last.pt")["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_train_streams_from_loopback_s3(session_base, tmp_path):
    pytest.importorskip("moto")
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    shards = demo_shards(session_base)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        opts = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        }
        fs = s3fs.S3FileSystem(**opts)
        bucket = f"spkr-train-{port}"  # moto's state is per process: other tests' buckets are visible
        fs.mkdir(bucket)
        fs.put(str(shards) + "/", f"{bucket}/demo/", recursive=True)
        run = tmp_path / "s3run"
        env = _env(SPKR_STORAGE_OPTIONS=json.dumps(opts), AWS_EC2_METADATA_DISABLED="true")
        for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            env.pop(k, None)
        r = subprocess.run(
            [sys.executable, "-m", "spkr.train", "--config", str(REPO / "configs" / "tiny.toml"),
             "--shards", f"s3://{bucket}/demo", "--out", str(run), "--epochs", "1", "--max-steps", "4",
             "--batch-size", "8", "--no-compile", "--num-workers", "1", "--no-progress", "--log-every", "1"],
            env=env, capture_output=True, text=True, cwd=REPO, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-5000:]
        rows = read_metrics(run)
        assert [x["step"] for x in rows if x["kind"] == "train"] == [1, 2, 3, 4]
        assert any(x["kind"] == "test" and x["n"] > 0 for x in rows)
        assert (run / "last.pt").exists()
    finally:
        server.stop()

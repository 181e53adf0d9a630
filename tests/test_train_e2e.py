"""End-to-end training: a real 2-rank torchrun (gloo, compile on) that is kill -9'ed mid-epoch and
resumes under ``--max-restarts 1``; a run streaming its shards from a loopback S3 server.

The session-cached shards and runs these tests share with test_predict / test_evaluate / test_train
are built by tests/runkit.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spkr.run.metrics import read_metrics
from tests.netkit import free_port
from tests.runkit import REPO, RUN_EPOCHS, TINY_MODEL, demo_shards, killed_run, subprocess_env


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
        env=subprocess_env(), capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["acc"] == pytest.approx(tests[0]["acc"])
    assert 0.0 <= res["verification"]["eer"] <= 0.5
    assert "EER" in r.stdout


@pytest.mark.parametrize("workers", [0, 2], ids=["workers0", "workers2"])  # ~1-2 s each: not slow
def test_mid_epoch_resume_is_bit_exact(tmp_path, workers):
    """fp32 eager, one process: a run paused mid-epoch (--stop-at-step) and resumed logs exactly (==)
    the per-step losses of an uninterrupted run and ends with identical weights and test results.
    Dropout, SpecAugment, additive noise, the random microphone (eq_*) and random crops all draw random numbers. With workers, creating the
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
        "--verify-pairs", "0", "--eq-db", "6", "--eq-lowpass-hz", "3000", "--eq-highpass-hz", "300",
        "--noise", "0.5",
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
        env = subprocess_env(SPKR_STORAGE_OPTIONS=json.dumps(opts), AWS_EC2_METADATA_DISABLED="true")
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
        # evaluate and chart_losses read the checkpoint's s3:// shards with the options of the
        # environment too (resolved by the storage layer; the CLIs pass --storage-options only); the
        # run stopped mid-epoch (--max-steps), so chart_losses charts its last.pt as an epoch checkpoint
        shutil.copy(run / "last.pt", run / "ckpt-epoch000.pt")
        for cmd in (
            ["spkr.evaluate", "--checkpoint", str(run / "last.pt"), "--device", "cpu"],
            ["spkr.tools.chart_losses", "--run", str(run), "--device", "cpu"],
        ):
            r = subprocess.run([sys.executable, "-m", *cmd], env=env, capture_output=True, text=True,
                               cwd=REPO, timeout=300)  # fmt: skip
            assert r.returncode == 0, (cmd[0], r.stderr[-5000:])
        assert json.loads((run / "eval-test.json").read_text())["shards"] == f"s3://{bucket}/demo"
        assert (run / "losses.json").exists()
    finally:
        server.stop()

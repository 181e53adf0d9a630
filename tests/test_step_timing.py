"""Step phase timing (spkr/run/phases.py): every second of a window goes to one phase, timing changes
nothing that is computed (same losses and weights with the clock on and off; DDP's gradients the same
with the timed all-reduce hook), and under real torchrun (2 gloo ranks) the train rows carry the
phases with a measured all-reduce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from spkr.models.config import ModelConfig
from spkr.run import trainer
from spkr.run.checkpoint import Position
from spkr.run.configs import TrainConfig
from spkr.run.distributed import setup
from spkr.run.metrics import Logger, TrainWindow, read_metrics
from spkr.run.phases import PHASES, AllReduceTimes, PhaseClock, timed_allreduce_hook, union_length
from tests.netkit import free_port

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(arch="mamba", backend="torch", d_model=16, n_layers=1, d_state=4, chunk_size=8,
             frontend_channels=[16], embedding_dim=16, head="softmax", dropout=0.1)  # fmt: skip
MODEL_TOML = "[model]\n" + "\n".join(
    f"{k} = {json.dumps(v)}" if not isinstance(v, list) else f"{k} = {v}" for k, v in MODEL.items()
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from tests.shardkit import make_shards

    splits = {"train": [12, 12], "valid": [4], "test": [4]}
    out = tmp_path_factory.mktemp("step_timing") / "shards"
    return make_shards(out, splits=splits, n_mels=16, n_classes=3, mean_frames=30, seed=3)


def test_union_length_counts_overlaps_once():
    assert union_length([]) == 0.0
    assert union_length([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)]) == pytest.approx(4.0)


def test_clock_charges_every_second_to_one_phase():
    before = time.perf_counter()
    clock = PhaseClock(torch.device("cpu"))
    for phase in ("data_wait", "forward"):
        clock.lap(phase)
    clock.lap_backward()  # no DDP: all of it is backward
    clock.lap("optimizer")
    phases, inflight = clock.take(steps=2)
    after = time.perf_counter()
    assert set(phases) == set(PHASES) and all(v >= 0 for v in phases.values())
    assert phases["allreduce"] == 0.0 and inflight == 0.0
    assert 2 * sum(phases.values()) <= after - before  # per step: the window's wall time over 2 steps
    assert clock.take(steps=1)[0]["forward"] == 0.0  # take starts the next window


def test_disabled_clock_adds_nothing_to_the_row():
    clock = PhaseClock(torch.device("cpu"), enabled=False)
    assert clock.lap("forward") == 0.0 and clock.take(1) is None
    row = TrainWindow(world=1).row(epoch=0, step=1, lr=1e-3, phases=clock.take(1))
    assert "phases" not in row and "allreduce_inflight" not in row
    assert not PhaseClock(torch.device("cuda")).enabled  # CUDA: off unless asked (it would synchronise)


def _train_rows(shards: Path, out: Path, timed: bool) -> tuple[list[dict], dict]:
    """3 optimizer steps (2 micro-batches each) of the parts spkr.train composes, logged every step."""
    cfg = TrainConfig(batch_size=4, grad_accum=2, num_workers=0, crop_frames=20, warmup_steps=2, log_every=1)
    env = setup("cpu")
    trainer.seed_rank(0, env.rank)
    data = trainer.build_data(str(shards), cfg, env, {})
    out.mkdir(parents=True)
    logger = Logger(out, env.master, progress=False)
    t = trainer.Trainer(ModelConfig(**MODEL), cfg, env, data, torch.float32, logger, out, str(shards))
    t.wrap(use_compile=False)
    t.clock = PhaseClock(env.device, enabled=timed)
    assert t.train_epoch(Position(), stop_at_step=3) == "paused"
    return [r for r in read_metrics(out) if r["kind"] == "train"], t.raw_model.state_dict()


def test_losses_and_weights_identical_with_timing_on_and_off(shards, tmp_path):
    timed, timed_weights = _train_rows(shards, tmp_path / "timed", timed=True)
    plain, plain_weights = _train_rows(shards, tmp_path / "plain", timed=False)
    assert [r["loss"] for r in timed] == [r["loss"] for r in plain] and len(plain) == 3
    assert all(torch.equal(timed_weights[k], plain_weights[k]) for k in plain_weights)
    assert all("phases" not in r for r in plain)
    for r in timed:
        assert set(r["phases"]) == set(PHASES) and r["phases"]["allreduce"] == 0.0
        assert r["phases"]["forward"] > 0 and r["phases"]["backward"] > 0 and r["phases"]["optimizer"] > 0


def _ddp_gradients(hooked: bool) -> tuple[dict[str, torch.Tensor], PhaseClock]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    ddp = DDP(model, bucket_cap_mb=0.0001)
    clock = PhaseClock(torch.device("cpu"), enabled=hooked)
    clock.hook_ddp(ddp)
    x = torch.randn(5, 8)
    clock.reset()
    ddp(x).square().sum().backward()
    clock.lap_backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, clock


def test_timed_allreduce_hook_reduces_as_ddp_does(tmp_path):
    """In-process gloo group of one rank: the hooked DDP's gradients equal the default's, and the
    hook saw every bucket (launch and completion)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        plain, _ = _ddp_gradients(hooked=False)
        timed, clock = _ddp_gradients(hooked=True)
        assert all(torch.equal(plain[n], timed[n]) for n in plain)
        assert clock.inflight > 0 and clock.comm.take() == (None, [])  # lap_backward consumed them
        phases, _ = clock.take(1)
        assert phases["allreduce"] >= 0 and phases["backward"] >= 0
    finally:
        dist.destroy_process_group()
    assert timed_allreduce_hook.__annotations__.get("return") is None  # DDP rejects a string annotation
    assert AllReduceTimes().take() == (None, [])


@pytest.mark.slow
def test_two_ranks_log_phases_with_a_measured_allreduce(shards, tmp_path):
    """Real torchrun, 2 gloo ranks: each train row has every phase, and the all-reduce is measured
    (exposed wait and time in flight) — a 1-rank run of the same shards logs 0 for both."""
    config = tmp_path / "model.toml"
    config.write_text(MODEL_TOML)
    common = [
        "-m", "spkr.train", "--shards", str(shards), "--config", str(config), "--fresh", "--no-progress",
        "--no-compile", "--dtype", "fp32", "--epochs", "1", "--max-steps", "3", "--batch-size", "4",
        "--crop-frames", "20", "--log-every", "1", "--num-workers", "0", "--verify-pairs", "0",
    ]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for launcher, out in ((torchrun, tmp_path / "two"), ([sys.executable], tmp_path / "one")):
        proc = subprocess.run(
            launcher + common + ["--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    two = [r for r in read_metrics(tmp_path / "two") if r["kind"] == "train"]
    one = [r for r in read_metrics(tmp_path / "one") if r["kind"] == "train"]
    assert len(two) == len(one) == 3
    assert all(set(r["phases"]) == set(PHASES) for r in two + one)
    assert all(r["phases"]["allreduce"] > 0 and r["allreduce_inflight"] > 0 for r in two)
    assert all(r["phases"]["allreduce"] == 0 and r["allreduce_inflight"] == 0 for r in one)

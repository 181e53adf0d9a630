"""Real torchrun (gloo): every rank yields the same number of steps (a barrier per epoch would hang
otherwise), and the union of keys per epoch is every sample exactly once minus < world dropped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from .netkit import free_port
from .shardkit import all_keys, make_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prime_shards(tmp_path_factory):
    # 2 + 3 + 5 + 7 + 11 + 13 = 41 samples: not divisible by 2 or 3
    return make_shards(tmp_path_factory.mktemp("ddp") / "shards", [2, 3, 5, 7, 11, 13], n_mels=16, seed=5)


def run_torchrun(shards, out, nproc, workers, epochs=2, batch=4, extra=()):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "spkr.stream.data_only", "--shards", str(shards), "--split", "train",
        "--batch-size", str(batch), "--epochs", str(epochs), "--workers", str(workers),
        "--log-keys", str(out), "--seed", "3", "--timeout", "60", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check(shards, out, nproc, epochs=2):
    keys = set(all_keys(shards))
    logs = {r: [json.loads(line) for line in open(out / f"rank{r}.jsonl")] for r in range(nproc)}
    orders = []
    for epoch in range(epochs):
        steps = {r: [x for x in logs[r] if x["epoch"] == epoch] for r in range(nproc)}
        assert len({len(s) for s in steps.values()}) == 1, {r: len(s) for r, s in steps.items()}
        assert all([x["step"] for x in s] == list(range(len(s))) for s in steps.values())
        got = Counter(k for s in steps.values() for x in s for k in x["keys"])
        assert max(got.values()) == 1  # no duplicate
        assert set(got) <= keys
        assert len(keys) - len(got) == len(keys) % nproc < nproc  # only the documented drop
        orders.append([k for r in range(nproc) for x in steps[r] for k in x["keys"]])
    if epochs > 1:
        assert orders[0] != orders[1]  # reshuffled per epoch


ALL = [(n, w) for n in (2, 3) for w in (0, 1, 2)]
FAST = [(2, 2), (3, 0)]


@pytest.mark.parametrize(
    "nproc,workers",
    [pytest.param(n, w, marks=() if (n, w) in FAST else pytest.mark.slow) for n, w in ALL],
)
def test_torchrun_exactly_once_equal_steps(prime_shards, tmp_path, nproc, workers):
    proc = run_torchrun(prime_shards, tmp_path / "keys", nproc, workers)
    check(prime_shards, tmp_path / "keys", nproc)
    assert "samples/s" in proc.stdout and "dropped" in proc.stdout and "% data wait" not in proc.stdout
    waits = [float(w) for w in re.findall(r"data wait ([\d.]+) %", proc.stdout)]
    assert len(waits) == 2 * nproc and all(0 <= w <= 100 for w in waits)  # one per rank and epoch

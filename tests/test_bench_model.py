"""tools/bench_model.py's equality check of each baseline against the fast path: an explicit check that
stops the benchmark, also under ``python -O`` (which drops ``assert`` statements)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import importlib.util
import torch
spec = importlib.util.spec_from_file_location("bench_model", {path!r})
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
want = (torch.ones(3), {{"w": torch.ones(2)}})
bench.same_as(want, "pscan T=256")(want)  # the same result: no stop
bench.same_as(want, "pscan T=256")((torch.ones(3), {{"w": torch.tensor([1.0, 2.5])}}))
print("not stopped")
"""


def test_a_baseline_that_differs_stops_the_benchmark_under_python_O():
    code = CHECK.format(path=str(REPO / "tools" / "bench_model.py"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 1 and "not stopped" not in done.stdout, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == "pscan T=256: w differs from the fast path, max |diff| 1.5"

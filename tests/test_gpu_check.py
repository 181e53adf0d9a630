"""tools/gpu_check.py stays runnable where CI has no GPU: ``--dry-run`` runs every section on CPU at
tiny sizes (the Triton scan under its interpreter) and writes the report a GPU run writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runkit import subprocess_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(out)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    sections = ["env", "tests", "scans", "kernels", "train", "loader"]
    assert list(report) == [sections[0], "seconds", *sections[1:]] and list(report["seconds"]) == sections
    assert report["env"]["triton_interpret"] == "1" and report["tests"]["returncode"] == 0
    scans = report["scans"]["scans"]
    assert {"spkr triton", "mambapy pscan", "spkr cpu-scan"} <= set(scans)
    assert all(row["equal_to_reference"] for row in scans.values()), scans
    for arch in ("mamba1", "mamba2"):
        rows = report["kernels"][arch]
        assert rows and all(row["equal_to_reference"] for row in rows.values()), rows
    assert report["kernels"]["mamba1"]["spkr triton"]["fwd_bwd_s"]
    for name, run in report["train"].items():
        assert "error" not in run, (name, run)
        assert run["steps"] == 3 and run["samples_per_s"] > 0 and 0 <= run["data_wait_share"] < 1
    assert report["loader"]["samples_per_s"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "## scans" in md and "## train" in md

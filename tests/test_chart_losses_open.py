"""chart_losses follows the manifest: its default splits are the shard set's own (closed: valid, test;
open: valid, valid-verify, test-verify), each charted with its kind's figures (loss/accuracy, or
EER/minDCF on the trial list), training's rows reused only when they prove what they measured, and an
unknown split is an error naming the manifest and the splits it has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import spkr.tools.chart_losses as cl
from tests.runkit import TINY_RUN_MODEL, chart_counts, tiny_run

OPEN_EPOCHS = 2


@pytest.fixture(scope="module")
def open_tiny_run(open_shards, tmp_path_factory) -> Path:
    """The tiny deterministic model trained in-process for 2 epochs on the open demo shards: training
    validates valid + the valid-verify trials every epoch and scores test-verify at the end."""
    from spkr.train import main as train_main

    out = tmp_path_factory.mktemp("open_tiny") / "run"
    cfg = out.parent / "tiny.toml"
    cfg.write_text(TINY_RUN_MODEL)
    args = [
        "--shards", str(open_shards), "--config", str(cfg), "--out", str(out), "--no-progress",
        "--no-compile", "--dtype", "fp32", "--epochs", str(OPEN_EPOCHS), "--batch-size", "8",
        "--eval-batch-size", "8", "--crop-frames", "100", "--num-workers", "0", "--warmup-steps", "2",
    ]  # fmt: skip
    assert train_main(args) == 0
    return out


@pytest.mark.slow  # trains in-process on the open demo shards (~10 s)
def test_chart_losses_default_splits_of_an_open_run(open_tiny_run, open_shards, capsys):
    run = open_tiny_run
    manifest = json.loads((open_shards / "manifest.json").read_text())
    trials = {
        s: manifest["protocol"]["splits"][s]["trials"]["count"] for s in ("valid-verify", "test-verify")
    }

    assert cl.main(["--run", str(run), "--dtype", "fp32"]) == 0  # no --splits: the manifest's
    losses = json.loads((run / "losses.json").read_text())
    assert list(losses["splits"]) == ["valid", "valid-verify", "test-verify"]
    assert losses["kinds"] == {"valid": "classification", "valid-verify": "verification",
                               "test-verify": "verification"}  # fmt: skip
    assert losses["last_epoch_only"] == ["test-verify"]
    pts = losses["splits"]
    assert [p["epoch"] for p in pts["valid"]] == [p["epoch"] for p in pts["valid-verify"]] == [0, 1]
    assert [p["epoch"] for p in pts["test-verify"]] == [1]
    # training measured every point (valid rows hold the valid-verify EER; the test row test-verify's)
    assert chart_counts(run) == {"checkpoints": 2, "reused": 5, "evaluated": 0}
    assert all(p["source"] == "metrics.jsonl" for s in pts for p in pts[s])
    assert all({"loss", "acc"} <= p.keys() and "eer" not in p for p in pts["valid"])
    for split in ("valid-verify", "test-verify"):
        for p in pts[split]:
            assert "loss" not in p and p["trials"] == trials[split] and 0 <= p["eer"] <= 1
            assert {"min_dcf_0.01", "min_dcf_0.05", "n"} <= p.keys()
    assert (run / "losses.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "splits: valid (classification), valid-verify (verification), test-verify (verification)" in out
    assert "test-verify: last epoch only" in out

    # evaluated here instead: the same figures (another batch size: equal up to padding/fp32 noise)
    assert cl.main(["--run", str(run), "--dtype", "fp32", "--no-reuse", "--test-epochs", "all"]) == 0
    assert chart_counts(run) == {"checkpoints": 2, "reused": 0, "evaluated": 6}
    fresh = json.loads((run / "losses.json").read_text())["splits"]
    assert [p["epoch"] for p in fresh["test-verify"]] == [0, 1]
    for split in ("valid-verify", "test-verify"):
        a, b = pts[split][-1], fresh[split][-1]
        assert b["source"] == "evaluated" and b["trials"] == a["trials"] and b["n"] == a["n"]
        for k in ("eer", "min_dcf_0.01", "min_dcf_0.05"):
            assert b[k] == pytest.approx(a[k], abs=0.02), (split, k)

    # a split this shard set does not have: one line naming the manifest and what it has
    capsys.readouterr()
    assert cl.main(["--run", str(run), "--splits", "valid", "test"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--splits test: no such split in {open_shards / 'manifest.json'} (protocol open" in err
    assert "train (classification), valid (classification), valid-verify (verification)" in err
    assert "default --splits valid valid-verify test-verify" in err


@pytest.mark.slow  # trains in-process (~2 s)
def test_chart_losses_default_splits_of_a_closed_run(tmp_path_factory):
    run = Path(tiny_run(tmp_path_factory.getbasetemp())["run"])
    assert cl.main(["--run", str(run), "--dtype", "fp32"]) == 0
    losses = json.loads((run / "losses.json").read_text())
    assert list(losses["splits"]) == ["valid", "test"] and losses["last_epoch_only"] == ["test"]
    assert losses["kinds"] == {"valid": "classification", "test": "classification"}
    assert [p["epoch"] for p in losses["splits"]["test"]] == [2]

"""Protocol open end to end: training validates on the valid-verify trials and calibrates thresholds
(2-rank torchrun: embeddings of every utterance gathered once), spkr.evaluate scores test-verify's
trial list (+ AS-norm), and the gallery-side scoring/identification helpers on hand-made embeddings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spkr.run.evaluation import gallery_scores, identification
from spkr.run.metrics import read_metrics
from spkr.scoring import calibrate_thresholds
from spkr.shards.trials import make_trial_list
from tests.netkit import free_port
from tests.runkit import TINY_MODEL, subprocess_env

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers on hand-made data


def _res(keys, labels, emb) -> dict:
    return {"keys": list(keys), "labels": np.asarray(labels), "emb": np.asarray(emb, np.float32)}


def test_gallery_scores_use_enrollment_means_once_per_speaker_and_test_utterance():
    # speaker 0 enrolls a0, a1 (orthogonal: mean direction (1, 1)/sqrt 2); speaker 1 enrolls b0
    res = _res(["a0", "a1", "a2", "b0", "b1"], [0, 0, 0, 1, 1], [[1, 0], [0, 1], [1, 1], [-1, 0], [-1, 0.1]])
    trials = make_trial_list(
        [1, 1, 0, 0, 1], ["a0", "a1", "a0", "a1", "b0"], ["a2", "a2", "b1", "b1", "b1"], "t"
    )
    scores, targets = gallery_scores(trials, res, ["a0", "a1", "b0"])
    # (spk 0, a2) twice and (spk 0, b1) twice in the list: one gallery trial each
    assert len(scores) == 3 and targets.tolist() == [True, False, True]
    assert scores[0] == pytest.approx(1.0)  # a2 = (1, 1) lies on speaker 0's mean
    assert scores[1] == pytest.approx(-0.9 / np.sqrt(2) / np.hypot(1, 0.1))
    assert scores[2] == pytest.approx(1 / np.hypot(1, 0.1))
    thr = calibrate_thresholds(scores, targets)
    assert thr["eer"] == 0.0 and thr["trials"] == 3


def test_identification_top1_against_enrollment_means():
    res = _res(
        ["a0", "a1", "b0", "b1", "c0"], [0, 0, 1, 1, 2], [[1, 0], [0.9, 0.2], [0, 1], [0.8, 0.3], [1, 1]]
    )
    ident = identification(res, ["a0", "b0"])
    # a1 -> a (right), b1 -> a (wrong); c0 has no enrollment: not identified
    assert ident == {"acc": 0.5, "n": 2, "speakers": 2}


# --------------------------------------------------------------------------- training + evaluate


OPEN_EPOCHS = 2


@pytest.fixture(scope="module")
def open_run(open_shards, tmp_path_factory) -> Path:
    """A tiny model trained 2 epochs on the open shards by a real 2-rank torchrun (gloo, eager), the final
    test on the weights of the best valid-verify EER (``--select valid``)."""
    out = tmp_path_factory.mktemp("open_run") / "run"
    (out.parent / "tiny.toml").write_text(TINY_MODEL)
    proc = _torchrun_train(out, open_shards)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _torchrun_train(out: Path, shards: Path) -> subprocess.CompletedProcess:
    """``spkr.train --out out`` (config ``out/../tiny.toml``) by a 2-rank torchrun, ``--select valid``; run
    again on a finished run, it resumes to its final test."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "spkr.train", "--config", str(out.parent / "tiny.toml"),
        "--shards", str(shards), "--out", str(out), "--no-progress", "--no-compile", "--dtype", "fp32",
        "--epochs", str(OPEN_EPOCHS), "--batch-size", "8", "--crop-frames", "100", "--eval-batch-size", "8",
        "--select", "valid",
    ]  # fmt: skip
    return subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_open_training_verifies_every_epoch_and_calibrates_thresholds(open_run, open_shards):
    from spkr.checkpoint import load, weights_fingerprint

    manifest = json.loads((open_shards / "manifest.json").read_text())
    splits = manifest["protocol"]["splits"]
    rows = read_metrics(open_run)
    valid = [r for r in rows if r["kind"] == "valid"]
    assert len(valid) == OPEN_EPOCHS
    for r in valid:  # classification valid + the valid-verify trials, every epoch
        assert r["n"] == splits["valid"]["num_utterances"] and "loss" in r
        v = r["verification"]
        assert v["split"] == "valid-verify" and v["trials"] == splits["valid-verify"]["trials"]["count"]
        assert 0 <= v["eer"] <= 1 and {"min_dcf_0.01", "min_dcf_0.05", "identification"} <= v.keys()
    (test,) = [r for r in rows if r["kind"] == "test"]
    assert "loss" not in test and test["n"] == splits["test-verify"]["num_utterances"]
    # --select valid: the test measured the weights of the first best valid-verify EER, kept in best.pt
    eers = [r["verification"]["eer"] for r in valid]
    best = valid[eers.index(min(eers))]
    assert test["weights"] == best["weights"] == test["selected"]["weights"]
    assert test["selected"]["epoch"] == best["epoch"] and test["selected"]["value"] == min(eers)
    assert weights_fingerprint(load(open_run / "best.pt")["model"]) == best["weights"]
    assert test["verification"]["split"] == "test-verify", test["verification"]
    assert test["verification"]["trials"] == splits["test-verify"]["trials"]["count"]

    ckpt = load(open_run / "last.pt")
    thr = ckpt["verification_thresholds"]
    assert thr["weights"] == weights_fingerprint(ckpt["model"]) == valid[-1]["weights"]
    assert thr["split"] == "valid-verify" and thr["step"] == ckpt["step"]
    assert thr == {
        **valid[-1]["verification"]["thresholds"],
        **{k: thr[k] for k in ("split", "weights", "epoch", "step")},
    }
    assert thr["min_dcf_threshold"] == pytest.approx(thr["min_dcf_threshold"]) and thr["trials"] > 0


@pytest.mark.slow
def test_evaluate_open_scores_the_test_trials_like_training(open_run, open_shards, tmp_path, capsys):
    from spkr.evaluate import main

    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(open_run / "best.pt"), "--dtype", "fp32", "--out", str(out)]
    assert main(argv + ["--as-norm", "--top-k", "5"]) == 0  # shards: the checkpoint's; split: test role
    res = json.loads(out.read_text())
    assert res["split"] == "test-verify" and res["kind"] == "verification" and "loss" not in res
    (test,) = [r for r in read_metrics(open_run) if r["kind"] == "test"]
    v, trained = res["verification"], test["verification"]
    # one process here, two ranks in training: other batches, the same embeddings up to padding/fp32 noise
    for k in ("eer", "min_dcf_0.01", "min_dcf_0.05", "trials", "target_trials"):
        assert v[k] == pytest.approx(trained[k], abs=0.02), k
    assert v["identification"]["n"] == trained["identification"]["n"] > 0
    assert v["as_norm"]["cohort"] == 10 and v["as_norm"]["top_k"] == 5 and 0 <= v["as_norm"]["eer"] <= 1
    assert "EER" in capsys.readouterr().out

    bad = [
        (["--split", "valid", "--as-norm"], "split 'valid' is a classification split"),
        (["--split", "nope"], "no split 'nope'"),
        (["--as-norm", "--top-k", "1"], "--top-k >= 2"),
    ]
    for extra, message in bad:
        assert main(argv + extra) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_select_valid_tests_the_selected_weights_on_every_rank(open_run, open_shards, tmp_path):
    """The final test of ``--select valid`` loads best.pt on both ranks, proven to be the selected weights:
    a copy of the finished run whose record selects epoch 0 (best.pt = ckpt-epoch000.pt) tests exactly
    those weights, with the figures spkr.evaluate gives for them; a best.pt of other weights is refused
    on every rank with the same one line."""
    from spkr.checkpoint import load, save_atomic, weights_fingerprint
    from spkr.evaluate import main as evaluate

    run = tmp_path / "run"
    shutil.copytree(open_run, run)
    shutil.copy(open_run.parent / "tiny.toml", tmp_path / "tiny.toml")
    epoch0 = load(run / "ckpt-epoch000.pt")
    last = load(run / "last.pt")
    assert weights_fingerprint(epoch0["model"]) != weights_fingerprint(last["model"])
    record = {
        **last["best"],
        "epoch": 0,
        "step": epoch0["step"],
        "weights": weights_fingerprint(epoch0["model"]),
    }
    save_atomic({**last, "best": record}, run / "last.pt")
    shutil.copy(run / "ckpt-epoch000.pt", run / "best.pt")
    (run / "metrics.jsonl").write_text("")
    proc = _torchrun_train(run, open_shards)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (test,) = [r for r in read_metrics(run) if r["kind"] == "test"]
    assert test["weights"] == record["weights"] and test["selected"]["epoch"] == 0
    out = tmp_path / "eval.json"
    assert (
        evaluate(["--checkpoint", str(run / "ckpt-epoch000.pt"), "--dtype", "fp32", "--out", str(out)]) == 0
    )
    v = json.loads(out.read_text())["verification"]
    assert v["eer"] == pytest.approx(test["verification"]["eer"], abs=0.02)

    shutil.copy(run / "last.pt", run / "best.pt")  # other weights than the record's
    proc = _torchrun_train(run, open_shards)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exitcode  : 2" in out, out[-3000:]
    assert f'File "{REPO / "spkr"}' not in out, out[-3000:]  # one line, no traceback on any rank
    errors = [ln for ln in out.splitlines() if ln.startswith("[train] error:")]
    assert errors and all("best.pt: not the weights of the best validation (epoch 0" in ln for ln in errors)


@pytest.mark.slow
def test_evaluate_refuses_a_changed_trial_file(open_run, open_shards, tmp_path, capsys):
    import shutil

    from spkr.evaluate import main

    copy = tmp_path / "shards"
    shutil.copytree(open_shards, copy)
    trials = copy / "trials" / "test-verify.txt"
    trials.write_text(trials.read_text().replace("1 ", "0 ", 1))
    argv = [
        "--checkpoint",
        str(open_run / "last.pt"),
        "--shards",
        str(copy),
        "--out",
        str(tmp_path / "e.json"),
    ]
    assert main(argv) == 2
    assert "test-verify.txt: sha256" in capsys.readouterr().err


def test_closed_manifest_keeps_valid_and_test(tmp_path):
    from spkr.run.evaluation import EvalSplits, eval_splits
    from spkr.run.trainer import training_splits
    from spkr.shards.format import Manifest
    from tests.shardkit import make_shards

    shards = make_shards(
        tmp_path / "s", splits={"train": [4], "valid": [2], "test": [2]}, n_mels=8, n_classes=2
    )
    manifest = Manifest.load(str(shards))
    assert eval_splits(manifest) == EvalSplits("valid", None, "test", ["valid", "test"])
    assert training_splits(manifest) == ["valid", "test"]


def test_training_refuses_a_changed_trial_file_before_training(open_shards, tmp_path, capsys):
    import shutil

    from spkr.train import main

    copy = tmp_path / "shards"
    shutil.copytree(open_shards, copy)
    trials = copy / "trials" / "valid-verify.txt"
    trials.write_text(trials.read_text().replace("0 ", "1 ", 1))
    (tmp_path / "tiny.toml").write_text(TINY_MODEL)
    argv = ["--shards", str(copy), "--config", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "run")]
    assert main(argv + ["--no-progress", "--no-compile", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "valid-verify.txt: sha256" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists()

"""EER / minDCF on hand-computable score sets, trial pairs, and chart_losses over a real run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from spkr.run.distributed import dtype_name, resolve_dtype
from spkr.scoring import compute_eer, compute_min_dcf, cosine_scores, make_trials, verification
from tests.runkit import chart_counts, tiny_run


def test_eer_and_min_dcf_hand_computed():
    # accept iff score >= t.  t=0.8: miss 1/3, fa 0;  t=0.5: miss 1/3, fa 1/3  -> EER 1/3
    scores = [0.9, 0.8, 0.3, 0.5, 0.2, 0.1]
    tar = [1, 1, 1, 0, 0, 0]
    eer, thr = compute_eer(scores, tar)
    assert eer == pytest.approx(1 / 3) and thr == pytest.approx(0.5)
    # minDCF(p=0.01) = min_t (0.01 miss + 0.99 fa) / 0.01 = min_t (miss + 99 fa) = 1/3 at t = 0.8
    dcf, dthr = compute_min_dcf(scores, tar, p_target=0.01)
    assert dcf == pytest.approx(1 / 3) and dthr == pytest.approx(0.8)
    # p_target 0.5: (0.5 miss + 0.5 fa) / 0.5 = miss + fa, best 1/3 (t = 0.8 or 0.3)
    assert compute_min_dcf(scores, tar, p_target=0.5)[0] == pytest.approx(1 / 3)


def test_eer_interpolates_across_ties():
    # tie at 1.0 between a target and a non-target: the ROC goes diagonally from (fa 0, miss 1/2)
    # to (fa 1/2, miss 0); the rates cross half way: EER 1/4
    assert compute_eer([2.0, 1.0, 1.0, 0.0], [1, 1, 0, 0])[0] == pytest.approx(0.25)
    assert compute_eer([3.0, 2.0, 1.0], [1, 0, 1])[0] == pytest.approx(0.5)


def test_extremes():
    assert compute_eer([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0])[0] == 0.0
    assert compute_min_dcf([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0])[0] == 0.0
    assert compute_eer([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0])[0] == 1.0
    assert compute_min_dcf([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0])[0] == pytest.approx(1.0)  # reject all
    with pytest.raises(ValueError, match="non-target"):
        compute_eer([0.1, 0.2], [1, 1])


def test_eer_matches_brute_force_on_random_scores():
    rng = np.random.default_rng(0)
    tar = rng.normal(1.0, 1.0, 400)
    non = rng.normal(-1.0, 1.0, 600)
    s = np.r_[tar, non]
    y = np.r_[np.ones(400), np.zeros(600)]
    eer, _ = compute_eer(s, y)
    grid = np.sort(s)
    fnr = np.array([(tar < t).mean() for t in grid])
    fpr = np.array([(non >= t).mean() for t in grid])
    k = np.argmin(np.abs(fnr - fpr))
    assert abs(eer - (fnr[k] + fpr[k]) / 2) < 0.01
    assert abs(eer - 0.1587) < 0.03  # Phi(-1) for unit-variance Gaussians 2 apart


def test_trials_all_pairs_and_sampled():
    i, j, t = make_trials([0, 0, 1, 1, 2, 2])
    assert len(i) == 15 and t.sum() == 3 and np.all(i < j)
    labels = np.repeat(np.arange(10), 10)
    i, j, t = make_trials(labels, max_pairs=200, seed=1)
    assert len(i) == 200 and t.sum() == 100 and np.all(i < j)
    assert len(set(zip(i.tolist(), j.tolist()))) == 200
    assert np.array_equal(t, labels[i] == labels[j])
    i2, j2, _ = make_trials(labels, max_pairs=200, seed=1)
    assert np.array_equal(i, i2) and np.array_equal(j, j2)


@pytest.mark.timeout(30)  # the old sampler looped forever here
def test_trials_with_too_few_nontarget_pairs_terminate_with_all_of_them():
    # one dominant speaker + a single utterance of another: 100 non-target pairs exist, 250 are wanted
    labels = np.array([0] * 100 + [1])
    with pytest.warns(UserWarning, match="only 100 distinct non-target pairs exist .* using all of them"):
        i, j, t = make_trials(labels, max_pairs=500, seed=3)
    assert t.sum() == 250 and (~t).sum() == 100 and np.all(i < j)
    assert set(zip(i[~t].tolist(), j[~t].tolist())) == {(k, 100) for k in range(100)}
    assert len(set(zip(i.tolist(), j.tolist()))) == len(i)
    with pytest.warns(UserWarning):
        i2, j2, _ = make_trials(labels, max_pairs=500, seed=3)
    assert np.array_equal(i, i2) and np.array_equal(j, j2)  # deterministic
    # just more than wanted (few to spare): a seeded sample of distinct pairs, no warning
    labels = np.array([0] * 100 + [1, 2, 2])  # 300 non-target pairs, 250 wanted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        i, j, t = make_trials(labels, max_pairs=500, seed=3)
    assert t.sum() == 250 and (~t).sum() == 250 and len(set(zip(i.tolist(), j.tolist()))) == 500
    assert np.array_equal(t, labels[i] == labels[j]) and np.all(i < j)
    # a dominant speaker among many utterances: plenty of non-target pairs, but rare among all pairs
    labels = np.array([0] * 5000 + list(range(1, 41)))
    i, j, t = make_trials(labels, max_pairs=4000, seed=0)
    assert t.sum() == 2000 and (~t).sum() == 2000 and len(set(zip(i.tolist(), j.tolist()))) == 4000


@pytest.mark.timeout(30)
def test_single_speaker_has_no_nontarget_trial_and_verification_says_so():
    labels = np.zeros(50, dtype=np.int64)
    with pytest.warns(UserWarning, match="only 0 distinct non-target pairs .* 1 speaker"):
        i, j, t = make_trials(labels, max_pairs=100, seed=0)
    assert len(i) == 50 and t.all()
    emb = np.random.default_rng(0).normal(size=(50, 8))
    for max_pairs in (100, 0):
        with pytest.raises(ValueError, match="at least 2 speakers .* 50 utterance"):
            verification(emb, labels, max_pairs=max_pairs)


def test_cosine_verification_on_clustered_embeddings():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    labels = np.repeat(np.arange(5), 8)
    emb = centers[labels] + 0.05 * rng.normal(size=(40, 16))
    assert cosine_scores(emb, np.array([0]), np.array([0]))[0] == pytest.approx(1.0)
    v = verification(emb, labels, max_pairs=0)
    assert v["eer"] == 0.0 and v["min_dcf"] == 0.0 and v["trials"] == 40 * 39 // 2


@pytest.mark.slow  # trains (in-process, ~2 s); the whole test takes ~10-20 s
def test_chart_losses_reuses_what_training_measured(tmp_path_factory, tmp_path):
    """Issue 11: chart_losses takes a point from metrics.jsonl only when the row proves it measured that
    checkpoint (weights fingerprint, step, epoch, dataset_id, every sample) and evaluates the rest: here
    valid epoch 0 (not validated by training). The test split is charted at the last epoch from
    training's final test row. The stale rows of the first run (same epochs, steps and dataset) are
    never used, and every reused value equals a fresh evaluation of its checkpoint."""
    import spkr.tools.chart_losses as cl
    from tests.shardkit import make_shards

    info = tiny_run(tmp_path_factory.getbasetemp())
    run = Path(info["run"])
    rows = {(r["kind"], r["step"]): r for r in info["rows"] if r["kind"] in ("valid", "test")}
    stale = {(r["kind"], r["step"]): r for r in info["stale"] if r["kind"] in ("valid", "test")}
    assert stale.keys() == rows.keys() and all(stale[k]["loss"] != rows[k]["loss"] for k in rows)
    assert all(stale[k]["epoch"] == rows[k]["epoch"] for k in rows)
    assert all(stale[k]["dataset_id"] == rows[k]["dataset_id"] for k in rows)

    fp32 = ["--dtype", "fp32"]  # training's precision here: evaluated points comparable with its rows
    assert cl.main(["--run", str(run), "--splits", "valid", "test", *fp32]) == 0
    assert chart_counts(run) == {"checkpoints": 3, "reused": 3, "evaluated": 1}
    losses = json.loads((run / "losses.json").read_text())
    valid, test = losses["splits"]["valid"], losses["splits"]["test"]
    assert [(r["epoch"], r["source"]) for r in valid] == [
        (0, "evaluated"), (1, "metrics.jsonl"), (2, "metrics.jsonl")
    ]  # fmt: skip
    assert [(r["epoch"], r["source"]) for r in test] == [(2, "metrics.jsonl")]
    for r in valid[1:] + test:  # the second run's rows, exactly
        kind = "test" if r in test else "valid"
        assert (r["loss"], r["acc"], r["n"]) == tuple(rows[kind, r["step"]][k] for k in ("loss", "acc", "n"))
    # the original checks: a sensible, learning curve and the training curves next to it
    assert all(0 <= r["acc"] <= 1 and r["loss"] > 0 for r in valid)
    assert valid[-1]["loss"] < valid[0]["loss"]
    assert losses["train"] and (run / "losses.png").stat().st_size > 1000

    # a fresh evaluation of every checkpoint gives the reused values (other batches: equal up to rounding)
    # in the precision training measured them with (fp32; chart_losses' default is the auto policy)
    assert cl.main(["--run", str(run), "--splits", "valid", "test", "--no-reuse", *fp32]) == 0
    assert chart_counts(run) == {"checkpoints": 3, "reused": 0, "evaluated": 4}
    fresh = json.loads((run / "losses.json").read_text())["splits"]
    for split, points in (("valid", valid), ("test", test)):
        assert [r["epoch"] for r in fresh[split]] == [r["epoch"] for r in points]
        for a, b in zip(points, fresh[split]):
            assert b["source"] == "evaluated" and a["n"] == b["n"] and a["acc"] == b["acc"]
            assert a["dtype"] == b["dtype"] == "float32"
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (split, a, b)

    # --test-epochs all: the two earlier checkpoints are evaluated on test too, nothing else
    # (default --dtype auto: training's precision policy for this CPU, as spkr.evaluate)
    assert cl.main(["--run", str(run), "--splits", "test", "--test-epochs", "all"]) == 0
    assert chart_counts(run) == {"checkpoints": 3, "reused": 1, "evaluated": 2}
    auto = dtype_name(resolve_dtype("auto", torch.device("cpu"))[0])
    test = json.loads((run / "losses.json").read_text())["splits"]["test"]
    assert [r["dtype"] for r in test] == [auto, auto, "float32"]  # the last one: training's fp32 row

    # other shards (allowed with a warning): another dataset_id (other training keys), valid of the same
    # size: what training measured is not what is charted, so nothing is reused
    splits = {"train": [15, 17], "valid": [10], "test": [8]}
    other = make_shards(tmp_path / "other", splits=splits, n_mels=16, n_classes=3, mean_frames=30, seed=6)
    args = ["--run", str(run), "--splits", "valid", "--shards", str(other)]
    assert cl.main(args) == 2  # refused, as before
    assert cl.main(args + ["--allow-other-dataset"]) == 0
    assert chart_counts(run) == {"checkpoints": 3, "reused": 0, "evaluated": 3}
    assert cl.main(["--run", str(tmp_path_factory.mktemp("empty"))]) == 2

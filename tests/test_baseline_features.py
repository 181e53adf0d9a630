"""tools/baseline_features.py: the mean/std-of-MFCC baseline (logistic regression on classification
splits, cosine on verification trials), on real tar shards read by spkr's loader."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from spkr.features import FeatureConfig
from spkr.shards.codec import Sample
from spkr.shards.format import Manifest
from spkr.shards.schema import shard_name
from spkr.shards.stats import RunningStats
from spkr.shards.writer import write_shard
from spkr.tools import shard as shard_tool

from .conftest import write_corpus
from .shardkit import write_manifest

REPO = Path(__file__).resolve().parents[1]
N_MELS = 24
SIZES = {"train": 200, "valid": 60, "test": 80}


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "baseline_features", REPO / "tools" / "baseline_features.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_features"] = module
    spec.loader.exec_module(module)
    return module


bf = _load_tool()


def write_profile_shards(out: Path, n_classes: int = 4, shuffle_labels: bool = False, seed: int = 0) -> dict:
    """Shards whose utterance i is class ``i % n_classes``'s spectral profile (its own dB offset per mel
    bin) plus frame noise, labelled with that class, or with a random label independent of the
    features (``shuffle_labels``). Returns {key: stored float16 features}."""
    rng = np.random.default_rng(seed)
    profiles = rng.normal(0.0, 3.0, (n_classes, N_MELS))
    infos, stats, stored = {}, RunningStats(N_MELS), {}
    for split, n in SIZES.items():
        samples = []
        for i in range(n):
            frames = int(rng.integers(20, 60))
            feats = (profiles[i % n_classes] + 2.0 * rng.standard_normal((frames, N_MELS))).astype(np.float16)
            label = int(rng.integers(n_classes)) if shuffle_labels else i % n_classes
            if split == "train":
                stats.update(feats)
            key = f"{split}-{i:04d}"
            stored[key] = feats
            samples.append(Sample(key, label, {"frames": frames}, feats))
        infos[split] = [write_shard(str(out), shard_name(split, 0), samples)]
    write_manifest(out, infos, FeatureConfig(n_mels=N_MELS), n_classes, stats.summary())
    return stored


def test_dct_is_orthonormal_dct2():
    d = bf.dct_matrix(N_MELS, N_MELS)
    np.testing.assert_allclose(d @ d.T, np.eye(N_MELS), atol=1e-12)
    np.testing.assert_allclose(d[0], np.full(N_MELS, 1 / np.sqrt(N_MELS)))  # c0 = scaled mean
    x = np.random.default_rng(1).normal(size=(5, N_MELS))
    # the textbook orthonormal DCT-II, term by term (what scipy.fft.dct(x, norm="ortho") computes)
    n = np.arange(N_MELS)
    reference = np.stack(
        [
            np.sqrt((1 if k == 0 else 2) / N_MELS) * (x * np.cos(np.pi * (n + 0.5) * k / N_MELS)).sum(1)
            for k in range(13)
        ],
        axis=1,
    )
    np.testing.assert_allclose(x @ bf.dct_matrix(N_MELS, 13).T, reference, atol=1e-12)
    with pytest.raises(ValueError, match="--n-mfcc"):
        bf.dct_matrix(N_MELS, N_MELS + 1)


def test_deltas_of_a_ramp_are_its_slope():
    ramp = np.arange(10, dtype=np.float64)[:, None] * np.array([[0.5, -2.0]])
    d = bf.deltas(ramp)
    np.testing.assert_allclose(d[2:-2], np.tile([[0.5, -2.0]], (6, 1)))


def test_vectors_are_whole_unnormalised_utterances(tmp_path):
    stored = write_profile_shards(tmp_path)
    manifest = Manifest.load(str(tmp_path))
    dct = bf.dct_matrix(N_MELS, 8)
    keys, _labels, vectors = bf.split_vectors(str(tmp_path), "test", dct, True, manifest)
    assert sorted(keys) == sorted(k for k in stored if k.startswith("test-"))
    expected = np.stack([bf.utterance_vector(stored[k], dct, True) for k in keys])
    np.testing.assert_allclose(vectors, expected, rtol=1e-12)  # every frame, as stored (no crop, no norm)
    assert vectors.shape == (SIZES["test"], 4 * 8)


def test_fewer_mfccs_are_columns_of_the_full_vector():
    x = np.random.default_rng(2).normal(size=(40, N_MELS))
    full = bf.utterance_vector(x, bf.dct_matrix(N_MELS, 12), True)
    for k in (3, 12):
        cut = full[bf.feature_columns(k, 12, True)]
        np.testing.assert_allclose(cut, bf.utterance_vector(x, bf.dct_matrix(N_MELS, k), True), rtol=1e-12)
    no_deltas = bf.utterance_vector(x, bf.dct_matrix(N_MELS, 12), False)
    np.testing.assert_allclose(
        no_deltas[bf.feature_columns(5, 12, False)], bf.utterance_vector(x, bf.dct_matrix(N_MELS, 5), False)
    )


def test_separable_classes_are_recognised(tmp_path):
    write_profile_shards(tmp_path)
    result = bf.run(str(tmp_path), n_mfcc=(8, 12))
    lr = result["logreg"]
    assert lr["test"]["acc"] >= 0.98 and lr["test"]["n"] == SIZES["test"]
    assert lr["valid"]["acc"] >= 0.95
    assert result["verification"] == {} and result["protocol"] == "closed"
    assert [(t["n_mfcc"], t["l2"]) for t in lr["search"]] == [
        (k, l2) for k in (8, 12) for l2 in sorted(bf.DEFAULT_L2)
    ]
    assert result["n_mfcc"] in (8, 12) and result["dim"] == 4 * result["n_mfcc"]


def test_shuffled_labels_stay_near_chance(tmp_path):
    write_profile_shards(tmp_path, shuffle_labels=True)
    result = bf.run(str(tmp_path), n_mfcc=(8, 12))
    assert result["logreg"]["test"]["acc"] <= 0.45  # chance 0.25 over 80 utterances (sd ~0.05)


def test_deterministic(tmp_path):
    write_profile_shards(tmp_path, seed=3)
    first, second = bf.run(str(tmp_path), n_mfcc=(6, 10)), bf.run(str(tmp_path), n_mfcc=(6, 10))
    first.pop("seconds"), second.pop("seconds")
    assert json.dumps(first) == json.dumps(second)


def test_cli_prints_one_line_and_writes_json(tmp_path, capsys):
    write_profile_shards(tmp_path / "shards")
    out = tmp_path / "baseline.json"
    assert bf.main(["--shards", str(tmp_path / "shards"), "--n-mfcc", "8", "--json", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    result = json.loads(out.read_text())
    assert "\n" not in line and f"{100 * result['logreg']['test']['acc']:.2f} %" in line
    assert result["dim"] == 32 and result["features"] == "mfcc8+delta mean+std"
    with pytest.raises(SystemExit) as e:
        bf.main(["--shards", str(tmp_path / "shards"), "--l2", "0.1,x"])
    assert e.value.code == 2
    assert bf.main(["--shards", str(tmp_path / "shards"), "--n-mfcc", "30"]) == 2  # > n_mels
    assert "--n-mfcc must be in 1..24" in capsys.readouterr().err


def test_open_protocol_scores_the_manifest_trials(tmp_path):
    """Real shard tool, protocol open: cosine EER on each verification split's own trial list."""
    # each speaker a tone at its own pitch (conftest.write_corpus); unseen pitches interleave the seen
    layout = {"train-clean-100": [1, 3, 5, 7], "dev-clean": [2, 6], "test-clean": [4, 8]}
    corpus = write_corpus(tmp_path / "corpus", layout, utts_per_speaker=6)
    shards = tmp_path / "open"
    argv = ["--source", str(corpus), "--out", str(shards), "--protocol", "open", "--no-progress"]
    assert shard_tool.main([*argv, "--enroll-per-speaker", "2"]) == 0
    result = bf.run(str(shards), n_mfcc=(12,))
    manifest = Manifest.load(str(shards))
    assert set(result["verification"]) == {"valid-verify", "test-verify"}
    for split, metrics in result["verification"].items():
        assert metrics["trials"] == manifest.data["protocol"]["splits"][split]["trials"]["count"]
        assert metrics["eer"] <= 0.2  # chance: 0.5 (measured: 0 and 0.06)
    assert "test" not in result["logreg"] and result["logreg"]["valid"]["split"] == "valid"

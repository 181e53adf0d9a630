"""The AS-norm cohort of spkr.evaluate: a bounded, seeded, per-speaker-balanced subset of the training
split (spkr.scoring.select_cohort), read alone (only the selected samples' bytes), averaged to one
embedding per speaker, and recorded in the evaluation result."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
import torch

from spkr.run.evaluation import cohort_selection, embed_cohort, eval_loader, read_selected, run_split
from spkr.scoring import select_cohort, speaker_means

# --------------------------------------------------------------------------- selection (pure)


def test_select_cohort_balances_speakers_and_spreads_over_sessions():
    # speaker 0: 3 sessions of 4; speaker 1: one session of 2; speaker 2: 2 sessions of 5
    labels = np.array([0] * 12 + [1] * 2 + [2] * 10)
    sessions = np.array([0] * 4 + [1] * 4 + [2] * 4 + [3] * 2 + [4] * 5 + [5] * 5)
    picked = select_cohort(labels, 3, seed=0, sessions=sessions)
    assert np.all(np.diff(picked) > 0)  # sorted, distinct
    assert Counter(labels[picked].tolist()) == {0: 3, 1: 2, 2: 3}  # min(K, utterances) each
    assert len(set(sessions[picked][labels[picked] == 0])) == 3  # one per session before repeating
    assert len(set(sessions[picked][labels[picked] == 2])) == 2

    again = select_cohort(labels, 3, seed=0, sessions=sessions)
    assert again.tolist() == picked.tolist()  # seeded
    others = {tuple(select_cohort(labels, 3, seed=s, sessions=sessions).tolist()) for s in range(1, 8)}
    assert len(others - {tuple(picked.tolist())}) > 1  # another seed, other utterances

    # a speaker's picks depend only on the seed and its own utterances, not on the other speakers
    only0 = select_cohort(labels[:12], 3, seed=0, sessions=sessions[:12])
    assert only0.tolist() == picked[labels[picked] == 0].tolist()

    subset = select_cohort(labels, 10, seed=4, max_speakers=2, sessions=sessions)
    kept = set(labels[subset].tolist())
    assert len(kept) == 2 and all((labels[subset] == s).sum() == min(10, (labels == s).sum()) for s in kept)
    assert select_cohort(labels, 1, max_speakers=9).tolist() == select_cohort(labels, 1).tolist()
    with pytest.raises(ValueError, match="per_speaker must be >= 1"):
        select_cohort(labels, 0)
    with pytest.raises(ValueError, match="24 labels but 3 session ids"):
        select_cohort(labels, 2, sessions=[0, 1, 2])


# --------------------------------------------------------------------------- on the open demo shards


def _train_samples(manifest) -> dict[str, tuple]:
    return {
        k: (shard, i, lab)
        for shard in manifest.split("train").shards
        for i, (k, lab) in enumerate(zip(shard.keys, shard.labels))
    }


def test_cohort_selection_and_read_selected_read_only_the_cohort(open_shards):
    from spkr.shards.format import Manifest

    m = Manifest.load(str(open_shards))
    samples = _train_samples(m)
    keys, info = cohort_selection(m, "train", per_speaker=3, seed=7)
    assert len(keys) == 3 * len(m.labels) and not any("~aug" in k for k in keys)
    assert Counter(samples[k][2] for k in keys) == dict.fromkeys(range(len(m.labels)), 3)
    assert len({k.rsplit("-", 1)[0] for k in keys}) > len(m.labels)  # several chapters per speaker
    assert info["speakers"] == info["speakers_available"] == len(m.labels) and info["utterances"] == len(keys)
    assert info["utterances_available"] == len(samples) and (info["per_speaker"], info["seed"]) == (3, 7)
    assert info["keys_sha256"] == hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
    assert cohort_selection(m, "train", per_speaker=3, seed=7) == (keys, info)
    assert cohort_selection(m, "train", per_speaker=3, seed=8)[0] != keys
    few, few_info = cohort_selection(m, "train", per_speaker=2, seed=7, cohort_size=4)
    assert len(few) == 8 and few_info["speakers"] == 4 and few_info["cohort_size"] == 4

    pairs = list(read_selected(str(open_shards), m, "train", keys, 4, stats=m.stats))
    batches = [b for b, _ in pairs]
    got = [k for b in batches for k in b["keys"]]
    assert sorted(got) == sorted(keys) and all(len(b["keys"]) <= 4 for b in batches)

    # exactly the selected samples' bytes were read, from the shards holding them
    def span(shard, i):
        return (shard.offsets[i + 1] if i + 1 < shard.num_samples else shard.bytes) - shard.offsets[i]

    read = pairs[-1][1]  # what the whole pass read, with its last batch
    assert [r["samples"] for _, r in pairs] == np.cumsum([len(b["keys"]) for b in batches]).tolist()
    assert read == {
        "shards_read": len({samples[k][0].name for k in keys}),
        "samples": len(keys),
        "bytes_read": sum(span(*samples[k][:2]) for k in keys),
    }
    assert read["bytes_read"] < 0.3 * sum(s.bytes for s in m.split("train").shards)  # 30 of 152
    for b in batches:  # labels as in the manifest
        assert b["labels"].tolist() == [samples[k][2] for k in b["keys"]] and b["mel"].dtype == torch.float16


def _model_and_ckpt(manifest):
    from spkr.checkpoint import FORMAT, VERSION
    from spkr.config import to_dict
    from spkr.models import build_model
    from spkr.models.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=16, n_layers=1, d_state=4, frontend_channels=[16], embedding_dim=16, subsample=2
    )
    n_mels = manifest.feature_config.n_mels
    model = build_model(cfg, n_mels, len(manifest.labels)).eval()
    ckpt = {
        "format": FORMAT, "version": VERSION, "model": model.state_dict(), "model_config": to_dict(cfg),
        "labels": manifest.labels, "feature_config": manifest.data["feature_config"],
        "stats": manifest.stats, "dataset_id": manifest.dataset_id, "step": 0,
    }  # fmt: skip
    return model, ckpt


def test_embed_cohort_equals_a_loader_pass_over_the_same_utterances(open_shards):
    from spkr.shards.format import Manifest

    m = Manifest.load(str(open_shards))
    model, _ = _model_and_ckpt(m)
    cpu = torch.device("cpu")
    means, info = embed_cohort(model, str(open_shards), m, "train", cpu, stats=m.stats, per_speaker=2, seed=3)
    keys, _ = cohort_selection(m, "train", per_speaker=2, seed=3)
    loader = eval_loader(str(open_shards), "train", 8, stats=m.stats, manifest=m)
    ref = run_split(model, loader, cpu, embeddings=True, classify=False, keep=keys)
    assert sorted(ref["keys"]) == sorted(keys)
    _, ref_means = speaker_means(ref["emb"], ref["labels"])
    assert means.shape == ref_means.shape == (len(m.labels), 16)
    np.testing.assert_allclose(means, ref_means, atol=1e-5)
    assert info["shards_total"] == len(m.split("train").shards) and info["samples"] == len(keys)


def test_evaluate_as_norm_records_what_made_the_cohort(open_shards, capsys):
    from spkr.evaluate import AsNorm, evaluate_checkpoint
    from spkr.run.evaluation import EvalOptions
    from spkr.shards.format import Manifest

    m = Manifest.load(str(open_shards))
    _, ckpt = _model_and_ckpt(m)
    opts = EvalOptions(seed=5, top_k=5)
    kw = dict(device="cpu", batch_size=16)
    res = evaluate_checkpoint(ckpt, str(open_shards), None, opts, as_norm=AsNorm(2, 6), **kw)
    a = res["verification"]["as_norm"]
    assert res["split"] == "test-verify" and a["cohort"] == 6 and 0 <= a["eer"] <= 1
    how = a["cohort_selection"]
    assert (how["speakers"], how["utterances"], how["per_speaker"], how["seed"]) == (6, 12, 2, 5)
    assert how["cohort_size"] == 6 and how["split"] == "train" and how["samples"] == 12
    assert how["keys_sha256"] == cohort_selection(m, "train", 2, 5, 6)[1]["keys_sha256"]
    assert "seeded per-speaker-balanced" in how["selection"] and how["seconds"] >= 0
    assert "AS-norm cohort: 6 speakers from 12 of the" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--cohort-per-speaker must be >= 1"):
        evaluate_checkpoint(ckpt, str(open_shards), None, opts, as_norm=AsNorm(0), **kw)

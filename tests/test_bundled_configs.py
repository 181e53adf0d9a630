"""Bundled configs: tiny-transformer is the Transformer baseline trained exactly like tiny; tiny-aam is tiny
with the margin head."""

from __future__ import annotations

import tomllib

from spkr.models import ModelConfig, build_model
from spkr.run.configs import bundled_configs


def test_tiny_transformer_trains_like_tiny_at_a_similar_size():
    configs = bundled_configs()
    tiny = tomllib.loads(configs["tiny"].read_text())
    tt = tomllib.loads(configs["tiny-transformer"].read_text())
    assert tt["train"] == tiny["train"]  # same schedule, batch, augmentation: only the encoder differs
    assert tt["model"]["arch"] == "transformer"
    for key in ("d_model", "n_layers", "frontend_channels", "subsample", "pooling", "embedding_dim", "head"):
        assert tt["model"][key] == tiny["model"][key], key
    sizes = [
        sum(p.numel() for p in build_model(ModelConfig(**c["model"]), 80, 40).parameters())
        for c in (tiny, tt)
    ]
    assert 0.8 < sizes[1] / sizes[0] < 1.25, sizes  # "of similar size" (0.34M vs 0.37M)


def test_tiny_aam_is_tiny_with_the_margin_head():
    configs = bundled_configs()
    tiny = tomllib.loads(configs["tiny"].read_text())
    aam = tomllib.loads(configs["tiny-aam"].read_text())
    assert aam["train"] == tiny["train"] and aam["model"] == {**tiny["model"], "head": "aam"}

"""[model] input_norm = "utterance": per-utterance mean normalisation of the log-mels (CMN)."""

from __future__ import annotations

import pytest
import torch

from spkr.models import ModelConfig, build_model
from spkr.models.classifier import utterance_mean_norm

N_MELS, N_CLASSES = 20, 5


def small(**kw) -> ModelConfig:
    base = dict(
        d_model=16, n_layers=1, d_state=4, expand=2, frontend_channels=[16], frontend_kernel=5, subsample=2,
        embedding_dim=12, dropout=0.0, n_heads=2, backend="torch",
    )  # fmt: skip
    return ModelConfig(**{**base, **kw})


def test_utterance_mean_norm_values_and_padding():
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(3, 9, N_MELS, generator=g)
    lengths = torch.tensor([9, 4, 1])
    out = utterance_mean_norm(mel, lengths)
    for i, n in enumerate(lengths.tolist()):
        want = mel[i, :n] - mel[i, :n].mean(0, keepdim=True)
        torch.testing.assert_close(out[i, :n], want)
        assert torch.all(out[i, n:] == 0)  # padded frames zero, whatever they held
    assert torch.all(out[2, :1] == 0)  # one frame: nothing but its own mean


@pytest.mark.parametrize("arch", ["mamba", "transformer"])
def test_model_ignores_a_fixed_channel_colouring_only_with_input_norm(arch):
    """A microphone/room EQ adds a fixed per-bin offset to log-mels: with input_norm = "utterance" the
    embedding (of padded batches too) does not move; without it, it does (so the test can fail)."""
    g = torch.Generator().manual_seed(1)
    mel = torch.randn(2, 30, N_MELS, generator=g)
    lengths = torch.tensor([30, 17])
    eq = 3.0 * torch.randn(1, 1, N_MELS, generator=g)  # one colouring for every frame
    coloured = mel + eq
    coloured[1, 17:] = mel[1, 17:]  # padding holds anything: it must not matter
    for norm, same in (("utterance", True), ("none", False)):
        torch.manual_seed(0)
        model = build_model(small(arch=arch, input_norm=norm), N_MELS, N_CLASSES).eval()
        with torch.no_grad():
            a, b = model.embed(mel, lengths), model.embed(coloured, lengths)
        assert torch.allclose(a, b, atol=1e-4) is same, (norm, (a - b).abs().max())


def test_input_norm_is_validated():
    with pytest.raises(ValueError, match="input_norm"):
        small(input_norm="global")

"""Classifier: padding invariance, heads, backends, config loading, torch.compile, bf16 autocast."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from spkr.config import ConfigError
from spkr.models import BackendUnavailable, ModelConfig, build_model, mamba_ssm_available
from spkr.models.classifier import AAMHead, reverse_index

ROOT = Path(__file__).resolve().parents[1]


def model_config(path) -> ModelConfig:
    """The [model] table of a config file (or bundled name), read the way spkr.train reads --config."""
    from spkr.run.configs import load_configs
    from spkr.train import parse_args

    return load_configs(parse_args(["--shards", "x", "--config", str(path)]))[0]


N_MELS, N_CLASSES = 20, 7


def small(**kw) -> ModelConfig:
    base = dict(
        d_model=16,
        n_layers=2,
        d_state=4,
        expand=2,
        headdim=8,
        chunk_size=0,
        frontend_channels=[16, 16],
        frontend_kernel=5,
        embedding_dim=12,
        dropout=0.0,
        n_heads=2,
        backend="torch",
    )
    base.update(kw)
    if base.get("arch") == "mamba2" and "d_state" not in kw:
        base["d_state"] = 8
    return ModelConfig(**base)


def _padded_vs_alone(model, lengths, T_pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mel = torch.randn(B, T_pad, N_MELS, generator=g)
    lengths_t = torch.tensor(lengths)
    with torch.no_grad():
        emb_batch = model.embed(mel, lengths_t)
        frames_batch, out_len = model.encode(mel, lengths_t)
        alone = [model.embed(mel[i : i + 1, :n], lengths_t[i : i + 1]) for i, n in enumerate(lengths)]
        frames_alone = [
            model.encode(mel[i : i + 1, :n], lengths_t[i : i + 1])[0] for i, n in enumerate(lengths)
        ]
    return emb_batch, torch.cat(alone), frames_batch, frames_alone, out_len


@pytest.mark.parametrize(
    "kw",
    [
        dict(arch="mamba", bidirectional=False, pooling="mean", subsample=1),
        dict(arch="mamba", bidirectional=True, pooling="attentive_stats", subsample=2),
        dict(arch="mamba", bidirectional=True, pooling="mean", subsample=4),
        dict(arch="mamba2", bidirectional=True, pooling="attentive_stats", subsample=2, chunk_size=8),
        dict(arch="transformer", pooling="attentive_stats", subsample=2),
    ],
    ids=["mamba-uni-mean", "mamba-bi-stats-s2", "mamba-bi-mean-s4", "mamba2-bi-s2", "transformer"],
)
def test_padding_invariance(kw):
    torch.manual_seed(0)
    model = build_model(small(**kw), N_MELS, N_CLASSES).eval()
    lengths = [45, 17, 30, 1]
    emb_b, emb_a, frames_b, frames_a, out_len = _padded_vs_alone(model, lengths, 52)
    assert torch.allclose(emb_b, emb_a, atol=1e-4), (emb_b - emb_a).abs().max()
    for i, fa in enumerate(frames_a):
        n = int(out_len[i])
        assert fa.shape[1] == n
        assert torch.allclose(frames_b[i, :n], fa[0], atol=1e-4), (i, (frames_b[i, :n] - fa[0]).abs().max())
        assert torch.all(frames_b[i, n:] == 0)


def test_padding_invariance_can_fail_without_masking():
    # sanity check that the test above is sensitive: ignoring the lengths changes the embedding
    torch.manual_seed(0)
    model = build_model(small(arch="mamba"), N_MELS, N_CLASSES).eval()
    mel = torch.randn(1, 40, N_MELS)
    with torch.no_grad():
        a = model.embed(mel, torch.tensor([25]))
        b = model.embed(mel, torch.tensor([40]))
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("sub", [1, 2, 4])
def test_output_lengths_match_frontend(sub):
    model = build_model(small(subsample=sub), N_MELS, N_CLASSES)
    for T in [1, 2, 3, 4, 5, 16, 17, 101]:
        x, _ = model.frontend(torch.zeros(1, T, N_MELS), torch.tensor([T]))
        assert x.shape[1] == int(model.output_lengths(torch.tensor([T]))[0])
        assert x.shape[1] == -(-T // sub)


def test_reverse_reverses_each_row_within_its_length():
    from spkr.models.classifier import _reverse, reverse_rows

    rows = reverse_rows(torch.tensor([3, 5, 1]), 5)
    x = torch.arange(15.0).view(3, 5, 1)
    assert _reverse(x, rows)[..., 0].tolist() == [[2, 1, 0, 3, 4], [9, 8, 7, 6, 5], [10, 11, 12, 13, 14]]
    assert torch.equal(_reverse(_reverse(x, rows), rows), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_reversal_matches_gather_with_gradients(dtype):
    """The encoder's reversal (row index_select forward and backward) gives exactly the gather's
    values and the gradient autograd derives for the gather (its scatter-add backward)."""
    from spkr.models.classifier import _reverse, reverse_rows

    lengths = torch.tensor([7, 3, 1, 7])
    x = torch.randn(4, 7, 5).to(dtype).requires_grad_()
    w = torch.randn(4, 7, 5).to(dtype)
    want = torch.gather(x, 1, reverse_index(lengths, 7).unsqueeze(-1).expand_as(x))
    got = _reverse(x, reverse_rows(lengths, 7))
    assert torch.equal(got, want)
    (g_got,), (g_want,) = (torch.autograd.grad((t * w).sum(), x) for t in (got, want))
    assert torch.equal(g_got, g_want)


def test_aam_margin_only_with_labels_in_training():
    torch.manual_seed(0)
    head = AAMHead(8, 5, margin=0.3, scale=10.0)
    emb = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    head.train()
    plain = head(emb)
    margin = head(emb, labels)
    assert plain.abs().max() <= 10.0 + 1e-5 and margin.abs().max() <= 10.0 + 1e-5
    target = torch.arange(6), labels
    assert torch.all(margin[target] < plain[target])  # margin lowers the target logit
    off = torch.ones_like(plain, dtype=torch.bool)
    off[target] = False
    assert torch.allclose(margin[off], plain[off])
    head.eval()
    assert torch.allclose(head(emb, labels), plain)


def test_model_forward_heads_and_shapes():
    torch.manual_seed(0)
    for head in ("softmax", "aam"):
        model = build_model(small(head=head), N_MELS, N_CLASSES)
        mel, lengths = torch.randn(3, 30, N_MELS), torch.tensor([30, 12, 5])
        logits = model(mel, lengths, torch.tensor([0, 1, 2]))
        assert logits.shape == (3, N_CLASSES)
        assert model.embed(mel, lengths).shape == (3, 12)
        logits.sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_backend_selection():
    cfg = small(backend="auto")
    model = build_model(cfg, N_MELS, N_CLASSES)
    assert model.backend_name() == "torch"  # CPU tensors -> pure torch even if mamba_ssm were installed
    assert build_model(small(backend="torch"), N_MELS, N_CLASSES).backend_name() == "torch"
    assert build_model(small(arch="transformer"), N_MELS, N_CLASSES).backend_name() == "transformer"
    if mamba_ssm_available() is not None:
        with pytest.raises(BackendUnavailable, match="mamba_ssm"):
            build_model(small(backend="mamba_ssm"), N_MELS, N_CLASSES)
    with pytest.raises(ValueError, match="backend"):
        small(backend="cuda")


def test_config_files_load_and_reject_unknown_keys(tmp_path):
    for name in ["mamba-ssm", "mamba-torch", "mamba2-torch", "transformer", "tiny"]:
        cfg = model_config(ROOT / "configs" / f"{name}.toml")
        assert cfg.arch in ("mamba", "mamba2", "transformer")
    assert model_config(ROOT / "configs" / "mamba-ssm.toml").backend == "mamba_ssm"
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\narch = "mamba"\nd_modle = 64\n')
    with pytest.raises(ConfigError, match="d_modle"):
        model_config(bad)
    bad.write_text('[model]\nd_model = "big"\n')
    with pytest.raises(ConfigError, match="d_model"):
        model_config(bad)
    bad.write_text('[model]\narch = "lstm"\n')
    with pytest.raises(ConfigError, match="arch"):
        model_config(bad)


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "transformer"])
def test_bf16_autocast_close_to_fp32(arch):
    torch.manual_seed(0)
    model = build_model(small(arch=arch, head="softmax"), N_MELS, N_CLASSES).eval()
    mel, lengths = torch.randn(2, 40, N_MELS), torch.tensor([40, 23])
    with torch.no_grad():
        ref = model.embed(mel, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.embed(mel, lengths)
    assert torch.isfinite(low).all()
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel


@pytest.mark.slow
def test_tiny_config_compiles_and_matches_eager():
    torch._dynamo.reset()
    cfg = model_config(ROOT / "configs" / "tiny.toml")
    cfg = dataclasses.replace(cfg, backend="torch")
    torch.manual_seed(0)
    model = build_model(cfg, N_MELS, N_CLASSES).eval()
    compiled = torch.compile(model)
    mel, lengths = torch.randn(2, 48, N_MELS), torch.tensor([48, 31])
    with torch.no_grad():
        ref = model(mel, lengths)
        out = compiled(mel, lengths)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


def test_no_graph_breaks_in_model():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(small(arch="mamba", bidirectional=True, pooling="attentive_stats"), N_MELS, N_CLASSES)
    mel, lengths = torch.randn(2, 24, N_MELS), torch.tensor([24, 9])
    explain = torch._dynamo.explain(model)(mel, lengths, torch.tensor([0, 1]))
    assert explain.graph_break_count == 0, explain.break_reasons


@pytest.mark.parametrize("config", sorted(p.stem for p in (ROOT / "configs").glob("*.toml")))
def test_param_groups_decay_only_projection_weights(config):
    """The model owns its AdamW groups. Every trainable parameter is in exactly one group;
    norms, biases and Mamba's A_log / D / dt_bias (Mamba-1's A_log is 2-D) are not decayed, projection
    and conv weights are; an AdamW step with zero gradients leaves the no-decay ones unchanged and
    shrinks the decayed ones by (1 - lr * weight_decay)."""
    import copy

    from spkr.models.classifier import RMSNorm

    cfg = model_config(ROOT / "configs" / f"{config}.toml")
    if cfg.arch != "transformer":
        cfg = dataclasses.replace(cfg, backend="torch")  # mamba_ssm needs CUDA; same parameters
    torch.manual_seed(0)
    model = build_model(cfg, N_MELS, N_CLASSES)
    lr, wd = 0.1, 0.5
    groups = model.param_groups(wd)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, wd]
    decay = next(g for g in groups if g["weight_decay"] == wd)
    keep = next(g for g in groups if g["weight_decay"] == 0.0)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))  # in one group only ...
    assert set(grouped) == {id(p) for p in model.parameters()}  # ... and every parameter in one
    names = dict(model.named_parameters())
    assert all(names[n] is p for g in groups for n, p in zip(g["param_names"], g["params"]))
    no_decay = set(keep["param_names"])
    for name, p in names.items():
        last = name.rsplit(".", 1)[-1]
        if last in ("A_log", "D", "dt_bias") or last.endswith("bias") or p.dim() < 2:
            assert name in no_decay, name
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.LayerNorm, RMSNorm)):
            assert all(f"{mod_name}.{n}" in no_decay for n, _ in mod.named_parameters()), mod_name
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d)):
            assert f"{mod_name}.weight" in decay["param_names"], mod_name
    if cfg.arch == "mamba":  # the bug: a 2-D A_log was decayed by a p.dim() >= 2 split
        a_logs = [n for n in no_decay if n.endswith("A_log")]
        assert a_logs and all(names[n].dim() == 2 for n in a_logs)
    if cfg.arch == "transformer":
        assert any(n.endswith("self_attn.in_proj_weight") for n in decay["param_names"])
    # a deep copy (EMA / SWA) loses the _no_weight_decay markers but not the grouping
    twin = copy.deepcopy(model).param_groups(wd)
    assert [g["param_names"] for g in twin] == [g["param_names"] for g in groups]

    before = {n: p.detach().clone() for n, p in names.items()}
    opt = torch.optim.AdamW(groups, lr=lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in names.items():
        if n in no_decay:
            assert torch.equal(p.detach(), before[n]), f"{n} was decayed"
        else:
            assert torch.allclose(p.detach(), before[n] * (1 - lr * wd)), f"{n} was not decayed"


# state dict of small(arch="mamba", bidirectional=True) as the code before the fast Mamba-1 scan wrote it
# (per encoder layer; spkr/models changes must keep loading such checkpoints)
MAMBA1_LAYER_KEYS = {
    "norm.weight": (16,),
    **{
        f"{direction}.{name}": shape
        for direction in ("fwd", "bwd")
        for name, shape in {
            "A_log": (32, 4),
            "D": (32,),
            "in_proj.weight": (64, 16),
            "conv1d.weight": (32, 1, 4),
            "conv1d.bias": (32,),
            "x_proj.weight": (9, 32),
            "dt_proj.weight": (32, 1),
            "dt_proj.bias": (32,),
            "out_proj.weight": (16, 32),
        }.items()
    },
}


def test_mamba1_checkpoint_layout_unchanged_and_fast_scan_matches_reference(tmp_path, monkeypatch):
    """A saved Mamba-1 state dict has the old names and shapes, reloads (weights_only, strict) into a
    new model with identical outputs, and the fast scan gives the logits and gradients of the
    sequential reference scan (what the previous implementations were checked against)."""
    from spkr.models import ssm

    torch.manual_seed(0)
    cfg = small(arch="mamba", bidirectional=True, pooling="attentive_stats", subsample=2)
    model = build_model(cfg, N_MELS, N_CLASSES)
    layer_keys = {
        k.split(".", 3)[3]: tuple(v.shape)
        for k, v in model.state_dict().items()
        if k.startswith("encoder.layers.0.")
    }
    assert layer_keys == MAMBA1_LAYER_KEYS
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)
    reloaded = build_model(cfg, N_MELS, N_CLASSES)
    reloaded.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    mel, lengths, labels = torch.randn(3, 37, N_MELS), torch.tensor([37, 20, 5]), torch.tensor([0, 3, 6])

    def logits_and_grads(m):
        out = m(mel, lengths, labels)
        grads = torch.autograd.grad(out.square().sum(), list(m.parameters()))
        return out.detach(), grads

    fast, fast_grads = logits_and_grads(model)
    assert torch.equal(reloaded(mel, lengths, labels), model(mel, lengths, labels))
    monkeypatch.setattr(ssm, "selective_scan_chunked", lambda *a, chunk_size: ssm.selective_scan_ref(*a))
    ref, ref_grads = logits_and_grads(model)
    assert torch.allclose(fast, ref, atol=1e-4, rtol=1e-4), (fast - ref).abs().max()
    for (name, _), g, r in zip(model.named_parameters(), fast_grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4 * max(1.0, r.abs().max().item()), rtol=1e-3), name

"""Scans: chunked fast paths == sequential references (values and gradients), parity with mambapy."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from spkr.models import ssm
from spkr.models.mamba import Mamba1, Mamba2, RMSNorm

ATOL = 1e-4  # fp32 fast path vs reference, on O(1) values
RTOL = 1e-4


def _mamba1_inputs(b, l, d, n, seed=0, dt_shift=-1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, d, generator=g)
    dt = F.softplus(torch.randn(b, l, d, generator=g) + dt_shift)
    A = -torch.exp(torch.randn(d, n, generator=g) * 0.5)
    B = torch.randn(b, l, n, generator=g)
    C = torch.randn(b, l, n, generator=g)
    D = torch.randn(d, generator=g)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)]


def _grads(fn, args, seed=1):
    y = fn(*args)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    return y, torch.autograd.grad((y * w).sum(), args)


def _close(a, b, atol=ATOL, rtol=RTOL, what=""):
    err = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max abs err {err:.3g}"


@pytest.mark.parametrize("l", [1, 7, 8, 16, 37, 64])
@pytest.mark.parametrize("chunk", [4, 8])
def test_mamba1_chunked_matches_reference(l, chunk):
    args = _mamba1_inputs(2, l, 6, 5)
    y_ref, g_ref = _grads(ssm.selective_scan_ref, args)
    y, g = _grads(lambda *a: ssm.selective_scan_chunked(*a, chunk_size=chunk), args)
    _close(y, y_ref, what="y")
    for name, a, b in zip("x dt A B C D".split(), g, g_ref):
        _close(a, b, atol=1e-3 * max(1.0, b.abs().max().item()), rtol=1e-4, what=f"grad {name}")


@pytest.mark.parametrize("segment", [16, 24, 256])
@pytest.mark.parametrize("per_block", ["7 channels", "2 batch items"])
def test_mamba1_chunked_many_blocks_and_batch(monkeypatch, segment, per_block):
    # several (batch items, channel group, time segment) blocks in the custom op, sharing reused
    # buffers: the state (and, in the backward pass, the adjoint) carried across segments, the last
    # one short; blocks of 7 of 40 channels (the last of 5), or of 2 of 3 batch items
    args = _mamba1_inputs(3, 203, 40, 4, dt_shift=-2.0)
    y_ref, g_ref = _grads(ssm.selective_scan_ref, args)
    monkeypatch.setattr(ssm, "SEGMENT", segment)
    seg_n = min(segment, 203) * 4  # elements per channel of a block's (seg, n) state
    monkeypatch.setattr(ssm, "BLOCK_ELEMENTS", seg_n * (7 if per_block == "7 channels" else 2 * 40))
    blocks = list(ssm._blocks(3, 40, 4, min(segment, 203)))
    assert len(blocks) == (18 if per_block == "7 channels" else 2)  # 3 items x 6 groups / items {0, 1}, {2}
    y, g = _grads(ssm.selective_scan_chunked, args)
    _close(y, y_ref, what="y")
    for name, a, b in zip("x dt A B C D".split(), g, g_ref):
        _close(a, b, atol=1e-3 * max(1.0, b.abs().max().item()), rtol=1e-4, what=f"grad {name}")


def test_mamba1_extreme_decay_stays_finite():
    # |dt*A| up to ~1e3 per step (decays underflow to 0): a cumsum/exp factorisation would overflow to
    # inf/nan; the chunked recurrence only multiplies decays in (0, 1]. Gradients too.
    x, dt, A, B, C, D = _mamba1_inputs(2, 40, 4, 3)
    dt = (dt * 50 + 5).detach().requires_grad_()
    A = (A * 20).detach().requires_grad_()
    args = [x, dt, A, B, C, D]
    y_ref, g_ref = _grads(ssm.selective_scan_ref, args)
    y, g = _grads(ssm.selective_scan_chunked, args)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in g)
    _close(y, y_ref, atol=1e-3, what="extreme decay")
    for name, a, b in zip("x dt A B C D".split(), g, g_ref):
        _close(a, b, atol=1e-3 * max(1.0, b.abs().max().item()), rtol=1e-4, what=f"extreme decay grad {name}")


def test_mamba1_under_bf16_autocast_is_float32_inside():
    x, dt, A, B, C, D = (t.detach() for t in _mamba1_inputs(2, 24, 4, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ssm.selective_scan_chunked(x, dt, A, B, C, D)
    assert y.dtype == torch.float32
    _close(y, ssm.selective_scan_ref(x, dt, A, B, C, D), what="autocast")


def test_mamba1_bf16_inputs_get_gradients_rounded_once():
    # bf16 inputs are upcast inside the op; each gradient is computed in float32 (D skip included)
    # and rounded to bf16 once -- exactly what autograd gives for float32 math behind .float() casts
    args = [t.detach() for t in _mamba1_inputs(2, 30, 6, 4)]
    low = [
        t.bfloat16().requires_grad_() if i in (0, 3, 4) else t.requires_grad_() for i, t in enumerate(args)
    ]
    y, g = _grads(ssm.selective_scan_chunked, low)
    y_ref, g_ref = _grads(
        lambda x, dt, A, B, C, D: ssm.selective_scan_ref(x.float(), dt, A, B.float(), C.float(), D), low
    )
    assert y.dtype == torch.float32 and [t.dtype for t in g] == [t.dtype for t in low]
    _close(y, y_ref, what="y")
    for name, a, b in zip("x dt A B C D".split(), g, g_ref):
        tol = 1e-3 * max(1.0, b.abs().max().item())
        _close(a.float(), b.float(), atol=tol, rtol=1e-2, what=f"bf16 grad {name}")


def test_mamba1_without_D_matches_reference():
    x, dt, A, B, C, _ = _mamba1_inputs(2, 19, 5, 3)
    y_ref, g_ref = _grads(ssm.selective_scan_ref, [x, dt, A, B, C])
    y, g = _grads(ssm.selective_scan_chunked, [x, dt, A, B, C])
    _close(y, y_ref, what="y")
    for name, a, b in zip("x dt A B C".split(), g, g_ref):
        _close(a, b, atol=1e-3 * max(1.0, b.abs().max().item()), rtol=1e-4, what=f"grad {name}")


def _causal_conv_autograd(x, w, bias):
    """The depthwise causal conv as plain ops, differentiated by autograd (the previous code)."""
    l, K = x.shape[1], w.shape[1]
    xp = F.pad(x, (0, 0, K - 1, 0))
    y = xp[:, 0:l] * w[:, 0]
    for k in range(1, K):
        y = y.addcmul_(xp[:, k : k + l], w[:, k])
    return y.add_(bias) if bias is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("l", [1, 2, 5, 37])
def test_causal_conv_backward_is_bitwise_autograd(dtype, l):
    """The conv's written-out backward gives bitwise the gradients autograd derives for the same
    forward (fp32, and bf16 inputs with fp32 weights as under autocast); values = nn.Conv1d's."""
    from spkr.models.mamba import _causal_conv

    g = torch.Generator().manual_seed(l)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(3, l, 6, generator=g).to(dtype).requires_grad_()
    gy = torch.randn(3, l, 6, generator=g)
    ours = _causal_conv(conv, x)
    ref = _causal_conv_autograd(x, conv.weight[:, 0, :], conv.bias)
    assert torch.equal(ours, ref)
    params = (x, conv.weight, conv.bias)
    for name, a, b in zip(("x", "w", "bias"), torch.autograd.grad((ours * gy).sum(), params),
                          torch.autograd.grad((ref * gy).sum(), params)):  # fmt: skip
        assert a.dtype == b.dtype and torch.equal(a, b), name
    want = conv(x.float().transpose(1, 2))[..., :l].transpose(1, 2)
    _close(ours.float(), want, atol=1e-5, what="vs nn.Conv1d")
    if l > 1:  # causal: the first frame does not depend on later ones
        assert torch.equal(_causal_conv(conv, x[:, :1]), ours[:, :1])


@pytest.mark.parametrize("cls", ["conv", Mamba1, Mamba2])
def test_compiled_gradients_equal_eager_ones(cls):
    """torch.compile'd training must get the eager gradients: with torch 2.11 the causal conv's
    autograd.Function (then updating its output in place) got zero gradients for x, w and bias when
    compiled. aot_eager: the same autograd tracing as inductor, without code generation."""
    from spkr.models.mamba import _causal_conv

    torch.manual_seed(0)
    if cls == "conv":
        conv = torch.nn.Conv1d(12, 12, 4, groups=12, padding=3)
        module, u = (lambda x: _causal_conv(conv, x)), torch.randn(2, 30, 12)
        params = dict(conv.named_parameters())
    else:
        layer = cls(16, d_state=8, headdim=8, backend="torch") if cls is Mamba2 else cls(16, d_state=4)
        module, u, params = layer, torch.randn(2, 30, 16), dict(layer.named_parameters())
    results = []
    for fn in (module, torch.compile(module, backend="aot_eager", dynamic=True)):
        x = u.clone().requires_grad_()
        y = fn(x)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        results.append(torch.autograd.grad((y * w).sum(), [x, *params.values()]))
    for name, a, b in zip(["input", *params], *results):
        assert b.abs().max() > 0 and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max()), name


def _mamba2_inputs(b, l, h, p, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=g)
    dt = F.softplus(torch.randn(b, l, h, generator=g))
    A = -torch.rand(h, generator=g) * 4 - 0.1
    B = torch.randn(b, l, n, generator=g)
    C = torch.randn(b, l, n, generator=g)
    D = torch.randn(h, generator=g)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)]


@pytest.mark.parametrize("l", [1, 5, 16, 33, 64])
@pytest.mark.parametrize("chunk", [8, 16])
@pytest.mark.parametrize("segment", [16, 24, 256])  # 1-3 chunks per segment, or one segment for all
def test_mamba2_chunked_matches_reference(l, chunk, segment, monkeypatch):
    monkeypatch.setattr(ssm, "SEGMENT", segment)  # state carried across segments
    args = _mamba2_inputs(2, l, 3, 4, 5)
    y_ref, g_ref = _grads(ssm.ssd_ref, args)
    y, g = _grads(lambda *a: ssm.ssd_chunked(*a, chunk_size=chunk), args)
    _close(y, y_ref, what="y")
    for name, a, b in zip("x dt A B C D".split(), g, g_ref):
        _close(a, b, atol=1e-3 * max(1.0, b.abs().max().item()), rtol=1e-4, what=f"grad {name}")


def test_segsum_matches_definition():
    a = torch.randn(2, 6)
    s = ssm.segsum(a)
    for i in range(6):
        for j in range(6):
            want = a[:, j + 1 : i + 1].sum(-1) if j <= i else torch.full((2,), float("-inf"))
            assert torch.allclose(s[:, i, j], want, atol=1e-6)


@pytest.mark.parametrize(
    "cls,kw", [(Mamba1, dict(d_state=4)), (Mamba2, dict(d_state=8, headdim=8, chunk_size=8))]
)
def test_block_chunked_matches_reference_with_param_grads(cls, kw):
    torch.manual_seed(0)
    blk = cls(16, backend="torch", **kw)
    u = torch.randn(2, 21, 16, requires_grad=True)
    outs = []
    for scan in ("ref", "chunked"):
        blk.zero_grad()
        u.grad = None
        y = blk(u, scan=scan)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), u.grad.clone(), {k: p.grad.clone() for k, p in blk.named_parameters()}))
    (y0, gu0, gp0), (y1, gu1, gp1) = outs
    _close(y1, y0, what="y")
    _close(gu1, gu0, what="grad u")
    for k in gp0:
        _close(gp1[k], gp0[k], atol=1e-4 * max(1.0, gp0[k].abs().max().item()), what=f"grad {k}")


# ------------------------------------------------------------------------------------------ mambapy parity


def _mambapy_block(d_model, d_state, pscan):
    mp = pytest.importorskip("mambapy.mamba")
    cfg = mp.MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, pscan=pscan)
    return mp, cfg


def _copy_into_mambapy(ours: Mamba1, theirs) -> None:
    """Same parameter names: in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj."""
    res = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys, res


@pytest.mark.parametrize("pscan", [True, False])
def test_parity_with_mambapy_block(pscan):
    mp, cfg = _mambapy_block(32, 8, pscan)
    torch.manual_seed(0)
    ours = Mamba1(32, d_state=8, d_conv=cfg.d_conv, expand=cfg.expand_factor, backend="torch")
    theirs = mp.MambaBlock(cfg)
    _copy_into_mambapy(ours, theirs)
    u = torch.randn(2, 50, 32)
    _close(ours(u), theirs(u), atol=1e-5, what="mambapy MambaBlock")


@pytest.mark.parametrize("pscan", [True, False])
def test_parity_with_mambapy_residual_block(pscan):
    mp, cfg = _mambapy_block(32, 8, pscan)
    torch.manual_seed(1)
    mixer = Mamba1(32, d_state=8, backend="torch")
    norm = RMSNorm(32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    theirs = mp.ResidualBlock(cfg)
    _copy_into_mambapy(mixer, theirs.mixer)
    theirs.norm.weight.data.copy_(norm.weight)
    u = torch.randn(2, 33, 32)
    _close(u + mixer(norm(u)), theirs(u), atol=1e-5, what="mambapy ResidualBlock")


# ------------------------------------------------------------------------------------------ mamba_ssm parity


def _mamba_ssm_ok() -> bool:
    from spkr.models.mamba import mamba_ssm_available

    return torch.cuda.is_available() and mamba_ssm_available() is None


@pytest.mark.cuda
@pytest.mark.skipif(not _mamba_ssm_ok(), reason="needs CUDA and mamba_ssm")
@pytest.mark.parametrize("cls,kw", [(Mamba1, dict(d_state=16)), (Mamba2, dict(d_state=64, headdim=32))])
def test_parity_with_mamba_ssm_kernels(cls, kw):
    torch.manual_seed(0)
    ours = cls(64, backend="auto", **kw).cuda()
    other = copy.deepcopy(ours)
    other.backend = "torch"
    assert ours.backend_name() == "mamba_ssm" and other.backend_name() == "torch"
    u = torch.randn(2, 300, 64, device="cuda")
    _close(ours(u), other(u), atol=2e-3, rtol=2e-3, what="mamba_ssm vs torch")

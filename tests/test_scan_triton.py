"""spkr's Triton scan (the GPU path) == the sequential reference: outputs and every gradient.

Without a GPU the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be set before
:mod:`spkr.models.scan_triton` is imported (Triton picks interpreter or compiler when a kernel is
defined), so this module sets it at collection when CUDA is absent; nothing else imports that module on
a CPU machine. Shapes are small (the interpreter runs each program in numpy) but cover several chunks of
``BLOCK_T`` frames, several channel blocks of ``BLOCK_D``, a state size that is not a power of two,
lengths that are not a multiple of the chunk, extreme decays, bf16 inputs, torch.compile, and the whole
bidirectional classifier on a padded batch against the pure-torch backend. On a GPU (``cuda`` marker)
the compiled kernels are checked at training-like sizes.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from spkr.models import ModelConfig, build_model, ssm  # noqa: E402
from spkr.models.mamba import BackendUnavailable, Mamba1, resolve_backend, triton_scan_available  # noqa: E402
from tests.test_ssm import _mamba1_inputs  # noqa: E402

pytestmark = pytest.mark.skipif(triton_scan_available() is not None, reason="Triton does not import here")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _scan():
    from spkr.models import scan_triton

    return scan_triton


def _inputs(b, l, d, n, seed=0, dt_shift=-1.0, device="cpu"):
    """tests/test_ssm.py's scan inputs (x, dt, A, B, C, D) on ``device``, as leaves needing grads."""
    return [t.detach().to(device).requires_grad_() for t in _mamba1_inputs(b, l, d, n, seed, dt_shift)]


def _value_and_grads(fn, args, seed=1):
    y = fn(*args)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    return y, torch.autograd.grad((y.float() * w).sum(), args)


def _check_against_reference(args, atol=1e-4, grad_rtol=1e-4):
    y_ref, g_ref = _value_and_grads(ssm.selective_scan_ref, args)
    y, g = _value_and_grads(_scan().selective_scan_triton, args)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    err = (y - y_ref).abs().max().item()
    assert torch.allclose(y, y_ref, atol=atol, rtol=1e-4), f"y: max abs err {err:.3g}"
    for name, a, r, inp in zip("x dt A B C D".split(), g, g_ref, args):
        assert a.dtype == inp.dtype and a.shape == inp.shape, name
        tol = atol * max(1.0, r.abs().max().item())
        err = (a.float() - r.float()).abs().max().item()
        assert torch.allclose(a.float(), r.float(), atol=tol, rtol=grad_rtol), f"grad {name}: {err:.3g}"


@pytest.mark.parametrize(
    "b,l,d,n",
    [
        (1, 1, 3, 4),  # one frame, one channel block, one chunk
        (2, 37, 6, 5),  # l not a multiple of BLOCK_T (3 chunks, the last short), n not a power of two
        (2, 32, 20, 8),  # l a multiple of BLOCK_T, two channel blocks (the second short)
    ],
)
def test_triton_scan_matches_reference(b, l, d, n):
    _check_against_reference(_inputs(b, l, d, n))


def test_triton_scan_extreme_decays_stay_finite():
    # |dt A| up to ~1e3 per step: decays underflow to 0; only products of decays in (0, 1] are formed
    x, dt, A, B, C, D = _inputs(2, 20, 4, 3)
    dt = (dt * 50 + 5).detach().requires_grad_()
    A = (A * 20).detach().requires_grad_()
    y, g = _value_and_grads(_scan().selective_scan_triton, [x, dt, A, B, C, D])
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in g)
    _check_against_reference([x, dt, A, B, C, D], atol=1e-3)


def test_triton_scan_reads_bf16_and_rounds_gradients_once():
    args = _inputs(1, 19, 5, 4)
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in args]
    y, g = _value_and_grads(_scan().selective_scan_triton, low)
    # the same float32 computation on the bf16 values, gradients rounded once to bf16
    y_ref, g_ref = _value_and_grads(
        ssm.selective_scan_ref, [t.detach().float().requires_grad_() for t in low]
    )
    assert y.dtype == torch.float32 and torch.allclose(y, y_ref, atol=1e-4, rtol=1e-4)
    for a, r in zip(g, g_ref):
        assert a.dtype == torch.bfloat16
        assert torch.allclose(
            a.float(), r.to(torch.bfloat16).float(), atol=2e-2 * max(1.0, r.abs().max()), rtol=2e-2
        )


def test_triton_scan_under_torch_compile():
    # the op's fake (shape) functions and autograd registration, as torch.compile traces them
    # with dynamic shapes, as the trainer compiles: the saved states' chunk count is symbolic in l
    fn = torch.compile(_scan().selective_scan_triton, backend="aot_eager", fullgraph=True, dynamic=True)
    for l in (21, 30):
        args = _inputs(2, l, 6, 4)
        y, g = _value_and_grads(fn, args)
        y_ref, g_ref = _value_and_grads(ssm.selective_scan_ref, args)
        assert torch.allclose(y, y_ref, atol=1e-4, rtol=1e-4)
        for a, r in zip(g, g_ref):
            assert torch.allclose(a, r, atol=1e-4 * max(1.0, r.abs().max().item()), rtol=1e-4)


def test_classifier_on_a_padded_batch_same_with_triton_and_torch_backends():
    # the whole bidirectional model (forward scan and within-length-reversed scan) on utterances of
    # different lengths: embeddings and every parameter gradient equal to the pure-torch backend's
    cfg = ModelConfig(arch="mamba", d_model=8, n_layers=1, d_state=4, frontend_channels=[8], embedding_dim=8)
    torch.manual_seed(0)
    ours = build_model(ModelConfig(**{**cfg.__dict__, "backend": "triton"}), 10, 3).to(DEVICE)
    other = copy.deepcopy(ours)
    other.cfg = ModelConfig(**{**cfg.__dict__, "backend": "torch"})
    for block in other.modules():
        if isinstance(block, Mamba1):
            block.backend = "torch"
    assert ours.backend_name() == "triton" and other.backend_name() == "torch"
    mel = torch.randn(3, 23, 10, device=DEVICE)
    lengths = torch.tensor([23, 9, 16], device=DEVICE)
    outs = []
    for model in (ours, other):
        model.eval()
        model.zero_grad()
        emb = model.embed(mel, lengths) if hasattr(model, "embed") else model(mel, lengths)[1]
        emb.float().square().sum().backward()
        outs.append(
            (emb.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        )
    (e1, g1), (e2, g2) = outs
    assert torch.allclose(e1, e2, atol=1e-5, rtol=1e-4)
    assert g1.keys() == g2.keys() and any("A_log" in k for k in g1)
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-5 * max(1.0, g2[k].abs().max().item()), rtol=1e-3), k


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) == "torch"  # the interpreter is for tests, never chosen by auto
    assert resolve_backend("torch", cuda) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="backend='triton' needs CUDA tensors; got device cpu"):
        resolve_backend("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", cpu) == "triton"
    assert resolve_backend("triton", cuda) == "triton"


# ------------------------------------------------------------------------------------------ on a GPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("b,l,d,n", [(4, 300, 192, 8), (2, 1001, 384, 16)])
def test_triton_scan_matches_reference_on_gpu(b, l, d, n):
    _check_against_reference(_inputs(b, l, d, n, device="cuda"), atol=2e-4, grad_rtol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_picks_a_gpu_scan_on_cuda():
    assert resolve_backend("auto", torch.device("cuda")) in ("mamba_ssm", "triton")

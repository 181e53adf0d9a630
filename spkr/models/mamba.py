"""Mamba-1 and Mamba-2 mixer blocks (pure PyTorch, spkr's Triton scan, or ``mamba_ssm``'s CUDA kernels).

Parameter names follow ``mamba_ssm`` / ``mambapy`` (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj;
Mamba-2: in_proj, conv1d, dt_bias, A_log, D, norm, out_proj) so weights can be copied across.

Backends choose only the scan kernel; every backend runs the very same parameters of the same module (the
mamba_ssm calls below take ``dt_proj.weight`` / ``dt_proj.bias``, ``A_log``, ``D``, ``dt_bias`` exactly as
the other paths do), so a state dict trained with one loads and runs with any other (spkr.checkpoint
picks the backend for the inference device):

    "torch"      :mod:`spkr.models.ssm`'s fast paths (the Mamba-1 one is written for CPU caches); anywhere
    "triton"     Mamba-1: :mod:`spkr.models.scan_triton` (chunked parallel scan; Triton ships with torch's
                 CUDA builds, nothing to compile); Mamba-2: ssm's chunked SSD, which torch.compile fuses.
                 CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``, for tests)
    "mamba_ssm"  the ``mamba_ssm`` package's kernels (a source build); CUDA tensors
    "auto"       on CUDA: mamba_ssm if it imports, else triton if it imports, else torch; elsewhere torch

``mamba_ssm`` and Triton are imported lazily, never at module import.

Shapes: u (b, l, d_model) -> (b, l, d_model); the blocks are causal along l.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from spkr.config import ConfigError
from spkr.models import ssm
from spkr.models.config import BACKENDS


class BackendUnavailable(ConfigError, RuntimeError):
    """backend='mamba_ssm' was requested but cannot be used here (a ConfigError, so CLIs report it in
    one line)."""


@functools.lru_cache(maxsize=1)
def mamba_ssm_available() -> str | None:
    """None if mamba_ssm's kernels import, else the reason why not."""
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA build raising something else
        return f"{type(e).__name__}: {e}"
    return None


@functools.lru_cache(maxsize=1)
def triton_scan_available() -> str | None:
    """None if spkr's Triton scan (and so Triton) imports, else the reason why not."""
    try:
        import spkr.models.scan_triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"{type(e).__name__}: {e}"
    return None


def triton_interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``): CPU tensors then
    run the Triton scan (slowly; tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> None:
    """Raise BackendUnavailable if ``backend`` can never work on this machine."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    why = {"mamba_ssm": mamba_ssm_available, "triton": triton_scan_available}.get(backend, lambda: None)()
    if why is not None:
        fix = {
            "mamba_ssm": "install the CUDA extra (pip install 'spkr[cuda]') on a CUDA machine",
            "triton": "install torch's CUDA build (it ships Triton)",
        }[backend]
        raise BackendUnavailable(
            f"backend={backend!r} requested but it cannot be imported ({why}); {fix}, "
            "or use backend='auto' / 'torch'"
        )


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend actually used for tensors on ``device``: "torch", "triton" or "mamba_ssm"."""
    if backend == "torch":
        return "torch"
    on_cuda = device.type == "cuda"
    if backend in ("mamba_ssm", "triton"):
        check_backend(backend)
        if not (on_cuda or (backend == "triton" and device.type == "cpu" and triton_interpreted())):
            raise BackendUnavailable(f"backend={backend!r} needs CUDA tensors; got device {device}")
        return backend
    if not on_cuda:
        return "torch"
    if mamba_ssm_available() is None:
        return "mamba_ssm"
    return "triton" if triton_scan_available() is None else "torch"


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def _causal_conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv over time: x (b, l, d) -> (b, l, d); same result as
    ``conv(x.transpose(1, 2))[..., :l]`` (conv1d with padding d_conv - 1), written as d_conv shifted
    multiply-adds because CPU depthwise conv1d backward is very slow for long sequences."""
    return _CausalConv.apply(x, conv.weight[:, 0, :], conv.bias)


class _CausalConv(torch.autograd.Function):
    """x (b, l, d), w (d, K), bias (d,) or None -> y[t] = sum_k x[t - (K-1) + k] w[:, k] + bias (x zero
    before frame 0), in the dtype x * w promotes to, as K shifted multiply-adds.

    The backward is written out because autograd's costs more: per tap, a zero-filled
    padded-length tensor for its slice's gradient, a cast, an accumulation. It does the same
    arithmetic in the same order, so the gradients are bitwise those autograd gives for the forward
    below (checked in tests/test_ssm.py): each tap's x-gradient gy * w[:, k] computed in gy's dtype,
    rounded to x's dtype and accumulated there from the last tap to the first; each w[:, k] gradient
    sum_{b,t} gy * x_padded[t + k]; the bias gradient sum_{b,t} gy.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        l, K = x.shape[1], w.shape[1]
        xp = F.pad(x, (0, 0, K - 1, 0))  # K-1 zero frames in front
        y = xp[:, 0:l] * w[:, 0]
        # out of place: under torch 2.11's torch.compile, in-place updates of y here left x, w and bias
        # with zero gradients (tests/test_ssm.py checks the compiled gradients against eager ones)
        for k in range(1, K):
            y = torch.addcmul(y, xp[:, k : k + l], w[:, k])
        ctx.save_for_backward(xp, w)
        ctx.has_bias = bias is not None
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        xp, w = ctx.saved_tensors
        K = w.shape[1]
        l = xp.shape[1] - (K - 1)
        gx = (gy * w[:, K - 1]).to(xp.dtype)  # (b, l, d): tap K-1 reads frame t itself
        gw = [(gy * xp[:, K - 1 :]).sum((0, 1))]
        for k in range(K - 2, -1, -1):  # tap k reads frame t - s
            s = min(K - 1 - k, l)
            gx[:, : l - s] += (gy[:, s:] * w[:, k]).to(xp.dtype)
            gw.append((gy * xp[:, k : k + l]).sum((0, 1)))
        gw = torch.stack(gw[::-1], dim=1).to(w.dtype)  # (d, K)
        return gx, gw, gy.sum((0, 1)).to(w.dtype) if ctx.has_bias else None


def _inv_softplus_dt(n: int, dt_min: float, dt_max: float, floor: float = 1e-4) -> torch.Tensor:
    """Standard Mamba dt bias init: dt ~ log-uniform[dt_min, dt_max], stored as softplus^-1(dt)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba1(nn.Module):
    """Mamba-1 mixer: in_proj -> (x, z); x -> causal conv -> SiLU -> selective scan (input-dependent
    dt, B, C; A = -exp(A_log), S4D-real init; D skip) -> * SiLU(z) -> out_proj."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int = 0,
        chunk_size: int = 8,
        backend: str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
    ):
        super().__init__()
        check_backend(backend)
        self.d_model, self.d_state, self.backend = d_model, d_state, backend
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.chunk_size = chunk_size
        d = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * d, bias=False)
        self.conv1d = nn.Conv1d(d, d, d_conv, groups=d, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(_inv_softplus_dt(d, dt_min, dt_max))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d, 1)  # S4D-real: A_n = -(n+1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(d, d_model, bias=False)

    def backend_name(self, device: torch.device | None = None) -> str:
        return resolve_backend(self.backend, device or self.A_log.device)

    def forward(self, u: torch.Tensor, scan: str = "chunked") -> torch.Tensor:
        """u: (b, l, d_model) -> (b, l, d_model). ``scan="ref"`` uses the sequential reference (tests)."""
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (b, l, d) each
        x = F.silu(_causal_conv(self.conv1d, x))
        dt_r, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())  # (d, n)
        if scan == "chunked" and self.backend_name(u.device) == "mamba_ssm":
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            delta = F.linear(dt_r, self.dt_proj.weight)  # bias + softplus fused in the kernel

            def channels_first(t):  # the kernel wants (b, d, l) and one dtype for x, delta, B, C, z:
                return t.transpose(1, 2).to(delta.dtype).contiguous()  # autocast's (the conv gives fp32)

            y = selective_scan_fn(
                channels_first(x),
                channels_first(delta),
                A,
                channels_first(B),
                channels_first(C),
                self.D.float(),
                z=channels_first(z),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
            ).transpose(1, 2)
            return self.out_proj(y.to(u.dtype))
        dt = F.softplus(self.dt_proj(dt_r).float())  # (b, l, d)
        if scan == "ref":
            y = ssm.selective_scan_ref(x, dt, A, B, C, self.D)
        elif self.backend_name(u.device) == "triton":
            from spkr.models.scan_triton import selective_scan_triton

            y = selective_scan_triton(x, dt, A, B, C, self.D)
        else:
            y = ssm.selective_scan_chunked(x, dt, A, B, C, self.D, chunk_size=self.chunk_size)
        y = y * F.silu(z.float())
        return self.out_proj(y.to(u.dtype))


class Mamba2(nn.Module):
    """Mamba-2 mixer: in_proj -> (z, xBC, dt); xBC -> causal conv -> SiLU -> SSD scan (A = -exp(A_log)
    scalar per head, one B/C group, D per head) -> gated RMSNorm(y * SiLU(z)) -> out_proj."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 32,
        chunk_size: int = 64,
        backend: str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
    ):
        super().__init__()
        check_backend(backend)
        self.d_model, self.d_state, self.backend = d_model, d_state, backend
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"d_inner={self.d_inner} is not a multiple of headdim={headdim}")
        self.headdim = headdim
        self.nheads = self.d_inner // headdim
        self.chunk_size = chunk_size
        d, n, h = self.d_inner, d_state, self.nheads
        self.in_proj = nn.Linear(d_model, 2 * d + 2 * n + h, bias=False)
        conv_dim = d + 2 * n
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(_inv_softplus_dt(h, dt_min, dt_max))
        self.A_log = nn.Parameter(torch.log(torch.empty(h).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(h))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = RMSNorm(d)
        self.out_proj = nn.Linear(d, d_model, bias=False)

    def backend_name(self, device: torch.device | None = None) -> str:
        return resolve_backend(self.backend, device or self.A_log.device)

    def forward(self, u: torch.Tensor, scan: str = "chunked") -> torch.Tensor:
        """u: (b, l, d_model) -> (b, l, d_model). ``scan="ref"`` uses the sequential reference (tests)."""
        b, l, _ = u.shape
        d, n, h, p = self.d_inner, self.d_state, self.nheads, self.headdim
        z, xBC, dt = torch.split(self.in_proj(u), [d, d + 2 * n, h], dim=-1)
        xBC = F.silu(_causal_conv(self.conv1d, xBC))
        x, B, C = torch.split(xBC, [d, n, n], dim=-1)
        A = -torch.exp(self.A_log.float())  # (h,)
        x = x.reshape(b, l, h, p)
        if scan == "chunked" and self.backend_name(u.device) == "mamba_ssm":
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

            y = mamba_chunk_scan_combined(
                x,
                dt,
                A,
                B.unsqueeze(2),
                C.unsqueeze(2),
                self.chunk_size,
                D=self.D,
                dt_bias=self.dt_bias,
                dt_softplus=True,
            )
        else:
            dtf = F.softplus(dt.float() + self.dt_bias.float())  # (b, l, h)
            if scan == "ref":
                y = ssm.ssd_ref(x, dtf, A, B, C, self.D)
            else:
                y = ssm.ssd_chunked(x, dtf, A, B, C, self.D, chunk_size=self.chunk_size)
        y = y.reshape(b, l, d)
        y = self.norm(y * F.silu(z.float()))  # gated RMSNorm (norm after gating, as in Mamba-2)
        return self.out_proj(y.to(u.dtype))

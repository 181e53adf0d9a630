"""The Mamba-1 selective scan as Triton kernels: spkr's GPU path, nothing to compile at install.

Computes the same function as :func:`spkr.models.ssm.selective_scan_ref` (dimension glossary in
:mod:`spkr.models.ssm`):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t * B_t          y_t = <C_t, h_t> + D * x_t

Parallel in time inside a chunk, sequential across chunks. One Triton program owns one batch item and
a block of ``BLOCK_D`` channels, and walks the sequence in chunks of ``BLOCK_T`` frames:

* forward: per chunk, the decays g = exp(dt A) and inputs u = dt x B as (BLOCK_T, BLOCK_D, n) tiles,
  then ``tl.associative_scan`` along time with the linear-recurrence combine
  (g1, u1) . (g2, u2) = (g1 g2, g2 u1 + u2), which gives every frame's state from a zero start and the
  decay product G_t since the chunk start; the carried state h enters as h_t += G_t h. y = sum_n C h.
  The state after each chunk is saved (``hs``, (b, c, d, n) with c = ceil(l / BLOCK_T)): the backward
  restarts each chunk from it, so nothing of size (b, l, d, n) is ever stored.
* backward: chunks last to first. The states of the chunk are recomputed from the saved start, the
  adjoint lam_t = gy_t C_t + g_{t+1} lam_{t+1} is the same scan run in reverse (coefficients g shifted
  by one frame, the adjoint of the next chunk's first frame carried in), then
      dL/du_t = lam_t,   dL/d(dt_t A) = lam_t * g_t h_{t-1} = lam_t * (h_t - u_t),   dL/dC_t = sum_d gy_t h_t.
  The sums over channels (dL/dB, dL/dC) and over batch and time (dL/dA, dL/dD) are written per program
  and added up in torch, in a fixed order: the gradients are deterministic (no atomics).

Only products of decays in (0, 1] appear (no exp of a cumulative sum, which overflows for extreme dt A),
as in the CPU path. Inputs of any float dtype are read and upcast to float32 in registers; y and the
gradients are float32 inside (gradients rounded once to each input's dtype).

Importing this module imports Triton (:func:`spkr.models.mamba.triton_scan_available` does it
guarded). On CPU tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before
this module is imported): slow, for tests at small shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile shape: BLOCK_T frames per chunk (the scan's length, and the interval of the saved states) x BLOCK_D
# channels per program, NUM_WARPS warps. tools/gpu_check.py times the alternatives (its "scans" section).
BLOCK_T = 8
BLOCK_D = 16
NUM_WARPS = 4


@triton.jit
def _combine(g1, u1, g2, u2):
    # (g1, u1) then (g2, u2): h -> g2 (g1 h + u1) + u2. Associative; the reverse scan uses it too
    return g1 * g2, g2 * u1 + u2


@triton.jit
def _tile(ptr, base, offs_t, offs_c, mask, stride):
    """(BLOCK_T, channels) float32 tile of a (b, l, stride) tensor; 0 where masked."""
    return tl.load(ptr + base + offs_t[:, None] * stride + offs_c[None, :], mask=mask, other=0.0).to(
        tl.float32
    )


@triton.jit
def _last_row(t, rows, last):
    """Row ``last`` of a (BLOCK_T, d, n) tile as (d, n)."""
    return tl.sum(tl.where((rows == last)[:, None, None], t, 0.0), axis=0)


@triton.jit
def _fwd(x, dt, A, B, C, D, y, hs, L, DD, N, n_chunks, BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    pb, pd = tl.program_id(0), tl.program_id(1)
    offs_d = pd * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    rows = tl.arange(0, BT)
    md, mn = offs_d < DD, offs_n < N
    a = tl.load(A + offs_d[:, None] * N + offs_n[None, :], mask=md[:, None] & mn[None, :], other=0.0)
    dskip = tl.load(D + offs_d, mask=md, other=0.0)
    h = tl.zeros((BD, BN), dtype=tl.float32)
    base_d, base_n = pb * L * DD, pb * L * N
    for c in range(n_chunks):
        offs_t = c * BT + rows
        mt = offs_t < L
        m_td, m_tn = mt[:, None] & md[None, :], mt[:, None] & mn[None, :]
        xt = _tile(x, base_d, offs_t, offs_d, m_td, DD)
        dtt = _tile(dt, base_d, offs_t, offs_d, m_td, DD)
        bt = _tile(B, base_n, offs_t, offs_n, m_tn, N)
        ct = _tile(C, base_n, offs_t, offs_n, m_tn, N)
        g = tl.exp(dtt[:, :, None] * a[None, :, :])  # frames past L: dt = 0, so g = 1 and u = 0
        u = (dtt * xt)[:, :, None] * bt[:, None, :]
        gc, hc = tl.associative_scan((g, u), 0, _combine)
        hc = hc + gc * h[None, :, :]
        yt = tl.sum(hc * ct[:, None, :], axis=2) + dskip[None, :] * xt
        tl.store(y + base_d + offs_t[:, None] * DD + offs_d[None, :], yt, mask=m_td)
        h = _last_row(hc, rows, BT - 1)
        hp = hs + ((pb * n_chunks + c) * DD + offs_d[:, None]) * N + offs_n[None, :]
        tl.store(hp, h, mask=md[:, None] & mn[None, :])


@triton.jit
def _bwd(
    gy, x, dt, A, B, C, D, hs, gx, gdt, gA, gB, gC, gD, L, DD, N, n_chunks, B_ITEMS,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    pb, pd = tl.program_id(0), tl.program_id(1)
    offs_d = pd * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    rows = tl.arange(0, BT)
    md, mn = offs_d < DD, offs_n < N
    m_dn = md[:, None] & mn[None, :]
    a = tl.load(A + offs_d[:, None] * N + offs_n[None, :], mask=m_dn, other=0.0)
    dskip = tl.load(D + offs_d, mask=md, other=0.0)
    lam_next = tl.zeros((BD, BN), dtype=tl.float32)  # adjoint at the first frame after the chunk
    ga_sum = tl.zeros((BD, BN), dtype=tl.float32)
    gd_sum = tl.zeros((BD,), dtype=tl.float32)
    base_d, base_n = pb * L * DD, pb * L * N
    part_n = (pd * B_ITEMS + pb) * L * N  # this program's slice of the per-channel-block partials
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        offs_t = c * BT + rows
        mt, mt1 = offs_t < L, offs_t + 1 < L
        m_td, m_tn = mt[:, None] & md[None, :], mt[:, None] & mn[None, :]
        xt = _tile(x, base_d, offs_t, offs_d, m_td, DD)
        dtt = _tile(dt, base_d, offs_t, offs_d, m_td, DD)
        dt1 = _tile(dt, base_d, offs_t + 1, offs_d, mt1[:, None] & md[None, :], DD)  # dt_{t+1}
        gyt = _tile(gy, base_d, offs_t, offs_d, m_td, DD)
        bt = _tile(B, base_n, offs_t, offs_n, m_tn, N)
        ct = _tile(C, base_n, offs_t, offs_n, m_tn, N)
        hp = hs + ((pb * n_chunks + c - 1) * DD + offs_d[:, None]) * N + offs_n[None, :]
        h0 = tl.load(hp, mask=m_dn & (c > 0), other=0.0)  # state before the chunk
        g = tl.exp(dtt[:, :, None] * a[None, :, :])
        dx = dtt * xt
        u = dx[:, :, None] * bt[:, None, :]
        gc, h = tl.associative_scan((g, u), 0, _combine)
        h = h + gc * h0[None, :, :]
        g1 = tl.exp(dt1[:, :, None] * a[None, :, :])  # g_{t+1}
        gl, lam = tl.associative_scan((g1, gyt[:, :, None] * ct[:, None, :]), 0, _combine, reverse=True)
        lam = lam + gl * lam_next[None, :, :]
        lam_next = _last_row(lam, rows, 0)
        lam_b = tl.sum(lam * bt[:, None, :], axis=2)  # dL/d(dt x): (BT, BD)
        ga = lam * (h - u)  # dL/d(dt A)
        tl.store(
            gx + base_d + offs_t[:, None] * DD + offs_d[None, :],
            lam_b * dtt + gyt * dskip[None, :],
            mask=m_td,
        )
        gdt_t = lam_b * xt + tl.sum(ga * a[None, :, :], axis=2)
        tl.store(gdt + base_d + offs_t[:, None] * DD + offs_d[None, :], gdt_t, mask=m_td)
        ga_sum += tl.sum(ga * dtt[:, :, None], axis=0)
        gd_sum += tl.sum(gyt * xt, axis=0)
        gb_t = tl.sum(lam * dx[:, :, None], axis=1)  # (BT, BN), this block's channels only
        gc_t = tl.sum(gyt[:, :, None] * h, axis=1)
        tl.store(gB + part_n + offs_t[:, None] * N + offs_n[None, :], gb_t, mask=m_tn)
        tl.store(gC + part_n + offs_t[:, None] * N + offs_n[None, :], gc_t, mask=m_tn)
    tl.store(gA + (pb * DD + offs_d[:, None]) * N + offs_n[None, :], ga_sum, mask=m_dn)
    tl.store(gD + pb * DD + offs_d, gd_sum, mask=md)


def _block_n(n: int) -> int:
    return max(2, 1 << (n - 1).bit_length())  # next power of two (tl.arange needs one)


def _launch(tile: list[int], b: int, l: int, d: int, n: int) -> tuple[tuple[int, int], int, dict]:
    """(grid, chunks, compile-time kwargs) of a kernel launch with ``tile`` = [BLOCK_T, BLOCK_D, warps]."""
    bt, bd, warps = tile
    if max(b * l * d, b * -(-d // bd) * l * n, b * -(-l // bt) * d * n) >= 2**31:
        raise ValueError(
            f"selective scan of (b, l, d, n) = {(b, l, d, n)}: too large for int32 offsets; split the batch"
        )
    return (b, -(-d // bd)), -(-l // bt), dict(BT=bt, BD=bd, BN=_block_n(n), num_warps=warps)


@torch.library.custom_op("spkr::selective_scan_triton", mutates_args=())
def _scan_op(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    tile: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (b, l, d) float32 and the states after each chunk hs (b, c, d, n) float32 (saved for backward)."""
    b, l, d = x.shape
    n = A.shape[1]
    grid, chunks, meta = _launch(tile, b, l, d, n)
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    y = torch.empty(b, l, d, device=x.device, dtype=torch.float32)
    hs = torch.empty(b, chunks, d, n, device=x.device, dtype=torch.float32)
    _fwd[grid](x, dt, A.float().contiguous(), B, C, D.float().contiguous(), y, hs, l, d, n, chunks, **meta)
    return y, hs


@_scan_op.register_fake
def _(x, dt, A, B, C, D, tile):
    b, l, d = x.shape
    y = x.new_empty(b, l, d, dtype=torch.float32)
    return y, x.new_empty(b, (l + tile[0] - 1) // tile[0], d, A.shape[1], dtype=torch.float32)


@torch.library.custom_op("spkr::selective_scan_triton_bwd", mutates_args=())
def _scan_bwd_op(
    gy: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    hs: torch.Tensor,
    tile: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. x, dt, A, B, C, D, each in its input's dtype (``tile`` the forward's: the
    saved states ``hs`` are per chunk of its BLOCK_T frames)."""
    b, l, d = x.shape
    n = A.shape[1]
    grid, chunks, meta = _launch(tile, b, l, d, n)
    gy, x, dt, B, C = (t.contiguous() for t in (gy, x, dt, B, C))
    f32 = dict(device=x.device, dtype=torch.float32)
    gx, gdt = torch.empty(b, l, d, **f32), torch.empty(b, l, d, **f32)
    gA, gD = torch.empty(b, d, n, **f32), torch.empty(b, d, **f32)
    gB, gC = torch.empty(grid[1], b, l, n, **f32), torch.empty(grid[1], b, l, n, **f32)
    _bwd[grid](
        gy, x, dt, A.float().contiguous(), B, C, D.float().contiguous(), hs, gx, gdt, gA, gB, gC, gD,
        l, d, n, chunks, b, **meta,
    )  # fmt: skip
    grads = (gx, gdt, gA.sum(0), gB.sum(0), gC.sum(0), gD.sum(0))
    return tuple(g.to(t.dtype) for g, t in zip(grads, (x, dt, A, B, C, D)))


@_scan_bwd_op.register_fake
def _(gy, x, dt, A, B, C, D, hs, tile):
    return tuple(torch.empty_like(t) for t in (x, dt, A, B, C, D))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], output[1])
    ctx.tile = inputs[6]


def _backward(ctx, gy, _ghs):
    return *_scan_bwd_op(gy, *ctx.saved_tensors, ctx.tile), None


_scan_op.register_autograd(_backward, setup_context=_setup)


def selective_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba-1 selective scan on the GPU (Triton), same arguments and result as
    :func:`spkr.models.ssm.selective_scan_ref`: x, dt (b, l, d); A (d, n); B, C (b, l, n); D (d,) or
    None -> y (b, l, d) float32. Inputs may be bf16/fp16 (read and upcast in the kernel)."""
    if D is None:
        D = A.new_zeros(A.shape[0])
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _scan_op(x, dt, A, B, C, D, [BLOCK_T, BLOCK_D, NUM_WARPS])[0]

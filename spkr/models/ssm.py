"""Selective state-space scans in pure PyTorch: Mamba-1 (diagonal A) and Mamba-2 (SSD, scalar A per head).

Each scan has two implementations that compute the same function:

* a **sequential reference** (``*_ref``): one autograd-tracked Python step per time frame, written to
  be read and checked (mamba-minimal style). Slow; used by tests and the benchmark only.
* a **fast path** (``selective_scan_chunked``, ``ssd_chunked``). Both work through the sequence in
  segments of ``SEGMENT`` frames and carry the state from one segment to the next, so every
  intermediate has the same, cache-sized shape whatever T: the cost is linear in T.

  - Mamba-1: a ``torch.library`` custom op with a hand-written backward (no autograd graph inside),
    working in blocks of (batch items, channel group, segment) of about ``BLOCK_ELEMENTS`` state
    values, in reused buffers. Per block: all decays g = exp(dt A) and inputs u = dt x B in one
    vectorised op each, then the recurrence h_t = g_t h_{t-1} + u_t as one in-place multiply-add per
    frame over the block's (batch items, n, channels) slab, then y = C h as one batched matmul. The
    backward recomputes h the same way and runs the adjoint recurrence lam_t = gy_t C_t +
    g_{t+1} lam_{t+1} from the last frame to the first (see :func:`_ssm1_bwd`). Only products of
    decays in (0, 1] and sums appear: nothing can overflow whatever dt and A are (no clamp).
  - Mamba-2: chunks of ``chunk_size`` frames; inside a chunk everything is a parallel tensor expression
    (segment sums), across chunks a short recurrence over the chunk states.

Both fast paths compute in float32 inside (autocast is disabled in the scan) and return float32;
callers under bf16 autocast get the cast back by the next autocast-aware op.

Dimension glossary (used in shapes below)
----------------------------------------
    b   batch
    l   sequence length T (frames)
    d   d_inner = expand * d_model (channels of the SSM)
    n   d_state (state size per channel)
    h   heads (Mamba-2), d = h * p
    p   head dim (Mamba-2)
    c   number of chunks = ceil(l / L) (Mamba-2)
    L   chunk length (``chunk_size``, Mamba-2); ``s``/``t`` index frames in a chunk
    bb, k, seg   Mamba-1 blocks: batch items, channels (a slice of d) and frames (a segment) of a block

Mamba-1 recurrence (per channel d and state n, with dA = exp(dt * A)):
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t          y_t = <C_t, h_t> + D * x_t
Mamba-2 recurrence (per head h, A scalar, the state is a (p, n) matrix):
    H_t = exp(dt_t * A) * H_{t-1} + dt_t * x_t B_t^T          y_t = H_t C_t + D * x_t

Why Mamba-1 steps frame by frame: a chunked formulation (local scans in chunks, cumulative decay
products, a loop over chunk starts, a correction pass) makes ~3 full passes over the (b, l, n, d)
states where the frame loop makes one; with the slab of a frame in cache, the per-frame op (a few
thousand multiply-adds) costs less than the extra passes. Block tensors are laid out (bb, seg, n, k)
-- channels innermost -- so every elementwise op runs over contiguous channel vectors and the
contractions over n or channels are batched matrix products.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SEGMENT = 256  # frames per segment in both fast paths (Mamba-2: rounded down to whole chunks, at least one)


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) of a (b, l, ...) tensor at the end by ``pad`` frames."""
    if pad == 0:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))


# ----------------------------------------------------------------------------------------------------
# Mamba-1: diagonal A of shape (d, n)
# ----------------------------------------------------------------------------------------------------


def selective_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequential reference of the Mamba-1 selective scan (one Python step per frame).

    x: (b, l, d) input;  dt: (b, l, d) step sizes (already softplus'ed, > 0);  A: (d, n) (negative);
    B, C: (b, l, n);  D: (d,) or None.  Returns y: (b, l, d) float32.
    """
    x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
    b, l, d = x.shape
    h = x.new_zeros(b, d, A.shape[1])  # (b, d, n)
    ys = []
    # frames via unbind (its backward is one stack): indexing x[:, t] in the loop would make autograd
    # build a zero tensor of the whole sequence per step, a backward quadratic in T
    for x_t, dt_t, B_t, C_t in zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        dA = torch.exp(dt_t[:, :, None] * A)  # (b, d, n)
        dBx = dt_t[:, :, None] * B_t[:, None, :] * x_t[:, :, None]  # (b, d, n)
        h = dA * h + dBx
        ys.append((h * C_t[:, None, :]).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=1)  # (b, l, d)
    if D is not None:
        y = y + x * D.float()
    return y


class _Buffers:
    """Work tensors reused by every block of one call: a fresh multi-MB tensor per block would
    page-fault in new memory each time (glibc returns large blocks to the OS), which cost more than
    the arithmetic here. ``get(i, shape)`` is a view of buffer i (contents undefined)."""

    def __init__(self, like: torch.Tensor, count: int, numel: int):
        self.flat = [like.new_empty(numel) for _ in range(count)]
        self.frame_views: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def get(self, i: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self.flat[i][: math.prod(shape)].view(shape)

    def frames(self, i: int, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``t.unbind(1)`` for ``t`` = ``get(i, t.shape)``, made once per shape: every block of a call
        has the same shape but the last, and unbinding ~SEGMENT frames per scan costs as much as a pass."""
        key = (i, tuple(t.shape))
        if key not in self.frame_views:
            self.frame_views[key] = t.unbind(1)
        return self.frame_views[key]


def _outer(p: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """p (bb, l, k), q (bb, l, n) -> q p^T per frame, written into out (bb, l, n, k)."""
    return torch.mul(q.unsqueeze(-1), p.unsqueeze(-2), out=out)


def _decays(dt: torch.Tensor, At: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """dt (bb, l, k), At (n, k) -> exp(dt A), per-step decays in (0, 1], written into out (bb, l, n, k)."""
    return torch.mul(dt.unsqueeze(-2), At, out=out).exp_()


def _scan_(gs: tuple[torch.Tensor, ...], us: tuple[torch.Tensor, ...], h0: torch.Tensor | None) -> None:
    """u_t += g_t * u_{t-1} over the frames gs, us (each (bb, n, k)), first to last, in place: the
    states of h_t = g_t h_{t-1} + u_t from h_{-1} = h0 (bb, n, k) (None: zero)."""
    if h0 is not None:
        us[0].addcmul_(gs[0], h0)
    for t in range(1, len(us)):
        us[t].addcmul_(gs[t], us[t - 1])


def _scan_reversed_(gs: tuple[torch.Tensor, ...], vs: tuple[torch.Tensor, ...], g_in) -> torch.Tensor:
    """v_t += g_{t+1} * v_{t+1} over the frames gs, vs (each (bb, n, k)), last to first, in place: the
    adjoints, with g_in (bb, n, k) the part flowing into the last frame from after the block (None:
    zero). Returns g_0 * v_0, the part flowing into the frame before the block."""
    if g_in is not None:
        vs[-1].add_(g_in)
    for t in range(len(vs) - 2, -1, -1):
        vs[t].addcmul_(gs[t + 1], vs[t + 1])
    return gs[0] * vs[0]


def _block_states(dt, At, p, q, h0, bufs: _Buffers) -> tuple[torch.Tensor, torch.Tensor]:
    """Decays g = exp(dt A) and states h of h_t = g_t h_{t-1} + q_t p_t^T over one block from h0
    (bb, n, k) (None: zero): both (bb, l, n, k) float32, in buffers 0 and 1.

    dt, p: (bb, l, k);  At: (n, k) (A transposed);  q: (bb, l, n).
    """
    shape = (*dt.shape[:2], At.shape[0], dt.shape[2])  # (bb, l, n, k)
    g, h = _decays(dt, At, bufs.get(0, shape)), _outer(p, q, bufs.get(1, shape))
    _scan_(bufs.frames(0, g), bufs.frames(1, h), h0)
    return g, h


# Mamba-1 works in blocks of (batch items, a channel group, a time segment of SEGMENT frames), the state
# carried from segment to segment: every block's (bb, seg, n, k) tensors have about BLOCK_ELEMENTS
# floats (4 MB), so the cost is linear in T and the working set bounded. Much smaller blocks mean more,
# smaller ops; much larger ones leave the cache.
BLOCK_ELEMENTS = 1 << 20


def _blocks(b: int, d: int, n: int, seg: int):
    """(batch slice, channel slice) pairs covering (b, d): whole batch items together when a few
    items' (seg, d, n) states fit in ~BLOCK_ELEMENTS, else one item and a channel group."""
    k = max(1, min(d, BLOCK_ELEMENTS // max(1, seg * n)))
    bb = max(1, BLOCK_ELEMENTS // (seg * n * d)) if k == d else 1
    for i in range(0, b, bb):
        for j in range(0, d, k):
            yield slice(i, min(b, i + bb)), slice(j, min(d, j + k))


def _block_numel(block: tuple[slice, slice], seg: slice, n: int) -> int:
    """Elements of a (bb, seg, n, k) tensor of the first (largest) block."""
    bs, ds = block
    return (bs.stop - bs.start) * (seg.stop - seg.start) * n * (ds.stop - ds.start)


def _segments(l: int) -> list[slice]:
    """Time slices of SEGMENT frames covering [0, l)."""
    return [slice(t, min(l, t + SEGMENT)) for t in range(0, l, SEGMENT)]


def _ssm1_fwd(x, dt, A, B, C) -> torch.Tensor:
    """y = sum_n C * h (no D term) for float32, contiguous inputs; blockwise to stay in cache."""
    b, l, d = x.shape
    n = A.shape[1]
    At = A.t().contiguous()  # (n, d): channels innermost in every (.., n, k) block tensor
    y = x.new_empty(b, l, d)
    segs = _segments(l)
    blocks = list(_blocks(b, d, n, segs[0].stop))
    bufs = _Buffers(x, 2, _block_numel(blocks[0], segs[0], n))
    for bs, ds in blocks:
        h0 = None
        for ts in segs:
            dtb = dt[bs, ts, ds]
            _, h = _block_states(dtb, At[:, ds], dtb * x[bs, ts, ds], B[bs, ts], h0, bufs)
            y[bs, ts, ds] = torch.matmul(C[bs, ts].unsqueeze(-2), h).squeeze(-2)  # sum_n C h
            h0 = h[:, -1].clone()
    return y


def _ssm1_bwd(gy, x, dt, A, B, C):
    """Gradients of :func:`_ssm1_fwd` w.r.t. x, dt, A, B, C (recomputes the states block by block).

    With g_t = exp(dt_t A), u_t = dt_t x_t B_t and the adjoint lam_t = gy_t C_t + g_{t+1} lam_{t+1}:
        dL/du_t = lam_t,   dL/d(dt_t A) = lam_t * g_t h_{t-1} = lam_t * (h_t - u_t),   dL/dC_t = sum_d gy_t h_t.
    Per block of (batch items, channels): a forward pass keeps only the states at segment starts
    (saving them from the forward instead would give the op an output of ceil(l / SEGMENT) rows, whose
    1-vs-more specialisation costs torch.compile extra graphs), then the segments are visited last to
    first, recomputing h and carrying the adjoint backwards.
    """
    b, l, d = x.shape
    n = A.shape[1]
    gx, gdt = torch.empty_like(x), torch.empty_like(dt)
    At = A.t().contiguous()  # (n, d): channels innermost in every (.., n, k) block tensor
    gAt, gB, gC = torch.zeros_like(At), torch.zeros_like(B), torch.zeros_like(C)
    ones_n = A.new_ones(n)
    segs = _segments(l)
    blocks = list(_blocks(b, d, n, segs[0].stop))
    bufs = _Buffers(x, 3, _block_numel(blocks[0], segs[0], n))
    for bs, ds in blocks:
        Ab = At[:, ds]
        starts = [None]
        for ts in segs[:-1]:
            dtb = dt[bs, ts, ds]
            starts.append(
                _block_states(dtb, Ab, dtb * x[bs, ts, ds], B[bs, ts], starts[-1], bufs)[1][:, -1].clone()
            )
        g_in = None
        for ts, h0 in zip(reversed(segs), reversed(starts)):
            dtb, xb, gyb, Bb = dt[bs, ts, ds], x[bs, ts, ds], gy[bs, ts, ds], B[bs, ts]
            dxb = dtb * xb
            g, h = _block_states(dtb, Ab, dxb, Bb, h0, bufs)
            lam = _outer(gyb, C[bs, ts], bufs.get(2, h.shape))
            g_in = _scan_reversed_(bufs.frames(0, g), bufs.frames(2, lam), g_in)
            # contractions over n or k as batched (1 x n) @ (n x k) and (1 x k) @ (k x n) products: in
            # this layout faster than mul + sum over the n dim; a sum over k as (1 x k) @ h^T, not
            # h @ (k x 1), which is slower
            gC[bs, ts] += torch.matmul(gyb.unsqueeze(-2), h.transpose(-1, -2)).squeeze(-2)  # (bb, seg, n)
            gp = torch.matmul(Bb.unsqueeze(-2), lam).squeeze(-2)  # dL/d(dt*x): (bb, seg, k)
            gB[bs, ts] += torch.matmul(dxb.unsqueeze(-2), lam.transpose(-1, -2)).squeeze(-2)  # (bb, seg, n)
            h.addcmul_(Bb.unsqueeze(-1), dxb.unsqueeze(-2), value=-1).mul_(lam)  # ga = lam * (h - u)
            gdt[bs, ts, ds] = torch.matmul(ones_n, torch.mul(h, Ab, out=lam)).addcmul_(gp, xb)  # sum_n ga A
            gx[bs, ts, ds] = gp * dtb
            gAt[:, ds] += h.mul_(dtb.unsqueeze(-2)).sum((0, 1))
    return gx, gdt, gAt.t().contiguous(), gB, gC


def _as_float32(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.float().contiguous() for t in ts]


@torch.library.custom_op("spkr::selective_scan", mutates_args=())
def _ssm1_op(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor
) -> torch.Tensor:
    with torch.no_grad():
        x, dt, A, B, C, D = _as_float32(x, dt, A, B, C, D)
        return _ssm1_fwd(x, dt, A, B, C).addcmul_(x, D)


@_ssm1_op.register_fake
def _(x, dt, A, B, C, D):
    return torch.empty_like(x, dtype=torch.float32)


def _ssm1_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _ssm1_backward(ctx, gy):
    return _ssm1_bwd_op(gy, *ctx.saved_tensors)


@torch.library.custom_op("spkr::selective_scan_bwd", mutates_args=())
def _ssm1_bwd_op(
    gy: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. x, dt, A, B, C, D, each in its input's dtype (computed in float32 and rounded
    once, as autograd would round a float32 gradient flowing into a cast)."""
    inputs = (x, dt, A, B, C, D)
    with torch.no_grad():
        gy, x, dt, A, B, C, D = _as_float32(gy, *inputs)
        gx, gdt, gA, gB, gC = _ssm1_bwd(gy, x, dt, A, B, C)
        gx.addcmul_(gy, D)  # the D skip
        gD = (gy * x).sum((0, 1))
        return tuple(g.to(t.dtype) for g, t in zip((gx, gdt, gA, gB, gC, gD), inputs))


@_ssm1_bwd_op.register_fake
def _(gy, x, dt, A, B, C, D):
    return tuple(torch.empty_like(t) for t in (x, dt, A, B, C, D))


_ssm1_op.register_autograd(_ssm1_backward, setup_context=_ssm1_setup)


def selective_scan_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    chunk_size: int = 8,
) -> torch.Tensor:
    """Fast Mamba-1 selective scan (see module docstring for the algorithm).

    Same arguments and result as :func:`selective_scan_ref`: x, dt (b, l, d); A (d, n); B, C (b, l, n);
    D (d,) or None -> y (b, l, d) float32, computed in float32 whatever the input dtypes (bf16 inputs
    are upcast inside; their gradients are rounded back once). ``chunk_size`` is accepted for the
    callers' sake and not used: the Mamba-1 scan runs frame by frame inside cache-sized blocks.

    Implemented as a custom op (``torch.ops.spkr.selective_scan``) with a hand-written backward that
    recomputes the states: nothing of size (b, l, d, n) is kept for backward, and the work is done in
    cache-sized blocks of (batch items, channel group, time segment) in reused buffers.
    torch.compile sees one opaque op (no graph break).
    """
    del chunk_size
    if D is None:
        D = A.new_zeros(A.shape[0])
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _ssm1_op(x, dt, A, B, C, D)


# ----------------------------------------------------------------------------------------------------
# Mamba-2 (SSD): scalar A per head, state (p, n) per head
# ----------------------------------------------------------------------------------------------------


def ssd_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequential reference of the Mamba-2 SSD recurrence (one Python step per frame).

    x: (b, l, h, p);  dt: (b, l, h) (softplus'ed);  A: (h,) negative;  B, C: (b, l, n) (one group,
    shared by all heads);  D: (h,) or None.  Returns y: (b, l, h, p) float32.
    """
    x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
    b, _, nh, p = x.shape
    H = x.new_zeros(b, nh, p, B.shape[-1])  # (b, h, p, n)
    ys = []
    for x_t, dt_t, B_t, C_t in zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):  # see above
        dA = torch.exp(dt_t * A)  # (b, h)
        dBx = (dt_t[:, :, None] * x_t)[..., None] * B_t[:, None, None, :]  # (b, h, p, n)
        H = dA[:, :, None, None] * H + dBx
        ys.append(torch.einsum("bhpn,bn->bhp", H, C_t))
    y = torch.stack(ys, dim=1)  # (b, l, h, p)
    if D is not None:
        y = y + x * D.float()[:, None]
    return y


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: out[..., i, j] = sum_{j < k <= i} a[..., k] for j <= i, -inf above the diagonal.

    a: (..., T) -> (..., T, T). Built from masked cumulative sums (no cumsum differences), so it stays
    exact for long chunks.
    """
    T = a.shape[-1]
    a = a.unsqueeze(-1).expand(*a.shape, T)  # (..., T, T): a[..., k, j] = a_k
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    a = a.masked_fill(~strict, 0.0)
    s = torch.cumsum(a, dim=-2)
    keep = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return s.masked_fill(~keep, float("-inf"))


def _ssd_segment(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, L: int, state0
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD over one segment of whole chunks, from the state ``state0`` (None: zero).

    x: (b, c, L, h, p);  dt: (b, c, L, h);  A: (h,);  B, C: (b, c, L, n);  state0: (b, h, p, n) or None.
    Returns y (b, c, L, h, p) and the state after the segment's last frame (b, h, p, n).
    """
    a = (dt * A).permute(0, 3, 1, 2)  # (b, h, c, L) log decay per step
    a_cum = torch.cumsum(a, dim=-1)  # (b, h, c, L)
    xdt = x * dt.unsqueeze(-1)  # (b, c, L, h, p)

    # 1. intra-chunk (diagonal blocks)
    decay = torch.exp(segsum(a))  # (b, h, c, L(t), L(s))
    CB = torch.einsum("bctn,bcsn->bcts", C, B)  # (b, c, L, L) shared by all heads
    M = decay * CB.unsqueeze(1)  # (b, h, c, t, s)
    y_diag = torch.einsum("bhcts,bcshp->bcthp", M, xdt)

    # 2. chunk-final states from the chunk's own inputs
    decay_states = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, L): decay from s to chunk end
    states = torch.einsum("bcsn,bhcs,bcshp->bchpn", B, decay_states, xdt)  # (b, c, h, p, n)

    # 3. recurrence over the segment's few chunk states, from state0
    chunk_decay = torch.exp(a_cum[..., -1]).permute(0, 2, 1)[..., None, None]  # (b, c, h, 1, 1)
    starts, h = [], state0
    for k in range(states.shape[1]):
        starts.append(torch.zeros_like(states[:, 0]) if h is None else h)
        h = states[:, k] if h is None else chunk_decay[:, k] * h + states[:, k]
    starts = torch.stack(starts, dim=1)  # (b, c, h, p, n) state at each chunk start

    # 4. state -> output inside each chunk
    y_off = torch.einsum("bctn,bchpn,bhct->bcthp", C, starts, torch.exp(a_cum))
    return y_diag + y_off, h


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Chunked SSD (Mamba-2), no Python loop over time steps.

    Same arguments and result as :func:`ssd_ref`. The sequence is processed in segments of
    ``SEGMENT`` frames (whole chunks of ``chunk_size``), the state carried from one to the next, so
    every intermediate has the same size whatever T (cost linear in T, working set cache-sized). Inside
    a segment, four steps as in the Mamba-2 paper:
    1. intra-chunk outputs: masked (L x L) decay matrix exp(segsum) times (C B^T) times dt*x;
    2. each chunk's final state from its own inputs;
    3. the recurrence over the segment's few chunk states (a short loop over chunks, from the carried
       state);
    4. contribution of each chunk's starting state to its outputs.
    """
    L = int(chunk_size)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
        b, l, nh, p = x.shape
        n = B.shape[-1]
        pad = (-l) % L
        xp, dtp, Bp, Cp = (_pad_time(t, pad) for t in (x, dt, B, C))
        c = (l + pad) // L
        xp = xp.view(b, c, L, nh, p)
        dtp = dtp.view(b, c, L, nh)
        Bp = Bp.view(b, c, L, n)
        Cp = Cp.view(b, c, L, n)
        per = max(1, SEGMENT // L)  # chunks per segment
        # torch.split, not a slice per segment: the backward of each slice would build a zero tensor of
        # the full length (quadratic in T); split's backward is one concatenation
        ys, state = [], None
        for xs, dts, Bs, Cs in zip(*(t.split(per, dim=1) for t in (xp, dtp, Bp, Cp))):
            y_seg, state = _ssd_segment(xs, dts, A, Bs, Cs, L, state)
            ys.append(y_seg)
        y = torch.cat(ys, dim=1).reshape(b, c * L, nh, p)[:, :l]
        if D is not None:
            y = y + x * D.float()[:, None]
    return y

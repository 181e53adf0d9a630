"""Selective state-space scans in pure PyTorch: Mamba-1 (diagonal A) and Mamba-2 (SSD, scalar A per head).

Each scan has two implementations that compute the same function:

* a **sequential reference** (``*_ref``): one Python step per time frame, written to be read and checked
  (mamba-minimal style). Slow; used by tests and the benchmark only.
* a **chunked fast path** (``selective_scan_chunked``, ``ssd_chunked``): no Python loop over time steps.
  The sequence is cut into chunks of ``L`` frames; inside a chunk everything is a parallel tensor
  expression, across chunks a short recurrence over the chunk states. Both work through the sequence
  in segments of ``SEGMENT`` frames (whole chunks) and carry the state from one segment to the next,
  so every intermediate has the same, cache-sized shape whatever T: the cost is linear in T (a
  log-depth Hillis-Steele scan over a segment's chunks for Mamba-1, a loop over its few chunks for
  Mamba-2).

Both fast paths upcast to float32 inside (autocast is disabled in the scan) and return float32; callers
under bf16 autocast get the cast back by the next autocast-aware op.

Dimension glossary (used in shapes below)
----------------------------------------
    b   batch
    l   sequence length T (frames)
    d   d_inner = expand * d_model (channels of the SSM)
    n   d_state (state size per channel)
    h   heads (Mamba-2), d = h * p
    p   head dim (Mamba-2)
    c   number of chunks = ceil(l / L)
    L   chunk length (``chunk_size``); ``s``/``t`` index frames inside a chunk (source / target)

Mamba-1 recurrence (per channel d and state n, with dA = exp(dt * A)):
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t          y_t = <C_t, h_t> + D * x_t
Mamba-2 recurrence (per head h, A scalar, the state is a (p, n) matrix):
    H_t = exp(dt_t * A) * H_{t-1} + dt_t * x_t B_t^T          y_t = H_t C_t + D * x_t

Mamba-1 chunk algorithm (cumsum/exp factorisation, centred):
    a_s  = max(dt_s * A, -max_log_decay)        per-step log decay, clamped (see ``MAX_LOG_DECAY``)
    S_t  = sum_{s<=t} a_s                       inside the chunk;  r = (L-1)//2 is the reference frame
    h_t  = exp(S_t - S_r) * [ sum_{s<=t} exp(S_r - S_s) u_s  +  exp(S_r) h_start ]
The two exponentials are bounded by exp(ceil((L-1)/2) * max_log_decay) <= exp(64) for the default
chunk (L=8, max_log_decay=16), far from the float32 limit exp(88.7), whatever dt and A are. The clamp
only changes steps whose decay is below exp(-16) ~ 1.1e-7, i.e. below float32 resolution of the state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Budget for the positive exponents of the centred factorisation (exp(64) ~ 6e27 leaves ~1e10 of headroom
# below float32's max for the values being summed, in forward and backward).
EXP_BUDGET = 64.0
MAX_LOG_DECAY = 16.0  # = EXP_BUDGET / ceil((8-1)/2): the clamp for the default Mamba-1 chunk of 8
SEGMENT = 256  # frames per segment (rounded down to whole chunks, at least one) in both fast paths


def max_log_decay_for(chunk_size: int) -> float:
    """Largest per-step log decay |dt*A| the Mamba-1 chunked scan can represent exactly for this chunk."""
    half = max(1, chunk_size // 2)  # == ceil((L-1)/2)
    return EXP_BUDGET / half


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


def _linear_scan_hs(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inclusive scan H_k = g_k * H_{k-1} + u_k along dim 1 (H_{-1} = 0), Hillis-Steele, log2(c) steps.

    g, u: (b, c, ...) with g in [0, 1]. Stable: only products of decays and sums. Returns (b, c, ...).
    """
    c = u.shape[1]
    k = 1
    while k < c:
        u = torch.cat([u[:, :k], u[:, k:] + g[:, k:] * u[:, :-k]], dim=1)
        if 2 * k < c:  # the decays are not needed after the last step
            g = torch.cat([g[:, :k], g[:, k:] * g[:, :-k]], dim=1)
        k *= 2
    return u


def _chunk_cumsum_(t: torch.Tensor) -> torch.Tensor:
    """In-place inclusive cumsum along dim 2 (the L frames of a chunk) of a (b, c, L, ...) tensor.

    L - 1 vectorised adds: ``torch.cumsum`` along a dim that is not the last runs a strided scalar loop
    on CPU (and accumulates in float64), ~8x slower for these shapes."""
    for i in range(1, t.shape[2]):
        t[:, :, i].add_(t[:, :, i - 1])
    return t


def _scan_block(
    dt: torch.Tensor,
    A: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    L: int,
    h0: torch.Tensor | None = None,
) -> torch.Tensor:
    """States of h_t = exp(clamp(dt_t*A)) * h_{t-1} + p_t q_t^T for one block (no autograd, in place).

    dt, p: (b, l, k) with l a multiple of L;  A: (k, n);  q: (b, l, n);  h0: (b, k, n) state before the
    block's first frame (None: zero).  Returns h: (b, l, k, n) float32. Peak memory: two (b, l, k, n)
    tensors.
    """
    b, l, k = dt.shape
    n = A.shape[1]
    c = l // L
    amax = max_log_decay_for(L)
    r = (L - 1) // 2
    S = _chunk_cumsum_((dt.view(b, c, L, k, 1) * A).clamp_(min=-amax))  # log decay since chunk start
    S_r = S[:, :, r : r + 1].clone()  # (b, c, 1, k, n)
    G = torch.exp(S[:, :, -1])  # (b, c, k, n) decay over the whole chunk, in (0, 1]
    w = torch.sub(S_r, S, out=S).exp()  # E_in = exp(S_r - S_s), within exp(+-EXP_BUDGET)
    E_out = torch.reciprocal(w, out=S)  # exp(S_t - S_r): a reciprocal costs a tenth of an exp here
    _chunk_cumsum_(w.mul_(p.view(b, c, L, k, 1)).mul_(q.view(b, c, L, 1, n)))  # cs
    h_end = E_out[:, :, -1] * w[:, :, -1]  # (b, c, k, n) chunk-end state from the chunk's own inputs
    if h0 is not None:
        h_end[:, 0] += G[:, 0] * h0
    H = _linear_scan_hs(G, h_end)  # true chunk-end states
    first = torch.zeros_like(H[:, :1]) if h0 is None else h0.unsqueeze(1)
    h_start = torch.cat([first, H[:, :-1]], dim=1)
    w.add_(torch.exp(S_r) * h_start.unsqueeze(2)).mul_(E_out)
    return w.view(b, l, k, n)


# Mamba-1 works in blocks of (one batch item, a channel group, a time segment of SEGMENT frames), the
# state carried from segment to segment: every block's (segment, k, n) state tensor has the same size
# (about BLOCK_ELEMENTS floats, 2 MB: several fit in L3; 1, 2 and 4 MB measured, 2 MB was best), so the
# cost is linear in T.
BLOCK_ELEMENTS = 1 << 19


def _groups(b: int, d: int, n: int, seg: int):
    """(batch index, channel slice) pairs; a channel group's (seg, k, n) state has ~BLOCK_ELEMENTS."""
    k = max(1, min(d, BLOCK_ELEMENTS // max(1, seg * n)))
    for i in range(b):
        for j in range(0, d, k):
            yield slice(i, i + 1), slice(j, min(d, j + k))


def _segments(l: int, L: int) -> list[slice]:
    """Time slices of SEGMENT frames (rounded to whole chunks of L) covering [0, l); l is a multiple of L."""
    seg = max(L, SEGMENT // L * L)
    return [slice(t, min(l, t + seg)) for t in range(0, l, seg)]


def _ssm1_fwd(x, dt, A, B, C, chunk_size: int) -> torch.Tensor:
    """y = sum_n C * h (no D term) for padded, float32, contiguous inputs; blockwise to stay in cache."""
    b, l, d = x.shape
    n = A.shape[1]
    y = x.new_empty(b, l, d)
    segs = _segments(l, chunk_size)
    for bi, ds in _groups(b, d, n, segs[0].stop):
        h0 = None
        for ts in segs:
            dtb = dt[bi, ts, ds]
            h = _scan_block(dtb, A[ds], dtb * x[bi, ts, ds], B[bi, ts], chunk_size, h0)  # (1, seg, k, n)
            y[bi, ts, ds] = torch.mul(h, C[bi, ts].unsqueeze(-2)).sum(-1)  # 2x a batched matvec here
            h0 = h[:, -1].clone()
    return y


def _ssm1_bwd(gy, x, dt, A, B, C, chunk_size: int):
    """Gradients of :func:`_ssm1_fwd` w.r.t. x, dt, A, B, C (recomputes the states block by block).

    With g_t = exp(dt_t A), u_t = dt_t x_t B_t and the adjoint lam_t = gy_t C_t + g_{t+1} lam_{t+1}
    (a reverse scan with the same decays, shifted by one frame):
        dL/du_t = lam_t,   dL/d(dt_t A) = lam_t * g_t h_{t-1} = lam_t * (h_t - u_t),   dL/dC_t = sum_d gy_t h_t.
    Per (batch item, channel group): a forward pass keeps only the states at segment starts (saving
    them from the forward instead would give the op an output of ceil(l / SEGMENT) rows, whose 1-vs-more
    specialisation costs torch.compile extra graphs), then the segments are visited last to first,
    recomputing h and carrying lam backwards.
    """
    b, l, d = x.shape
    n = A.shape[1]
    L = chunk_size
    gx = torch.empty_like(x)
    gdt = torch.empty_like(dt)
    gA = torch.zeros_like(A)
    gB = torch.zeros_like(B)
    gC = torch.zeros_like(C)
    # reversed time, decays shifted: lam'_t' = exp(dt_{l-t'} A) lam'_{t'-1} + v'_t'
    dt_rev = torch.cat([torch.zeros_like(dt[:, :1]), dt.flip(1)[:, :-1]], dim=1)
    gy_rev = gy.flip(1)
    C_rev = C.flip(1)
    segs = _segments(l, L)
    for bi, ds in _groups(b, d, n, segs[0].stop):
        Ab = A[ds]
        starts = [None]
        for ts in segs[:-1]:
            dtb = dt[bi, ts, ds]
            starts.append(_scan_block(dtb, Ab, dtb * x[bi, ts, ds], B[bi, ts], L, starts[-1])[:, -1].clone())
        lam0 = None
        for ts, h0 in zip(reversed(segs), reversed(starts)):
            rs = slice(l - ts.stop, l - ts.start)  # the same frames in reversed time
            dtb, xb, gyb, Bb = dt[bi, ts, ds], x[bi, ts, ds], gy[bi, ts, ds], B[bi, ts]
            dxb = dtb * xb
            h = _scan_block(dtb, Ab, dxb, Bb, L, h0)  # (1, seg, k, n)
            gC[bi, ts] += torch.matmul(gyb.unsqueeze(-2), h).squeeze(-2)  # (1, seg, n)
            lam_rev = _scan_block(dt_rev[bi, rs, ds], Ab, gy_rev[bi, rs, ds], C_rev[bi, rs], L, lam0)
            lam0 = lam_rev[:, -1].clone()  # lam at the segment's first frame: carried to the previous one
            lam = lam_rev.flip(1)
            # (the contractions over n are written as mul + sum and einsum where each measured fastest:
            # batched matvecs and a bmm-based einsum over l are several times slower on CPU)
            gp = torch.mul(lam, Bb.unsqueeze(-2)).sum(-1)  # dL/d(dt*x): (1, seg, k)
            gB[bi, ts] += torch.matmul(dxb.unsqueeze(-2), lam).squeeze(-2)  # (1, seg, n)
            h.addcmul_(dxb.unsqueeze(-1), Bb.unsqueeze(-2), value=-1).mul_(lam)  # ga = lam * (h - u)
            gdt[bi, ts, ds] = gp * xb + torch.einsum("blkn,kn->blk", h, Ab)
            gx[bi, ts, ds] = gp * dtb
            gA[ds] += h.mul_(dtb.unsqueeze(-1)).sum((0, 1))
    return gx, gdt, gA, gB, gC


@torch.library.custom_op("spkr::selective_scan_chunked", mutates_args=())
def _ssm1_op(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    with torch.no_grad():
        return _ssm1_fwd(x, dt, A, B, C, chunk_size)


@_ssm1_op.register_fake
def _(x, dt, A, B, C, chunk_size):
    return torch.empty_like(x)


def _ssm1_setup(ctx, inputs, output):
    x, dt, A, B, C, chunk_size = inputs
    ctx.save_for_backward(x, dt, A, B, C)
    ctx.chunk_size = chunk_size


def _ssm1_backward(ctx, gy):
    x, dt, A, B, C = ctx.saved_tensors
    grads = _ssm1_bwd_op(gy.contiguous(), x, dt, A, B, C, ctx.chunk_size)
    return (*grads, None)


@torch.library.custom_op("spkr::selective_scan_chunked_bwd", mutates_args=())
def _ssm1_bwd_op(
    gy: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return _ssm1_bwd(gy, x, dt, A, B, C, chunk_size)


@_ssm1_bwd_op.register_fake
def _(gy, x, dt, A, B, C, chunk_size):
    return tuple(torch.empty_like(t) for t in (x, dt, A, B, C))


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
    """Chunked Mamba-1 selective scan, no Python loop over time (see module docstring for the algorithm).

    Same arguments and result as :func:`selective_scan_ref`: x, dt (b, l, d); A (d, n); B, C (b, l, n);
    D (d,) or None -> y (b, l, d) float32. ``chunk_size`` L: short chunks keep the exponentials bounded;
    the per-step log decay is clamped at ``max_log_decay_for(L)`` (16 for L=8).

    Implemented as a custom op (``torch.ops.spkr.selective_scan_chunked``) with a hand-written backward
    that recomputes the states: nothing of size (b, l, d, n) is kept for backward, and the work is done
    in cache-sized blocks of (batch item, channel group) -- a Python loop over blocks, never over time.
    torch.compile sees one opaque op (no graph break).
    """
    L = int(chunk_size)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
        l = x.shape[1]
        pad = (-l) % L
        # padded frames get dt = 0: decay 1 and no input, so they change nothing before them
        xp, dtp, Bp, Cp = (_pad_time(t, pad).contiguous() for t in (x, dt, B, C))
        y = _ssm1_op(xp, dtp, A.contiguous(), Bp, Cp, L)[:, :l]
        if D is not None:
            y = y + x * D.float()
    return y


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

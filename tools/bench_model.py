"""Benchmark the Mamba scans and models on this machine; prints ratios against baselines.

    python tools/bench_model.py [--repeats 3] [--quick]

1. one Mamba-1 layer fwd+bwd at T = 256, 1024, 4096 (batch 8, d_model 128), per frame: our chunked
   fast path (eager and torch.compile), mambapy's parallel scan (pscan=True, same weights: the peer),
   our sequential reference, mambapy's sequential loop (mamba-minimal style; T=256 only) and our
   Mamba-2 (SSD chunked) for information;
2. linearity: cost at T=4096 / T=1024 (ideal 4x) of the layers and of the Mamba-1 scan alone;
3. whole classifiers at T=4096: Mamba-1 and Mamba-2 (bidirectional) vs a Transformer of similar size;
4. torch.compile recompiles for a few different T with dynamic=None (default) vs dynamic=True.
Every side of a comparison is timed alike: one warm-up call, then the median of ``--repeats`` calls. The
warm-up call of each baseline in [1] is also checked to compute the same output and gradients (of the
input and of every parameter) as the fast path, for the same weights and input. Only the ratios are meant
to be compared. ``--quick`` skips the references and torch.compile; ``--layer-only`` stops after [1].
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spkr import runtime  # noqa: E402

runtime.configure()  # SPKR_HUGEPAGES=1 takes effect only before torch loads (spkr/runtime.py)

import torch  # noqa: E402

from spkr.models import ModelConfig, build_model  # noqa: E402
from spkr.models.mamba import Mamba1, Mamba2  # noqa: E402
from spkr.run.configs import load_configs  # noqa: E402
from spkr.train import parse_args  # noqa: E402


def timeit(fn, repeats: int, check=None) -> float:
    """Median time of ``repeats`` calls of ``fn`` after one warm-up call; ``check`` gets its result."""
    result = fn()
    if check is not None:
        check(result)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def fwd_bwd(module, *inputs, **kwargs):
    """One fwd+bwd; returns the output and the gradients of the input leaves and parameters, by name."""
    leaves = {f"input{i}": t for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad}
    # torch.compile's wrapper prefixes the names: strip it so that gradients can be compared by name
    leaves |= {n.removeprefix("_orig_mod."): p for n, p in module.named_parameters()}

    def run():
        for t in leaves.values():
            t.grad = None
        out = module(*inputs, **kwargs)
        out.float().sum().backward()
        return out.detach(), {n: t.grad for n, t in leaves.items()}

    return run


def same_as(want, what: str, rtol: float = 1e-3):
    """A check for ``timeit``: the result (output, gradients) equals ``want`` up to float32 rounding,
    else the benchmark stops (SystemExit naming the baseline and tensor; not an assert, which
    ``python -O`` drops)."""

    def check(got):
        if got[1].keys() != want[1].keys():
            raise SystemExit(f"{what}: different parameters")
        pairs = [("output", got[0], want[0])] + [(n, g, want[1][n]) for n, g in got[1].items()]
        for name, g, w in pairs:
            # tolerance relative to the tensor's scale: sums over b*T frames in different orders
            if not torch.allclose(g, w, rtol=rtol, atol=rtol * w.abs().max().item()):
                raise SystemExit(
                    f"{what}: {name} differs from the fast path, max |diff| {(g - w).abs().max():.3g}"
                )

    return check


def linearity(run_short, run_long, rounds: int) -> tuple[float, float]:
    """Best times of two workloads, run alternately (warm-up first)."""
    run_short(), run_long()
    short, long_ = [], []
    for _ in range(rounds):
        for fn, ts in ((run_short, short), (run_long, long_)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return min(short), min(long_)


def scan_inputs(b: int, T: int, layer: Mamba1) -> list[torch.Tensor]:
    """Inputs of the layer's selective scan (x, dt, A, B, C) at length T, as leaves needing grads."""
    g = torch.Generator().manual_seed(T)
    d, n = layer.d_inner, layer.d_state
    x = torch.randn(b, T, d, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, T, d, generator=g) - 3)
    A = -torch.exp(layer.A_log.detach())
    B, C = torch.randn(b, T, n, generator=g), torch.randn(b, T, n, generator=g)
    return [t.requires_grad_() for t in (x, dt, A, B, C)]


def scan_fwd_bwd(inputs):
    from spkr.models.ssm import selective_scan_chunked

    def run():
        selective_scan_chunked(*inputs).sum().backward()

    return run


LAYER_TS = [256, 1024, 4096]  # section [1]'s sequence lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the sequential reference and compile")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: per core)")
    ap.add_argument("--layer-only", action="store_true", help="run section [1] (one layer, vs mambapy) only")
    args = ap.parse_args()
    # One thread by default: on a small machine OpenMP-split small ops are many times slower, which
    # distorts ratios between implementations with different op sizes.
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats} repeats")
    print(f"allocator: {runtime.describe()}\n")
    b, dm = 8, 128
    ours = Mamba1(dm, d_state=16, backend="torch")
    m2 = Mamba2(dm, d_state=64, headdim=32, backend="torch")
    rows, first_compile = time_layers(ours, m2, b, args)
    print_layers(rows, first_compile, b, dm)
    if args.layer_only:
        return
    print_linearity(ours, m2, b, args.repeats + 2)
    print_whole_models(dm, args.repeats)
    if not args.quick:
        print_recompiles()


def mambapy_peers(ours: Mamba1):
    """mambapy's MambaBlock with ``ours``' weights, parallel scan and sequential loop; (None, None)
    without mambapy."""
    try:
        from mambapy.mamba import MambaBlock, MambaConfig
    except ImportError:
        return None, None
    peers = []
    for pscan in (True, False):
        peer = MambaBlock(MambaConfig(d_model=ours.d_model, n_layers=1, pscan=pscan))
        peer.load_state_dict(ours.state_dict())  # same weights
        peers.append(peer)
    return peers[0], peers[1]


def time_layers(ours: Mamba1, m2: Mamba2, b: int, args) -> tuple[dict[str, dict[int, float]], dict]:
    """[1]: {row name: {T: seconds}} of one layer's fwd+bwd, every baseline checked against the fast
    path; and the first-call times of torch.compile by T."""
    R = args.repeats
    peer, peer_seq = mambapy_peers(ours)
    comp = None
    if not args.quick:
        torch._dynamo.reset()
        comp = torch.compile(ours)
    rows: dict[str, dict[int, float]] = {}
    first_compile = {}
    for T in LAYER_TS:
        u = torch.randn(b, T, ours.d_model, requires_grad=True)
        # the fast path's output and gradients (from its warm-up call), which every baseline must match
        want = []
        rows.setdefault("ours chunked (eager)", {})[T] = timeit(fwd_bwd(ours, u), R, want.extend)
        if comp is not None:
            t0 = time.perf_counter()
            fwd_bwd(comp, u)()
            first_compile[T] = time.perf_counter() - t0
            check = same_as(want, f"torch.compile T={T}")
            rows.setdefault("ours chunked (torch.compile)", {})[T] = timeit(fwd_bwd(comp, u), R, check)
        if peer is not None:
            check = same_as(want, f"mambapy pscan T={T}")
            rows.setdefault("mambapy pscan=True (the peer)", {})[T] = timeit(fwd_bwd(peer, u), R, check)
        if not args.quick:
            check = same_as(want, f"sequential reference T={T}")
            rows.setdefault("ours sequential reference", {})[T] = timeit(
                fwd_bwd(ours, u, scan="ref"), R, check
            )
            # its backward is quadratic in T: minutes per run at T=1024, so only T=256 (all sides alike)
            if peer_seq is not None and T <= 256:
                check = same_as(want, f"mamba-minimal loop T={T}")
                rows.setdefault("mambapy pscan=False, mamba-minimal loop", {})[T] = timeit(
                    fwd_bwd(peer_seq, u), R, check
                )
        # a different layer (not the same work, not checked): for information
        rows.setdefault("ours Mamba-2 SSD chunked (eager, info)", {})[T] = timeit(fwd_bwd(m2, u), R)
        del u, want
    return rows, first_compile


def print_layers(rows: dict[str, dict[int, float]], first_compile: dict, b: int, dm: int) -> None:
    """[1]'s table and the speed-ups against its targets."""
    Ts = LAYER_TS
    fast = rows["ours chunked (eager)"]
    print(f"[1] one layer fwd+bwd, batch {b}, d_model {dm}: microseconds per frame (batch x T), and time")
    print("    relative to our eager fast path at the same T")
    print(f"    {'':<50s}" + "".join(f"{'T=' + str(T):>18s}" for T in Ts))
    for name, ts in rows.items():
        cells = "".join(
            f"{ts[T] / (b * T) * 1e6:9.1f} ({ts[T] / fast[T]:5.2f}x)" if T in ts else f"{'-':>18s}"
            for T in Ts
        )
        print(f"    {name:<50s}{cells}")
    if first_compile:
        print(f"    (torch.compile first calls: {', '.join(f'{v:.0f}s' for v in first_compile.values())})")
    peer_t = rows.get("mambapy pscan=True (the peer)")
    if peer_t:
        print(
            f"    => speed-up vs mambapy pscan at T=1024:        {peer_t[1024] / fast[1024]:6.2f}x   (target >= 2)"
        )
    ref_t = rows.get("ours sequential reference")
    if ref_t:
        ups = ", ".join(f"T={T}: {ref_t[T] / fast[T]:.2f}x" for T in Ts)
        print(f"    => speed-up vs our sequential reference:       {ups}   (target >= 20)")
    seq_t = rows.get("mambapy pscan=False, mamba-minimal loop")
    if seq_t:
        ups = ", ".join(f"T={T}: {seq_t[T] / fast[T]:.0f}x" for T in seq_t)
        print(
            f"    => speed-up vs the mamba-minimal-style loop:   {ups}   (T=1024, 4096 dropped: minutes per run)"
        )
    comp_t = rows.get("ours chunked (torch.compile)")
    if comp_t:
        ups = ", ".join(f"T={T}: {fast[T] / comp_t[T]:.2f}x" for T in Ts)
        print(f"    => compiled vs eager fast path:                {ups}")
    print("    (every side: 1 warm-up + median of the repeats; baselines checked equal to the fast path,")
    print("    output and gradients, on their warm-up call)")
    if peer_t:
        print(f"    => mambapy pscan cost T=4096 / T=1024:         {peer_t[4096] / peer_t[1024]:6.2f}x")


def print_linearity(ours: Mamba1, m2: Mamba2, b: int, rounds: int) -> None:
    """[2]: T=1024 and T=4096 runs alternate, best of each (noise only ever adds time)."""
    T, dm = 1024, ours.d_model
    u = torch.randn(b, T, dm, requires_grad=True)
    u4 = torch.randn(b, 4 * T, dm, requires_grad=True)
    print(f"\n[2] cost(T=4096) / cost(T=1024), fwd+bwd, best of {rounds} alternating runs (ideal 4x)")
    for name, layer in (("Mamba-1 layer, fast path", ours), ("Mamba-2 layer (SSD chunked)", m2)):
        t1, t4 = linearity(fwd_bwd(layer, u), fwd_bwd(layer, u4), rounds)
        target = "   (target <= 4.5)" if layer is ours else ""
        print(f"    {name:<40s} {t4 / t1:5.2f}x{target}")
    scan1, scan4 = scan_inputs(b, T, ours), scan_inputs(b, 4 * T, ours)
    t1, t4 = linearity(scan_fwd_bwd(scan1), scan_fwd_bwd(scan4), rounds)
    print(f"    {'Mamba-1 selective scan alone':<40s} {t4 / t1:5.2f}x")


def print_whole_models(dm: int, R: int) -> None:
    """[3]: whole classifiers at T=4096, relative to the transformer."""
    bm, Tm, n_mels = 2, 4096, 80
    common = dict(d_model=dm, n_layers=4, frontend_channels=[128], subsample=1, dropout=0.0, head="softmax")
    models = {
        "mamba (bidirectional)": ModelConfig(arch="mamba", bidirectional=True, backend="torch", **common),
        "mamba2 (bidirectional)": ModelConfig(
            arch="mamba2", bidirectional=True, d_state=64, headdim=32, backend="torch", **common
        ),
        "transformer": ModelConfig(arch="transformer", n_heads=4, ff_mult=4, **common),
    }
    mel = torch.randn(bm, Tm, n_mels)
    lengths = torch.full((bm,), Tm)
    times = {}
    for name, cfg in models.items():
        model = build_model(cfg, n_mels, 100)
        n_params = sum(p.numel() for p in model.parameters())
        times[name] = (timeit(fwd_bwd(model, mel, lengths), R), n_params)
    base = times["transformer"][0]
    print(
        f"\n[3] whole classifier fwd+bwd, T={Tm}, batch {bm}, 4 layers, d_model {dm} (relative to transformer)"
    )
    for name, (t, n) in times.items():
        print(f"    {name:<25s} {n / 1e6:5.2f}M params   time {t / base:5.2f}x")


def print_recompiles(n_mels: int = 80) -> None:
    """[4]: dynamo graph compiles of the tiny config over a few T, dynamic=None vs dynamic=True."""
    print("\n[4] torch.compile recompiles over T in [200, 256, 300, 384, 512] (tiny model, dynamo graphs)")
    cfg = load_configs(parse_args(["--shards", "x", "--config", "tiny"]))[0]
    model = build_model(cfg, n_mels, 10).eval()
    for dyn in (None, True):
        torch._dynamo.reset()
        n_graphs = 0

        def backend(gm, example_inputs):
            nonlocal n_graphs
            n_graphs += 1
            return gm.forward

        comp = torch.compile(model, backend=backend, dynamic=dyn)
        with torch.no_grad():
            for Tx in [200, 256, 300, 384, 512]:
                comp(torch.randn(2, Tx, n_mels), torch.tensor([Tx, Tx // 2]))
        print(f"    dynamic={dyn!s:<5s}: {n_graphs} graph compiles for 5 distinct T")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The GPU check: one prepared run on one GPU (no network) that says what spkr's GPU path does there.

    python tools/gpu_check.py --out gpu-out                  # on a CUDA machine, under 8 minutes
    python tools/gpu_check.py --dry-run --out /tmp/gc        # every step on CPU at tiny sizes (CI)

Writes ``<out>/gpu_check.json`` (everything measured) and ``<out>/gpu_check.md`` (the tables), both
rewritten after every section, so a run cut short keeps what it measured. Sections, in order:

1. ``env``      torch, CUDA, GPU, Triton, Python; whether ``mamba_ssm`` imports (and why not).
2. ``tests``    the ``cuda``-marked tests (pytest -m cuda) of the files that have them.
3. ``scans``    each Mamba-1 scan alone (spkr's Triton scan, and other tile shapes of it at the middle
                T; mamba_ssm's CUDA kernel where it imports; mambapy's parallel scan, pscan; spkr's
                CPU-cache scan on the GPU) checked equal to the sequential reference (fp32: output and
                every input gradient), then fwd+bwd timed on bf16 inputs at T = 300 / 1,000 / 3,000
                frames (mamba-torch's sizes: d_inner 384, d_state 16, batch 16).
4. ``kernels``  the same at the layer level: one Mamba layer (in_proj, conv, scan, gate, out_proj) per
                backend, all with the same weights, checked equal to the layer with the sequential scan,
                then fwd+bwd timed in bf16 autocast. Mamba-1: as in [3]; Mamba-2 (d_state 64, headdim
                32): spkr's chunked SSD, eager and torch.compile'd, and mamba_ssm's Triton SSD where it
                imports. Times: CUDA events, median of ``--repeats`` after a warm-up; ratios against
                mambapy's pscan (Mamba-1) and the eager SSD (Mamba-2).
5. ``train``    ``python -m spkr.train`` runs of ``tiny``, ``tiny-transformer``, ``mamba-torch`` and
                ``transformer`` (torch.compile, bf16 autocast, 3 s crops, ``--workers`` DataLoader
                workers) on local synthetic LibriSpeech-like shards (tools/bench_train.py's): samples/s
                and data-wait share over the steps after the first ``--skip``, peak GPU memory, and the
                time to the first step logged (startup + compile); a failed run keeps its stderr's tail,
                and a failed compiled run is run again eager.
6. ``loader``   the training loader alone over the same shards (same batch, crops, workers): samples/s,
                beside what each model consumed in [4].

Every figure is a ratio or a share measured in this one process run: absolute times depend on the GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "tests")]

if "--dry-run" in sys.argv:  # the Triton scan on CPU tensors: its interpreter, set before Triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TRAIN_MODELS = ("tiny", "tiny-transformer", "mamba-torch", "transformer")
TILES = [
    (16, 16, 4),
    (8, 16, 4),
    (16, 8, 4),
    (8, 32, 4),
    (16, 16, 8),
    (32, 16, 8),
    (8, 8, 2),
    (16, 32, 8),
    (4, 32, 4),
]
CUDA_TEST_FILES = ("tests/test_scan_triton.py", "tests/test_ssm.py", "tests/test_cross_device.py")


class Report:
    """Results by section, written to gpu_check.json and gpu_check.md after every section."""

    def __init__(self, out: Path):
        self.out, self.data, self.md = out, {}, []
        self.last = time.time()
        out.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, result, lines: list[str]) -> None:
        took, self.last = time.time() - self.last, time.time()
        self.data[section] = result
        self.data.setdefault("seconds", {})[section] = round(took, 1)
        self.md += [f"## {section} ({took:.0f} s)", "", *lines, ""]
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        (self.out / "gpu_check.md").write_text("\n".join(["# spkr GPU check", "", *self.md]))
        print("\n".join([f"== {section}", *lines]), flush=True)


# ----------------------------------------------------------------------------------------------- 1. env


def environment(device: torch.device) -> tuple[dict, list[str]]:
    from spkr.models.mamba import mamba_ssm_available, triton_scan_available

    try:
        import triton

        triton_version = triton.__version__
    except ImportError as e:
        triton_version = f"missing ({e})"
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU dry run)",
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "spkr_triton_scan": triton_scan_available() or "imports",
        "mamba_ssm": mamba_ssm_available() or "imports",
        "cpus": os.cpu_count(),
    }
    return env, ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in env.items())]


# --------------------------------------------------------------------------------------------- 2. tests


def cuda_tests(dry_run: bool) -> tuple[dict, list[str]]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *CUDA_TEST_FILES]
    if dry_run:  # the tests' own CPU runs are CI's; here only that the command is well formed
        cmd += ["--collect-only"]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    tail = (r.stdout + r.stderr).strip().splitlines()[-12:]
    result = {
        "command": " ".join(cmd[2:]),
        "returncode": r.returncode,
        "seconds": time.time() - t0,
        "tail": tail,
    }
    return result, [f"`{result['command']}`: exit {r.returncode}", "", "```", *tail, "```"]


# ------------------------------------------------------------------------------------------- 3. kernels


def _mambapy_peer(layer, pscan: bool):
    """mambapy's MambaBlock with ``layer``'s weights (the same parameter names)."""
    from mambapy.mamba import MambaBlock, MambaConfig

    cfg = MambaConfig(
        d_model=layer.d_model, n_layers=1, d_state=layer.d_state, expand_factor=layer.d_inner // layer.d_model,
        d_conv=layer.conv1d.kernel_size[0], dt_rank=layer.dt_rank, pscan=pscan,
    )  # fmt: skip
    peer = MambaBlock(cfg).to(layer.A_log.device)
    peer.load_state_dict(layer.state_dict())
    return peer


def mamba1_backends(layer) -> dict:
    """{name: module} of every Mamba-1 path usable here, all with ``layer``'s weights."""
    from spkr.models.mamba import mamba_ssm_available, triton_scan_available

    device = layer.A_log.device

    def with_backend(name):
        m = copy.deepcopy(layer)
        m.backend = name
        return m

    out = {}
    if triton_scan_available() is None and (
        device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    ):
        out["spkr triton"] = with_backend("triton")
    if device.type == "cuda" and mamba_ssm_available() is None:
        out["mamba_ssm"] = with_backend("mamba_ssm")
    try:
        out["mambapy pscan"] = _mambapy_peer(layer, pscan=True)
    except ImportError:
        pass
    out["spkr cpu-scan"] = with_backend("torch")
    return out


def mamba2_backends(layer) -> dict:
    from spkr.models.mamba import mamba_ssm_available

    out = {"spkr ssd": layer, "spkr ssd compiled": torch.compile(layer, dynamic=True)}
    if layer.A_log.device.type == "cuda" and mamba_ssm_available() is None:
        m = copy.deepcopy(layer)
        m.backend = "mamba_ssm"
        out["mamba_ssm ssd"] = m
    return out


def fwd_bwd(module, u: torch.Tensor, dtype: torch.dtype | None):
    """Output and the gradients (input, then parameters by name) of sum(module(u) * w)."""
    u = u.detach().requires_grad_()
    for p in module.parameters():
        p.grad = None
    with torch.autocast(u.device.type, dtype=dtype, enabled=dtype is not None):
        y = module(u)
    w = torch.randn(y.shape, device=y.device, generator=torch.Generator(y.device).manual_seed(1))
    (y.float() * w).sum().backward()
    grads = {"input": u.grad}
    grads |= {
        n.removeprefix("_orig_mod."): p.grad for n, p in module.named_parameters() if p.grad is not None
    }
    return y.detach().float(), grads


def compare(module, reference, u) -> dict:
    """Max relative differences of ``module`` against ``reference`` (the sequential scan), fp32."""
    y, g = fwd_bwd(module, u, None)
    y_ref, g_ref = reference
    out = {"output": ((y - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-6)).item()}
    for name, r in g_ref.items():
        out[name] = ((g[name].float() - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()
    return out


def reference_of(layer, u) -> tuple:
    """The sequential reference's output and gradients (``scan="ref"``), fp32."""

    class Ref(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x, scan="ref")

    y, g = fwd_bwd(Ref(layer), u, None)
    return y, {k.removeprefix("m."): v for k, v in g.items()}


def cuda_time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up (CUDA events on a GPU)."""
    fn()
    ts = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            ts.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def kernels(device: torch.device, sizes: dict, repeats: int, slow_cap_s: float) -> tuple[dict, list[str]]:
    from spkr.models.mamba import Mamba1, Mamba2

    torch.manual_seed(0)
    b, dm, Ts = sizes["batch"], sizes["d_model"], sizes["T"]
    result = {"sizes": sizes, "mamba1": {}, "mamba2": {}}
    lines = []
    archs = (
        ("mamba1", lambda: Mamba1(dm, d_state=sizes["d_state"], backend="torch"), mamba1_backends),
        ("mamba2", lambda: Mamba2(dm, d_state=sizes["d_state2"], headdim=sizes["headdim"], backend="torch"), mamba2_backends),
    )  # fmt: skip
    for arch, make, backends in archs:
        if arch not in sizes["archs"]:
            continue
        layer = make().to(device)
        u = torch.randn(2, sizes["check_T"], dm, device=device)
        ref = reference_of(layer, u)
        paths = backends(layer)
        rows = {}
        for name, module in paths.items():
            try:
                diff = compare(module, ref, u)
            except Exception as e:  # a backend that fails is a finding of the check, not its end
                rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                continue
            rows[name] = {
                "equal_to_reference": max(diff.values()) < sizes["tolerance"],
                "max_rel_diff": max(diff.values()),
            }
            times = {}
            for T in Ts:
                x = torch.randn(b, T, dm, device=device)
                if times and min(times.values()) > slow_cap_s:
                    times[T] = None  # too slow to time at longer T within the check's budget
                    continue
                try:
                    times[T] = cuda_time(lambda m=module, x=x: fwd_bwd(m, x, sizes["dtype"]), repeats)
                except torch.OutOfMemoryError:
                    times[T] = "OOM"
                    torch.cuda.empty_cache()
            rows[name]["fwd_bwd_s"] = times
        result[arch] = rows
        lines += table_of_times(arch, rows, Ts)
    return result, lines


def table_of_times(arch: str, rows: dict, Ts: list[int], base: str | None = None) -> list[str]:
    base = base or ("mambapy pscan" if arch == "mamba1" else "spkr ssd")
    head = f"| {arch} | equal to reference (max rel. diff) | " + " | ".join(
        f"T={T} ms (x {base})" for T in Ts
    )
    lines = [head + " |", "|---" * (2 + len(Ts)) + "|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |" + " |" * len(Ts))
            continue
        cells = []
        for T in Ts:
            t, t0 = r["fwd_bwd_s"].get(T), rows.get(base, {}).get("fwd_bwd_s", {}).get(T)
            if not isinstance(t, float):
                cells.append(str(t if t is not None else "skipped"))
            else:
                ratio = f" ({t0 / t:.2f}x)" if isinstance(t0, float) else ""
                cells.append(f"{1e3 * t:.2f}{ratio}")
        lines.append(
            f"| {name} | {r['equal_to_reference']} ({r['max_rel_diff']:.1e}) | " + " | ".join(cells) + " |"
        )
    return lines + [""]


def scan_implementations(device: torch.device, tiles: list) -> dict:
    """{name: fn(x, dt, A, B, C, D) -> y} of every Mamba-1 scan usable here, alone (no layer around it)."""
    from spkr.models import ssm
    from spkr.models.mamba import mamba_ssm_available, triton_scan_available

    impls = {}
    if triton_scan_available() is None and (
        device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    ):
        from spkr.models import scan_triton as st

        def triton_with(tile):
            def run(*args):
                saved = (st.BLOCK_T, st.BLOCK_D, st.NUM_WARPS)
                st.BLOCK_T, st.BLOCK_D, st.NUM_WARPS = tile
                try:
                    return st.selective_scan_triton(*args)
                finally:
                    st.BLOCK_T, st.BLOCK_D, st.NUM_WARPS = saved

            return run

        default = (st.BLOCK_T, st.BLOCK_D, st.NUM_WARPS)
        impls["spkr triton"] = st.selective_scan_triton
        for tile in tiles:
            if tuple(tile) != default:
                impls["spkr triton {}x{}x{}".format(*tile)] = triton_with(tile)
    if device.type == "cuda" and mamba_ssm_available() is None:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        def mamba_ssm_scan(x, dt, A, B, C, D):
            x, dt, B, C = (t.transpose(1, 2).contiguous() for t in (x, dt, B, C))
            return selective_scan_fn(x, dt, A, B, C, D.float()).transpose(1, 2)

        impls["mamba_ssm"] = mamba_ssm_scan
    try:
        from mambapy.mamba import MambaBlock

        impls["mambapy pscan"] = lambda *args: MambaBlock.selective_scan(None, *args)  # uses no state
    except ImportError:
        pass
    impls["spkr cpu-scan"] = ssm.selective_scan_chunked
    return impls


def scan_inputs(b: int, T: int, d: int, n: int, device, dtype) -> list[torch.Tensor]:
    """x, dt, A, B, C, D of a Mamba-1 scan (dt softplus'ed, A negative), leaves needing grads."""
    g = torch.Generator().manual_seed(T)
    x, dtr, B, C = (torch.randn(b, T, k, generator=g) for k in (d, d, n, n))
    A, D = -torch.rand(d, n, generator=g) - 0.5, torch.randn(d, generator=g)
    dt = F.softplus(dtr - 3)
    low = [t.to(device, dtype) for t in (x, dt)] + [A.to(device)] + [t.to(device, dtype) for t in (B, C)]
    return [t.requires_grad_() for t in (*low, D.to(device))]


def scans(device: torch.device, sizes: dict, repeats: int, slow_cap_s: float) -> tuple[dict, list[str]]:
    """Each Mamba-1 scan alone: checked against the sequential reference (fp32, output and every input
    gradient), then fwd+bwd timed on bf16 inputs (A and D float32, as the layers pass them)."""
    from spkr.models import ssm

    b, d, n = sizes["batch"], 2 * sizes["d_model"], sizes["d_state"]
    impls = scan_implementations(device, sizes["tiles"])
    check = scan_inputs(2, sizes["check_T"], d, n, device, torch.float32)
    y_ref = ssm.selective_scan_ref(*check)
    g_ref = torch.autograd.grad(y_ref.sum(), check)
    rows = {}
    for name, fn in impls.items():
        try:
            y = fn(*check)
            grads = torch.autograd.grad(y.float().sum(), check)
        except Exception as e:  # a scan that fails is a finding of the check, not its end
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            continue
        diffs = [((y.float() - y_ref).abs().max() / y_ref.abs().max()).item()]
        diffs += [
            ((a.float() - r).abs().max() / r.abs().max().clamp_min(1e-6)).item() for a, r in zip(grads, g_ref)
        ]
        rows[name] = {
            "equal_to_reference": max(diffs) < sizes["tolerance"],
            "max_rel_diff": max(diffs),
            "fwd_bwd_s": {},
        }
    for T in sizes["T"]:
        args = scan_inputs(b, T, d, n, device, torch.bfloat16)
        for name, fn in impls.items():
            row = rows[name]
            if "error" in row or (name.count("x") == 2 and T != sizes["T"][len(sizes["T"]) // 2]):
                continue  # other tiles: at the middle T only
            if any(isinstance(t, float) and t > slow_cap_s for t in row["fwd_bwd_s"].values()):
                row["fwd_bwd_s"][T] = None
                continue

            def run(fn=fn, args=args):
                fn(*args).float().sum().backward()

            try:
                row["fwd_bwd_s"][T] = cuda_time(run, repeats)
            except torch.OutOfMemoryError:
                row["fwd_bwd_s"][T] = "OOM"
                torch.cuda.empty_cache()
    lines = [f"Mamba-1 scan alone, batch {b}, d_inner {d}, d_state {n}, bf16 inputs", ""]
    return {"sizes": {k: v for k, v in sizes.items() if k != "dtype"}, "scans": rows}, lines + table_of_times(
        "scan", rows, sizes["T"], base="mambapy pscan"
    )


# --------------------------------------------------------------------------------------------- 4. train


def train_once(name: str, compiled: bool, shards: Path, args, out: Path, timeout: float) -> dict:
    """One ``python -m spkr.train`` run of bundled config ``name``: its figures, or its error with the
    tail of its stderr."""
    cmd = [
        sys.executable, "-m", "spkr.train", "--shards", str(shards), "--config", name, "--out", str(out),
        "--fresh", "--epochs", "1000", "--max-steps", str(args.steps), "--log-every", "1", "--no-progress",
        "--ckpt-every", "0", "--crop-frames", str(args.crop), "--batch-size", str(args.batch),
        "--eval-batch-size", str(args.batch), "--num-workers", str(args.workers), "--verify-pairs", "0",
        "--dtype", args.dtype, *(["--compile", "true"] if compiled else ["--no-compile"]),
    ]  # fmt: skip
    t0 = time.time()
    env = dict(os.environ, TORCHDYNAMO_VERBOSE="1")  # a compile failure's whole story, in stderr_tail
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.time() - t0}
    wall = time.time() - t0
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()
        return {"error": (tail or ["(no message)"])[-1][:400], "stderr_tail": tail[-80:], "wall_s": wall}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if x["kind"] == "train"]
    config = next(x for x in rows if x["kind"] == "config")
    timed = steps[args.skip :]
    wall_timed = sum(1 / x["steps_per_s"] for x in timed)
    return {
        "params": config["params"], "backend": config["backend"], "dtype": config["dtype"],
        "compile": config["compile"], "steps": len(steps), "timed_steps": len(timed),
        "samples_per_s": sum(x["samples_per_s"] / x["steps_per_s"] for x in timed) / wall_timed,
        "step_ms": 1e3 * wall_timed / len(timed),
        "data_wait_share": sum(x["data_wait"] / x["steps_per_s"] for x in timed) / wall_timed,
        "gpu_mem_peak_gib": max((x.get("gpu_mem_peak_gib") or 0) for x in steps),
        "first_step_after_s": steps[0]["time"] - config["time"], "wall_s": wall,
    }  # fmt: skip


def train_runs(shards: Path, args, work: Path) -> tuple[dict, list[str]]:
    """Each model of ``args.models`` trained as configured; a compiled run that fails is run again
    eager (``<name> (eager)``), so its throughput and data wait are known all the same."""
    results = {}
    for name in args.models:
        for compiled in [args.compile] + ([False] if args.compile else []):
            key = name if compiled == args.compile else f"{name} (eager)"
            timeout = min(args.train_timeout, args.deadline - time.time() - 30)  # 30 s left for the loader
            if timeout < 30:
                results[key] = {"error": "skipped: the check's --budget-s is spent"}
                break
            results[key] = train_once(name, compiled, shards, args, work / f"run-{len(results)}", timeout)
            if "error" not in results[key]:
                break
    lines = [
        "| model | params | backend | dtype | compile | samples/s | step ms | data wait | peak GPU GiB | startup+compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |||||||||")
            continue
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['backend']} | {r['dtype']} | {r['compile']} | "
            f"{r['samples_per_s']:.0f} | {r['step_ms']:.1f} | {100 * r['data_wait_share']:.1f} % | "
            f"{r['gpu_mem_peak_gib']:.2f} | {r['first_step_after_s']:.0f} |"
        )
    return results, lines


# -------------------------------------------------------------------------------------------- 5. loader


def loader_alone(shards: Path, args, consumed: dict) -> tuple[dict, list[str]]:
    from spkr.stream.loader import SpeakerLoader

    loader = SpeakerLoader(
        str(shards), "train", args.batch, train=True, num_workers=args.workers, crop_frames=args.crop,
        dtype="float16", pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    n = samples = 0
    t0 = None
    epoch = 0
    while n < args.loader_batches:
        loader.set_epoch(epoch)
        for batch in loader:
            if t0 is None:  # the first batch carries the workers' start-up
                t0 = time.perf_counter()
                continue
            samples += batch["mel"].shape[0]
            n += 1
            if n >= args.loader_batches:
                break
        epoch += 1
    rate = samples / (time.perf_counter() - t0)
    result = {"samples_per_s": rate, "batches": n, "workers": args.workers, "batch": args.batch}
    lines = [f"loader alone: {rate:.0f} samples/s ({n} batches of {args.batch}, {args.workers} workers)", ""]
    for name, r in consumed.items():
        if "samples_per_s" in r:
            lines.append(
                f"- {name} consumed {r['samples_per_s']:.0f} samples/s: loader headroom {rate / r['samples_per_s']:.1f}x"
            )
    return result, lines


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--dry-run", action="store_true", help="every step on CPU at tiny sizes (CI)")
    p.add_argument("--sections", default="env,tests,scans,kernels,train,loader")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--archs", default="mamba1,mamba2", help="kernels: which layers")
    p.add_argument("--kernel-T", default="300,1000,3000", help="scans, kernels: sequence lengths timed")
    p.add_argument("--synthetic", type=int, default=2000, help="synthetic training samples")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--skip", type=int, default=20, help="first steps left out of the training figures")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--crop", type=int, default=300)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--models", default=",".join(TRAIN_MODELS))
    p.add_argument("--loader-batches", type=int, default=200)
    p.add_argument("--train-timeout", type=int, default=240, help="seconds per training run at most")
    p.add_argument("--budget-s", type=int, default=450, help="training runs stop starting after this")
    args = p.parse_args()
    args.deadline = time.time() + args.budget_s
    args.models = args.models.split(",")
    args.compile = not args.dry_run
    sections = args.sections.split(",")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here (use --dry-run for the CPU check of this script)", file=sys.stderr
        )
        return 2
    sizes = dict(archs=args.archs.split(","), tiles=TILES, batch=16, d_model=192, d_state=16, d_state2=64, headdim=32, T=[int(t) for t in args.kernel_T.split(",")], check_T=200,
                 tolerance=2e-3, dtype=torch.bfloat16)  # fmt: skip
    if args.dry_run:  # every section's code on CPU, small enough for CI (the Triton interpreter is slow)
        sizes |= dict(
            tiles=TILES[:2], batch=1, d_model=8, d_state=4, d_state2=8, headdim=8, T=[8, 12], check_T=10
        )
        sizes["dtype"] = None
        args.synthetic, args.steps, args.skip, args.batch, args.crop = 24, 3, 1, 4, 32
        args.workers, args.loader_batches, args.repeats = 1, 3, 1
        args.models = args.models[:2]
    report = Report(Path(args.out))
    if "env" in sections:
        report.add("env", *environment(device))
    if "tests" in sections:
        report.add("tests", *cuda_tests(args.dry_run))
    if "scans" in sections:
        report.add("scans", *scans(device, sizes, args.repeats, slow_cap_s=1.0 if not args.dry_run else 60))
    if "kernels" in sections:
        report.add(
            "kernels", *kernels(device, sizes, args.repeats, slow_cap_s=2.0 if not args.dry_run else 60)
        )
    if "train" in sections or "loader" in sections:
        from bench_train import synthetic_shards

        with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
            t0 = time.time()
            shards = synthetic_shards(Path(tmp) / "shards", args.synthetic)
            print(f"synthetic shards written in {time.time() - t0:.0f} s", flush=True)
            consumed = {}
            if "train" in sections:
                consumed, lines = train_runs(shards, args, Path(tmp))
                report.add("train", consumed, lines)
            if "loader" in sections:
                report.add("loader", *loader_alone(shards, args, consumed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

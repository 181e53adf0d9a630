"""Benchmark spkr's shard loader against the limits and the usual alternatives, on synthetic data.

    python tools/bench_loader.py [--samples 1200] [--batch-size 32] [--workers 2] [--dir DIR]

Writes LibriSpeech-like features (log-normal lengths, mean ~1230 frames, 80 mels, float16) three
ways into a temp dir, then measures samples/s and MB/s per worker (one process, page cache warm) for:

  * raw read       the shard bytes read sequentially (I/O limit)
  * lean parse     tar headers walked + npy arrays viewed, nothing else (parse limit)
  * spkr           SpeakerLoader: plan, checked parse, bucketing, normalise, pad, collate
  * wds .pth       webdataset's usual pipeline: WebDataset(urls).decode().to_tuple() + batching,
                   samples stored as torch.save'd tensors (``.pth``)
  * per-file .pt   the original scripts: one file per utterance, torch.load(weights_only=True)

plus the steady-state spkr rate with DataLoader workers (float32 and float16 batches), padding with
bucketing vs random batching (plan only, 28k LibriSpeech-like lengths) and the loader's RSS when the
shard count grows 10x.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spkr import runtime  # noqa: E402

runtime.configure()  # SPKR_HUGEPAGES=1 takes effect only before torch loads (spkr/runtime.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spkr.stream import SpeakerLoader  # noqa: E402
from spkr.stream.plan import EpochPlan, default_bucket_window  # noqa: E402

N_MELS = 80


def lengths(rng, n, mean=1230.0, sigma=0.45):
    return np.maximum(100, rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n)).astype(np.int64)


def write_all(root: Path, n: int, per_shard: int, seed: int = 0):
    """spkr shards (+ manifest), .pth webdataset shards and per-utterance .pt files of the same data."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from shardkit import make_shards

    counts = [per_shard] * (n // per_shard) + ([n % per_shard] if n % per_shard else [])
    rng = np.random.default_rng(seed)
    fr = lengths(rng, n)
    frames, i = [], 0
    for c in counts:
        frames.append(fr[i : i + c].tolist())
        i += c
    spkr_dir = make_shards(root / "spkr", counts, frames=frames, n_classes=50, seed=seed)
    from spkr.manifest import Manifest
    from spkr.stream.reader import ShardReader

    m = Manifest.load(str(spkr_dir))
    rd = ShardReader(str(spkr_dir))
    (root / "pth").mkdir()
    (root / "files").mkdir()
    urls = []
    for si, info in enumerate(m.split("train").shards):
        url = root / "pth" / f"shard-{si:06d}.tar"
        urls.append(str(url))
        with tarfile.open(url, "w") as tf:
            for r in rd.read_shard(info):
                t = torch.from_numpy(np.array(r.feats))
                buf = io.BytesIO()
                torch.save(t, buf)
                for ext, payload in (("pth", buf.getvalue()), ("cls", str(r.label).encode())):
                    ti = tarfile.TarInfo(f"{r.key}.{ext}")
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
                torch.save({"mel": t, "label": r.label}, root / "files" / f"{r.key}.pt")
    return spkr_dir, m, urls


def pad_collate(feats, labels, mean, inv_std):
    lens = torch.tensor([f.shape[0] for f in feats])
    mel = torch.empty(len(feats), int(lens.max()), N_MELS)
    for i, f in enumerate(feats):
        mel[i, f.shape[0] :] = 0
        row = mel[i, : f.shape[0]]
        row.copy_(f)
        row.sub_(mean).mul_(inv_std)
    return mel, lens, torch.tensor(labels)


def timed(fn):
    t0 = time.perf_counter()
    n, nbytes = fn()
    dt = time.perf_counter() - t0
    return {"samples_s": n / dt, "MB_s": nbytes / dt / 1e6, "seconds": dt}


def bench_raw(spkr_dir, m):
    def run():
        total = 0
        for s in m.split("train").shards:
            with open(spkr_dir / s.name, "rb", buffering=0) as f:
                while b := f.read(4 << 20):
                    total += len(b)
        return m.split("train").num_samples, total

    return run


def bench_lean(spkr_dir, m, batch=None):
    """Headers walked, npy arrays viewed, no checks; with ``batch``: plus the same padded,
    normalised float32 batches as spkr (the floor for producing those batches)."""
    mean = torch.tensor(m.stats["mean"])
    inv = 1 / torch.tensor(m.stats["std"]).clamp_min(1e-5)

    def run():
        n = total = 0
        buf = []
        for s in m.split("train").shards:
            blob = bytearray(s.bytes)
            with open(spkr_dir / s.name, "rb", buffering=0) as f:
                f.readinto(blob)
            total += len(blob)
            pos = 0
            while pos + 512 <= len(blob) and blob[pos] != 0:
                size = int(bytes(blob[pos + 124 : pos + 136]).rstrip(b"\0 ") or b"0", 8)
                name = bytes(blob[pos : pos + 100]).rstrip(b"\0")
                data = pos + 512
                if name.endswith(b".npy"):
                    hlen = int.from_bytes(blob[data + 8 : data + 10], "little")
                    hdr = bytes(blob[data + 10 : data + 10 + hlen]).decode("latin1")
                    rows = int(hdr.split("'shape': (")[1].split(",")[0])
                    a = np.frombuffer(blob, np.float16, rows * N_MELS, data + 10 + hlen)
                    n += 1
                    if batch:
                        buf.append(torch.from_numpy(a.reshape(rows, N_MELS)))
                        if len(buf) == batch:
                            pad_collate(buf, [0] * len(buf), mean, inv)
                            buf = []
                pos = data + (size + 511) // 512 * 512
        if buf:
            pad_collate(buf, [0] * len(buf), mean, inv)
        return n, total

    return run


def bench_spkr(spkr_dir, m, batch, workers, **kw):
    def run():
        ld = SpeakerLoader(str(spkr_dir), "train", batch, rank=0, world_size=1, num_workers=workers, **kw)
        n = sum(len(b["keys"]) for b in ld)
        return n, sum(s.bytes for s in m.split("train").shards)

    return run


def workers_rate(spkr_dir, batch, workers, dtype, **kw):
    """Steady-state samples/s of SpeakerLoader with DataLoader workers: epoch 1 warms up (worker
    start-up, page cache), epochs 2-3 are timed. Each batch crosses to this process in shared memory."""
    ld = SpeakerLoader(
        str(spkr_dir), "train", batch, rank=0, world_size=1, num_workers=workers, dtype=dtype, **kw
    )
    n = 0
    for epoch in range(3):
        ld.set_epoch(epoch)
        if epoch == 1:
            t0, n = time.perf_counter(), 0
        n += sum(len(b["keys"]) for b in ld)
    return n / (time.perf_counter() - t0)


def bench_wds(urls, m, batch):
    import webdataset as wds

    mean = torch.tensor(m.stats["mean"])
    inv = 1 / torch.tensor(m.stats["std"]).clamp_min(1e-5)

    def run():
        ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode().to_tuple("pth", "cls")
        n, buf = 0, []
        for x, y in ds:
            buf.append((x, y))
            if len(buf) == batch:
                pad_collate([a for a, _ in buf], [b for _, b in buf], mean, inv)
                n += len(buf)
                buf = []
        if buf:
            pad_collate([a for a, _ in buf], [b for _, b in buf], mean, inv)
            n += len(buf)
        return n, sum(os.path.getsize(u) for u in urls)

    return run


def bench_files(root, m, batch):
    files = sorted((root / "files").glob("*.pt"))
    mean = torch.tensor(m.stats["mean"])
    inv = 1 / torch.tensor(m.stats["std"]).clamp_min(1e-5)

    def run():
        order = np.random.default_rng(0).permutation(len(files))
        n = 0
        for k in range(0, len(order), batch):
            items = [torch.load(files[i], weights_only=True) for i in order[k : k + batch]]
            pad_collate([d["mel"] for d in items], [d["label"] for d in items], mean, inv)
            n += len(items)
        return n, sum(f.stat().st_size for f in files)

    return run


def padding(batch):
    rng = np.random.default_rng(1)
    counts = [100] * 281  # 28k LibriSpeech-like lengths
    frames = [lengths(rng, c) for c in counts]
    out = {}
    for name, bw in (("random", batch), ("bucketed", None)):
        p = EpochPlan(counts, frames, batch_size=batch, num_workers=2, bucket_window=bw)
        real = tot = 0
        for b in p.batches():
            f = p.frames_at(b)
            real += f.sum()
            tot += f.max() * len(f)
        out[name] = 1 - real / tot
    return out


def rss_run(spkr_dir, batch):
    import psutil

    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    base = proc.memory_info().rss
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    ld = SpeakerLoader(str(spkr_dir), "train", batch, rank=0, world_size=1, num_workers=0)
    for _ in ld:
        pass
    stop.set()
    t.join()
    return (peak[0] - base) / 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1200)
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per method (best is kept)")
    ap.add_argument("--dir", default=None, help="work dir (default: a temp dir, removed)")
    # One thread, as in a DataLoader worker: every method's per-row copies run alike (with 2 OpenMP
    # threads such small copies are ~25x slower on this machine, which would distort the comparison).
    torch.set_num_threads(1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.dir or tempfile.mkdtemp(prefix="spkr-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        spkr_dir, m, urls = write_all(root, args.samples, args.per_shard)
        nbytes = sum(s.bytes for s in m.split("train").shards)
        print(
            f"data: {args.samples} samples, {len(urls)} shards, {nbytes / 1e6:.0f} MB, mean "
            f"{np.mean(m.split('train').frames_array()):.0f} frames x {N_MELS} mels float16 "
            f"(written in {time.perf_counter() - t0:.0f}s)"
        )
        B = args.batch_size
        rows = {}
        methods = (
            ("raw read (limit)", bench_raw(spkr_dir, m)),
            ("lean parse, views only", bench_lean(spkr_dir, m)),
            ("lean parse + collate", bench_lean(spkr_dir, m, B)),
            ("spkr SpeakerLoader", bench_spkr(spkr_dir, m, B, 0)),
            ("wds .pth .decode()", bench_wds(urls, m, B)),
            ("per-file torch.load", bench_files(root, m, B)),
        )
        # each method back to back, as it would run alone in a DataLoader worker: warm-up, then the
        # best of --repeats (machine noise only ever adds time)
        for name, fn in methods:
            fn()  # warm (page cache, imports, allocator)
            rows[name] = min((timed(fn) for _ in range(args.repeats)), key=lambda r: r["seconds"])
        print(f"\nper worker (1 process, 1 thread; {runtime.describe()}), batch {B}:")
        print(f"  {'method':<26}{'samples/s':>12}{'MB/s':>10}")
        for name, r in rows.items():
            print(f"  {name:<26}{r['samples_s']:>12.0f}{r['MB_s']:>10.0f}")
        print(f"  spkr, {args.workers} DataLoader workers (epochs 2-3, after start-up), samples/s in total:")
        for dtype in ("float32", "float16"):
            rate = workers_rate(spkr_dir, B, args.workers, dtype)
            print(
                f"    {dtype + ' batches' + ('' if dtype == 'float32' else ' (as spkr.train)'):<34}{rate:8.0f}"
            )
        spkr = rows["spkr SpeakerLoader"]["samples_s"]
        r_wds = spkr / rows["wds .pth .decode()"]["samples_s"]
        r_lean = spkr / rows["lean parse + collate"]["samples_s"]
        r_views = spkr / rows["lean parse, views only"]["samples_s"]
        r_files = spkr / rows["per-file torch.load"]["samples_s"]
        # checksum cost: the same loader with and without, runs alternating (noise hits both alike)
        cost = {}
        for mode, kw in (("mmap", {}), ("streaming", {"mmap": False})):
            on, off = (
                bench_spkr(spkr_dir, m, B, 0, **kw),
                bench_spkr(spkr_dir, m, B, 0, checksums=False, **kw),
            )
            on(), off()
            best = {"on": math.inf, "off": math.inf}
            for _ in range(args.repeats * 2):
                best["on"] = min(best["on"], timed(on)["seconds"])
                best["off"] = min(best["off"], timed(off)["seconds"])
            cost[mode] = 1 - best["off"] / best["on"]
        on = off = 0.0  # as spkr.train reads: DataLoader workers, float16 batches (best of alternating runs)
        for _ in range(3):
            on = max(on, workers_rate(spkr_dir, B, args.workers, "float16"))
            off = max(off, workers_rate(spkr_dir, B, args.workers, "float16", checksums=False))
        cost[f"{args.workers} workers"] = 1 - on / off
        print(
            "\nper-sample checksums (xxh3-64 of every sample's bytes, on by default): cost "
            + ", ".join(f"{mode} read {c:.1%}" for mode, c in cost.items())
            + f" of loader throughput   (target < 10%) {'OK' if max(cost.values()) < 0.10 else 'MISS'}"
        )
        print("\nratios:")
        print(
            f"  spkr / wds .pth pipeline     = {r_wds:.1f}x   (target >= 3x)  {'OK' if r_wds >= 3 else 'MISS'}"
        )
        print(
            f"  spkr / lean tar-parse limit  = {r_lean:.0%}   (target >= 50%) {'OK' if r_lean >= 0.5 else 'MISS'}"
            f"  [same batches; vs views-only parse, which makes no batches: {r_views:.0%}]"
        )
        print(f"  spkr / per-file torch.load   = {r_files:.1f}x")
        pad = padding(B)
        print(
            f"\npadding (28.1k LibriSpeech-like lengths, batch {B}): random batching {pad['random']:.1%}, "
            f"bucketed (window {default_bucket_window(B)}) {pad['bucketed']:.1%}   (target <= 5%) "
            f"{'OK' if pad['bucketed'] <= 0.05 else 'MISS'}"
        )
        # RSS: the same 4000 samples (~200 MB) in 10 and in 100 shards: the loader's memory must not
        # grow with the shard count (nothing kept per shard), and stays far below the data size
        from shardkit import make_shards

        few = make_shards(root / "rss10", [400] * 10, mean_frames=300, n_classes=50, seed=2)
        many = make_shards(root / "rss100", [40] * 100, mean_frames=300, n_classes=50, seed=2)
        data_mb = sum(p.stat().st_size for p in few.rglob("*.tar")) / 1e6
        r10, r100 = rss_run(few, B), rss_run(many, B)
        print(
            f"\nloader RSS growth during an epoch over the same 4000 samples ({data_mb:.0f} MB): in 10 shards "
            f"{r10:.0f} MB, in 100 shards {r100:.0f} MB (x{r100 / max(r10, 1e-9):.2f}; flat: nothing is kept "
            "per shard, pages are unmapped in sweeps)"
        )
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

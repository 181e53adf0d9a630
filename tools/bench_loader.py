"""Benchmark spkr's shard loader against the limits and the usual alternatives, on synthetic data.

    python tools/bench_loader.py [--samples 1200] [--batch-size 32] [--workers 2] [--dir DIR]

Writes LibriSpeech-like features (log-normal lengths, mean ~1230 frames, 80 mels, float16) three
ways into a temp dir, then measures samples/s and MB/s per worker (one process, one thread, page
cache warm, methods interleaved round by round, best of --repeats) for:

  * raw read       the shard bytes read sequentially; makes no batches (I/O limit)
  * lean parse     tar headers walked, arrays viewed with np.frombuffer in the read buffer, no checks
  * spkr           SpeakerLoader: plan, checked parse, bucketing, normalise, pad, collate
  * wds .pth       WebDataset(urls).decode() of torch.save'd tensors (what its users do)
  * wds .npy       WebDataset over spkr's own shards, np.load of each ``.mel.npy``
  * per-file .pt   the original scripts: one file per utterance, torch.load(weights_only=True)

Every method except raw read yields the SAME batches as spkr: spkr's epoch plan (same keys per
batch, same order, no crops), the manifest's mean/std applied in one fused float32 pass
(``torch.addcmul(shift, x, inv_std)``, as spkr's collate); each baseline's batches are compared with
spkr's (keys, mel, lengths, labels) before it is timed, and a mismatch is an error. Only the
read/decode path differs. Baselines other than per-file read the whole epoch before batching (no
bucketing pool to manage, which favours them). Bucketing is reported on its own: padding and the time
of the same collate on file-order vs spkr's bucketed batches.

Also: the per-sample checksum cost, the steady-state spkr rate with DataLoader workers (float32 and
float16 batches), padding with bucketing vs random batching (plan only, 28k LibriSpeech-like
lengths) and the loader's RSS when the shard count grows 10x.
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
    from spkr.shards.format import Manifest
    from spkr.stream.reader import ShardReader

    m = Manifest.load(str(spkr_dir))
    rd = ShardReader(str(spkr_dir))
    (root / "pth").mkdir()
    (root / "files").mkdir()
    urls, keys = [], []
    for si, info in enumerate(m.split("train").shards):
        url = root / "pth" / f"shard-{si:06d}.tar"
        urls.append(str(url))
        with tarfile.open(url, "w") as tf:
            keys.append([])
            for r in rd.read_shard(info):
                keys[-1].append(r.key)
                t = torch.from_numpy(np.array(r.feats))
                buf = io.BytesIO()
                torch.save(t, buf)
                for ext, payload in (("pth", buf.getvalue()), ("cls", str(r.label).encode())):
                    ti = tarfile.TarInfo(f"{r.key}.{ext}")
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
                torch.save({"mel": t, "label": r.label}, root / "files" / f"{r.key}.pt")
    return spkr_dir, m, urls, keys


class Batches:
    """spkr's epoch plan (epoch 0, in-process) as what every baseline must produce: per batch the
    (shard, index) positions and the keys, plus the normalisation exactly as spkr's collate has it."""

    def __init__(self, spkr_dir, m, keys, batch):
        ld = SpeakerLoader(str(spkr_dir), "train", batch, rank=0, world_size=1, num_workers=0)
        self.positions = [tuple(a.tolist() for a in ld.plan.locate(b)) for b in ld.plan.batches()]
        self.keys = [[keys[s][i] for s, i in zip(*p)] for p in self.positions]
        mean = np.asarray(m.stats["mean"], np.float32)
        inv_std = 1.0 / np.maximum(np.asarray(m.stats["std"], np.float32), 1e-5)
        self.inv_std = torch.from_numpy(inv_std.astype(np.float32))
        self.shift = -torch.from_numpy(mean) * self.inv_std


def collate(feats, labels, keys, plan):
    """spkr's float32 collate: zero the tail, copy (float16 -> float32), normalise in one fused pass."""
    lens = np.array([f.shape[0] for f in feats], dtype=np.int64)
    mel = torch.empty(len(feats), int(lens.max()), N_MELS)
    for i, f in enumerate(feats):
        mel[i, f.shape[0] :] = 0
        row = mel[i, : f.shape[0]]
        row.copy_(f)
        torch.addcmul(plan.shift, row, plan.inv_std, out=row)
    return {
        "mel": mel,
        "lengths": torch.from_numpy(lens),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "keys": list(keys),
    }


def timed(fn):
    t0 = time.perf_counter()
    n, nbytes = fn()
    dt = time.perf_counter() - t0
    return {"samples_s": n / dt, "MB_s": nbytes / dt / 1e6, "seconds": dt}


def consume(gen, nbytes):
    """A timed run: produce every batch of the epoch, count its samples."""

    def run():
        return sum(len(b["keys"]) for b in gen()), nbytes

    return run


def check(name, gen, ref):
    """``gen``'s batches must equal spkr's (``ref``): keys, mel, lengths and labels, in plan order."""
    n = 0
    for a, b in zip(ref(), gen(), strict=True):
        if a["keys"] != b["keys"] or not all(torch.equal(a[k], b[k]) for k in ("mel", "lengths", "labels")):
            raise SystemExit(f"{name}: batch {n} differs from spkr's (keys, mel, lengths or labels)")
        n += 1
    return n


def bench_raw(spkr_dir, m):
    def run():
        total = 0
        for s in m.split("train").shards:
            with open(spkr_dir / s.name, "rb", buffering=0) as f:
                while b := f.read(4 << 20):
                    total += len(b)
        return m.split("train").num_samples, total

    return run


def lean_read(spkr_dir, m):
    """Per shard, in file order: (key, label, float16 tensor viewing the read buffer). Each shard is
    read into an uninitialised buffer (np.empty + readinto), tar headers walked, no checks."""
    out = []
    for s in m.split("train").shards:
        blob = np.empty(s.bytes, np.uint8)
        mv = memoryview(blob)
        with open(spkr_dir / s.name, "rb", buffering=0) as f:
            got = 0
            while got < len(blob) and (k := f.readinto(mv[got:])):
                got += k
        samples, label, pos = [], None, 0
        while pos + 512 <= len(blob) and blob[pos] != 0:
            hdr = mv[pos : pos + 512].tobytes()
            size = int(hdr[124:136].rstrip(b"\0 ") or b"0", 8)
            name = hdr[:100].rstrip(b"\0")
            data = pos + 512
            if name.endswith(b".cls"):
                label = int(mv[data : data + size].tobytes())
            elif name.endswith(b".mel.npy"):
                hlen = int.from_bytes(mv[data + 8 : data + 10], "little")
                npy = mv[data + 10 : data + 10 + hlen].tobytes().decode("latin1")
                rows = int(npy.split("'shape': (")[1].split(",")[0])
                a = np.frombuffer(blob, np.float16, rows * N_MELS, data + 10 + hlen)
                samples.append((name[:-8].decode(), label, torch.from_numpy(a.reshape(rows, N_MELS))))
            pos = data + (size + 511) // 512 * 512
        out.append(samples)
    return out


def gen_lean(spkr_dir, m, plan):
    def gen():
        shards = lean_read(spkr_dir, m)
        for ss, ii in plan.positions:
            items = [shards[s][i] for s, i in zip(ss, ii)]
            yield collate([x for _, _, x in items], [y for _, y, _ in items], [k for k, _, _ in items], plan)

    return gen


def gen_spkr(spkr_dir, batch, workers=0, **kw):
    def gen():
        yield from SpeakerLoader(
            str(spkr_dir), "train", batch, rank=0, world_size=1, num_workers=workers, **kw
        )

    return gen


def bench_spkr(spkr_dir, m, batch, workers, **kw):
    return consume(gen_spkr(spkr_dir, batch, workers, **kw), sum(s.bytes for s in m.split("train").shards))


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


def gen_from(samples, plan):
    """The plan's batches from a key -> (tensor, label) dict of every decoded sample."""
    for keys in plan.keys:
        items = [samples[k] for k in keys]
        yield collate([x for x, _ in items], [y for _, y in items], keys, plan)


def gen_wds_pth(urls, plan):
    import webdataset as wds

    def gen():
        ds = (
            wds.WebDataset(urls, shardshuffle=False, empty_check=False)
            .decode()
            .to_tuple("__key__", "pth", "cls")
        )
        yield from gen_from({k: (x, y) for k, x, y in ds}, plan)

    return gen


def gen_wds_npy(urls, plan):
    import webdataset as wds

    def gen():
        ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).to_tuple("__key__", "mel.npy", "cls")
        yield from gen_from({k: (torch.from_numpy(np.load(io.BytesIO(x))), int(y)) for k, x, y in ds}, plan)

    return gen


def gen_files(root, plan):
    def gen():
        for keys in plan.keys:
            items = [torch.load(root / "files" / f"{k}.pt", weights_only=True) for k in keys]
            yield collate([d["mel"] for d in items], [d["label"] for d in items], keys, plan)

    return gen


def bucketing(spkr_dir, m, plan, batch, repeats):
    """Padding and time of the same collate on file-order batches (consecutive samples, what a plain
    webdataset pipeline batches) vs spkr's bucketed batches, over the benchmark's data."""
    shards = lean_read(spkr_dir, m)
    flat = [x for sh in shards for x in sh]
    by_pos = [[shards[s][i] for s, i in zip(*p)] for p in plan.positions]
    file_order = [flat[k : k + batch] for k in range(0, len(flat), batch)]

    def pad(batches):
        real = sum(x.shape[0] for b in batches for _, _, x in b)
        return 1 - real / sum(max(x.shape[0] for _, _, x in b) * len(b) for b in batches)

    def run(batches):
        def go():
            for b in batches:
                collate([x for _, _, x in b], [y for _, y, _ in b], [k for k, _, _ in b], plan)
            return len(flat), 0

        return go

    best = {"file": math.inf, "bucketed": math.inf}
    for _ in range(repeats * 2):  # alternating: noise hits both alike
        best["file"] = min(best["file"], timed(run(file_order))["seconds"])
        best["bucketed"] = min(best["bucketed"], timed(run(by_pos))["seconds"])
    return pad(file_order), pad(by_pos), best


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
        spkr_dir, m, urls, keys = write_all(root, args.samples, args.per_shard)
        nbytes = sum(s.bytes for s in m.split("train").shards)
        print(
            f"data: {args.samples} samples, {len(urls)} shards, {nbytes / 1e6:.0f} MB, mean "
            f"{np.mean(m.split('train').frames_array()):.0f} frames x {N_MELS} mels float16 "
            f"(written in {time.perf_counter() - t0:.0f}s)"
        )
        B = args.batch_size
        plan = Batches(spkr_dir, m, keys, B)
        spkr_urls = [str(spkr_dir / s.name) for s in m.split("train").shards]
        pth_bytes = sum(os.path.getsize(u) for u in urls)
        file_bytes = sum(f.stat().st_size for f in (root / "files").glob("*.pt"))
        ref = gen_spkr(spkr_dir, B)
        gens = {
            "lean parse + np.frombuffer": (gen_lean(spkr_dir, m, plan), nbytes),
            "spkr SpeakerLoader": (ref, nbytes),
            "wds .pth .decode()": (gen_wds_pth(urls, plan), pth_bytes),
            "wds .npy + np.load": (gen_wds_npy(spkr_urls, plan), nbytes),
            "per-file torch.load": (gen_files(root, plan), file_bytes),
        }
        for name, (gen, _) in gens.items():  # same batches as spkr, or no number at all
            n_batches = check(name, gen, ref)
        print(
            f"batches: {n_batches} per epoch; every baseline's equal to spkr's (keys, mel, lengths, labels)"
        )
        methods = {"raw read (limit, no batches)": bench_raw(spkr_dir, m)}
        methods.update({name: consume(gen, size) for name, (gen, size) in gens.items()})
        # interleaved: one run of every method per round, best of --repeats rounds (machine noise,
        # e.g. another benchmark on the shared CPU, only ever adds time and hits all methods alike)
        for fn in methods.values():
            fn()  # warm (page cache, imports, allocator)
        rows = {name: None for name in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                r = timed(fn)
                if rows[name] is None or r["seconds"] < rows[name]["seconds"]:
                    rows[name] = r
        print(f"\nper worker (1 process, 1 thread; {runtime.describe()}), batch {B}, the same batches:")
        print(f"  {'method':<30}{'samples/s':>12}{'MB/s':>10}")
        for name, r in rows.items():
            print(f"  {name:<30}{r['samples_s']:>12.0f}{r['MB_s']:>10.0f}")
        print(f"  spkr, {args.workers} DataLoader workers (epochs 2-3, after start-up), samples/s in total:")
        for dtype in ("float32", "float16"):
            rate = workers_rate(spkr_dir, B, args.workers, dtype)
            print(
                f"    {dtype + ' batches' + ('' if dtype == 'float32' else ' (as spkr.train)'):<34}{rate:8.0f}"
            )
        spkr = rows["spkr SpeakerLoader"]["samples_s"]
        r_wds = spkr / rows["wds .pth .decode()"]["samples_s"]
        r_npy = spkr / rows["wds .npy + np.load"]["samples_s"]
        r_lean = spkr / rows["lean parse + np.frombuffer"]["samples_s"]
        r_raw = spkr / rows["raw read (limit, no batches)"]["samples_s"]
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
        print("\nratios (all on the same batches as spkr):")
        print(
            f"  spkr / wds .pth pipeline     = {r_wds:.1f}x   (target >= 3x)  {'OK' if r_wds >= 3 else 'MISS'}"
        )
        print(
            f"  spkr / lean tar-parse limit  = {r_lean:.0%}   (target >= 50%) {'OK' if r_lean >= 0.5 else 'MISS'}"
        )
        print(f"  spkr / wds .npy + np.load    = {r_npy:.1f}x")
        print(f"  spkr / per-file torch.load   = {r_files:.1f}x")
        print(f"  spkr / raw read              = {r_raw:.0%}   (I/O limit: reads bytes, makes no batches)")
        p_file, p_buck, ct = bucketing(spkr_dir, m, plan, B, args.repeats)
        print(
            f"\nbucketing, on this data (batch {B}): padding {p_file:.1%} in file order (consecutive "
            f"samples, as a plain webdataset pipeline batches) vs {p_buck:.1%} in spkr's buckets; the same "
            f"collate takes {ct['file'] * 1e3:.0f} ms vs {ct['bucketed'] * 1e3:.0f} ms per epoch "
            f"({ct['file'] / ct['bucketed']:.2f}x, {1 - ct['bucketed'] / ct['file']:.0%} saved by bucketing)"
        )
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

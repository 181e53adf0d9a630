"""Scale, simulated: spkr's data-only mode at LibriSpeech-960's sample count, 2 ranks x 2 workers.

    python tools/bench_scale.py --scales 0.1,0.3,1 --repeats 2 --json /tmp/bench_scale.json
    python tools/bench_scale.py --scales 1 --mp-contexts fork,forkserver   # how the split reaches workers

Per scale ``s`` it writes (once, reused while its ``spec.json`` matches) ``round(281,241 s)`` samples
in ``round(280 s)`` shards over 2,418 classes to ``<work>/x<s>/`` with the real writer
(``spkr.shards.writer.write_shard`` + ``build_manifest``; ``--spkr-src`` measures another spkr tree, e.g.
``git archive HEAD spkr | tar -x -C DIR``): short synthetic features (``--min-frames``..
``--max-frames`` frames x 80 mels, float16), so that 10x still fits on disk; the manifest and its
index files are written as ``spkr.tools.shard`` writes them (``spkr.shards.writer.write_manifest``).
Then, per repeat:

* manifest: bytes on disk (+ index files'); ``Manifest.load`` (read + JSON + validate) times, in a fresh interpreter;
  the RSS its first load adds (what a rank keeps: the heap is not given back), the bytes the loaded
  object holds and the parse's peak (tracemalloc), and a breakdown of the held bytes by what holds
  them (key strings, int objects, list pointer arrays);
* ``torchrun --standalone --nproc_per_node 2 -m spkr.stream.data_only --workers 2 --log-keys``: total
  samples/s (sum of the ranks' samples over the slowest rank's epoch time), and RSS / PSS / USS
  (private = Private_Clean + Private_Dirty of ``/proc/<pid>/smaps_rollup``) / dirty (Private_Dirty:
  the private heap, e.g. copy-on-write copies) of every rank and every DataLoader worker (the rank
  pids' descendants), sampled every ``--interval`` s; peaks are reported;
* exactly-once from the key logs: every key of the split seen exactly once across ranks but the ones
  dropped to equalise ranks (``N mod world``), equal steps per rank, each rank's steps == its plan.

``--mp-contexts`` (one process, no torchrun: rank 0 of ``--nproc`` by plan) runs the loader with the
given multiprocessing start methods and reports each worker's USS / dirty, and the bytes the dataset object pickles to (what
``forkserver``/``spawn`` send to every worker; ``fork`` sends nothing: workers share the rank's pages
copy-on-write until they touch them). The table is printed; ``--json`` writes every figure.

``--worker-phases 0.1,1`` shows where a forked worker's private memory comes from: rank 0's loader
with workers that record their Private_Dirty by mapping (malloc heap / anonymous / file) and what
tracemalloc sees them hold when they start, after their plan, after 1/10/100/1000 batches and at the
end. Memory a worker writes without holding it (Private_Dirty above tracemalloc's figures) is the
rank's pages it copied on write: refcounts of the rank's objects it touches and its allocations
landing in the rank's freed heap.

``--compare DIR,DIR,...`` measures several spkr trees side by side on the same shards, interleaved
(per scale and repeat, each tree in turn, so the machine's load hits them alike), e.g. before and
after a change::

    mkdir /tmp/spkr-before && cp -r spkr /tmp/spkr-before/     # before editing
    python tools/bench_scale.py --scales 0.3,1 --compare /tmp/spkr-before,. --mp-contexts forkserver
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPKR_SRC = [str(REPO)]  # where spkr is imported from, here and in the measured subprocesses (--spkr-src)

LIBRISPEECH_960 = {"samples": 281_241, "classes": 2_418, "shards": 280}
N_MELS = 80
SPLIT = "train"


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class CorpusSpec:
    samples: int
    shards: int
    classes: int
    min_frames: int
    max_frames: int
    seed: int = 0

    @classmethod
    def scaled(cls, scale: float, min_frames: int, max_frames: int) -> CorpusSpec:
        ls = LIBRISPEECH_960
        return cls(
            samples=max(1, round(ls["samples"] * scale)),
            shards=max(1, round(ls["shards"] * scale)),
            classes=ls["classes"],
            min_frames=min_frames,
            max_frames=max_frames,
        )


def _shard_samples(spec: CorpusSpec, si: int, rng: np.random.Generator, pool: np.ndarray):
    """Shard ``si``'s samples (LibriSpeech-like keys ``<speaker>-<shard>-<utt>``, random labels)."""
    from spkr.shards.codec import Sample

    n = len(np.array_split(np.arange(spec.samples), spec.shards)[si])
    labels = rng.integers(spec.classes, size=n)
    frames = rng.integers(spec.min_frames, spec.max_frames + 1, size=n)
    starts = rng.integers(0, len(pool) - spec.max_frames, size=n)
    return [
        Sample(
            f"{int(lab)}-{si:06d}-{i:04d}",
            int(lab),
            {"speaker": str(int(lab)), "frames": int(fr)},
            pool[st : st + fr],
        )
        for i, (lab, fr, st) in enumerate(zip(labels, frames, starts))
    ]


def write_corpus(out: Path, spec: CorpusSpec) -> dict:
    """Write the shards and manifest of ``spec`` into ``out`` (reused when ``out/spec.json`` matches)."""
    from spkr.features import FeatureConfig
    from spkr.shards.schema import shard_name
    from spkr.shards.stats import RunningStats
    from spkr.shards.writer import build_manifest, write_manifest, write_shard

    spec_file = out / "spec.json"
    if spec_file.exists() and (out / "manifest.json").exists():
        if json.loads(spec_file.read_text()) == asdict(spec):
            return {"reused": True, "write_s": None}
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    pool = rng.standard_normal((4096, N_MELS)).astype(np.float16)  # rows the samples are cut from
    stats, infos = RunningStats(N_MELS), []
    t0 = time.perf_counter()
    for si in range(spec.shards):
        samples = _shard_samples(spec, si, rng, pool)
        stats.update(np.concatenate([s.feats for s in samples]))
        infos.append(write_shard(str(out), shard_name(SPLIT, si), samples))
    cfg = FeatureConfig(n_mels=N_MELS)
    data = build_manifest(
        {SPLIT: infos},
        cfg,
        [str(i) for i in range(spec.classes)],
        [1.0] * spec.classes,
        feature_backend="torch",
        corpus={"source": "synthetic", "subsets": [], "name": "bench_scale"},
        stats=stats.summary(),
    )
    write_manifest(str(out), data)
    spec_file.write_text(json.dumps(asdict(spec)))
    return {"reused": False, "write_s": time.perf_counter() - t0}


def shards_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in (out / SPLIT).glob("*.tar"))


# --------------------------------------------------------------------------- memory of processes


def _env() -> dict:
    """Environment of the measured subprocesses: this checkout importable, one OpenMP thread."""
    path = os.pathsep.join(p for p in (SPKR_SRC[0], os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def proc_memory(pid: int) -> dict | None:
    """kB figures of one process: VmRSS, VmHWM (status); Pss, USS (Private_Clean + Private_Dirty:
    pages only this process maps; includes file pages such as mmapped shards only it maps), dirty
    (Private_Dirty: private anonymous heap, e.g. copy-on-write copies of the parent's pages), Pss_Anon
    and Pss_File (smaps_rollup)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    kb = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", status + rollup, re.M)}
    return {
        "vm_rss": kb.get("VmRSS", 0),
        "vm_hwm": kb.get("VmHWM", 0),
        "pss": kb.get("Pss", 0),
        "uss": kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0),
        "dirty": kb.get("Private_Dirty", 0),
        "pss_anon": kb.get("Pss_Anon", 0),
        "pss_file": kb.get("Pss_File", 0),
    }


def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            kids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return kids


def descendants(pid: int, depth: int = 0) -> list[tuple[str, int]]:
    """(kind, pid) of every process below ``pid``: "forkserver" (a multiprocessing fork server
    started by ``pid``; the workers are its children), "helper" (resource tracker) or "worker"."""
    out = []
    for c in children(pid):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"resource_tracker" in cmd:
            kind = "helper"
        elif b"forkserver" in cmd and depth == 0:
            kind = "forkserver"
        else:
            kind = "worker"
        out += [(kind, c)] + descendants(c, depth + 1)
    return out


def local_rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for item in env:
        if item.startswith(b"LOCAL_RANK="):
            return int(item.split(b"=", 1)[1])
    return None


class MemorySampler(threading.Thread):
    """Samples the memory of ``roots()``'s processes and their children every ``interval`` s; keeps
    each process's peak of every figure (``peaks[(role, pid)]``).

    A process's role is the one seen last: a child forked by a rank is a copy of the rank until it
    execs into the fork server or the resource tracker, so a change of role starts its peaks afresh."""

    def __init__(self, roots, interval: float = 0.25):
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self._role: dict[int, str] = {}
        self._peak: dict[int, dict] = {}
        self.samples = 0
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)
        self.sample()

    def sample(self):
        for role, pid in self.roots():
            for r, p in [(role, pid)] + [(f"{role}/{kind}", c) for kind, c in descendants(pid)]:
                mem = proc_memory(p)
                if mem is None:
                    continue
                if self._role.get(p) != r:
                    self._role[p], self._peak[p] = r, {k: 0 for k in mem}
                peak = self._peak[p]
                for k, v in mem.items():
                    peak[k] = max(peak[k], v)
        self.samples += 1

    @property
    def peaks(self) -> dict[tuple[str, int], dict]:
        return {(self._role[p], p): peak for p, peak in self._peak.items()}

    def stop(self) -> dict:
        self._done.set()
        self.join()
        return self.peaks


def summarise_peaks(peaks: dict) -> dict:
    """{role: [peaks of each process of that role (MB)]}; workers ordered by pid (start order)."""
    out: dict[str, list[dict]] = {}
    for (role, pid), mem in sorted(peaks.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.setdefault(role, []).append({"pid": pid, **{k: round(v / 1024, 1) for k, v in mem.items()}})
    return out


# --------------------------------------------------------------------------- manifest probe


def manifest_probe(shards: str, repeats: int = 3) -> dict:
    """In this (fresh) interpreter: manifest bytes, Manifest.load times, the memory it holds."""
    import gc
    import tracemalloc

    from spkr.shards.format import Manifest  # the measured tree's (any spkr version)

    size = os.path.getsize(os.path.join(shards, "manifest.json"))
    index_dir = os.path.join(shards, "index")
    index_bytes = sum(e.stat().st_size for e in os.scandir(index_dir)) if os.path.isdir(index_dir) else 0
    gc.collect()
    rss0 = proc_memory(os.getpid())["vm_rss"]
    times = []
    for _ in range(repeats):  # the first load's RSS growth is what a rank keeps (heap not given back)
        t0 = time.perf_counter()
        m = Manifest.load(shards)
        times.append(time.perf_counter() - t0)
        if not times[1:]:
            gc.collect()
            rss1 = proc_memory(os.getpid())["vm_rss"]
        del m
        gc.collect()
    tracemalloc.start()
    m = Manifest.load(shards)
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "manifest_bytes": size,
        "index_bytes": index_bytes,
        "load_s": times,
        "held_bytes": held,
        "peak_bytes": peak,
        "rss_delta_bytes": (rss1 - rss0) * 1024,
        "breakdown": object_breakdown(m.data),
    }


def object_breakdown(data: dict) -> dict:
    """Bytes of the per-sample fields of a manifest dict, by what holds them: Python lists (pointer
    arrays, and the objects: key strings, int objects) or packed arrays (numpy, key buffers)."""
    out: dict[str, int] = {}
    small = set(range(-5, 257))  # CPython's cached small ints: shared, cost nothing per sample

    def add(name: str, size: int) -> None:
        out[name] = out.get(name, 0) + size

    for sd in data["splits"].values():
        for shard in sd["shards"]:
            for field, values in shard.items():
                if hasattr(values, "array"):  # spkr.shards.packed.PackedInts
                    mapped = " (mapped)" if isinstance(values.array, np.memmap) else ""
                    add(f"{field}: array{mapped}", values.array.nbytes)
                elif hasattr(values, "ends"):  # PackedStrs
                    mapped = " (mapped)" if isinstance(values.text, np.memmap) else ""
                    add(f"{field}: buffer{mapped}", len(values.text))
                    add(f"{field}: ends{mapped}", values.ends.nbytes)
                elif type(values) is list:
                    add(f"{field}: list pointers", sys.getsizeof(values))
                    add(
                        f"{field}: objects",
                        sum(sys.getsizeof(v) for v in values if not (type(v) is int and v in small)),
                    )
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def run_manifest_probe(shards: Path) -> dict:
    cmd = [sys.executable, __file__, "--probe-manifest", str(shards), "--spkr-src", SPKR_SRC[0]]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if done.returncode:
        raise RuntimeError(f"manifest probe failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- data-only under torchrun

_EPOCH_LINE = re.compile(
    r"\[rank (\d+)/(\d+)\] epoch (\d+): (\d+) steps \(plan (\d+)\), (\d+) samples, (\d+) frames in "
    r"([\d.]+)s = [\d.]+ samples/s, [\d.]+ MB/s; dropped (\d+)"
)


def run_data_only(shards: Path, logdir: Path, args) -> dict:
    """One epoch of ``spkr.stream.data_only`` under torchrun, memory sampled from outside."""
    cmd = [
        "torchrun", "--standalone", f"--nproc_per_node={args.nproc}",
        "-m", "spkr.stream.data_only", "--shards", str(shards), "--split", SPLIT,
        "--batch-size", str(args.batch_size), "--epochs", "1", "--workers", str(args.workers),
        "--seed", str(args.seed), "--log-keys", str(logdir), "--step-ms", str(args.step_ms),
    ]  # fmt: skip
    env = {**_env(), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    # cwd: `-m` puts the working directory first on sys.path, before PYTHONPATH
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=SPKR_SRC[0]
    )

    def ranks():
        return [(f"rank{local_rank(p)}", p) for p in children(proc.pid) if local_rank(p) is not None]

    sampler = MemorySampler(ranks, args.interval)
    sampler.start()
    output, _ = proc.communicate(timeout=args.timeout)
    wall = time.perf_counter() - t0
    peaks = sampler.stop()
    if proc.returncode:
        raise RuntimeError(f"torchrun exited {proc.returncode}:\n{output[-4000:]}")
    per_rank = {}
    for m in _EPOCH_LINE.finditer(output):
        r, world, _ep, steps, plan, samples, _frames, secs, dropped = map(float, m.groups())
        per_rank[int(r)] = {
            "steps": int(steps),
            "plan": int(plan),
            "samples": int(samples),
            "epoch_s": secs,
            "dropped": int(dropped),
        }
    if len(per_rank) != args.nproc:
        raise RuntimeError(f"expected {args.nproc} epoch lines from data_only, got:\n{output[-4000:]}")
    slowest = max(r["epoch_s"] for r in per_rank.values())
    total = sum(r["samples"] for r in per_rank.values())
    return {
        "wall_s": wall,
        "epoch_s": slowest,
        "samples_per_s": total / slowest,
        "per_rank": per_rank,
        "memory_mb": summarise_peaks(peaks),
        "memory_samples": sampler.samples,
    }


def check_exactly_once(shards: Path, logdir: Path, nproc: int, per_rank: dict) -> dict:
    """Every key of the split once across ranks, except ``N mod world`` dropped; equal steps."""
    from spkr.shards.format import Manifest

    split_keys = [k for s in Manifest.load(str(shards)).split(SPLIT).shards for k in s.keys]
    seen: list[str] = []
    steps = {}
    for r in range(nproc):
        lines = (logdir / f"rank{r}.jsonl").read_text().splitlines()
        steps[r] = len(lines)
        for line in lines:
            seen += json.loads(line)["keys"]
    distinct = set(seen)
    missing = set(split_keys) - distinct
    dropped = {r["dropped"] for r in per_rank.values()}
    result = {
        "split_samples": len(split_keys),
        "keys_logged": len(seen),
        "distinct": len(distinct),
        "repeated": len(seen) - len(distinct),
        "unknown": len(distinct - set(split_keys)),
        "missing": len(missing),
        "dropped_reported": sorted(dropped),
        "dropped_expected": len(split_keys) % nproc,
        "steps_per_rank": steps,
        "plan_steps": {r: v["plan"] for r, v in per_rank.items()},
    }
    result["ok"] = (
        result["repeated"] == 0
        and result["unknown"] == 0
        and result["missing"] == result["dropped_expected"]
        and dropped == {result["dropped_expected"]}
        and len(set(steps.values())) == 1
        and all(steps[r] == per_rank[r]["plan"] for r in steps)
    )
    return result


# --------------------------------------------------------------------------- how the split reaches workers


def rank0_loader(shards: str, args, context: str):
    """Rank 0 of ``args.nproc`` (plan only, no process group): a SpeakerLoader with ``args.workers``
    workers started by multiprocessing ``context``."""
    import multiprocessing as mp

    from spkr.stream.loader import SpeakerLoader

    return SpeakerLoader(
        shards,
        SPLIT,
        args.batch_size,
        seed=args.seed,
        rank=0,
        world_size=args.nproc,
        num_workers=args.workers,
        multiprocessing_context=mp.get_context(context),
    )


def mp_probe(shards: str, context: str, args) -> dict:
    """Rank 0 of ``args.nproc`` (plan only, no process group) iterated in this process with
    ``args.workers`` workers started by ``context``; worker memory sampled from a thread."""
    from multiprocessing.reduction import ForkingPickler

    loader = rank0_loader(shards, args, context)
    # what forkserver/spawn send to every worker (fork sends nothing); measured, never loaded
    sent = len(ForkingPickler.dumps(loader.dataset))
    sampler = MemorySampler(lambda: [("rank0", os.getpid())], args.interval)
    sampler.start()
    t0 = time.perf_counter()
    steps = samples = 0
    for batch in loader:
        steps += 1
        samples += len(batch["keys"])
        if args.mp_steps and steps >= args.mp_steps:
            break
    dt = time.perf_counter() - t0
    mem = summarise_peaks(sampler.stop())
    return {
        "context": context,
        "dataset_pickle_bytes": sent,
        "steps": steps,
        "samples_per_s": samples / dt,
        "memory_mb": mem,
    }


def run_mp_probe(shards: Path, context: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--probe-mp",
        str(shards),
        "--context",
        context,
        "--spkr-src",
        SPKR_SRC[0],
    ]
    cmd += ["--nproc", str(args.nproc), "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    cmd += ["--seed", str(args.seed), "--interval", str(args.interval), "--mp-steps", str(args.mp_steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=args.timeout)
    if done.returncode:
        raise RuntimeError(f"mp probe ({context}) failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- inside a worker


def private_dirty_by_mapping() -> dict:
    """This process's Private_Dirty kB by kind of mapping (/proc/self/smaps): "heap" (malloc's brk
    heap), "anon" (anonymous mappings: pymalloc arenas, large numpy buffers), "file" (shards, the
    libraries' data) and "total"."""
    out = {"heap": 0, "anon": 0, "file": 0}
    kind = "anon"
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split()
                name = parts[5] if len(parts) > 5 else ""
                kind = "heap" if name == "[heap]" else "anon" if not name or name.startswith("[") else "file"
            elif line.startswith("Private_Dirty:"):
                out[kind] += int(line.split()[1])
    out["total"] = sum(out.values())
    return out


WORKER_MARKS = (1, 10, 100, 1000)  # batches after which a phases probe records a worker's memory


def worker_phases(shards: str, args) -> dict:
    """Rank 0 of ``args.nproc`` iterated here with ``args.workers`` forked workers, each recording its
    Private_Dirty by mapping (:func:`private_dirty_by_mapping`, kB) and what tracemalloc sees it
    hold and peak at (bytes) when it starts iterating, after its plan, and after
    ``WORKER_MARKS`` batches and at the end: where a worker's private memory comes from."""
    import tempfile

    loader = rank0_loader(shards, args, "fork")
    with tempfile.TemporaryDirectory(prefix="spkr-phases-") as out_dir:
        d = loader.dataset
        loader.dataset = _phases_dataset(out_dir)(
            d.base, d.shards, plan_args=d.plan_args, collate=d.collate, reader_kwargs=d.reader_kwargs
        )
        steps = sum(1 for _ in loader)
        workers = {p.stem: json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("worker*.json"))}
    return {"steps": steps, "workers": workers}


def _phases_dataset(out_dir: str) -> type:
    """A ShardDataset whose workers record their memory at each phase (:func:`worker_phases`) into
    ``<out_dir>/worker<id>.json``."""
    import tracemalloc

    from torch.utils.data import get_worker_info

    from spkr.stream import dataset as ds

    class Phases(ds.ShardDataset):
        def __iter__(self):
            marks = []

            def mark(phase):
                held, peak = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (0, 0)
                marks.append({"phase": phase, **private_dirty_by_mapping(), "held": held, "peak": peak})

            mark("start")
            tracemalloc.start()
            worker = get_worker_info().id
            plan = self.plan()
            mark("plan")
            reader = ds.ShardReader(self.base, **self.reader_kwargs)
            read = ds.read_in_place if reader.random_access else ds.read_streamed
            reporter = ds._Reporter(reader.stats)
            n = 0
            for t, records in read(reader, self.shards, plan, worker, 0):
                yield ds.WorkerBatch(
                    self.collate(records, worker + t * plan.num_workers, 0), reporter.report()
                )
                n += 1
                if n in WORKER_MARKS:
                    mark(f"{n} batches")
            mark("end")
            reader.close()
            tracemalloc.stop()
            Path(out_dir, f"worker{worker}.json").write_text(json.dumps(marks))

    return Phases


def run_worker_phases(shards: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--probe-phases", str(shards), "--spkr-src", SPKR_SRC[0]]
    cmd += ["--nproc", str(args.nproc), "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    cmd += ["--seed", str(args.seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=args.timeout)
    if done.returncode:
        raise RuntimeError(f"worker phases probe failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def _peak(mem: dict, workers: bool, key: str) -> float:
    """The largest ``key`` over the workers (or over the ranks) of a memory summary."""
    chosen = [role for role in mem if (role.endswith("/worker") if workers else "/" not in role)]
    vals = [p[key] for role in chosen for p in mem[role]]
    return max(vals) if vals else float("nan")


def _peaks(mem: dict, workers: bool) -> str:
    return "/".join(f"{_peak(mem, workers, k):.0f}" for k in ("vm_rss", "pss", "uss", "dirty"))


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'spkr':>12} {'scale':>5} {'run':>3} {'samples':>9} {'shards':>6} {'manif MB':>8} {'load s':>6} "
        f"{'held MB':>7} {'smp/s':>7} {'rank RSS/PSS/USS/dirty MB':>25} {'worker RSS/PSS/USS/dirty MB':>27} "
        f"{'once':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        m, d = r["manifest"], r["data_only"]
        mem = d["memory_mb"]
        rank, wrk = _peaks(mem, workers=False), _peaks(mem, workers=True)
        print(
            f"{r['src_label'][-12:]:>12} {r['scale']:>5g} {r['repeat']:>3} {r['spec']['samples']:>9,} {r['spec']['shards']:>6} "
            f"{m['manifest_bytes'] / 1e6:>8.1f} {min(m['load_s']):>6.2f} {m['held_bytes'] / 1e6:>7.1f} "
            f"{d['samples_per_s']:>7.0f} {rank:>25} {wrk:>27} {'yes' if r['exactly_once']['ok'] else 'NO':>5}"
        )


def growth(rows: list[dict], target: float = 10.0) -> dict:
    """Least-squares line of each figure vs sample count over all runs, and its value at ``target`` x."""
    n = np.array([r["spec"]["samples"] for r in rows], dtype=np.float64)
    figures = {
        "manifest_MB": [r["manifest"]["manifest_bytes"] / 1e6 for r in rows],
        "load_s": [min(r["manifest"]["load_s"]) for r in rows],
        "manifest_held_MB": [r["manifest"]["held_bytes"] / 1e6 for r in rows],
        "worker_uss_MB": [_peak(r["data_only"]["memory_mb"], True, "uss") for r in rows],
        "worker_dirty_MB": [_peak(r["data_only"]["memory_mb"], True, "dirty") for r in rows],
        "worker_pss_MB": [_peak(r["data_only"]["memory_mb"], True, "pss") for r in rows],
        "worker_rss_MB": [_peak(r["data_only"]["memory_mb"], True, "vm_rss") for r in rows],
        "rank_uss_MB": [_peak(r["data_only"]["memory_mb"], False, "uss") for r in rows],
    }
    at = LIBRISPEECH_960["samples"] * target
    out = {}
    for name, ys in figures.items():
        slope, icept = np.polyfit(n, np.array(ys), 1) if len(set(n)) > 1 else (float("nan"), ys[0])
        out[name] = {
            "per_1k_samples": slope * 1e3,
            "intercept": icept,
            f"at_{target:g}x": icept + slope * at,
        }
    return out


def measure_scale(scale: float, repeat: int, args) -> dict:
    spec = CorpusSpec.scaled(scale, args.min_frames, args.max_frames)
    shards = Path(args.work).resolve() / f"x{scale:g}"
    written = write_corpus(shards, spec)
    logdir = shards.parent / f"keys-x{scale:g}-run{repeat}"
    manifest = run_manifest_probe(shards)
    data = run_data_only(shards, logdir, args)
    once = check_exactly_once(shards, logdir, args.nproc, data["per_rank"])
    return {
        "scale": scale,
        "repeat": repeat,
        "shards": str(shards),
        "spec": asdict(spec),
        "write": {**written, "shards_bytes": shards_bytes(shards)},
        "manifest": manifest,
        "data_only": data,
        "exactly_once": once,
    }


def compared_sources(args) -> dict[str, str]:
    """{label: spkr source directory} measured: ``--compare``'s directories (labelled by their
    names, made unique), else ``--spkr-src`` alone."""
    dirs = [d for d in args.compare.split(",") if d] or [args.spkr_src]
    out: dict[str, str] = {}
    for i, d in enumerate(dirs):
        path = Path(d).resolve()
        label = path.name if path.name not in out else f"{path.name}#{i}"
        out[label] = str(path)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", default="0.1,0.3,1", help="multiples of LibriSpeech-960's sample count")
    p.add_argument("--repeats", type=int, default=2, help="data-only runs per scale (busy machine)")
    p.add_argument("--work", default="/tmp/spkr-bench-scale", help="where the shards are written")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--min-frames", type=int, default=2)
    p.add_argument("--max-frames", type=int, default=8)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interval", type=float, default=0.25, help="memory sampling period (s)")
    p.add_argument("--step-ms", type=float, default=0.0, help="data-only: a model step's ms after each batch")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--mp-contexts", default="", help="e.g. fork,forkserver: how the split reaches workers")
    p.add_argument("--mp-scale", type=float, default=1.0, help="the scale the --mp-contexts runs use")
    p.add_argument("--mp-steps", type=int, default=0, help="batches per --mp-contexts run (0: the epoch)")
    p.add_argument(
        "--worker-phases",
        default="",
        help="e.g. 0.1,1: per scale, a forked worker's Private_Dirty (heap/anon/file) and tracemalloc "
        "figures when it starts, after its plan, after 1/10/100/1000 batches and at the end",
    )
    p.add_argument(
        "--spkr-src",
        default=str(REPO),
        help="directory holding the spkr package to measure (e.g. a `git archive HEAD spkr` export)",
    )
    p.add_argument(
        "--compare",
        default="",
        help="comma-separated spkr source directories measured side by side, interleaved per scale and "
        "repeat (e.g. a copy of spkr before a change, and this checkout); rows labelled by directory name",
    )
    p.add_argument("--probe-manifest", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-mp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-phases", default=None, help=argparse.SUPPRESS)
    p.add_argument("--context", default="fork", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    SPKR_SRC[0] = str(Path(args.spkr_src).resolve())
    sys.path.insert(0, SPKR_SRC[0])
    if args.probe_manifest:  # internal: run in a fresh interpreter by run_manifest_probe
        print(json.dumps(manifest_probe(args.probe_manifest)))
        return 0
    if args.probe_mp:  # internal: run in a fresh interpreter by run_mp_probe
        print(json.dumps(mp_probe(args.probe_mp, args.context, args)))
        return 0
    if args.probe_phases:  # internal: run in a fresh interpreter by run_worker_phases
        print(json.dumps(worker_phases(args.probe_phases, args)))
        return 0
    result = measure(args, compared_sources(args))
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if all(r["exactly_once"]["ok"] for r in result["rows"]) else 1


def corpus_at(scale: float, args) -> Path:
    """The shards of ``scale`` under ``--work`` (written unless already there)."""
    shards = Path(args.work).resolve() / f"x{scale:g}"
    write_corpus(shards, CorpusSpec.scaled(scale, args.min_frames, args.max_frames))
    return shards


def measure(args, sources: dict[str, str]) -> dict:
    """Every run the arguments ask for, each spkr tree of ``sources`` in turn: ``{"rows": data-only
    runs, "growth": {label: growth(...)}, "mp": --mp-contexts runs, "phases": --worker-phases runs}``."""
    rows = []
    for scale in [float(s) for s in args.scales.split(",") if s]:
        for repeat in range(args.repeats):
            for label, source in sources.items():  # interleaved: the machine's load hits both alike
                SPKR_SRC[0] = source
                rows.append({"src_label": label, "src": source, **measure_scale(scale, repeat, args)})
                print(
                    json.dumps({k: rows[-1][k] for k in ("src_label", "scale", "repeat", "write")}),
                    flush=True,
                )
    result = {"rows": rows, "growth": {}, "mp": [], "phases": []}
    for label in sources:
        mine = [r for r in rows if r["src_label"] == label]
        result["growth"][label] = growth(mine) if mine else {}
    for ctx in [c for c in args.mp_contexts.split(",") if c]:
        shards = corpus_at(args.mp_scale, args)
        for label, source in sources.items():
            SPKR_SRC[0] = source
            probe = run_mp_probe(shards, ctx, args)
            result["mp"].append({"src_label": label, "scale": args.mp_scale, **probe})
    for scale in [float(x) for x in args.worker_phases.split(",") if x]:
        shards = corpus_at(scale, args)
        for label, source in sources.items():
            SPKR_SRC[0] = source
            phases = run_worker_phases(shards, args)
            result["phases"].append({"src_label": label, "scale": scale, **phases})
    return result


def print_report(result: dict) -> None:
    """The table of :func:`measure`'s runs, the growth lines, and one line per mp / phases run."""
    if result["rows"]:
        print_table(result["rows"])
        print("\ngrowth (least squares over all runs; value at 10x LibriSpeech-960):")
        for label, figures in result["growth"].items():
            for name, g in figures.items():
                print(
                    f"  {label[-12:]:>12} {name:>18}: {g['per_1k_samples']:+.4f} per 1k samples, at 10x {g['at_10x']:.2f}"
                )
    for m in result["mp"]:
        workers = m["memory_mb"].get("rank0/worker", [])
        uss = ", ".join(f"{w['uss']:.0f}/{w['dirty']:.0f}" for w in workers)
        print(
            f"{m['src_label'][-12:]:>12} mp {m['context']:>10} (x{m['scale']:g}, {m['steps']} steps, "
            f"{m['samples_per_s']:.0f} samples/s): "
            f"dataset pickles to {m['dataset_pickle_bytes'] / 1e6:.1f} MB; worker USS/dirty MB {uss}"
        )
    for ph in result["phases"]:
        for worker, marks in ph["workers"].items():
            print(
                f"{ph['src_label'][-12:]:>12} x{ph['scale']:g} {worker} Private_Dirty MB total/heap/anon (tracemalloc held/peak MB):"
            )
            print(
                "    "
                + "; ".join(
                    f"{m['phase']} {m['total'] / 1024:.1f}/{m['heap'] / 1024:.1f}/{m['anon'] / 1024:.1f} "
                    f"({m['held'] / 1e6:.2f}/{m['peak'] / 1e6:.2f})"
                    for m in marks
                )
            )


if __name__ == "__main__":
    sys.exit(main())

"""tools/bench_scale.py at a small scale: real shards, real torchrun (2 ranks x 2 workers), key logs
checked for exactly-once, memory of every rank and worker sampled from /proc."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "tools" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


bench = _bench_scale()
SMALL = bench.CorpusSpec(samples=1001, shards=5, classes=40, min_frames=2, max_frames=8)


def _args(**kw) -> argparse.Namespace:
    args = bench.build_parser().parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scale") / "x"
    written = bench.write_corpus(out, SMALL)
    assert written["reused"] is False
    assert bench.write_corpus(out, SMALL)["reused"] is True  # same spec: kept
    return out


def test_corpus_and_manifest_breakdown(small_shards):
    """The corpus is a shard set as spkr writes it: the per-sample fields are mapped from the index
    files, so the loaded manifest holds no Python object (and no heap bytes) per sample."""
    from spkr.shards.format import Manifest

    probe = bench.manifest_probe(str(small_shards), repeats=1)
    shards = Manifest.load(str(small_shards)).split("train").shards
    assert [s.num_samples for s in shards] == [201, 200, 200, 200, 200]
    assert probe["manifest_bytes"] == (small_shards / "manifest.json").stat().st_size
    index = small_shards / "index"
    assert probe["index_bytes"] == sum(p.stat().st_size for p in index.iterdir()) > 1001 * 16
    br = probe["breakdown"]
    assert all(name.endswith("(mapped)") for name in br), br
    # the smallest unsigned dtype: frames 2..8 (1 byte); checksums 8 bytes
    assert (br["frames: array (mapped)"], br["checksums: array (mapped)"]) == (1001, 1001 * 8)
    assert probe["held_bytes"] < 1001 * 100, probe["held_bytes"]


def test_exactly_once_check_fails_on_a_repeated_or_lost_key(small_shards, tmp_path):
    from spkr.shards.format import Manifest

    keys = [k for s in Manifest.load(str(small_shards)).split("train").shards for k in s.keys]
    per_rank = {r: {"plan": 1, "dropped": 1} for r in (0, 1)}

    def logs(rank0: list[str], rank1: list[str]) -> dict:
        for r, ks in enumerate((rank0, rank1)):
            (tmp_path / f"rank{r}.jsonl").write_text(json.dumps({"epoch": 0, "step": 0, "keys": ks}) + "\n")
        return bench.check_exactly_once(small_shards, tmp_path, 2, per_rank)

    assert logs(keys[:500], keys[500:1000])["ok"]  # one key dropped: 1001 mod 2
    repeated = logs(keys[:500], keys[499:999])
    assert not repeated["ok"] and repeated["repeated"] == 1
    lost = logs(keys[:500], keys[501:1000])
    assert not lost["ok"] and lost["missing"] == 2


def test_memory_sampler_keeps_the_role_seen_last():
    """A rank's child is a copy of the rank until it execs into the fork server: the role seen last
    names the process, and its peaks start again when the role changes."""
    import subprocess

    child = subprocess.Popen(["sleep", "60"])  # a process with no children of its own
    try:
        seen = iter(["rank0/worker", "rank0/forkserver", "rank0/forkserver"])
        sampler = bench.MemorySampler(lambda: [(next(seen), child.pid)])
        sampler.sample()
        assert list(sampler.peaks) == [("rank0/worker", child.pid)]
        sampler.sample()
        sampler.sample()
        assert list(sampler.peaks) == [("rank0/forkserver", child.pid)]
        assert sampler.samples == 3 and sampler.peaks[("rank0/forkserver", child.pid)]["vm_rss"] > 0
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_data_only_under_torchrun_exactly_once(small_shards, tmp_path):
    # 63 steps of batch 8 at a model's pace of 20 ms keep the workers alive for over a second, so the
    # sampler sees each of them on a busy machine too
    args = _args(nproc=2, workers=2, batch_size=8, interval=0.05, step_ms=20.0, timeout=300.0)
    run = bench.run_data_only(small_shards, tmp_path / "keys", args)
    once = bench.check_exactly_once(small_shards, tmp_path / "keys", 2, run["per_rank"])
    assert once["ok"], once
    assert once["distinct"] == 1000 and once["dropped_expected"] == 1 and once["missing"] == 1
    assert once["steps_per_rank"] == {0: 63, 1: 63}  # ceil(500 / 8) on both ranks
    mem = run["memory_mb"]
    # inside the process group the workers are children of each rank's fork server (spkr.stream.loader),
    # which comes with a resource tracker ("helper")
    ranks = [f"rank{r}{role}" for r in (0, 1) for role in ("", "/worker")]
    assert set(ranks) <= set(mem) and {m.split("/")[-1] for m in set(mem) - set(ranks)} <= {
        "forkserver",
        "helper",
    }
    assert all(len(mem[f"rank{r}/worker"]) == 2 for r in (0, 1))  # 2 DataLoader workers per rank
    assert all(p["uss"] > 0 and p["pss"] <= p["vm_rss"] for procs in mem.values() for p in procs)


def test_worker_phases_probe(small_shards):
    """--worker-phases: every forked worker reports its Private_Dirty by mapping at each phase, and
    walking the plan window by window holds no array over the worker's range."""
    args = _args(nproc=2, workers=2, batch_size=32, seed=0)
    got = bench.worker_phases(str(small_shards), args)
    assert got["steps"] == 16  # rank 0 of 2: ceil(500 / 32)
    assert sorted(got["workers"]) == ["worker0", "worker1"]
    for marks in got["workers"].values():
        assert [m["phase"] for m in marks] == ["start", "plan", "1 batches", "end"]  # 8 batches each
        for m in marks:
            assert m["total"] == m["heap"] + m["anon"] + m["file"] > 0
        assert marks[1]["held"] < 100_000  # the plan: shard counts and cumulative sums, not samples

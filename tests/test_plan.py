"""The epoch plan: exactly once, equal batch counts, determinism, resume arithmetic, scale."""

from __future__ import annotations

import time

import numpy as np
import pytest

from spkr.stream.plan import EpochPlan


def random_split(rng, n_shards, lo=1, hi=30):
    counts = rng.integers(lo, hi + 1, n_shards)
    frames = [rng.integers(5, 500, c) for c in counts]
    return counts, frames


def all_rank_batches(counts, frames, world, **kw):
    plans = [EpochPlan(counts, frames, world_size=world, rank=r, **kw) for r in range(world)]
    return plans, [p.batches() for p in plans]


def check_train(counts, frames, world, workers, B, bw=None, seed=0, epoch=0):
    N = int(np.sum(counts))
    plans, batches = all_rank_batches(
        counts,
        frames,
        world,
        num_workers=workers,
        batch_size=B,
        train=True,
        seed=seed,
        epoch=epoch,
        bucket_window=bw,
    )
    nb = {len(b) for b in batches}
    assert len(nb) == 1, f"unequal batch counts {nb}"  # same on every rank
    assert {p.num_batches for p in plans} == nb
    flat = np.concatenate([x for bs in batches for x in bs]) if N >= world else np.zeros(0, np.int64)
    assert len(flat) == len(set(flat.tolist()))  # no duplicate
    dropped = plans[0].dropped
    assert dropped == N % world < world
    assert len(flat) == N - dropped
    # the stream positions map to distinct (shard, sample) pairs covering all but `dropped`
    s, i = plans[0].locate(flat)
    assert len(set(zip(s.tolist(), i.tolist()))) == len(flat)
    assert all(0 <= i_ < counts[s_] for s_, i_ in zip(s, i))
    # every batch full except at most one per rank
    for bs in batches:
        assert sum(len(b) != B for b in bs) <= 1
        assert all(0 < len(b) <= B for b in bs)
    return plans, batches


def test_exactly_once_equal_batches_property():
    rng = np.random.default_rng(0)
    cases = 0
    for n_shards in (1, 2, 3, 5, 7, 13):
        counts, frames = random_split(rng, n_shards)
        for world in range(1, 8):
            for workers in range(4):
                for B in (1, 3, 4, 7):
                    check_train(counts, frames, world, workers, B, bw=int(rng.integers(1, 40)))
                    cases += 1
    assert cases == 6 * 7 * 4 * 4


@pytest.mark.parametrize("counts", [[2, 3, 5, 7, 11, 13], [1], [97], [0, 5, 0, 3]])
def test_prime_and_degenerate_counts(counts):
    frames = [list(range(1, c + 1)) for c in counts]
    for world in (1, 2, 3, 5, 7):
        for workers in (0, 1, 2, 3):
            check_train(counts, frames, world, workers, B=4)


def test_fewer_samples_than_ranks():
    plans, batches = all_rank_batches([1, 2], [[5], [6, 7]], 5, batch_size=4, num_workers=2)
    assert all(len(b) == 0 for b in batches) and plans[0].dropped == 3


def test_eval_exactly_once_without_drop():
    rng = np.random.default_rng(1)
    for n_shards in (1, 4, 7):
        counts, frames = random_split(rng, n_shards)
        N = int(counts.sum())
        for world in range(1, 8):
            for workers in (0, 2, 3):
                plans, batches = all_rank_batches(
                    counts, frames, world, num_workers=workers, batch_size=5, train=False
                )
                sizes = [p.num_samples for p in plans]
                assert max(sizes) - min(sizes) <= 1 and plans[0].dropped == 0
                flat = np.concatenate([x for bs in batches for x in bs])
                assert sorted(flat.tolist()) == list(range(N))
                # deterministic: no shuffle, shards in manifest order, ranks contiguous
                assert plans[0].order.tolist() == list(range(n_shards))


def test_determinism_and_epochs():
    rng = np.random.default_rng(2)
    counts, frames = random_split(rng, 9)
    kw = dict(world_size=3, rank=1, num_workers=2, batch_size=4, train=True)

    def keys(**extra):
        p = EpochPlan(counts, frames, **{**kw, **extra})
        s, i = p.locate(np.concatenate(p.batches()))
        return list(zip(s.tolist(), i.tolist()))

    assert keys(seed=5, epoch=0) == keys(seed=5, epoch=0)
    assert keys(seed=5, epoch=0) != keys(seed=5, epoch=1)
    assert keys(seed=5, epoch=0) != keys(seed=6, epoch=0)
    # the dropped samples differ between epochs (shard order shuffled)
    total = int(counts.sum())
    dropped = []
    for e in range(6):
        p = [EpochPlan(counts, frames, **{**kw, "rank": r, "epoch": e}) for r in range(3)]
        got = set()
        for pp in p:
            s, i = pp.locate(np.concatenate(pp.batches()) if pp.num_batches else np.zeros(0, np.int64))
            got |= set(zip(s.tolist(), i.tolist()))
        every = {(s, i) for s in range(len(counts)) for i in range(counts[s])}
        dropped.append(frozenset(every - got))
    assert all(len(d) == total % 3 for d in dropped)
    if total % 3:
        assert len(set(dropped)) > 1


def test_bucketing_sorts_within_windows():
    rng = np.random.default_rng(3)
    counts = [200, 200]
    frames = [rng.integers(10, 2000, 200), rng.integers(10, 2000, 200)]
    p = EpochPlan(counts, frames, batch_size=8, bucket_window=64, num_workers=0)
    pad_bucket = pad_random = 0
    for b in p.batches():
        f = p.frames_at(b)
        pad_bucket += (f.max() - f).sum()
    order = rng.permutation(400)
    allf = p.frames_at(np.arange(400))
    for k in range(0, 400, 8):
        f = allf[order[k : k + 8]]
        pad_random += (f.max() - f).sum()
    assert pad_bucket < 0.2 * pad_random


def test_resume_arithmetic_matches_round_robin():
    """Worker v skips batches_before(v, k); DataLoader worker w plays logical (w + k) % W: the
    round-robin of the remaining batches is exactly j = k, k+1, ..."""
    for nb in range(0, 23):
        for W in range(1, 5):
            counts = [W * 0 + nb * 2]
            p = EpochPlan(counts, [np.ones(counts[0], int)], batch_size=2, num_workers=W, train=False)
            assert p.num_batches == nb
            for k in range(0, nb + 1):
                remaining = []
                for w in range(W):
                    v = (w + k) % W
                    skip = EpochPlan.batches_before(v, k, W)
                    remaining.append([v + t * W for t in range(skip, int(p.worker_batches[v]))])
                # simulate round-robin over DataLoader workers, dropping exhausted ones
                out, idx = [], [0] * W
                while any(idx[w] < len(remaining[w]) for w in range(W)):
                    for w in range(W):
                        if idx[w] < len(remaining[w]):
                            out.append(remaining[w][idx[w]])
                            idx[w] += 1
                assert out == list(range(k, nb)), (nb, W, k)


def _scale_manifest(seed=0, n=281_241, n_shards=280):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n), n_shards - 1, replace=False))
    counts = np.diff(np.concatenate([[0], cuts, [n]]))
    frames = np.maximum(100, rng.lognormal(np.log(1230) - 0.125, 0.5, n).astype(np.int64))
    starts = np.concatenate([[0], np.cumsum(counts)])
    return counts, [frames[starts[i] : starts[i + 1]] for i in range(n_shards)]


@pytest.mark.parametrize("world,workers", [(1, 8), (7, 3), (64, 8), (1024, 8)])
def test_scale_simulation(world, workers):
    """LibriSpeech-960 sized (281k samples in 280 shards): every rank's plan, all workers."""
    counts, frames = _scale_manifest()
    N = int(counts.sum())
    B = 32
    seen = np.zeros(N, dtype=np.int8)
    nbs = set()
    t0 = time.perf_counter()
    p0 = EpochPlan(
        counts, frames, world_size=world, rank=world // 2, num_workers=workers, batch_size=B, epoch=3
    )
    [p0.worker(w) for w in range(workers)]
    one_rank = time.perf_counter() - t0
    for r in range(world):
        p = EpochPlan(counts, frames, world_size=world, rank=r, num_workers=workers, batch_size=B, epoch=3)
        nbs.add(p.num_batches)
        count = 0
        for w in range(workers):
            wp = p.worker(w)
            for b in wp.batches():
                seen[b] += 1
                count += 1
        assert count == p.num_batches
    assert len(nbs) == 1
    assert seen.max() == 1  # no duplicate
    assert N - int(seen.sum()) == N % world < world
    print(
        f"\nscale: N={N} world={world} workers={workers}: one rank's plan (all workers) {one_rank * 1e3:.2f} ms"
    )


def test_worker_walk_memory_is_the_pool_not_the_range():
    """A DataLoader worker walks its plan window by window (EpochPlan.windows): the same windows as
    EpochPlan.worker, and what the walk holds at its peak is the bucketing pool's, not the worker's
    range's: a LibriSpeech-960 sized worker range (~140k samples) peaks like a 1 %-sized one."""
    import tracemalloc

    def peak(n: int, n_shards: int) -> int:
        counts, frames = _scale_manifest(n=n, n_shards=n_shards)
        p = EpochPlan(counts, frames, world_size=2, rank=1, num_workers=1, batch_size=32, epoch=1)
        tracemalloc.start()
        batches = 0
        for window in p.windows(0):
            batches += len(window.batches)
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert batches == p.num_batches
        return top

    small, large = peak(2_812, 3), peak(281_241, 280)
    assert large < 2 * small + 200_000, (small, large)  # the whole range's plan: > 2 MB
    counts, frames = _scale_manifest(n=5_000, n_shards=7)
    p = EpochPlan(counts, frames, world_size=3, rank=2, num_workers=2, batch_size=16, epoch=2)
    for w in range(2):
        walked, built = list(p.windows(w)), p.worker(w).windows
        assert [(a.start, a.stop) for a in walked] == [(b.start, b.stop) for b in built]
        assert all(
            np.array_equal(x, y)
            for a, b in zip(walked, built)
            for x, y in zip(a.batches, b.batches, strict=True)
        )

"""SpeakerLoader: batches, normalisation, bucketing, crops, exact resume, ranks, skip mode, no audio."""

from __future__ import annotations

import socket
import tarfile

import numpy as np
import pytest
import torch

from spkr.shards.format import Manifest
from spkr.stream import SpeakerLoader
from spkr.stream.reader import ShardReader

from .shardkit import all_keys, make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("loader") / "shards", [7, 11, 13, 5, 17], seed=1)


def raw_feats(shards):
    m = Manifest.load(str(shards))
    rd = ShardReader(str(shards))
    return {r.key: r for s in m.split("train").shards for r in rd.read_shard(s)}


def epoch_batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def test_batches_shapes_padding_normalisation(shards):
    raw = raw_feats(shards)
    stats = Manifest.load(str(shards)).stats
    mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
    loader = SpeakerLoader(str(shards), "train", 4, train=True, rank=0, world_size=1)
    assert loader.manifest.split("train").num_samples == 53
    batches = epoch_batches(loader)
    assert len(batches) == len(loader) == 14 and loader.dropped == 0
    for b in batches:
        B = len(b["keys"])
        assert b["mel"].dtype == torch.float32 and b["lengths"].dtype == torch.int64
        assert b["labels"].dtype == torch.int64 and b["mel"].shape[0] == B == len(b["lengths"])
        assert b["mel"].shape[1] == int(b["lengths"].max()) and b["mel"].shape[2] == 80
        for i, key in enumerate(b["keys"]):
            L = int(b["lengths"][i])
            r = raw[key]
            assert L == r.feats.shape[0] and int(b["labels"][i]) == r.label
            expect = (r.feats.astype(np.float32) - mean) / std
            np.testing.assert_allclose(b["mel"][i, :L].numpy(), expect, rtol=1e-5, atol=1e-4)
            assert not b["mel"][i, L:].any()  # zero padding
    allmel = torch.cat([b["mel"][i, : b["lengths"][i]] for b in batches for i in range(len(b["keys"]))])
    assert abs(float(allmel.mean())) < 0.05 and abs(float(allmel.std()) - 1) < 0.05
    # normalize=False gives the stored values
    b0 = next(iter(SpeakerLoader(str(shards), "train", 4, normalize=False, rank=0, world_size=1)))
    r = raw[b0["keys"][0]]
    np.testing.assert_array_equal(b0["mel"][0, : r.feats.shape[0]].numpy(), r.feats.astype(np.float32))


def test_float16_batches_are_the_float32_batches_rounded(shards):
    # what spkr.train asks for: the same batches, normalised in float32 arithmetic, rounded to float16
    kw = dict(train=True, seed=3, rank=0, world_size=1)
    b32 = list(SpeakerLoader(str(shards), "train", 4, **kw))
    b16 = list(SpeakerLoader(str(shards), "train", 4, dtype="float16", **kw))
    assert [b["keys"] for b in b16] == [b["keys"] for b in b32]
    for x, y in zip(b16, b32):
        assert x["mel"].dtype == torch.float16 and torch.equal(x["lengths"], y["lengths"])
        err = (x["mel"].float() - y["mel"]).abs()
        assert bool((err <= y["mel"].abs() * 2**-11 + 1e-7).all()), float(err.max())  # one rounding
    raw16 = next(iter(SpeakerLoader(str(shards), "train", 4, normalize=False, dtype="float16", **kw)))
    raw = raw_feats(shards)[raw16["keys"][0]].feats
    assert torch.equal(raw16["mel"][0, : raw.shape[0]], torch.from_numpy(np.array(raw)))  # stored values
    with pytest.raises(ValueError, match="dtype must be one of"):
        SpeakerLoader(str(shards), "train", 4, dtype="int8", **kw)


def padding_fraction(batches):
    real = sum(int(b["lengths"].sum()) for b in batches)
    total = sum(b["mel"].shape[0] * b["mel"].shape[1] for b in batches)
    return 1 - real / total


def test_bucketing_reduces_padding(tmp_path):
    d = make_shards(tmp_path / "s", [300, 301, 307], mean_frames=80, sigma=0.5, n_mels=4, seed=2)
    random_b = epoch_batches(SpeakerLoader(str(d), "train", 8, bucket_window=8, rank=0, world_size=1))
    bucket_b = epoch_batches(SpeakerLoader(str(d), "train", 8, bucket_window=128, rank=0, world_size=1))
    pr, pb = padding_fraction(random_b), padding_fraction(bucket_b)
    assert pb < 0.25 * pr and pb < 0.1, (pb, pr)
    assert sorted(k for b in bucket_b for k in b["keys"]) == sorted(all_keys(d))


def test_crops(shards):
    raw = raw_feats(shards)
    mk = lambda: SpeakerLoader(str(shards), "train", 4, crop_frames=30, normalize=False, rank=0, world_size=1)  # noqa: E731
    a, b = epoch_batches(mk()), epoch_batches(mk())
    starts = {}
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and torch.equal(x["mel"], y["mel"])  # seeded: reproducible
        for i, key in enumerate(x["keys"]):
            full = raw[key].feats.astype(np.float32)
            L = int(x["lengths"][i])
            assert L == min(30, full.shape[0])
            crop = x["mel"][i, :L].numpy()
            # the crop is a contiguous window of the utterance
            hits = [s for s in range(full.shape[0] - L + 1) if np.array_equal(full[s : s + L], crop)]
            assert hits
            starts[key] = hits[0]
    assert len(set(starts.values())) > 3  # random positions
    c = epoch_batches(mk(), epoch=1)
    assert sorted(k for x in c for k in x["keys"]) == sorted(starts)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(shards, workers):
    kw = dict(train=True, seed=7, rank=1, world_size=2, num_workers=workers, crop_frames=25, bucket_window=8)
    full = SpeakerLoader(str(shards), "train", 3, **kw)
    ref = epoch_batches(full, epoch=1)
    nb = len(ref)
    assert nb == len(full) == 9
    for k in (1, 4, 5, nb - 1):
        first = SpeakerLoader(str(shards), "train", 3, **kw)
        first.set_epoch(1)
        it = iter(first)
        got = [next(it) for _ in range(k)]
        state = first.state_dict()
        del it
        assert state["epoch"] == 1 and state["batches"] == k
        assert [g["keys"] for g in got] == [r["keys"] for r in ref[:k]]
        fresh = SpeakerLoader(str(shards), "train", 3, **kw)
        fresh.load_state_dict(state)
        fresh.set_epoch(1)  # the trainer's usual call keeps the resume point of that epoch
        rest = list(fresh)
        assert [r["keys"] for r in rest] == [r["keys"] for r in ref[k:]], k
        for x, y in zip(rest, ref[k:]):
            assert torch.equal(x["mel"], y["mel"]) and torch.equal(x["lengths"], y["lengths"])
        assert fresh.state_dict()["batches"] == nb
        # the next epoch then starts from the beginning
        fresh.set_epoch(2)
        assert len(list(fresh)) == nb


@pytest.mark.parametrize("mmap", [True, False])  # local random access, or streaming like remote shards
def test_resume_skips_by_plan_not_by_reading(shards, monkeypatch, mmap):
    """Consumed windows are not read: resuming at the last batch reads only that batch's samples."""
    kw = dict(train=True, seed=3, rank=0, world_size=1, num_workers=0, bucket_window=4, mmap=mmap)
    ref = epoch_batches(SpeakerLoader(str(shards), "train", 4, **kw))
    opened = []
    real_range, real_sample = ShardReader.iter_range, ShardReader.read_sample

    def spy_range(self, shard, a=0, b=None):
        opened.append((shard.name, a, b))
        return real_range(self, shard, a, b)

    def spy_sample(self, shard, i):
        opened.append((shard.name, i, i + 1))
        return real_sample(self, shard, i)

    monkeypatch.setattr(ShardReader, "iter_range", spy_range)
    monkeypatch.setattr(ShardReader, "read_sample", spy_sample)
    fresh = SpeakerLoader(str(shards), "train", 4, **kw)
    fresh.load_state_dict({**fresh.state_dict(), "batches": len(ref) - 1})
    rest = list(fresh)
    assert [r["keys"] for r in rest] == [ref[-1]["keys"]]
    assert sum(b - a for _, a, b in opened) == len(ref[-1]["keys"])


def test_random_access_and_streaming_give_the_same_batches(shards):
    # local shards are read in place (mmap) when each batch is made; remote ones stream through the
    # bucketing pool: same plan, so the same batches, byte for byte, and the same skip reports
    for kw in (dict(train=True, seed=5, num_workers=0), dict(train=False, num_workers=2)):
        a = list(SpeakerLoader(str(shards), "train", 4, rank=0, world_size=1, mmap=True, **kw))
        b = list(SpeakerLoader(str(shards), "train", 4, rank=0, world_size=1, mmap=False, **kw))
        assert [x["keys"] for x in a] == [y["keys"] for y in b]
        assert all(torch.equal(x["mel"], y["mel"]) for x, y in zip(a, b))


def test_resume_across_layouts(shards):
    a = SpeakerLoader(str(shards), "train", 4, rank=0, world_size=2, num_workers=0)
    it = iter(a)
    next(it)
    mid = a.state_dict()
    for kw in (dict(world_size=3), dict(num_workers=2), dict(batch_size=5)):
        args = {"rank": 0, "world_size": 2, "num_workers": 0, "batch_size": 4, **kw}
        b = SpeakerLoader(str(shards), "train", args.pop("batch_size"), **args)
        with pytest.raises(ValueError, match="cannot resume mid-epoch"):
            b.load_state_dict(mid)
        # an epoch-boundary state loads under any layout
        b.load_state_dict({**mid, "batches": 0})
        assert len(list(b)) == len(b)
        b.load_state_dict({**mid, "batches": mid["num_batches"]})
        assert list(b) == []
    with pytest.raises(ValueError, match="seed"):
        SpeakerLoader(str(shards), "train", 4, seed=1, rank=0, world_size=2).load_state_dict(mid)


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_exactly_once_in_process(shards, workers):
    keys = all_keys(shards)
    for world in (1, 3, 4):
        for train in (True, False):
            seen, counts = [], set()
            for r in range(world):
                ld = SpeakerLoader(
                    str(shards), "train", 4, train=train, rank=r, world_size=world, num_workers=workers
                )
                ld.set_epoch(1)
                bs = list(ld)
                assert len(bs) == len(ld)
                counts.add(len(bs))
                seen += [k for b in bs for k in b["keys"]]
            assert len(seen) == len(set(seen))
            if train:
                assert len(counts) == 1 and len(keys) - len(seen) == len(keys) % world
            else:
                assert sorted(seen) == sorted(keys) and max(counts) - min(counts) <= 1


@pytest.mark.parametrize("mmap", [True, False])
def test_skip_mode_counts_and_keeps_batch_count(tmp_path, mmap):
    d = make_shards(tmp_path / "s", [6, 7], seed=4)
    m = Manifest.load(str(d))
    info = m.split("train").shards[1]
    path = d / info.name
    with tarfile.open(path) as tf:
        data_off = tf.getmember(f"{info.keys[3]}.mel.npy").offset_data
    blob = bytearray(path.read_bytes())
    blob[data_off] = ord("X")  # break the npy magic, same size
    path.write_bytes(bytes(blob))
    # the per-sample checksum would catch it first; without it, the member decoder does
    with pytest.raises(Exception, match=rf"{info.name} \[{info.keys[3]}.mel.npy\].*bad .npy header"):
        list(SpeakerLoader(str(d), "train", 4, rank=0, world_size=1, mmap=mmap, checksums=False))
    for workers in (0, 2):
        kw = dict(rank=0, world_size=1, num_workers=workers, on_error="skip", mmap=mmap, checksums=False)
        ld = SpeakerLoader(str(d), "train", 4, **kw)
        bs = list(ld)
        assert len(bs) == len(ld) == 4
        got = [k for b in bs for k in b["keys"]]
        assert sorted(got) == sorted(set(all_keys(d)) - {info.keys[3]})
        assert [s["key"] for s in ld.skipped] == [info.keys[3]]


def _epoch_keys(d, world, workers, mmap, **kw) -> tuple[list[str], list[dict]]:
    """Every rank's keys of epoch 1 (ranks as separate loaders, as under torchrun) and their skips."""
    keys, skipped = [], []
    for rank in range(world):
        ld = SpeakerLoader(
            str(d), "train", 4, rank=rank, world_size=world, num_workers=workers, mmap=mmap, **kw
        )
        ld.set_epoch(1)
        keys += [k for b in ld for k in b["keys"]]
        skipped += ld.skipped
    return keys, skipped


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory):
    """4 KiB of random bytes inside a .mel.npy payload in the middle of a
    shard; a truncated shard beside it. Returns (dir, corrupt key, clean copy)."""
    root = tmp_path_factory.mktemp("corrupt")
    clean = make_shards(root / "clean", [6, 9, 5], seed=6, mean_frames=120)
    d = make_shards(root / "bad", [6, 9, 5], seed=6, mean_frames=120)
    m = Manifest.load(str(d))
    info = m.split("train").shards[1]
    i = 4
    start = info.offsets[i] + 3 * 512 + 128 + 64  # inside sample 4's .mel.npy payload (after its header)
    assert info.frames[i] * 80 * 2 > 4096 + 64 + 128
    p = d / info.name
    blob = bytearray(p.read_bytes())
    blob[start : start + 4096] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    p.write_bytes(bytes(blob))
    return d, info.keys[i], clean


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "stream"])
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_corruption_is_caught_in_every_layout(corrupt_shards, world, workers, mmap):
    """Per-sample checksums are checked on every read: any world size, any worker count, both read
    paths. Fail mode names shard, key and offset; skip mode drops exactly that sample."""
    d, bad, clean = corrupt_shards
    ref, _ = _epoch_keys(clean, world, workers, mmap)
    assert len(ref) == len(set(ref))
    got, skipped = _epoch_keys(d, world, workers, mmap, on_error="skip")
    assert sorted(got) == sorted(set(ref) - {bad})  # nothing else lost, nothing repeated
    assert [s["key"] for s in skipped] == ([bad] if bad in ref else [])
    if bad in ref:
        assert "checksum mismatch" in skipped[0]["error"] and "train/shard-000001.tar" in skipped[0]["error"]
        with pytest.raises(
            Exception, match=rf"train/shard-000001.tar \[{bad}\] at byte \d+: checksum mismatch"
        ):
            _epoch_keys(d, world, workers, mmap)


@pytest.mark.parametrize("mmap", [True, False])
def test_truncation_in_both_read_modes(tmp_path, mmap):
    d = make_shards(tmp_path / "s", [6, 7, 5], seed=6)
    cut = Manifest.load(str(d)).split("train").shards[2]
    q = d / cut.name
    q.write_bytes(q.read_bytes()[: cut.offsets[3] + 700])  # cut inside sample 3
    with pytest.raises(Exception, match=rf"{cut.name}.*truncated"):
        list(SpeakerLoader(str(d), "train", 4, rank=0, world_size=1, mmap=mmap))
    ld = SpeakerLoader(str(d), "train", 4, rank=0, world_size=1, mmap=mmap, on_error="skip")
    got = [k for b in ld for k in b["keys"]]
    assert sorted(got) == sorted(set(all_keys(d)) - set(cut.keys[3:]))


def test_never_opens_audio(shards, monkeypatch):
    import soundfile

    def boom(*a, **k):
        raise AssertionError("raw audio opened")

    for name in ("read", "SoundFile", "info", "blocks"):
        monkeypatch.setattr(soundfile, name, boom)
    for workers in (0, 2):
        ld = SpeakerLoader(str(shards), "train", 8, rank=0, world_size=1, num_workers=workers)
        assert sum(len(b["keys"]) for b in ld) == 53


@pytest.mark.parametrize("context,mmap", [("forkserver", True), ("forkserver", False), ("spawn", True)])
def test_workers_started_by_forkserver_or_spawn_resume_exactly(shards, context, mmap):
    """Workers that get the dataset pickled (forkserver, spawn) instead of forked yield the fork
    workers' batches, and resume mid-epoch exactly (mmap=False: the streamed read, as remote)."""
    import multiprocessing as mp

    kw = dict(train=True, seed=3, rank=0, world_size=2, num_workers=2, bucket_window=8, mmap=mmap)
    ref = epoch_batches(SpeakerLoader(str(shards), "train", 3, multiprocessing_context="fork", **kw), epoch=1)
    ctx = mp.get_context(context)
    got = epoch_batches(SpeakerLoader(str(shards), "train", 3, multiprocessing_context=ctx, **kw), epoch=1)
    assert [g["keys"] for g in got] == [r["keys"] for r in ref] and len(ref) == 9
    resumed = SpeakerLoader(str(shards), "train", 3, multiprocessing_context=ctx, **kw)
    resumed.load_state_dict({**resumed.state_dict(), "epoch": 1, "batches": 5})
    rest = epoch_batches(resumed, epoch=1)
    assert [r["keys"] for r in rest] == [r["keys"] for r in ref[5:]]
    assert all(torch.equal(x["mel"], y["mel"]) for x, y in zip(rest, ref[5:]))


def _new_workers(loader) -> tuple[list, object]:
    """The processes that starting ``loader``'s iteration created below this one (workers, and a fork
    server if it was not running yet), with the iterator (one batch consumed)."""
    import psutil

    me = psutil.Process()
    before = {c.pid for c in me.children(recursive=True)}
    it = iter(loader)
    next(it)
    new = [c for c in me.children(recursive=True) if c.pid not in before]
    return new, it


def test_workers_start_from_a_fork_server_inside_a_process_group(shards):
    """A rank runs gloo's threads, and a child forked from a multi-threaded process can hang in fork():
    inside a process group ("auto") each worker is a child of the fork server, never of this process;
    outside one they are forked (a script without a main guard keeps working)."""
    import psutil
    import torch.distributed as dist

    me = psutil.Process()
    kw = dict(train=True, seed=3, rank=0, world_size=1, num_workers=2)
    loader = SpeakerLoader(str(shards), "train", 3, **kw)
    new, it = _new_workers(loader)
    assert [c.ppid() for c in new] == [me.pid, me.pid]  # no process group: forked
    assert sum(1 for _ in it) == len(loader) - 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        loader = SpeakerLoader(str(shards), "train", 3, **kw)
        new, it = _new_workers(loader)
        workers = [c for c in new if c.ppid() != me.pid]  # a worker shares its server's command line
        assert len(workers) == 2
        assert all("forkserver" in " ".join(psutil.Process(w.ppid()).cmdline()) for w in workers)
        assert sum(1 for _ in it) == len(loader) - 1  # and the epoch completes
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="multiprocessing_context must be one of"):
        SpeakerLoader(str(shards), "train", 3, num_workers=1, multiprocessing_context="thread")


def test_a_state_without_its_dataset_is_refused(shards):
    """A loader state names the dataset its positions are in; one without (hand-made, or cut down) could
    be of any shard set, so it is refused like one of another dataset."""
    from spkr.shards.schema import DatasetMismatch

    loader = SpeakerLoader(str(shards), "train", 4, train=True, seed=3, rank=0, world_size=1, num_workers=0)
    state = loader.state_dict()
    del state["dataset_id"]
    with pytest.raises(DatasetMismatch, match=r"^loader state names no dataset_id: .*manifest\.json"):
        loader.load_state_dict(state)
    with pytest.raises(DatasetMismatch, match="loader state is for dataset 0123456789abcdef"):
        loader.load_state_dict({**state, "dataset_id": "0123456789abcdef"})
    loader.load_state_dict({**state, "dataset_id": loader.manifest.dataset_id})

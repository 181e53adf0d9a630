"""Shard reader: local reads of every member type, byte ranges, retries, corrupt and unsafe shards."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from spkr.shards import codec
from spkr.shards.codec import ShardError, decode_member
from spkr.shards.format import Manifest
from spkr.stream import sources as sources_mod
from spkr.stream.reader import ShardReader

from .shardkit import custom_shard, good_members, make_shards, npy_bytes

N_MELS = 80


def feats(rng, frames):
    return rng.standard_normal((frames, N_MELS)).astype(np.float16)


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path / "shards", [5, 3, 7], seed=3)


def test_reads_every_member_type_and_ranges(shards):
    m = Manifest.load(str(shards))
    rd = ShardReader(str(shards), n_mels=N_MELS)
    for info in m.split("train").shards:
        recs = rd.read_shard(info)
        assert [r.key for r in recs] == info.keys
        assert [r.label for r in recs] == info.labels
        assert [r.feats.shape for r in recs] == [(f, N_MELS) for f in info.frames]
        assert all(r.feats.dtype == np.float16 for r in recs)
        assert [r.meta["frames"] for r in recs] == info.frames  # .json decoded
        # every sub-range reads the same samples as the whole-shard read
        for a in range(info.num_samples):
            for b in range(a, info.num_samples + 1):
                part = list(rd.iter_range(info, a, b))
                assert [r.key for r in part] == info.keys[a:b]
                for r, full in zip(part, recs[a:b]):
                    np.testing.assert_array_equal(r.feats, full.feats)
    assert rd.stats.retries == 0 and not rd.stats.skipped


def test_small_chunks(shards):
    m = Manifest.load(str(shards))
    info = m.split("train").shards[2]
    ref = ShardReader(str(shards), n_mels=N_MELS).read_shard(info)
    # buffered chunked reads with read-ahead (the remote path) == mmap views (the local default)
    rd = ShardReader(str(shards), n_mels=N_MELS, chunk_size=700, readahead=True, use_mmap=False)
    got = rd.read_shard(info)
    assert [r.key for r in got] == [r.key for r in ref]
    assert all(np.array_equal(a.feats, b.feats) for a, b in zip(got, ref))


def test_transient_errors_are_retried_from_offset(shards, monkeypatch):
    m = Manifest.load(str(shards))
    info = m.split("train").shards[0]
    ref = ShardReader(str(shards), n_mels=N_MELS).read_shard(info)
    real = sources_mod._LocalSource.read_into
    calls = {"n": 0}

    def flaky(self, pos, mv):
        calls["n"] += 1
        if calls["n"] in (2, 3):
            raise ConnectionResetError("connection reset by peer")
        if calls["n"] == 5:
            return 0  # no data before the known end: transient
        if calls["n"] == 6:
            return real(self, pos, mv[: len(mv) // 2])  # partial: continue from the offset reached
        return real(self, pos, mv)

    monkeypatch.setattr(sources_mod._LocalSource, "read_into", flaky)
    sleeps = []
    # the buffered path (what remote shards use), with the local source standing in for a flaky remote
    rd = ShardReader(str(shards), n_mels=N_MELS, chunk_size=4096, sleep=sleeps.append, use_mmap=False)
    got = rd.read_shard(info)
    assert [r.key for r in got] == info.keys
    assert all(np.array_equal(a.feats, b.feats) for a, b in zip(got, ref))
    assert rd.stats.retries == 3
    assert sleeps[:2] == [0.2, 0.4]  # exponential backoff


def test_retries_are_bounded(shards, monkeypatch):
    m = Manifest.load(str(shards))
    info = m.split("train").shards[0]

    def broken(self, pos, mv):
        raise TimeoutError("read timed out")

    monkeypatch.setattr(sources_mod._LocalSource, "read_into", broken)
    rd = ShardReader(str(shards), n_mels=N_MELS, retries=3, sleep=lambda s: None, use_mmap=False)
    with pytest.raises(ShardError, match=r"train/shard-000000.tar at byte \d+: read failed after 3 retries"):
        rd.read_shard(info)
    assert rd.stats.retries == 3


def _corrupt_case(tmp_path, kind):
    rng = np.random.default_rng(0)
    f = [feats(rng, n) for n in (9, 12, 10)]
    samples = [(f"k{i}", i, x.shape[0], good_members(f"k{i}", i, x)) for i, x in enumerate(f)]
    if kind == "bad_npy":
        samples[1][3][2] = ("k1.mel.npy", b"\x93NUMPX" + npy_bytes(f[1])[6:])
    elif kind == "bad_npy_dict":
        raw = npy_bytes(f[1]).replace(b"'descr': '<f2'", b"'descr': '|O8'")
        samples[1][3][2] = ("k1.mel.npy", raw)
    elif kind == "unknown":
        samples[1][3][1] = ("k1.txt", b"hello")
    elif kind == "wrong_key":
        samples[1][3][1] = ("zz.json", b"{}")
    elif kind == "bad_cls":
        samples[1][3][0] = ("k1.cls", b"one")
    return custom_shard(tmp_path, "train/shard-000000.tar", samples)


@pytest.mark.parametrize(
    "kind,member,message",
    [
        ("bad_npy", "k1.mel.npy", "bad .npy header"),
        ("bad_npy_dict", "k1.mel.npy", "refusing .npy of dtype object"),
        ("unknown", "k1.txt", "unknown member type"),
        ("wrong_key", "zz.json", "where the manifest expects 'k1.json'"),
        ("bad_cls", "k1.cls", "bad .cls payload"),
    ],
)
def test_corrupt_members_fail_clearly_or_skip(tmp_path, kind, member, message):
    info = _corrupt_case(tmp_path, kind)
    rd = ShardReader(str(tmp_path), n_mels=N_MELS)
    it = rd.iter_range(info)
    assert next(it).key == "k0"
    with pytest.raises(ShardError) as e:
        next(it)
    assert "train/shard-000000.tar" in str(e.value) and member in str(e.value) and message in str(e.value)
    assert e.value.member == member
    skip = ShardReader(str(tmp_path), n_mels=N_MELS, on_error="skip")
    assert [r.key for r in skip.read_shard(info)] == ["k0", "k2"]
    assert [s["key"] for s in skip.stats.skipped] == ["k1"]
    assert message in skip.stats.skipped[0]["error"]


def test_truncated_tar(tmp_path):
    info = _corrupt_case(tmp_path, "none")
    path = tmp_path / info.name
    blob = path.read_bytes()
    path.write_bytes(blob[: info.offsets[1] + 1024 + 700])  # inside k1.json / k1.mel.npy
    rd = ShardReader(str(tmp_path), n_mels=N_MELS)
    with pytest.raises(ShardError, match=r"train/shard-000000.tar \[k1\] at byte \d+: truncated shard"):
        rd.read_shard(info)
    skip = ShardReader(str(tmp_path), n_mels=N_MELS, on_error="skip")
    assert [r.key for r in skip.read_shard(info)] == ["k0"]
    assert [s["key"] for s in skip.stats.skipped] == ["k1", "k2"]
    assert skip.stats.retries == 0  # truncation is not a transient error


@pytest.mark.parametrize("use_mmap", [True, False])
def test_header_checksum_mismatch(tmp_path, use_mmap):
    info = _corrupt_case(tmp_path, "none")
    path = tmp_path / info.name
    blob = bytearray(path.read_bytes())
    # one byte of k1's first header, in its mtime field: only the header checksum can notice
    blob[info.offsets[1] + 140] ^= 0x01
    path.write_bytes(bytes(blob))
    # the per-sample checksum sees it first (test below); without it the tar header checksum still does
    rd = ShardReader(str(tmp_path), n_mels=N_MELS, use_mmap=use_mmap, checksums=False)
    with pytest.raises(ShardError, match=r"train/shard-000000.tar \[k1\.cls\].*checksum mismatch"):
        rd.read_shard(info)
    skip = ShardReader(str(tmp_path), n_mels=N_MELS, on_error="skip", use_mmap=use_mmap, checksums=False)
    assert [r.key for r in skip.read_shard(info)] == ["k0", "k2"]


def test_byte_sum_equals_sum():
    rng = np.random.default_rng(0)
    blocks = [bytes(n) for n in (0, 1, 512, 513)] + [b"\xff" * n for n in (1, 255, 512, 513)]
    blocks += [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in rng.integers(0, 514, 300)]
    blocks += [rng.integers(200, 256, 512, dtype=np.uint8).tobytes() for _ in range(100)]  # sums > 65521
    blocks += [os.urandom(600), b"\xff" * 1024]  # longer: falls back to sum()
    assert [codec.byte_sum(b) for b in blocks] == [sum(b) for b in blocks]


@pytest.mark.parametrize("ext", ["pth", "pkl", "pickle"])
def test_pickle_members_are_refused_never_loaded(tmp_path, ext):
    marker = tmp_path / f"pwned-{ext}"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Evil())
    rng = np.random.default_rng(0)
    x = feats(rng, 9)
    members = good_members("k0", 0, x)
    members[2] = (f"k0.{ext}", payload)
    info = custom_shard(tmp_path, "train/shard-000000.tar", [("k0", 0, 9, members)])
    for on_error in ("fail", "skip"):
        rd = ShardReader(str(tmp_path), n_mels=N_MELS, on_error=on_error)
        if on_error == "fail":
            with pytest.raises(ShardError, match=rf"k0\.{ext}.*pickle-based formats are never deserialised"):
                rd.read_shard(info)
        else:
            assert rd.read_shard(info) == [] and len(rd.stats.skipped) == 1
    with pytest.raises(ShardError, match="refusing"):
        decode_member(ext, payload, shard="s", member=f"k0.{ext}")
    assert not marker.exists()
    assert not os.path.exists(marker)


@pytest.mark.parametrize("use_mmap", [True, False])
def test_payload_corruption_fails_the_checksum(tmp_path, use_mmap):
    """Bytes changed inside a .mel.npy payload parse fine (same size, valid
    float16), so only the per-sample checksum can see them; it is on by default in both read paths."""
    info = _corrupt_case(tmp_path, "none")
    path = tmp_path / info.name
    blob = bytearray(path.read_bytes())
    blob[info.offsets[2] - 100] ^= 0xFF  # a feature byte of k1: same size, other content
    path.write_bytes(bytes(blob))
    kw = dict(n_mels=N_MELS, use_mmap=use_mmap, chunk_size=700)
    off = rf"k1\] at byte {info.offsets[1]}"
    with pytest.raises(ShardError, match=rf"train/shard-000000.tar \[{off}: checksum mismatch"):
        ShardReader(str(tmp_path), **kw).read_shard(info)
    with pytest.raises(ShardError, match="checksum mismatch"):
        ShardReader(str(tmp_path), **kw).read_sample(info, 1) if use_mmap else list(
            ShardReader(str(tmp_path), **kw).iter_range(info, 1, 2)
        )
    skip = ShardReader(str(tmp_path), on_error="skip", **kw)
    assert [r.key for r in skip.read_shard(info)] == ["k0", "k2"]
    assert [(s["shard"], s["key"]) for s in skip.stats.skipped] == [(info.name, "k1")]
    assert "checksum mismatch" in skip.stats.skipped[0]["error"]
    # the check can be turned off (benchmarks): the corrupt sample then parses
    assert len(ShardReader(str(tmp_path), checksums=False, **kw).read_shard(info)) == 3


def test_checksum_covers_headers_and_end_of_archive(tmp_path):
    info = _corrupt_case(tmp_path, "none")
    path = tmp_path / info.name
    for pos in (info.offsets[1] + 140, info.bytes - 10):  # a header's mode field; the end-of-archive
        blob = bytearray(path.read_bytes())
        blob[pos] ^= 0x01
        path.write_bytes(bytes(blob))
        with pytest.raises(ShardError, match="checksum mismatch"):
            ShardReader(str(tmp_path), n_mels=N_MELS).read_shard(info)
        blob[pos] ^= 0x01
        path.write_bytes(bytes(blob))
    assert len(ShardReader(str(tmp_path), n_mels=N_MELS).read_shard(info)) == 3


def test_manifest_mismatch_frames_and_missing_shard(tmp_path):
    info = _corrupt_case(tmp_path, "none")
    info.frames[1] = 99
    with pytest.raises(ShardError, match=r"k1.mel.npy.*12 frames but manifest says 99"):
        ShardReader(str(tmp_path), n_mels=N_MELS).read_shard(info)
    info.name = "train/missing.tar"
    with pytest.raises(ShardError, match="train/missing.tar: shard not found"):
        ShardReader(str(tmp_path), n_mels=N_MELS).read_shard(info)

"""Flaky networks: one retry policy (spkr.storage.RetryPolicy) for every remote read — manifest.json,
sidecars, shards — whose budget counts consecutive failures without progress, each retry resuming at
the exact byte reached. Real servers on 127.0.0.1 (a Range-capable HTTP server, moto S3), a real
cutting TCP proxy, real tar shards; no mocks.

Fast tests pin the semantics (budget reset on progress, exact resume offsets from the servers' Range
headers, bounded failure naming URL and offset, manifest and sidecar retries, permanent errors not
retried, unreachable endpoints). The end-to-end test streams a >= 50 MB shard set through a proxy that cuts
most responses at random points, over HTTP and S3, three runs each, and checks that every sample comes
exactly once with the tensors of a local-disk epoch."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from spkr import storage
from spkr.shards.codec import ShardError
from spkr.shards.format import Manifest
from spkr.shards.plan import ShardJob
from spkr.shards.schema import ManifestError
from spkr.shards.writer import sidecar_matches
from spkr.stream import SpeakerLoader
from spkr.stream.reader import ShardReader

from .netkit import BUCKET, PREFIX, CuttingProxy, free_port, moto_s3, s3_options, serve_http
from .shardkit import all_keys, make_shards

N_MELS = 80
NO_SLEEP = storage.RetryPolicy(retries=5, backoff=0.0)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("SPKR_STORAGE_OPTIONS", raising=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two shards of ~1 MB (8 samples of ~800 frames) + manifest, and a 1 MiB blob."""
    out = make_shards(tmp_path_factory.mktemp("net") / "shards", [8, 6], mean_frames=800, sigma=0.2, seed=4)
    (out / "blob.bin").write_bytes(np.random.default_rng(0).bytes(1 << 20))
    return out


@pytest.fixture(scope="module")
def small_s3(small):
    with moto_s3(small) as port:
        yield port


def shard0(base) -> object:
    return Manifest.load(str(base)).split("train").shards[0]


def local_records(base, info):
    return ShardReader(str(base), n_mels=N_MELS).read_shard(info)


def same_records(got, ref):
    assert [r.key for r in got] == [r.key for r in ref]
    assert all(np.array_equal(a.feats, b.feats) for a, b in zip(got, ref))


# --------------------------------------------------------------------------- the budget


def test_budget_resets_on_progress(small):
    """Every response is cut after 64 KiB: 16 cuts for a 1 MiB file, with retries=1. Each cut made
    progress, so the budget (and the backoff) starts again every time; every re-request starts at the
    exact byte received (the server's Range headers)."""
    n, blob = 64 << 10, (small / "blob.bin").read_bytes()
    sleeps: list[float] = []
    policy = storage.RetryPolicy(retries=1, backoff=0.01, sleep=sleeps.append)
    with serve_http(small, cut_for=lambda path, i, start: n) as srv:
        got = storage.read_bytes(f"http://127.0.0.1:{srv.port}/blob.bin", retry=policy)
    assert got == blob
    assert [r["start"] for r in srv.requests] == list(range(0, len(blob), n))
    assert sum(r["cut"] for r in srv.requests) == len(blob) // n - 1  # the last response is complete
    assert sleeps == [0.01] * (len(blob) // n - 1)  # never escalated: each failure followed progress


def test_shard_read_survives_a_cut_every_100kb(small):
    """The shard path: a ShardReader over HTTP whose every response is cut after 100 kB still reads
    the whole shard with retries=1; one retry per cut; resumed exactly (Range starts)."""
    info = shard0(small)
    n = 100_000
    with serve_http(small, cut_for=lambda path, i, start: n) as srv:
        rd = ShardReader(f"http://127.0.0.1:{srv.port}", n_mels=N_MELS, retries=1, backoff=0.0)
        same_records(rd.read_shard(info), local_records(small, info))
    tar = [r for r in srv.requests if r["path"].endswith(".tar")]
    assert [r["start"] for r in tar] == list(range(0, info.bytes, n))
    assert rd.stats.retries == math.ceil(info.bytes / n) - 1 == sum(r["cut"] for r in tar)
    assert rd.stats.bytes == info.bytes  # nothing fetched twice


def test_no_progress_fails_after_retries_naming_url_and_offset(small):
    """100 000 bytes arrive, then nothing: 3 retries without progress, then a ShardError naming the
    shard, the URL and the byte reached; backoff 0.1, 0.2, 0.4."""
    info = shard0(small)
    sleeps: list[float] = []
    with serve_http(small, cut_for=lambda path, i, start: 100_000 if i == 0 else 0) as srv:
        url = f"http://127.0.0.1:{srv.port}"
        rd = ShardReader(url, n_mels=N_MELS, retries=3, backoff=0.1, sleep=sleeps.append)
        with pytest.raises(ShardError) as e:
            rd.read_shard(info)
    msg = str(e.value)
    assert msg.startswith(f"{info.name} at byte 100000: read failed after 3 retries without progress")
    assert f"({url}/{info.name})" in msg and e.value.offset == 100_000
    assert [r["start"] for r in srv.requests] == [0, 100_000, 100_000, 100_000]
    assert rd.stats.retries == 3 and sleeps == [0.1, 0.2, 0.4]


def test_read_bytes_without_progress_raises_read_failed(small):
    with serve_http(small, cut_for=lambda path, i, start: 5000 if i == 0 else 0) as srv:
        url = f"http://127.0.0.1:{srv.port}/blob.bin"
        with pytest.raises(storage.ReadFailed, match=rf"^{url} at byte 5000: read failed after 2 retries"):
            storage.read_bytes(url, retry=storage.RetryPolicy(retries=2, backoff=0.0))
    assert len(srv.requests) == 3


@pytest.mark.parametrize(
    "code,times,retried", [(403, 1, False), (404, 1, False), (503, 2, True), (429, 1, True)]
)
def test_permanent_errors_are_not_retried_transient_statuses_are(small, code, times, retried):
    """403/404 fail at once (one request), 503/429 are retried."""
    info = shard0(small)

    def status_for(path, i):
        return code if path.endswith(info.name) and i < times else None

    with serve_http(small, status_for=status_for) as srv:
        rd = ShardReader(f"http://127.0.0.1:{srv.port}", n_mels=N_MELS, retries=3, backoff=0.0)
        if retried:
            same_records(rd.read_shard(info), local_records(small, info))
            assert rd.stats.retries == times
        else:
            why = "shard not found" if code == 404 else "access denied .*HTTP 403"
            with pytest.raises(ShardError, match=rf"{info.name}: {why}"):
                rd.read_shard(info)
            assert rd.stats.retries == 0
    assert srv.counts[("GET", "/" + info.name)] == times + (1 if retried else 0)


# --------------------------------------------------------------------------- exact resume, both backends


@pytest.mark.parametrize("backend", ["http", "s3"])
def test_resume_offsets_are_exact_through_a_cutting_proxy(small, small_s3, backend):
    """A proxy cuts 90 % of the shard responses at a random body byte (seeded): each re-request's Range
    starts at exactly the byte the client had received (the proxy counts the body bytes it let
    through), for HTTP and for S3 (s3fs's own retries bypassed: our loop keeps the bytes)."""
    info = shard0(small)
    with serve_http(small) as srv:
        target = srv.port if backend == "http" else small_s3
        proxy = CuttingProxy(target, ratio=0.9, seed=11, min_body=2048)
        try:
            if backend == "http":
                rd = ShardReader(f"http://127.0.0.1:{proxy.port}", n_mels=N_MELS, backoff=0.0)
            else:
                base = f"s3://{BUCKET}/{PREFIX}"
                rd = ShardReader(base, s3_options(proxy.port), n_mels=N_MELS, backoff=0.0)
            got = rd.read_shard(info)
        finally:
            proxy.close()
    same_records(got, local_records(small, info))
    resumes = proxy.resumes()
    assert proxy.cuts >= 3 and len(resumes) == proxy.cuts
    assert all(stop == nxt for _, stop, nxt in resumes), resumes
    assert rd.stats.retries == proxy.cuts
    assert sum(r["body"] for r in proxy.records) == info.bytes == rd.stats.bytes


# --------------------------------------------------------------------------- manifest and sidecars


@pytest.mark.parametrize("backend", ["http", "s3"])
def test_manifest_fetch_is_retried_and_resumed(small, small_s3, backend):
    """The first three manifest.json responses are cut after 1000 bytes: it loads with retries=1
    (each cut made progress), resumed exactly, identical to the local manifest."""
    with serve_http(small) as srv:
        target = srv.port if backend == "http" else small_s3
        proxy = CuttingProxy(target, cuts=3, after=1000, match=r"manifest\.json$")
        try:
            policy = storage.RetryPolicy(retries=1, backoff=0.0)
            if backend == "http":
                m = Manifest.load(f"http://127.0.0.1:{proxy.port}", retry=policy)
            else:
                m = Manifest.load(f"s3://{BUCKET}/{PREFIX}", s3_options(proxy.port), retry=policy)
        finally:
            proxy.close()
    assert m.data == Manifest.load(str(small)).data
    assert proxy.cuts == 3 and len(proxy.records) == 4
    assert all(stop == nxt for _, stop, nxt in proxy.resumes())


def test_sidecar_read_is_retried_torn_or_absent_means_incomplete(small, tmp_path):
    job, torn, absent = (
        ShardJob("train", 0, [], []),
        ShardJob("train", 1, [], []),
        ShardJob("valid", 0, [], []),
    )
    out = tmp_path / "out"
    side = {"plan_hash": job.plan_hash(), "num_samples": 0, "pad": "x" * 20000}
    (out / "train").mkdir(parents=True)
    (out / "train/shard-000000.tar.json").write_text(json.dumps(side))
    (out / "train/shard-000001.tar.json").write_text(json.dumps(side)[:5000])  # torn by a power loss
    with serve_http(out) as srv:
        proxy = CuttingProxy(srv.port, cuts=2, after=3000, match=r"\.tar\.json$")
        try:
            base = f"http://127.0.0.1:{proxy.port}"
            assert sidecar_matches(base, job) == side
            assert proxy.cuts == 2 and len(proxy.records) == 3
            assert all(stop == nxt for _, stop, nxt in proxy.resumes())
            assert sidecar_matches(base, torn) is None
            assert sidecar_matches(base, absent) is None
        finally:
            proxy.close()


# --------------------------------------------------------------------------- unreachable endpoints


def test_unreachable_s3_endpoint_is_a_clear_error():
    """Connection refused (a closed port on 127.0.0.1): after the retries, a ManifestError naming
    the URL and offset — from Manifest.load and from SpeakerLoader (which passes its retries/backoff)."""
    opts = s3_options(free_port(), config_kwargs={"retries": {"total_max_attempts": 1}})
    url = f"s3://{BUCKET}/nowhere"
    want = (
        rf"cannot read the manifest: {url}/manifest.json at byte 0: read failed after 2 retries "
        r"without progress \(could not connect: is the endpoint up and reachable\?\)"
    )
    with pytest.raises(ManifestError, match=want):
        Manifest.load(url, opts, retry=storage.RetryPolicy(retries=2, backoff=0.001))
    with pytest.raises(ManifestError, match=want):
        SpeakerLoader(url, "train", 4, storage_options=opts, retries=2, backoff=0.001)


def test_unreachable_http_shard_is_a_clear_error(small):
    info = shard0(small)
    base = f"http://127.0.0.1:{free_port()}"
    rd = ShardReader(base, n_mels=N_MELS, retries=2, backoff=0.001)
    with pytest.raises(ShardError) as e:
        rd.read_shard(info)
    assert str(e.value).startswith(
        f"{info.name} at byte 0: read failed after 2 retries without progress (could not connect"
    )
    assert f"({base}/{info.name})" in str(e.value) and rd.stats.retries == 2


# --------------------------------------------------------------------------- the flaky network, end to end

RUNS = [(0, 0), (1, 2), (2, 0)]  # (proxy seed, DataLoader workers)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """>= 50 MB: 10 shards of 26 samples of ~1300 frames (LibriSpeech-like lengths)."""
    out = make_shards(tmp_path_factory.mktemp("big") / "shards", [26] * 10, mean_frames=1300, seed=21)
    total = sum(p.stat().st_size for p in out.rglob("*.tar"))
    assert total >= 50e6, total
    return out


def epoch(url, workers, storage_options=None):
    loader = SpeakerLoader(
        url, "train", 8, train=True, seed=3, rank=0, world_size=1, num_workers=workers,
        storage_options=storage_options, backoff=0.001,
    )  # fmt: skip
    loader.set_epoch(2)
    return loader, list(loader)


@pytest.fixture(scope="module")
def big_reference(big):
    cache = {}

    def get(workers):
        if workers not in cache:
            cache[workers] = epoch(str(big), workers)[1]
        return cache[workers]

    return get


@pytest.fixture(scope="module")
def big_s3(big):
    with moto_s3(big) as port:
        yield port


@pytest.fixture(scope="module")
def big_http(big):
    with serve_http(big) as srv:
        yield srv.port


@pytest.mark.parametrize("backend", ["http", "s3"])
def test_flaky_network_epochs_are_exact(big, big_reference, big_http, big_s3, backend):
    """A proxy cuts >= 70 % of the responses (manifest.json included, its first response always) at
    random points between 4 KB and 1 MB into the body (~90 % achieved, > 100 cuts per run). Three runs per backend: every sample exactly once, in the order and
    with the tensors of the local-disk epoch; one retry per cut shard response; every byte through
    the proxy was used once (no byte fetched twice); with one reader, every resume exact."""
    keys = all_keys(big)
    for seed, workers in RUNS:
        proxy = CuttingProxy(
            big_http if backend == "http" else big_s3,
            match=r"(\.tar|manifest\.json)$", ratio=0.95, seed=seed, min_body=4096, always_first=r"manifest",
        )  # fmt: skip
        try:
            if backend == "http":
                loader, batches = epoch(f"http://127.0.0.1:{proxy.port}", workers)
            else:
                loader, batches = epoch(f"s3://{BUCKET}/{PREFIX}", workers, s3_options(proxy.port))
        finally:
            proxy.close()
        ref = big_reference(workers)
        got = [k for b in batches for k in b["keys"]]
        assert sorted(got) == sorted(keys) and len(set(got)) == len(got)  # each sample exactly once
        assert [b["keys"] for b in batches] == [r["keys"] for r in ref]
        for b, r in zip(batches, ref):
            assert torch.equal(b["mel"], r["mel"]) and torch.equal(b["labels"], r["labels"])
        tar = [r for r in proxy.records if r["path"].endswith(".tar")]
        manifest = [r for r in proxy.records if r["path"].endswith("manifest.json")]
        assert proxy.cut_ratio() >= 0.7, (proxy.cuts, len(proxy.records))
        assert manifest[0]["cut"] and not manifest[-1]["cut"]
        assert loader.retries == sum(r["cut"] for r in tar) > 20
        assert sum(r["body"] for r in tar) == loader.bytes_read
        if workers == 0:
            assert all(stop == nxt for _, stop, nxt in proxy.resumes())

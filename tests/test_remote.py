"""Remote shards: a real S3 server (moto) and an HTTP server with Range on 127.0.0.1, a loopback proxy
that cuts shard responses (retries must not change the keys consumed), the local file cache, and
``webdataset.WebDataset("s3://...")`` through ``register_webdataset_fsspec``."""

from __future__ import annotations

import json

import pytest
import torch

from spkr.stream import SpeakerLoader, register_webdataset_fsspec

from .netkit import BUCKET, PREFIX, CuttingProxy, moto_s3, s3_options, serve_http
from .shardkit import all_keys, make_shards


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("remote") / "shards", [5, 7, 11], mean_frames=120, seed=9)


@pytest.fixture(scope="module")
def http_server(local_shards):
    with serve_http(local_shards) as server:
        yield server.port


@pytest.fixture(scope="module")
def s3_server(local_shards):
    with moto_s3(local_shards) as port:
        yield port


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


# --------------------------------------------------------------------------- tests


def run_epoch(url, workers=0, storage_options=None, **kw):
    loader = SpeakerLoader(
        url, "train", 4, train=True, seed=1, rank=0, world_size=1, num_workers=workers,
        storage_options=storage_options, chunk_size=1 << 16, backoff=0.01, **kw,
    )  # fmt: skip
    loader.set_epoch(1)
    return loader, list(loader)


def assert_same(batches, ref):
    assert [b["keys"] for b in batches] == [r["keys"] for r in ref]
    for b, r in zip(batches, ref):
        assert torch.equal(b["mel"], r["mel"]) and torch.equal(b["labels"], r["labels"])


@pytest.fixture(scope="module")
def reference(local_shards):
    """The local run with the same number of workers (the order depends on it)."""
    cache = {}

    def get(workers=0):
        if workers not in cache:
            cache[workers] = run_epoch(str(local_shards), workers)[1]
        return cache[workers]

    return get


@pytest.mark.parametrize("workers", [0, 2])
def test_s3_epoch_matches_local(s3_server, reference, local_shards, workers):
    loader, batches = run_epoch(f"s3://{BUCKET}/{PREFIX}", workers, s3_options(s3_server))
    assert_same(batches, reference(workers))
    assert sorted(k for b in batches for k in b["keys"]) == sorted(all_keys(local_shards))
    assert loader.retries == 0


def test_s3_env_options_and_cache(s3_server, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("SPKR_STORAGE_OPTIONS", json.dumps(s3_options(s3_server)))
    cache = tmp_path / "cache"
    loader, batches = run_epoch(f"s3://{BUCKET}/{PREFIX}", 0, None, cache_dir=str(cache))
    assert_same(batches, reference())
    assert len([p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > 10000]) == 3


def test_http_epoch_matches_local(http_server, reference):
    loader, batches = run_epoch(f"http://127.0.0.1:{http_server}", 0)
    assert_same(batches, reference())


def test_http_proxy_cuts_are_retried(http_server, reference):
    proxy = CuttingProxy(http_server, cuts=2, after=20000)
    try:
        loader, batches = run_epoch(f"http://127.0.0.1:{proxy.port}", 0)
    finally:
        proxy.close()
    reference = reference()
    assert proxy.cuts == 2
    assert loader.retries == 2  # one retry per cut, each resumed where the cut left it
    assert_same(batches, reference)


@pytest.mark.parametrize("workers", [0, 2])
def test_s3_proxy_cuts_are_retried(s3_server, reference, workers):
    """s3fs's own retry loop is bypassed for reads: our reader reopens at the byte offset reached,
    once per cut. Same keys, same tensors, same order."""
    proxy = CuttingProxy(s3_server, cuts=2, after=30000)
    try:
        loader, batches = run_epoch(f"s3://{BUCKET}/{PREFIX}", workers, s3_options(proxy.port))
    finally:
        proxy.close()
    reference = reference(workers)
    assert proxy.cuts == 2
    assert loader.retries == 2
    assert proxy.tar_requests >= len(loader.split_info.shards) + 2  # every cut response requested again
    assert_same(batches, reference)


def test_webdataset_reads_s3_after_register(s3_server, local_shards):
    import numpy as np
    import webdataset as wds

    from spkr.shards.codec import decode_npy

    register_webdataset_fsspec(s3_options(s3_server))
    urls = [f"s3://{BUCKET}/{PREFIX}/train/shard-{i:06d}.tar" for i in range(3)]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    keys, n = [], 0
    for sample in ds:
        keys.append(sample["__key__"])
        x = decode_npy(sample["mel.npy"], n_mels=80)
        assert x.dtype == np.float16 and int(sample["cls"]) >= 0
        n += 1
    assert keys == all_keys(local_shards)

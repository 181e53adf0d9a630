"""Remote shards: a real S3 server (moto) and an HTTP server with Range on 127.0.0.1, a loopback proxy
that cuts shard responses (retries must not change the keys consumed), the local file cache, and
``webdataset.WebDataset("s3://...")`` through ``register_webdataset_fsspec``."""

from __future__ import annotations

import http.server
import os
import re
import socket
import threading
from pathlib import Path

import pytest
import torch

from spkr.stream import SpeakerLoader, register_webdataset_fsspec

from .shardkit import all_keys, make_shards

BUCKET = "spkr-test"
PREFIX = "corpus/shards"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- servers


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range support (206 Partial Content)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return None
        size = os.path.getsize(path)
        f = open(path, "rb")
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if m:
            a = int(m.group(1))
            b = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if a >= size:
                f.close()
                self.send_error(416)
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
            f.seek(a)
            length = b - a + 1
        else:
            self.send_response(200)
            length = size
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = length
        return f

    def copyfile(self, source, outputfile):
        n = self._remaining
        while n > 0:
            buf = source.read(min(n, 1 << 16))
            if not buf:
                break
            outputfile.write(buf)
            n -= len(buf)


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("remote") / "shards", [5, 7, 11], mean_frames=120, seed=9)


@pytest.fixture(scope="module")
def http_server(local_shards):
    handler = lambda *a, **k: RangeHandler(*a, directory=str(local_shards), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def s3_server(local_shards):
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    s3 = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    s3.create_bucket(Bucket=BUCKET)
    for p in Path(local_shards).rglob("*"):
        if p.is_file():
            s3.upload_file(str(p), BUCKET, f"{PREFIX}/{p.relative_to(local_shards).as_posix()}")
    yield port
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def s3_options(port):
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
    }


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


class CuttingProxy:
    """TCP proxy on 127.0.0.1 to ``target_port``; the first ``cuts`` responses to a GET of a ``.tar``
    are cut after ``after`` bytes (connection closed)."""

    TAR_GET = re.compile(rb"^GET (\S*?\.tar)(\?\S*)? HTTP/1\.[01]\r\n", re.M)

    def __init__(self, target_port: int, cuts: int = 2, after: int = 20000):
        self.target, self.cuts_left, self.after = target_port, cuts, after
        self.cuts = 0
        self.tar_requests = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            state = {"cut_at": None, "sent": 0}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(client, upstream, state), daemon=True).start()

    def _up(self, client, upstream, state):
        try:
            while data := client.recv(65536):
                if self.TAR_GET.search(data):
                    with self.lock:
                        self.tar_requests += 1
                        cut = self.cuts_left > 0
                        if cut:
                            self.cuts_left -= 1
                    state["sent"] = 0
                    state["cut_at"] = self.after if cut else None
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(upstream)

    def _down(self, client, upstream, state):
        try:
            while data := upstream.recv(65536):
                cut_at = state["cut_at"]
                if cut_at is not None and state["sent"] + len(data) >= cut_at:
                    client.sendall(data[: cut_at - state["sent"]])
                    with self.lock:
                        self.cuts += 1
                    break
                state["sent"] += len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)

    def close(self):
        self.stopped = True
        _close(self.sock)


def _close(s):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


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
    import json

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
    assert loader.retries >= 1
    assert_same(batches, reference)


@pytest.mark.parametrize("workers,s3fs_retries", [(0, None), (2, None), (0, 1)])
def test_s3_proxy_cuts_are_retried(s3_server, reference, workers, s3fs_retries):
    """s3fs retries some body errors itself (default); with its retries off (``retries=1``) our
    reader reopens at the byte offset reached (a class attribute of S3FileSystem, set on the cached
    instance here). Either way: same keys, same tensors, same order."""
    from spkr import storage

    proxy = CuttingProxy(s3_server, cuts=2, after=30000)
    opts = s3_options(proxy.port)
    if s3fs_retries is not None:  # fsspec caches the instance: the reader (in-process) gets this one
        storage.get_fs(f"s3://{BUCKET}/{PREFIX}", opts)[0].retries = s3fs_retries
    try:
        loader, batches = run_epoch(f"s3://{BUCKET}/{PREFIX}", workers, opts)
    finally:
        proxy.close()
    reference = reference(workers)
    assert proxy.cuts == 2
    # every cut response was requested again (by our reader or by s3fs's own retry)
    n_chunks = sum(-(-s.bytes // (1 << 16)) for s in loader.split_info.shards)
    assert proxy.tar_requests >= n_chunks + 2
    if s3fs_retries == 1:
        assert loader.retries >= 1
    assert_same(batches, reference)


def test_webdataset_reads_s3_after_register(s3_server, local_shards):
    import numpy as np
    import webdataset as wds

    from spkr.stream.reader import decode_npy

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

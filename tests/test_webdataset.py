"""``spkr.stream.webdataset_pipeline``: a real webdataset pipeline over real spkr shards, locally, in
DataLoader workers, from a real S3 server (moto on 127.0.0.1) and under real torchrun (2 gloo ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from spkr.shards.codec import ShardError
from spkr.shards.format import Manifest
from spkr.stream import webdataset_pipeline

from .netkit import BUCKET, PREFIX, free_port, moto_s3, s3_options
from .shardkit import all_keys, make_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N_MELS = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 5 shards of prime sizes: 2 ranks get 3 and 2 shards, 2 workers of one rank 2 and 1 or 1 and 1
    return make_shards(tmp_path_factory.mktemp("wds") / "shards", [2, 3, 5, 7, 11], n_mels=N_MELS, seed=4)


def labels_of(shards) -> dict[str, int]:
    split = Manifest.load(str(shards)).split("train")
    return {k: lab for s in split.shards for k, lab in zip(s.keys, s.labels)}


def test_samples_in_manifest_order_safely_decoded(shards):
    samples = list(webdataset_pipeline(str(shards), "train"))
    assert [s["__key__"] for s in samples] == all_keys(shards)
    labels = labels_of(shards)
    for s in samples:
        assert s["mel.npy"].dtype == np.float16 and s["mel.npy"].shape[1] == N_MELS
        assert s["cls"] == labels[s["__key__"]] and s["json"]["frames"] == s["mel.npy"].shape[0]
        assert s["__url__"].endswith(".tar")


def test_batches_are_normalised_like_the_loader(shards):
    stats = Manifest.load(str(shards)).stats
    mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
    raw = {s["__key__"]: s["mel.npy"] for s in webdataset_pipeline(str(shards), "train")}
    batches = list(webdataset_pipeline(str(shards), "train", batch_size=4, shuffle=8, seed=1))
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(all_keys(shards)) and keys != all_keys(shards)  # shuffled, all once
    assert [len(b["keys"]) for b in batches] == [4] * 7  # 28 samples
    for b in batches:
        for i, k in enumerate(b["keys"]):
            n = int(b["lengths"][i])
            want = (raw[k].astype(np.float32) - mean) / np.maximum(std, 1e-5)
            assert n == raw[k].shape[0] and torch.allclose(b["mel"][i, :n], torch.from_numpy(want), atol=1e-4)
            assert not b["mel"][i, n:].any()
    again = list(webdataset_pipeline(str(shards), "train", batch_size=4, shuffle=8, seed=1))
    assert [b["keys"] for b in again] == [b["keys"] for b in batches]  # seeded


def test_dataloader_workers_split_shards(shards):
    pipeline = webdataset_pipeline(str(shards), "train", batch_size=3)
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)
    got = Counter(k for b in loader for k in b["keys"])
    assert set(got) == set(all_keys(shards)) and max(got.values()) == 1


def test_corrupt_sample_fails_with_the_shard_named_or_is_skipped(shards, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    info = Manifest.load(str(bad)).split("train").shards[1]
    path = bad / info.name
    blob = bytearray(path.read_bytes())
    blob[(info.offsets[1] + info.offsets[2]) // 2] ^= (
        0xFF  # in sample 1's features: only its checksum sees it
    )
    path.write_bytes(bytes(blob))
    with pytest.raises(ShardError, match="checksum mismatch") as e:
        list(webdataset_pipeline(str(bad), "train"))
    assert info.name in str(e.value) and info.keys[1] in str(e.value)
    keys = [s["__key__"] for s in webdataset_pipeline(str(bad), "train", on_error="skip")]
    assert keys == [k for k in all_keys(shards) if k != info.keys[1]]


def test_reads_a_real_s3_server(shards, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    local = list(webdataset_pipeline(str(shards), "train", batch_size=4))
    with moto_s3(shards) as port:
        url = f"s3://{BUCKET}/{PREFIX}"
        remote = list(webdataset_pipeline(url, "train", batch_size=4, storage_options=s3_options(port)))
    assert [b["keys"] for b in remote] == [b["keys"] for b in local]
    assert all(torch.equal(a["mel"], b["mel"]) for a, b in zip(remote, local))


RANK_SCRIPT = """
import datetime, json, os, sys
import torch.distributed as dist
from spkr.stream import webdataset_pipeline
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
samples = list(webdataset_pipeline(sys.argv[1], "train"))
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump([[s["__key__"], s["__url__"]] for s in samples], f)
dist.barrier()
dist.destroy_process_group()
"""


def test_torchrun_ranks_get_disjoint_shards_covering_every_sample(shards, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), str(shards), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    shards_of = [{url for _, url in g} for g in got]
    assert shards_of[0] and shards_of[1] and not shards_of[0] & shards_of[1]
    keys = [k for g in got for k, _ in g]
    assert sorted(keys) == sorted(all_keys(shards))  # every sample, exactly once

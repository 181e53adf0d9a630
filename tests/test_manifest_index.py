"""Version-3 manifests (issue 12): the per-sample fields of the shard entries live in per-split index
files beside manifest.json (spkr.shards.schema's docstring), checked (bytes, sha256, dtype, shape,
contents) and memory-mapped at load. Every shard set here is written for real by the writer
(build_manifest + write_manifest); version 2 (lists inline) still loads and means the same."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from spkr.shards.format import Manifest
from spkr.shards.schema import INDEX_DIR, ManifestError

from .netkit import BUCKET, PREFIX, moto_s3, s3_options
from .shardkit import make_shards

SPLITS = {"train": [5, 0, 7, 4], "valid": [3, 2]}  # an empty shard among them


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same shards with a version-2 manifest and with a version-3 one (+ index files)."""
    root = tmp_path_factory.mktemp("index")
    return make_shards(root / "v2", splits=SPLITS, seed=3, inline=True), make_shards(
        root / "v3", splits=SPLITS, seed=3
    )


def _entries(m: Manifest) -> dict:
    return {s: [info.to_dict() for info in m.split(s).shards] for s in m.split_names}


def test_same_shards_written_both_ways_are_the_same_dataset(both):
    v2, v3 = both
    raw2, raw3 = (json.loads((d / "manifest.json").read_text()) for d in both)
    assert (raw2["version"], raw3["version"]) == (2, 3)
    assert all(
        set(s) == {"name", "num_samples", "bytes", "sha256"}
        for sd in raw3["splits"].values()
        for s in sd["shards"]
    )
    m2, m3 = Manifest.load(str(v2)), Manifest.load(str(v3))
    assert m3.dataset_id == m2.dataset_id == raw3["dataset_id"]
    assert _entries(m3) == _entries(m2)
    keys = [k for info in m2.split("train").shards for k in info.keys]
    assert (v3 / INDEX_DIR / "train.keys.txt").read_bytes() == "\n".join(
        keys
    ).encode()  # what dataset_id hashes
    info = m3.split("train").shards[2]
    assert isinstance(info.frames.array, np.memmap) and isinstance(info.keys.text, np.memmap)
    assert (
        info.keys[0] == "train-002-0000"
        and info.keys[-1] == "train-002-0006"
        and list(m3.split("train").shards[1].keys) == []
    )
    a, b = json.loads(m2.to_json()), json.loads(m3.to_json())  # the inline form (version 2) of both
    for d in (a, b):  # the time of writing, and its line in the digest
        d.pop("created"), d["digest"].pop("created")
    assert a == b and b["version"] == 2
    for entry in raw3["splits"]["train"]["index"].values():
        payload = (v3 / entry["path"]).read_bytes()
        assert (len(payload), hashlib.sha256(payload).hexdigest()) == (entry["bytes"], entry["sha256"])


def _unpickled_entries(payload: bytes) -> list[dict]:
    return [info.to_dict() for info in pickle.loads(payload).shards]


def test_a_pickled_split_sends_paths_and_is_mapped_again_in_a_spawned_process(both):
    v2, v3 = both
    m2, m3 = Manifest.load(str(v2)), Manifest.load(str(v3))
    payload = pickle.dumps(m3.split("train"))
    assert b"train-000-0001" not in payload and str(v3 / INDEX_DIR / "train.keys.txt").encode() in payload
    assert len(payload) < len(pickle.dumps(m2.split("train")))
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_unpickled_entries, (payload,)) == _entries(m2)["train"]
    again = pickle.loads(pickle.dumps(m3))  # the whole manifest too
    assert _entries(again) == _entries(m2) and again.dataset_id == m2.dataset_id


def _npy(a: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


def _load_npy(d: Path, name: str) -> np.ndarray:
    return np.load(d / INDEX_DIR / name, allow_pickle=False)


def _rewrite(d: Path, field: str, payload: bytes, split: str = "train") -> None:
    """Replace an index file and record its new bytes and sha256 in manifest.json: only the contents
    are wrong."""
    data = json.loads((d / "manifest.json").read_text())
    entry = data["splits"][split]["index"][field]
    (d / entry["path"]).write_bytes(payload)
    entry.update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    (d / "manifest.json").write_text(json.dumps(data))


def _edit_manifest(d: Path, edit) -> None:
    data = json.loads((d / "manifest.json").read_text())
    edit(data)
    (d / "manifest.json").write_text(json.dumps(data))


def _keys_text(d: Path) -> str:
    return (d / INDEX_DIR / "train.keys.txt").read_text()


def _with(arr: np.ndarray, i: int, value) -> np.ndarray:
    arr = arr.astype(np.int64)
    arr[i] = value
    return arr


TAMPERED = [
    (
        "missing",
        "train.frames.npy",
        lambda d: (d / INDEX_DIR / "train.frames.npy").unlink(),
        "index file is missing",
    ),
    (
        "truncated",
        "train.labels.npy",
        lambda d: (d / INDEX_DIR / "train.labels.npy").write_bytes(
            (d / INDEX_DIR / "train.labels.npy").read_bytes()[:-3]
        ),
        "bytes, the manifest says",
    ),
    (
        "changed, same size",
        "train.keys.txt",
        lambda d: (d / INDEX_DIR / "train.keys.txt").write_text(
            _keys_text(d).replace("train-003-0001", "train-003-0009")
        ),
        "differs from the manifest's",
    ),
    (
        "path leaves the index folder",
        "manifest.json",
        lambda d: _edit_manifest(
            d, lambda m: m["splits"]["train"]["index"]["frames"].update(path="../x.npy")
        ),
        "path '../x.npy' is not 'index/train.frames.npy'",
    ),
    (
        "an index file missing from the manifest",
        "manifest.json",
        lambda d: _edit_manifest(d, lambda m: m["splits"]["valid"]["index"].pop("checksums")),
        "lists index files",
    ),
    (
        "a per-sample field inline as well",
        "manifest.json",
        lambda d: _edit_manifest(d, lambda m: m["splits"]["train"]["shards"][0].update(frames=[1] * 5)),
        "lists ['frames'] inline",
    ),
    (
        "pickled object array",
        "train.frames.npy",
        lambda d: _rewrite(d, "frames", _npy(np.array([1, "x"] * 8, dtype=object), allow_pickle=True)),
        "not a valid index file",
    ),
    (
        "2-D array",
        "train.frames.npy",
        lambda d: _rewrite(d, "frames", _npy(_load_npy(d, "train.frames.npy")[:, None])),
        "not 1-D integers",
    ),
    (
        "float frames",
        "train.frames.npy",
        lambda d: _rewrite(d, "frames", _npy(_load_npy(d, "train.frames.npy").astype(np.float32))),
        "not 1-D integers",
    ),
    (
        "a label short",
        "train.labels.npy",
        lambda d: _rewrite(d, "labels", _npy(_load_npy(d, "train.labels.npy")[:-1])),
        "lists 15 values for 16 samples",
    ),
    (
        "shard starts off by one",
        "train.keys.txt",
        lambda d: _rewrite(d, "shard_starts", _npy(_with(_load_npy(d, "train.shard_starts.npy"), 1, 4))),
        "shard_starts.npy disagree",
    ),
    (
        "shard starts beyond the samples",
        "train.shard_starts.npy",
        lambda d: _rewrite(d, "shard_starts", _npy(_with(_load_npy(d, "train.shard_starts.npy"), 4, 17))),
        "5 shard starts for 4 shards of 16 samples",
    ),
    (
        "newline inside a key",
        "train.keys.txt",
        lambda d: _rewrite(d, "keys", _keys_text(d).replace("train-000-0002", "train-000\n0002").encode()),
        "disagree",
    ),
    (
        "keys not UTF-8",
        "train.keys.txt",
        lambda d: _rewrite(
            d, "keys", _keys_text(d).encode().replace(b"train-000-0002", b"train-000-\xff\xfe02")
        ),
        "not UTF-8",
    ),
    (
        "offsets not increasing",
        "train/shard-000000.tar",
        lambda d: _rewrite(d, "offsets", _npy(_with(_load_npy(d, "train.offsets.npy"), 1, 0))),
        "offsets are not increasing",
    ),
    (
        "label out of range",
        "train/shard-000002.tar",
        lambda d: _rewrite(d, "labels", _npy(_with(_load_npy(d, "train.labels.npy"), 6, 99))),
        "labels holds 99, outside 0..4",
    ),
    (
        "a key listed twice",
        "train/shard-000003.tar",
        lambda d: _rewrite(d, "keys", _keys_text(d).replace("train-003-0000", "train-000-0000").encode()),
        "listed twice",
    ),
    (
        "two keys swapped",
        "manifest.json",
        lambda d: _rewrite(
            d,
            "keys",
            _keys_text(d)
            .replace("train-000-0000", "@")
            .replace("train-000-0001", "train-000-0000")
            .replace("@", "train-000-0001")
            .encode(),
        ),
        "does not match its contents",
    ),
]


@pytest.mark.parametrize("what, names, tamper, says", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_tampered_index_files_are_refused_at_load(both, tmp_path, what, names, tamper, says):
    d = tmp_path / "shards"
    shutil.copytree(both[1], d)
    tamper(d)
    with pytest.raises(ManifestError) as exc:
        Manifest.load(str(d))
    msg = str(exc.value)
    assert says in msg and names in msg, msg


def test_remote_index_files_are_fetched_once_into_the_cache(both, tmp_path, monkeypatch):
    """From a real S3 server (moto on 127.0.0.1): each index file is fetched once into the cache
    (named by its sha256) and mapped from there; a damaged cached copy is fetched again."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPKR_INDEX_CACHE", str(cache))
    local = Manifest.load(str(both[1]))
    with moto_s3(both[1]) as port:
        url, opts = f"s3://{BUCKET}/{PREFIX}", s3_options(port)
        remote = Manifest.load(url, opts)
        assert _entries(remote) == _entries(local) and remote.dataset_id == local.dataset_id
        index = json.loads((both[1] / "manifest.json").read_text())["splits"]["train"]["index"]
        cached = cache / (index["frames"]["sha256"] + ".npy")
        assert remote.split("train").shards[0].frames.source[0] == str(cached)
        mtime = cached.stat().st_mtime_ns
        assert _entries(Manifest.load(url, opts)) == _entries(local) and cached.stat().st_mtime_ns == mtime
        cached.write_bytes(b"\x00" * cached.stat().st_size)
        assert _entries(Manifest.load(url, opts)) == _entries(local)
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == index["frames"]["sha256"]

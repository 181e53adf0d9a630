"""Hostile manifests, sidecars and shard members (issue 10, item 4).

Everything read from outside is validated: a malformed or hostile manifest/sidecar fails at load time
with ManifestError naming the file (and shard) and what is wrong; a hostile tar member fails with a
ShardError naming shard and member, so that ``on_error="skip"`` skips and counts it. Never a raw
TypeError / AttributeError / KeyError / RecursionError, and never a read outside the shards directory.
Every shard, sidecar and manifest here is written for real (tarfile, JSON files on disk).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spkr.features import FeatureConfig
from spkr.shards.codec import ShardError, decode_member
from spkr.shards.format import Manifest, ShardInfo
from spkr.shards.schema import ManifestError
from spkr.shards.stats import RunningStats
from spkr.stream import SpeakerLoader
from spkr.stream.reader import ShardReader

from .shardkit import custom_shard, good_members, make_shards, npy_bytes, write_manifest

N_MELS = 80


def _data(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # version 2 (per-sample lists inline) to edit them; index files: tests/test_manifest_index.py
    return make_shards(tmp_path_factory.mktemp("hostile") / "shards", [4, 3], seed=7, inline=True)


def _copy(shards: Path, dst: Path) -> Path:
    shutil.copytree(shards, dst)
    return dst


# --------------------------------------------------------------------------- shard names


HOSTILE_NAMES = [
    ("/etc/outside.tar", "is absolute"),
    ("/bucket-b/train/shard-000000.tar", "is absolute"),
    ("../outside.tar", "contains '..'"),
    ("train/../../outside.tar", "contains '..'"),
    ("train/..", "contains '..'"),
    ("s3://bucket-b/train/shard-000000.tar", "URL scheme"),
    ("file:///tmp/outside.tar", "URL scheme"),
    ("train\\..\\outside.tar", "backslash"),
    ("train//shard-000000.tar", "empty path component"),
    ("train/", "empty path component"),
    ("train/shard-000000.tar\x00.x", "control character"),
    ("train/\x1b[2Jshard.tar", "control character"),
    ("train/sub/shard-000000.tar", "exactly one '/'"),
    ("shard-000000.tar", "exactly one '/'"),
    ("valid/shard-000000.tar", "outside its split's folder 'train/'"),
    ("train/.hidden.tar", "characters other than"),
    ("train/shard 0.tar", "characters other than"),
    ("train/shard-000000.tar?x=1", "characters other than"),
    ("train/shard-000000.txt", "does not end in .tar"),
]


@pytest.mark.parametrize("name,why", HOSTILE_NAMES)
def test_hostile_shard_names_fail_at_load(shards, tmp_path, name, why):
    d = _copy(shards, tmp_path / "s")
    # a real shard outside the shards directory, where '../outside.tar' points: never to be read
    shutil.copy(d / "train" / "shard-000000.tar", tmp_path / "outside.tar")
    data = _data(d / "manifest.json")
    data["splits"]["train"]["shards"][0]["name"] = name
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError) as e:
        Manifest.load(str(d))
    msg = str(e.value)
    assert str(d / "manifest.json") in msg and why in msg and "[train]" in msg
    assert "\x00" not in msg and "\x1b" not in msg  # shown escaped
    with pytest.raises(ManifestError, match="shard name"):
        SpeakerLoader(str(d), "train", 2, rank=0, world_size=1)


def test_hostile_split_names_fail_at_load(shards):
    data = _data(shards / "manifest.json")
    data["splits"]["../x"] = data["splits"].pop("train")
    with pytest.raises(ManifestError, match=r"m\.json: split name '\.\./x' is not a plain folder name"):
        Manifest(data, url="m.json")


def test_s3_base_other_bucket_refused_at_load_without_network(shards, monkeypatch):
    """Under s3://bucket-a/prefix a shard named '/bucket-b/...' would be read from another bucket with the
    user's credentials (posixpath.join drops the base). Refused in validation: no request is made (the
    endpoint below refuses connections, so one would fail with another error)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    data = _data(shards / "manifest.json")
    data["splits"]["train"]["shards"][1]["name"] = "/bucket-b/train/shard-000001.tar"
    url = "s3://bucket-a/prefix/manifest.json"
    with pytest.raises(ManifestError) as e:
        Manifest(data, url=url)  # what Manifest.load does with the fetched bytes
    assert str(e.value).startswith(url) and "'/bucket-b/train/shard-000001.tar' is absolute" in str(e.value)
    # the join used for reads refuses it too, for a ShardInfo made by hand (before any filesystem exists)
    info = ShardInfo.from_dict(_data(shards / "manifest.json")["splits"]["train"]["shards"][1], "m")
    info.name = "/bucket-b/train/shard-000001.tar"
    rd = ShardReader("s3://bucket-a/prefix", n_mels=N_MELS, retries=0)
    with pytest.raises(
        ShardError, match="refusing shard name '/bucket-b/train/shard-000001.tar': it is absolute"
    ):
        rd.url(info)
    with pytest.raises(ShardError, match="refusing shard name"):
        list(rd.iter_range(info))
    assert rd.url("train/shard-000001.tar") == "s3://bucket-a/prefix/train/shard-000001.tar"


def test_url_base_other_bucket_refused_by_manifest_load(shards):
    """The same through Manifest.load end to end, on fsspec's in-memory filesystem (a URL base whose
    join behaves like s3's)."""
    import fsspec

    data = _data(shards / "manifest.json")
    data["splits"]["train"]["shards"][1]["name"] = "/bucket-b/train/shard-000001.tar"
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket-b/train/shard-000001.tar", (shards / "train" / "shard-000001.tar").read_bytes())
    fs.pipe("/bucket-a/prefix/manifest.json", json.dumps(data).encode())
    try:
        with pytest.raises(ManifestError, match="shard name '/bucket-b/train/shard-000001.tar' is absolute"):
            Manifest.load("memory://bucket-a/prefix")
    finally:
        fs.rm(["/bucket-a", "/bucket-b"], recursive=True)


@pytest.mark.parametrize("use_mmap", [True, False])
@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_reader_refuses_escaping_names_built_by_hand(shards, tmp_path, use_mmap, kind):
    d = _copy(shards, tmp_path / "s")
    outside = tmp_path / "outside.tar"
    shutil.copy(d / "train" / "shard-000000.tar", outside)  # a readable shard outside the directory
    info = Manifest.load(str(d)).split("train").shards[0]
    info.name = "../outside.tar" if kind == "dotdot" else str(outside)
    rd = ShardReader(str(d), n_mels=N_MELS, use_mmap=use_mmap)
    with pytest.raises(ShardError, match="refusing shard name") as e:
        rd.read_shard(info)
    assert e.value.shard == info.name
    if use_mmap:
        with pytest.raises(ShardError, match="refusing shard name"):
            rd.read_sample(info, 0)
    # skip mode: refused as a whole (mmap) or sample by sample (streaming), never read
    skip = ShardReader(str(d), n_mels=N_MELS, use_mmap=use_mmap, on_error="skip")
    try:
        got = skip.read_shard(info)
    except ShardError as e:
        assert "refusing shard name" in str(e)
    else:
        assert got == [] and [s["key"] for s in skip.stats.skipped] == info.keys
        assert all("refusing shard name" in s["error"] for s in skip.stats.skipped)
    assert rd.stats.bytes == skip.stats.bytes == 0


def test_sidecar_is_validated(shards, tmp_path):
    side_path = shards / "train" / "shard-000000.tar.json"
    side = {**_data(side_path), "split": "train"}  # as spkr.shards.writer.write_job's sidecars say
    where = "train/shard-000000.tar.json"
    assert ShardInfo.from_dict(side, where).name == "train/shard-000000.tar"
    for edit, why in [
        (dict(name="../../outside.tar"), "contains '..'"),
        (dict(name="valid/shard-000000.tar"), "outside its split's folder 'train/'"),  # sidecar says train
        (dict(frames=[1, 2, "3", 4]), "frames holds '3' (a str), not integers"),
        (dict(offsets=[0, 0, 1024, 2048]), "offsets are not increasing"),
    ]:
        with pytest.raises(ManifestError) as e:
            ShardInfo.from_dict({**side, **edit}, where)
        assert str(e.value).startswith(where) and why in str(e.value)
    with pytest.raises(ManifestError, match=f"{where}: a shard entry is a list"):
        ShardInfo.from_dict([side], where)
    # the stats a training shard's sidecar carries (shard_writer.write_job), through a real JSON file
    rs = RunningStats(N_MELS)
    rs.update(np.random.default_rng(0).standard_normal((30, N_MELS)).astype(np.float16))
    (tmp_path / "stats.json").write_text(json.dumps(rs.to_dict()))
    stats = _data(tmp_path / "stats.json")
    assert RunningStats.from_dict(stats, where).count == stats["count"]
    for edit, why in [
        (dict(total=stats["total"][:-1]), "total has 79 values, expected 80"),
        (dict(count="12"), "count is '12' (a str), not an integer"),
        (dict(n_mels=True), "n_mels is True (a bool), not an integer"),
        (dict(min=None), "min is null for"),
        (dict(total_sq=[-1.0] * N_MELS), "total_sq holds -1.0, below 0.0"),
        (dict(max="9"), "max is '9' (a str), not a number"),
    ]:
        with pytest.raises(ManifestError) as e:
            RunningStats.from_dict({**stats, **edit}, where)
        assert str(e.value).startswith(where) and why in str(e.value)
    with pytest.raises(ManifestError, match="lacks"):
        RunningStats.from_dict({k: v for k, v in stats.items() if k != "total"}, where)
    with pytest.raises(ManifestError, match="cannot merge"):
        RunningStats(40).merge(RunningStats.from_dict(stats, where))


# --------------------------------------------------------------------------- malformed fields


def _shard0(d):
    return d["splits"]["train"]["shards"][0]


def _set(path, value):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value

    return edit


def _shard_set(field, fn):
    def edit(d):
        _shard0(d)[field] = fn(_shard0(d)[field])

    return edit


MALFORMED = [
    # top level
    ("version string", _set(["version"], "2"), "manifest version '2'"),
    ("version old", _set(["version"], 1), "predates this spkr version"),
    ("splits as list", lambda d: d.update(splits=list(d["splits"].values())), "splits is a list"),
    ("split not object", _set(["splits", "train"], [1]), "split 'train' is not an object"),
    ("shards missing", lambda d: d["splits"]["train"].pop("shards"), "with a 'shards' list"),
    ("shard entry str", _set(["splits", "train", "shards", 0], "train/x.tar"), "shard entry is a str"),
    ("non-string key", lambda d: d.update({1: "x"}), "has a key 1 that is not a string"),
    ("labels map dict", _set(["labels"], {"0": 0}), "labels is a dict, not a list"),
    ("labels map int", _set(["labels", 1], 1), "labels holds 1 (a int), not strings"),
    ("labels twice", _set(["labels", 1], "0"), "lists a label twice"),
    ("class_weights str", lambda d: d.update(class_weights=["1"] * 5), "class_weights holds '1'"),
    ("class_weights nan", _set(["class_weights", 0], float("nan")), "non-finite"),
    ("class_weights neg", _set(["class_weights", 0], -1.0), "class_weights holds -1.0, below"),
    ("class_weights bool", _set(["class_weights", 0], True), "class_weights holds True (a bool)"),
    ("class_weights dict", _set(["class_weights"], {"a": 1}), "class_weights is a dict"),
    ("class_weights short", lambda d: d["class_weights"].pop(), "4 class weights for 5 labels"),
    # feature config
    ("fc list", _set(["feature_config"], [80]), "feature_config is a list, not an object"),
    ("fc n_mels str", _set(["feature_config", "n_mels"], "80"), "n_mels is '80' (a str), not an integer"),
    ("fc hop bool", _set(["feature_config", "hop_length"], True), "hop_length is True (a bool)"),
    ("fc n_mels 0", _set(["feature_config", "n_mels"], 0), "n_mels is 0, outside 1.."),
    ("fc f_max str", _set(["feature_config", "f_max"], "8k"), "f_max is '8k' (a str), not a number"),
    ("fc center int", _set(["feature_config", "center"], 1), "center is 1 (a int), not a bool"),
    ("fc unknown", _set(["feature_config", "n_mel"], 80), "unknown key(s) ['n_mel']"),
    ("fc invalid", _set(["feature_config", "f_min"], 9000.0), "need 0 <= f_min < f_max"),
    # stats
    ("stats list", _set(["stats"], [1]), "stats is a list"),
    ("stats mean short", lambda d: d["stats"]["mean"].pop(), "mean has 79 values, expected 80"),
    ("stats std str", _set(["stats", "std", 3], "1"), "std holds '1' (a str)"),
    ("stats std neg", _set(["stats", "std", 3], -1.0), "std holds -1.0, below 0.0"),
    ("stats min none", _set(["stats", "min"], None), "min is None (a NoneType), not a number"),
    ("stats lacks", lambda d: d["stats"].pop("mean"), "stats lacks ['mean']"),
    ("stats frames", _set(["stats", "num_frames"], -1), "num_frames is -1, outside"),
    ("skipped dict", _set(["skipped"], {}), "skipped is a dict, not a list"),
    # shard entries
    ("label string", _shard_set("labels", lambda v: [v[0], "1", *v[2:]]), "labels holds '1' (a str)"),
    ("label bool", _shard_set("labels", lambda v: [True, *v[1:]]), "labels holds True (a bool)"),
    ("label too big", _shard_set("labels", lambda v: [99, *v[1:]]), "labels holds 99, outside 0..4"),
    ("label neg", _shard_set("labels", lambda v: [-1, *v[1:]]), "labels holds -1, outside 0..4"),
    ("labels dict", _shard_set("labels", lambda v: {"a": 1}), "labels is a dict, not a list"),
    ("key int", _shard_set("keys", lambda v: [7, *v[1:]]), "keys holds 7 (a int), not strings"),
    ("key dot", _shard_set("keys", lambda v: ["a.b", *v[1:]]), "sample key 'a.b' is empty or holds"),
    ("key slash", _shard_set("keys", lambda v: ["../a", *v[1:]]), "sample key '../a' is empty or holds"),
    ("key empty", _shard_set("keys", lambda v: ["", *v[1:]]), "sample key '' is empty or holds"),
    ("key ctrl", _shard_set("keys", lambda v: ["a\nb", *v[1:]]), "sample key 'a\\nb' is empty or holds"),
    ("key twice", _shard_set("keys", lambda v: [v[1], *v[1:]]), "listed twice"),
    ("frames neg", _shard_set("frames", lambda v: [-5, *v[1:]]), "frames holds -5, outside"),
    ("frames float", _shard_set("frames", lambda v: [12.5, *v[1:]]), "frames holds 12.5 (a float)"),
    ("frames none", _shard_set("frames", lambda v: [None, *v[1:]]), "frames holds None"),
    ("frames huge", _shard_set("frames", lambda v: [2**70, *v[1:]]), "frames holds 1180591620717411303424"),
    ("frames short", _shard_set("frames", lambda v: v[1:]), "lists 3 frames for 4 samples"),
    ("offsets order", _shard_set("offsets", lambda v: [v[1], v[0], *v[2:]]), "offsets are not increasing"),
    ("offsets beyond", _shard_set("offsets", lambda v: [*v[:-1], 10**9]), "outside 0.."),
    ("offsets unaligned", _shard_set("offsets", lambda v: [*v[:-1], v[-1] + 1]), "512-byte tar block"),
    ("bytes str", _shard_set("bytes", str), "bytes is '"),
    ("bytes neg", _shard_set("bytes", lambda v: -1), "bytes is -1, outside"),
    ("num_samples float", _shard_set("num_samples", float), "num_samples is 4.0 (a float)"),
    ("num_samples more", _shard_set("num_samples", lambda v: v + 1), "lists 4 keys for 5 samples"),
    ("frames missing", lambda d: _shard0(d).pop("frames"), "shard entry lacks ['frames']"),
    ("checksums missing", lambda d: _shard0(d).pop("checksums"), "predates this spkr version"),
    ("checksums neg", _shard_set("checksums", lambda v: [-1, *v[1:]]), "checksums holds -1, outside"),
    ("checksums 2**64", _shard_set("checksums", lambda v: [2**64, *v[1:]]), "checksums holds 184467"),
    ("checksums float", _shard_set("checksums", lambda v: [1.0, *v[1:]]), "checksums holds 1.0 (a float)"),
    ("checksums short", _shard_set("checksums", lambda v: v[1:]), "lists 3 checksums for 4 samples"),
]


SHARD_FIELDS = ("label ", "key", "frames", "offsets", "bytes", "num_samples", "checksums")


@pytest.mark.parametrize("what,edit,why", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_fields_are_manifest_errors(shards, tmp_path, what, edit, why):
    data = _data(shards / "manifest.json")
    edit(data)
    url = str(tmp_path / "manifest.json")
    with pytest.raises(ManifestError) as e:  # not a TypeError / AttributeError / KeyError
        Manifest(data, url=url)
    msg = str(e.value)
    assert msg.startswith(url) and why in msg, msg
    if what.startswith(SHARD_FIELDS):
        assert "train/shard-000000.tar" in msg, msg


def test_dataset_id_missing_is_a_manifest_error(shards):
    data = _data(shards / "manifest.json")
    del data["dataset_id"]
    with pytest.raises(ManifestError, match="dataset_id"):
        Manifest(data, url="m.json")


def test_manifest_json_nested_too_deeply_or_huge_ints(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "manifest.json").write_text('{"format": "spkr-shards", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ManifestError, match=r"manifest\.json: manifest JSON is nested too deeply"):
        Manifest.load(str(d))
    (d / "manifest.json").write_text('{"format": "spkr-shards", "version": ' + "9" * 5000 + "}")
    with pytest.raises(ManifestError, match=r"manifest\.json: manifest is not valid JSON"):
        Manifest.load(str(d))


def test_valid_manifest_still_loads(shards):
    m = Manifest.load(str(shards))
    split = m.split("train")
    assert [s.name for s in split.shards] == ["train/shard-000000.tar", "train/shard-000001.tar"]
    assert split.num_samples == 7 and m.stats["mean"] and len(m.labels) == 5
    split.shards[0].name = "elsewhere"  # split() hands out copies
    assert m.split("train").shards[0].name == "train/shard-000000.tar"


# --------------------------------------------------------------------------- hostile members


def _feats(rng, frames, dtype=np.float16):
    return rng.standard_normal((frames, N_MELS)).astype(dtype)


def _npy_with_descr(a: np.ndarray, descr: bytes) -> bytes:
    raw = npy_bytes(a)
    head = raw[: raw.index(b"\n") + 1]
    return raw.replace(head, head.replace(b"'<f2'", descr), 1)


def _member(kind: str, key: str, x: np.ndarray):
    """(member index, name, payload) of a hostile member replacing one of sample ``key``'s members."""
    npy = f"{key}.mel.npy"
    if kind == "npy_e2":  # np.dtype('<e2') raises TypeError
        return 2, npy, _npy_with_descr(x, b"'<e2'")
    if kind == "npy_big_endian":
        return 2, npy, npy_bytes(x.astype(">f2"))
    if kind == "npy_float128":
        return 2, npy, npy_bytes(x.astype(np.longdouble))
    if kind == "npy_float64":
        return 2, npy, npy_bytes(x.astype(np.float64))
    if kind == "npy_int16":
        return 2, npy, npy_bytes(x.view(np.int16))
    if kind == "npy_3d":
        return 2, npy, npy_bytes(x.reshape(1, *x.shape))
    if kind == "npy_columns":
        return 2, npy, npy_bytes(x[:, :40])
    if kind == "npy_extra_byte":
        return 2, npy, npy_bytes(x) + b"\0"
    if kind == "npy_huge_shape":  # a 4400-digit dimension: int() of it raises ValueError
        header = "{'descr': '<f2', 'fortran_order': False, 'shape': (%s, 80), }" % ("7" * 4400)
        header += " " * (-(len(header) + 11) % 64) + "\n"
        raw = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
        return 2, npy, raw + x.tobytes()
    if kind == "json_deep":  # RecursionError in json.loads
        return 1, f"{key}.json", b"[" * 5000 + b"]" * 5000
    if kind == "json_depth_40":
        return 1, f"{key}.json", b'{"a": ' + b"[" * 39 + b"]" * 39 + b"}"
    if kind == "json_big":
        return 1, f"{key}.json", json.dumps({"frames": x.shape[0], "pad": "x" * 70_000}).encode()
    if kind == "json_list":
        return 1, f"{key}.json", b"[1, 2]"
    if kind == "json_huge_int":  # ValueError (not JSONDecodeError): > 4300 digits
        return 1, f"{key}.json", b'{"n": ' + b"1" * 5000 + b"}"
    if kind == "cls_long":
        return 0, f"{key}.cls", b"0" * 100
    if kind == "cls_underscore":
        return 0, f"{key}.cls", b"1_0"
    if kind == "name_escape":
        return 1, f"{key}\x1b[2J.txt", b"{}"
    raise AssertionError(kind)


HOSTILE_MEMBERS = {
    "npy_e2": "bad .npy header: descr is not a valid dtype descriptor: '<e2'",
    "npy_big_endian": "refusing .npy of dtype >f2",
    "npy_float128": "refusing .npy of dtype float128",
    "npy_float64": "refusing .npy of dtype float64",
    "npy_int16": "refusing .npy of dtype int16",
    "npy_3d": ".npy shape (1, 12, 80)",
    "npy_columns": ".npy shape (12, 40), expected (frames, 80)",
    "npy_extra_byte": ".npy holds 1921 data bytes",
    "npy_huge_shape": "bad .npy header",
    "json_deep": "nested deeper than 32 levels",
    "json_depth_40": "nested deeper than 32 levels",
    "json_big": "bytes (at most 65536)",
    "json_list": "a list, not an object",
    "json_huge_int": "bad .json payload",
    "cls_long": "bad .cls payload",
    "cls_underscore": "bad .cls payload",
    "name_escape": "refusing member 'k1\\x1b[2J.txt' (unknown member type",
}


def _hostile_samples(kinds, rng, good_first=1):
    """Samples k0.. : good ones, then one per hostile kind (each with a good sample after it)."""
    samples, bad = [], {}
    i = 0

    def add(kind=None):
        nonlocal i
        key = f"k{i}"
        x = _feats(rng, 12)
        members = good_members(key, i % 5, x)
        if kind is not None:
            j, name, payload = _member(kind, key, x)
            members[j] = (name, payload)
            bad[key] = (kind, name)
        samples.append((key, i % 5, 12, members))
        i += 1

    for _ in range(good_first):
        add()
    for kind in kinds:
        add(kind)
        add()
    return samples, bad


@pytest.mark.parametrize("kind", sorted(HOSTILE_MEMBERS))
def test_hostile_member_is_a_shard_error_and_skipped(tmp_path, kind):
    samples, bad = _hostile_samples([kind], np.random.default_rng(0))
    info = custom_shard(tmp_path, "train/shard-000000.tar", samples)
    ((key, (_, member)),) = bad.items()
    shown = member if member.isprintable() else repr(member)[1:-1]
    for use_mmap in (True, False):
        rd = ShardReader(str(tmp_path), n_mels=N_MELS, use_mmap=use_mmap)
        with pytest.raises(ShardError) as e:  # not TypeError / ValueError / RecursionError
            rd.read_shard(info)
        msg = str(e.value)
        assert f"train/shard-000000.tar [{shown}]" in msg and HOSTILE_MEMBERS[kind] in msg, msg
        assert "\x1b" not in msg
        skip = ShardReader(str(tmp_path), n_mels=N_MELS, use_mmap=use_mmap, on_error="skip")
        got = skip.read_shard(info)
        assert [r.key for r in got] == ["k0", "k2"]
        assert all(r.feats.dtype == np.float16 and r.feats.shape == (12, N_MELS) for r in got)
        assert [(s["shard"], s["key"]) for s in skip.stats.skipped] == [(info.name, key)]
        assert HOSTILE_MEMBERS[kind] in skip.stats.skipped[0]["error"]


@pytest.mark.parametrize("mmap", [True, False])
def test_loader_skips_and_counts_hostile_members(tmp_path, mmap):
    rng = np.random.default_rng(1)
    kinds = sorted(HOSTILE_MEMBERS)
    samples, bad = _hostile_samples(kinds, rng, good_first=2)
    out = tmp_path / "s"
    info = custom_shard(out, "train/shard-000000.tar", samples)
    stats = {"mean": [0.0] * N_MELS, "std": [1.0] * N_MELS, "min": -5.0, "max": 5.0, "num_frames": 12}
    write_manifest(out, {"train": [info]}, FeatureConfig(n_mels=N_MELS), 5, stats)
    kw = dict(rank=0, world_size=1, num_workers=0, mmap=mmap, train=False)
    with pytest.raises(ShardError, match=r"train/shard-000000.tar \[k2\."):
        list(SpeakerLoader(str(out), "train", 4, **kw))
    ld = SpeakerLoader(str(out), "train", 4, on_error="skip", **kw)
    batches = list(ld)
    got = [k for b in batches for k in b["keys"]]
    assert sorted(got) == sorted(set(info.keys) - set(bad))
    assert sorted(s["key"] for s in ld.skipped) == sorted(bad)
    for b in batches:
        assert b["mel"].dtype.is_floating_point and b["mel"].shape[-1] == N_MELS


def test_fortran_order_and_whitespace_cls_still_read(tmp_path):
    rng = np.random.default_rng(2)
    x = _feats(rng, 12)
    members = good_members("k0", 3, x)
    members[0] = ("k0.cls", b" 3\n")
    members[2] = ("k0.mel.npy", npy_bytes(np.asfortranarray(x)))
    y = _feats(rng, 12, np.float32)
    info = custom_shard(
        tmp_path, "train/shard-000000.tar", [("k0", 3, 12, members), ("k1", 1, 12, good_members("k1", 1, y))]
    )
    recs = ShardReader(str(tmp_path), n_mels=N_MELS).read_shard(info)
    assert [r.label for r in recs] == [3, 1]
    np.testing.assert_array_equal(recs[0].feats, x)
    np.testing.assert_array_equal(recs[1].feats, y)


def test_decode_member_limits_directly():
    ok = json.dumps({"a": [[[1]]]}).encode()
    assert decode_member("json", ok, shard="s", member="k.json") == {"a": [[[1]]]}
    depth32 = b"[" * 32 + b"]" * 32
    with pytest.raises(ShardError, match="a list, not an object"):  # deep enough is fine, lists are not
        decode_member("json", depth32, shard="s", member="k.json")
    assert decode_member("json", b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}", shard="s", member="k.json")
    brackets_in_strings = json.dumps({"t": "[" * 100}).encode()  # many brackets, none nested
    assert decode_member("json", brackets_in_strings, shard="s", member="k.json") == {"t": "[" * 100}
    with pytest.raises(ShardError, match=r"s \[k.json\]: bad .json payload: nested deeper than 32"):
        decode_member("json", b'{"a": ' + b"[" * 32 + b"]" * 32 + b"}", shard="s", member="k.json")
    assert decode_member("cls", b"17", shard="s", member="k.cls") == 17
    for bad in (b"-1", b"+1", b"", b"1 2", "\u0663".encode(), b"9" * 19):
        with pytest.raises(ShardError, match="bad .cls payload"):
            decode_member("cls", bad, shard="s", member="k.cls")


SHARD_ENTRY_CASES = [m for m in MALFORMED if m[0].startswith(SHARD_FIELDS)]


@pytest.mark.parametrize("what,edit,why", SHARD_ENTRY_CASES, ids=[m[0] for m in SHARD_ENTRY_CASES])
def test_malformed_shard_entries_parsed_from_the_file(shards, tmp_path, what, edit, why):
    """The same errors when the manifest is read from its file (Manifest.load packs the per-sample
    lists while parsing: only what packs exactly, the rest is validated as a list)."""
    data = _data(shards / "manifest.json")
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError) as e:
        Manifest.load(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "manifest.json")) and why in msg, msg
    assert "train/shard-000000.tar" in msg, msg

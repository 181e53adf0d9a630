"""The fuzzer as a standing test (issue 23, item 7): tools/fuzz.py's seeded cases of every target,
a few dozen each. A read of a mutated file returns what it returned before or raises a documented
spkr error: no other exception, no silent change, no read over the memory bound. The long mode is
``python tools/fuzz.py --cases 10000`` (the README's figure)."""

from __future__ import annotations

import importlib.util
import struct
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = 50  # per target: 500 cases in all


def _load_fuzz():
    spec = importlib.util.spec_from_file_location("spkr_fuzz", REPO / "tools" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    return fuzz.build_fixtures(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("target", list(fuzz.TARGETS))
def test_fuzz(fixtures, target):
    report = fuzz.fuzz_target(fuzz.TARGETS[target], fixtures, CASES, seed=0)
    assert report.cases == CASES
    assert report.findings == [], "\n".join(report.findings)
    assert report.refused > 0  # the mutations reach the checks


def test_the_fuzzer_sees_a_silent_change(fixtures, monkeypatch):
    """The classification itself: a reader that ignores a flipped weight would be reported."""
    import spkr.checkpoint

    monkeypatch.setattr(spkr.checkpoint, "check_archive", lambda path: None)
    report = fuzz.fuzz_target(fuzz.TARGETS["checkpoint"], fixtures, 20, seed=0)
    assert report.silent


# --------------------------------------------------------------------------- what it found, pinned


def test_a_flipped_bit_in_a_checkpoint_tensor_is_refused(tmp_path):
    """torch.load checks no CRC: the flipped weight loaded silently before the archive check."""
    from spkr.checkpoint import CheckpointError, load
    from tests.runkit import untrained_checkpoint

    path = untrained_checkpoint(tmp_path / "c.pt")
    with zipfile.ZipFile(path) as z:  # the largest tensor's data: after its local header
        member = max(z.infolist(), key=lambda m: m.file_size)
    blob = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", blob[member.header_offset + 26 : member.header_offset + 30])
    blob[member.header_offset + 30 + name_len + extra_len + member.file_size // 2] ^= 0x10
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"c\.pt: (checkpoint is corrupt|cannot read)"):
        load(path)


def test_an_edited_feature_config_is_refused(tmp_path):
    """The dataset_id hashes the stored feature_fingerprint: an edited feature_config loaded as is."""
    import json

    from spkr.shards.format import Manifest
    from spkr.shards.schema import ManifestError
    from tests.shardkit import make_shards

    d = make_shards(tmp_path / "s", [3], n_mels=8)
    data = json.loads((d / "manifest.json").read_text())
    data["feature_config"]["top_db"] = 1e308
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="feature_fingerprint .* does not match its feature_config"):
        Manifest.load(str(d))


def test_a_deeply_nested_sidecar_is_a_shard_to_write_again(tmp_path):
    from spkr.shards.plan import ShardJob
    from spkr.shards.writer import read_sidecar

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "shard-000000.tar.json").write_text("[" * 100_000 + "]" * 100_000)
    assert read_sidecar(str(tmp_path), ShardJob("train", 0, [], [])) is None


def test_loading_many_shard_sets_keeps_file_descriptors_bounded(tmp_path, monkeypatch):
    """Each index file stayed mapped (one open file) for the life of the process: the fuzzer ran out
    of file descriptors after ~1,000 shard sets."""
    import os
    import shutil

    import spkr.shards.packed as packed
    from spkr.shards.format import Manifest
    from tests.shardkit import make_shards

    monkeypatch.setattr(packed, "MAPPED_MAX", 8)
    src = make_shards(tmp_path / "s", [3, 2], n_mels=8)
    counts = []
    for i in range(12):
        d = shutil.copytree(src, tmp_path / f"copy{i}")
        m = Manifest.load(str(d))
        assert list(m.split("train").shards[0].keys)
        del m
        shutil.rmtree(d)
        counts.append(len(os.listdir("/proc/self/fd")))
    assert len(packed._MAPPED) <= 8
    assert counts[-1] <= counts[3], counts  # no growth once the cache is full


@pytest.mark.parametrize("rename", ["digesu", "Digest", "fuzz_1"])
def test_a_renamed_digest_key_is_refused(tmp_path, rename):
    """Without its digest a manifest loads unchecked (shard sets written before the digest): a renamed
    digest key left an unknown field and loaded, every other field unverified."""
    import json

    from spkr.shards.format import Manifest
    from spkr.shards.schema import ManifestError
    from tests.shardkit import make_shards

    d = make_shards(tmp_path / "s", [3], n_mels=8)
    data = json.loads((d / "manifest.json").read_text())
    data[rename] = data.pop("digest")
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(
        ManifestError, match=rf"manifest\.json: field\(s\) \['{rename}'\] in a manifest without"
    ):
        Manifest.load(str(d))
    del data[rename]
    (d / "manifest.json").write_text(json.dumps(data))
    assert "digest" not in Manifest.load(str(d)).data  # deleted: loads, as a set written before it


@pytest.mark.parametrize(
    "text, problem",
    [
        (b'[model]\nd_model = 16\narch = "mam\xffba"\n', "not valid TOML: 'utf-8' codec can't decode"),
        (b"[model]\nfrontend_channels = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
        (b"[model]\nx = " + b"{a = " * 1000 + b"1" + b"}" * 1000 + b"\n", "nested too deeply"),
    ],
    ids=["not-utf8", "deep-array", "deep-table"],
)
def test_an_unreadable_config_file_is_a_config_error(tmp_path, text, problem):
    """A config file that is not UTF-8 raised UnicodeDecodeError, one nested too deeply RecursionError,
    neither naming the file."""
    from spkr.config import ConfigError, load_toml

    path = tmp_path / "model.toml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=rf"^{path}: .*{problem}"):
        load_toml(path)


def test_a_deeply_nested_json_option_is_a_usage_error(monkeypatch):
    """A JSON option nested too deeply for json.loads raised RecursionError (a traceback): it is
    argparse's usage error, and SPKR_STORAGE_OPTIONS's error names the variable."""
    import argparse

    from spkr.config import TooDeep, json_object, loads_json
    from spkr.storage import storage_options_from_env

    deep = '{"n_mels": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(TooDeep, match="JSON nested too deeply"):
        loads_json(deep)
    with pytest.raises(argparse.ArgumentTypeError, match="not a JSON object: JSON nested too deeply"):
        json_object(deep)
    monkeypatch.setenv("SPKR_STORAGE_OPTIONS", deep)
    with pytest.raises(ValueError, match="SPKR_STORAGE_OPTIONS is not a JSON object: JSON nested too deeply"):
        storage_options_from_env()


@pytest.mark.parametrize(
    "field_offset, bits, problem",
    [
        (8, 0x01, r"format\.npy is encrypted"),
        (6, 0xA0, r"NotImplementedError: zip file version"),
        (8, 0x20, r"NotImplementedError: compressed patched data"),
    ],
    ids=["encrypted", "zip-version", "patched-data"],
)
def test_a_gallery_member_in_a_zip_form_savez_never_writes_is_a_gallery_error(
    tmp_path, field_offset, bits, problem
):
    """A flipped bit in a member's zip flags or version raised zipfile's RuntimeError (a password is
    needed) or NotImplementedError."""
    import numpy as np

    from spkr.gallery import Gallery, GalleryError

    g = Gallery("0" * 16, 4)
    g.enroll("alice", np.eye(4, dtype=np.float32)[:2])
    g.save(tmp_path / "g.npz")
    blob = bytearray((tmp_path / "g.npz").read_bytes())
    blob[blob.find(b"PK\x01\x02") + field_offset] |= bits  # the first central directory entry
    (tmp_path / "g.npz").write_bytes(bytes(blob))
    with pytest.raises(GalleryError, match=rf"g\.npz: .*{problem}"):
        Gallery.load(tmp_path / "g.npz")

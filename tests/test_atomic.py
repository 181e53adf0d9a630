"""File modes of everything spkr writes via temp file + rename: they honour the umask like open() does
(0644 under umask 022, 0664 under 002, 0600 under 077), not mkstemp's 0600. Downloads: test_download."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
import torch

from spkr import atomic
from spkr import checkpoint as ck
from spkr.shards.writer import write_bytes_atomic
from spkr.tools import shard as shard_tool

MASKS = [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)]
IDS = ["umask022", "umask002", "umask077"]


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask,expected", MASKS, ids=IDS)
def test_helper_honours_umask(tmp_path, mask, expected):
    with umask(mask):
        assert atomic.current_umask() == mask
        assert atomic.current_umask() == mask  # reading it did not change it
        fd, tmp = atomic.mkstemp(prefix=".tmp-", suffix=".x", dir=tmp_path)
        os.close(fd)
        atomic.write_bytes(tmp_path / "sub" / "file.bin", b"data")
        write_bytes_atomic(str(tmp_path / "small.json"), b"{}")
        staging = Path(atomic.mkdtemp(prefix=".stage.", dir=tmp_path))
    assert staging.name.startswith(".stage.") and oct(mode(staging)) == oct(0o777 & ~mask)
    assert Path(tmp).name.startswith(".tmp-") and tmp.endswith(".x") and mode(Path(tmp)) == expected
    assert (tmp_path / "sub" / "file.bin").read_bytes() == b"data"
    assert mode(tmp_path / "sub" / "file.bin") == expected
    assert mode(tmp_path / "small.json") == expected
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["file.bin"]  # no temp file left


def test_write_bytes_failure_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "x.json"
    target.write_bytes(b"old")

    with pytest.raises(TypeError):
        atomic.write_bytes(target, "not bytes")  # the write fails after the temp file exists
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.parametrize("mask,expected", MASKS[:2], ids=IDS[:2])
def test_shards_sidecars_manifest_honour_umask(tiny_corpus, tmp_path, mask, expected):
    out = tmp_path / "shards"
    with umask(mask):
        rc = shard_tool.main(
            ["--source", str(tiny_corpus), "--subsets", "train.100", "--out", str(out),
             "--shard-size", "5", "--workers", "1", "--no-progress"]
        )  # fmt: skip
    assert rc == 0
    files = sorted(p for p in out.rglob("*") if p.is_file())
    names = {p.relative_to(out).as_posix() for p in files}
    assert "manifest.json" in names and "train/shard-000000.tar" in names
    assert "train/shard-000000.tar.json" in names and any(n.startswith("test/") for n in names)
    assert {p.relative_to(out).as_posix(): oct(mode(p)) for p in files} == {n: oct(expected) for n in names}
    dirs = [out] + [p for p in out.rglob("*") if p.is_dir()]
    assert {oct(mode(d)) for d in dirs} == {oct(0o777 & ~mask)}


@pytest.mark.parametrize("mask,expected", MASKS, ids=IDS)
def test_checkpoints_honour_umask(tmp_path, mask, expected):
    obj = {"format": ck.FORMAT, "version": ck.VERSION, "model": {"w": torch.ones(2)}}
    with umask(mask):
        ck.save_atomic(obj, tmp_path / "run" / "ckpt-epoch000.pt", tmp_path / "run" / "last.pt")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt-epoch000.pt", "last.pt"]
    for name in ("ckpt-epoch000.pt", "last.pt"):
        assert oct(mode(tmp_path / "run" / name)) == oct(expected)
        assert torch.equal(ck.load(tmp_path / "run" / name)["model"]["w"], torch.ones(2))

"""Errors that cross a process boundary (issue 23, item 3): every documented spkr error rebuilds as
itself in another process (its own type, the same message); a DataLoader worker's error reaches the
caller as that error, not as torch's ``Caught ShardError in DataLoader worker ...`` traceback; every
CLI prints one line ``[prog] error: ...`` and exits 2 for it, with 0, 1 and 2 workers; and under a
real 2-rank torchrun where only one rank reads a corrupt shard, that rank's line reaches the user,
the other rank exits with one line too, and nothing hangs. Shards, checkpoints and runs are real
(tests/shardkit.py, tests/runkit.py); the corruption is a flipped byte inside one sample's payload."""

from __future__ import annotations

import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch._utils import ExceptionWrapper

from spkr.augment import AugmentError
from spkr.checkpoint import CheckpointError
from spkr.config import ConfigError, NonFinite, TooDeep
from spkr.corpus.download import ChecksumError, DownloadError, UnsafeArchiveError
from spkr.errors import SpkrError
from spkr.features import AudioError
from spkr.gallery import GalleryError
from spkr.models.mamba import BackendUnavailable
from spkr.run import TrainError
from spkr.shards.codec import ShardError
from spkr.shards.format import Manifest
from spkr.shards.schema import DatasetMismatch, ManifestError, ManifestMismatch
from spkr.shards.trials import TrialListError
from spkr.shards.writer import ShardConflict
from spkr.storage import ReadFailed
from spkr.stream import SpeakerLoader

from .runkit import REPO, TINY_RUN_MODEL, subprocess_env, tiny_run
from .shardkit import make_shards

DOCUMENTED = [
    ShardError, ManifestError, ManifestMismatch, DatasetMismatch, ShardConflict, ConfigError,
    BackendUnavailable, GalleryError, TrialListError, CheckpointError, AugmentError, AudioError,
    ReadFailed, TrainError, DownloadError, ChecksumError, UnsafeArchiveError, NonFinite, TooDeep,
]  # fmt: skip
CHECKSUM_LINE = r"train/shard-000001\.tar \[{key}\] at byte \d+: checksum mismatch[^\n]*"


def corrupt_sample(shards: Path, split: str, shard: int, i: int) -> str:
    """Flip one byte inside sample ``i``'s .mel.npy payload of ``split``'s shard ``shard``; its key."""
    info = Manifest.load(str(shards)).split(split).shards[shard]
    path = shards / info.name
    blob = bytearray(path.read_bytes())
    blob[info.offsets[i] + 3 * 512 + 128 + 40] ^= 0xFF  # past the cls and json members and the npy header
    path.write_bytes(bytes(blob))
    return info.keys[i]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if " error: " in line]


# --------------------------------------------------------------------------- rebuilt as themselves


def _example(cls: type) -> SpkrError:
    if cls is ShardError:
        return ShardError("train/shard-000001.tar", "checksum mismatch", member="k.mel.npy", offset=1536)
    if cls is ReadFailed:
        return ReadFailed(
            "s3://b/x.tar at byte 7: timed out", url="s3://b/x.tar", offset=7, reason="timed out"
        )
    return cls("/data/x.json: field 'n_mels' must be an int, not '40'")


def _subclasses(cls: type) -> set[type]:
    return {c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))}


def test_every_spkr_error_is_listed():
    """A new SpkrError subclass anywhere in spkr joins DOCUMENTED (and so the rebuild test below)."""
    import importlib
    import pkgutil

    import spkr

    for mod in pkgutil.walk_packages(spkr.__path__, "spkr."):
        if not mod.name.startswith("spkr.models.scan_triton"):  # Triton-only module, errors none
            importlib.import_module(mod.name)
    assert _subclasses(SpkrError) == set(DOCUMENTED)


@pytest.mark.parametrize("cls", DOCUMENTED, ids=lambda c: c.__name__)
def test_documented_errors_rebuild_as_themselves(cls):
    """``type(e)(str(e))``, pickling and torch's ExceptionWrapper (what any DataLoader, e.g. a
    webdataset_pipeline's, does with a worker's error) all give the error's own type."""
    e = _example(cls)
    assert isinstance(e, SpkrError)
    again = cls(str(e))
    assert type(again) is cls and str(again) == str(e)
    unpickled = pickle.loads(pickle.dumps(e))
    assert type(unpickled) is cls and str(unpickled) == str(e) and vars(unpickled) == vars(e)
    try:
        raise e
    except SpkrError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(cls) as info:
        wrapper.reraise()
    assert type(info.value) is cls and str(e) in str(info.value)


# --------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> tuple[Path, str]:
    d = make_shards(tmp_path_factory.mktemp("cli_errors") / "s", [6, 9, 5], seed=6, mean_frames=60)
    return d, corrupt_sample(d, "train", 1, 4)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_a_workers_error_reaches_the_loader_as_itself(corrupt, workers):
    d, key = corrupt
    loader = SpeakerLoader(str(d), "train", 4, num_workers=workers)
    with pytest.raises(ShardError) as info:
        list(loader)
    e = info.value
    assert type(e) is ShardError
    assert re.fullmatch(CHECKSUM_LINE.format(key=key), str(e)), str(e)
    assert (e.shard, e.member) == ("train/shard-000001.tar", key)


# --------------------------------------------------------------------------- every CLI, one line


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The session's tiny run, its shards copied with one corrupt train and one corrupt test sample."""
    info = tiny_run(tmp_path_factory.getbasetemp())
    shards = tmp_path_factory.mktemp("bad") / "shards"
    shutil.copytree(info["shards"], shards)
    cfg = shards.parent / "tiny.toml"
    cfg.write_text(TINY_RUN_MODEL)
    keys = {"train": corrupt_sample(shards, "train", 1, 2), "test": corrupt_sample(shards, "test", 0, 5)}
    return {"run": Path(info["run"]), "shards": shards, "config": cfg, "keys": keys}


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_train_corrupt_shard_is_one_line(run, tmp_path, capfd, workers):
    from spkr.train import main

    args = [
        "--shards", str(run["shards"]), "--config", str(run["config"]), "--out", str(tmp_path / "r"),
        "--no-progress", "--no-compile", "--dtype", "fp32", "--epochs", "1", "--batch-size", "4",
        "--crop-frames", "0", "--num-workers", str(workers), "--verify-pairs", "0",
    ]  # fmt: skip
    assert main(args) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    [line] = error_lines(err)
    assert re.fullmatch(r"\[train\] error: " + CHECKSUM_LINE.format(key=run["keys"]["train"]), line), line


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_evaluate_corrupt_test_shard_is_one_line_as_typed(run, tmp_path, workers):
    cmd = [sys.executable, "-m", "spkr.evaluate", "--checkpoint", str(run["run"] / "last.pt"),
           "--shards", str(run["shards"]), "--num-workers", str(workers), "--out", str(tmp_path / "e.json")]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    [line] = error_lines(r.stderr)
    key = run["keys"]["test"]
    assert re.fullmatch(
        rf"\[evaluate\] error: test/shard-000000\.tar \[{key}\] at byte \d+: checksum mismatch.*", line
    )
    assert not (tmp_path / "e.json").exists()


def _bad_manifest(tmp_path: Path, shards: Path) -> Path:
    d = tmp_path / "bad_manifest"
    shutil.copytree(shards, d)
    (d / "manifest.json").write_text((d / "manifest.json").read_text().replace('"splits"', '"splits_"', 1))
    return d


def _cli_cases(run: dict, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """{cli module: (argv, what the error line says)}, one documented error each."""
    bad = _bad_manifest(tmp_path, run["shards"])
    junk_ckpt = tmp_path / "junk.pt"
    junk_ckpt.write_bytes(b"PK\x03\x04 not a checkpoint")
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"RIFF")
    return {
        "spkr.evaluate": (["--checkpoint", str(run["run"] / "last.pt"), "--shards", str(bad)], "manifest"),
        "spkr.predict": ([str(wav), "--checkpoint", str(junk_ckpt)], "junk.pt"),
        "spkr.enroll": (
            [str(wav), "--checkpoint", str(junk_ckpt), "--speaker", "a", "--db", str(tmp_path / "g.npz")],
            "junk.pt",
        ),  # fmt: skip
        "spkr.tools.chart_losses": (["--run", str(run["run"]), "--shards", str(bad)], "manifest"),
        "spkr.tools.chart_dataset": (["--shards", str(bad), "--out", str(tmp_path / "c")], "manifest"),
        "spkr.tools.shard": (
            ["--source", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--no-progress"],
            "none",
        ),  # fmt: skip
        "spkr.tools.download": (
            [
                "--subsets",
                "dev-clean",
                "--dest",
                str(tmp_path / "dl"),
                "--checksum-file",
                str(tmp_path / "sums.txt"),
            ],
            "sums.txt",
        ),  # fmt: skip
        "spkr.stream.data_only": (
            ["--shards", str(run["shards"]), "--workers", "2", "--batch-size", "4"],
            "checksum mismatch",
        ),  # fmt: skip
        "spkr.train": (
            ["--shards", str(bad), "--config", str(run["config"]), "--out", str(tmp_path / "t")],
            "manifest",
        ),  # fmt: skip
    }


CLIS = ["spkr.train", "spkr.evaluate", "spkr.predict", "spkr.enroll", "spkr.tools.chart_losses",
        "spkr.tools.chart_dataset", "spkr.tools.shard", "spkr.tools.download", "spkr.stream.data_only"]  # fmt: skip


@pytest.mark.parametrize("cli", CLIS)
def test_every_cli_prints_one_line_and_exits_2(run, tmp_path, capfd, cli):
    import importlib

    argv, says = _cli_cases(run, tmp_path)[cli]
    assert importlib.import_module(cli).main(argv) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    [line] = error_lines(err)
    prog = cli.rsplit(".", 1)[-1]
    assert line.startswith(f"[{prog}] error: ") and says in line, line


def test_every_cli_is_covered():
    """Each ``def main`` of the package is in :data:`CLIS` (spkr.run.cli holds the convention)."""
    mains = {
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for p in (REPO / "spkr").rglob("*.py")
        if "\ndef main(" in p.read_text()
    }
    assert mains == set(CLIS)


# --------------------------------------------------------------------------- torchrun, one rank fails


def _rank1_only_key(shards: Path) -> str:
    """A train key that rank 1 reads in epoch 0 of a 2-rank run (seed 0, batch 4) and rank 0 never."""
    ranks = [
        {
            k
            for b in SpeakerLoader(str(shards), "train", 4, rank=r, world_size=2, normalize=False)
            for k in b["keys"]
        }
        for r in (0, 1)
    ]
    return sorted(ranks[1] - ranks[0])[len(ranks[1]) // 2]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [0, 2])
def test_torchrun_one_rank_fails_both_exit_with_one_line(tmp_path, workers):
    shards = make_shards(tmp_path / "s", splits={"train": [16, 16], "valid": [4], "test": [4]}, n_mels=16, n_classes=3)  # fmt: skip
    key = _rank1_only_key(shards)
    info = Manifest.load(str(shards)).split("train")
    s = next(j for j, sh in enumerate(info.shards) if key in sh.keys)
    corrupt_sample(shards, "train", s, info.shards[s].keys.index(key))
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_RUN_MODEL)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "spkr.train", "--shards", str(shards), "--config", str(cfg), "--out", str(tmp_path / "r"),
        "--no-progress", "--no-compile", "--dtype", "fp32", "--epochs", "2", "--batch-size", "4",
        "--crop-frames", "0", "--num-workers", str(workers), "--verify-pairs", "0",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=200)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert f'File "{REPO / "spkr"}' not in out, out  # no traceback through spkr's code on any rank
    mine = [line for line in error_lines(out) if line.startswith("[train] error: ")]
    name = re.escape(info.shards[s].name)
    failed = rf"{name} \[{key}\] at byte \d+: checksum mismatch.*"
    assert re.fullmatch(r"\[train\] error: " + failed, mine[0]), mine
    assert all(
        re.fullmatch(r"\[train\] error: rank 1 failed, so rank 0 stopped: " + failed, x) for x in mine[1:]
    )
    assert len(mine) <= 2
    assert "exitcode  : 2" in out and "exitcode  : 1 " not in out  # each rank: 2, or torchrun's SIGTERM

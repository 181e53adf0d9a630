"""The training command as typed: ``python -m spkr.train --shards DIR`` (and under torchrun) needs no
``--out`` and no ``--config``; the default run directory, the default config per device, bundled config
names (also from an installed, non-editable wheel) and ``compile = "auto"``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from spkr.config import ConfigError, from_dict, load_toml, to_dict
from spkr.models.config import ModelConfig
from spkr.run import TrainError
from spkr.run.configs import (
    TrainConfig,
    bundled_configs,
    bundled_configs_dir,
    config_source,
    default_config,
    load_configs,
    resolve_compile,
)
from spkr.run.rundir import RUN_MARKER, decide_run_dir, shards_name
from spkr.train import main, parse_args

REPO = Path(__file__).resolve().parents[1]
BUNDLED = {"mamba-ssm", "mamba-torch", "mamba2-torch", "tiny", "tiny-aam", "tiny-transformer", "transformer"}
# Only flags that keep two steps of the default config quick on 2 CPU cores (never --out / --config).
FAST = ["--max-steps", "2", "--batch-size", "8", "--num-workers", "0", "--no-progress"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _snapshot(d: Path) -> dict[str, tuple[int, str]]:
    """{file: (mtime_ns, sha256)} of every file under ``d``."""
    return {
        str(p.relative_to(d)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A working directory holding ``shards/toy`` (48 train, 6 valid, 8 test samples, 80 mels)."""
    from tests.shardkit import make_shards

    cwd = tmp_path_factory.mktemp("cwd")
    make_shards(cwd / "shards" / "toy", splits={"train": [24, 24], "valid": [6], "test": [8]}, n_classes=4)
    return cwd


def _fresh_cwd(toy: Path, tmp_path: Path) -> Path:
    """A new working directory with the toy shards and no runs/."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "toy").symlink_to(toy / "shards" / "toy")
    return tmp_path


# --------------------------------------------------------------------------- the headline


@pytest.mark.slow
def test_headline_as_typed_default_run_dir_and_config(toy, tmp_path):
    """``python -m spkr.train --shards shards/toy`` twice: runs/toy with the device's default config,
    then runs/toy-2 without touching runs/toy; ``--resume`` continues the latest (runs/toy-2)."""
    cwd = _fresh_cwd(toy, tmp_path)
    cmd = [sys.executable, "-m", "spkr.train", "--shards", "shards/toy", *FAST]
    r1 = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr
    first = cwd / "runs" / "toy"
    assert "run dir runs/toy (default" in r1.stderr
    assert "config: mamba-torch (default for cpu" in r1.stderr  # no GPU here
    assert "compile off (auto: off on CPU" in r1.stderr
    assert (first / "last.pt").is_file() and (first / RUN_MARKER).is_file()
    cfg_row = next(r for r in _rows(first) if r["kind"] == "config")
    want = from_dict(ModelConfig, load_toml(REPO / "configs" / "mamba-torch.toml")["model"], "mamba-torch")
    assert cfg_row["model"] == to_dict(want)  # trained what configs/mamba-torch.toml describes
    assert cfg_row["train"]["compile"] == "auto" and cfg_row["compile"] is False
    assert cfg_row["train"]["epochs"] == load_toml(REPO / "configs" / "mamba-torch.toml")["train"]["epochs"]
    before = _snapshot(first)

    r2 = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr
    second = cwd / "runs" / "toy-2"
    assert "run dir runs/toy-2" in r2.stderr and "runs/toy already holds a run" in r2.stderr
    assert "resumed" not in r2.stderr
    assert (second / "last.pt").is_file() and _snapshot(first) == before
    assert sorted(p.name for p in (cwd / "runs").iterdir()) == ["toy", "toy-2"]

    # --resume without --out: the latest run of that name with a checkpoint, nothing new created
    os.chdir(cwd)
    try:
        before2 = _snapshot(second)
        assert main(["--shards", "shards/toy", "--resume", *FAST]) == 0
    finally:
        os.chdir(REPO)
    assert sorted(p.name for p in (cwd / "runs").iterdir()) == ["toy", "toy-2"]
    assert _snapshot(first) == before
    configs = [r for r in _rows(second) if r["kind"] == "config"]
    assert [c["resumed_step"] for c in configs] == [None, 2] and _snapshot(second) != before2


def test_config_names_resolve_from_any_cwd(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here: names come from the package
    assert set(bundled_configs()) == BUNDLED
    m, t = load_configs(parse_args(["--shards", "x", "--config", "tiny"]))
    assert (m.d_model, m.n_layers, t.batch_size) == (96, 2, 16)
    m, _ = load_configs(parse_args(["--shards", "x", "--config", "mamba2-torch"]))
    assert m.arch == "mamba2"
    assert (
        config_source(parse_args(["--shards", "x", "--config", "tiny.toml"]))[0] == bundled_configs()["tiny"]
    )
    # a file path still wins, relative to the cwd, even when it shares a bundled name
    Path("tiny").write_text('[model]\narch = "transformer"\n[train]\nepochs = 2\n')
    m, t = load_configs(parse_args(["--shards", "x", "--config", "tiny"]))
    assert (m.arch, t.epochs) == ("transformer", 2)
    # an unknown name: a usage error (exit 2) listing the bundled configs
    with pytest.raises(SystemExit) as e:
        parse_args(["--shards", "x", "--config", "mamba3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--config mamba3: no such file, and no bundled config of that name" in err
    assert (
        "bundled: mamba-ssm, mamba-torch, mamba2-torch, tiny-aam, tiny-transformer, tiny, transformer" in err
    )
    with pytest.raises(SystemExit):
        parse_args(["--shards", "x", "--config", "sub/missing.toml"])
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="bundled: "):
        from spkr.run.configs import resolve_config

        resolve_config("nope")


def test_default_config_follows_the_device():
    from spkr.models import mamba_ssm_available

    assert default_config("cpu")[0] == "mamba-torch"
    name, why = default_config("cuda")
    if mamba_ssm_available() is None:
        assert name == "mamba-ssm"
    else:
        assert name == "mamba-torch" and "without mamba_ssm" in why
    path, note = config_source(parse_args(["--shards", "x", "--device", "cpu"]))
    assert path == bundled_configs()["mamba-torch"] and note.startswith(
        "config: mamba-torch (default for cpu"
    )


def test_bundled_configs_are_the_repo_configs():
    """One set of files: the repo's configs/ is the package's spkr/configs/ (an edit there is what an
    editable install reads), never a copy that could drift."""
    assert (REPO / "configs").resolve() == bundled_configs_dir().resolve()
    assert {p.stem for p in (REPO / "configs").glob("*.toml")} == BUNDLED


def test_installed_wheel_ships_the_configs(tmp_path):
    """Built (setuptools, as pip does) and installed non-editable: ``--config tiny`` and the default
    config resolve inside the installed package, from another cwd."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "spkr", src / "spkr", ignore=shutil.ignore_patterns("__pycache__"))
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True
    )
    (whl,) = wheels.glob("spkr-*.whl")
    with zipfile.ZipFile(whl) as z:
        shipped = {n: z.read(n) for n in z.namelist() if n.startswith("spkr/configs/")}
    assert shipped == {f"spkr/configs/{p.name}": p.read_bytes() for p in (REPO / "configs").glob("*.toml")}
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(whl)], check=True)
    code = (
        "import spkr.train as t\n"
        "print(t.__file__)\n"
        "print(t.config_source(t.parse_args(['--shards', 'x', '--config', 'tiny']))[0])\n"
        "print(t.config_source(t.parse_args(['--shards', 'x', '--device', 'cpu']))[0])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))  # the installed copy, not the repo's
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [
        str(target / "spkr" / "train.py"),
        str(target / "spkr" / "configs" / "tiny.toml"),
        str(target / "spkr" / "configs" / "mamba-torch.toml"),
    ]


# --------------------------------------------------------------------------- compile = "auto"


def test_compile_auto(capsys):
    assert TrainConfig().compile == "auto"
    assert resolve_compile("auto", torch.device("cpu"))[0] is False
    assert resolve_compile("auto", torch.device("cpu"), 10_000)[0] is False  # the demo: ~10k samples
    assert resolve_compile("auto", torch.device("cpu"), 281_241 * 30)[0] is True  # LibriSpeech-960
    assert resolve_compile("auto", torch.device("cuda"))[0] is True
    assert resolve_compile(True, torch.device("cpu")) == (True, "as configured")
    assert resolve_compile(False, torch.device("cuda")) == (False, "as configured")
    for value in ("auto", True, False):
        assert from_dict(TrainConfig, {"compile": value}, "t").compile == value
    for bad in ("yes", 1, "on"):
        with pytest.raises(ConfigError, match="compile"):
            from_dict(TrainConfig, {"compile": bad}, "t")
    flags = {(): None, ("--compile",): True, ("--no-compile",): False, ("--compile", "auto"): "auto"}
    flags[("--compile", "false")] = False
    for extra, want in flags.items():
        assert parse_args(["--shards", "x", *extra, "--no-progress"]).compile == want
    with pytest.raises(SystemExit):
        parse_args(["--shards", "x", "--compile", "maybe"])
    assert "expected auto, true or false" in capsys.readouterr().err
    for name, path in bundled_configs().items():
        assert load_toml(path)["train"]["compile"] == "auto", name


# --------------------------------------------------------------------------- run directory decisions


def test_shards_name():
    assert shards_name("shards/train.960") == "train.960"
    assert shards_name("shards/train.960/") == "train.960"
    assert shards_name("s3://bucket/sets/train.960/") == "train.960"
    assert shards_name("s3://bucket") == "bucket"
    assert shards_name("https://host/a/b%20c") == "b_20c"
    assert shards_name("/") == "run"
    assert shards_name(".") == Path.cwd().name


def test_fresh_removes_the_previous_runs_outputs_only(tmp_path):
    """--fresh into a directory an earlier run wrote: its checkpoints, metrics and evaluations go (else
    chart_losses would chart the old epochs and rows as this run's), anything else stays; a torchrun
    restart of the --fresh job removes nothing (what is there is its own first attempt's)."""
    out = tmp_path / "run"
    out.mkdir()
    old = ["last.pt", "ckpt-epoch000.pt", "ckpt-epoch007.pt", "metrics.jsonl", "test.json",
           "eval-test-verify.json", "losses.json", "losses.png"]  # fmt: skip
    for name in old + ["notes.txt", "tiny.toml"]:
        (out / name).write_text("x")
    args = parse_args(["--shards", "x", "--out", str(out), "--fresh"])
    assert decide_run_dir(args, 1)[:2] == (out, False)  # a restart: nothing removed
    assert all((out / n).exists() for n in old)
    got, resume, notes = decide_run_dir(args, 0)
    assert (got, resume) == (out, False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "tiny.toml"]
    assert "--fresh: removed the previous run's" in notes[-1] and "and 2 more" in notes[-1]
    assert decide_run_dir(args, 0)[2] == [f"run dir {out}"]  # nothing left to remove: no note


def test_run_dir_decisions(tmp_path, monkeypatch):
    """Without --out: new or empty runs/<name>, else the next free runs/<name>-N; a torchrun restart
    returns to the directory its own job claimed; --resume takes the latest with a checkpoint. With
    --out: today's rules."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)

    def decide(*extra, restart=0):
        out, resume, _ = decide_run_dir(parse_args(["--shards", "s3://b/toy", *extra]), restart)
        return str(out), resume

    with pytest.raises(TrainError, match="--resume: no run directory"):
        decide("--resume")
    Path("runs/toy").mkdir(parents=True)  # an empty directory is free
    assert decide() == ("runs/toy", False)
    assert decide() == ("runs/toy-2", False)
    Path("runs/toy-3").write_text("a file, not a run")
    assert decide() == ("runs/toy-4", False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    assert decide() == ("runs/toy-5", False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    assert decide() == ("runs/toy-6", False)
    # restarts of job-a find runs/toy-5 again (resuming once it has a checkpoint); job-b's find toy-6
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    assert decide(restart=1) == ("runs/toy-5", False)
    Path("runs/toy-5/last.pt").write_bytes(b"")
    assert decide(restart=2) == ("runs/toy-5", True)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    assert decide(restart=1) == ("runs/toy-6", False)
    # a restart of a job whose first attempt claimed nothing decides afresh
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-c")
    assert decide(restart=1) == ("runs/toy-7", False)
    # torchrun's multi-node default run id "none": the agent (host:pid) must match too
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert decide() == ("runs/toy-8", False)
    assert decide(restart=1) == ("runs/toy-8", False)
    marker = json.loads(Path("runs/toy-8", RUN_MARKER).read_text())
    Path("runs/toy-8", RUN_MARKER).write_text(json.dumps({**marker, "agent": "otherhost:1"}))
    assert decide(restart=1) == ("runs/toy-9", False)
    # --resume: the latest run with a checkpoint, claimed for this job's restarts
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-d")
    Path("runs/toy-2/last.pt").write_bytes(b"")
    assert decide("--resume") == ("runs/toy-5", True)
    assert decide(restart=1) == ("runs/toy-5", True)
    # explicit --out: resume iff last.pt exists unless --fresh; restarts resume; --resume needs last.pt
    assert decide("--out", "elsewhere") == ("elsewhere", False)
    with pytest.raises(TrainError, match="no checkpoint at elsewhere/last.pt"):
        decide("--out", "elsewhere", "--resume")
    assert decide("--out", "runs/toy-2") == ("runs/toy-2", True)
    assert decide("--out", "runs/toy-2", "--fresh") == ("runs/toy-2", False)
    Path("runs/toy-2/last.pt").write_bytes(b"")  # --fresh removed it: the fresh run's first checkpoint
    assert decide("--out", "runs/toy-2", restart=1) == ("runs/toy-2", True)
    assert decide("--out", "elsewhere", restart=1) == ("elsewhere", False)
    assert not Path("elsewhere").exists()  # deciding never creates an explicit --out


def test_a_run_that_fails_at_start_frees_its_default_run_dir(tmp_path, monkeypatch, capsys):
    """Claimed, then the manifest is refused before anything was written: runs/bad is removed again,
    so the corrected command gets that name (not runs/bad-2)."""
    monkeypatch.chdir(tmp_path)
    Path("bad").mkdir()
    Path("bad/manifest.json").write_text("{}")
    assert main(["--shards", "bad", "--config", "tiny", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "run dir runs/bad (default" in err and "[train] error: " in err and "manifest" in err
    assert not Path("runs/bad").exists()
    Path("runs/bad").mkdir(parents=True)
    Path("runs/bad/notes.txt").write_text("not ours")
    assert main(["--shards", "bad", "--config", "tiny", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "run dir runs/bad-2" in err and "manifest" in err
    assert sorted(p.name for p in Path("runs").iterdir()) == ["bad"]
    assert [p.name for p in Path("runs/bad").iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------- torchrun


def _torchrun(*extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *extra,
            "-m", "spkr.train", "--shards", "shards/toy"]  # fmt: skip


@pytest.mark.slow
def test_torchrun_headline_two_ranks_agree_on_the_run_dir(toy, tmp_path):
    """Rank 0 decides and broadcasts: both ranks write runs/toy, rank 1 never opens runs/toy-2."""
    cwd = _fresh_cwd(toy, tmp_path)
    r = subprocess.run(_torchrun() + FAST, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (cwd / "runs").iterdir()) == ["toy"]
    assert "run dir runs/toy (default" in r.stderr and "config: mamba-torch (default for cpu" in r.stderr
    rows = _rows(cwd / "runs" / "toy")
    assert rows[0]["world_size"] == 2 and any(x["kind"] == "test" for x in rows)
    assert json.loads((cwd / "runs" / "toy" / RUN_MARKER).read_text())["run_id"]


@pytest.mark.slow
def test_torchrun_restart_resumes_the_default_run_dir(toy, tmp_path):
    """--max-restarts 1, a worker kill -9'ed after the first epoch's checkpoint: the restarted job
    resumes in the directory its first attempt chose (runs/toy-2 here, runs/toy being another run's).
    The bundled tiny config (by name) keeps it quick; the run directory is the point here."""
    import psutil

    cwd = _fresh_cwd(toy, tmp_path)
    (cwd / "runs" / "toy").mkdir(parents=True)
    (cwd / "runs" / "toy" / "metrics.jsonl").write_text("")  # someone else's run
    run = cwd / "runs" / "toy-2"
    cmd = _torchrun("--max-restarts", "1") + ["--config", "tiny", "--epochs", "3", "--batch-size", "4",
                                              "--num-workers", "0", "--no-progress"]  # fmt: skip
    log = tmp_path / "torchrun.log"
    killed = None
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None and killed is None:
                if (run / "ckpt-epoch000.pt").exists():
                    killed = max(w.pid for w in psutil.Process(proc.pid).children())
                    os.kill(killed, signal.SIGKILL)
                time.sleep(0.05)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert killed is not None, "the run finished before a worker could be killed:\n" + text
    assert rc == 0, text
    assert sorted(p.name for p in (cwd / "runs").iterdir()) == ["toy", "toy-2"]
    assert (cwd / "runs" / "toy" / "metrics.jsonl").read_text() == ""
    assert "run dir runs/toy-2 (torchrun restart 1 of the job that started it)" in text
    configs = [r for r in _rows(run) if r["kind"] == "config"]
    assert len(configs) == 2 and configs[0]["resumed_step"] is None
    assert configs[1]["resumed_step"] >= configs[0]["steps_per_epoch"]
    assert "resumed from runs/toy-2/last.pt (restart 1)" in text
    assert any(r["kind"] == "test" for r in _rows(run))


def test_data_only_runs_the_data_pipeline_with_the_train_settings(toy, tmp_path, capsys):
    """``--data-only``: spkr.stream.data_only with the config's [train] values and the command line's
    overrides (batch size, steps, workers, seed), and its ``--storage-options``; no run directory."""
    keys = tmp_path / "keys"
    argv = ["--shards", str(toy / "shards" / "toy"), "--config", "tiny", "--data-only", "--log-keys", str(keys),
            "--epochs", "1", "--max-steps", "3", "--batch-size", "5", "--num-workers", "0", "--crop-frames", "0",
            "--storage-options", "{}"]  # fmt: skip
    assert main(argv) == 0
    lines = [json.loads(line) for line in (keys / "rank0.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], len(r["keys"])) for r in lines] == [(0, 0, 5), (0, 1, 5), (0, 2, 5)]
    assert "epoch 0: 3 steps (plan 10)" in capsys.readouterr().out  # 48 samples / 5
    assert not (tmp_path / "runs").exists()

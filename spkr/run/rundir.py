"""The run directory: where a run writes, and whether it resumes.

    out, resume, notes = agree_on_run_dir(args, restart, env)   # rank 0 decides, every rank receives

``--out DIR``: that directory; resume with ``--resume`` (an error without ``DIR/last.pt``), after a
torchrun restart, or whenever ``DIR/last.pt`` exists, unless ``--fresh`` (which first removes an
earlier run's outputs there: :func:`clear_previous_run`). Without ``--out``:
``runs/<name of --shards>`` when new or empty, else the next free ``runs/<name>-N``, claimed by creating
``run.json`` exclusively (``{"shards", "run_id": TORCHELASTIC_RUN_ID, "agent": "host:ppid", "time"}``),
which is how a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) finds its first attempt's directory.
A claimed directory in which nothing but ``run.json`` was written is released when the run fails.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

from spkr import storage
from spkr.atomic import write_bytes
from spkr.run import TrainError
from spkr.run.distributed import DistEnv, broadcast

RUNS_ROOT = Path("runs")  # default run directories: runs/<name of --shards>[-N], relative to the cwd
RUN_MARKER = "run.json"  # written first into a default run directory: which job claimed it


def shards_name(shards: str) -> str:
    """The default run name of a shards location: its last path component (``shards/train.960`` ->
    ``train.960``, ``s3://bucket/sets/train.960/`` -> ``train.960``, ``s3://bucket`` -> ``bucket``)."""
    s = str(shards).rstrip("/") or str(shards)
    if storage.is_url(s):
        from urllib.parse import urlsplit

        u = urlsplit(s)
        name = u.path.rstrip("/").rsplit("/", 1)[-1] or u.netloc
    else:
        name = Path(os.path.abspath(s or ".")).name  # "." -> the directory's own name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def _job_identity() -> dict:
    """What a torchrun restart of this job has in common with its first attempt: the rendezvous run id
    (a fresh uuid per single-node torchrun) and the agent (host, pid) that spawns this worker."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return {"run_id": run_id, "agent": f"{socket.gethostname()}:{os.getppid()}" if run_id else None}


def _same_job(run_dir: Path, me: dict) -> bool:
    """Whether ``run_dir`` was claimed by an earlier attempt of this torchrun job."""
    if not me["run_id"]:
        return False
    try:
        marker = json.loads((run_dir / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("run_id") != me["run_id"]:
        return False
    # torchrun's default --rdzv-id on several nodes is the literal "none": then the agent must match too
    return me["run_id"] != "none" or marker.get("agent") == me["agent"]


def _runs_of(base: Path) -> list[Path]:
    """Existing run directories ``base``, ``base-2``, ``base-3`` ... in that order."""
    pattern = re.compile(re.escape(base.name) + r"(?:-(\d+))?")
    found = []
    if base.parent.is_dir():
        for p in base.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and p.is_dir() and (m.group(1) is None or int(m.group(1)) >= 2):
                found.append((int(m.group(1) or 1), p))
    return [p for _, p in sorted(found)]


def _claim(run_dir: Path, marker: dict, take_over: bool = False) -> bool:
    """Make ``run_dir`` this job's: True if it is new or empty (or ``take_over``) and no other process
    claimed it first (the marker is created exclusively)."""
    if run_dir.exists() and not take_over:
        if not run_dir.is_dir() or any(run_dir.iterdir()):
            return False
    run_dir.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(marker, indent=1) + "\n").encode()
    if take_over:
        write_bytes(run_dir / RUN_MARKER, data)
        return True
    try:
        with open(run_dir / RUN_MARKER, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


def decide_run_dir(args, restart: int) -> tuple[Path, bool, list[str]]:
    """(run directory, resume, log lines) as the module docstring says: ``--out`` as given, else a
    default directory (:func:`_default_run_dir`)."""
    if args.out is None:
        return _default_run_dir(args, restart)
    out = Path(args.out)
    last = out / "last.pt"
    if args.resume and not last.exists():
        raise TrainError(f"--resume: no checkpoint at {last}")
    resume = not args.fresh and (args.resume or restart > 0 or last.exists())
    if restart > 0 and not last.exists():
        resume = False  # restarted before the first checkpoint: start over
    notes = [f"run dir {out}"]
    if args.fresh and restart == 0:
        notes += clear_previous_run(out)
    return out, resume, notes


# What a run writes from its checkpoints: left from an earlier run in the same directory, they would be
# read as this run's (chart_losses charts every epoch checkpoint and metrics row it finds).
RUN_OUTPUTS = (
    "last.pt",
    "best.pt",
    "ckpt-epoch*.pt",
    "metrics.jsonl",
    "test.json",
    "eval-*.json",
    "losses.json",
    "losses.png",
)


def clear_previous_run(out: Path) -> list[str]:
    """``--fresh`` into a directory holding an earlier run: remove that run's outputs
    (:data:`RUN_OUTPUTS`, nothing else), so nothing of it is read as the new run's. -> log lines."""
    gone = sorted(p for pattern in RUN_OUTPUTS for p in out.glob(pattern) if p.is_file())
    for p in gone:
        p.unlink()
    if not gone:
        return []
    return [f"--fresh: removed the previous run's {', '.join(p.name for p in gone[:6])}"
            + (f" and {len(gone) - 6} more" if len(gone) > 6 else "")]  # fmt: skip


def _default_run_dir(args, restart: int) -> tuple[Path, bool, list[str]]:
    """Without ``--out``: the directory a torchrun restart's first attempt claimed, the latest run with
    a checkpoint for ``--resume``, else the first free ``runs/<name>[-N]`` (claimed here)."""
    base = RUNS_ROOT / shards_name(args.shards)
    me = _job_identity()
    marker = {"shards": str(args.shards), **me, "time": time.time()}
    runs = _runs_of(base)
    if restart > 0:
        for d in reversed(runs):
            if _same_job(d, me):
                resume = (d / "last.pt").exists()
                return d, resume, [f"run dir {d} (torchrun restart {restart} of the job that started it)"]
    if args.resume:
        with_ckpt = [d for d in runs if (d / "last.pt").exists()]
        if not with_ckpt:
            raise TrainError(
                f"--resume: no run directory {base} or {base}-N holds a checkpoint (last.pt); "
                "--out DIR names the run to resume"
            )
        out = with_ckpt[-1]
        _claim(out, marker, take_over=True)  # a torchrun restart of this job finds it again
        return out, True, [f"run dir {out} (--resume: the latest run of {base.name} with a checkpoint)"]
    n = 1
    while not _claim(out := base if n == 1 else base.with_name(f"{base.name}-{n}"), marker):
        n += 1
    args.run_claim = (out, marker)  # released by release_unused_run_dir if the run fails at start
    notes = [f"run dir {out} (default for --shards {args.shards}: runs/<its name>; --out DIR picks another)"]
    if out != base:
        notes.append(
            f"{base} already holds a run, so this one goes to {out} (--resume continues the latest run "
            "instead, --out DIR picks a directory)"
        )
    return out, False, notes


def release_unused_run_dir(args) -> None:
    """Remove the default run directory this process claimed if nothing but its own ``run.json`` was
    written (the run failed at start, e.g. on the manifest): the next attempt gets that name again."""
    claim = getattr(args, "run_claim", None)
    if claim is None:
        return
    out, marker = claim
    args.run_claim = None
    try:
        unused = [p.name for p in out.iterdir()] == [RUN_MARKER]
        if unused and json.loads((out / RUN_MARKER).read_text()) == marker:
            (out / RUN_MARKER).unlink()
            out.rmdir()
    except (OSError, ValueError):
        pass


def agree_on_run_dir(args, restart: int, env: DistEnv) -> tuple[Path, bool, list[str]]:
    """:func:`decide_run_dir` on rank 0, broadcast to every rank (they could race each other to the
    directory otherwise); an error there is raised on every rank."""
    decision = None
    if env.master:
        try:
            out, resume, notes = decide_run_dir(args, restart)
            decision = (str(out), resume, notes, None)
        except TrainError as e:
            decision = (None, False, [], str(e))
        except OSError as e:
            decision = (None, False, [], f"run directory: {e}")
    out, resume, notes, error = broadcast(decision, env)
    if error is not None:
        raise TrainError(error)
    return Path(out), resume, notes

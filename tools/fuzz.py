"""A seeded fuzzer of everything spkr reads from files: each case mutates one file of a real fixture
(bit flips, truncation, inserted / deleted / overwritten bytes, swapped JSON and TOML field types,
huge, negative and NaN numbers, deep nesting, duplicate and renamed keys) and reads it back the way spkr does. A read
must either return exactly what it returned for the unmutated files (the mutation hit bytes nothing
reads) or raise one of spkr's documented errors (:class:`spkr.errors.SpkrError`, or argparse's usage
error for a JSON option): never another exception, never a silently different result, never more
than :data:`MEMORY_BOUND` bytes allocated by the read.

    python tools/fuzz.py --cases 10000 [--seed 0] [--targets manifest_v3,tar]

prints cases run, undocumented exceptions, silent changes, reads over the memory bound, the peak
memory one read allocated (tracemalloc: Python and numpy allocations) and the process's peak RSS,
and the wall time; each finding with its target, mutation and error. Deterministic by seed: case
``i`` of target ``t`` draws from ``random.Random(f"{seed}/{t}/{i}")``. tests/test_fuzz.py runs a
few hundred cases of each target in CI.

Targets (:data:`TARGETS`): ``manifest_v2`` (per-sample lists inline), ``manifest_v3`` and ``index``
(its index files), ``sidecar`` (a shard's ``.tar.json`` as the manifest merge reads it), ``tar``
(headers and members, read through mmap and streamed), ``checkpoint``, ``trials``, ``gallery``,
``config`` (a model TOML) and ``json_option`` (``--feature-config``). ``integrity`` targets are
covered by a digest or checksum, so a different result is a silent change; a sidecar is not (what it
says about its shard is checked against the tar on every read), nor are the user-written trial
lists, configs and JSON options (a different value that passes every check is the user's to write).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from spkr.errors import SpkrError  # noqa: E402

MEMORY_BOUND = 64 << 20  # bytes one read may allocate; the fixtures' files are a few kB each
N_MELS = 8


# --------------------------------------------------------------------------- what a read returns


def canonical(value):
    """A comparable, printable form of what a read returned (arrays and tensors by dtype, shape and
    bytes; mappings by sorted key)."""
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy() if value.dtype != torch.bfloat16 else value.float().numpy()
    if isinstance(value, np.ndarray):
        return ("ndarray", str(value.dtype), value.shape, value.tobytes())
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if hasattr(value, "tolist"):
        return canonical(value.tolist())
    return value


def read_manifest(shards: Path):
    """Every field of the manifest but its ``digest``, each split's shard entries, the dataset_id.

    The ``digest`` is what the load verifies against, not something a consumer reads: a mutation
    that deletes it reads the original content, unverified, which is how a shard set written before
    the digest loads (by design), and counts as the same result. A mutation that renames it (a flipped
    bit in the key) leaves an unknown field beside the content: a different result, unless refused."""
    from spkr.shards.format import Manifest
    from spkr.shards.schema import DIGEST

    m = Manifest.load(str(shards))
    data = {k: v for k, v in m.data.items() if k not in ("splits", DIGEST)}
    splits = {
        name: (
            {k: v for k, v in m.data["splits"][name].items() if k != "shards"},
            [s.to_dict() for s in m.split(name).shards],
        )
        for name in m.split_names
    }
    return canonical({"data": data, "splits": splits, "dataset_id": m.dataset_id})


def read_sidecar(shards: Path):
    """What the manifest merge takes from a sidecar (:func:`spkr.shards.writer.merge_manifest`);
    None: the shard counts as not complete and is written again."""
    from spkr.shards.format import ShardInfo
    from spkr.shards.plan import ShardJob
    from spkr.shards.stats import RunningStats
    from spkr.shards.writer import read_sidecar as read

    job = ShardJob("train", 0, [], [])
    side = read(str(shards), job)
    if side is None:
        return None
    where = job.name + ".json"
    info = ShardInfo.from_dict(side, where)
    stats = RunningStats.from_dict(side["stats"], where).summary() if side.get("stats") else None
    return canonical({"info": info.to_dict(), "stats": stats})


def read_tar(shards: Path):
    """Every train sample, through mmap and streamed; the two must agree."""
    from spkr.shards.format import Manifest
    from spkr.stream.reader import ShardReader

    m = Manifest.load(str(shards))
    out = []
    for use_mmap in (True, False):
        reader = ShardReader(str(shards), n_mels=N_MELS, use_mmap=use_mmap, retries=0)
        try:
            recs = [r for s in m.split("train").shards for r in reader.read_shard(s)]
        finally:
            reader.close()
        out.append([(r.key, r.label, canonical(np.asarray(r.feats))) for r in recs])
    if out[0] != out[1]:
        return ["mmap and streamed reads differ", out]
    return out[0]


def read_checkpoint(path: Path):
    from spkr.checkpoint import load

    return canonical(load(path))


def read_trials(path: Path):
    from spkr.shards.trials import read_trials as read

    t = read(path)
    return canonical([t.target, list(t.enroll), list(t.test)])


def read_gallery(path: Path):
    from spkr.gallery import Gallery

    g = Gallery.load(path)
    return canonical(g.to_bytes())


def read_config(path: Path):
    from spkr.config import from_dict, load_toml
    from spkr.models.config import ModelConfig

    return canonical(vars(from_dict(ModelConfig, load_toml(path).get("model"), str(path))))


def read_json_option(path: Path):
    """``--feature-config`` as the shard tool takes it: argparse's type, then the FeatureConfig."""
    from spkr.config import json_object
    from spkr.features import FeatureConfig

    given = json_object(path.read_text(errors="replace")) or {}
    return canonical(FeatureConfig.from_dict({**FeatureConfig().to_dict(), **given}).to_dict())


# --------------------------------------------------------------------------- fixtures


def build_fixtures(base: Path) -> Path:
    """Real files to mutate under ``base``: two shard sets (v3 with index files, v2 inline), a
    checkpoint, a trial list, a gallery, a model config and a JSON option."""
    from tests.runkit import TINY_MODEL, untrained_checkpoint
    from tests.shardkit import make_shards

    base.mkdir(parents=True, exist_ok=True)
    splits = {"train": [3, 2], "valid": [2]}
    make_shards(base / "v3", splits=splits, n_mels=N_MELS, n_classes=3, mean_frames=6, seed=1)
    make_shards(base / "v2", splits=splits, n_mels=N_MELS, n_classes=3, mean_frames=6, seed=1, inline=True)
    untrained_checkpoint(base / "ckpt.pt")
    (base / "trials.txt").write_text("1 a-0 b-0\n0 a-0 c-1\n1 c-1 c-2\n0 b-0 c-2\n")
    from spkr.gallery import Gallery

    g = Gallery("0" * 16, 4)
    g.enroll("alice", np.eye(4, dtype=np.float32)[:2])
    g.enroll("bob", np.eye(4, dtype=np.float32)[2:])
    g.save(base / "gallery.npz")
    (base / "model.toml").write_text(TINY_MODEL)
    (base / "option.json").write_text('{"n_mels": 40, "hop_length": 160, "top_db": 80.0}')
    return base


@dataclass(frozen=True)
class Target:
    """One kind of file: which file(s) of the fixture a case mutates, how spkr reads it, whether a
    different result is a silent change (``integrity``)."""

    name: str
    root: str  # the fixture copied for each case (a directory or a file under the base)
    files: Callable[[Path], list[Path]]  # the candidates to mutate, under the copy
    read: Callable[[Path], object]
    integrity: bool = True
    syntax: str | None = None  # "json" or "toml": structural mutations of that syntax too


def _shard_files(pattern: str) -> Callable[[Path], list[Path]]:
    return lambda root: sorted(root.glob(pattern))


TARGETS = {
    t.name: t
    for t in [
        Target("manifest_v2", "v2", _shard_files("manifest.json"), read_manifest, syntax="json"),
        Target("manifest_v3", "v3", _shard_files("manifest.json"), read_manifest, syntax="json"),
        Target("index", "v3", _shard_files("index/*"), read_manifest),
        Target("sidecar", "v3", _shard_files("train/shard-000000.tar.json"), read_sidecar, False, "json"),
        Target("tar", "v3", _shard_files("train/*.tar"), read_tar),
        Target("checkpoint", "ckpt.pt", lambda p: [p], read_checkpoint),
        Target("trials", "trials.txt", lambda p: [p], read_trials, False),
        Target("gallery", "gallery.npz", lambda p: [p], read_gallery),
        Target("config", "model.toml", lambda p: [p], read_config, False, "toml"),
        Target("json_option", "option.json", lambda p: [p], read_json_option, False, "json"),
    ]
}


# --------------------------------------------------------------------------- mutations


def _bytes_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    n = len(data)
    kind = rng.choice(["flip", "flip", "truncate", "delete", "insert", "overwrite", "zero", "append"])
    i = rng.randrange(max(n, 1))
    k = rng.choice([1, 2, 8, 64, 512, 4096])
    b = bytearray(data)
    if kind == "flip":
        for _ in range(rng.choice([1, 1, 2, 8])):
            j = rng.randrange(max(n, 1))
            if n:
                b[j] ^= 1 << rng.randrange(8)
        return "flip bits", bytes(b)
    if kind == "truncate":
        return f"truncate at {i}", bytes(b[:i])
    if kind == "delete":
        return f"delete {k} at {i}", bytes(b[:i] + b[i + k :])
    junk = bytes(rng.randrange(256) for _ in range(k))
    if kind == "insert":
        return f"insert {k} at {i}", bytes(b[:i]) + junk + bytes(b[i:])
    if kind == "overwrite":
        return f"overwrite {k} at {i}", bytes(b[:i]) + junk + bytes(b[i + k :])
    if kind == "zero":
        return f"zero {k} at {i}", bytes(b[:i]) + bytes(min(k, n - i)) + bytes(b[i + k :])
    return f"append {k}", bytes(b) + junk


_HOSTILE_VALUES = [
    10**30, 2**63, 2**64 + 1, -1, -(2**63) - 1, 0, 1e308, -0.0, 0.5, "NaN", "Infinity", "-Infinity",
    "", "40", "../x", "a b", "\u0000", None, True, [], {}, [1, [2]], {"a": 1},
]  # fmt: skip


def _nodes(value, path=()):
    """Every (path, value) of a JSON document."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:50]):
            yield from _nodes(v, path + (i,))


def _replace(doc, path, new):
    if not path:
        return new
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = new
    return doc


def _json_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """A structural mutation of a JSON document; NaN / Infinity written as Python's json does."""
    doc = json.loads(data)
    kind = rng.choice(["value", "value", "value", "delete", "rename", "add", "nest", "duplicate"])
    nodes = list(_nodes(doc))
    path, old = rng.choice(nodes)
    if kind == "nest":
        depth = rng.choice([64, 1000, 100_000])
        deep = "[" * depth + "1" + "]" * depth
        text = json.dumps(_replace(doc, path, "\x00DEEP\x00"), allow_nan=True)
        return f"nest {depth} at {list(path)}", text.replace('"\\u0000DEEP\\u0000"', deep).encode()
    if kind == "duplicate" and isinstance(old, dict) and old:
        key = rng.choice(list(old))
        value = rng.choice(_HOSTILE_VALUES)
        text = json.dumps(_replace(doc, path, {"\x00DUP\x00": 0, **old}), allow_nan=True)
        dup = json.dumps(key) + ": " + json.dumps(value, allow_nan=True)
        return f"duplicate key {key!r} at {list(path)}", text.replace('"\\u0000DUP\\u0000": 0', dup).encode()
    if kind == "delete" and path:
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        del parent[path[-1]]
        return f"delete {list(path)}", json.dumps(doc).encode()
    if kind == "rename" and isinstance(old, dict) and old:
        key = rng.choice(list(old))
        typo = key[:-1] + chr(ord(key[-1]) ^ 1) if key else "x"  # one flipped bit in its last character
        renamed = {typo if k == key else k: v for k, v in old.items()}
        return f"rename {key!r} to {typo!r} at {list(path)}", json.dumps(
            _replace(doc, path, renamed)
        ).encode()
    if kind == "add" and isinstance(old, dict):
        old["fuzz_" + str(rng.randrange(100))] = rng.choice(_HOSTILE_VALUES)
        return f"add a key at {list(path)}", json.dumps(doc).encode()
    new = rng.choice(_HOSTILE_VALUES)
    if isinstance(new, str) and new in ("NaN", "Infinity", "-Infinity") and rng.random() < 0.7:
        new = float(new.replace("Infinity", "inf"))
    text = json.dumps(_replace(doc, path, new), allow_nan=True)
    return f"set {list(path)} = {new!r}", text.encode()


_TOML_VALUES = [
    "nan", "inf", "-inf", "1e999", "99999999999999999999999", "-1", "0", "0.5", '"40"', '""', "true",
    "[]", "{}", "[1, [2]]", "1979-05-27", "[" * 100_000 + "1" + "]" * 100_000,
    "{a = " * 1000 + "1" + "}" * 1000,
]  # fmt: skip


def _toml_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """A structural mutation of a TOML document's ``key = value`` lines: another value (hostile types,
    NaN, huge numbers, deep nesting), a repeated key, a deleted line or an added key."""
    lines = data.decode().splitlines()
    keyed = [i for i, line in enumerate(lines) if " = " in line]
    i = rng.choice(keyed)
    key = lines[i].split(" = ", 1)[0]
    kind = rng.choice(["value", "value", "value", "duplicate", "delete", "add"])
    value = rng.choice(_TOML_VALUES)
    if kind == "duplicate":
        lines.insert(i + 1, f"{key} = {value}")
    elif kind == "delete":
        del lines[i]
    elif kind == "add":
        lines.insert(i + 1, f"fuzz_{rng.randrange(100)} = {value}")
    else:
        lines[i] = f"{key} = {value}"
    return f"{kind} {key!r}" + ("" if kind == "delete" else f" = {value[:20]}"), "\n".join(lines).encode()


_STRUCTURAL = {"json": _json_mutation, "toml": _toml_mutation}


def mutate(rng: random.Random, data: bytes, syntax: str | None) -> tuple[str, bytes]:
    """One mutation of ``data``: structural for a document of ``syntax`` (60 %), else of its bytes."""
    if syntax is not None and rng.random() < 0.6:
        try:
            return _STRUCTURAL[syntax](rng, data)
        except (ValueError, RecursionError):  # not parseable as that syntax: mutate its bytes
            pass
    return _bytes_mutation(rng, data)


# --------------------------------------------------------------------------- the run


@dataclass
class Report:
    """What a fuzz run found."""

    cases: int = 0
    same: int = 0
    refused: int = 0
    changed: int = 0  # a different result where no digest covers the file (user-written files)
    undocumented: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)
    memory: list[str] = field(default_factory=list)
    peak_bytes: int = 0  # the most one read allocated (tracemalloc)

    @property
    def findings(self) -> list[str]:
        return self.undocumented + self.silent + self.memory

    def merge(self, other: Report) -> None:
        for f in ("cases", "same", "refused", "changed"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.undocumented += other.undocumented
        self.silent += other.silent
        self.memory += other.memory
        self.peak_bytes = max(self.peak_bytes, other.peak_bytes)


def _traced(read: Callable[[Path], object], path: Path) -> tuple[object, BaseException | None, int]:
    tracemalloc.reset_peak()
    try:
        result, error = read(path), None
    except BaseException as e:  # noqa: BLE001 - every exception is classified
        if isinstance(e, KeyboardInterrupt):
            raise
        result, error = None, e
    return result, error, tracemalloc.get_traced_memory()[1]


def _documented(error: BaseException) -> bool:
    return isinstance(error, (SpkrError, argparse.ArgumentTypeError))


def fuzz_target(target: Target, base: Path, cases: int, seed: int = 0, start: int = 0) -> Report:
    """``cases`` cases of ``target`` (case numbers ``start`` ...) against the fixtures under ``base``."""
    report = Report()
    src = base / target.root
    expected = target.read(src)
    scratch = Path(tempfile.mkdtemp(prefix=f"fuzz-{target.name}-"))
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    try:
        for i in range(start, start + cases):
            rng = random.Random(f"{seed}/{target.name}/{i}")
            copy = scratch / f"case{i}" / src.name
            copy.parent.mkdir()
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, copy)
            victim = rng.choice(target.files(copy))
            syntax = target.syntax if victim.suffix == f".{target.syntax}" else None
            what, data = mutate(rng, victim.read_bytes(), syntax)
            victim.write_bytes(data)
            result, error, peak = _traced(target.read, copy)
            report.cases += 1
            report.peak_bytes = max(report.peak_bytes, peak)
            case = f"{target.name} #{i} ({victim.relative_to(copy.parent)}: {what})"
            if peak > MEMORY_BOUND:
                report.memory.append(f"{case}: allocated {peak / 2**20:.0f} MiB")
            if error is not None:
                if _documented(error):
                    report.refused += 1
                else:
                    report.undocumented.append(f"{case}: {type(error).__name__}: {str(error)[:300]}")
            elif result == expected:
                report.same += 1
            elif target.integrity:
                report.silent.append(f"{case}: read a different result without an error")
            else:
                report.changed += 1
            shutil.rmtree(copy.parent, ignore_errors=True)
    finally:
        if not started:
            tracemalloc.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/fuzz.py", description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=10_000, help="cases in all, shared by the targets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default=None, help="comma-separated (default: every target)")
    args = p.parse_args(argv)
    names = args.targets.split(",") if args.targets else list(TARGETS)
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        p.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    t0 = time.perf_counter()
    total = Report()
    with tempfile.TemporaryDirectory(prefix="fuzz-fixtures-") as tmp:
        base = build_fixtures(Path(tmp))
        for k, name in enumerate(names):
            n = args.cases // len(names) + (k < args.cases % len(names))
            r = fuzz_target(TARGETS[name], base, n, args.seed)
            print(
                f"{name}: {r.cases} cases: {r.same} same, {r.refused} refused, {r.changed} changed (no digest), "
                f"{len(r.undocumented)} undocumented, {len(r.silent)} silent, {len(r.memory)} over memory",
                flush=True,
            )
            total.merge(r)
    for line in total.findings:
        print("  " + line)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"cases run {total.cases}; undocumented exceptions {len(total.undocumented)}; silent changes "
        f"{len(total.silent)}; over the memory bound ({MEMORY_BOUND >> 20} MiB) {len(total.memory)}; peak "
        f"memory of one read {total.peak_bytes / 2**20:.1f} MiB (process RSS {rss / 2**20:.0f} MiB); "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return 1 if total.findings else 0


if __name__ == "__main__":
    sys.exit(main())

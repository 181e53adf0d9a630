"""Synthetic spkr shards for stream tests: ``make_shards(tmp, counts=[7, 11, 13])`` writes tar shards
with ``spkr.shards.writer.write_shard`` (random float16 features of chosen lengths) and a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_MELS = 80


def sample_frames(rng: np.random.Generator, n: int, mean: float = 60.0, sigma: float = 0.5, lo: int = 8):
    """Log-normal frame counts (LibriSpeech-like shape when mean ~ 1230)."""
    mu = np.log(mean) - sigma**2 / 2
    return np.maximum(lo, rng.lognormal(mu, sigma, n).astype(np.int64))


def make_shards(
    out: str | Path,
    counts=(7, 11, 13),
    *,
    splits: dict[str, list[int]] | None = None,
    n_mels: int = N_MELS,
    n_classes: int = 5,
    mean_frames: float = 60.0,
    sigma: float = 0.5,
    seed: int = 0,
    frames: list[list[int]] | None = None,
    inline: bool = False,
) -> Path:
    """Write ``<out>/<split>/shard-XXXXXX.tar`` (+ sidecars) and ``<out>/manifest.json`` (version 3,
    with ``<out>/index/``; ``inline``: version 2, per-sample lists in manifest.json).

    ``counts``: samples per train shard (``splits`` overrides: {split: counts}). Keys are
    ``<split>-<shard>-<i>`` (unique); feats are ``float16`` with values ``label + N(0, 1)`` so that
    tests can check normalisation. Returns ``out``.
    """
    from spkr.features import FeatureConfig
    from spkr.shards.codec import Sample
    from spkr.shards.schema import shard_name
    from spkr.shards.stats import RunningStats
    from spkr.shards.writer import write_shard

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = splits or {"train": list(counts)}
    cfg = FeatureConfig(n_mels=n_mels)
    infos_by_split, stats = {}, RunningStats(n_mels)
    for split, cnts in splits.items():
        infos = []
        for si, c in enumerate(cnts):
            fr = (
                frames[si]
                if frames is not None and split == "train"
                else sample_frames(rng, c, mean_frames, sigma)
            )
            samples = []
            for i in range(c):
                label = int(rng.integers(n_classes))
                feats = (label + rng.standard_normal((int(fr[i]), n_mels))).astype(np.float16)
                if split == "train":
                    stats.update(feats)
                key = f"{split}-{si:03d}-{i:04d}"
                samples.append(Sample(key, label, {"speaker": str(label), "frames": int(fr[i])}, feats))
            infos.append(write_shard(str(out), shard_name(split, si), samples))
        infos_by_split[split] = infos
    write_manifest(out, infos_by_split, cfg, n_classes, stats.summary(), inline=inline)
    return out


def write_manifest(
    out: str | Path, infos_by_split: dict, cfg, n_classes: int, stats: dict, *, inline: bool = False
) -> dict:
    """``<out>/manifest.json`` for these shards, assembled by the real writer (build_manifest) and
    written by it (version 3: + index files), or with ``inline`` as one JSON (version 2). Returns
    build_manifest's data (per-sample lists inline)."""
    from spkr.shards import writer

    data = writer.build_manifest(
        infos_by_split,
        cfg,
        [str(i) for i in range(n_classes)],
        [1.0] * n_classes,
        feature_backend="torch",
        corpus={"source": "synthetic", "subsets": [], "name": "synthetic"},
        stats=stats,
    )
    if inline:
        writer.write_bytes_atomic(str(Path(out) / "manifest.json"), json.dumps(data).encode())
    else:
        writer.write_manifest(str(out), data)
    return data


def all_keys(out: str | Path, split: str = "train") -> list[str]:
    from spkr.shards.format import Manifest

    return [k for s in Manifest.load(str(out)).split(split).shards for k in s.keys]


def npy_bytes(a: np.ndarray) -> bytes:
    from spkr.shards.codec import encode_npy

    return encode_npy(a)


def good_members(key: str, label: int, feats: np.ndarray) -> list[tuple[str, bytes]]:
    """The members the writer would write for this sample (``{"frames": n}`` as its JSON)."""
    from spkr.shards.codec import Sample, encode_sample

    return encode_sample(Sample(key, label, {"frames": int(feats.shape[0])}, feats))


def custom_shard(base: str | Path, name: str, samples: list[tuple[str, int, int, list[tuple[str, bytes]]]]):
    """A hand-made tar ``<base>/<name>`` whose samples are (key, label, frames, [(member, payload)...]),
    members written as given (to build corrupt shards) with the writer's tar headers; returns the
    matching ``ShardInfo``."""
    import io
    import tarfile

    from spkr.shards.codec import digest_tar, tar_member_info
    from spkr.shards.format import ShardInfo

    path = Path(base) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for _key, _label, _frames, members in samples:
            offsets.append(tf.offset)
            for mname, payload in members:
                tf.addfile(tar_member_info(mname, len(payload)), io.BytesIO(payload))
    sha256, size, checksums = digest_tar(str(path), offsets)
    return ShardInfo(
        name=name,
        num_samples=len(samples),
        bytes=size,
        sha256=sha256,
        keys=[s[0] for s in samples],
        frames=[s[2] for s in samples],
        labels=[s[1] for s in samples],
        offsets=offsets,
        checksums=checksums,
    )

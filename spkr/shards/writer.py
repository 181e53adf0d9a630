"""Write side: utterances -> log-mel features -> WebDataset tar shards + manifest (the tar layout
itself is :mod:`spkr.shards.codec`'s).

    plan_shards(...)               (spkr.shards.plan) the deterministic list of ShardJob
    run_jobs(jobs, ..., rank, world) each rank writes the jobs i with i % world == rank, in parallel
    write_shard(...)               one tar, written under a temporary name, then renamed; then its sidecar
    merge_manifest(...)            when every planned shard has a sidecar: the protocol's trial files,
                                   augment.jsonl, the index files, then manifest.json (each atomically)
    write_manifest(out, data)      the index files of build_manifest's data, then manifest.json (version 3)

Labels: per split, the index of the sample's speaker in that split's label space (the class list for
classification splits, the split's own speakers for a protocol's verification splits). With an
``AugmentConfig`` of K copies, the training split also holds copy k of every utterance under
``<key>~aug<k>`` (:func:`spkr.augment.augment` of its audio, labelled by
:func:`spkr.augment.copy_speaker`), planned interleaved with the originals; the copies' recipe identity
(:func:`spkr.augment.augment_identity`: config + noise/RIR file index) is part of those jobs' identity.

A shard is complete iff its sidecar exists and carries the plan hash of the job, so a re-run after a
crash (or with more ranks) skips complete shards and redoes the rest. The plan hash covers the job's
keys and labels *and* the run's identity (feature fingerprint, feature backend, seed, source, write
options): a shard written under another identity is never reused — the run stops with
:class:`ShardConflict` saying what differs, or rewrites it with ``overwrite=True``. Each sidecar (and
so the manifest) carries a checksum per sample (:func:`spkr.shards.codec.sample_checksum`). Features are stored as ``.npy``
(float16, time-major (frames, n_mels)) and only ever read back with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from spkr import atomic, storage
from spkr.augment import (
    AugmentConfig,
    AugmentError,
    AugmentSources,
    augment,
    augment_identity,
    description_json,
    known_contents,
    load_sources,
    remember_contents,
)
from spkr.config import ConfigError, check_fields, in_range
from spkr.corpus.librispeech import Utterance
from spkr.corpus.protocols import Protocol
from spkr.features import AudioError, FeatureConfig, LogMel, compute_logmel, load_audio, resolve_backend
from spkr.shards.checks import with_digest
from spkr.shards.codec import Sample, digest_tar, write_tar
from spkr.shards.format import Manifest, ShardInfo, dataset_extras, dataset_id, split_summary
from spkr.shards.index import index_files
from spkr.shards.plan import ShardJob
from spkr.shards.schema import (
    AUGMENT_NAME,
    COPY_SEPARATOR,
    FORMAT,
    INLINE_VERSION,
    MANIFEST_NAME,
    SAMPLE_CHECKSUM,
    SIDECAR_SUFFIX,
    ManifestError,
)
from spkr.shards.stats import RunningStats


class ShardConflict(ManifestError):
    """An existing shard (or manifest) in the output was written for another plan or identity."""


def _put_atomic(local_path: str, url: str, storage_options: dict | None) -> None:
    """Move a finished local file to its final place: rename locally, upload for URLs (an object
    store PUT is atomic: readers see the whole object or none)."""
    if storage.is_url(url):
        fs, path = storage.get_fs(url, storage_options)
        fs.put_file(local_path, path)
        os.unlink(local_path)
    else:
        os.makedirs(os.path.dirname(url) or ".", exist_ok=True)
        os.replace(local_path, url)


def write_bytes_atomic(
    url: str, payload: bytes, storage_options: dict | None = None, *, fsync: bool = True
) -> None:
    """Write a small file (sidecar, manifest) so it is either absent or complete. A sidecar skips the
    fsync: after a power loss an empty or torn sidecar does not parse and its shard is simply redone."""
    directory = os.path.dirname(url) if not storage.is_url(url) else None
    if directory:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = atomic.mkstemp(prefix=".tmp-", dir=directory or None)
    with os.fdopen(fd, "wb") as f:
        f.write(payload)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    _put_atomic(tmp, url, storage_options)


def write_shard(
    out: str,
    name: str,
    samples: Iterable[Sample],
    *,
    storage_options: dict | None = None,
    extra: dict | None = None,
) -> ShardInfo:
    """Write one shard ``<out>/<name>`` (+ sidecar ``<name>.json`` holding the ShardInfo and
    ``extra``). The tar is complete before it gets its final name; the sidecar comes last."""
    final = storage.join(out, name)
    local_dir = os.path.dirname(final) if not storage.is_url(out) else None
    if local_dir:
        os.makedirs(local_dir, exist_ok=True)
    fd, tmp = atomic.mkstemp(prefix=".tmp-", suffix=".tar", dir=local_dir or None)
    try:
        with os.fdopen(fd, "wb") as f:
            written, offsets = write_tar(f, samples)
            f.flush()
            os.fsync(f.fileno())
        digest, size, checksums = digest_tar(tmp, offsets)
        _put_atomic(tmp, final, storage_options)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    info = ShardInfo(
        name=name,
        num_samples=len(written),
        bytes=size,
        sha256=digest,
        keys=[s.key for s in written],
        frames=[int(s.feats.shape[0]) for s in written],
        labels=[int(s.label) for s in written],
        offsets=offsets,
        checksums=checksums,
    )
    sidecar = {**info.to_dict(), **(extra or {})}
    write_bytes_atomic(final + SIDECAR_SUFFIX, json.dumps(sidecar).encode(), storage_options, fsync=False)
    return info


# --------------------------------------------------------------------------- planning


# --------------------------------------------------------------------------- one shard job


@dataclass
class WriteOptions:
    on_error: str = "fail"  # "fail" | "skip"
    allow_resample: bool = False
    allow_downmix: bool = False
    min_seconds: float = 0.1
    require_transcript: bool = True
    feature_backend: str = "auto"
    overwrite: bool = False  # rewrite shards written for another plan/identity (else ShardConflict)
    augment: AugmentConfig | None = None  # the copies' recipe (jobs with copies need it)

    def __post_init__(self):
        """ConfigError ``<field>: <problem>`` for a wrong type, a non-finite or negative min_seconds, or
        an unknown on_error."""
        check_fields(self)
        in_range(self.min_seconds, "min_seconds", 0)
        if self.on_error not in ("fail", "skip"):
            raise ConfigError(f"on_error: must be 'fail' or 'skip', got {self.on_error!r}")


def run_identity(cfg: FeatureConfig, opts: WriteOptions, seed: int, source: str) -> dict:
    """Everything besides keys and labels that decides a shard's bytes (or which utterances it keeps)."""
    return {
        "feature_fingerprint": cfg.fingerprint(),
        "feature_config": cfg.to_dict(),
        "feature_backend": resolve_backend(opts.feature_backend),
        "seed": int(seed),
        "source": str(source),
        "write_options": {
            "allow_resample": opts.allow_resample,
            "allow_downmix": opts.allow_downmix,
            "min_seconds": opts.min_seconds,
            "require_transcript": opts.require_transcript,
        },
    }


@dataclass
class JobResult:
    name: str
    num_samples: int
    seconds: float
    skipped: list[dict] = field(default_factory=list)
    reused: bool = False


def augment_run_identity(aug: AugmentConfig, sample_rate: int) -> dict:
    """The copies' part of the run identity (:func:`spkr.augment.augment_identity`), from a fresh index
    of the noise/RIR folders (never a cached one: their contents are what it pins)."""
    return augment_identity(aug, AugmentSources(aug, sample_rate))


def job_sources(aug: AugmentConfig, sample_rate: int, fingerprint: str) -> AugmentSources:
    """The process's (cached) noise/RIR index, re-indexed when it is not the one the job was planned
    with; folders that changed since planning are an AugmentError (the copies would not be the plan's)."""
    sources = load_sources(aug, sample_rate)
    if sources.fingerprint() != fingerprint:
        load_sources.cache_clear()
        sources = load_sources(aug, sample_rate)
        if sources.fingerprint() != fingerprint:
            raise AugmentError(
                f"{aug.noise_dir} / {aug.rir_dir}: the noise/RIR files changed while shards were being "
                "written; re-run the shard tool"
            )
    return sources


def _load_wave(utt: Utterance, cfg: FeatureConfig, opts: WriteOptions):
    name = utt.path or f"{utt.subset}/{utt.key}"
    if opts.require_transcript and utt.transcript is None:
        raise AudioError(f"{name}: no transcript line for {utt.key}")
    return load_audio(
        utt.audio_bytes if utt.audio_bytes is not None else utt.path,
        cfg,
        name=name,
        allow_resample=opts.allow_resample,
        allow_downmix=opts.allow_downmix,
        min_seconds=max(opts.min_seconds, cfg.win_length / cfg.sample_rate),
    )


def _featurize(
    job: ShardJob, cfg: FeatureConfig, opts: WriteOptions, logmel: LogMel, skipped: list, tick: Callable
) -> Iterator[Sample]:
    """The job's samples; an augmented copy is :func:`spkr.augment.augment` of its utterance's audio
    and carries the description in its json meta (``"augment"``). ``tick`` counts source audio only."""
    sources = None
    for utt, label, k, key in zip(job.utterances, job.labels, job.copy_indices(), job.keys()):
        name = utt.path or f"{utt.subset}/{utt.key}"
        try:
            wave = _load_wave(utt, cfg, opts)
        except AudioError as e:
            if opts.on_error != "skip":
                raise
            skipped.append({"key": key, "path": name, "error": str(e)})
            tick(1, 0.0)
            continue
        meta = {"speaker": utt.speaker, "chapter": utt.chapter, "subset": utt.subset}
        if k is not None:
            sources = sources or job_sources(
                opts.augment, cfg.sample_rate, job.identity["augment"]["sources"]
            )
            wave, description = augment(wave, cfg.sample_rate, utt.key, k, opts.augment, sources)
            meta["augment"] = description
        feats = compute_logmel(wave, logmel)
        meta.update(duration=round(wave.shape[0] / cfg.sample_rate, 4), frames=int(feats.shape[0]))
        tick(1, wave.shape[0] / cfg.sample_rate if k is None else 0.0)
        yield Sample(key, label, meta, feats)


def read_sidecar(out: str, job: ShardJob, storage_options: dict | None = None) -> dict | None:
    """The sidecar of the job's shard as written (for whatever plan), or None when the shard is not
    complete (no sidecar, or one torn by a power loss)."""
    url = storage.join(out, job.name + SIDECAR_SUFFIX)
    try:  # remote: under the same retry policy as every read (storage.ReadFailed after its budget)
        side = json.loads(storage.read_bytes(url, storage_options))
    except (FileNotFoundError, ValueError, RecursionError):  # absent, torn by a power loss, or
        return None  # nested past what JSON parses: not complete (written again)
    return side if isinstance(side, dict) else None


def sidecar_matches(out: str, job: ShardJob, storage_options: dict | None = None) -> dict | None:
    """The sidecar of a complete shard written for exactly this job, else None."""
    side = read_sidecar(out, job, storage_options)
    return side if side is not None and side.get("plan_hash") == job.plan_hash() else None


def describe_conflict(side: dict, job: ShardJob) -> str:
    """What differs between the run that wrote an existing shard (its sidecar) and this job."""
    theirs, mine = side.get("identity"), job.identity
    if not isinstance(theirs, dict):
        return "by an older spkr that recorded no identity (feature config, seed, source)"
    diffs = []
    for k in sorted(set(theirs) | set(mine)):
        a, b = theirs.get(k), mine.get(k)
        if k == "feature_fingerprint" or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{k}.{kk}: {a.get(kk)!r} -> {b.get(kk)!r}"
                for kk in sorted(set(a) | set(b))
                if a.get(kk) != b.get(kk)
            ]
        else:
            diffs.append(f"{k}: {a!r} -> {b!r}")
    if diffs:
        return "under another identity (was -> now: " + "; ".join(diffs) + ")"
    return "for other utterances or labels (another corpus version, --subsets or label map)"


def find_conflicts(
    out: str, jobs: list[ShardJob], storage_options: dict | None = None
) -> list[tuple[ShardJob, dict]]:
    """(job, sidecar) for every job whose shard exists complete but was written for another plan."""
    found = []
    for job in jobs:
        side = read_sidecar(out, job, storage_options)
        if side is not None and side.get("plan_hash") != job.plan_hash():
            found.append((job, side))
    return found


def conflict_error(out: str, side: dict, job: ShardJob, n_conflicts: int = 1) -> ShardConflict:
    more = f" (and {n_conflicts - 1} more shards)" if n_conflicts > 1 else ""
    return ShardConflict(
        f"{storage.join(out, job.name)}: this shard exists but was written {describe_conflict(side, job)}"
        f"{more}; it is never reused. Write to a new --out, or pass --overwrite to rewrite the shards "
        "(the old manifest is removed first)"
    )


def write_job(
    out: str,
    job: ShardJob,
    cfg: FeatureConfig,
    opts: WriteOptions,
    *,
    storage_options: dict | None = None,
    tick: Callable[[int, float], None] = lambda n, s: None,
    logmel: LogMel | None = None,
) -> JobResult:
    """Write one planned shard unless a complete one for the same plan exists. A complete shard of
    another plan raises ShardConflict (or is rewritten with ``opts.overwrite``)."""
    side = read_sidecar(out, job, storage_options)
    if side is not None:
        if side.get("plan_hash") == job.plan_hash():
            tick(len(job.utterances), 0.0)
            return JobResult(job.name, side["num_samples"], 0.0, side.get("skipped", []), reused=True)
        if not opts.overwrite:
            raise conflict_error(out, side, job)
    logmel = logmel or LogMel(cfg, backend=opts.feature_backend)
    skipped: list[dict] = []
    stats = RunningStats(cfg.n_mels) if job.split == "train" else None
    seconds = [0.0]

    descriptions: list[dict] = []

    def samples():
        for s in _featurize(job, cfg, opts, logmel, skipped, tick):
            if "augment" in s.meta:
                descriptions.append(s.meta["augment"])
            else:
                seconds[0] += s.meta["duration"]
            if stats is not None:
                stats.update(s.feats)
            yield s

    extra = {
        "split": job.split,
        "plan_hash": job.plan_hash(),
        "identity": job.identity,
        "skipped": skipped,
        "stats": None,
    }
    if job.copies is not None:
        extra["augment"] = descriptions  # the copies' descriptions, in shard order
    # The sidecar is serialised after the tar is written, so skipped/stats are filled in by then.
    info = write_shard(
        out, job.name, _Lazy(samples(), extra, stats), storage_options=storage_options, extra=extra
    )
    return JobResult(job.name, info.num_samples, seconds[0], skipped)


class _Lazy:
    """Iterates the samples, then puts the finished stats into the sidecar's extra dict."""

    def __init__(self, it, extra: dict, stats: RunningStats | None):
        self.it, self.extra, self.stats = it, extra, stats

    def __iter__(self):
        yield from self.it
        self.extra["stats"] = self.stats.to_dict() if self.stats is not None else None


# --------------------------------------------------------------------------- running and merging


def _worker_init(source_contents: dict):
    """A shard worker: one torch thread; the parent's noise/RIR file hashes (not read again)."""
    import torch

    torch.set_num_threads(1)
    remember_contents(source_contents)


def _run_job(args):
    out, job, cfg, opts, storage_options, queue = args
    last = [time.monotonic(), 0, 0.0]

    def tick(n, s):
        last[1] += n
        last[2] += s
        if queue is not None and (last[1] >= 16 or time.monotonic() - last[0] > 0.5):
            queue.put((last[1], last[2]))
            last[:] = [time.monotonic(), 0, 0.0]

    try:
        result = write_job(out, job, cfg, opts, storage_options=storage_options, tick=tick)
    finally:
        if queue is not None and last[1]:
            queue.put((last[1], last[2]))
    return result


def run_jobs(
    out: str,
    jobs: list[ShardJob],
    cfg: FeatureConfig,
    opts: WriteOptions,
    *,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 1,
    storage_options: dict | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> list[JobResult]:
    """Write this rank's share of the jobs (i % world_size == rank) with ``workers`` processes."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    mine = [j for i, j in enumerate(jobs) if i % world_size == rank]
    conflicts = find_conflicts(out, mine, storage_options)  # before any work: stop early, or clear
    if conflicts and not opts.overwrite:
        raise conflict_error(out, conflicts[0][1], conflicts[0][0], len(conflicts))
    if conflicts:  # the old manifest no longer describes what is on disk
        fs, path = storage.get_fs(storage.join(out, MANIFEST_NAME), storage_options)
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass
    progress = progress or (lambda n, s: None)
    if workers <= 1:
        logmel = LogMel(cfg, backend=opts.feature_backend)
        return [
            write_job(out, j, cfg, opts, storage_options=storage_options, tick=progress, logmel=logmel)
            for j in mine
        ]
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    queue = manager.Queue()
    results = []
    with ctx.Pool(workers, initializer=_worker_init, initargs=(known_contents(),)) as pool:
        pending = pool.imap_unordered(_run_job, [(out, j, cfg, opts, storage_options, queue) for j in mine])
        it = iter(pending)
        done = 0
        while done < len(mine):
            try:
                results.append(it.next(timeout=0.2))
                done += 1
            except mp.TimeoutError:
                pass
            while not queue.empty():
                progress(*queue.get())
        while not queue.empty():
            progress(*queue.get())
    manager.shutdown()
    return results


def build_manifest(
    splits: dict[str, list[ShardInfo]],
    cfg: FeatureConfig,
    labels: list[str],
    class_weights: list[float],
    *,
    feature_backend: str,
    corpus: dict,
    stats: dict,
    class_weight_scheme: str = "inverse_frequency_mean1",
    skipped: list[dict] | None = None,
    identity: dict | None = None,
    protocol: dict | None = None,
    augment: dict | None = None,
) -> dict:
    """The manifest's data for these shards (the one place its fields are assembled): ``stats`` is
    :meth:`RunningStats.summary` of the training split; ``identity`` the run's (run_identity);
    ``protocol`` ``Protocol.manifest_entry()``; ``augment`` the copies' entry (:func:`augment_entry`).
    The last two are stored only when given. The per-sample fields
    are inline (a version-2 manifest): :func:`write_manifest` writes them as index files. Its
    ``digest`` (:func:`spkr.shards.checks.manifest_digest`) covers every field."""
    data = {
        "format": FORMAT,
        "version": INLINE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset_id": dataset_id(
            cfg.fingerprint(),
            feature_backend,
            list(labels),
            {name: [k for s in shards for k in s.keys] for name, shards in splits.items()},
            dataset_extras(protocol, augment),
        ),
        "corpus": corpus,
        "identity": identity or {},
        "feature_config": cfg.to_dict(),
        "feature_fingerprint": cfg.fingerprint(),
        "feature_backend": feature_backend,
        "sample_checksum": SAMPLE_CHECKSUM,
        "labels": list(labels),
        "class_weights": list(class_weights),
        "class_weight_scheme": class_weight_scheme,
        "splits": {
            name: split_summary(shards, cfg.sample_rate, cfg.hop_length) for name, shards in splits.items()
        },
        "stats": {"split": "train", **stats},
        "skipped": list(skipped or []),
    }
    if protocol is not None:
        data["protocol"] = protocol
    if augment is not None:
        data["augment"] = augment
    return with_digest(data)


def augment_entry(cfg: AugmentConfig, identity: dict, split: str, payload: bytes, count: int) -> dict:
    """The manifest's ``augment`` object: which split has copies, how many per utterance, the recipe's
    identity (spkr.augment.augment_identity), the folders as given, and ``augment.jsonl``'s digest."""
    return {
        "split": split,
        "copies": cfg.copies,
        "identity": identity,
        "folders": {"noise_dir": cfg.noise_dir, "rir_dir": cfg.rir_dir},
        "path": AUGMENT_NAME,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "count": count,
    }


def _sidecar_descriptions(side: dict, job: ShardJob, out: str) -> list[dict]:
    """The copies' descriptions a sidecar lists, checked against its keys (one per copy, in order)."""
    copies = [k for k in side.get("keys", []) if isinstance(k, str) and COPY_SEPARATOR in k]
    found = side.get("augment")
    if job.copies is None:
        return []
    if type(found) is not list or [d.get("key") if isinstance(d, dict) else None for d in found] != copies:
        raise ManifestError(
            f"{storage.join(out, job.name + SIDECAR_SUFFIX)}: its 'augment' descriptions do not match its "
            "copies' keys; delete the shard and its sidecar and re-run"
        )
    return found


def merge_manifest(
    out: str,
    jobs: list[ShardJob],
    cfg: FeatureConfig,
    speakers: list[str],
    class_weights: list[float],
    corpus: dict,
    *,
    storage_options: dict | None = None,
    class_weight_scheme: str = "inverse_frequency_mean1",
    skipped: list[dict] | None = None,
    protocol: Protocol | None = None,
    augment: AugmentConfig | None = None,
) -> Manifest | None:
    """Write manifest.json if every planned shard is complete; return it, else None. First (each
    atomically) the protocol's trial files ``trials/<split>.txt`` and, when jobs have copies,
    ``augment.jsonl``: so every file the manifest lists exists once it does."""
    sidecars = []
    for job in jobs:
        side = sidecar_matches(out, job, storage_options)
        if side is None:
            return None
        sidecars.append((job, side))
    stats = RunningStats(cfg.n_mels)
    splits: dict[str, list[ShardInfo]] = {}
    skipped = list(skipped or [])  # utterances rejected before planning (metadata problems)
    descriptions: list[dict] = []
    for job, side in sidecars:
        splits.setdefault(job.split, []).append(ShardInfo.from_dict(side, job.name + SIDECAR_SUFFIX))
        skipped.extend(side.get("skipped") or [])
        descriptions.extend(_sidecar_descriptions(side, job, out))
        if side.get("stats"):
            stats.merge(RunningStats.from_dict(side["stats"], job.name + SIDECAR_SUFFIX))
    identity = jobs[0].identity if jobs else {}
    copied = next((j for j in jobs if j.copies is not None), None)
    files = dict(protocol.trial_files()) if protocol is not None else {}
    entry = None
    if copied is not None:
        files[AUGMENT_NAME] = "".join(description_json(d) + "\n" for d in descriptions)
        payload = files[AUGMENT_NAME].encode()
        entry = augment_entry(augment, copied.identity["augment"], copied.split, payload, len(descriptions))
    data = build_manifest(
        splits,
        cfg,
        speakers,
        class_weights,
        feature_backend=identity.get("feature_backend") or resolve_backend("auto"),
        corpus=corpus,
        stats=stats.summary(),
        class_weight_scheme=class_weight_scheme,
        skipped=skipped,
        identity=identity,
        protocol=protocol.manifest_entry() if protocol is not None else None,
        augment=entry,
    )
    Manifest(data, url=storage.join(out, MANIFEST_NAME))  # validated before anything is written
    for path, text in files.items():
        write_bytes_atomic(storage.join(out, path), text.encode(), storage_options)
    return write_manifest(out, data, storage_options)


def write_manifest(out: str, data: dict, storage_options: dict | None = None) -> Manifest:
    """Write build_manifest's ``data`` as a version-3 shard set's manifest: an old manifest.json is
    removed, then the per-split index files are written (each atomically), manifest.json last (so
    manifest.json existing means every file it lists is complete). Returns the manifest as loaded."""
    url = storage.join(out, MANIFEST_NAME)
    if storage.is_url(url):
        fs, path = storage.get_fs(url, storage_options)
        if fs.exists(path):
            fs.rm(path)
    elif os.path.exists(url):
        os.unlink(url)
    manifest_data, files = index_files(data)
    for path, payload in files.items():
        write_bytes_atomic(storage.join(out, path), payload, storage_options)
    write_bytes_atomic(url, json.dumps(manifest_data, indent=1).encode(), storage_options)
    return Manifest.load(out, storage_options)


__all__ = [
    "augment_entry",
    "augment_run_identity",
    "job_sources",
    "ShardConflict",
    "build_manifest",
    "run_identity",
    "find_conflicts",
    "WriteOptions",
    "JobResult",
    "write_shard",
    "write_bytes_atomic",
    "write_job",
    "run_jobs",
    "merge_manifest",
    "write_manifest",
]

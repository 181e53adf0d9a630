"""python -m spkr.tools.shard — decode a corpus once into log-mel WebDataset shards + a manifest.

    python -m spkr.tools.shard --source data/demo --subsets train.100 --out shards/demo
    python -m spkr.tools.shard --source /data/LibriSpeech --subsets train.960 --out shards/train.960 --workers 8
    python -m spkr.tools.shard --source openslr/librispeech_asr --hf --subsets train.100 --out s3://bucket/train.100
    torchrun --nnodes 4 --nproc_per_node 1 ... -m spkr.tools.shard ...   # split by rank (RANK/WORLD_SIZE)

The training combination's dev-clean and test-clean speakers are pooled with its train speakers and
re-split (spkr.corpus.labels.build_splits) so that valid/test hold only speakers seen in training.
Re-running skips complete shards; the manifest is written by whichever rank finishes last (or by
``--merge-only``). A shard already in ``--out`` that was written under another feature config, feature
backend, seed, source or write option is never reused: the run stops and says what differs (use a new
``--out``, or ``--overwrite`` to rewrite those shards).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from spkr.config import add_storage_options, json_object
from spkr.corpus.labels import build_splits, class_weights
from spkr.corpus.librispeech import (
    Utterance,
    find_speakers_txt,
    iter_hf_dataset,
    iter_openslr,
    read_speakers_txt,
    training_combination,
)
from spkr.features import AudioError, FeatureConfig
from spkr.manifest import ManifestError
from spkr.shard_writer import WriteOptions, merge_manifest, plan_shards, run_identity, run_jobs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spkr.tools.shard", description=__doc__.split("\n")[0])
    p.add_argument(
        "--source", required=True, help="LibriSpeech root (OpenSLR layout) or, with --hf, a HF dataset"
    )
    p.add_argument(
        "--hf", action="store_true", help="--source is a Hugging Face dataset (name, saved dir, parquet)"
    )
    p.add_argument("--hf-config", default=None, help="HF dataset config (e.g. clean/other/all)")
    p.add_argument(
        "--subsets", default="train.100", help="training combination: train.100, train.460, train.960 ..."
    )
    p.add_argument("--out", required=True, help="output directory or fsspec URL (s3://bucket/prefix)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (balanced to +-1)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes")
    p.add_argument("--rank", type=int, default=None, help="this machine's rank (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of ranks (default: $WORLD_SIZE or 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the re-split and the write-time shuffle")
    p.add_argument(
        "--on-error", choices=("fail", "skip"), default="fail", help="bad audio: stop, or skip+report"
    )
    p.add_argument("--resample", action="store_true", help="resample audio that is not at the sample rate")
    p.add_argument("--downmix", action="store_true", help="downmix multi-channel audio to mono")
    p.add_argument("--min-seconds", type=float, default=0.1, help="shorter audio is an error")
    p.add_argument("--allow-missing-transcript", action="store_true", help="audio without transcript is fine")
    p.add_argument("--feature-backend", choices=("auto", "torchaudio", "torch"), default="auto")
    p.add_argument("--n-mels", type=int, default=None, help="override the feature config's n_mels")
    p.add_argument(
        "--feature-config", type=json_object, default=None, help="JSON object of FeatureConfig overrides"
    )
    add_storage_options(p, help="JSON fsspec options for --out")
    p.add_argument("--merge-only", action="store_true", help="only write the manifest from complete shards")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="rewrite shards in --out that were written under another config/seed/source (else: stop)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def check_utterances(utts: list[Utterance], known_speakers: set[str] | None, on_error: str, skipped: list):
    """Metadata checks before any audio is read: the key must be <speaker>-<chapter>-<n> and match its
    directories, and the speaker must be listed in SPEAKERS.TXT when there is one."""
    good = []
    for u in utts:
        name = u.path or f"{u.subset}/{u.key}"
        problem = None
        if not u.key.startswith(f"{u.speaker}-{u.chapter}-"):
            problem = (
                f"{name}: utterance id {u.key!r} does not match speaker {u.speaker} / chapter {u.chapter}"
            )
        elif known_speakers is not None and u.speaker not in known_speakers:
            problem = f"{name}: unknown speaker {u.speaker} (not listed in SPEAKERS.TXT)"
        if problem is None:
            good.append(u)
        elif on_error == "skip":
            skipped.append({"key": u.key, "path": name, "error": problem})
        else:
            raise AudioError(problem)
    return good


def load_corpus(args, skipped: list) -> tuple[list[Utterance], list[Utterance], list[Utterance], list[str]]:
    train_subsets, dev, test = training_combination(args.subsets)
    known = None
    if not args.hf:
        speakers_txt = find_speakers_txt(args.source)
        known = set(read_speakers_txt(speakers_txt)) if speakers_txt else None

    def read(subsets):
        if args.hf:
            utts = [u for s in subsets for u in iter_hf_dataset(args.source, s, config=args.hf_config)]
        else:
            utts = list(iter_openslr(args.source, subsets, with_duration=False))
        return check_utterances(utts, known, args.on_error, skipped)

    return read(train_subsets), read([dev]), read([test]), train_subsets + [dev, test]


def make_progress(total: int, enabled: bool):
    """rich progress with utterances/s and audio-hours/s; returns (context, tick)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    state = {"n": 0, "sec": 0.0, "t0": time.monotonic()}
    progress = Progress(
        TextColumn("[bold]sharding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        disable=not enabled,
    )
    task = progress.add_task("shard", total=total, rate="")

    def tick(n: int, seconds: float):
        state["n"] += n
        state["sec"] += seconds
        dt = max(time.monotonic() - state["t0"], 1e-9)
        rate = f"{state['n'] / dt:.1f} utt/s, {state['sec'] / 3600 / dt * 3600:.2f} audio-h/h"
        progress.update(task, advance=n, rate=rate)

    return progress, tick, state


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    storage_options = args.storage_options
    overrides = dict(args.feature_config or {})
    if args.n_mels:
        overrides["n_mels"] = args.n_mels
    try:
        cfg = FeatureConfig.from_dict({**FeatureConfig().to_dict(), **overrides})
        pre_skipped: list[dict] = []
        train, dev, test, subsets = load_corpus(args, pre_skipped)
        if not train:
            raise ValueError(f"{args.source}: no training utterances found for {args.subsets}")
        splits = build_splits(train, dev, test, seed=args.seed)
        weights = class_weights(splits.train, splits.speakers)
        opts = WriteOptions(
            on_error=args.on_error,
            allow_resample=args.resample,
            allow_downmix=args.downmix,
            min_seconds=args.min_seconds,
            require_transcript=not args.allow_missing_transcript,
            feature_backend=args.feature_backend,
            overwrite=args.overwrite,
        )
        # as typed (not resolved): every rank of a multi-machine run must plan the same identity
        source = str(args.source).rstrip("/") or "/"
        jobs = plan_shards(
            {"train": splits.train, "valid": splits.valid, "test": splits.test},
            splits.speakers,
            args.shard_size,
            seed=args.seed,
            identity=run_identity(cfg, opts, args.seed, source),
        )
        corpus = {
            "source": str(args.source),
            "name": args.subsets,
            "subsets": subsets,
            "seed": args.seed,
            "num_speakers": len(splits.speakers),
            "num_utterances": {
                "train": len(splits.train),
                "valid": len(splits.valid),
                "test": len(splits.test),
            },
        }
        print(
            f"[shard] {corpus['num_utterances']} utterances, {len(splits.speakers)} speakers, "
            f"{len(jobs)} shards -> {args.out} (rank {rank}/{world}, {args.workers} workers)",
            file=sys.stderr,
        )
        t0 = time.monotonic()
        results = []
        if not args.merge_only:
            mine = sum(len(j.utterances) for i, j in enumerate(jobs) if i % world == rank)
            progress, tick, state = make_progress(mine, enabled=not args.no_progress and sys.stderr.isatty())
            with progress:
                results = run_jobs(
                    args.out,
                    jobs,
                    cfg,
                    opts,
                    rank=rank,
                    world_size=world,
                    workers=args.workers,
                    storage_options=storage_options,
                    progress=tick,
                )
            dt = time.monotonic() - t0
            written = [r for r in results if not r.reused]
            audio = sum(r.seconds for r in results)
            skipped = sum(len(r.skipped) for r in results)
            print(
                f"[shard] rank {rank}: {len(written)} shards written, {len(results) - len(written)} already "
                f"complete, {skipped} skipped utterances; {audio / 3600:.3f} h audio in {dt:.1f} s "
                f"({audio / max(dt, 1e-9):.0f}x realtime)",
                file=sys.stderr,
            )
        manifest = merge_manifest(
            args.out,
            jobs,
            cfg,
            splits.speakers,
            weights,
            corpus,
            storage_options=storage_options,
            skipped=pre_skipped,
        )
    except (AudioError, ManifestError, ValueError, FileNotFoundError) as e:
        print(f"[shard] error: {e}", file=sys.stderr)
        return 2
    if manifest is None:
        print(
            "[shard] other ranks' shards are not complete yet; the last rank writes the manifest",
            file=sys.stderr,
        )
        return 0
    sk = manifest.data["skipped"]
    print(
        f"[shard] manifest written: {manifest.url} "
        + ", ".join(f"{s}: {manifest.split(s).num_samples}" for s in manifest.split_names)
        + (f"; {len(sk)} skipped (listed in the manifest)" if sk else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

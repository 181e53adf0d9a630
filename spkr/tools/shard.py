"""python -m spkr.tools.shard — decode a corpus once into log-mel WebDataset shards + a manifest.

    python -m spkr.tools.shard --source data/demo --subsets train.100 --out shards/demo
    python -m spkr.tools.shard --source /data/LibriSpeech --subsets train.960 --out shards/train.960 --workers 8
    python -m spkr.tools.shard --source openslr/librispeech_asr --hf --subsets train.100 --out s3://bucket/train.100
    torchrun --nnodes 4 --nproc_per_node 1 ... -m spkr.tools.shard ...   # split by rank (RANK/WORLD_SIZE)

    python -m spkr.tools.shard --source data/demo --out shards/demo-open --protocol open
    python -m spkr.tools.shard --source data/demo --out shards/demo-aug --augment-copies 2 \
        --noise-dir data/noise-demo --rir-dir data/noise-demo/rirs

``--protocol`` (docs/protocols.md) decides the splits: ``closed`` (default) pools the training
combination's dev-clean and test-clean speakers with its train speakers and re-splits
(spkr.corpus.labels.build_splits) so that valid/test hold only speakers seen in training;
``closed-session`` holds out whole chapters (unseen sessions); ``open`` keeps dev-clean/test-clean
speakers unseen, in the verification splits ``valid-verify``/``test-verify``, whose trial lists are
written to ``<out>/trials/<split>.txt``. ``--augment-copies K`` adds K augmented copies
(spkr.augment: noise, music, babble, reverb, speed) of every training utterance, computed here once,
keyed ``<key>~aug<k>`` and described in ``<out>/augment.jsonl`` and in each copy's json meta.
Re-running skips complete shards; the manifest is written by whichever rank finishes last (or by
``--merge-only``). A shard already in ``--out`` that was written under another feature config, feature
backend, seed, source or write option is never reused: the run stops and says what differs (use a new
``--out``, or ``--overwrite`` to rewrite those shards).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass

from spkr import runtime
from spkr.augment import AugmentConfig, speed_classes
from spkr.config import add_storage_options, finite_number, json_object
from spkr.corpus.labels import class_weights
from spkr.corpus.librispeech import (
    Utterance,
    find_speakers_txt,
    iter_hf_dataset,
    iter_openslr,
    read_speakers_txt,
    training_combination,
)
from spkr.corpus.protocols import (
    DEFAULT_ENROLL_PER_SPEAKER,
    DEFAULT_TRIALS_PER_SPEAKER,
    DEFAULT_VALID_FRACTION,
    TRAIN,
    Protocol,
    make_protocol,
)
from spkr.errors import EXIT_ERROR, KNOWN_ERRORS, one_line
from spkr.features import AudioError, FeatureConfig
from spkr.shards.plan import plan_shards, with_copies
from spkr.shards.schema import CLOSED_SESSION, OPEN, PROTOCOLS, VERIFICATION, sample_key_problem
from spkr.shards.writer import (
    WriteOptions,
    augment_run_identity,
    merge_manifest,
    run_identity,
    run_jobs,
)

OPEN_OPTIONS = {  # option -> default; only with --protocol open
    "trials_per_speaker": DEFAULT_TRIALS_PER_SPEAKER,
    "enroll_per_speaker": DEFAULT_ENROLL_PER_SPEAKER,
    "valid_fraction": DEFAULT_VALID_FRACTION,
}
AUGMENT_OPTIONS = (
    "augment_kinds",
    "augment_speeds",
    "noise_dir",
    "rir_dir",
    "speed_classes",
    "augment_config",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spkr.tools.shard", description=__doc__.split("\n")[0])
    _add_source_options(p)
    _add_write_options(p)
    _add_protocol_options(p.add_argument_group("protocol (docs/protocols.md)"))
    _add_augment_options(p.add_argument_group("augmentation (spkr.augment; training split only)"))
    args = p.parse_args(argv)
    given = [o for o in OPEN_OPTIONS if getattr(args, o) is not None]
    if given and args.protocol != OPEN:
        p.error(f"--{given[0].replace('_', '-')} only applies to --protocol open")
    given = [o for o in AUGMENT_OPTIONS if getattr(args, o)]
    if given and args.augment_copies <= 0:
        p.error(f"--{given[0].replace('_', '-')} needs --augment-copies K (K >= 1)")
    return args


def _add_source_options(p: argparse.ArgumentParser) -> None:
    """Where the corpus is, which of it, where the shards go and who writes them."""
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


def _add_write_options(p: argparse.ArgumentParser) -> None:
    """How audio is read and featurized, and what happens to shards already in --out."""
    p.add_argument(
        "--on-error", choices=("fail", "skip"), default="fail", help="bad audio: stop, or skip+report"
    )
    p.add_argument("--resample", action="store_true", help="resample audio that is not at the sample rate")
    p.add_argument("--downmix", action="store_true", help="downmix multi-channel audio to mono")
    p.add_argument("--min-seconds", type=finite_number, default=0.1, help="shorter audio is an error")
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


def _add_protocol_options(g) -> None:
    g.add_argument("--protocol", choices=PROTOCOLS, default="closed", help="how utterances go to splits")
    g.add_argument("--trials-per-speaker", type=int, default=None, help="open: trials per speaker (200)")
    g.add_argument("--enroll-per-speaker", type=int, default=None, help="open: enrollment utterances (3)")
    g.add_argument(
        "--valid-fraction", type=finite_number, default=None, help="open: train share in valid (0.05)"
    )


def _add_augment_options(g) -> None:
    g.add_argument("--augment-copies", type=int, default=0, help="K augmented copies per training utterance")
    g.add_argument(
        "--augment-kinds", default=None, help="comma list of noise,music,babble,reverb,speed (a+b chains)"
    )
    g.add_argument(
        "--augment-speeds",
        type=speed_list,
        default=None,
        help="comma list of speed factors a speed copy draws from (default 0.9,1.1; e.g. 0.7,0.75,...,1.3 "
        "with --speed-classes for open-set training)",
    )
    g.add_argument("--noise-dir", default=None, help="MUSAN-style folder: noise/ music/ speech/")
    g.add_argument("--rir-dir", default=None, help="room impulse responses (default: synthetic RIRs)")
    g.add_argument("--speed-classes", action="store_true", help="speed copies are new classes <spk>@sp<f>")
    g.add_argument(
        "--augment-config", type=json_object, default=None, help="JSON object of AugmentConfig fields"
    )


def speed_list(text: str) -> list[float]:
    """``--augment-speeds``: comma-separated positive factors, e.g. ``0.9,1.1``."""
    try:
        factors = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of numbers: {text!r}") from None
    if not factors:
        raise argparse.ArgumentTypeError("empty list of speed factors")
    return factors


def augment_config(args) -> AugmentConfig | None:
    """The copies' recipe from --augment-* (flags override --augment-config); None without copies.
    Its seed is --seed unless --augment-config sets one."""
    if args.augment_copies <= 0:
        return None
    fields = {"seed": args.seed, **(args.augment_config or {}), "copies": args.augment_copies}
    if args.augment_kinds:
        fields["kinds"] = [k.strip() for k in args.augment_kinds.split(",") if k.strip()]
    if args.augment_speeds:
        fields["speeds"] = args.augment_speeds
    for name in ("noise_dir", "rir_dir"):
        if getattr(args, name):
            fields[name] = getattr(args, name)
    if args.speed_classes:
        fields["speed_classes"] = True
    return AugmentConfig.from_dict(fields, "--augment-config/--augment-* options")


def describe_protocol(protocol: Protocol) -> str:
    """One line on what the protocol held out (closed-session) or how many trials it wrote (open)."""
    if protocol.name == CLOSED_SESSION:
        st = protocol.stats
        req, held, single = st["requested"], st["held_out"], st["single_chapter"]["count"]
        return (
            f"closed-session: held out {sum(held.values())}/{sum(req.values())} utterances (valid "
            f"{held['valid']}, test {held['test']}); {single} single-chapter speakers train-only"
        )
    if protocol.name == OPEN:
        parts = [
            f"{n}: {len(sp.speakers)} speakers, {len(sp.trials)} trials"
            for n, sp in protocol.splits.items()
            if sp.kind == VERIFICATION
        ]
        return "open: " + "; ".join(parts)
    return "closed: valid/test re-split from the training speakers' utterances"


def check_utterances(utts: list[Utterance], known_speakers: set[str] | None, on_error: str, skipped: list):
    """Metadata checks before any audio is read: the key must be usable as a sample key (no whitespace:
    trial lists split on it), be <speaker>-<chapter>-<n> matching its directories, and the speaker must
    be listed in SPEAKERS.TXT when there is one."""
    good = []
    for u in utts:
        name = u.path or f"{u.subset}/{u.key}"
        problem = sample_key_problem(u.key)
        if problem is not None:
            problem = f"{name}: utterance id {u.key!r} {problem} (trial lists split keys on whitespace)"
        elif not u.key.startswith(f"{u.speaker}-{u.chapter}-"):
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


def label_spaces(protocol: Protocol, aug: AugmentConfig | None) -> tuple[list[str], dict[str, list[str]]]:
    """(the manifest's labels, {split: label space}): the protocol's classes plus, with speed classes,
    ``<spk>@sp<f>`` appended (existing ids unchanged) for every classification split; a verification
    split keeps its own speakers."""
    classes = list(protocol.classes) + (speed_classes(protocol.classes, aug) if aug is not None else [])
    spaces = protocol.label_spaces()
    for name, sp in protocol.splits.items():
        if sp.kind != VERIFICATION:
            spaces[name] = classes
    return classes, spaces


def training_weights(protocol: Protocol, aug: AugmentConfig | None, classes: list[str]) -> list[float]:
    """Class weights over every training sample, copies included (a copy counts as one sample of its
    class). A speed class that no copy falls into is an error saying what to change."""
    samples = with_copies(protocol.splits[TRAIN].utterances, aug)
    present = {s.speaker for s in samples}
    empty = [c for c in classes[len(protocol.classes) :] if c not in present]
    if empty:
        raise ValueError(
            f"--speed-classes: {len(empty)} of {len(classes) - len(protocol.classes)} speed classes get no "
            f"copy (e.g. {empty[:3]}): use more --augment-copies, fewer --augment-kinds or speeds, or drop "
            "--speed-classes"
        )
    return class_weights([dataclasses.replace(s.utterance, speaker=s.speaker) for s in samples], classes)


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


def write_options(args, aug: AugmentConfig | None) -> WriteOptions:
    return WriteOptions(
        on_error=args.on_error,
        allow_resample=args.resample,
        allow_downmix=args.downmix,
        min_seconds=args.min_seconds,
        require_transcript=not args.allow_missing_transcript,
        feature_backend=args.feature_backend,
        overwrite=args.overwrite,
        augment=aug,
    )


def corpus_entry(args, subsets: list[str], protocol: Protocol, jobs: list, aug: AugmentConfig | None) -> dict:
    """The manifest's ``corpus`` object: where from, which protocol, utterances (and samples) per split."""
    corpus = {
        "source": str(args.source),
        "name": args.subsets,
        "subsets": subsets,
        "seed": args.seed,
        "protocol": protocol.name,
        "num_speakers": len(protocol.classes),
        "num_utterances": {n: len(sp.utterances) for n, sp in protocol.splits.items()},
    }
    if aug is not None:
        corpus["num_samples"] = {
            n: sum(len(j.utterances) for j in jobs if j.split == n) for n in protocol.splits
        }
    return corpus


def write_shards(args, jobs: list, cfg: FeatureConfig, opts: WriteOptions, rank: int, world: int) -> None:
    """This rank's shards, with a progress bar and a summary line (x realtime of source audio)."""
    t0 = time.monotonic()
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
            storage_options=args.storage_options,
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


@dataclass
class ShardRun:
    """What one shard run writes: the protocol's splits, the copies' recipe, the label map and
    class weights, the planned jobs and the manifest's ``corpus`` entry."""

    cfg: FeatureConfig
    protocol: Protocol
    aug: AugmentConfig | None
    opts: WriteOptions
    classes: list[str]
    weights: list[float]
    jobs: list
    corpus: dict
    skipped: list[dict]  # utterances refused before planning (metadata problems)


def plan_run(args) -> ShardRun:
    """Read the corpus, build the protocol and the copies' recipe, and plan the shards."""
    overrides = dict(args.feature_config or {})
    if args.n_mels:
        overrides["n_mels"] = args.n_mels
    cfg = FeatureConfig.from_dict({**FeatureConfig().to_dict(), **overrides}, "--feature-config")
    skipped: list[dict] = []
    train, dev, test, subsets = load_corpus(args, skipped)
    if not train:
        raise ValueError(f"{args.source}: no training utterances found for {args.subsets}")
    options = {o: getattr(args, o) for o in OPEN_OPTIONS if getattr(args, o) is not None}
    protocol = make_protocol(args.protocol, train, dev, test, seed=args.seed, **options)
    aug = augment_config(args)
    opts = write_options(args, aug)
    classes, spaces = label_spaces(protocol, aug)
    weights = training_weights(protocol, aug, classes)
    # as typed (not resolved): every rank of a multi-machine run must plan the same identity
    source = str(args.source).rstrip("/") or "/"
    jobs = plan_shards(
        protocol.split_utterances(),
        spaces,
        args.shard_size,
        seed=args.seed,
        identity=run_identity(cfg, opts, args.seed, source),
        augment=aug,
        augment_split=TRAIN,
        augment_identity=augment_run_identity(aug, cfg.sample_rate) if aug else None,
    )
    corpus = corpus_entry(args, subsets, protocol, jobs, aug)
    return ShardRun(cfg, protocol, aug, opts, classes, weights, jobs, corpus, skipped)


def announce(run: ShardRun, args, rank: int, world: int) -> None:
    """What the run is about to write, on stderr."""
    print(f"[shard] {describe_protocol(run.protocol)}", file=sys.stderr)
    if run.aug is not None:
        print(
            f"[shard] augmentation: {run.aug.copies} copies of each of "
            f"{len(run.protocol.splits[TRAIN].utterances)} training utterances ({', '.join(run.aug.kinds)}); "
            f"{len(run.classes)} classes",
            file=sys.stderr,
        )
    print(
        f"[shard] {run.corpus['num_utterances']} utterances, {len(run.protocol.classes)} speakers, "
        f"{len(run.jobs)} shards -> {args.out} (rank {rank}/{world}, {args.workers} workers)",
        file=sys.stderr,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        env_rank, env_world = runtime.env_rank_world()
        rank = args.rank if args.rank is not None else env_rank
        world = args.world_size if args.world_size is not None else env_world
        run = plan_run(args)
        announce(run, args, rank, world)
        if not args.merge_only:
            write_shards(args, run.jobs, run.cfg, run.opts, rank, world)
        manifest = merge_manifest(
            args.out,
            run.jobs,
            run.cfg,
            run.classes,
            run.weights,
            run.corpus,
            storage_options=args.storage_options,
            skipped=run.skipped,
            protocol=run.protocol,
            augment=run.aug,
        )
    except KNOWN_ERRORS as e:
        print(one_line("shard", e), file=sys.stderr)
        return EXIT_ERROR
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

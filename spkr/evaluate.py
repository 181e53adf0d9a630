"""python -m spkr.evaluate — classification loss/accuracy and speaker verification (EER, minDCF).

    python -m spkr.evaluate --checkpoint runs/demo/last.pt --shards shards/demo [--split test]
    python -m spkr.evaluate --checkpoint runs/open/last.pt --shards shards/demo-open \
        [--split test-verify] [--as-norm [--cohort-per-speaker 3] [--cohort-size 0] [--top-k 300]]

``--split`` defaults to the split whose role is ``test`` (``test``, or ``test-verify`` on an ``open``
shard set, docs/protocols.md). The evaluation is :func:`spkr.run.evaluation.evaluate_split`, the one
training validates and tests with, on :func:`spkr.run.evaluation.eval_loader`'s batches normalised
with the checkpoint's statistics; each utterance is embedded once.

Classification split: cross-entropy (unweighted) and top-1 accuracy over every sample; verification
on trial pairs made from the labels (all pairs, or a seeded sample of target and non-target pairs when
there are more than ``--max-pairs``).

Verification split (labels are not class ids: no loss/accuracy): an embedding per utterance
(``model.embed``), the manifest's trial list (sha256 checked, every key must be an utterance of the
split), cosine scores -> equal error rate and normalised minDCF at p_target 0.01 and 0.05
(:mod:`spkr.scoring`); ``--as-norm`` adds the same metrics AS-norm'ed against a cohort of training
speakers' mean embeddings; ``identification``: top-1 accuracy of the split's test utterances against a
gallery of each speaker's mean enrollment embedding.

AS-norm cohort: bounded and representative, not the whole training split (281k utterances on
LibriSpeech 960 h): ``--cohort-per-speaker`` K (default 3) original utterances of every training
speaker (of the split of role ``train``), drawn with ``--seed`` round-robin over the speaker's chapters
and averaged to one embedding per speaker (a cohort of speaker means, as WeSpeaker's AS-norm(300));
``--cohort-size`` N > 0 keeps a seeded sample of N speakers. Only the selected utterances are read
(:func:`spkr.run.evaluation.embed_cohort`). The result records what made the cohort:
``verification.as_norm.cohort_selection`` (speakers, utterances, per_speaker, cohort_size, seed, the
selection rule, sha256 of the sorted keys, shards and bytes read).

Precision: ``--dtype auto`` (default) is training's policy, :func:`spkr.run.distributed.resolve_dtype`,
logged with its reason. Results go to ``--out`` (default ``<checkpoint dir>/eval-<split>.json``):
split, kind, dataset_id, same_dataset, device, backend, dtype, n, [loss, acc], [verification],
checkpoint, shards, step. Errors the user can fix: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spkr.run.cli import cli_main
from spkr.run.distributed import DTYPE_CHOICES, describe_dtype, dtype_name, resolve_dtype
from spkr.run.evaluation import (
    COHORT_PER_SPEAKER,
    EvalOptions,
    embed_cohort,
    eval_loader,
    eval_splits,
    evaluate_split,
    local_env,
)


def parse_args(argv=None) -> argparse.Namespace:
    from spkr.config import add_storage_options

    p = argparse.ArgumentParser(prog="python -m spkr.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    p.add_argument("--shards", default=None, help="shards directory or URL (default: the one trained on)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the one of role test)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--max-pairs", type=int, default=200_000, help="trial pairs cap (0 = all pairs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trial sample and of the AS-norm cohort")
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="autocast dtype (default auto: training's policy, bf16 only where the device has it natively)",
    )
    p.add_argument(
        "--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)"
    )
    p.add_argument("--no-verification", action="store_true", help="classification splits: only loss/accuracy")
    g = p.add_argument_group("verification splits (protocol open)")
    g.add_argument("--as-norm", action="store_true", help="also AS-norm'ed scores (training-speaker cohort)")
    g.add_argument(
        "--cohort-size",
        type=int,
        default=0,
        help="cohort speakers, a seeded sample (0 = every training speaker)",
    )
    g.add_argument("--top-k", type=int, default=300, help="AS-norm: top cohort scores per side")
    g.add_argument(
        "--cohort-per-speaker",
        type=int,
        default=COHORT_PER_SPEAKER,
        help=f"original training utterances embedded per cohort speaker, seeded, spread over its chapters "
        f"(default {COHORT_PER_SPEAKER})",
    )
    add_storage_options(p)
    p.add_argument("--out", default=None, help="JSON output (default: <checkpoint dir>/eval-<split>.json)")
    p.add_argument(
        "--allow-other-dataset",
        action="store_true",
        help="evaluate on shards that are not the checkpoint's training dataset (warns; default: refuse)",
    )
    return p.parse_args(argv)


@dataclass(frozen=True)
class AsNorm:
    """``--as-norm``: the cohort of training speakers the trial scores are normalised against."""

    per_speaker: int = COHORT_PER_SPEAKER  # original training utterances embedded per speaker
    size: int = 0  # speakers, a seeded sample (0 = every training speaker)


def evaluate_checkpoint(
    ckpt: dict,
    shards: str,
    split: str | None = None,
    opts: EvalOptions = EvalOptions(pairs=200_000),
    *,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    as_norm: AsNorm | None = None,
    allow_other_dataset: bool = False,
    warn=lambda msg: print(f"[evaluate] {msg}", file=sys.stderr),
) -> dict:
    """Metrics of a checkpoint on one split (None: the split of role ``test``) of its own training
    dataset (another one only with ``allow_other_dataset``, with a warning), normalised with the
    checkpoint's statistics: :func:`spkr.run.evaluation.evaluate_split` with ``opts`` (loss/accuracy
    + label-pair verification on a classification split, trial-list verification on a verification
    split, AS-norm'ed with ``as_norm``; module docstring). Runs on ``device`` (None: cuda when
    available, else cpu) with the Mamba backend for that device, whichever one the checkpoint was
    trained with (:func:`spkr.checkpoint.build_model_from_checkpoint`), under autocast
    ``opts.amp_dtype`` (None = fp32); the result names all three."""
    from spkr.checkpoint import build_model_from_checkpoint, check_dataset, resolve_device
    from spkr.shards.format import Manifest

    manifest = Manifest.load(shards, opts.storage_options)
    split = split or default_split(manifest)
    kind = manifest.split_kind(split)
    if as_norm and kind != "verification":
        raise ValueError(f"--as-norm scores trial lists: split '{split}' is a {kind} split")
    if as_norm and (as_norm.per_speaker < 1 or as_norm.size < 0 or opts.top_k < 2):
        raise ValueError("--cohort-per-speaker must be >= 1, --cohort-size >= 0, --top-k >= 2")
    loader = eval_loader(
        shards, split, batch_size, num_workers=num_workers, storage_options=opts.storage_options,
        stats=ckpt["stats"], manifest=manifest,
    )  # fmt: skip
    warning = check_dataset(ckpt, manifest, "the checkpoint", allow_other_dataset=allow_other_dataset)
    if warning:
        warn(warning)
    device = resolve_device(device)
    model, _ = build_model_from_checkpoint(ckpt, device)
    res = {"split": split, "kind": kind, "dataset_id": manifest.dataset_id, "same_dataset": warning is None}
    res.update(device=str(device), backend=model.backend_name(), dtype=dtype_name(opts.amp_dtype))
    cohort = how = None
    if as_norm:
        cohort, how = as_norm_cohort(model, shards, manifest, ckpt, device, opts, as_norm, batch_size)
    res.update(evaluate_split(model, loader, local_env(device), opts, cohort))
    if as_norm:
        res["verification"]["as_norm"]["cohort_selection"] = how
    return res


def as_norm_cohort(
    model, shards, manifest, ckpt, device, opts: EvalOptions, as_norm: AsNorm, batch_size: int
):
    """(cohort, how it was made) of :func:`spkr.run.evaluation.embed_cohort` over the split of role
    train (seeded with ``opts.seed``), timed and reported on stderr."""
    t0 = time.perf_counter()
    cohort, how = embed_cohort(
        model, shards, manifest, manifest.splits_with_role("train")[0], device, opts.amp_dtype,
        stats=ckpt["stats"], per_speaker=as_norm.per_speaker, seed=opts.seed, cohort_size=as_norm.size,
        batch_size=batch_size, storage_options=opts.storage_options,
    )  # fmt: skip
    how["seconds"] = round(time.perf_counter() - t0, 3)
    print(
        f"[evaluate] AS-norm cohort: {how['speakers']} speakers from {how['utterances']} of the "
        f"{how['utterances_available']} {how['split']} utterances ({how['shards_read']} of "
        f"{how['shards_total']} shards read, seed {opts.seed}) in {how['seconds']:.1f} s",
        file=sys.stderr,
    )
    return cohort, how


def default_split(manifest) -> str:
    """The split of role ``test`` (``test``; ``test-verify`` on an ``open`` shard set)."""
    split = eval_splits(manifest).test
    if split is None:
        raise ValueError(
            f"{manifest.url}: no split of role test (splits: {manifest.split_names}); give --split"
        )
    return split


def run(args) -> int:
    """The command: load, evaluate, write the JSON, print the summary."""
    from spkr.checkpoint import describe_backend, resolve_device
    from spkr.checkpoint import load as load_ckpt
    from spkr.run.metrics import eval_line

    device = resolve_device(args.device)
    amp_dtype, why = resolve_dtype(args.dtype, device)
    print(f"[evaluate] {describe_dtype(amp_dtype, why)}", file=sys.stderr)
    ckpt = load_ckpt(args.checkpoint)
    shards = args.shards or ckpt.get("shards")
    if not shards:
        raise ValueError("no --shards given and the checkpoint does not name its shards")
    opts = EvalOptions(
        amp_dtype, pairs=None if args.no_verification else args.max_pairs, seed=args.seed,
        storage_options=args.storage_options, top_k=args.top_k,
    )  # fmt: skip
    as_norm = AsNorm(args.cohort_per_speaker, args.cohort_size) if args.as_norm else None
    res = evaluate_checkpoint(
        ckpt, shards, args.split, opts, device=device, batch_size=args.batch_size,
        num_workers=args.num_workers, as_norm=as_norm, allow_other_dataset=args.allow_other_dataset,
    )  # fmt: skip
    res.update({"checkpoint": str(args.checkpoint), "shards": str(shards), "step": ckpt.get("step")})
    split = res["split"]
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval-{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    line = f"[evaluate] {eval_line(split, res)}"
    if "trials" in res.get("verification", {}):
        line += f" ({res['verification']['trials']} trials)"
    print(line)
    print(f"[evaluate] {describe_backend(ckpt, device)}")
    print(f"[evaluate] written {out}")
    return 0


def main(argv=None) -> int:
    return cli_main("evaluate", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation, shared by training (valid/test), ``spkr.evaluate`` and ``chart_losses``.

    splits = eval_splits(manifest)          # by role and kind: .valid, .valid_verify, .test, .every
    loader = eval_loader(shards, split, 64, num_workers=2, storage_options=opts,
                         rank=r, world=w, manifest=m, stats=ckpt["stats"])
    res = evaluate_split(model, loader, env, EvalOptions(amp_dtype, pairs=0), cohort=None)

:func:`evaluate_split` is the one evaluation of a split, dispatched by the split's kind in the
manifest: a classification split gets loss/accuracy (+ label-pair EER/minDCF with ``pairs``), a
verification split (protocol open, docs/protocols.md) its trial list's EER/minDCF. Its parts:

    sums = run_split(model, loader, device, amp_dtype, embeddings=False)   # one rank, no collectives
    res = summarise(sums)                                                  # {"loss", "acc", "n"}
    res = evaluate_distributed(model, loader, env, amp_dtype, embeddings)  # sums all-reduced once

Every evaluation loader is built by :func:`eval_loader`: whole utterances (no crops), the split's
fixed order, each sample exactly once over the ranks, normalised (with ``stats`` when given: the
checkpoint's training statistics; else the manifest's), float16 batches (half the shared-memory pages;
cast to float32 on the device), so training, evaluate and chart_losses measure the same batches.
Loss is unweighted cross-entropy (sum over samples), accuracy top-1. ``amp_dtype`` comes from
:func:`spkr.run.distributed.resolve_dtype`, the one precision policy.

Verification splits (labels index the split's own speakers, so no head/loss/accuracy:
``classify=False``)::

    emb = evaluate_distributed(model, loader, env, amp_dtype, embeddings=True, classify=False)
    cohort, how = embed_cohort(model, shards, manifest, "train", device, amp_dtype,
                               stats=ckpt["stats"], per_speaker=3, seed=0)  # AS-norm cohort
    res = verify_split(emb, manifest, "test-verify", cohort=cohort, top_k=300, calibrate=False)

:func:`verify_split` scores the manifest's trial list (sha256 checked, every key an embedded
utterance, each embedded once): cosine EER/minDCF(0.01, 0.05), ``as_norm`` with a cohort,
``identification`` (top-1 against enrollment means) and, with ``calibrate``, the decision
``thresholds`` calibrated on the trials scored as a gallery does (:func:`gallery_scores`).

The AS-norm cohort (:func:`embed_cohort`) is bounded: a seeded per-speaker-balanced subset of the
training split (:func:`cohort_selection`, :func:`spkr.scoring.select_cohort`), and only those
utterances are read (:func:`read_selected`: the selection as a stream bucketed by
:class:`spkr.stream.plan.EpochPlan`, one ranged read per run of consecutive selected samples of a
shard, checksummed as the loader does; shards without a selected sample are never opened).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from spkr.run.distributed import DistEnv, all_reduce_sums, autocast, gather
from spkr.scoring import (
    calibrate_thresholds,
    l2_normalize,
    score_trials,
    select_cohort,
    speaker_means,
    verification,
    verification_metrics,
)
from spkr.shards.trials import TrialList, check_trial_keys, check_trial_labels, parse_trials


@dataclass(frozen=True)
class EvalSplits:
    """The splits a manifest is evaluated on, by role and kind (docs/protocols.md)."""

    valid: str | None  # the classification split of role valid (training validates on it)
    valid_verify: str | None  # the verification split of role valid (protocol open: trials every epoch)
    test: str | None  # the split of role test (training's final test, spkr.evaluate's default)
    every: list[str]  # every split of role valid or test, manifest order (chart_losses' default)


def eval_splits(manifest) -> EvalSplits:
    """The manifest's evaluation splits: ``valid``, ``test`` without a protocol; ``valid``,
    ``valid-verify``, ``test-verify`` with protocol open."""
    valid = manifest.splits_with_role("valid")
    test = manifest.splits_with_role("test")
    return EvalSplits(
        valid=next((s for s in valid if manifest.split_kind(s) == "classification"), None),
        valid_verify=next((s for s in valid if manifest.split_kind(s) == "verification"), None),
        test=test[0] if test else None,
        every=[s for s in manifest.split_names if manifest.split_role(s) in ("valid", "test")],
    )


@dataclass(frozen=True)
class EvalOptions:
    """How :func:`evaluate_split` measures a split."""

    amp_dtype: torch.dtype | None = None  # autocast dtype (None: fp32)
    pairs: int | None = None  # classification: label-pair EER/minDCF over at most this many trial
    #   pairs (0: all pairs; None: none, loss/accuracy only)
    seed: int = 0  # of the label-pair sample
    storage_options: dict | None = None  # for the trial files
    top_k: int = 300  # AS-norm: top cohort scores per side
    calibrate: bool = False  # verification: also the decision thresholds (:func:`gallery_scores`)
    trial_errors: bool = False  # verification: an unusable trial list is an ``error`` entry, not a
    #   ValueError (training records it and carries on)


def local_env(device) -> DistEnv:
    """The DistEnv of one process on ``device`` (spkr.evaluate, chart_losses)."""
    return DistEnv(False, 0, 1, 0, torch.device(device))


def evaluate_split(model, loader, env: DistEnv, opts: EvalOptions, cohort: np.ndarray | None = None) -> dict:
    """The figures of the (unwrapped) model on ``loader``'s split, by the split's kind; every rank
    calls it, rank 0 gets the verification figures:

    - classification: ``{"loss", "acc", "n"}`` (:func:`evaluate_distributed`), with ``opts.pairs``
      also ``verification``: EER/minDCF of trial pairs made from the labels
      (:func:`spkr.scoring.verification`; a split without a target pair: an ``error`` entry);
    - verification: ``{"n", "verification"}``: every utterance embedded once, the split's trial list
      scored (:func:`verify_split`; AS-norm'ed against ``cohort`` when given)."""
    manifest, split = loader.manifest, loader.split
    loader.set_epoch(0)
    if manifest.split_kind(split) == "verification":
        emb = evaluate_distributed(model, loader, env, opts.amp_dtype, embeddings=True, classify=False)
        res = {"n": emb["n"]}
        if env.master:
            res["verification"] = _trial_verification(emb, manifest, split, opts, cohort)
        return res
    res = evaluate_distributed(model, loader, env, opts.amp_dtype, embeddings=opts.pairs is not None)
    if opts.pairs is not None:
        emb, labels = res.pop("emb"), res.pop("labels")
        res.pop("keys")
        if env.master:
            try:
                res["verification"] = verification(emb, labels, opts.pairs, opts.seed)
            except ValueError as e:  # e.g. one utterance per speaker: no target pair
                res["verification"] = {"error": str(e)}
    return res


def _trial_verification(emb: dict, manifest, split: str, opts: EvalOptions, cohort) -> dict:
    """:func:`verify_split` with ``opts``; with ``opts.trial_errors`` a ValueError is an ``error`` entry."""
    try:
        return verify_split(
            emb, manifest, split, storage_options=opts.storage_options, cohort=cohort,
            top_k=opts.top_k, calibrate=opts.calibrate,
        )  # fmt: skip
    except ValueError as e:
        if not opts.trial_errors:
            raise
        return {"split": split, "error": str(e)}


def eval_loader(
    shards: str,
    split: str,
    batch_size: int,
    *,
    num_workers: int = 0,
    storage_options: dict | None = None,
    rank: int = 0,
    world: int = 1,
    manifest=None,
    stats: dict | None = None,
):
    """The loader of one split for evaluation (see the module docstring). ``manifest``: an already
    loaded one (training shares its training loader's: one dataset, one normalisation)."""
    from spkr.stream.loader import SpeakerLoader

    return SpeakerLoader(
        shards, split, batch_size, train=False, rank=rank, world_size=world, num_workers=num_workers,
        crop_frames=None, normalize=True, dtype="float16", storage_options=storage_options,
        manifest=manifest, stats=stats,
    )  # fmt: skip


@torch.no_grad()
def run_split(
    model, loader, device, amp_dtype=None, embeddings: bool = False, classify: bool = True, keep=None
) -> dict:
    """One pass of an (unwrapped) model over a loader: sums of loss, correct, count, and with
    ``embeddings`` the (N, E) float32 embeddings, (N,) labels and the N sample ``keys``. ``classify``
    False (verification splits, whose labels are not class ids): no head, loss or accuracy.
    ``keep`` (a set of keys): only those samples are embedded (the others are read, not run).
    Does no collective ops (ranks may have different batch counts)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    embs, labs, keys = [], [], []
    try:
        for batch in loader:
            rows = None if keep is None else [n for n, k in enumerate(batch["keys"]) if k in keep]
            if rows is not None and not rows:
                continue
            mel = batch["mel"].to(device, non_blocking=True).float()
            lengths = batch["lengths"].to(device)
            labels = batch["labels"].to(device)
            batch_keys = list(batch["keys"])
            if rows is not None:
                mel, lengths, labels = mel[rows], lengths[rows], labels[rows]
                batch_keys = [batch_keys[n] for n in rows]
            with autocast(device, amp_dtype):
                if embeddings:
                    emb = model.embed(mel, lengths)
                if classify:  # eval: dropout off, no margin -> head(embed) is the same as forward
                    logits = model.head(emb) if embeddings else model(mel, lengths)
            if classify:
                logits = logits.float()
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
            count += int(labels.numel())
            if embeddings:
                embs.append(emb.float().cpu().numpy())
                labs.append(labels.cpu().numpy())
                keys += batch_keys
    finally:
        model.train(was_training)
    out = {"loss_sum": loss_sum, "correct": correct, "count": count}
    if embeddings:
        out.update(_stack(embs, labs))
        out["keys"] = keys
    return out


def _stack(embs: list, labs: list) -> dict:
    """{"emb": (N, E), "labels": (N,)} of per-batch (or per-rank) parts (empty ones skipped)."""
    embs = [e for e in embs if len(e)]
    labs = [lab for lab in labs if len(lab)]
    return {
        "emb": np.concatenate(embs) if embs else np.zeros((0, 0), np.float32),
        "labels": np.concatenate(labs) if labs else np.zeros(0, np.int64),
    }


def summarise(sums: dict) -> dict:
    """{"loss": mean cross-entropy, "acc": top-1 accuracy, "n": samples} of :func:`run_split` sums."""
    n = max(int(sums["count"]), 1)
    return {"loss": sums["loss_sum"] / n, "acc": sums["correct"] / n, "n": int(sums["count"])}


def evaluate_distributed(
    model, loader, env: DistEnv, amp_dtype, embeddings: bool = False, classify: bool = True, keep=None
) -> dict:
    """Each rank evaluates its own samples with the unwrapped model; sums are all-reduced once. With
    ``embeddings``, every rank's embeddings, labels and keys are gathered into ``"emb"`` / ``"labels"``
    / ``"keys"`` (every sample of the split exactly once, rank order). ``classify``, ``keep``: as
    :func:`run_split`."""
    sums = run_split(model, loader, env.device, amp_dtype, embeddings, classify, keep)
    totals = all_reduce_sums([sums["loss_sum"], sums["correct"], sums["count"]], env)
    res = summarise(dict(zip(("loss_sum", "correct", "count"), totals)))
    if not classify:
        res = {"n": res["n"]}
    if embeddings:
        parts = gather((sums["emb"], sums["labels"], sums["keys"]), env)
        res.update(_stack([p[0] for p in parts], [p[1] for p in parts]))
        res["keys"] = [k for p in parts for k in p[2]]
    return res


# --------------------------------------------------------------------------- verification splits


COHORT_PER_SPEAKER = 3  # training utterances embedded per speaker for the AS-norm cohort


def session_of(key: str) -> str:
    """A sample key's recording session: LibriSpeech ``<speaker>-<chapter>-<n>`` -> ``<speaker>-<chapter>``
    (a key of another form is its own session)."""
    parts = key.split("-")
    return "-".join(parts[:2]) if len(parts) == 3 else key


def cohort_selection(
    manifest, split: str, per_speaker: int = COHORT_PER_SPEAKER, seed: int = 0, cohort_size: int = 0
) -> tuple[set[str], dict]:
    """(keys, description) of the AS-norm cohort utterances of ``split`` (the training split): a seeded
    per-speaker-balanced subset of its original utterances (never an augmented ``~aug`` copy):
    :func:`spkr.scoring.select_cohort` over the split's labels, sessions from :func:`session_of`;
    ``cohort_size`` > 0 keeps a seeded sample of that many speakers. The description (recorded with
    the results) says what made the cohort: counts, seed, selection rule, sha256 of the sorted keys."""
    keys, labels = [], []
    for shard in manifest.split(split).shards:
        for key, label in zip(shard.keys, shard.labels):
            if "~aug" not in key:
                keys.append(key)
                labels.append(label)
    labels = np.asarray(labels, np.int64)
    picked = select_cohort(labels, per_speaker, seed, cohort_size, [session_of(k) for k in keys])
    chosen = sorted(keys[i] for i in picked)
    info = {
        "split": split,
        "speakers": int(len(np.unique(labels[picked]))),
        "utterances": len(chosen),
        "speakers_available": int(len(np.unique(labels))),
        "utterances_available": len(keys),
        "per_speaker": per_speaker,
        "cohort_size": cohort_size,
        "seed": seed,
        "selection": "seeded per-speaker-balanced: at most per_speaker original utterances of each "
        "speaker (round-robin over its chapters), cohort_size > 0: a seeded sample of speakers; "
        "one unit-norm mean embedding per speaker",
        "keys_sha256": hashlib.sha256("\n".join(chosen).encode()).hexdigest(),
    }
    return set(chosen), info


def read_selected(
    shards: str, manifest, split: str, keys: set[str], batch_size: int, *, stats: dict,
    storage_options: dict | None = None, dtype: str = "float16",
) -> Iterator[tuple[dict, dict]]:  # fmt: skip
    """(batch, read so far) of exactly the samples of ``split`` whose key is in ``keys``. Batches as
    :func:`eval_loader`'s (normalised with ``stats``, ``dtype``, ``{"mel", "lengths", "labels",
    "keys"}``) and bucketed by length the loader's way: the selection is the stream of an evaluation
    :class:`~spkr.stream.plan.EpochPlan` (one worker, a pool of 8 batches), walked window by window.
    Read with :class:`spkr.stream.reader.ShardReader` (checksums on): one byte range per run of
    consecutive selected samples, nothing else. "Read so far": ``{"shards_read", "samples",
    "bytes_read"}``; with the last batch, those of the whole pass."""
    from spkr.stream.loader import BATCH_DTYPES, Collate, normalisation
    from spkr.stream.plan import EpochPlan
    from spkr.stream.reader import ShardReader

    n_mels = manifest.feature_config.n_mels
    st = normalisation(manifest, n_mels, stats)
    collate = Collate(n_mels, mean=st["mean"], std=st["std"], dtype=BATCH_DTYPES[dtype])
    selected = []  # (shard, the indices of its selected samples); shards without one left out
    for shard in manifest.split(split).shards:
        rows = np.asarray([i for i, k in enumerate(shard.keys) if k in keys], np.int64)
        if len(rows):
            selected.append((shard, rows))
    plan = EpochPlan(
        [len(rows) for _, rows in selected], [np.asarray(s.frames)[rows] for s, rows in selected],
        batch_size=batch_size, train=False, bucket_window=8 * batch_size,
    )  # fmt: skip
    reader = ShardReader(shards, storage_options, n_mels=n_mels)
    read = {"shards_read": len(selected), "samples": 0, "bytes_read": 0}
    pool = {}  # stream position -> record, until its batch is made
    j = 0
    try:
        for window in plan.windows(0):
            positions = np.arange(window.start, window.stop, dtype=np.int64)
            which, nth = plan.locate(positions)
            sample = np.array([selected[w][1][n] for w, n in zip(which, nth)], np.int64)
            cuts = np.flatnonzero((np.diff(which) != 0) | (np.diff(sample) != 1)) + 1
            for w, run, at in zip(np.split(which, cuts), np.split(sample, cuts), np.split(positions, cuts)):
                a, b = int(run[0]), int(run[-1]) + 1
                for rec in reader.iter_range(selected[w[0]][0], a, b):
                    pool[int(at[0]) + rec.index - a] = rec
            for batch in window.batches:
                records = [pool.pop(int(p), None) for p in batch]
                read.update(samples=read["samples"] + len(records), bytes_read=reader.stats.bytes)
                yield collate(records, j, 0), dict(read)
                j += 1
    finally:
        reader.close()


@torch.no_grad()
def embed_cohort(
    model, shards: str, manifest, split: str, device, amp_dtype=None, *, stats: dict,
    per_speaker: int = COHORT_PER_SPEAKER, seed: int = 0, cohort_size: int = 0, batch_size: int = 64,
    storage_options: dict | None = None,
) -> tuple[np.ndarray, dict]:  # fmt: skip
    """((C, E) AS-norm cohort: unit-norm mean embeddings of C training speakers, description): the
    utterances of :func:`cohort_selection`, and only those, read (:func:`read_selected`) and embedded
    once by the (unwrapped) model, one process. The description gains ``shards_read`` and
    ``bytes_read`` (of the split's ``shards_total`` shards)."""
    keys, info = cohort_selection(manifest, split, per_speaker, seed, cohort_size)
    was_training = model.training
    model.eval()
    embs, labs = [], []
    read = {"shards_read": 0, "samples": 0, "bytes_read": 0}
    try:
        for batch, so_far in read_selected(shards, manifest, split, keys, batch_size, stats=stats,
                                           storage_options=storage_options):  # fmt: skip
            read = so_far
            mel = batch["mel"].to(device).float()
            with autocast(device, amp_dtype):
                emb = model.embed(mel, batch["lengths"].to(device))
            embs.append(emb.float().cpu().numpy())
            labs.append(batch["labels"].numpy())
    finally:
        model.train(was_training)
    got = _stack(embs, labs)
    if len(got["labels"]) != info["utterances"]:
        raise ValueError(
            f"AS-norm cohort: read {len(got['labels'])} of {info['utterances']} selected utterances"
        )
    _, means = speaker_means(got["emb"], got["labels"])
    info.update(read, shards_total=len(manifest.split(split).shards))
    return means, info


def load_trials(manifest, split: str, storage_options: dict | None = None) -> TrialList:
    """The trial list of verification split ``split``: sha256 checked by the manifest, parsed, every
    key a sample of the split and every target flag its two sides' speakers' (the split's labels)
    (else a TrialListError naming the file and line)."""
    trials = parse_trials(manifest.read_trials(split, storage_options), manifest.trials_url(split))
    shards = manifest.split(split).shards
    speaker_of = {k: lab for shard in shards for k, lab in zip(shard.keys, shard.labels)}
    check_trial_keys(trials, speaker_of)
    check_trial_labels(trials, speaker_of)
    return trials


def embeddings_by_key(res: dict, split: str) -> dict[str, np.ndarray]:
    """{key: embedding} of an embedding pass; a key seen twice is a ValueError (each utterance must be
    embedded exactly once over the ranks)."""
    by_key = dict(zip(res["keys"], res["emb"]))
    if len(by_key) != len(res["keys"]):
        raise ValueError(f"split '{split}': {len(res['keys']) - len(by_key)} utterance(s) embedded twice")
    return by_key


def gallery_scores(trials: TrialList, res: dict, enroll_keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(scores, targets) of the trials as a gallery scores them (spkr.gallery): the enroll side is the
    speaker's mean of its L2-normalised enrollment embeddings, so each distinct (enrolled speaker,
    test utterance) pair of the list is one trial. These calibrate spkr.predict's thresholds."""
    by_key = embeddings_by_key(res, "gallery")
    label_of = dict(zip(res["keys"], res["labels"].tolist()))
    names, means = speaker_means(
        np.stack([by_key[k] for k in enroll_keys]), [label_of[k] for k in enroll_keys]
    )
    row = {int(n): r for r, n in enumerate(names)}
    pairs = {}
    for flag, a, b in zip(trials.target, trials.enroll, trials.test):
        pairs.setdefault((label_of[a], b), bool(flag))
    spk = np.array([row[s] for s, _ in pairs], np.int64)
    test = l2_normalize(np.stack([by_key[b] for _, b in pairs]))
    return np.einsum("nd,nd->n", means[spk], test), np.array(list(pairs.values()), bool)


def identification(res: dict, enroll_keys: list[str]) -> dict:
    """Closed-gallery identification on the enroll/test division: a gallery of each enrolled speaker's
    mean enrollment embedding, top-1 over the other utterances of those speakers."""
    enroll = set(enroll_keys)
    is_enroll = np.array([k in enroll for k in res["keys"]], bool)
    names, means = speaker_means(res["emb"][is_enroll], res["labels"][is_enroll])
    test = ~is_enroll & np.isin(res["labels"], names)
    if not test.any():
        return {"acc": None, "n": 0, "speakers": int(len(names))}
    best = np.argmax(l2_normalize(res["emb"][test]) @ means.T, axis=1)
    acc = float((names[best] == res["labels"][test]).mean())
    return {"acc": acc, "n": int(test.sum()), "speakers": int(len(names))}


def verify_split(
    res: dict, manifest, split: str, *, storage_options=None, cohort=None, top_k: int = 300, calibrate=False
) -> dict:
    """Verification metrics of an embedding pass (``res``: emb, labels, keys of every utterance) over
    verification split ``split``'s trial list: cosine ``eer``, ``min_dcf_0.01``, ``min_dcf_0.05`` (+
    thresholds, trial counts), ``as_norm`` (the same, AS-norm'ed against ``cohort`` with ``top_k``)
    when a cohort is given, ``identification`` (:func:`identification`) and, with ``calibrate``,
    ``thresholds`` (:func:`spkr.scoring.calibrate_thresholds` of :func:`gallery_scores`)."""
    trials = load_trials(manifest, split, storage_options)
    by_key = embeddings_by_key(res, split)
    check_trial_keys(trials, by_key)
    out = {"split": split, **verification_metrics(score_trials(trials, by_key), trials.target)}
    if cohort is not None:
        normed = score_trials(trials, by_key, cohort, top_k)
        out["as_norm"] = {
            **verification_metrics(normed, trials.target),
            "cohort": len(cohort),
            "top_k": top_k,
        }
    enroll_keys = manifest.enroll_keys(split)
    out["identification"] = identification(res, enroll_keys)
    if calibrate:
        out["thresholds"] = calibrate_thresholds(*gallery_scores(trials, res, enroll_keys))
    return out

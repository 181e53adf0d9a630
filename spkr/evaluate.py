"""python -m spkr.evaluate — classification loss/accuracy and speaker verification (EER, minDCF).

    python -m spkr.evaluate --checkpoint runs/demo/last.pt --shards shards/demo [--split test]

Classification: cross-entropy (unweighted) and top-1 accuracy over every sample of the split.
Verification: an embedding per utterance (``model.embed``), trial pairs (all pairs, or a seeded
sample of target and non-target pairs when there are more than ``--max-pairs``), cosine scores,
equal error rate and the normalised minimum detection cost (p_target 0.01, c_miss = c_fa = 1).
The metrics are pure numpy. Results go to ``--out`` (default ``<checkpoint dir>/eval-<split>.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- metrics (pure numpy)


def _error_rates(scores, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Miss and false-alarm rates for "accept iff score >= t" at t = +inf and every distinct score,
    in decreasing t (fnr falls from 1 to 0, fpr rises from 0 to 1). Returns (fnr, fpr, thresholds)."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    n_tar, n_non = int(targets.sum()), int((~targets).sum())
    if n_tar == 0 or n_non == 0:
        raise ValueError(f"need target and non-target trials (got {n_tar} target, {n_non} non-target)")
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], targets[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    last = np.r_[s[1:] != s[:-1], True]  # keep the last index of each run of equal scores
    tp, fp, thr = tp[last], fp[last], s[last]
    fnr = np.r_[1.0, (n_tar - tp) / n_tar]
    fpr = np.r_[0.0, fp / n_non]
    return fnr, fpr, np.r_[np.inf, thr]


def compute_eer(scores, targets) -> tuple[float, float]:
    """Equal error rate (linear interpolation where miss and false-alarm rates cross) and its threshold."""
    fnr, fpr, thr = _error_rates(scores, targets)
    d = fnr - fpr  # decreasing from 1 to -1
    k = int(np.argmax(d <= 1e-12))
    if abs(d[k]) <= 1e-12 or k == 0:
        return float(fnr[k]), float(thr[k])
    a = d[k - 1] / (d[k - 1] - d[k])
    eer = fnr[k - 1] + a * (fnr[k] - fnr[k - 1])
    return float(eer), float(thr[k])


def compute_min_dcf(
    scores, targets, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0
) -> tuple[float, float]:
    """Normalised minimum detection cost min_t (c_miss p fnr + c_fa (1-p) fpr) / min(c_miss p, c_fa (1-p))
    and its threshold."""
    fnr, fpr, thr = _error_rates(scores, targets)
    dcf = c_miss * p_target * fnr + c_fa * (1.0 - p_target) * fpr
    dcf /= min(c_miss * p_target, c_fa * (1.0 - p_target))
    k = int(np.argmin(dcf))
    return float(dcf[k]), float(thr[k])


def make_trials(labels, max_pairs: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trial pairs (i, j, is_target) over utterances with speaker ``labels``: every pair i < j when there
    are at most ``max_pairs`` (0 = no limit), else a seeded sample of up to max_pairs/2 target pairs
    and non-target pairs for the rest (without repeats). When fewer distinct non-target pairs exist
    than that (one dominant speaker), all of them are used and a warning says so; with a single
    speaker there are none (``verification`` then raises a clear ValueError)."""
    labels = np.asarray(labels)
    n = len(labels)
    total = n * (n - 1) // 2
    if max_pairs <= 0 or total <= max_pairs:
        i, j = np.triu_indices(n, k=1)
        return i, j, labels[i] == labels[j]
    rng = np.random.default_rng(seed)
    # target pairs: enumerate per speaker (cheap unless a speaker has very many utterances)
    ti, tj = [], []
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        a, b = np.triu_indices(len(idx), k=1)
        ti.append(idx[a])
        tj.append(idx[b])
    ti, tj = np.concatenate(ti), np.concatenate(tj)
    half = max_pairs // 2
    if len(ti) > half:
        pick = rng.choice(len(ti), half, replace=False)
        ti, tj = ti[pick], tj[pick]
    n_non = max_pairs - len(ti)
    order = np.argsort(labels, kind="stable")  # utterances grouped by speaker
    _, start, count = np.unique(labels[order], return_index=True, return_counts=True)
    available = total - int((count * (count - 1) // 2).sum())  # distinct non-target pairs
    if available <= 2 * n_non:  # few: list them all (at most 2 * max_pairs), keep a seeded sample
        ni, nj = _all_nontarget_pairs(order, start, count)
        if available > n_non:
            pick = np.sort(rng.choice(available, n_non, replace=False))
            ni, nj = ni[pick], nj[pick]
        else:
            warnings.warn(
                f"verification trials: only {available} distinct non-target pairs exist among {n} "
                f"utterances of {len(count)} speaker(s) ({n_non} wanted): using all of them",
                stacklevel=2,
            )
    else:  # many: draw non-target pairs directly (each draw is new with probability > 1/2)
        ni, nj = _sample_nontarget_pairs(order, start, count, n_non, rng)
    i = np.concatenate([ti, np.asarray(ni, dtype=np.int64)])
    j = np.concatenate([tj, np.asarray(nj, dtype=np.int64)])
    return i, j, labels[i] == labels[j]


def _all_nontarget_pairs(order, start, count) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of utterances of different speakers, sorted; ``order`` groups utterances
    by speaker, speaker k at ``order[start[k] : start[k] + count[k]]``."""
    ii, jj = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for s, c in zip(start, count):
        a, b = order[s : s + c], order[s + c :]  # this speaker x every later speaker
        ii.append(np.repeat(a, len(b)))
        jj.append(np.tile(b, len(a)))
    i, j = np.concatenate(ii), np.concatenate(jj)
    i, j = np.minimum(i, j), np.maximum(i, j)
    k = np.lexsort((j, i))
    return i[k], j[k]


def _sample_nontarget_pairs(order, start, count, n_pairs: int, rng) -> tuple[list[int], list[int]]:
    """``n_pairs`` distinct non-target pairs drawn uniformly (first utterance weighted by how many
    utterances of other speakers it can pair with, second uniform among those); needs at least
    2 * n_pairs to exist so that the loop ends quickly."""
    n = len(order)
    spk = np.empty(n, np.int64)
    spk[order] = np.repeat(np.arange(len(count)), count)  # speaker index of each utterance
    weight = (n - count[spk]).astype(np.float64)
    weight /= weight.sum()
    seen: set[tuple[int, int]] = set()
    ni: list[int] = []
    nj: list[int] = []
    while len(ni) < n_pairs:
        size = 2 * (n_pairs - len(ni)) + 16
        a = rng.choice(n, size=size, p=weight)
        r = rng.integers(0, n - count[spk[a]])  # a position outside a's speaker block ...
        r = np.where(r < start[spk[a]], r, r + count[spk[a]])  # ... skipping over that block
        b = order[r]
        for x, y in zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()):
            if (x, y) in seen:
                continue
            seen.add((x, y))
            ni.append(x)
            nj.append(y)
            if len(ni) == n_pairs:
                break
    return ni, nj


def cosine_scores(emb: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    e = np.asarray(emb, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return np.einsum("nd,nd->n", e[i], e[j])


def verification(
    emb: np.ndarray, labels, max_pairs: int = 200_000, seed: int = 0, p_target: float = 0.01
) -> dict:
    """EER / minDCF of cosine scoring over trial pairs of these embeddings."""
    n_speakers = len(np.unique(np.asarray(labels)))
    if n_speakers < 2:
        raise ValueError(
            f"verification needs utterances of at least 2 speakers (got {len(labels)} utterance(s) of "
            f"{n_speakers}): no non-target trial exists"
        )
    i, j, tar = make_trials(labels, max_pairs, seed)
    scores = cosine_scores(emb, i, j)
    eer, eer_thr = compute_eer(scores, tar)
    dcf, dcf_thr = compute_min_dcf(scores, tar, p_target=p_target)
    return {
        "eer": eer,
        "eer_threshold": eer_thr,
        "min_dcf": dcf,
        "min_dcf_threshold": dcf_thr,
        "p_target": p_target,
        "trials": int(len(tar)),
        "target_trials": int(tar.sum()),
        "nontarget_trials": int((~tar).sum()),
    }


# --------------------------------------------------------------------------- model evaluation


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def run_split(model, loader, device, amp_dtype=None, embeddings: bool = False) -> dict:
    """One pass of an (unwrapped) model over a loader: sums of loss, correct, count, and optionally
    embeddings/labels/keys. Does no collective ops (ranks may have different batch counts)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    embs, labs, keys = [], [], []
    has_head = hasattr(model, "head") and hasattr(model, "embed")
    try:
        for batch in loader:
            mel = batch["mel"].to(device, non_blocking=True).float()
            lengths = batch["lengths"].to(device)
            labels = batch["labels"].to(device)
            with autocast_ctx(device, amp_dtype):
                if embeddings and has_head:
                    emb = model.embed(mel, lengths)
                    logits = model.head(emb)  # eval: dropout off, no margin -> same as forward
                else:
                    logits = model(mel, lengths)
                    emb = model.embed(mel, lengths) if embeddings else None
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            count += int(labels.numel())
            if embeddings:
                embs.append(emb.float().cpu().numpy())
                labs.append(labels.cpu().numpy())
                keys.extend(batch["keys"])
    finally:
        model.train(was_training)
    out = {"loss_sum": loss_sum, "correct": correct, "count": count}
    if embeddings:
        out["emb"] = np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)
        out["labels"] = np.concatenate(labs) if labs else np.zeros(0, np.int64)
        out["keys"] = keys
    return out


def summarise(sums: dict) -> dict:
    n = max(int(sums["count"]), 1)
    return {"loss": sums["loss_sum"] / n, "acc": sums["correct"] / n, "n": int(sums["count"])}


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    from spkr.config import add_storage_options

    p = argparse.ArgumentParser(prog="python -m spkr.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    p.add_argument("--shards", default=None, help="shards directory or URL (default: the one trained on)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--max-pairs", type=int, default=200_000, help="trial pairs cap (0 = all pairs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trial sample")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="fp32")
    p.add_argument(
        "--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)"
    )
    p.add_argument("--no-verification", action="store_true", help="only loss/accuracy")
    add_storage_options(p)
    p.add_argument("--out", default=None, help="JSON output (default: <checkpoint dir>/eval-<split>.json)")
    p.add_argument(
        "--allow-other-dataset",
        action="store_true",
        help="evaluate on shards that are not the checkpoint's training dataset (warns; default: refuse)",
    )
    return p.parse_args(argv)


def evaluate_checkpoint(
    ckpt: dict,
    shards: str,
    split: str,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    storage_options: dict | None = None,
    verify: bool = True,
    max_pairs: int = 200_000,
    seed: int = 0,
    amp_dtype=None,
    model=None,
    allow_other_dataset: bool = False,
    warn=lambda msg: print(f"[evaluate] {msg}", file=sys.stderr),
    device: str | torch.device | None = None,
) -> dict:
    """Accuracy (and verification) of a checkpoint on one split of its own training dataset (another
    one only with ``allow_other_dataset``, with a warning), normalised with the checkpoint's statistics.
    Runs on ``device`` (None: cuda when available, else cpu; with ``model`` given: that model's device)
    with the Mamba backend for that device, whichever one the checkpoint was trained with
    (:func:`spkr.checkpoint.build_model_from_checkpoint`); the result names both."""
    from spkr.checkpoint import build_model_from_checkpoint, check_dataset, resolve_device
    from spkr.stream.loader import SpeakerLoader

    loader = SpeakerLoader(
        shards,
        split,
        batch_size,
        train=False,
        seed=0,
        rank=0,
        world_size=1,
        num_workers=num_workers,
        crop_frames=None,
        normalize=True,
        dtype="float16",  # half the shared-memory pages per batch; cast to float32 on the device
        storage_options=storage_options,
        stats=ckpt["stats"],  # the model's training normalisation, whatever the shards' own say
    )
    warning = check_dataset(ckpt, loader.manifest, "the checkpoint", allow_other_dataset=allow_other_dataset)
    if warning:
        warn(warning)
    if model is None:
        device = resolve_device(device)
        model, _ = build_model_from_checkpoint(ckpt, device)
    else:
        device = torch.device(device) if device is not None else next(model.parameters()).device
    sums = run_split(model, loader, device, amp_dtype, embeddings=verify)
    res = {"split": split, "dataset_id": loader.manifest.dataset_id, "same_dataset": warning is None}
    res["device"], res["backend"] = str(device), model.backend_name()
    res.update(summarise(sums))
    if verify:
        res["verification"] = verification(sums["emb"], sums["labels"], max_pairs, seed)
    return res


def main(argv=None) -> int:
    from spkr import storage
    from spkr.checkpoint import CheckpointError, describe_backend, resolve_device
    from spkr.checkpoint import load as load_ckpt
    from spkr.manifest import ManifestError

    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        ckpt = load_ckpt(args.checkpoint)
        shards = args.shards or ckpt.get("shards")
        if not shards:
            raise ValueError("no --shards given and the checkpoint does not name its shards")
        opts = storage.storage_options_from_env(args.storage_options)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
        res = evaluate_checkpoint(
            ckpt,
            shards,
            args.split,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            storage_options=opts,
            verify=not args.no_verification,
            max_pairs=args.max_pairs,
            seed=args.seed,
            amp_dtype=amp,
            allow_other_dataset=args.allow_other_dataset,
            device=device,
        )
    except (CheckpointError, ManifestError, ValueError, FileNotFoundError, OSError) as e:
        print(f"[evaluate] error: {e}", file=sys.stderr)
        return 2
    res.update({"checkpoint": str(args.checkpoint), "shards": str(shards), "step": ckpt.get("step")})
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval-{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    line = (
        f"[evaluate] {args.split}: loss {res['loss']:.4f}  acc {100 * res['acc']:.2f}% ({res['n']} samples)"
    )
    if "verification" in res:
        v = res["verification"]
        line += f"  EER {100 * v['eer']:.2f}%  minDCF(0.01) {v['min_dcf']:.4f} ({v['trials']} trials)"
    print(line)
    print(f"[evaluate] {describe_backend(ckpt, device)}")
    print(f"[evaluate] written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

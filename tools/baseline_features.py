#!/usr/bin/env python3
"""The simple baseline of issue 14: mean/std of MFCCs + logistic regression (closed sets), cosine (open).

    python tools/baseline_features.py --shards shards/demo                  # closed / closed-session
    python tools/baseline_features.py --shards shards/demo-open --json -    # open: EER, minDCF

Reads a shard set with spkr's loader (``SpeakerLoader``, whole utterances, no crop, ``normalize=False``:
the stored dB log-mels as the shard tool wrote them, so the MFCCs are the textbook ones; any per-bin
normalisation would be undone by the standardisation below anyway up to the DCT's mixing) and turns
every utterance into one fixed vector:

    log-mel (T, n_mels) dB -> MFCC = orthonormal DCT-II over the mel bins, first M (T, M)
      [+ deltas, the usual +-2 frame regression] -> mean and std over time -> (2M,) or (4M,)

The vectors are standardised with the training split's mean/std. Then, by the split's kind
(docs/protocols.md):

- **classification** (protocols ``closed``, ``closed-session``; ``open``'s train/valid): multinomial
  logistic regression in torch (float64, full-batch L-BFGS from zero weights, mean cross-entropy +
  ``l2/2 * ||W||^2``), fitted on the split of role ``train`` for every MFCC count M of ``--n-mfcc``
  (default 20 and 30) and L2 strength of ``--l2``; the pair with the best accuracy on the
  classification split of role ``valid`` is kept (ties: lower valid cross-entropy, fewer MFCCs, larger
  L2); its accuracy is reported on the classification split of role ``test``. (The figures move with
  M, e.g. 91 % vs 100 % closed-session test accuracy on the bundled demo for 20 vs 30: so M is chosen
  on valid like the L2, never on test.)
- **verification** (``open``'s ``valid-verify`` / ``test-verify``): cosine of the standardised vectors
  of the M chosen above (on ``open``'s classification ``valid``: training speakers) on the manifest's
  trial list (sha256 checked) -> EER and minDCF at p_target 0.01 and 0.05 (:mod:`spkr.scoring`).

Nothing is random (zero initial weights, full batches, a fixed L-BFGS schedule, float64 on one thread
for the fit), so two runs on the same shards print the same figures; there is no seed to set.
Prints one line per evaluated split and, with ``--json PATH`` (``-``: stdout), every figure.
Developer tool: it measures what a trivial model gets on a shard set, to put model accuracies in context.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from spkr import scoring
from spkr.run.evaluation import load_trials
from spkr.shards.format import Manifest
from spkr.stream import SpeakerLoader

DEFAULT_L2 = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
LBFGS_STEPS = 200


# ---------------------------------------------------------------------------------------------------
# Features


def dct_matrix(n_mels: int, n_mfcc: int) -> np.ndarray:
    """(n_mfcc, n_mels) orthonormal DCT-II: ``mfcc = logmel @ D.T`` (librosa/scipy ``norm="ortho"``)."""
    if not 1 <= n_mfcc <= n_mels:
        raise ValueError(f"--n-mfcc must be in 1..{n_mels} (the shards' n_mels), got {n_mfcc}")
    k = np.arange(n_mfcc)[:, None]
    n = np.arange(n_mels)[None, :]
    d = np.cos(np.pi * k * (2 * n + 1) / (2 * n_mels)) * np.sqrt(2.0 / n_mels)
    d[0] /= np.sqrt(2.0)
    return d


def deltas(x: np.ndarray, width: int = 2) -> np.ndarray:
    """Regression deltas over time of (T, M) with +-``width`` frames (edges repeated), as HTK/Kaldi."""
    pad = np.pad(x, ((width, width), (0, 0)), mode="edge")
    t = len(x)
    num = sum(
        k * (pad[width + k : width + k + t] - pad[width - k : width - k + t]) for k in range(1, width + 1)
    )
    return num / (2 * sum(k * k for k in range(1, width + 1)))


def utterance_vector(logmel: np.ndarray, dct: np.ndarray, with_deltas: bool) -> np.ndarray:
    """One utterance's (T, n_mels) dB log-mel -> mean and std over time of its MFCCs [and deltas]."""
    mfcc = logmel.astype(np.float64) @ dct.T
    parts = [mfcc, deltas(mfcc)] if with_deltas else [mfcc]
    frames = np.concatenate(parts, axis=1)
    return np.concatenate([frames.mean(axis=0), frames.std(axis=0)])


def split_vectors(shards: str, split: str, dct: np.ndarray, with_deltas: bool, manifest: Manifest):
    """(keys, labels (N,), vectors (N, D)) of every utterance of ``split``, in manifest order."""
    loader = SpeakerLoader(
        shards, split, batch_size=64, train=False, normalize=False, num_workers=0, manifest=manifest
    )
    keys, labels, vectors = [], [], []
    for batch in loader:
        mel = batch["mel"].numpy()
        for i, n in enumerate(batch["lengths"].tolist()):
            vectors.append(utterance_vector(mel[i, :n], dct, with_deltas))
        keys.extend(batch["keys"])
        labels.extend(batch["labels"].tolist())
    if not keys:
        raise ValueError(f"{shards}: split '{split}' has no samples")
    return keys, np.asarray(labels, dtype=np.int64), np.stack(vectors)


def standardiser(train_vectors: np.ndarray):
    """x -> (x - mean) / std with the training vectors' per-dimension statistics."""
    mean = train_vectors.mean(axis=0)
    std = np.maximum(train_vectors.std(axis=0), 1e-8)
    return lambda x: (x - mean) / std


# ---------------------------------------------------------------------------------------------------
# Logistic regression


def fit_logreg(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (W (D, C), b (C,)) minimising mean cross-entropy + l2/2 ||W||^2,
    full-batch L-BFGS in float64 from zeros on one thread (deterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float64)), torch.from_numpy(y)
        w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w, b], lr=1.0, max_iter=LBFGS_STEPS, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach(), b.detach()
    finally:
        torch.set_num_threads(threads)


def classify(model, x: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy and mean cross-entropy of ``model`` = (W, b) on (x, y)."""
    w, b = model
    logits = torch.from_numpy(np.ascontiguousarray(x, np.float64)) @ w + b
    yt = torch.from_numpy(y)
    correct = int((logits.argmax(dim=1) == yt).sum())
    loss = float(torch.nn.functional.cross_entropy(logits, yt))
    return {"acc": correct / len(y), "correct": correct, "n": len(y), "loss": loss}


def select_and_fit(train, valid, n_classes: int, l2_grid, columns: dict[int, np.ndarray]):
    """Fit on ``train`` = (x, y) for every (MFCC count, L2 strength), the features of MFCC count k
    being ``x[:, columns[k]]``; keep the best on ``valid`` (accuracy, then lower cross-entropy, then
    fewer MFCCs, then larger L2). Without a valid set: the fewest MFCCs and the middle L2.
    Returns (model, n_mfcc, l2, [every fit's valid figures])."""
    if valid is None:
        k, l2 = min(columns), sorted(l2_grid)[len(l2_grid) // 2]
        return fit_logreg(train[0][:, columns[k]], train[1], n_classes, l2), k, l2, []
    tried = []
    for k in sorted(columns):
        for l2 in sorted(l2_grid):
            model = fit_logreg(train[0][:, columns[k]], train[1], n_classes, l2)
            tried.append((model, k, l2, classify(model, valid[0][:, columns[k]], valid[1])))
    model, k, l2, _ = max(tried, key=lambda t: (t[3]["acc"], -t[3]["loss"], -t[1], t[2]))
    search = [{"n_mfcc": t[1], "l2": t[2], "acc": t[3]["acc"], "loss": t[3]["loss"]} for t in tried]
    return model, k, l2, search


# ---------------------------------------------------------------------------------------------------
# Protocol driving


def classification_splits(manifest: Manifest) -> dict[str, str | None]:
    """{role: the classification split of that role, or None} for train/valid/test."""
    out = {}
    for role in ("train", "valid", "test"):
        names = [s for s in manifest.splits_with_role(role) if manifest.split_kind(s) == "classification"]
        out[role] = names[0] if names else None
    if out["train"] is None:
        raise ValueError(
            f"{manifest.url}: no classification split of role train (have {manifest.split_names})"
        )
    return out


def verification_split_names(manifest: Manifest) -> list[str]:
    return [s for s in manifest.split_names if manifest.split_kind(s) == "verification"]


def feature_columns(n_mfcc: int, n_max: int, with_deltas: bool) -> np.ndarray:
    """Columns of :func:`utterance_vector`'s output (computed with ``n_max`` MFCCs) that are the vector
    of the first ``n_mfcc``: each block (mean MFCC, [mean delta,] std MFCC, [std delta]) cut to them."""
    blocks = 4 if with_deltas else 2
    return np.concatenate([b * n_max + np.arange(n_mfcc) for b in range(blocks)])


def run(shards: str, n_mfcc=(20, 30), with_deltas: bool = True, l2_grid=DEFAULT_L2) -> dict:
    """Every figure of the baseline on the shard set ``shards`` (see the module docstring);
    ``n_mfcc``: the MFCC counts tried (with the L2 strengths, chosen on valid)."""
    t0 = time.time()
    manifest = Manifest.load(shards)
    n_mels = int(manifest.data["feature_config"].get("n_mels", 80))
    dct = dct_matrix(n_mels, max(n_mfcc))
    columns = {k: feature_columns(k, max(n_mfcc), with_deltas) for k in sorted(set(n_mfcc))}
    roles = classification_splits(manifest)
    data = {
        split: split_vectors(shards, split, dct, with_deltas, manifest)
        for split in [s for s in roles.values() if s] + verification_split_names(manifest)
    }
    standardise = standardiser(data[roles["train"]][2])
    xy = {split: (standardise(vec), labels) for split, (_keys, labels, vec) in data.items()}
    valid = xy[roles["valid"]] if roles["valid"] else None
    model, k, l2, search = select_and_fit(xy[roles["train"]], valid, len(manifest.labels), l2_grid, columns)
    chosen = {split: (x[:, columns[k]], y) for split, (x, y) in xy.items()}
    result = {
        "shards": shards,
        "protocol": manifest.protocol_name,
        "dataset_id": manifest.dataset_id,
        "features": f"mfcc{k}{'+delta' if with_deltas else ''} mean+std",
        "n_mfcc": k,
        "dim": len(columns[k]),
        "n_train": int(len(data[roles["train"]][1])),
        "n_classes": len(manifest.labels),
        "logreg": {"l2": l2, "search": search, "train": classify(model, *chosen[roles["train"]])},
    }
    for role in ("valid", "test"):
        if roles[role]:
            result["logreg"][role] = {"split": roles[role], **classify(model, *chosen[roles[role]])}
    result["verification"] = {
        split: verify(manifest, split, data[split][0], chosen[split][0])
        for split in verification_split_names(manifest)
    }
    result["seconds"] = round(time.time() - t0, 2)
    return result


def verify(manifest: Manifest, split: str, keys: list[str], vectors: np.ndarray) -> dict:
    """Cosine scores of ``split``'s standardised vectors on its trial list -> EER, minDCF."""
    trials = load_trials(manifest, split)  # keys and target flags checked against the split's speakers
    scores = scoring.score_trials(trials, dict(zip(keys, vectors)))
    return scoring.verification_metrics(scores, trials.target)


def summary_lines(result: dict) -> list[str]:
    head = f"baseline {result['features']} ({result['dim']}-d), protocol {result['protocol']}"
    lines = []
    lr = result["logreg"]
    if "test" in lr:
        t = lr["test"]
        valid = f", valid {100 * lr['valid']['acc']:.2f} %" if "valid" in lr else ""
        lines.append(
            f"{head}: logreg test accuracy {100 * t['acc']:.2f} % ({t['correct']}/{t['n']}) "
            f"on '{t['split']}'{valid}, l2 {lr['l2']:g}, {result['n_train']} train utterances"
        )
    for split, m in result["verification"].items():
        lines.append(
            f"{head}: cosine on '{split}' EER {100 * m['eer']:.2f} %, minDCF(0.01) {m['min_dcf_0.01']:.3f}, "
            f"minDCF(0.05) {m['min_dcf_0.05']:.3f} ({m['target_trials']}+{m['nontarget_trials']} trials)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="shards directory or URL (any protocol)")
    ap.add_argument(
        "--n-mfcc",
        default="20,30",
        help="comma list of MFCC counts per frame tried, chosen on valid with the L2 (default %(default)s)",
    )
    ap.add_argument("--no-deltas", action="store_true", help="pool the MFCCs only (default: + deltas)")
    ap.add_argument(
        "--l2",
        default=",".join(f"{v:g}" for v in DEFAULT_L2),
        help="comma list of L2 strengths tried, chosen on valid (default %(default)s)",
    )
    ap.add_argument(
        "--json", default=None, metavar="PATH", help="write every figure as JSON here (- = stdout)"
    )
    args = ap.parse_args(argv)
    try:
        l2_grid = [float(v) for v in args.l2.split(",")]
        n_mfcc = [int(v) for v in args.n_mfcc.split(",")]
    except ValueError:
        ap.error(f"--l2 / --n-mfcc must be comma lists of numbers, got {args.l2!r} / {args.n_mfcc!r}")
    if min(l2_grid) < 0 or min(n_mfcc) < 1:
        ap.error("--l2 strengths must be >= 0 and --n-mfcc counts >= 1")
    try:
        result = run(args.shards, n_mfcc, not args.no_deltas, l2_grid)
    except ValueError as e:  # a shard set or option the baseline cannot use: one line, exit 2
        print(f"baseline_features: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(result):
        print(line, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(result, indent=1))
    elif args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

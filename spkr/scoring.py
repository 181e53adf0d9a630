"""Speaker-verification scoring, pure numpy: trial pairs, cosine scores, EER and minDCF.

    i, j, target = make_trials(labels, max_pairs=200_000, seed=0)   # seeded, every pair when few
    scores = cosine_scores(embeddings, i, j)                         # (n_trials,) in [-1, 1]
    eer, threshold = compute_eer(scores, target)

Conventions: a trial is accepted iff its score >= threshold; ``targets`` are booleans (same speaker);
EER is the operating point where miss and false-alarm rates are equal; minDCF is the normalised
minimum detection cost (c_miss = c_fa = 1) at a prior ``p_target``. Nothing here knows about models,
shards or torch: the evaluation stage computes embeddings and hands them over.
"""

from __future__ import annotations

import warnings

import numpy as np


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

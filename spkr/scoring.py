"""Speaker-verification scoring, pure numpy: trials, cosine scores, AS-norm, EER, minDCF, thresholds.

    i, j, target = make_trials(labels, max_pairs=200_000, seed=0)   # seeded, every pair when few
    scores = cosine_scores(embeddings, i, j)                         # (n_trials,) in [-1, 1]
    eer, threshold = compute_eer(scores, target)
    (dcf01, thr01), (dcf05, thr05) = compute_min_dcfs(scores, target)  # p_target 0.01 and 0.05

    trials = read_trials("shards/open/trials/test-verify.txt")       # spkr.shards.trials.read_trials
    scores = score_trials(trials, {key: embedding}, cohort=cohort_means)  # cosine, AS-norm with a cohort
    metrics = verification_metrics(scores, trials.target)            # EER + minDCF at 0.01 and 0.05
    calibration = calibrate_thresholds(valid_scores, valid_target)   # thresholds to store in a checkpoint

Conventions: a trial is accepted iff its score >= threshold; ``targets`` are booleans (same speaker);
EER is the operating point where miss and false-alarm rates are equal; minDCF is the normalised
minimum detection cost (c_miss = c_fa = 1) at a prior ``p_target``. Nothing here knows about models
or torch, nor of the shards more than the trial lists (their format, reader and writer:
:mod:`spkr.shards.trials`): the evaluation stage computes embeddings and hands them over.

**AS-norm** (adaptive symmetric score normalisation): each side of a trial is scored against a cohort
(e.g. the training speakers' mean embeddings, :func:`speaker_means`); the mean and standard deviation
of its ``top_k`` highest cohort scores normalise the raw score, and the two sides are averaged:
``0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t)``.

**AS-norm cohort** (:func:`select_cohort`): a seeded, per-speaker-balanced subset of the training
utterances (at most ``per_speaker`` each, spread over the speaker's sessions; optionally a seeded
subset of the speakers), averaged to one unit-norm embedding per speaker (:func:`speaker_means`).
Speaker means, as in the VoxCeleb systems that report AS-norm (e.g. WeSpeaker's score_norm: per-speaker
mean embeddings of the training set, top 300): each cohort entry is one impostor identity, so the
top-k statistics are not dominated by many utterances of the few training speakers closest to a
trial side, and the cohort has one row per speaker however many utterances were read. A few
utterances per speaker are enough for a stable mean; they bound the cost (LibriSpeech 960 h: 2 338
speakers x 3 = 7 014 utterances embedded instead of 281 241).
"""

from __future__ import annotations

import warnings

import numpy as np

from spkr.shards.trials import TrialList, check_trial_keys


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


def _eer_point(fnr: np.ndarray, fpr: np.ndarray) -> tuple[float, int]:
    """(EER, index of its operating point) from :func:`_error_rates` (linear interpolation where miss
    and false-alarm rates cross)."""
    d = fnr - fpr  # decreasing from 1 to -1
    k = int(np.argmax(d <= 1e-12))
    if abs(d[k]) <= 1e-12 or k == 0:
        return float(fnr[k]), k
    a = d[k - 1] / (d[k - 1] - d[k])
    return float(fnr[k - 1] + a * (fnr[k] - fnr[k - 1])), k


def _min_dcf_point(fnr, fpr, p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> tuple[float, int]:
    """(normalised minDCF, index of its operating point) from :func:`_error_rates`."""
    dcf = c_miss * p_target * fnr + c_fa * (1.0 - p_target) * fpr
    dcf /= min(c_miss * p_target, c_fa * (1.0 - p_target))
    k = int(np.argmin(dcf))
    return float(dcf[k]), k


def compute_eer(scores, targets) -> tuple[float, float]:
    """Equal error rate (linear interpolation where miss and false-alarm rates cross) and its threshold."""
    fnr, fpr, thr = _error_rates(scores, targets)
    eer, k = _eer_point(fnr, fpr)
    return eer, float(thr[k])


def compute_min_dcf(
    scores, targets, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0
) -> tuple[float, float]:
    """Normalised minimum detection cost min_t (c_miss p fnr + c_fa (1-p) fpr) / min(c_miss p, c_fa (1-p))
    and its threshold."""
    fnr, fpr, thr = _error_rates(scores, targets)
    dcf, k = _min_dcf_point(fnr, fpr, p_target, c_miss, c_fa)
    return dcf, float(thr[k])


DCF_P_TARGETS = (0.01, 0.05)


def compute_min_dcfs(scores, targets, p_targets=DCF_P_TARGETS) -> list[tuple[float, float]]:
    """[(minDCF, threshold)] at each prior of ``p_targets`` (default 0.01 and 0.05, c_miss = c_fa = 1),
    from one sort of the scores; each equals ``compute_min_dcf(scores, targets, p)``."""
    fnr, fpr, thr = _error_rates(scores, targets)
    out = []
    for p in p_targets:
        dcf, k = _min_dcf_point(fnr, fpr, p)
        out.append((dcf, float(thr[k])))
    return out


def verification_metrics(scores, targets, p_targets=DCF_P_TARGETS) -> dict:
    """EER and minDCF at each prior of ``p_targets`` (keys ``min_dcf_0.01``, ``min_dcf_0.05`` ... and
    ``..._threshold``) of scored trials, with the trial counts."""
    targets = np.asarray(targets).astype(bool)
    fnr, fpr, thr = _error_rates(scores, targets)
    eer, k = _eer_point(fnr, fpr)
    out = {"eer": eer, "eer_threshold": float(thr[k])}
    for p in p_targets:
        dcf, k = _min_dcf_point(fnr, fpr, p)
        out[f"min_dcf_{p:g}"], out[f"min_dcf_{p:g}_threshold"] = dcf, float(thr[k])
    out.update(_trial_counts(targets))
    return out


def _trial_counts(targets: np.ndarray) -> dict:
    return {
        "trials": int(len(targets)),
        "target_trials": int(targets.sum()),
        "nontarget_trials": int((~targets).sum()),
    }


def calibrate_thresholds(scores, targets, p_target: float = 0.01) -> dict:
    """Decision thresholds calibrated on (validation) trial scores, to store with a model: the EER
    operating point and the minDCF(``p_target``) one. Each threshold is the midpoint between the
    lowest accepted and the highest rejected score there (same error rates on these trials, margin on
    both sides for new ones); above the top score when rejecting everything is best, the lowest score
    when accepting everything is. Plain floats/ints/strings (fits a weights_only checkpoint)."""
    targets = np.asarray(targets).astype(bool)
    fnr, fpr, thr = _error_rates(scores, targets)
    eer, k_eer = _eer_point(fnr, fpr)
    dcf, k_dcf = _min_dcf_point(fnr, fpr, p_target)
    return {
        "eer_threshold": _midpoint_threshold(thr, k_eer),
        "min_dcf_threshold": _midpoint_threshold(thr, k_dcf),
        "p_target": float(p_target),
        "eer": eer,
        "min_dcf": dcf,
        **_trial_counts(targets),
    }


def _midpoint_threshold(thr: np.ndarray, k: int) -> float:
    """A threshold that accepts exactly the scores >= thr[k] of ``thr`` = [inf, distinct scores in
    decreasing order], halfway to the next lower score."""
    if k == 0:  # reject all: just above the highest score
        return float(np.nextafter(thr[1], np.inf))
    if k == len(thr) - 1:  # accept all
        return float(thr[k])
    return float((thr[k] + thr[k + 1]) / 2)


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


def l2_normalize(emb) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64; all-zero rows stay zero)."""
    e = np.asarray(emb, dtype=np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def cosine_scores(emb: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine similarity of embedding rows ``i[n]`` and ``j[n]`` for every trial n."""
    e = l2_normalize(emb)
    return np.einsum("nd,nd->n", e[i], e[j])


def verification(
    emb: np.ndarray, labels, max_pairs: int = 200_000, seed: int = 0, p_target: float = 0.01
) -> dict:
    """EER / minDCF (at ``p_target``: ``min_dcf``, ``min_dcf_threshold``; and at every prior of
    DCF_P_TARGETS: ``min_dcf_0.01`` ...) of cosine scoring over trial pairs of these embeddings."""
    n_speakers = len(np.unique(np.asarray(labels)))
    if n_speakers < 2:
        raise ValueError(
            f"verification needs utterances of at least 2 speakers (got {len(labels)} utterance(s) of "
            f"{n_speakers}): no non-target trial exists"
        )
    i, j, tar = make_trials(labels, max_pairs, seed)
    scores = cosine_scores(emb, i, j)
    res = verification_metrics(scores, tar, sorted({p_target, *DCF_P_TARGETS}))
    res["min_dcf"], res["min_dcf_threshold"] = (
        res[f"min_dcf_{p_target:g}"],
        res[f"min_dcf_{p_target:g}_threshold"],
    )
    res["p_target"] = p_target
    return res


# --------------------------------------------------------------------------- scoring trial lists, AS-norm


def speaker_means(emb, labels) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct labels, (n_speakers, E) unit-norm mean of each speaker's L2-normalised
    embeddings): a speaker model, or a cohort for AS-norm from training speakers."""
    labels = np.asarray(labels)
    e = l2_normalize(emb)
    if len(labels) != len(e):
        raise ValueError(f"speaker_means: {len(e)} embeddings but {len(labels)} labels")
    names, inverse = np.unique(labels, return_inverse=True)
    sums = np.zeros((len(names), e.shape[1]))
    np.add.at(sums, inverse, e)
    return names, l2_normalize(sums)


def select_cohort(
    labels, per_speaker: int, seed: int = 0, max_speakers: int = 0, sessions=None
) -> np.ndarray:
    """Sorted indices of a seeded, per-speaker-balanced cohort subset of utterances with speaker
    ``labels`` (N,): ``max_speakers`` > 0 keeps a seeded sample of that many speakers (all when fewer);
    each kept speaker gives ``min(per_speaker, its utterances)`` utterances, drawn round-robin over its
    ``sessions`` (N,) ids (e.g. LibriSpeech chapters; None: one session) in a seeded order, so a
    speaker's picks come from as many sessions as possible. A speaker's picks depend only on (seed,
    its label, its utterances), not on the other speakers."""
    labels = np.asarray(labels)
    if per_speaker < 1 or max_speakers < 0:
        raise ValueError(f"cohort: per_speaker must be >= 1 (got {per_speaker}), max_speakers >= 0")
    sessions = np.zeros(len(labels), np.int64) if sessions is None else np.asarray(sessions)
    if len(sessions) != len(labels):
        raise ValueError(f"cohort: {len(labels)} labels but {len(sessions)} session ids")
    speakers = np.unique(labels)
    if 0 < max_speakers < len(speakers):
        rng = np.random.default_rng([seed & 0xFFFFFFFF, 0xC0407])
        speakers = np.sort(rng.choice(speakers, max_speakers, replace=False))
    picked = []
    for spk in speakers.tolist():
        idx = np.flatnonzero(labels == spk)
        rng = np.random.default_rng([seed & 0xFFFFFFFF, 0xC0407, _seed_word(spk)])
        groups = [rng.permutation(idx[sessions[idx] == s]) for s in np.unique(sessions[idx])]
        groups = [groups[k] for k in rng.permutation(len(groups))]
        round_robin = [g[r] for r in range(max(len(g) for g in groups)) for g in groups if r < len(g)]
        picked += round_robin[:per_speaker]
    return np.sort(np.asarray(picked, np.int64))


def _seed_word(label) -> int:
    """A label (int or str) as a 32-bit seed word (stable across processes, unlike hash())."""
    if isinstance(label, (int, np.integer)):
        return int(label) & 0xFFFFFFFF
    import zlib

    return zlib.crc32(str(label).encode("utf-8"))


def top_k_statistics(cohort_scores, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of each row's ``top_k`` highest scores (every score when the row is shorter)."""
    s = np.asarray(cohort_scores, dtype=np.float64)
    k = min(top_k, s.shape[1])
    top = np.partition(s, s.shape[1] - k, axis=1)[:, s.shape[1] - k :] if k < s.shape[1] else s
    return top.mean(axis=1), top.std(axis=1)


def cohort_statistics(emb, cohort, top_k: int = 300, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """AS-norm statistics of embeddings: :func:`top_k_statistics` of their cosine scores against the
    cohort rows, ``chunk`` embeddings at a time (memory chunk x C)."""
    cohort = l2_normalize(cohort)
    if cohort.ndim != 2 or len(cohort) < 2:
        raise ValueError(f"AS-norm needs a cohort of at least 2 embeddings (got shape {cohort.shape})")
    if top_k < 2:
        raise ValueError(f"AS-norm top_k must be >= 2 (got {top_k})")
    e = l2_normalize(emb)
    if e.ndim != 2 or e.shape[1] != cohort.shape[1]:
        raise ValueError(f"embeddings of shape {e.shape} but a cohort of dim {cohort.shape[1]}")
    mean, std = np.empty(len(e)), np.empty(len(e))
    for a in range(0, len(e), chunk):
        mean[a : a + chunk], std[a : a + chunk] = top_k_statistics(e[a : a + chunk] @ cohort.T, top_k)
    return mean, std


def as_norm(scores, enroll_mean, enroll_std, test_mean, test_std) -> np.ndarray:
    """Adaptive symmetric normalisation of raw trial scores with each side's cohort statistics."""
    s = np.asarray(scores, dtype=np.float64)
    e = (s - enroll_mean) / np.maximum(enroll_std, 1e-8)
    t = (s - test_mean) / np.maximum(test_std, 1e-8)
    return 0.5 * (e + t)


def score_trials(trials: TrialList, embeddings, cohort=None, top_k: int = 300) -> np.ndarray:
    """Scores of a trial list: cosine of the two sides' embeddings (``embeddings``: a mapping
    key -> (E,) vector), AS-norm'ed against ``cohort`` ((C, E), e.g. training speakers' means)
    when given. A key without an embedding is a TrialListError naming it."""
    check_trial_keys(trials, embeddings)
    keys = trials.keys()
    index = {k: n for n, k in enumerate(keys)}
    e = l2_normalize(np.stack([np.asarray(embeddings[k]) for k in keys]))
    ei = np.fromiter((index[k] for k in trials.enroll), np.int64, len(trials))
    ti = np.fromiter((index[k] for k in trials.test), np.int64, len(trials))
    scores = np.concatenate(
        [np.einsum("nd,nd->n", e[ei[a : a + 65536]], e[ti[a : a + 65536]]) for a in range(0, len(ei), 65536)]
    )
    if cohort is None:
        return scores
    mean, std = cohort_statistics(e, cohort, top_k)
    return as_norm(scores, mean[ei], std[ei], mean[ti], std[ti])

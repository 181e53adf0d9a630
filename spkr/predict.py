"""python -m spkr.predict — audio files -> top-k speakers (and optionally embeddings).

    python -m spkr.predict a.flac b.wav --checkpoint runs/demo/last.pt [--top-k 5] [--embed emb.npy]
    python -m spkr.predict x.flac --db speakers.npz \
        [--checkpoint runs/open/last.pt] [--threshold T | --operating-point eer|min-dcf] [--top-k 5]

Without ``--db``: the training speakers (classes) by probability (``--checkpoint`` required). With
``--db`` (a gallery of ``spkr.enroll``): the model is the checkpoint the gallery records
(:meth:`spkr.gallery.Gallery.checkpoint_path`; a missing one, or a gallery of an older spkr that
records none, is an error asking for ``--checkpoint``) or ``--checkpoint``; either way its weights
fingerprint must be the gallery's (else an error: re-enroll). Answers: the closest enrolled speakers by
cosine score and an accept/reject decision for the best one (accept iff score >= threshold). The
threshold: ``--threshold``, else the checkpoint's ``verification_thresholds`` (calibrated by training on
the valid-role trials with enrollment means, as a gallery scores; ``--operating-point`` eer (default)
or min-dcf (p_target 0.01)) when they were measured on these very weights; with neither, scores only
and a note.

Features are computed exactly as for the shards the model was trained on: the checkpoint's feature
config (``load_audio`` resamples / downmixes when needed, ``LogMel``, cast to the on-disk dtype),
normalised with the training split's statistics saved in the checkpoint; the model runs in fp32.
``--embed`` writes the utterance embeddings as one ``(N, E)`` float32 array (``np.save``, no pickle),
in argument order. Errors the user can fix (not audio, too short, bad checkpoint or device): one line
on stderr, exit status 2 (:func:`spkr.run.cli.cli_main`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from spkr.config import finite_number


class Predictor:
    """A loaded checkpoint ready to score waveforms/files."""

    def __init__(
        self, checkpoint: str | Path, device: str | torch.device | None = None, feature_backend: str = "auto"
    ):
        """``device``: None = cuda when available, else cpu. The Mamba backend is the one for that
        device (``self.model.backend_name()``), whichever the checkpoint was trained with."""
        from spkr.checkpoint import build_model_from_checkpoint, resolve_device
        from spkr.checkpoint import load as load_ckpt
        from spkr.features import FeatureConfig, LogMel

        self.device = resolve_device(device)
        self.ckpt = load_ckpt(checkpoint)
        self.model, self.model_cfg = build_model_from_checkpoint(self.ckpt, self.device)
        self.labels: list[str] = list(self.ckpt["labels"])
        self.feature_config = FeatureConfig.from_dict(self.ckpt["feature_config"])
        self.logmel = LogMel(self.feature_config, backend=feature_backend)
        stats = self.ckpt["stats"]
        self.mean = np.asarray(stats["mean"], dtype=np.float32)
        self.std = np.asarray(stats["std"], dtype=np.float32)
        self._fingerprint: str | None = None

    @property
    def weights_fingerprint(self) -> str:
        """:func:`spkr.checkpoint.weights_fingerprint` of the model's weights (a gallery's identity)."""
        if self._fingerprint is None:
            from spkr.checkpoint import weights_fingerprint

            self._fingerprint = weights_fingerprint(self.ckpt["model"])
        return self._fingerprint

    @property
    def embedding_dim(self) -> int:
        return int(self.model_cfg.embedding_dim)

    def thresholds(self) -> tuple[dict | None, str]:
        """(the checkpoint's ``verification_thresholds``, or None, and why): used only when they were
        calibrated on exactly these weights (their ``weights`` fingerprint)."""
        thr = self.ckpt.get("verification_thresholds")
        if not thr:
            return None, "the checkpoint has no calibrated thresholds (trained without verification trials)"
        if thr.get("weights") != self.weights_fingerprint:
            return (
                None,
                f"the checkpoint's thresholds were calibrated on other weights (step {thr.get('step')})",
            )
        return thr, f"calibrated on {thr['split']} at step {thr['step']}"

    def features(self, path: str | Path) -> np.ndarray:
        """(frames, n_mels) float32, normalised."""
        from spkr.features import AudioError, compute_logmel, load_audio

        cfg = self.feature_config
        wave = load_audio(path, cfg, allow_resample=True, allow_downmix=True)
        if len(wave) < cfg.min_samples:
            ms = 1000 / cfg.sample_rate
            raise AudioError(
                f"{path}: too short: {len(wave)} samples ({len(wave) * ms:.1f} ms at {cfg.sample_rate} Hz); "
                f"the model's features need at least one analysis window of {cfg.min_samples} samples "
                f"({cfg.min_samples * ms:.1f} ms, n_fft of the checkpoint's feature config)"
            )
        feats = compute_logmel(wave, self.logmel).astype(np.float32)
        return (feats - self.mean) / np.maximum(self.std, 1e-5)

    @torch.no_grad()
    def _embed(self, path: str | Path) -> torch.Tensor:
        feats = self.features(path)
        mel = torch.from_numpy(feats)[None].to(self.device)
        lengths = torch.tensor([feats.shape[0]], device=self.device)
        return self.model.embed(mel, lengths)

    def embed(self, path: str | Path) -> np.ndarray:
        """(E,) float32 embedding of one file (no classifier head)."""
        return self._embed(path)[0].float().cpu().numpy()

    @torch.no_grad()
    def __call__(self, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """(class probabilities (n_classes,), embedding (E,)) of one file."""
        emb = self._embed(path)
        logits = self.model.head(emb)  # eval: no margin, dropout off -> the same as forward
        probs = torch.softmax(logits.float(), dim=-1)[0]
        return probs.cpu().numpy(), emb[0].float().cpu().numpy()

    def top_k(self, probs: np.ndarray, k: int) -> list[tuple[str, float]]:
        order = np.argsort(-probs, kind="stable")[: max(1, k)]
        return [(self.labels[i], float(probs[i])) for i in order]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spkr.predict", description=__doc__.split("\n")[0])
    p.add_argument("audio", nargs="+", help="audio files (anything soundfile reads: flac, wav, ogg ...)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint file (.pt); with --db, default: the one the gallery was enrolled with",
    )
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument(
        "--db", default=None, help="gallery of enrolled speakers (spkr.enroll .npz) to answer from"
    )
    p.add_argument(
        "--threshold", type=finite_number, default=None, help="accept iff score >= this (with --db)"
    )
    p.add_argument(
        "--operating-point",
        choices=OPERATING_POINTS,
        default="eer",
        help="which calibrated threshold of the checkpoint (default eer; min-dcf: p_target 0.01)",
    )
    p.add_argument("--embed", default=None, help="write the embeddings here (.npy, (N, E) float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object per file instead of text")
    p.add_argument(
        "--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)"
    )
    return p.parse_args(argv)


OPERATING_POINTS = {"eer": "eer_threshold", "min-dcf": "min_dcf_threshold"}


def decision_threshold(
    pred: Predictor, threshold: float | None, operating_point: str
) -> tuple[float | None, str]:
    """(threshold, where it comes from) of ``--threshold`` / the checkpoint's calibration; (None, why
    not) when there is neither."""
    if threshold is not None:
        return threshold, "--threshold"
    thr, why = pred.thresholds()
    if thr is None:
        return None, why
    return float(thr[OPERATING_POINTS[operating_point]]), f"{operating_point}, {why}"


def answer_from_gallery(gallery, path: str, emb: np.ndarray, top_k: int, threshold: float | None) -> dict:
    """{"file", "top": [{"speaker", "score"}], "decision": "accept" | "reject" | None} of one file's
    embedding: its ``top_k`` closest enrolled speakers, the best one accepted iff score >= threshold."""
    from spkr.gallery import decide

    top = gallery.identify(emb, top_k)
    decision = None if threshold is None else ("accept" if decide(top[0][1], threshold) else "reject")
    return {"file": str(path), "top": [{"speaker": s, "score": v} for s, v in top], "decision": decision}


def run(args) -> int:
    """The command: predict every file, print top-k lines (or JSON), optionally save the embeddings."""
    from spkr.checkpoint import describe_backend

    if args.db:
        return run_gallery(args)
    if args.checkpoint is None:
        raise ValueError(
            "give --checkpoint (or --db: a gallery of spkr.enroll, which records its checkpoint)"
        )
    pred = Predictor(args.checkpoint, args.device)
    embs = []
    for path in args.audio:
        probs, emb = pred(path)
        embs.append(emb)
        top = pred.top_k(probs, args.top_k)
        if args.json:
            print(json.dumps({"file": str(path), "top": [{"speaker": s, "prob": p} for s, p in top]}))
        else:
            print(f"{path}: " + ", ".join(f"{s} {100 * p:.1f}%" for s, p in top))
    save_embeddings(args.embed, embs)
    print(f"[predict] {len(embs)} file(s): {describe_backend(pred.ckpt, pred.device)}", file=sys.stderr)
    return 0


def gallery_predictor(gallery, checkpoint: str | None, device=None) -> Predictor:
    """The Predictor of a gallery's model: ``checkpoint`` when given, else the one the gallery records
    (GalleryError when it records none or it is missing); its weights must be the gallery's."""
    from spkr.gallery import GalleryError

    path = checkpoint if checkpoint is not None else gallery.checkpoint_path()
    pred = Predictor(path, device)
    try:
        gallery.check_model(pred.weights_fingerprint, pred.embedding_dim)
    except GalleryError as e:
        if checkpoint is not None:
            raise
        raise GalleryError(
            f"{gallery.source}: the checkpoint it records, {path}, now holds other weights (replaced, "
            f"e.g. by later training?): give --checkpoint (the one enrolled with) or enroll again ({e})"
        ) from None
    return pred


def run_gallery(args) -> int:
    """``--db``: the closest enrolled speakers of every file, with the decision at the threshold."""
    from spkr.gallery import Gallery

    gallery = Gallery.load(args.db)
    pred = gallery_predictor(gallery, args.checkpoint, args.device)
    if args.checkpoint is None:
        print(f"[predict] checkpoint {gallery.checkpoint_path()} (recorded in {args.db})", file=sys.stderr)
    embs = [pred.embed(path) for path in args.audio]  # every file usable before any output
    threshold, source = decision_threshold(pred, args.threshold, args.operating_point)
    if threshold is None:
        print(f"[predict] note: no accept/reject decision: {source}; give --threshold", file=sys.stderr)
    else:
        print(f"[predict] threshold {threshold:.4f} ({source})", file=sys.stderr)
    answers = [answer_from_gallery(gallery, p, e, args.top_k, threshold) for p, e in zip(args.audio, embs)]
    for a in answers:
        if args.json:
            print(json.dumps({**a, "threshold": threshold}))
        else:
            decision = f" -> {a['decision']} {a['top'][0]['speaker']}" if a["decision"] else ""
            print(
                f"{a['file']}: " + ", ".join(f"{t['speaker']} {t['score']:.4f}" for t in a["top"]) + decision
            )
    save_embeddings(args.embed, embs)
    return 0


def save_embeddings(path: str | None, embs: list) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, np.stack(embs).astype(np.float32), allow_pickle=False)
        print(f"[predict] embeddings {tuple(np.stack(embs).shape)} written to {out}", file=sys.stderr)


def main(argv=None) -> int:
    from spkr.run.cli import cli_main

    return cli_main("predict", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

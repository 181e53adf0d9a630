"""python -m spkr.predict — audio files -> top-k speakers (and optionally embeddings).

    python -m spkr.predict a.flac b.wav --checkpoint runs/demo/last.pt [--top-k 5] [--embed emb.npy]

Features are computed exactly as for the shards the model was trained on: the checkpoint's feature
config (``load_audio`` resamples / downmixes when needed, ``LogMel``, cast to the on-disk dtype),
normalised with the training split's statistics saved in the checkpoint. ``--embed`` writes the
utterance embeddings as one ``(N, E)`` float32 array (``np.save``, no pickle), in argument order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


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
    def __call__(self, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """(class probabilities (n_classes,), embedding (E,)) of one file."""
        feats = self.features(path)
        mel = torch.from_numpy(feats)[None].to(self.device)
        lengths = torch.tensor([feats.shape[0]], device=self.device)
        emb = self.model.embed(mel, lengths)
        logits = self.model.head(emb) if hasattr(self.model, "head") else self.model(mel, lengths)
        probs = torch.softmax(logits.float(), dim=-1)[0]
        return probs.cpu().numpy(), emb[0].float().cpu().numpy()

    def top_k(self, probs: np.ndarray, k: int) -> list[tuple[str, float]]:
        order = np.argsort(-probs, kind="stable")[: max(1, k)]
        return [(self.labels[i], float(probs[i])) for i in order]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spkr.predict", description=__doc__.split("\n")[0])
    p.add_argument("audio", nargs="+", help="audio files (anything soundfile reads: flac, wav, ogg ...)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--embed", default=None, help="write the embeddings here (.npy, (N, E) float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object per file instead of text")
    p.add_argument(
        "--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    from spkr.checkpoint import CheckpointError, describe_backend
    from spkr.features import AudioError

    args = parse_args(argv)
    try:
        torch.set_num_threads(max(1, torch.get_num_threads()))
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
        if args.embed:
            out = Path(args.embed)
            out.parent.mkdir(parents=True, exist_ok=True)
            np.save(out, np.stack(embs).astype(np.float32), allow_pickle=False)
            print(f"[predict] embeddings {tuple(np.stack(embs).shape)} written to {out}", file=sys.stderr)
        print(f"[predict] {len(embs)} file(s): {describe_backend(pred.ckpt, pred.device)}", file=sys.stderr)
    except (AudioError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"[predict] error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

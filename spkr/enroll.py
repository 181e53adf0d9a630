"""python -m spkr.enroll — enroll a speaker's audio into a gallery of one model (a pickle-free .npz).

    python -m spkr.enroll --checkpoint runs/demo/last.pt --speaker alice a.flac b.flac --db speakers.npz

Each file is embedded exactly as ``spkr.predict`` does (the checkpoint's features and normalisation,
``model.embed``); the speaker's gallery entry is the mean of its L2-normalised utterance embeddings
(:mod:`spkr.gallery`): a new ``--db`` is created, an existing one is extended (a known speaker is
re-averaged by utterance counts, a new one appended). A gallery belongs to the model it was made with
(weights fingerprint): another checkpoint's gallery is refused. The gallery records where the
checkpoint is (absolute, and relative to the gallery's folder), so ``spkr.predict x.flac --db
speakers.npz`` needs no ``--checkpoint``; each enrollment records the path it was given (the same
weights, checked). Every file is embedded before the
gallery is touched, and the file is replaced atomically, so a bad input (unreadable, empty or too
short audio, a file given twice, an unusable speaker name) is a one-line error, exit code 2
(:func:`spkr.run.cli.cli_main`), and the gallery is unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from spkr.gallery import Gallery, check_name


def embed_files(pred, paths: list[str]) -> np.ndarray:
    """(m, E) embeddings of distinct audio files, in order (ValueError when a file repeats)."""
    seen: dict[Path, str] = {}
    for p in paths:
        resolved = Path(p).resolve()
        if resolved in seen:
            also = f" (also as {seen[resolved]})" if seen[resolved] != p else ""
            raise ValueError(f"{p}: given twice{also}; each utterance counts once")
        seen[resolved] = p
    return np.stack([pred.embed(p) for p in paths])


def enroll(checkpoint: str, speaker: str, paths: list[str], db: str, device=None) -> tuple[Gallery, int]:
    """Enroll ``paths`` as ``speaker`` into the gallery file ``db`` (created when missing) for this
    checkpoint's model. Returns (the saved gallery, the speaker's utterance count)."""
    from spkr.predict import Predictor

    check_name(speaker)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]}: no such audio file"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    pred = Predictor(checkpoint, device)
    # refuse another model's gallery before any work
    gallery = Gallery.load_or_new(db, pred.weights_fingerprint, pred.embedding_dim)
    embeddings = embed_files(pred, paths)
    count = gallery.enroll(speaker, embeddings)
    gallery.record_checkpoint(checkpoint, db)
    gallery.save(db)
    return gallery, count


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spkr.enroll", description=__doc__.split("\n")[0])
    p.add_argument("audio", nargs="+", help="the speaker's audio files (flac, wav, ogg ...)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.pt) whose model embeds the audio")
    p.add_argument("--speaker", required=True, help="speaker name (new, or one to add utterances to)")
    p.add_argument("--db", required=True, help="gallery file (.npz): created, or extended when it exists")
    p.add_argument(
        "--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)"
    )
    return p.parse_args(argv)


def run(args) -> int:
    """The command: enroll, save, print a one-line summary."""
    gallery, count = enroll(args.checkpoint, args.speaker, args.audio, args.db, args.device)
    print(
        f"[enroll] {args.speaker}: {len(args.audio)} utterance(s) added ({count} in all); "
        f"{args.db}: {len(gallery)} speaker(s), model {gallery.fingerprint[:12]}"
    )
    return 0


def main(argv=None) -> int:
    from spkr.run.cli import cli_main

    return cli_main("enroll", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spkr.scoring import verification

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

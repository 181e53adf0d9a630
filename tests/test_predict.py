"""spkr.predict on bundled audio with a model trained in the session (tests/test_train_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spkr.predict import Predictor, main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.test_train_e2e import demo_shards, killed_run

    base = tmp_path_factory.getbasetemp()
    info = killed_run(base)
    return Path(info["run"]) / "last.pt", demo_shards(base), base / "demo_corpus"


@pytest.mark.slow
def test_predict_names_the_speaker(trained, capsys, tmp_path):
    ckpt, shards, corpus = trained
    manifest = json.loads((shards / "manifest.json").read_text())
    keys = [k for s in manifest["splits"]["train"]["shards"] for k in s["keys"]]
    by_speaker = {}
    for k in keys:
        by_speaker.setdefault(k.split("-")[0], k)
    files = []
    for _spk, key in sorted(by_speaker.items())[:6]:
        files += list((corpus / "LibriSpeech").rglob(f"{key}.flac"))
    assert len(files) == 6
    pred = Predictor(ckpt)
    right = 0
    for f in files:
        probs, emb = pred(f)
        assert probs.shape == (len(manifest["labels"]),) and abs(probs.sum() - 1) < 1e-4
        right += pred.top_k(probs, 1)[0][0] == f.name.split("-")[0]
    assert right >= 5, f"only {right}/6 speakers right"

    out = tmp_path / "emb.npy"
    assert (
        main([str(f) for f in files[:2]] + ["--checkpoint", str(ckpt), "--top-k", "3", "--embed", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert files[0].name.split("-")[0] in text.splitlines()[0].split(":")[1]
    emb = np.load(out, allow_pickle=False)
    assert emb.shape[0] == 2 and emb.dtype == np.float32


@pytest.mark.slow
def test_predict_rejects_non_audio_cleanly(trained, tmp_path, capsys):
    ckpt, _, _ = trained
    bogus = tmp_path / "notes.flac"
    bogus.write_text("this is not audio")
    assert main([str(bogus), "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "notes.flac" in err and "Traceback" not in err
    assert main([str(tmp_path / "missing.wav"), "--checkpoint", str(ckpt)]) == 2


def _untrained_checkpoint(path: Path) -> Path:
    """A real checkpoint of a small, untrained model (input checks need no training)."""
    import torch

    from spkr.checkpoint import FORMAT, VERSION, save_atomic
    from spkr.config import to_dict
    from spkr.features import FeatureConfig
    from spkr.models import build_model
    from spkr.models.config import ModelConfig

    torch.manual_seed(0)
    fc = FeatureConfig(n_mels=16)
    cfg = ModelConfig(
        d_model=16, n_layers=1, d_state=4, frontend_channels=[16], embedding_dim=16, subsample=2
    )
    model = build_model(cfg, fc.n_mels, 3)
    ckpt = {
        "format": FORMAT, "version": VERSION, "model": model.state_dict(), "model_config": to_dict(cfg),
        "labels": ["7", "8", "9"], "feature_config": fc.to_dict(),
        "stats": {"mean": [0.0] * fc.n_mels, "std": [1.0] * fc.n_mels},
    }  # fmt: skip
    save_atomic(ckpt, path)
    return path


def test_predict_rejects_too_short_clips_cleanly(tmp_path, capsys):
    import soundfile as sf

    ckpt = _untrained_checkpoint(tmp_path / "ckpt.pt")
    rng = np.random.default_rng(0)

    def clip(name: str, n: int, sr: int = 16000) -> str:
        sf.write(tmp_path / name, (0.1 * rng.standard_normal(n)).astype(np.float32), sr)
        return str(tmp_path / name)

    # shorter than one analysis window (n_fft = 400 samples): a clear one-line error, exit code 2
    for n in (1, 150, 200, 399):
        assert main([clip(f"short{n}.wav", n), "--checkpoint", str(ckpt)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert (
            f"short{n}.wav: too short: {n} samples" in err
            and "at least one analysis window of 400 samples" in err
        )
    # 8 kHz input is resampled first: 199 samples become 398, still too short
    assert main([clip("short8k.wav", 199, 8000), "--checkpoint", str(ckpt)]) == 2
    assert "short8k.wav: too short: 398 samples" in capsys.readouterr().err
    # one window is enough: scored like any clip
    assert main([clip("ok.wav", 400), "--checkpoint", str(ckpt), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["file"].endswith("ok.wav") and len(out["top"]) == 3

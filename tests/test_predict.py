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

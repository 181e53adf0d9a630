"""spkr.predict on bundled audio with a model trained in the session (tests/test_train_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spkr.predict import Predictor, main
from spkr.shards.format import Manifest
from tests.runkit import untrained_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.runkit import demo_shards, killed_run

    base = tmp_path_factory.getbasetemp()
    info = killed_run(base)
    return Path(info["run"]) / "last.pt", demo_shards(base), base / "demo_corpus"


@pytest.mark.slow
def test_predict_names_the_speaker(trained, capsys, tmp_path):
    ckpt, shards, corpus = trained
    manifest = json.loads((shards / "manifest.json").read_text())
    keys = [k for s in Manifest.load(str(shards)).split("train").shards for k in s.keys]
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


def test_predict_rejects_too_short_clips_cleanly(tmp_path, capsys):
    import soundfile as sf

    ckpt = untrained_checkpoint(tmp_path / "ckpt.pt")
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


# --------------------------------------------------------------------------- --db: enrolled speakers


def _with_thresholds(path: Path, weights: str | None = None) -> Path:
    """The checkpoint with ``verification_thresholds`` (as training stores them) for ``weights``
    (default: its own weights)."""
    from spkr.checkpoint import load, save_atomic, weights_fingerprint

    ckpt = load(path)
    thr = {"eer_threshold": 0.5, "min_dcf_threshold": 0.999, "p_target": 0.01, "eer": 0.1, "min_dcf": 0.2}
    where = {"split": "valid-verify", "weights": weights or weights_fingerprint(ckpt["model"]), "epoch": 3}
    ckpt["verification_thresholds"] = {**thr, "trials": 10, **where, "step": 42}
    save_atomic(ckpt, path)
    return path


def test_predictor_embed_fingerprint_and_dim(tmp_path, demo_flacs):
    from spkr.checkpoint import weights_fingerprint

    pred = Predictor(untrained_checkpoint(tmp_path / "ckpt.pt"), "cpu")
    emb = pred.embed(demo_flacs[0])
    assert emb.shape == (pred.embedding_dim,) == (16,) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, pred(demo_flacs[0])[1])  # the same embedding, without the head
    assert pred.weights_fingerprint == weights_fingerprint(pred.ckpt["model"])


def test_predict_db_answers_enrolled_speakers_with_a_decision(tmp_path, demo_flacs, capsys):
    from spkr.enroll import main as enroll_main

    ckpt = _with_thresholds(untrained_checkpoint(tmp_path / "ckpt.pt"))
    db = tmp_path / "speakers.npz"
    alice = [str(f) for f in demo_flacs if f.name.startswith("1003-")][:3]
    bob = [str(f) for f in demo_flacs if f.name.startswith("1004-")][:1]
    assert enroll_main(["--checkpoint", str(ckpt), "--speaker", "alice", *alice, "--db", str(db)]) == 0
    assert enroll_main(["--checkpoint", str(ckpt), "--speaker", "bob", *bob, "--db", str(db)]) == 0
    capsys.readouterr()

    base = [bob[0], "--checkpoint", str(ckpt), "--db", str(db), "--json"]
    assert main(base) == 0  # bob's own enrollment utterance: score 1 -> accept at 0.5
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [t["speaker"] for t in out["top"]] == ["bob", "alice"]
    assert out["top"][0]["score"] == pytest.approx(1.0, abs=1e-5) and out["decision"] == "accept"
    assert out["threshold"] == 0.5 and "eer, calibrated on valid-verify at step 42" in captured.err
    assert main(base + ["--operating-point", "min-dcf", "--top-k", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] == 0.999 and len(out["top"]) == 1
    assert main(base + ["--threshold", "1.5"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "reject"

    # thresholds of other weights (or none): scores without a decision, and a note saying why
    _with_thresholds(ckpt, weights="0" * 32)
    assert main(base) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["decision"] is None
    assert (
        "no accept/reject decision: the checkpoint's thresholds were calibrated on other weights"
        in captured.err
    )
    assert main(base[:-1]) == 0
    assert capsys.readouterr().out.startswith(f"{bob[0]}: bob 1.0000, alice ")


def test_predict_db_bad_inputs_exit_2(tmp_path, demo_flacs, capsys):
    import soundfile as sf

    from spkr.enroll import main as enroll_main

    ckpt = untrained_checkpoint(tmp_path / "ckpt.pt")
    other = untrained_checkpoint(tmp_path / "other.pt", seed=1)
    db = tmp_path / "speakers.npz"
    assert (
        enroll_main(["--checkpoint", str(other), "--speaker", "alice", str(demo_flacs[0]), "--db", str(db)])
        == 0
    )
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    capsys.readouterr()
    cases = [
        ([str(demo_flacs[1]), "--checkpoint", str(ckpt), "--db", str(db)], "enrolled with another model"),
        ([str(empty), "--checkpoint", str(other), "--db", str(db)], "empty.wav: audio file has no samples"),
        (
            [str(demo_flacs[1]), "--checkpoint", str(other), "--db", str(tmp_path / "no.npz")],
            "no such gallery",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_predict_db_uses_the_checkpoint_the_gallery_records(tmp_path, demo_flacs, capsys):
    from spkr.enroll import main as enroll_main
    from spkr.gallery import Gallery

    (tmp_path / "run").mkdir()
    ckpt = _with_thresholds(untrained_checkpoint(tmp_path / "run" / "last.pt"))
    db = tmp_path / "speakers.npz"
    alice = [str(f) for f in demo_flacs if f.name.startswith("1003-")][:2]
    bob = [str(f) for f in demo_flacs if f.name.startswith("1004-")][:1]
    assert enroll_main(["--checkpoint", str(ckpt), "--speaker", "alice", *alice, "--db", str(db)]) == 0
    assert enroll_main(["--checkpoint", str(ckpt), "--speaker", "bob", *bob, "--db", str(db)]) == 0
    capsys.readouterr()

    assert main([bob[0], "--db", str(db), "--json"]) == 0  # the command: no --checkpoint
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["top"][0]["speaker"] == "bob" and out["decision"] == "accept" and out["threshold"] == 0.5
    assert f"checkpoint {ckpt.resolve()} (recorded in {db})" in captured.err
    with_ckpt = [bob[0], "--db", str(db), "--json", "--checkpoint", str(ckpt)]
    assert main(with_ckpt) == 0 and json.loads(capsys.readouterr().out) == out  # the same answer

    def error(argv) -> str:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        return err

    other = untrained_checkpoint(tmp_path / "other.pt", seed=1)
    assert "enrolled with another model" in error([bob[0], "--db", str(db), "--checkpoint", str(other)])
    assert "give --checkpoint" in error([bob[0]])  # neither --db nor --checkpoint

    ckpt.rename(tmp_path / "elsewhere.pt")  # the recorded checkpoint is gone
    err = error([bob[0], "--db", str(db)])
    assert f"{db}: its checkpoint is missing: expected {ckpt.resolve()}" in err and "give --checkpoint" in err
    assert main([bob[0], "--db", str(db), "--checkpoint", str(tmp_path / "elsewhere.pt")]) == 0
    capsys.readouterr()

    untrained_checkpoint(ckpt, seed=2)  # another model written where the gallery's was
    err = error([bob[0], "--db", str(db)])
    assert f"the checkpoint it records, {ckpt.resolve()}, now holds other weights" in err

    old = Gallery.load(db)  # a gallery written before galleries recorded their checkpoint
    old.checkpoint = old.checkpoint_relative = None
    old.save(tmp_path / "old.npz")
    err = error([bob[0], "--db", str(tmp_path / "old.npz")])
    assert "old.npz: the gallery does not record its checkpoint" in err and "give --checkpoint" in err

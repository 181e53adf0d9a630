"""Log-mel features: the two backends agree on real speech; audio input errors name the file."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from spkr.features import (
    AudioError,
    FeatureConfig,
    LogMel,
    compute_logmel,
    load_audio,
    mel_filterbank,
    resample,
    torchaudio_available,
)

# Measured on the bundled speech: max |torchaudio - torch| = 3e-4 dB (float32), i.e. below the
# float16 on-disk resolution at these magnitudes (0.03 dB). We assert a 5e-3 dB bound.
BACKEND_ATOL_DB = 5e-3

needs_torchaudio = pytest.mark.skipif(not torchaudio_available(), reason="torchaudio does not import")


@needs_torchaudio
def test_backends_agree_on_real_speech(demo_flacs):
    cfg = FeatureConfig()
    ta, pt = LogMel(cfg, "torchaudio"), LogMel(cfg, "torch")
    worst = 0.0
    for path in demo_flacs[:: max(1, len(demo_flacs) // 6)]:
        wave = torch.from_numpy(load_audio(path, cfg))
        a, b = ta(wave), pt(wave)
        assert a.shape == b.shape == (cfg.num_frames(wave.numel()), cfg.n_mels)
        worst = max(worst, float((a - b).abs().max()))
    assert worst < BACKEND_ATOL_DB, worst


@needs_torchaudio
def test_filterbank_matches_torchaudio():
    import torchaudio.functional as F

    for scale in ("htk", "slaney"):
        cfg = FeatureConfig(mel_scale=scale, n_mels=40, f_min=0.0, f_max=8000.0)
        ref = F.melscale_fbanks(
            cfg.n_fft // 2 + 1, cfg.f_min, cfg.f_max, cfg.n_mels, cfg.sample_rate, None, scale
        )
        torch.testing.assert_close(mel_filterbank(cfg), ref, atol=1e-5, rtol=1e-4)


@needs_torchaudio
def test_resample_matches_torchaudio():
    import torchaudio.functional as F

    rng = np.random.default_rng(0)
    wave = rng.standard_normal(22050).astype(np.float32) * 0.1
    for orig in (8000, 22050, 44100):
        ours = resample(wave[: orig // 2], orig, 16000)
        ref = F.resample(torch.from_numpy(wave[: orig // 2]), orig, 16000).numpy()
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_batch_and_single_agree_and_top_db_floor():
    cfg = FeatureConfig()
    lm = LogMel(cfg, "torch")
    rng = np.random.default_rng(1)
    waves = torch.from_numpy(rng.standard_normal((2, 8000)).astype(np.float32))
    waves[1] *= 1e-3  # a much quieter utterance keeps its own floor
    batch = lm(waves)
    for i in range(2):
        torch.testing.assert_close(batch[i], lm(waves[i]))
        assert float(batch[i].max() - batch[i].min()) <= cfg.top_db + 1e-4


def test_compute_logmel_dtype_and_time_major(demo_flacs):
    cfg = FeatureConfig()
    wave = load_audio(demo_flacs[0], cfg)
    feats = compute_logmel(wave, LogMel(cfg))
    assert feats.dtype == np.float16 and feats.shape == (cfg.num_frames(len(wave)), 80)


def test_config_fingerprint_and_unknown_keys():
    a, b = FeatureConfig(), FeatureConfig(n_mels=64)
    assert a.fingerprint() == FeatureConfig.from_dict(a.to_dict()).fingerprint()
    assert a.fingerprint() != b.fingerprint()
    with pytest.raises(ValueError, match="unknown key"):
        FeatureConfig.from_dict({**a.to_dict(), "n_mel": 80})
    with pytest.raises(ValueError, match="f_max"):
        FeatureConfig(f_max=9000.0)


def test_load_audio_downmix_and_resample(tmp_path):
    cfg = FeatureConfig()
    t = np.arange(8000) / 8000
    left, right = np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)
    path = tmp_path / "stereo8k.wav"
    sf.write(path, np.stack([left, right], 1).astype(np.float32) * 0.5, 8000)
    with pytest.raises(AudioError, match=r"stereo8k\.wav: 2 channels"):
        load_audio(path, cfg, allow_downmix=False)
    with pytest.raises(AudioError, match=r"stereo8k\.wav: sample rate 8000 Hz"):
        load_audio(path, cfg, allow_resample=False)
    wave = load_audio(path, cfg)
    assert wave.shape == (16000,) and wave.dtype == np.float32
    mono = load_audio(path, FeatureConfig(sample_rate=8000, f_max=4000.0))
    np.testing.assert_allclose(mono, 0.25 * (left + right), atol=1e-4)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "cannot decode"), (b"RIFF\x00\x00not really a wave file" * 3, "cannot decode")],
)
def test_load_audio_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "broken.flac"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=rf"broken\.flac: {message}"):
        load_audio(path, FeatureConfig())


def test_load_audio_empty_and_short(tmp_path):
    cfg = FeatureConfig()
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match=r"empty\.wav: audio file has no samples"):
        load_audio(empty, cfg)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(100, np.float32), 16000)
    with pytest.raises(AudioError, match=r"short\.wav: too short"):
        load_audio(short, cfg, min_seconds=0.1)
    assert load_audio(short.read_bytes(), cfg, name="x").shape == (100,)

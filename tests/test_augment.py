"""spkr.augment: achieved SNRs, RIR alignment and power, speed factors, determinism, descriptions, errors.

The noise set is the one tools/make_noise_corpus.py writes (run once per module as a CLI)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from spkr.augment import (
    AugmentConfig,
    AugmentError,
    AugmentSources,
    augment,
    augment_identity,
    copy_key,
    copy_recipe,
    copy_speaker,
    description_json,
    mix_at_snr,
    read_source,
    reverberate,
    segment,
    source_key,
    speed_classes,
    speed_perturb,
    speed_speaker,
    synthetic_rir,
)
from spkr.config import ConfigError
from spkr.features import AudioError, FeatureConfig, load_audio

from .conftest import DEMO_ROOT

SR = 16000
UTT = DEMO_ROOT / "LibriSpeech" / "test-clean" / "1004" / "9161" / "1004-9161-0025.flac"
KEY = "1004-9161-0025"


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory, noise_tool) -> Path:
    out = tmp_path_factory.mktemp("noise")
    assert noise_tool.main(["--out", str(out), "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def wave() -> np.ndarray:
    return load_audio(UTT, FeatureConfig())


def config(noise_dir: Path, **kw) -> AugmentConfig:
    return AugmentConfig(**{"copies": 4, "noise_dir": str(noise_dir), **kw})


def snr_db(clean: np.ndarray, mixed: np.ndarray) -> float:
    clean64 = clean.astype(np.float64)
    return 10 * math.log10(np.mean(clean64**2) / np.mean((mixed.astype(np.float64) - clean64) ** 2))


# --------------------------------------------------------------------------- additive sources


@pytest.mark.parametrize("kind, low_high", [("noise", (0, 15)), ("music", (5, 15)), ("babble", (13, 20))])
def test_achieved_snr_is_the_described_one_within_0_1_db(noise_dir, wave, kind, low_high):
    cfg = config(noise_dir, kinds=(kind,), copies=6)
    sources = AugmentSources(cfg, SR)
    for k in range(cfg.copies):
        out, desc = augment(wave, SR, KEY, k, cfg, sources)
        (step,) = desc["steps"]
        assert step["type"] == kind and low_high[0] <= step["snr_db"] <= low_high[1]
        assert abs(snr_db(wave, out) - step["snr_db"]) < 0.1
        assert out.dtype == np.float32 and out.shape == wave.shape
        if kind == "babble":
            assert 3 <= len(step["sources"]) <= 7
            assert all(s["file"].startswith("speech/") for s in step["sources"])


def test_mix_at_snr_hits_extreme_snrs():
    rng = np.random.default_rng(0)
    speech, noise = rng.standard_normal(8000).astype(np.float32), 5 * rng.standard_normal(8000)
    for target in (-5.0, 0.0, 20.0, 40.0):
        assert abs(snr_db(speech, mix_at_snr(speech, noise, target)) - target) < 0.1


def test_description_reproduces_the_noise_copy(noise_dir, wave):
    """The description is enough to redo the copy by hand: file, offset (tiling), SNR."""
    cfg = config(noise_dir, kinds=("noise",), copies=8)
    sources = AugmentSources(cfg, SR)
    for k in range(cfg.copies):
        out, desc = augment(wave, SR, KEY, k, cfg, sources)
        (step,) = desc["steps"]
        (src,) = step["sources"]
        noise = read_source(noise_dir / src["file"], SR)
        assert src["tiled"] == (len(noise) < len(wave))
        part = np.take(noise, (src["offset"] + np.arange(len(wave))) % len(noise))
        np.testing.assert_array_equal(out, mix_at_snr(wave, part, step["snr_db"]))


def test_segment_takes_a_slice_or_tiles():
    rng = np.random.default_rng(1)
    long = np.arange(100.0)
    for _ in range(20):
        part, offset = segment(long, 30, rng)
        assert 0 <= offset <= 70
        np.testing.assert_array_equal(part, long[offset : offset + 30])
    short = np.arange(5.0)
    part, offset = segment(short, 12, rng)
    np.testing.assert_array_equal(part, [(offset + i) % 5 for i in range(12)])


def test_segment_reads_equal_slices_of_the_whole_decoded_file(noise_dir):
    """Additive sources are read segment-wise (seeking in the wav/flac): the same samples and draws as
    decoding the whole file and slicing it."""
    cfg = config(noise_dir, kinds=("noise", "music", "babble"))
    sources, whole = AugmentSources(cfg, SR), AugmentSources(cfg, SR)
    for rel in [rel for files in sources.files.values() for rel in files]:
        for n in (3000, 20000):
            part, offset, tiled = sources.noise_segment(rel, n, np.random.default_rng(n))
            source = whole.noise(rel)
            expected, expected_offset = segment(source, n, np.random.default_rng(n))
            np.testing.assert_array_equal(part, expected)
            assert (offset, tiled) == (expected_offset, len(source) < n), rel


def test_other_rates_and_channels_are_resampled_and_downmixed(noise_dir):
    path = noise_dir / "music" / "tonal" / "music-000.wav"  # 22.05 kHz stereo
    info = sf.info(str(path))
    assert (info.samplerate, info.channels) == (22050, 2)
    wave = read_source(path, SR)
    assert wave.ndim == 1 and abs(len(wave) - info.frames * SR / 22050) <= 1


# --------------------------------------------------------------------------- reverberation


def test_reverb_keeps_power_length_and_direct_path_alignment(wave):
    rng = np.random.default_rng(2)
    rir = synthetic_rir(SR, 0.5, 3.0, rng)
    delayed = np.concatenate([np.zeros(123, np.float32), rir])  # a leading gap must not shift the output
    out = reverberate(wave, delayed)
    assert out.shape == wave.shape
    assert abs(np.mean(out.astype(np.float64) ** 2) / np.mean(wave.astype(np.float64) ** 2) - 1) < 1e-4
    np.testing.assert_allclose(out, reverberate(wave, rir), atol=1e-5)
    impulse = np.zeros(300, np.float32)
    impulse[200] = 0.25
    np.testing.assert_allclose(reverberate(wave, impulse), wave, atol=1e-6)  # pure delay + gain: unchanged


def test_synthetic_rir_has_the_requested_drr_and_decay():
    rir = synthetic_rir(SR, 0.6, 4.0, np.random.default_rng(3)).astype(np.float64)
    assert rir[0] == 1.0 and len(rir) == int(0.6 * SR)
    assert abs(10 * math.log10(1.0 / np.sum(rir[1:] ** 2)) - 4.0) < 1e-3
    early, late = np.sum(rir[800:1600] ** 2), np.sum(rir[8000:8800] ** 2)  # 50 ms windows 0.45 s apart
    assert abs(10 * math.log10(early / late) - 60 * 0.45 / 0.6) < 3.0  # -60 dB per RT60


def test_reverb_from_a_folder_is_described_and_reproducible(noise_dir, wave):
    cfg = config(noise_dir, kinds=("reverb",), rir_dir=str(noise_dir / "rirs"))
    sources = AugmentSources(cfg, SR)
    for k in range(cfg.copies):
        out, desc = augment(wave, SR, KEY, k, cfg, sources)
        rel = desc["steps"][0]["rir"]
        assert rel.startswith("synthetic/rir-")
        np.testing.assert_array_equal(out, reverberate(wave, read_source(noise_dir / "rirs" / rel, SR)))


def test_synthetic_reverb_parameters_are_in_range(noise_dir, wave):
    cfg = AugmentConfig(copies=3, kinds=("reverb",), rt60_s=(0.3, 0.4), drr_db=(1.0, 2.0))
    for k in range(3):
        _, desc = augment(wave, SR, KEY, k, cfg, AugmentSources(cfg, SR))
        params = desc["steps"][0]["synthetic"]
        assert 0.3 <= params["rt60_s"] <= 0.4 and 1.0 <= params["drr_db"] <= 2.0


# --------------------------------------------------------------------------- speed


@pytest.mark.parametrize("factor", [0.9, 1.1, 0.95])
def test_speed_changes_length_and_pitch_by_the_factor(factor):
    t = np.arange(SR) / SR
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    out = speed_perturb(tone, factor)
    assert len(out) == math.ceil(len(tone) / factor)
    spectrum = np.abs(np.fft.rfft(out[1000:-1000] * np.hanning(len(out) - 2000)))
    peak_hz = np.argmax(spectrum) * SR / (len(out) - 2000)
    assert abs(peak_hz - 440.0 * factor) < 2.0


def test_speed_copies_and_speaker_classes(noise_dir, wave):
    cfg = AugmentConfig(copies=2, kinds=("speed",), speeds=(0.9, 1.1), speed_classes=True)
    factors = set()
    for key in [f"1004-9161-{i:04d}" for i in range(12)]:
        for k in range(2):
            out, desc = augment(wave, SR, key, k, cfg, AugmentSources(cfg, SR))
            factor = desc["steps"][0]["factor"]
            factors.add(factor)
            assert len(out) == math.ceil(len(wave) / factor)
            assert copy_speaker("1004", key, k, cfg) == f"1004@sp{factor:g}"
            assert copy_recipe(key, k, cfg) == ("speed", factor)
    assert factors == {0.9, 1.1}
    assert speed_classes(["19", "26"], cfg) == ["19@sp0.9", "26@sp0.9", "19@sp1.1", "26@sp1.1"]
    assert speed_classes(["19"], AugmentConfig(copies=2, kinds=("speed",))) == []
    no_classes = AugmentConfig(copies=2, kinds=("speed", "reverb"))
    assert {copy_speaker("19", "19-1-0001", k, no_classes) for k in range(2)} == {"19"}
    chained = AugmentConfig(copies=1, kinds=("speed+reverb",), speed_classes=True)
    kind, factor = copy_recipe("19-1-0001", 0, chained)
    assert kind == "speed+reverb" and copy_speaker("19", "19-1-0001", 0, chained) == f"19@sp{factor:g}"
    assert (
        copy_speaker("19", "19-1-0001", 0, AugmentConfig(copies=1, kinds=("reverb",), speed_classes=True))
        == "19"
    )
    assert speed_speaker("19", 1.05) == "19@sp1.05"


def test_copy_keys_round_trip():
    assert copy_key("19-198-0001", 2) == "19-198-0001~aug2"
    assert source_key("19-198-0001~aug2") == ("19-198-0001", 2)
    assert source_key("19-198-0001") == ("19-198-0001", None)


# --------------------------------------------------------------------------- determinism


def all_copies(noise_dir, wave, keys, cfg):
    sources = AugmentSources(cfg, SR)
    return {(key, k): augment(wave, SR, key, k, cfg, sources) for key in keys for k in range(cfg.copies)}


def test_same_inputs_give_identical_copies_in_any_order(noise_dir, wave):
    kinds = ("noise", "music", "babble", "reverb", "speed", "speed+reverb+babble")
    cfg = config(noise_dir, kinds=kinds, copies=6, rir_dir=str(noise_dir / "rirs"))
    keys = [f"1004-9161-{i:04d}" for i in range(4)]
    first = all_copies(noise_dir, wave, keys, cfg)
    again = all_copies(noise_dir, wave, keys[::-1], cfg)  # other order, fresh cache
    for ident, (out, desc) in first.items():
        np.testing.assert_array_equal(out, again[ident][0])
        assert desc == again[ident][1]
    # an utterance's copies use distinct kinds, so they differ from each other
    for key in keys:
        assert sorted(first[(key, k)][1]["kind"] for k in range(6)) == sorted(kinds)
        assert len({first[(key, k)][0].tobytes() for k in range(6)}) == 6


def test_seed_and_copy_index_change_the_copy(noise_dir, wave):
    cfg = config(noise_dir, kinds=("noise",), copies=2)
    sources = AugmentSources(cfg, SR)
    a = augment(wave, SR, KEY, 0, cfg, sources)
    assert not np.array_equal(a[0], augment(wave, SR, KEY, 1, cfg, sources)[0])
    other_seed = config(noise_dir, kinds=("noise",), copies=2, seed=1)
    assert not np.array_equal(a[0], augment(wave, SR, KEY, 0, other_seed, sources)[0])


@pytest.mark.slow
def test_copies_are_byte_identical_in_another_process_with_other_threads(noise_dir, wave):
    """A 1-process shard run (default threads) writes the bytes its spawned workers (1 thread) write:
    nothing may depend on the process (hash seeds) or on the thread count (here 1, there 2)."""
    kinds = ("speed+reverb+noise", "babble")
    cfg = config(noise_dir, kinds=kinds, copies=2)
    here = hashlib.sha256(
        b"".join(augment(wave, SR, KEY, k, cfg, AugmentSources(cfg, SR))[0].tobytes() for k in range(2))
    )
    code = (
        "import hashlib, sys, torch; torch.set_num_threads(2)\n"
        "from spkr.augment import AugmentConfig, AugmentSources, augment\n"
        "from spkr.features import FeatureConfig, load_audio\n"
        f"cfg = AugmentConfig(copies=2, kinds={kinds!r}, noise_dir={str(noise_dir)!r})\n"
        f"w = load_audio({str(UTT)!r}, FeatureConfig())\n"
        f"outs = [augment(w, 16000, {KEY!r}, k, cfg, AugmentSources(cfg, 16000))[0].tobytes() for k in range(2)]\n"
        "print(hashlib.sha256(b''.join(outs)).hexdigest())\n"
    )
    there = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert there.stdout.strip() == here.hexdigest()


# --------------------------------------------------------------------------- descriptions and config


def test_descriptions_round_trip_json(noise_dir, wave):
    cfg = config(noise_dir, kinds=("speed+reverb+music", "babble", "noise"), copies=3)
    for k in range(3):
        _, desc = augment(wave, SR, KEY, k, cfg, AugmentSources(cfg, SR))
        assert json.loads(description_json(desc)) == desc
        assert desc["key"] == copy_key(KEY, k) and desc["source"] == KEY and desc["copy"] == k
        assert [s["type"] for s in desc["steps"]] == [
            p for p in ("speed", "reverb", "music", "babble", "noise") if p in desc["kind"]
        ]


def test_config_round_trips_and_rejects_bad_values(noise_dir):
    cfg = config(noise_dir, kinds=("noise", "reverb+speed"), speeds=(0.9, 1.05))
    assert AugmentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown key.*snr"):
        AugmentConfig.from_dict({"snr": [0, 5]}, "shard.toml [augment]")
    bad = [
        ({"kinds": ("noise", "echo")}, "echo"),
        ({"kinds": ("noise+noise",)}, "distinct"),
        ({"noise_snr_db": (10.0, 5.0)}, "noise_snr_db"),
        ({"speeds": (0.937,)}, "0.937"),
        ({"speeds": (1.0,)}, "not 1"),
        ({"noise_dir": None}, "need noise_dir"),
        ({"copies": -1}, ">= 0"),
    ]
    for overrides, message in bad:
        with pytest.raises(AugmentError, match=message):
            AugmentConfig(
                **{"copies": 2, "noise_dir": str(noise_dir), "kinds": ("noise", "speed"), **overrides}
            )
    with pytest.raises(AugmentError, match="copy index 4"):
        augment(np.ones(1000, np.float32), SR, KEY, 4, cfg, AugmentSources(cfg, SR))
    with pytest.raises(AugmentError, match="8000 Hz"):
        augment(np.ones(1000, np.float32), 8000, KEY, 0, cfg, AugmentSources(cfg, SR))


# --------------------------------------------------------------------------- folder and file errors


def test_empty_or_missing_noise_folders_are_named(tmp_path):
    (tmp_path / "noise").mkdir()
    (tmp_path / "noise" / "README.txt").write_text("no audio here")
    with pytest.raises(
        AugmentError, match=f"{tmp_path / 'noise'}: no .wav/.flac files for augment kind noise"
    ):
        AugmentSources(config(tmp_path, kinds=("noise",)), SR)
    with pytest.raises(AugmentError, match="music.*folder not found"):
        AugmentSources(config(tmp_path, kinds=("music",)), SR)
    with pytest.raises(AugmentError, match="RIR folder not found"):
        AugmentSources(AugmentConfig(copies=1, kinds=("reverb",), rir_dir=str(tmp_path / "none")), SR)


def test_unreadable_or_empty_source_file_is_named(tmp_path, wave):
    bad = tmp_path / "noise" / "broken" / "bad.wav"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"RIFF not really a wav file")
    cfg = config(tmp_path, kinds=("noise",))
    with pytest.raises(AudioError, match=f"{bad}: cannot decode audio"):
        augment(wave, SR, KEY, 0, cfg, AugmentSources(cfg, SR))
    sf.write(bad, np.zeros(0, np.float32), SR)
    with pytest.raises(AudioError, match=f"{bad}: audio file has no samples"):
        augment(wave, SR, KEY, 0, cfg, AugmentSources(cfg, SR))
    sf.write(bad, np.ones(100, np.float32) * 0.1, SR)
    with pytest.raises(AudioError, match=f"{bad}: 10 samples from 90, expected 50"):
        read_source(bad, SR, start=90, frames=50)


def test_identity_follows_contents_not_locations(noise_dir, tmp_path):
    cfg = config(noise_dir, kinds=("noise", "reverb"), rir_dir=str(noise_dir / "rirs"))
    moved = tmp_path / "moved"
    shutil.copytree(noise_dir, moved)
    moved_cfg = config(moved, kinds=("noise", "reverb"), rir_dir=str(moved / "rirs"))
    identity = augment_identity(cfg, AugmentSources(cfg, SR))
    assert identity == augment_identity(moved_cfg, AugmentSources(moved_cfg, SR))
    assert identity["noise_dir"] is None and identity["kinds"] == ["noise", "reverb"]
    (moved / "rirs" / "synthetic" / "rir-000.wav").unlink()
    assert identity != augment_identity(moved_cfg, AugmentSources(moved_cfg, SR))
    more_copies = config(noise_dir, kinds=("noise", "reverb"), rir_dir=str(noise_dir / "rirs"), copies=5)
    assert identity != augment_identity(more_copies, AugmentSources(more_copies, SR))


def test_silent_inputs_are_left_unchanged_and_say_so(noise_dir):
    cfg = config(noise_dir, kinds=("noise",))
    silent = np.zeros(4000, np.float32)
    out, desc = augment(silent, SR, KEY, 0, cfg, AugmentSources(cfg, SR))
    np.testing.assert_array_equal(out, silent)
    assert desc["steps"][0]["skipped"] == "silent utterance"


# --------------------------------------------------------------------------- the noise-set tool


def test_noise_corpus_is_a_function_of_the_seed(noise_dir, noise_tool, tmp_path):
    counts = noise_tool.make_noise_corpus(tmp_path, seed=3)
    assert counts == {"noise": 6, "music": 4, "speech": 12, "rirs": 8}
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(noise_dir) for p in noise_dir.rglob("*") if p.is_file())
    for rel in files:
        assert (tmp_path / rel).read_bytes() == (noise_dir / rel).read_bytes(), rel
    short = read_source(tmp_path / "noise" / "coloured" / "white-000.wav", SR)
    assert len(short) == SR // 2  # shorter than most utterances: exercises tiling

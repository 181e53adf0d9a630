"""Shared fixtures: the bundled demo corpus and tiny synthetic LibriSpeech-layout corpora."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
DEMO_ROOT = REPO / "data" / "demo"

# Keep every test process to one intra-op thread: 2 cores, and tests run torchrun with 2 ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Remote shard sets' index files are cached here (spkr.shards.index.index_cache_dir), not in ~/.cache.
os.environ.setdefault("SPKR_INDEX_CACHE", tempfile.mkdtemp(prefix="spkr-index-cache-"))


def write_corpus(
    root: Path,
    layout: dict[str, list[int]],
    utts_per_speaker: int = 6,
    seed: int = 0,
    speakers_txt: bool = True,
) -> Path:
    """A tiny LibriSpeech tree: <root>/LibriSpeech/<subset>/<spk>/<chapter>/<spk>-<chapter>-<n>.flac.
    Each speaker is a harmonic tone at its own pitch plus noise, 0.4-1.2 s long."""
    rng = np.random.default_rng(seed)
    base = root / "LibriSpeech"
    rows = []
    for subset, speakers in layout.items():
        for spk in speakers:
            chapter = 10 * spk + 1
            d = base / subset / str(spk) / str(chapter)
            d.mkdir(parents=True, exist_ok=True)
            lines = []
            for n in range(utts_per_speaker):
                t = np.arange(int(16000 * rng.uniform(0.4, 1.2))) / 16000
                f0 = 80.0 + 23.0 * spk
                wave = sum(0.2 / k * np.sin(2 * np.pi * k * f0 * t) for k in (1, 2, 3))
                wave = wave + 0.01 * rng.standard_normal(len(t))
                key = f"{spk}-{chapter}-{n:04d}"
                sf.write(d / f"{key}.flac", wave.astype(np.float32), 16000)
                lines.append(f"{key} HELLO SPEAKER {spk}")
            (d / f"{spk}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
            rows.append(f"{spk:<5}| M | {subset:<16} | 1.00 | tone {spk}")
    if speakers_txt:
        (base / "SPEAKERS.TXT").write_text(
            ";ID  |SEX| SUBSET           |MINUTES| NAME\n" + "\n".join(rows) + "\n"
        )
    return root


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    """4 train speakers, 1 dev and 1 test speaker (LibriSpeech's structure), 6 utterances each."""
    return write_corpus(
        tmp_path / "corpus", {"train-clean-100": [1, 2, 3, 4], "dev-clean": [5], "test-clean": [6]}
    )


@pytest.fixture(scope="session")
def demo_flacs() -> list[Path]:
    files = sorted((DEMO_ROOT / "LibriSpeech").rglob("*.flac"))
    assert files, f"bundled demo corpus missing under {DEMO_ROOT}"
    return files


@pytest.fixture(scope="session")
def open_shards(tmp_path_factory) -> Path:
    """Shards of the small demo corpus (tests/runkit.small_corpus) with ``--protocol open``:
    train/valid (10 training speakers), valid-verify (2 unseen speakers), test-verify (4), trial lists."""
    from spkr.tools.shard import main as shard_main
    from tests.runkit import small_corpus

    base = tmp_path_factory.getbasetemp()
    out = base / "demo_open_shards"
    if not (out / "manifest.json").exists():
        corpus = small_corpus(base / "demo_corpus")
        argv = ["--source", str(corpus), "--subsets", "train.100", "--out", str(out), "--protocol", "open"]
        assert shard_main(argv + ["--workers", "2", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def noise_tool():
    """tools/make_noise_corpus.py as a module (a developer tool, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_noise_corpus", REPO / "tools" / "make_noise_corpus.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool

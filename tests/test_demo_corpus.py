"""The bundled demo corpus (data/demo, made by tools/make_demo_corpus.py) has LibriSpeech's layout.

Fast: reads headers and transcripts only, never synthesises.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
LS = DEMO / "LibriSpeech"
SUBSETS = ("train-clean-100", "dev-clean", "test-clean")
KEY_RE = re.compile(r"^(\d+)-(\d+)-(\d{4})$")

pytestmark = pytest.mark.skipif(not LS.is_dir(), reason=f"demo corpus missing: {LS}")


def _speakers_txt() -> dict[str, dict]:
    rows: dict[str, dict] = {}
    lines = (LS / "SPEAKERS.TXT").read_text(encoding="utf-8").splitlines()
    assert any(line.startswith(";ID") for line in lines), "SPEAKERS.TXT lacks the ';ID |SEX| ...' header"
    for line in lines:
        if not line.strip() or line.startswith(";"):
            continue
        fields = [f.strip() for f in line.split("|", 4)]
        assert len(fields) == 5, f"bad SPEAKERS.TXT row: {line!r}"
        sid, sex, subset, minutes, name = fields
        assert sid.isdigit() and sex in ("M", "F") and subset in SUBSETS and name, line
        assert float(minutes) > 0, line
        assert sid not in rows, f"speaker {sid} listed twice"
        rows[sid] = {"sex": sex, "subset": subset, "minutes": float(minutes), "name": name}
    return rows


def _tree() -> dict[str, set[str]]:
    """subset -> speakers present on disk."""
    out: dict[str, set[str]] = {}
    for subset in SUBSETS:
        d = LS / subset
        assert d.is_dir(), f"missing subset directory {d}"
        out[subset] = {p.name for p in d.iterdir() if p.is_dir()}
    return out


def test_speakers_txt_matches_tree():
    rows = _speakers_txt()
    tree = _tree()
    on_disk = {spk: subset for subset, spks in tree.items() for spk in spks}
    assert len(rows) >= 16
    assert {s: r["subset"] for s, r in rows.items()} == on_disk


def test_subsets_are_speaker_disjoint():
    tree = _tree()
    assert len(tree["train-clean-100"]) >= 8
    assert tree["dev-clean"] and tree["test-clean"]
    assert not tree["train-clean-100"] & tree["dev-clean"]
    assert not tree["train-clean-100"] & tree["test-clean"]
    assert not tree["dev-clean"] & tree["test-clean"]
    assert sum(len(s) for s in tree.values()) >= 16


def test_audio_and_transcripts_pair_up():
    per_speaker: dict[str, int] = defaultdict(int)
    n_flac = 0
    for subset in SUBSETS:
        for spk_dir in (LS / subset).iterdir():
            chapters = [c for c in spk_dir.iterdir() if c.is_dir()]
            assert 1 <= len(chapters) <= 2, spk_dir
            for ch in chapters:
                spk, chap = spk_dir.name, ch.name
                trans = ch / f"{spk}-{chap}.trans.txt"
                assert trans.is_file(), f"missing {trans}"
                lines = trans.read_text(encoding="utf-8").splitlines()
                keys = set()
                for line in lines:
                    key, _, text = line.partition(" ")
                    m = KEY_RE.match(key)
                    assert m and m.group(1) == spk and m.group(2) == chap, f"{trans}: bad key {key!r}"
                    assert text and text == text.upper() and re.fullmatch(r"[A-Z' ]+", text), line
                    keys.add(key)
                assert len(keys) == len(lines), f"{trans}: duplicate keys"
                flacs = {p.stem for p in ch.glob("*.flac")}
                assert flacs == keys, f"{ch}: audio/transcript mismatch {sorted(flacs ^ keys)[:5]}"
                others = {p.name for p in ch.iterdir()} - {f"{k}.flac" for k in keys} - {trans.name}
                assert not others, f"{ch}: unexpected files {sorted(others)}"
                per_speaker[spk] += len(keys)
                n_flac += len(keys)
    assert n_flac >= 16 * 16
    assert min(per_speaker.values()) >= 16, dict(per_speaker)


def test_flacs_are_16k_mono_pcm16():
    files = sorted(LS.rglob("*.flac"))
    assert files
    for p in files:
        info = sf.info(str(p))
        assert (info.format, info.subtype) == ("FLAC", "PCM_16"), p
        assert info.samplerate == 16000 and info.channels == 1, p
        assert 0.5 <= info.duration <= 4.5, f"{p}: {info.duration:.2f} s"


def test_flac_decodes():
    for p in sorted(LS.rglob("*.flac"))[::37]:
        x, sr = sf.read(str(p), dtype="float32")
        assert sr == 16000 and x.ndim == 1 and len(x) > 8000
        assert 1e-4 < float(abs(x).max()) <= 1.0, p


def test_total_size():
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= 20 * 1024 * 1024, f"data/demo is {size / 1e6:.1f} MB"


def test_readable_by_corpus_reader():
    librispeech = pytest.importorskip("spkr.corpus.librispeech")
    utts = list(librispeech.iter_openslr(DEMO, list(SUBSETS), with_duration=False))
    assert len(utts) == len(list(LS.rglob("*.flac")))
    assert all(u.transcript for u in utts)
    assert {u.subset for u in utts} == set(SUBSETS)

"""The bundled demo corpus (data/demo, made by tools/make_demo_corpus.py) has LibriSpeech's layout.

Fast: reads headers and transcripts only, never synthesises.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
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


# ---------------------------------------------------------------------------------------------------
# tools/make_demo_corpus.py: the plan (fast, no synthesis) and, marked slow, a few renders


def _tool():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("make_demo_corpus", REPO / "tools" / "make_demo_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_demo_corpus"] = module
    spec.loader.exec_module(module)
    return module


def _plan_tree(speakers: dict) -> dict:
    return {spk: (s["subset"], s["voice"].label, tuple(s["chapters"])) for spk, s in speakers.items()}


def test_default_plan_is_the_bundled_corpus():
    """The defaults (as data/demo/README.md says it was made) plan exactly the bundled tree."""
    tool = _tool()
    jobs, speakers = tool.plan(16, 40, 0, 2, 4)
    rows = _speakers_txt()
    assert {str(spk): (s[0], s[1]) for spk, s in _plan_tree(speakers).items()} == {
        sid: (r["subset"], r["name"]) for sid, r in rows.items()
    }
    on_disk = {p.stem for p in LS.rglob("*.flac")}
    assert {j.key for j in jobs} == on_disk
    for j in jobs:
        assert (LS / j.subset / str(j.speaker) / str(j.chapter) / f"{j.key}.flac").is_file()


def test_other_voice_set_shares_no_voice_with_the_default():
    tool = _tool()
    default, other = tool.VOICE_SETS["default"], tool.VOICE_SETS["other"]
    assert len(other.voices) == 36 and len({v.label for v in other.voices}) == 36
    assert not {v.label for v in default.voices} & {v.label for v in other.voices}
    # a recorded person at most once (a shifted copy beside another would be confused with it)
    recorded = [(v.engine, v.name) for v in other.voices if v.engine != "espeak"]
    assert len(recorded) == len(set(recorded)) and all(
        v.pitch_cents for v in other.voices if v.engine != "espeak"
    )
    _, speakers = tool.plan(36, 40, 0, 4, 8, voice_set="other")
    assert sorted(speakers) == list(range(2001, 2037))
    by_subset: dict[str, set] = defaultdict(set)
    for s in speakers.values():
        by_subset[s["subset"]].add(s["voice"].engine == "espeak")
    assert all(kinds == {True, False} for kinds in by_subset.values()), by_subset  # both kinds everywhere


def test_min_chapters_two_gives_every_speaker_two_sessions():
    tool = _tool()
    jobs1, one = tool.plan(16, 40, 0, 2, 4)
    jobs2, two = tool.plan(16, 40, 0, 2, 4, min_chapters=2)
    assert all(len(s["chapters"]) == 2 for s in two.values())
    assert sum(len(s["chapters"]) == 1 for s in one.values()) == 8  # the bundled demo: 8 of 16
    for spk, s in one.items():  # speakers that drew two chapters anyway keep them and their sentences
        if len(s["chapters"]) == 2:
            assert two[spk]["chapters"] == s["chapters"]
            assert [j.key for j in jobs1 if j.speaker == spk] == [j.key for j in jobs2 if j.speaker == spk]
    per_speaker = defaultdict(set)
    for j in jobs2:
        per_speaker[j.speaker].add(j.key)
    assert {len(k) for k in per_speaker.values()} == {40}
    with pytest.raises(ValueError, match="min_chapters"):
        tool.plan(16, 40, 0, 2, 4, min_chapters=3)


def test_cli_bounds_speakers_by_the_voice_set(capsys):
    tool = _tool()
    with pytest.raises(SystemExit) as e:
        tool.main(["--voice-set", "other", "--speakers", "37", "--out", "unused"])
    assert e.value.code == 2 and "4..36" in capsys.readouterr().err


def _have_tts() -> bool:
    import shutil

    return all(shutil.which(b) for b in ("espeak-ng", "flite", "text2wave", "sox"))


@pytest.mark.slow
@pytest.mark.skipif(not _have_tts(), reason="speech synthesis tools missing")
def test_default_render_reproduces_bundled_audio(tmp_path):
    """Rendering with the defaults gives the bundled samples (flite and espeak-ng speakers), and an
    'other' voice renders (its sox pitch shift runs)."""
    tool = _tool()
    jobs, _ = tool.plan(16, 40, 0, 2, 4)
    for job in [j for j in jobs if j.voice.engine in ("flite", "espeak")][::150]:
        key, pcm, text = tool.render(job, 0, tmp_path)
        chapter = LS / job.subset / str(job.speaker) / str(job.chapter)
        bundled, sr = sf.read(str(chapter / f"{key}.flac"), dtype="int16")
        assert sr == 16000 and np.array_equal(pcm, bundled), key
        transcript = (chapter / f"{job.speaker}-{job.chapter}.trans.txt").read_text(encoding="utf-8")
        assert f"{key} {text}\n" in transcript
    other_jobs, _ = tool.plan(8, 2, 0, 1, 1, voice_set="other")
    key, pcm, _ = tool.render(other_jobs[0], 0, tmp_path)
    assert key.startswith("2001-") and 0.5 <= len(pcm) / 16000 <= 4.0 and abs(pcm).max() > 100

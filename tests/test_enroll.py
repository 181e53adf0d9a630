"""spkr.gallery (enrollment database .npz) and the spkr.enroll CLI on real checkpoints and demo audio."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from spkr.enroll import main
from spkr.gallery import FORMAT, VERSION, Gallery, GalleryError, decide
from spkr.scoring import l2_normalize
from tests.runkit import untrained_checkpoint

# --------------------------------------------------------------------------- Gallery


def unit(v) -> np.ndarray:
    return l2_normalize(np.asarray(v, dtype=np.float64))


def test_enroll_re_averages_by_count_and_appends_new_speakers():
    rng = np.random.default_rng(0)
    utts = rng.standard_normal((5, 4)) * rng.uniform(0.1, 10, (5, 1))  # various norms
    g = Gallery("fp", 4)
    assert g.enroll("alice", utts[:2]) == 2
    assert g.enroll("bob", utts[4]) == 1  # one (E,) vector
    assert g.enroll("alice", utts[2:4]) == 4  # re-averaged: as if enrolled at once
    assert g.names == ["alice", "bob"] and g.counts.tolist() == [4, 1]
    np.testing.assert_allclose(g.embeddings[0], unit(utts[:4]).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(g.embeddings[1], unit(utts[4]), rtol=1e-12)
    once = Gallery("fp", 4)
    once.enroll("alice", utts[:4])
    np.testing.assert_allclose(once.embeddings[0], g.embeddings[0], rtol=1e-12)


def test_identify_score_and_decide():
    g = Gallery("fp", 3)
    g.enroll("x", [[1.0, 0.0, 0.0]])
    g.enroll("y", [[0.0, 2.0, 0.0]])
    g.enroll("z", [[1.0, 1.0, 0.0], [1.0, -1.0, 0.0]])  # mean (1/sqrt2, 0, 0): direction x
    top = g.identify([3.0, 1.0, 0.0], top_k=2)
    assert [n for n, _ in top] == ["x", "z"]  # x and z tie: enrollment order
    assert top[0][1] == pytest.approx(3 / np.sqrt(10))
    assert [n for n, _ in g.identify([0.0, 1.0, 0.1], top_k=10)] == ["y", "x", "z"]
    assert g.score("y", [0.0, 1.0, 0.0]) == pytest.approx(1.0)
    assert g.scores(np.eye(3)).shape == (3, 3)
    assert decide(0.5, 0.5) and not decide(0.49, 0.5)
    with pytest.raises(GalleryError, match="no speaker is enrolled"):
        Gallery("fp", 3).identify([1.0, 0.0, 0.0])
    with pytest.raises(GalleryError, match=r"query embedding of shape \(4,\), expected \(3,\)"):
        g.identify([1.0, 0.0, 0.0, 0.0])


def test_remove_and_unknown_names():
    g = Gallery("fp", 2, "speakers.npz")
    for name, v in (("alice", [1.0, 0.0]), ("bob", [0.0, 1.0]), ("carol", [1.0, 1.0])):
        g.enroll(name, [v])
    g.remove("bob")
    assert g.names == ["alice", "carol"] and g.counts.tolist() == [1, 1] and g.embeddings.shape == (2, 2)
    with pytest.raises(GalleryError, match=r"speakers.npz: no enrolled speaker 'alise' .*did you mean alice"):
        g.remove("alise")
    with pytest.raises(GalleryError, match="no enrolled speaker 'bob'"):
        g.score("bob", [1.0, 0.0])


@pytest.mark.parametrize("name", ["", " alice", "alice\n", "a\tb", 7])
def test_unusable_speaker_names(name):
    with pytest.raises(GalleryError, match="speaker name"):
        Gallery("fp", 2).enroll(name, [[1.0, 0.0]])


def test_model_checks_and_bad_embeddings():
    g = Gallery("abc123", 4, "db.npz")
    g.check_model("abc123", 4)
    with pytest.raises(GalleryError, match="db.npz: enrolled with another model .*abc123.*ffff"):
        g.check_model("ffff", 4)
    with pytest.raises(GalleryError, match="db.npz: embeddings of dim 4, this model's are 8"):
        g.check_model("abc123", 8)
    with pytest.raises(GalleryError, match=r"expected \(m >= 1, 4\) embeddings, got shape \(2, 3\)"):
        g.enroll("a", np.ones((2, 3)))
    with pytest.raises(GalleryError, match="finite and non-zero"):
        g.enroll("a", np.zeros((1, 4)))
    with pytest.raises(GalleryError, match="finite and non-zero"):
        g.enroll("a", [[np.nan, 1, 1, 1]])
    assert len(g) == 0


def test_save_load_round_trip_plain_arrays(tmp_path):
    g = Gallery("f" * 32, 3)
    g.enroll("Zoë", [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    g.enroll("李", [[0.0, 0.0, 1.0]])
    path = tmp_path / "sub" / "speakers.npz"
    g.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["speakers.npz"]  # no temp file left
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(
            ["format", "version", "names", "embeddings", "counts", "weights_fingerprint", "embedding_dim"]
        )
        assert str(z["format"]) == FORMAT and int(z["version"]) == VERSION
        assert z["names"].dtype.kind == "U" and z["names"].tolist() == ["Zoë", "李"]
        assert z["embeddings"].dtype == np.float32 and z["embeddings"].shape == (2, 3)
        assert z["counts"].dtype == np.int64 and z["counts"].tolist() == [2, 1]
        assert str(z["weights_fingerprint"]) == "f" * 32 and int(z["embedding_dim"]) == 3
    back = Gallery.load(path)
    assert back.names == g.names and back.fingerprint == g.fingerprint and back.dim == 3
    np.testing.assert_allclose(back.embeddings, g.embeddings, rtol=1e-6)
    assert back.identify([1.0, 2.0, 3.0])[0][0] == "Zoë"
    back.enroll("Zoë", [[1.0, 0.0, 0.0]])  # extending a loaded gallery works as in memory
    assert back.counts.tolist() == [3, 1]
    empty = tmp_path / "empty.npz"
    Gallery("fp", 5).save(empty)
    assert len(Gallery.load(empty)) == 0 and Gallery.load(empty).dim == 5


def _fields(**changes) -> dict:
    f = {
        "format": np.array(FORMAT), "version": np.array(VERSION, np.int64), "names": np.array(["a", "b"]),
        "embeddings": np.eye(2, 3, dtype=np.float32), "counts": np.array([1, 2], np.int64),
        "weights_fingerprint": np.array("fp"), "embedding_dim": np.array(3, np.int64),
    }  # fmt: skip
    f.update(changes)
    return {k: v for k, v in f.items() if v is not None}


@pytest.mark.parametrize(
    "fields, message",
    [
        (_fields(counts=None), "not a spkr gallery (no counts)"),
        (_fields(format=np.array("spkr-checkpoint")), "not a spkr gallery (format 'spkr-checkpoint')"),
        (_fields(version=np.array(9, np.int64)), "gallery version 9 (this spkr reads 1)"),
        (_fields(embedding_dim=np.array([3], np.int64)), "are not scalars"),
        (
            _fields(embeddings=np.eye(2, 3)),
            "corrupt gallery: embeddings float64 (2, 3), expected float32 (2, 3)",
        ),
        (_fields(embeddings=np.eye(3, 3, dtype=np.float32)), "embeddings float32 (3, 3), expected"),
        (_fields(counts=np.array([1, 0], np.int64)), "corrupt gallery: counts int64 (2,), expected int64"),
        (_fields(names=np.array(["a", "a"])), "corrupt gallery: speaker names repeat"),
        (_fields(names=np.array([1, 2])), "corrupt gallery: names int64 (2,), expected a 1-D string array"),
        (_fields(names=np.array(["a", " b"])), "corrupt gallery: speaker name ' b'"),
        (
            _fields(embeddings=np.full((2, 3), np.inf, np.float32)),
            "corrupt gallery: embeddings are not finite",
        ),
        (_fields(checkpoint=np.array(3)), "corrupt gallery: checkpoint is not a non-empty string"),
        (_fields(checkpoint_relative=np.array([""])), "checkpoint_relative is not a non-empty string"),
    ],
)
def test_corrupt_or_foreign_npz_is_refused(tmp_path, fields, message):
    path = tmp_path / "db.npz"
    np.savez(path, **fields)
    with pytest.raises(GalleryError) as e:
        Gallery.load(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_gallery_records_and_finds_its_checkpoint(tmp_path):
    run, galleries = tmp_path / "run", tmp_path / "galleries"
    run.mkdir()
    ckpt = run / "last.pt"
    ckpt.write_bytes(b"stand-in: only the path matters here")
    db = galleries / "speakers.npz"
    g = Gallery("fp", 3, str(db))
    with pytest.raises(GalleryError, match=r"does not record its checkpoint .*give --checkpoint"):
        g.checkpoint_path()  # nothing recorded (as in a gallery of an older spkr)
    g.enroll("a", [[1.0, 0.0, 0.0]])
    g.record_checkpoint(ckpt, db)
    g.save(db)
    back = Gallery.load(db)
    assert back.checkpoint == str(ckpt.resolve()) and back.checkpoint_relative == "../run/last.pt"
    assert back.checkpoint_path() == ckpt.resolve()

    moved = tmp_path / "moved"  # the folder holding both moves: the relative path still finds it
    moved.mkdir()
    run.rename(moved / "run")
    galleries.rename(moved / "galleries")
    found = Gallery.load(moved / "galleries" / "speakers.npz").checkpoint_path()
    assert found.resolve() == (moved / "run" / "last.pt").resolve()

    (moved / "run" / "last.pt").unlink()
    with pytest.raises(GalleryError) as e:
        Gallery.load(moved / "galleries" / "speakers.npz").checkpoint_path()
    msg = str(e.value)
    assert msg.startswith(f"{moved / 'galleries' / 'speakers.npz'}: its checkpoint is missing: expected ")
    assert str(ckpt.resolve()) in msg and str(moved / "galleries" / "../run/last.pt") in msg
    assert "give --checkpoint" in msg

    old = tmp_path / "old.npz"  # a file without the optional fields still loads (and says so)
    np.savez(old, **_fields())
    assert Gallery.load(old).checkpoint is None
    with pytest.raises(GalleryError, match="old.npz: the gallery does not record its checkpoint"):
        Gallery.load(old).checkpoint_path()


def test_unreadable_files_are_refused(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not a zip")
    objects = tmp_path / "objects.npz"
    np.savez(objects, **_fields(names=np.array(["a", None], dtype=object)))  # pickled object array
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.ones(3))
    for path, message in [
        (text, "not a spkr gallery .npz (not a zip archive)"),
        (objects, "corrupt gallery: names.npy holds Python objects or records (object"),
        (single, "a single .npy array, not a spkr gallery .npz"),
        (tmp_path / "missing.npz", "no such gallery file"),
        (tmp_path, "cannot read the gallery (Is a directory)"),
    ]:
        with pytest.raises(GalleryError) as e:
            Gallery.load(path)
        assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_load_or_new(tmp_path):
    path = tmp_path / "db.npz"
    g = Gallery.load_or_new(path, "fp", 3)
    assert len(g) == 0 and not path.exists()
    g.enroll("a", [[1.0, 0.0, 0.0]])
    g.save(path)
    assert Gallery.load_or_new(path, "fp", 3).names == ["a"]
    with pytest.raises(GalleryError, match="enrolled with another model"):
        Gallery.load_or_new(path, "other", 3)


# --------------------------------------------------------------------------- spkr.enroll CLI


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")


def demo_files(demo_flacs, speaker: str, n: int) -> list[str]:
    files = [str(f) for f in demo_flacs if f.name.startswith(f"{speaker}-")][:n]
    assert len(files) == n
    return files


def test_enroll_cli_builds_and_extends_a_gallery(ckpt, demo_flacs, tmp_path, capsys):
    from spkr.checkpoint import weights_fingerprint
    from spkr.predict import Predictor

    alice, bob = demo_files(demo_flacs, "1003", 3), demo_files(demo_flacs, "1004", 1)
    db = tmp_path / "speakers.npz"
    assert main(["--checkpoint", str(ckpt), "--speaker", "alice", *alice[:2], "--db", str(db)]) == 0
    assert "alice: 2 utterance(s) added (2 in all)" in capsys.readouterr().out
    assert main(["--checkpoint", str(ckpt), "--speaker", "alice", alice[2], "--db", str(db)]) == 0
    assert (
        main(["--checkpoint", str(ckpt), "--speaker", "bob", *bob, "--db", str(db), "--device", "cpu"]) == 0
    )
    out = capsys.readouterr().out
    assert "alice: 1 utterance(s) added (3 in all)" in out and "2 speaker(s)" in out

    g = Gallery.load(db)
    pred = Predictor(ckpt, "cpu")
    assert g.fingerprint == weights_fingerprint(pred.ckpt["model"]) and g.dim == 16
    assert g.checkpoint == str(ckpt.resolve()) and g.checkpoint_path() == ckpt.resolve()
    assert g.names == ["alice", "bob"] and g.counts.tolist() == [3, 1]
    emb = np.stack([pred(f)[1] for f in alice])
    assert np.linalg.matrix_rank(emb) > 1  # distinct utterances, not one degenerate vector
    np.testing.assert_allclose(g.embeddings[0], unit(emb).mean(axis=0), rtol=1e-5, atol=1e-6)
    best, score = g.identify(pred(bob[0])[1], top_k=1)[0]
    assert best == "bob" and score == pytest.approx(1.0, abs=1e-5)


def _wav(path: Path, n: int) -> str:
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(n)).astype(np.float32), 16000)
    return str(path)


def test_enroll_cli_bad_inputs_exit_2_and_leave_the_gallery_unchanged(ckpt, demo_flacs, tmp_path, capsys):
    files = demo_files(demo_flacs, "1003", 2)
    db = tmp_path / "speakers.npz"
    assert main(["--checkpoint", str(ckpt), "--speaker", "alice", files[0], "--db", str(db)]) == 0
    before = db.read_bytes()
    capsys.readouterr()
    other_ckpt = untrained_checkpoint(tmp_path / "other.pt", seed=1)
    notes = tmp_path / "notes.flac"
    notes.write_text("this is not audio")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    cases = [
        ([files[1], _wav(tmp_path / "empty.wav", 0)], "empty.wav: audio file has no samples"),
        ([_wav(tmp_path / "short.wav", 200), files[1]], "short.wav: too short: 200 samples"),
        ([str(notes)], "notes.flac: cannot decode audio"),
        ([files[1], str(tmp_path / "missing.flac")], "missing.flac: no such audio file"),
        ([files[1], files[1]], f"{files[1]}: given twice; each utterance counts once"),
        ([files[1], "--speaker", " alice"], "speaker name ' alice'"),
        ([files[1], "--checkpoint", str(other_ckpt)], "enrolled with another model"),
        ([files[1], "--db", str(corrupt)], "corrupt.npz: not a readable spkr gallery .npz"),
        ([files[1], "--checkpoint", str(notes)], "notes.flac"),
    ]
    for args, message in cases:
        argv = ["--checkpoint", str(ckpt), "--speaker", "alice", "--db", str(db), *args]
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
        assert db.read_bytes() == before, args
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files
    # a failed first enrollment creates no gallery
    new = tmp_path / "new.npz"
    argv = [
        "--checkpoint",
        str(ckpt),
        "--speaker",
        "bob",
        "--db",
        str(new),
        files[1],
        str(tmp_path / "empty.wav"),
    ]
    assert main(argv) == 2 and not new.exists()


def _gallery_zip(path: Path, replace: dict[str, bytes], compress: dict[str, int] | None = None) -> Path:
    """A real gallery's .npz (two speakers, dim 3) with members replaced by ``replace`` ({field: .npy
    bytes}), each stored, or compressed as ``compress`` says."""
    g = Gallery("fp", 3)
    g.enroll("a", [[1.0, 0.0, 0.0]])
    g.enroll("b", [[0.0, 1.0, 0.0]])
    with zipfile.ZipFile(io.BytesIO(g.to_bytes())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            field = info.filename[: -len(".npy")]
            kind = (compress or {}).get(field, zipfile.ZIP_STORED)
            dst.writestr(info.filename, replace.get(field, src.read(info)), compress_type=kind)
    return path


def _npy_header(shape: tuple, descr: str, fortran: bool = False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue()


def _refused_within(path: Path, message: str, bound: int = 8 << 20) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(GalleryError) as e:
            Gallery.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)
    assert peak < bound, f"{peak} bytes allocated to refuse a {path.stat().st_size}-byte gallery"


@pytest.mark.parametrize(
    "replace, message",
    [
        # 400 MB of names declared in a member of a few bytes
        ({"names": _npy_header((10**7,), "<U10") + b"a" * 40}, "names.npy declares"),
        # embeddings of another speaker count or dim than the gallery's own: 2 GB declared
        (
            {"embeddings": _npy_header((2, 2**28), "<f4")},
            "embeddings.npy declares float32 (2, 268435456) (2147483648 bytes) but holds 0",
        ),
        ({"counts": _npy_header((2**27,), "<i8")}, "counts.npy declares int64 (134217728,)"),
        ({"embeddings": _npy_header((2, 3), "<f4", fortran=True) + bytes(24)}, "Fortran order"),
        ({"embeddings": _npy_header((2, 3), "|O") + bytes(16)}, "embeddings.npy holds Python objects"),
    ],
)
def test_a_gallery_declaring_huge_members_is_refused_before_reading_them(tmp_path, replace, message):
    """Each member's .npy header (dtype, shape, order) is checked against the gallery's own counts
    (names -> speakers, embedding_dim) before its data is read: nothing near the declared size is
    ever allocated."""
    _refused_within(_gallery_zip(tmp_path / "db.npz", replace), message)


def test_a_compressed_member_that_inflates_is_refused_unread(tmp_path):
    """np.savez stores members; a deflated one (here 40 MB of names in a ~40 kB file) is refused before
    it is inflated."""
    names = _npy_header((10**7,), "<U1") + bytes(4 * 10**7)
    path = _gallery_zip(tmp_path / "bomb.npz", {"names": names}, {"names": zipfile.ZIP_DEFLATED})
    assert path.stat().st_size < 200_000
    _refused_within(path, "names.npy is compressed")


def test_a_zero_embedding_is_refused(tmp_path):
    emb = np.zeros((2, 3), np.float32)
    emb[0, 0] = 1.0
    buf = io.BytesIO()
    np.save(buf, emb)
    with pytest.raises(GalleryError, match=r"db\.npz: corrupt gallery: speaker 'b' has a zero embedding"):
        Gallery.load(_gallery_zip(tmp_path / "db.npz", {"embeddings": buf.getvalue()}))
    g = Gallery("fp", 2)
    with pytest.raises(GalleryError, match="speaker c: its embeddings cancel out"):
        g.enroll("c", [[1.0, 0.0], [-1.0, 0.0]])
    assert len(g) == 0

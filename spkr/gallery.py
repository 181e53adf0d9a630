"""Enrollment gallery: named speakers' mean embeddings of one model, in a pickle-free .npz file.

    gallery = Gallery.load_or_new("speakers.npz", fingerprint, dim)   # checks the model matches
    gallery.enroll("alice", embeddings)            # (m, E): new speaker, or re-averaged by count
    gallery.save("speakers.npz")                   # atomic (temp file + rename)
    gallery.identify(embedding, top_k=5)           # [(name, cosine score)], best first
    decide(score, threshold)                       # True = accept (score >= threshold)

File (``np.savez``: a zip of stored ``.npy`` members; nothing but these arrays, each read only after
its header -- dtype, shape, C order, exactly the bytes that shape needs, n and E the gallery's own
counts -- is checked, so a small file cannot declare a huge member; no pickle)::

    format               str    "spkr-gallery"
    version              int64  1
    names                <U     (n,)    speaker names, unique, no surrounding whitespace
    embeddings           float32 (n, E) per speaker, the mean of its utterances' L2-normalised
                                        embeddings (norm <= 1: it is re-averaged exactly when
                                        utterances are added; scoring normalises it)
    counts               int64  (n,)    utterances averaged per speaker (>= 1)
    weights_fingerprint  str            spkr.checkpoint.weights_fingerprint of the model's weights
    embedding_dim        int64  E
    checkpoint           str    optional: absolute path of the checkpoint enrolled with last
    checkpoint_relative  str    optional: the same path relative to the gallery file's folder

``checkpoint`` / ``checkpoint_relative`` let ``spkr.predict --db`` find the model without
``--checkpoint`` (:meth:`Gallery.checkpoint_path`: the absolute path, else the relative one, so a
folder holding both can move). Galleries written before these fields had none: they still load and
score (version 1), but need ``--checkpoint``. The path is only a pointer: the weights fingerprint is
what proves a checkpoint is the gallery's model, and it is checked every time.

Embeddings of different models are not comparable, so a gallery only accepts and scores embeddings
of the model it was made with: the caller passes that model's weights fingerprint and embedding
dim, and a mismatch is a GalleryError telling to re-enroll. Scores use the conventions of
:mod:`spkr.scoring` (cosine; a trial is accepted iff score >= threshold).
"""

from __future__ import annotations

import difflib
import io
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spkr.errors import SpkrError
from spkr.scoring import l2_normalize

FORMAT = "spkr-gallery"
VERSION = 1
MAX_TEXT = 4096  # characters of a string member (a speaker name, a path)
MAX_DIM = 1 << 16  # embedding dim
FIELDS = ("format", "version", "names", "embeddings", "counts", "weights_fingerprint", "embedding_dim")
OPTIONAL_FIELDS = ("checkpoint", "checkpoint_relative")  # where the model is (absent in older files)


class GalleryError(SpkrError, ValueError):
    """A gallery file or request that cannot be used (names the file / speaker / what is wrong)."""


def check_name(name: str) -> str:
    """A speaker name is a non-empty string without surrounding whitespace or control characters."""
    if not isinstance(name, str) or not name or name != name.strip() or not name.isprintable():
        raise GalleryError(
            f"speaker name {name!r}: must be non-empty, printable, without leading/trailing spaces"
        )
    return name


def decide(score: float, threshold: float) -> bool:
    """Accept (True) iff ``score >= threshold`` (spkr.scoring's convention)."""
    return bool(score >= threshold)


class Gallery:
    """Enrolled speakers of one model: ``names``, ``embeddings`` (mean of normalised utterance
    embeddings, float64 in memory), ``counts``, the model's ``fingerprint`` and ``dim``."""

    def __init__(self, fingerprint: str, dim: int, source: str = "gallery"):
        if not isinstance(fingerprint, str) or not fingerprint:
            raise GalleryError(f"{source}: weights fingerprint must be a non-empty string")
        if int(dim) < 1:
            raise GalleryError(f"{source}: embedding dim must be >= 1 (got {dim})")
        self.fingerprint, self.dim, self.source = fingerprint, int(dim), source
        self.names: list[str] = []
        self.embeddings = np.zeros((0, self.dim), np.float64)
        self.counts = np.zeros(0, np.int64)
        self.checkpoint: str | None = None  # absolute path of the checkpoint (None: not recorded)
        self.checkpoint_relative: str | None = None  # the same, relative to the gallery's folder

    def __len__(self) -> int:
        return len(self.names)

    # ----------------------------------------------------------------------------- model check

    def check_model(self, fingerprint: str, dim: int) -> None:
        """GalleryError unless this gallery was made with the model of this fingerprint and dim."""
        if fingerprint != self.fingerprint:
            raise GalleryError(
                f"{self.source}: enrolled with another model (weights fingerprint {self.fingerprint}, "
                f"this checkpoint's is {fingerprint}); embeddings of different models are not "
                f"comparable: enroll the speakers again with this checkpoint into a new file"
            )
        if int(dim) != self.dim:
            raise GalleryError(f"{self.source}: embeddings of dim {self.dim}, this model's are {dim}")

    # ----------------------------------------------------------------------------- the model's file

    def record_checkpoint(self, checkpoint: str | os.PathLike, db: str | os.PathLike) -> None:
        """Remember where the model is: ``checkpoint``'s absolute path and its path relative to the
        folder of the gallery file ``db`` (the caller has checked it is this gallery's model)."""
        ckpt = Path(checkpoint).resolve()
        self.checkpoint = str(ckpt)
        self.checkpoint_relative = os.path.relpath(ckpt, Path(db).resolve().parent)

    def checkpoint_path(self) -> Path:
        """The recorded checkpoint that exists: the absolute path, else the path relative to the
        gallery file's folder. GalleryError when none is recorded (a gallery of an older spkr) or
        neither exists (naming the gallery and the paths it expected)."""
        if self.checkpoint is None:
            raise GalleryError(
                f"{self.source}: the gallery does not record its checkpoint (written by an older spkr); "
                f"give --checkpoint (the one it was enrolled with)"
            )
        tried = [Path(self.checkpoint)]
        if self.checkpoint_relative is not None:
            tried.append(Path(self.source).resolve().parent / self.checkpoint_relative)
        for path in tried:
            if path.is_file():
                return path
        expected = " or ".join(str(p) for p in dict.fromkeys(tried))
        raise GalleryError(
            f"{self.source}: its checkpoint is missing: expected {expected} (moved or deleted?); "
            f"give --checkpoint (the checkpoint the gallery was enrolled with)"
        )

    # ----------------------------------------------------------------------------- changes

    def enroll(self, name: str, embeddings) -> int:
        """Add utterance embeddings ((m, E) or one (E,)) to speaker ``name``: a new speaker is appended,
        a known one re-averaged by counts (the same mean as enrolling all its utterances at once).
        Returns the speaker's utterance count."""
        check_name(name)
        e = np.asarray(embeddings, dtype=np.float64)
        e = e[None] if e.ndim == 1 else e
        if e.ndim != 2 or e.shape[1] != self.dim or len(e) == 0:
            raise GalleryError(
                f"{self.source}: speaker {name}: expected (m >= 1, {self.dim}) embeddings, got shape "
                f"{np.shape(embeddings)}"
            )
        norms = np.linalg.norm(e, axis=1)
        if not np.isfinite(e).all() or (norms == 0).any():
            raise GalleryError(f"{self.source}: speaker {name}: embeddings must be finite and non-zero")
        total = (e / norms[:, None]).sum(axis=0)
        k = self.names.index(name) if name in self.names else None
        n = int(self.counts[k]) if k is not None else 0
        mean = ((self.embeddings[k] * n if k is not None else 0) + total) / (n + len(e))
        if not mean.any():
            raise GalleryError(f"{self.source}: speaker {name}: its embeddings cancel out (a zero mean)")
        if k is not None:
            self.embeddings[k] = mean
            self.counts[k] = n + len(e)
            return int(self.counts[k])
        self.names.append(name)
        self.embeddings = np.concatenate([self.embeddings, mean[None]])
        self.counts = np.concatenate([self.counts, [len(e)]])
        return len(e)

    def index(self, name: str) -> int:
        """The row of speaker ``name``; an unknown name is a GalleryError listing close matches."""
        if name in self.names:
            return self.names.index(name)
        close = difflib.get_close_matches(name, self.names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        listed = ", ".join(self.names[:10]) + (" ..." if len(self.names) > 10 else "")
        raise GalleryError(
            f"{self.source}: no enrolled speaker {name!r} ({len(self.names)} enrolled: {listed}){hint}"
        )

    def remove(self, name: str) -> None:
        """Forget speaker ``name`` (GalleryError when unknown)."""
        k = self.index(name)
        del self.names[k]
        self.embeddings = np.delete(self.embeddings, k, axis=0)
        self.counts = np.delete(self.counts, k)

    # ----------------------------------------------------------------------------- scoring

    def scores(self, embeddings) -> np.ndarray:
        """(m, n) cosine scores of m query embeddings ((m, E) or (E,) -> (n,)) against every speaker."""
        q = np.asarray(embeddings, dtype=np.float64)
        if q.shape[-1:] != (self.dim,) or q.ndim > 2:
            raise GalleryError(f"{self.source}: query embedding of shape {q.shape}, expected ({self.dim},)")
        if not np.isfinite(q).all():
            raise GalleryError(f"{self.source}: query embedding is not finite")
        return l2_normalize(q) @ l2_normalize(self.embeddings).T

    def identify(self, embedding, top_k: int = 5) -> list[tuple[str, float]]:
        """The ``top_k`` enrolled speakers closest to one embedding: [(name, cosine score)], best
        first (ties in enrollment order)."""
        if not self.names:
            raise GalleryError(f"{self.source}: no speaker is enrolled")
        s = self.scores(np.asarray(embedding).reshape(-1))
        order = np.argsort(-s, kind="stable")[: max(1, top_k)]
        return [(self.names[k], float(s[k])) for k in order]

    def score(self, name: str, embedding) -> float:
        """Cosine score of one embedding against speaker ``name`` (verification of a claimed identity)."""
        return float(self.scores(np.asarray(embedding).reshape(-1))[self.index(name)])

    # ----------------------------------------------------------------------------- files

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            format=np.array(FORMAT),
            version=np.array(VERSION, np.int64),
            names=np.array(self.names, dtype=str).reshape(-1),
            embeddings=self.embeddings.astype(np.float32),
            counts=self.counts.astype(np.int64),
            weights_fingerprint=np.array(self.fingerprint),
            embedding_dim=np.array(self.dim, np.int64),
            **{k: np.array(getattr(self, k)) for k in OPTIONAL_FIELDS if getattr(self, k) is not None},
        )
        return buf.getvalue()

    def save(self, path: str | os.PathLike) -> None:
        """Write the gallery to ``path`` atomically (the old file stays whole until the rename)."""
        from spkr import atomic

        atomic.write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Gallery:
        """Read and check a gallery file (GalleryError naming the file and what is wrong)."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                magic = f.read(6)
        except FileNotFoundError:
            raise GalleryError(f"{path}: no such gallery file") from None
        except OSError as e:
            raise GalleryError(f"{path}: cannot read the gallery ({e.strerror or e})") from None
        if magic == b"\x93NUMPY":
            raise GalleryError(f"{path}: a single .npy array, not a spkr gallery .npz")
        if not magic.startswith(b"PK"):  # np.load would take anything else for a pickle
            raise GalleryError(f"{path}: not a spkr gallery .npz (not a zip archive)")
        try:
            with zipfile.ZipFile(path) as zf:
                members = _members(zf, str(path), path.stat().st_size)
                return cls._from_members(members, lambda m: _read(zf, m, str(path)), str(path))
        except GalleryError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError) as e:
            # NotImplementedError: a zip feature np.savez never writes (a newer zip version, patched data)
            raise GalleryError(
                f"{path}: not a readable spkr gallery .npz ({type(e).__name__}: {e})"
            ) from None

    @classmethod
    def _from_members(cls, f: dict[str, _Member], read, source: str) -> Gallery:
        """The gallery of checked member headers ``f``; ``read`` gives a member's array, asked for
        only once its header fits (a scalar, or the table's (n, dim) shapes)."""
        missing = [k for k in FIELDS if k not in f]
        if missing:
            raise GalleryError(f"{source}: not a spkr gallery (no {', '.join(missing)})")
        kinds = {"format": "U", "version": "i", "weights_fingerprint": "U", "embedding_dim": "i"}
        if not all(_is_scalar(f[k], kind) for k, kind in kinds.items()):
            raise GalleryError(
                f"{source}: not a spkr gallery (format/version/fingerprint/dim are not scalars)"
            )
        header = {k: read(f[k]) for k in kinds}
        if str(header["format"]) != FORMAT:
            raise GalleryError(f"{source}: not a spkr gallery (format {str(header['format'])!r})")
        if int(header["version"]) != VERSION:
            raise GalleryError(
                f"{source}: gallery version {int(header['version'])} (this spkr reads {VERSION})"
            )
        if int(header["embedding_dim"]) > MAX_DIM:
            raise GalleryError(f"{source}: embedding dim {int(header['embedding_dim'])} exceeds {MAX_DIM}")
        g = cls(str(header["weights_fingerprint"]), int(header["embedding_dim"]), source)
        problem = _layout_problem(f["names"], f["embeddings"], f["counts"], g.dim)
        if problem:
            raise GalleryError(f"{source}: corrupt gallery: {problem}")
        names, emb, counts = (read(f[k]) for k in ("names", "embeddings", "counts"))
        problem = _values_problem(names, emb, counts)
        if problem:
            raise GalleryError(f"{source}: corrupt gallery: {problem}")
        g.names, g.embeddings, g.counts = names.tolist(), emb.astype(np.float64), counts
        for k in OPTIONAL_FIELDS:
            if k in f:
                value = read(f[k]) if _is_scalar(f[k], "U") else None
                if value is None or not str(value):
                    raise GalleryError(f"{source}: corrupt gallery: {k} is not a non-empty string")
                setattr(g, k, str(value))
        return g

    @classmethod
    def load_or_new(cls, path: str | os.PathLike, fingerprint: str, dim: int) -> Gallery:
        """The gallery at ``path`` checked against this model (:meth:`check_model`), or a new empty
        one for it when the file does not exist."""
        if not Path(path).exists():
            return cls(fingerprint, dim, str(path))
        g = cls.load(path)
        g.check_model(fingerprint, dim)
        return g


@dataclass(frozen=True)
class _Member:
    """One ``.npy`` member of a gallery archive as its header declares it: dtype, shape, and the
    bytes before its data (magic + header)."""

    info: zipfile.ZipInfo
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _members(zf: zipfile.ZipFile, source: str, file_size: int) -> dict[str, _Member]:
    """The headers of the archive's gallery members (others are never opened), each checked before
    any data is read: stored (np.savez's way; a compressed member could inflate to anything), a
    plain non-object dtype, C order, and exactly the bytes its shape needs, within the file."""
    members = {}
    for info in zf.infolist():
        field = info.filename.removesuffix(".npy")
        if info.filename.endswith(".npy") and field in FIELDS + OPTIONAL_FIELDS:
            members[field] = _member_header(zf, info, source, file_size)
    return members


_ENCRYPTED = 0x1  # zip general-purpose flag bit 0


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str, file_size: int) -> _Member:
    at = f"{source}: corrupt gallery: {info.filename}"
    if info.compress_type != zipfile.ZIP_STORED:
        raise GalleryError(f"{at} is compressed (a spkr gallery stores its members, as np.savez does)")
    if info.flag_bits & _ENCRYPTED:  # zipfile would ask for a password (a RuntimeError)
        raise GalleryError(f"{at} is encrypted (a spkr gallery never is)")
    if info.file_size > file_size:
        raise GalleryError(f"{at} declares {info.file_size} bytes, more than the file's {file_size}")
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise GalleryError(f"{at}: .npy format version {version} (np.savez writes 1.0 or 2.0)")
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject or dtype.names is not None or dtype.itemsize == 0:
        raise GalleryError(f"{at} holds Python objects or records ({dtype}; a gallery never unpickles)")
    if fortran_order:
        raise GalleryError(f"{at} is in Fortran order (np.savez writes C order)")
    member = _Member(info, dtype, tuple(shape), offset)
    if offset + member.nbytes != info.file_size:
        raise GalleryError(
            f"{at} declares {dtype} {member.shape} ({member.nbytes} bytes) but holds {info.file_size - offset}"
        )
    if dtype.kind == "U" and dtype.itemsize > 4 * MAX_TEXT:
        raise GalleryError(f"{at} holds strings of {dtype.itemsize // 4} characters (at most {MAX_TEXT})")
    return member


def _read(zf: zipfile.ZipFile, member: _Member, source: str) -> np.ndarray:
    """A member's array (its header checked by :func:`_member_header`: the bytes read are the
    shape's, within the file)."""
    with zf.open(member.info) as f:
        f.read(member.offset)
        data = f.read(member.nbytes)
    if len(data) != member.nbytes:
        raise GalleryError(f"{source}: corrupt gallery: {member.info.filename} is truncated")
    return np.frombuffer(data, member.dtype).reshape(member.shape).copy()


def _is_scalar(member: _Member, kind: str) -> bool:
    return member.shape == () and member.dtype.kind == kind


def _layout_problem(names, emb, counts, dim: int) -> str | None:
    """What is wrong with the dtypes and shapes of a gallery's speaker table (arrays, or members by
    their headers: anything with ``dtype``, ``shape``, ``ndim``), or None: n = len(names) speakers,
    embeddings (n, dim) float32, counts (n,) int64."""
    if names.dtype.kind != "U" or names.ndim != 1:
        return f"names {names.dtype} {names.shape}, expected a 1-D string array"
    n = names.shape[0]
    if emb.dtype != np.float32 or emb.shape != (n, dim):
        return f"embeddings {emb.dtype} {emb.shape}, expected float32 ({n}, {dim})"
    if counts.dtype != np.int64 or counts.shape != (n,):
        return f"counts {counts.dtype} {counts.shape}, expected int64 ({n},) all >= 1"
    return None


def _values_problem(names: np.ndarray, emb: np.ndarray, counts: np.ndarray) -> str | None:
    """What is wrong with the values of a gallery's speaker table (its layout checked), or None."""
    n = len(names)
    if (counts < 1).any():
        return f"counts {counts.dtype} {counts.shape}, expected int64 ({n},) all >= 1"
    if not np.isfinite(emb).all():
        return "embeddings are not finite"
    zero = np.flatnonzero(~emb.any(axis=1))
    if len(zero):
        return f"speaker {str(names[zero[0]])!r} has a zero embedding (a mean of unit vectors never is)"
    if len(set(names.tolist())) != n:
        return "speaker names repeat"
    for name in names.tolist():
        try:
            check_name(name)
        except GalleryError as e:
            return str(e)
    return None


__all__ = ["FORMAT", "VERSION", "Gallery", "GalleryError", "check_name", "decide"]

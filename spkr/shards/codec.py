"""The shard codec: how one sample is laid out in a tar shard, encoded (write side) AND decoded
(read side), in one place.

Layout: a shard is a POSIX ustar tar; sample ``<key>`` is three regular-file members, in the order of
:data:`spkr.shards.schema.MEMBER_EXTS`: ``<key>.cls`` (ASCII int label), ``<key>.json`` (a JSON
object, sorted keys) and ``<key>.mel.npy`` (``np.save`` of the (frames, n_mels) float16 features,
never pickled). Headers carry mtime 0, mode 0644, uid/gid 0 and empty owner names, so equal samples
give equal bytes. A sample's byte span (its first header up to the next sample's, the last one to
the end of the file) is what :func:`sample_checksum` (xxh3-64) covers.

Decoding accepts exactly that and nothing else: ``.cls`` an ASCII int of at most 18 digits,
``.json`` a UTF-8 JSON object of at most 64 KiB nested at most 32 deep, ``.mel.npy`` little-endian
float16/float32, 2-D, ``n_mels`` columns, C or Fortran order, exact size (``allow_pickle=False``
semantics). Any other member (``.pth``, ``.pkl``, ...), links, directories, pax/GNU headers are
refused with :class:`ShardError` naming the shard, member and byte offset, never deserialised.

Adding a member type or changing the layout is an edit here (:func:`encode_sample`,
:func:`decode_sample`, :func:`decode_member`) and in ``MEMBER_EXTS``.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import re
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import xxhash

from spkr.errors import SpkrError
from spkr.shards.schema import MEMBER_EXTS

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)  # a tar end-of-archive block
PICKLE_EXTS = ("pth", "pt", "pkl", "pickle", "ckpt", "bin", "npz")


class ShardError(SpkrError, RuntimeError):
    """A shard that cannot be read: corrupt, truncated, unsafe, or unreachable. ``ShardError(shard,
    message, member, offset)`` formats ``<shard> [<member>] at byte <offset>: <message>``; one argument
    alone is such a message already formatted (how the error is rebuilt in another process: there
    ``shard`` is that message and ``member`` / ``offset`` / ``reason`` are None)."""

    def __init__(
        self, shard: str, message: str | None = None, member: str | None = None, offset: int | None = None
    ):
        self.shard, self.member, self.offset, self.reason = shard, member, offset, message
        if message is None:
            super().__init__(shard)
            return
        where = (
            shard + (f" [{member}]" if member else "") + (f" at byte {offset}" if offset is not None else "")
        )
        super().__init__(f"{where}: {message}")


def sample_checksum(span) -> int:
    """xxh3-64 of one sample's tar bytes (any bytes-like object; ~7 GB/s here)."""
    return xxhash.xxh3_64_intdigest(span)


# --------------------------------------------------------------------------- encoding


@dataclass
class Sample:
    """One encoded sample: what goes into the tar under ``key``."""

    key: str
    label: int
    meta: dict
    feats: np.ndarray  # (frames, n_mels), on-disk dtype


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def tar_member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def encode_sample(s: Sample) -> list[tuple[str, bytes]]:
    """(member name, payload) of one sample, in tar order."""
    if "." in s.key or "/" in s.key:
        raise ValueError(f"sample key {s.key!r} must not contain '.' or '/'")
    payloads = {
        "cls": str(int(s.label)).encode(),
        "json": json.dumps(s.meta, sort_keys=True).encode(),
        "mel.npy": encode_npy(s.feats),
    }
    return [(f"{s.key}.{ext}", payloads[ext]) for ext in MEMBER_EXTS]


def write_tar(fileobj, samples: Iterable[Sample]) -> tuple[list[Sample], list[int]]:
    """Write samples as WebDataset members into an open binary file; returns (samples, offsets)."""
    written, offsets = [], []
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            members = encode_sample(s)
            offsets.append(tf.offset)
            for name, payload in members:
                tf.addfile(tar_member_info(name, len(payload)), io.BytesIO(payload))
            written.append(s)
    return written, offsets


def digest_tar(path: str, offsets: list[int]) -> tuple[str, int, list[int]]:
    """(sha256, size, per-sample checksums) of a written tar; sample i spans
    ``[offsets[i], offsets[i+1])``, the last one to the end of the file (the end-of-archive blocks)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return hashlib.sha256().hexdigest(), 0, []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                digest = hashlib.sha256(view).hexdigest()
                ends = list(offsets[1:]) + [size]
                checksums = [sample_checksum(view[a:b]) for a, b in zip(offsets, ends)]
            finally:
                view.release()
    return digest, size, checksums


# --------------------------------------------------------------------------- decoding


def split_member(name: str) -> tuple[str, str]:
    """'19-198-0001.mel.npy' -> ('19-198-0001', 'mel.npy')."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


def check_member_name(name: str, shard: str, offset: int | None = None) -> tuple[str, str]:
    """(key, ext) of an allowed member name, else ShardError (the name shown escaped when it holds
    control or undecodable characters, so that it cannot forge log lines)."""
    key, ext = split_member(name)
    if "/" in name or ext not in MEMBER_EXTS:
        low = ext.lower().rsplit(".", 1)[-1]
        why = "pickle-based formats are never deserialised" if low in PICKLE_EXTS else "unknown member type"
        shown = name if name.isprintable() else repr(name)[1:-1]
        raise ShardError(
            shard,
            f"refusing member '{shown}' ({why}; spkr decodes only .cls, .json and .mel.npy)",
            member=shown,
            offset=offset,
        )
    return key, ext


# .mel.npy dtypes: little-endian float16 / float32 only (what the writer stores). Anything else -- big
# endian, float64/float128, '<e2' (which np.dtype cannot even parse) -- is refused as a ShardError here
# rather than failing later (a TypeError, or a crash in collate).
NPY_DTYPES = (np.dtype("<f2"), np.dtype("<f4"))
_NPY_FAST = re.compile(
    rb"\{'descr': '(<f[24])', 'fortran_order': (False|True), 'shape': \((\d{1,18}), (\d{1,18})\), \} *\n"
)
_DTYPES: dict[bytes, np.dtype] = {b"<f2": NPY_DTYPES[0], b"<f4": NPY_DTYPES[1]}


def _npy_header(mv: memoryview):
    """(shape, fortran, dtype, data offset) of np.save's usual header (an allowed dtype, 2-D) via a
    regex, else None: numpy's safe parser then reads it, and decode_npy refuses what is not allowed."""
    if len(mv) >= 10 and bytes(mv[:8]) == b"\x93NUMPY\x01\x00":
        hlen = int.from_bytes(mv[8:10], "little")
        m = _NPY_FAST.fullmatch(bytes(mv[10 : 10 + hlen]))
        if m:
            dt = _DTYPES[m.group(1)]
            return (int(m.group(3)), int(m.group(4))), m.group(2) == b"True", dt, 10 + hlen
    return None


def decode_npy(payload, *, shard: str = "?", member: str = "?", n_mels: int | None = None) -> np.ndarray:
    """A ``.npy`` payload -> array view, without ever unpickling (object dtypes are refused)."""
    mv = memoryview(payload)
    fast = _npy_header(mv)
    if fast is not None:
        shape, fortran, dtype, off = fast
        if n_mels is None or shape[1] == n_mels:
            count = shape[0] * shape[1]
            if len(mv) - off == count * dtype.itemsize:
                arr = np.frombuffer(mv, dtype=dtype, count=count, offset=off)
                return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    try:
        if bytes(mv[:6]) != b"\x93NUMPY" or len(mv) < 10:
            raise ValueError("no .npy magic")
        major = mv[6]
        if major == 1:
            hlen, hstart = int.from_bytes(mv[8:10], "little"), 10
        elif major in (2, 3):
            hlen, hstart = int.from_bytes(mv[8:12], "little"), 12
        else:
            raise ValueError(f"unsupported .npy version {major}")
        f = io.BytesIO(bytes(mv[: hstart + hlen]))
        np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
    except Exception as e:
        raise ShardError(shard, f"bad .npy header: {e}", member=member) from None
    if dtype.hasobject or dtype not in NPY_DTYPES:
        raise ShardError(
            shard, f"refusing .npy of dtype {dtype} (little-endian float16/float32 only)", member=member
        )
    if len(shape) != 2 or (n_mels is not None and shape[1] != n_mels):
        raise ShardError(shard, f".npy shape {shape}, expected (frames, {n_mels})", member=member)
    count = int(shape[0]) * int(shape[1])
    if len(mv) - hstart - hlen != count * dtype.itemsize:
        raise ShardError(
            shard, f".npy holds {len(mv) - hstart - hlen} data bytes for shape {shape}", member=member
        )
    arr = np.frombuffer(mv, dtype=dtype, count=count, offset=hstart + hlen)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


MAX_CLS_BYTES = 32
MAX_JSON_BYTES = 64 << 10
MAX_JSON_DEPTH = 32
_CLS = re.compile(rb"\s*(\d{1,18})\s*")


def _json_depth_exceeds(obj, limit: int) -> bool:
    """Whether containers nest deeper than ``limit`` (the top level is depth 1); no recursion."""
    todo = [(obj, 1)] if isinstance(obj, (dict, list)) else []
    while todo:
        o, depth = todo.pop()
        children = o.values() if isinstance(o, dict) else o
        if depth > limit:
            return True
        todo.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def decode_member(ext: str, payload, *, shard: str = "?", member: str = "?", n_mels: int | None = None):
    """Decode one allowed member; anything else is refused (never deserialised). ``.cls``: an ASCII
    integer (at most 18 digits, in at most MAX_CLS_BYTES); ``.json``: a UTF-8 JSON object of at most
    MAX_JSON_BYTES nested at most MAX_JSON_DEPTH deep; ``.mel.npy``: see :func:`decode_npy`. Every
    problem is a ShardError naming shard and member (so ``on_error="skip"`` can skip it)."""
    if ext == "cls":
        m = _CLS.fullmatch(bytes(payload)) if len(payload) <= MAX_CLS_BYTES else None
        if m is None:
            raise ShardError(
                shard,
                f"bad .cls payload (expected an ASCII integer of at most 18 digits; got {len(payload)} bytes)",
                member=member,
            )
        return int(m.group(1))
    if ext == "json":
        if len(payload) > MAX_JSON_BYTES:
            raise ShardError(
                shard, f"bad .json payload: {len(payload)} bytes (at most {MAX_JSON_BYTES})", member=member
            )
        raw = bytes(payload)
        try:
            meta = json.loads(raw.decode("utf-8"))
            # at most MAX_JSON_DEPTH brackets cannot nest deeper; only then is the parsed object walked
            deep = raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and _json_depth_exceeds(
                meta, MAX_JSON_DEPTH
            )
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of > 4300 digits
            raise ShardError(shard, f"bad .json payload: {e}", member=member) from None
        except RecursionError:
            deep = True
        if deep:
            raise ShardError(
                shard, f"bad .json payload: nested deeper than {MAX_JSON_DEPTH} levels", member=member
            )
        if not isinstance(meta, dict):
            raise ShardError(
                shard, f"bad .json payload: a {type(meta).__name__}, not an object", member=member
            )
        return meta
    if ext == "mel.npy":
        return decode_npy(payload, shard=shard, member=member, n_mels=n_mels)
    check_member_name(member, shard)
    raise ShardError(shard, f"refusing member type '{ext}'", member=member)


def byte_sum(raw: bytes) -> int:
    """sum(raw) for up to 513 bytes (a tar header block), ~10x faster than Python's sum() of bytes.

    The sum is at most 513 * 255 < 65521 * 2: Adler-32's low half gives it modulo 65521 (a prime),
    which leaves two candidates, and they differ modulo 255 (65521 % 255 = 241), which the big-endian
    integer of the bytes gives (256 = 1 mod 255, so that integer = its digit sum mod 255)."""
    if len(raw) > 513:
        return sum(raw)
    s = (zlib.adler32(raw) & 0xFFFF) - 1
    s %= 65521
    return s if (s - int.from_bytes(raw, "big")) % 255 == 0 else s + 65521


def parse_header(hdr: memoryview, shard: str, expected: str, hpos: int) -> tuple[str, int, bytes]:
    """(name, size, typeflag) of a ustar/v7 header block, checksum verified."""
    raw = bytes(hdr)
    try:
        chk = int(raw[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        chk = -1
    if chk != byte_sum(raw) - sum(raw[148:156]) + 8 * 32:
        raise ShardError(shard, "bad tar header (checksum mismatch)", expected, hpos)
    if raw[124] & 0x80:
        size = tarfile.nti(raw[124:136])
    else:
        size = int(raw[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    name = raw[0:100].split(b"\0", 1)[0]
    if raw[257:262] == b"ustar" and raw[345] != 0:
        name = raw[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, raw[156:157]


def decode_sample(span, *, shard: str, key: str, start: int, n_mels: int | None = None):
    """(label, meta, feats) of sample ``key`` from its whole byte span (``start``: the span's offset in
    the shard, for error messages): exactly the members of MEMBER_EXTS, in order, each a regular file
    named ``<key>.<ext>``; payloads are views of ``span`` (no copy). Anything else is a ShardError."""
    values, pos = {}, 0
    for ext in MEMBER_EXTS:
        expected, hpos = f"{key}.{ext}", start + pos
        hdr = span[pos : pos + BLOCK]
        if len(hdr) < BLOCK:
            raise ShardError(shard, "truncated sample: its span ends inside a header", expected, hpos)
        if hdr[0] == 0 and bytes(hdr) == _ZERO_BLOCK:
            raise ShardError(shard, "unexpected end of archive", expected, hpos)
        name, size, typeflag = parse_header(hdr, shard, expected, hpos)
        if typeflag not in (b"0", b"\0"):
            raise ShardError(
                shard, f"refusing member '{name}' of tar type {typeflag!r} (regular files only)", name, hpos
            )
        if name != expected:
            check_member_name(name, shard, hpos)  # a refused type is reported as such
            raise ShardError(
                shard, f"found member '{name}' where the manifest expects '{expected}'", name, hpos
            )
        pos += BLOCK
        payload = span[pos : pos + size]
        if len(payload) < size:
            raise ShardError(shard, f"truncated sample: member needs {size} bytes, its span ends", name, hpos)
        pos += size + (-size % BLOCK)
        values[ext] = decode_member(ext, payload, shard=shard, member=name, n_mels=n_mels)
    return values["cls"], values["json"], values["mel.npy"]


__all__ = [
    "BLOCK",
    "ShardError",
    "Sample",
    "sample_checksum",
    "encode_npy",
    "encode_sample",
    "write_tar",
    "digest_tar",
    "check_member_name",
    "decode_npy",
    "decode_member",
    "decode_sample",
    "parse_header",
    "byte_sum",
]

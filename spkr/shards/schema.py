"""The shard contract's names, constants, errors and name rules: what the producers of a shard set
(:mod:`spkr.corpus.protocols`, :mod:`spkr.augment`, :mod:`spkr.shards.writer`) and its readers
(:mod:`spkr.shards.format`, :mod:`spkr.stream`) agree on. It imports nothing of spkr but
:mod:`spkr.errors`, so every stage can use it.

A shards directory (local or URL) holds ``manifest.json`` and, per split, tar shards::

    <out>/manifest.json
    <out>/<split>/shard-000000.tar        WebDataset tar: <key>.cls, <key>.json, <key>.mel.npy per sample
    <out>/<split>/shard-000000.tar.json   sidecar: that shard's manifest entry, written after the tar
    <out>/trials/<split>.txt              verification splits' trial lists (protocol ``open``)
    <out>/augment.jsonl                   one description per augmented copy (``<key>~aug<k>``)
    <out>/index/<split>.<field>.npy|.txt  the per-sample fields (version 3; the table below)

A shard is complete iff its sidecar exists (it is written last); ``manifest.json`` is written only
when every planned shard is complete, and after the trial files, ``augment.jsonl`` and the index
files, so nothing half-written is ever listed.

Version 3 keeps a shard entry's per-sample fields out of ``manifest.json``: they are per-split index
files beside it (:mod:`spkr.shards.index`). N: samples in the split, S: its shards.

================================  =========  ========  ============================================================
file (``<out>/index/``)           dtype      shape     holds
================================  =========  ========  ============================================================
``<split>.keys.txt``              UTF-8      bytes     the split's keys joined by ``\\n`` (what dataset_id hashes)
``<split>.key_ends.npy``          uint       (N,)      end of each key in its shard's part of keys.txt
``<split>.frames.npy``            uint       (N,)      frame count of each sample
``<split>.labels.npy``            uint       (N,)      label of each sample (see ``protocol``)
``<split>.offsets.npy``           uint       (N,)      byte offset of each sample's first tar header
``<split>.checksums.npy``         uint64     (N,)      xxh3_64 of each sample's byte span
``<split>.shard_starts.npy``      uint       (S + 1,)  index of each shard's first sample; last = N
================================  =========  ========  ============================================================

``.npy`` files are little-endian, 1-D, in the smallest unsigned dtype that holds their values, read
with ``allow_pickle=False``. A shard's part of keys.txt starts after the previous non-empty shard's
part and its newline. Version 2 (per-sample lists inline in each shard entry) also loads.
"""

from __future__ import annotations

import re

from spkr.errors import SpkrError

FORMAT = "spkr-shards"
VERSION = 3  # 2: dataset_id + per-sample checksums; 3: per-sample fields in index files
INLINE_VERSION = 2  # per-sample fields inline: what build_manifest assembles, and version-2 shard sets
READ_VERSIONS = (INLINE_VERSION, VERSION)
INDEX_DIR = "index"
# The index files of a split (module docstring): field -> file suffix.
INDEX_FILES = {
    "keys": "keys.txt",
    "key_ends": "key_ends.npy",
    "frames": "frames.npy",
    "labels": "labels.npy",
    "offsets": "offsets.npy",
    "checksums": "checksums.npy",
    "shard_starts": "shard_starts.npy",
}
PER_SAMPLE_FIELDS = ("keys", "frames", "labels", "offsets", "checksums")  # a shard entry's packed lists
SAMPLE_CHECKSUM = "xxh3_64"  # the per-sample checksum's algorithm, as named in the manifest
MANIFEST_NAME = "manifest.json"
DIGEST = "digest"  # the manifest field holding the other fields' sha256 (manifest_digest)
# The top-level fields a manifest written before the digest can hold: one without a digest holding any
# other (a digest key renamed by a typo, a field added by hand) is refused, as a digest would refuse it.
PRE_DIGEST_FIELDS = frozenset(
    "format version created dataset_id corpus identity feature_config feature_fingerprint feature_backend "
    "sample_checksum labels class_weights class_weight_scheme splits stats skipped protocol augment".split()
)
AUGMENT_NAME = "augment.jsonl"  # one description per augmented copy (spkr.augment), manifest key order
COPY_SEPARATOR = "~aug"  # an augmented copy's key: <key>~aug<k>
SIDECAR_SUFFIX = ".json"  # shard-000000.tar -> shard-000000.tar.json
# Tar members of one sample, in the order they are written. Nothing else is ever decoded.
MEMBER_EXTS = ("cls", "json", "mel.npy")

# Protocols (docs/protocols.md): the manifest's ``protocol`` entry names one, and each split's kind and role.
CLOSED, CLOSED_SESSION, OPEN = "closed", "closed-session", "open"
PROTOCOLS: tuple[str, ...] = (CLOSED, CLOSED_SESSION, OPEN)
CLASSIFICATION, VERIFICATION = "classification", "verification"
ROLES = ("train", "valid", "test")
TRIALS_DIR = "trials"  # <out>/trials/<split>.txt


def trials_path(split: str) -> str:
    """Where a verification split's trial list goes, relative to the shards directory."""
    return f"{TRIALS_DIR}/{split}.txt"


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:06d}.tar"


class ManifestError(SpkrError, ValueError):
    """A manifest that is missing, malformed, or inconsistent with its shards."""


class ManifestMismatch(ManifestError):
    """Shards that do not fit a model (other feature config or label map)."""


class DatasetMismatch(ManifestMismatch):
    """Shards that are not the dataset a checkpoint or loader state was made from."""


# --------------------------------------------------------------------------- names
# Shard names, split names and sample keys become paths and URLs: only names that stay inside the
# shards directory are accepted.

SAFE_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
BAD_KEY_CHAR = re.compile(r"[./\\\x00-\x1f\x7f]")


def shard_name_problem(name, split: str | None = None) -> str | None:
    """Why ``name`` is not a safe shard name, or None when it is one. A shard name is relative and lies
    in its split's folder: ``<split>/<file>.tar``, exactly one '/', no URL scheme, no '..', no leading
    '/', no backslash, no empty component, no control character, only ``A-Z a-z 0-9 . _ -`` (each
    component starting with a letter or digit). Joined to the shards directory or URL such a name can
    only be a file inside it: never ``/etc/x.tar``, ``../x.tar`` or, under ``s3://bucket-a/prefix``,
    another bucket. ``split``: the split it is listed under (the folder it must be in)."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if _CONTROL.search(name):
        return "contains a control character"
    if "://" in name:
        return "has a URL scheme (shard names are relative to the shards directory)"
    if name.startswith("/"):
        return "is absolute (shard names are relative to the shards directory)"
    if "\\" in name:
        return "contains a backslash"
    if ".." in name:
        return "contains '..'"
    parts = name.split("/")
    if "" in parts:
        return "has an empty path component"
    if len(parts) != 2:
        return "is not <split>/<file>.tar (exactly one '/')"
    if split is not None and parts[0] != split:
        return f"lies outside its split's folder '{split}/'"
    if not all(SAFE_PART.fullmatch(p) for p in parts):
        return "has characters other than A-Z a-z 0-9 . _ - (or a part not starting with A-Z a-z 0-9)"
    if not parts[1].endswith(".tar"):
        return "does not end in .tar"
    return None


def sample_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a new sample's key, or None: empty, or holding whitespace (trial lists
    separate keys by it), '.', '/', '\\' or an unprintable character (the manifest refuses those)."""
    if not key:
        return "is empty"
    if not key.isprintable() or BAD_KEY_CHAR.search(key) or any(c.isspace() for c in key):
        return "holds whitespace, '.', '/', '\\' or an unprintable character"
    return None


def split_name_problem(split) -> str | None:
    """Why ``split`` cannot be a split name (a folder of the shards directory), or None."""
    if not isinstance(split, str):
        return f"is a {type(split).__name__}, not a string"
    if ".." in split or not SAFE_PART.fullmatch(split):
        return "is not a plain folder name (A-Z a-z 0-9 . _ -, starting with a letter or digit)"
    if split == TRIALS_DIR:
        return f"is reserved ('{TRIALS_DIR}/' holds the trial files)"
    return None

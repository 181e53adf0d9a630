"""The files a manifest lists beside it: a version-3 shard set's index files (written by
:func:`index_files`, checked and mapped by :func:`attach_index`) and the reading of any listed file
(:func:`read_listed`, :func:`checked_text`).

A split's ``index`` object lists each of its index files (:data:`spkr.shards.schema.INDEX_FILES`)
with its ``path``, ``bytes`` and ``sha256``, checked at load; every reader memory-maps them (a remote
shard set's index files are fetched once into a local cache keyed by their sha256,
:func:`index_cache_dir`).
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np

from spkr import atomic, storage
from spkr.shards.checks import with_digest
from spkr.shards.fields import SHA256, check_count, check_string_keys, show
from spkr.shards.packed import map_file, narrowed, remap_ints, remap_strs
from spkr.shards.schema import INDEX_DIR, INDEX_FILES, PER_SAMPLE_FIELDS, VERSION, ManifestError


def attach_index(split: str, sd, base: str, where: str, storage_options: dict | None, retry) -> dict:
    """Split entry ``sd`` of a version-3 manifest with its index files checked (bytes, sha256,
    dtype, shape, key separators) and mapped: each shard entry gets its per-sample fields as views of
    them (checked further, as inline ones are, by the caller). ``base``: the shards directory the
    files' paths are relative to; remote files are read with ``storage_options`` under ``retry``."""
    _check_split_index(split, sd, where)
    maps, sources = {}, {}
    for field, suffix in INDEX_FILES.items():
        path, size = _index_entry(
            split, field, suffix, sd["index"][field], base, where, storage_options, retry
        )
        arr = map_file(path, size)
        if field != "keys" and (arr.ndim != 1 or arr.dtype.kind not in "iu"):
            raise ManifestError(f"{path}: holds a {arr.dtype} array of shape {arr.shape}, not 1-D integers")
        maps[field], sources[field] = arr, (path, size)
    starts, bases, lasts = _check_layout(maps, sources, len(sd["shards"]))
    out = []
    for i, s in enumerate(sd["shards"]):
        if not isinstance(s, dict):
            out.append(s)  # refused by the caller's checks
            continue
        a, b, t0 = int(starts[i]), int(starts[i + 1]), int(bases[i])
        t1 = t0 + max(int(lasts[i]), 0)
        fields = {f: remap_ints(*sources[f], a, b) for f in ("frames", "labels", "offsets", "checksums")}
        fields["keys"] = remap_strs(*sources["keys"], t0, t1, *sources["key_ends"], a, b)
        out.append({**s, **fields})
    return {**sd, "shards": out}


def _check_split_index(split: str, sd, where: str) -> None:
    """A version-3 split entry: a ``shards`` list without inline per-sample fields and an ``index``
    object listing every index file."""
    if not isinstance(sd, dict) or type(sd.get("shards")) is not list:
        raise ManifestError(f"{where}: split '{split}' is not an object with a 'shards' list")
    index = sd.get("index")
    if index is not None:
        check_string_keys(index, "index", where)
    if index is None or sorted(index) != sorted(INDEX_FILES):
        raise ManifestError(
            f"{where}: split '{split}' lists index files {sorted(index or [])}, not {sorted(INDEX_FILES)} "
            f"(a version-{VERSION} manifest)"
        )
    for s in sd["shards"]:
        inline = sorted(set(PER_SAMPLE_FIELDS) & set(s)) if isinstance(s, dict) else []
        if inline:
            raise ManifestError(
                f"{where}: a shard entry lists {inline} inline (a version-{VERSION} manifest)"
            )


def _index_entry(split, field, suffix, entry, base, where, storage_options, retry) -> tuple[str, int]:
    """(local path, bytes) of the index file an ``index`` entry lists, its path, bytes and sha256 checked."""
    at = f"{where}: index '{field}'"
    check_string_keys(entry, f"index '{field}'", where)
    expected = f"{INDEX_DIR}/{split}.{suffix}"
    if entry.get("path") != expected:
        raise ManifestError(f"{at}: path {show(entry.get('path'))} is not {expected!r}")
    size = check_count(entry.get("bytes"), "bytes", at)
    if not isinstance(entry.get("sha256"), str) or not SHA256.fullmatch(entry["sha256"]):
        raise ManifestError(f"{at}: sha256 {show(entry.get('sha256'))} is not 64 hex digits")
    url = storage.join(base, expected)
    return local_index_file(url, size, entry["sha256"], storage_options, retry), size


def _check_layout(maps: dict, sources: dict, n_shards: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check that the mapped index files agree (lengths, shard starts, key separators, UTF-8 keys);
    return each shard's first sample (S + 1 starts), its first byte in keys.txt and its last key's
    end (-1: an empty shard)."""
    starts, n = maps["shard_starts"], len(maps["frames"])
    if len(starts) != n_shards + 1 or (len(starts) and (starts[0] != 0 or int(starts[-1]) != n)):
        raise ManifestError(
            f"{sources['shard_starts'][0]}: {len(starts)} shard starts for {n_shards} shards of {n} "
            "samples (needs S + 1, from 0 to N)"
        )
    starts = starts.astype(np.int64)
    if (np.diff(starts) < 0).any():
        raise ManifestError(f"{sources['shard_starts'][0]}: shard starts are not increasing")
    for field in ("key_ends", "labels", "offsets", "checksums"):
        if len(maps[field]) != n:
            raise ManifestError(f"{sources[field][0]}: lists {len(maps[field])} values for {n} samples")
    text, ends = maps["keys"], maps["key_ends"].astype(np.int64)
    counts = np.diff(starts)
    lasts = np.where(counts > 0, ends[np.maximum(starts[1:] - 1, 0)] if n else 0, -1)  # -1: empty shard
    bases = np.concatenate([[0], np.cumsum(lasts + 1)])[:-1]  # each shard's first byte in keys.txt
    seps = (np.repeat(bases, counts) + ends)[:-1]  # where each key but the last ends: a newline
    text_bytes = int((lasts + 1).sum()) - 1 if n else 0  # every key and a newline between two
    if len(text) != text_bytes or not np.array_equal(np.flatnonzero(text == 10), seps):
        raise ManifestError(
            f"{sources['keys'][0]}: keys, {INDEX_FILES['key_ends']} and {INDEX_FILES['shard_starts']} "
            "disagree (a key end that is not a newline, a newline inside a key, or bytes left over)"
        )
    try:
        bytes(text).decode()
    except UnicodeDecodeError as e:
        raise ManifestError(f"{sources['keys'][0]}: keys are not UTF-8 ({e})") from None
    return starts, bases, lasts


def local_index_file(url: str, size: int, sha256: str, storage_options: dict | None, retry) -> str:
    """A local path of index file ``url`` whose bytes and sha256 are the manifest's: the file
    itself for a local shard set, else a copy fetched once into the index cache (named by its
    sha256, written atomically)."""
    if storage.is_url(url):
        path = os.path.join(index_cache_dir(), sha256 + os.path.splitext(url)[1])
        if not (os.path.exists(path) and _file_sha256(path) == sha256):
            raw = read_listed(url, "index file", storage_options, retry)
            _check_index_bytes(url, len(raw), hashlib.sha256(raw).hexdigest(), size, sha256)
            atomic.write_bytes(path, raw, fsync=False)
        return path
    if not os.path.exists(url):
        raise ManifestError(f"{url}: index file is missing")
    _check_index_bytes(url, os.path.getsize(url), _file_sha256(url), size, sha256)
    return url


def index_cache_dir() -> str:
    """Where remote index files are cached: ``$SPKR_INDEX_CACHE``, else ``$XDG_CACHE_HOME/spkr/index``
    (``~/.cache/spkr/index``)."""
    if os.environ.get("SPKR_INDEX_CACHE"):
        return os.environ["SPKR_INDEX_CACHE"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "spkr", "index")


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_index_bytes(url: str, size: int, sha256: str, want_size: int, want_sha256: str) -> None:
    if size != want_size:
        raise ManifestError(f"{url}: index file has {size} bytes, the manifest says {want_size}")
    if sha256 != want_sha256:
        raise ManifestError(
            f"{url}: sha256 {sha256[:16]}... differs from the manifest's {want_sha256[:16]}...: the index "
            "file was changed or belongs to another shard set"
        )


def index_files(data: dict) -> tuple[dict, dict[str, bytes]]:
    """Split manifest ``data`` with per-sample lists inline (:func:`spkr.shards.writer.build_manifest`,
    version 2) into a version-3 manifest and its index files ({path relative to the shards directory:
    bytes}); see the module docstring."""
    files, splits = {}, {}
    for split, sd in data["splits"].items():
        shards = sd["shards"]
        keys = [list(s["keys"]) for s in shards]
        arrays = {
            "key_ends": np.concatenate(
                [np.zeros(0, np.int64)]
                + [
                    np.cumsum(np.fromiter((len(k.encode()) + 1 for k in ks), np.int64, len(ks))) - 1
                    for ks in keys
                ]
            ),
            "shard_starts": np.cumsum([0] + [len(ks) for ks in keys], dtype=np.int64),
        }
        for field in ("frames", "labels", "offsets"):
            arrays[field] = np.concatenate(
                [np.zeros(0, np.int64)] + [np.asarray(s[field], np.int64) for s in shards]
            )
        arrays["checksums"] = np.concatenate(
            [np.zeros(0, np.uint64)] + [np.asarray(s["checksums"], np.uint64) for s in shards]
        )
        index = {}
        for field, suffix in INDEX_FILES.items():
            path = f"{INDEX_DIR}/{split}.{suffix}"
            if field == "keys":
                payload = "\n".join(k for ks in keys for k in ks).encode()
            else:
                buf = io.BytesIO()
                a = narrowed(arrays[field])
                np.save(buf, a.astype(a.dtype.newbyteorder("<"), copy=False), allow_pickle=False)
                payload = buf.getvalue()
            files[path] = payload
            index[field] = {
                "path": path,
                "bytes": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
            }
        entries = [{k: v for k, v in s.items() if k not in PER_SAMPLE_FIELDS} for s in shards]
        splits[split] = {**sd, "shards": entries, "index": index}
    return with_digest({**data, "version": VERSION, "splits": splits}), files


def read_listed(url: str, what: str, storage_options: dict | None, retry) -> bytes:
    """The bytes of a file the manifest lists (index file, trial file, augment.jsonl), read under
    ``retry``; missing or unreadable is a ManifestError naming ``what`` and the URL."""
    try:
        return storage.read_bytes(url, storage_options, retry)
    except FileNotFoundError:
        raise ManifestError(f"{url}: {what} is missing") from None
    except storage.ReadFailed as e:
        raise ManifestError(f"cannot read the {what} {url}: {e}") from e


def checked_text(raw: bytes, sha256: str, url: str) -> str:
    actual = hashlib.sha256(raw).hexdigest()
    if actual != sha256:
        raise ManifestError(
            f"{url}: sha256 {actual[:16]}... differs from the manifest's {sha256[:16]}...: the file was "
            "changed or belongs to another shard set"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{url}: not UTF-8 text: {e}") from None

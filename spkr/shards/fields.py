"""The checks of single fields read from outside (manifest.json, sidecars, index files): types,
shapes and ranges, each failing with a ManifestError naming where and what.

bool is not an int. Per-sample lists are checked with C-level passes (``set(map(type, x))``,
min/max, numpy), not a Python loop per element: every loader worker loads the manifest, and a
LibriSpeech-960 one lists 281k samples.
"""

from __future__ import annotations

import math
import re

import numpy as np

from spkr.shards.packed import PACKED, PackedInts, PackedStrs
from spkr.shards.schema import ManifestError

INT64_END = 2**63
SHA256 = re.compile(r"[0-9a-f]{64}")
REMAKE = "re-make the shards (python -m spkr.tools.shard into a new --out)"


def show(value, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def check_list(x, what: str, at: str, n: int | None = None) -> list:
    if type(x) is not list and not isinstance(x, PACKED):  # packed: a list as parsed
        raise ManifestError(f"{at}: {what} is a {type(x).__name__}, not a list")
    if n is not None and len(x) != n:
        raise ManifestError(f"{at}: lists {len(x)} {what} for {n} samples")
    return x


def check_count(v, what: str, at: str, lo: int = 0, hi: int = INT64_END) -> int:
    if type(v) is not int:
        raise ManifestError(f"{at}: {what} is {show(v)} (a {type(v).__name__}), not an integer")
    if not lo <= v < hi:
        raise ManifestError(f"{at}: {what} is {v}, outside {lo}..{hi - 1}")
    return v


def check_number(v, what: str, at: str) -> float:
    if type(v) not in (int, float):
        raise ManifestError(f"{at}: {what} is {show(v)} (a {type(v).__name__}), not a number")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ManifestError(f"{at}: {what} is {show(v)}, not a finite number")
    return f


def check_ints(x, what: str, at: str, n: int | None = None, lo: int = 0, hi: int = INT64_END) -> np.ndarray:
    """A list of ints (not bools) in lo..hi-1, checked without a Python loop per element; returned as
    int64 when hi <= 2**63, else (lo >= 0, hi <= 2**64) as uint64."""
    check_list(x, what, at, n)
    arr = None
    if isinstance(x, PackedInts):  # packed while parsing or mapped: ints; checked as int64 / uint64
        if x.array.dtype.kind not in "iu":
            raise ManifestError(f"{at}: {what} are {x.array.dtype} numbers, not integers")
        a, b = (int(x.array.min()), int(x.array.max())) if len(x.array) else (lo, lo)
        if a >= lo and b < hi:
            arr = x.array.astype(np.int64 if hi <= INT64_END else np.uint64, copy=False)
    elif x and set(map(type, x)) != {int}:
        bad = next(v for v in x if type(v) is not int)
        raise ManifestError(f"{at}: {what} holds {show(bad)} (a {type(bad).__name__}), not integers")
    elif hi > INT64_END:
        a, b = (min(x), max(x)) if x else (lo, lo)
    else:
        try:
            arr = np.fromiter(x, np.int64, len(x))
        except OverflowError:
            bad = next(v for v in x if not -INT64_END <= v < INT64_END)
            raise ManifestError(f"{at}: {what} holds {show(bad)}, outside {lo}..{hi - 1}") from None
        else:
            a, b = (int(arr.min()), int(arr.max())) if len(arr) else (lo, lo)
    if a < lo or b >= hi:
        raise ManifestError(f"{at}: {what} holds {show(a if a < lo else b)}, outside {lo}..{hi - 1}")
    return arr if arr is not None else np.fromiter(x, np.uint64, len(x))


def packed_ints(x, arr: np.ndarray) -> PackedInts:
    """The checked numbers as packed: a packed (or mapped) input as it is, else ``arr`` packed."""
    return x if isinstance(x, PackedInts) else PackedInts(arr)


def check_floats(x, what: str, at: str, n: int | None = None, lo: float = -math.inf) -> np.ndarray:
    """A list of finite numbers (ints or floats, not bools) >= lo, as float64."""
    if type(x) is not list:
        raise ManifestError(f"{at}: {what} is a {type(x).__name__}, not a list")
    if n is not None and len(x) != n:
        raise ManifestError(f"{at}: {what} has {len(x)} values, expected {n}")
    if x and not set(map(type, x)) <= {int, float}:
        bad = next(v for v in x if type(v) not in (int, float))
        raise ManifestError(f"{at}: {what} holds {show(bad)} (a {type(bad).__name__}), not numbers")
    try:
        a = np.asarray(x, dtype=np.float64)
    except OverflowError:
        raise ManifestError(f"{at}: {what} holds a number too large for a float") from None
    if not np.isfinite(a).all():
        raise ManifestError(f"{at}: {what} holds a non-finite value")
    if a.size and a.min() < lo:
        raise ManifestError(f"{at}: {what} holds {a.min()}, below {lo}")
    return a


def check_strs(x, what: str, at: str, n: int | None = None) -> list[str]:
    check_list(x, what, at, n)
    if x and not isinstance(x, PackedStrs) and set(map(type, x)) != {str}:
        bad = next(v for v in x if type(v) is not str)
        raise ManifestError(f"{at}: {what} holds {show(bad)} (a {type(bad).__name__}), not strings")
    return x


def check_string_keys(d: dict, what: str, at: str) -> None:
    if not isinstance(d, dict):
        raise ManifestError(f"{at}: {what} is a {type(d).__name__}, not an object")
    if d and set(map(type, d)) != {str}:
        bad = next(k for k in d if type(k) is not str)
        raise ManifestError(f"{at}: {what} has a key {show(bad)} that is not a string")

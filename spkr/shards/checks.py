"""The checks of a manifest's entries as a whole: shard entries, the feature config, statistics, the
``protocol`` and ``augment`` entries, unique keys and the ``digest`` (:func:`manifest_digest`);
each fails with a ManifestError naming the file and what is wrong. The single-field checks they
build on are :mod:`spkr.shards.fields`'.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np

from spkr.features import FeatureConfig
from spkr.shards.fields import (
    INT64_END,
    REMAKE,
    SHA256,
    check_count,
    check_floats,
    check_ints,
    check_number,
    check_string_keys,
    check_strs,
    packed_ints,
    show,
)
from spkr.shards.packed import PackedStrs, plain
from spkr.shards.schema import (
    AUGMENT_NAME,
    BAD_KEY_CHAR,
    CLASSIFICATION,
    DIGEST,
    PRE_DIGEST_FIELDS,
    PROTOCOLS,
    ROLES,
    VERIFICATION,
    ManifestError,
    shard_name_problem,
    trials_path,
)


def manifest_digest(data: dict) -> dict[str, str]:
    """What a manifest's ``digest`` holds: {field: sha256 of its canonical JSON (sorted keys, no spaces,
    packed sequences as the lists they are)} for every top-level field of ``data`` but ``digest``."""
    return {k: _field_sha256(v) for k, v in sorted(data.items()) if k != DIGEST}


def with_digest(data: dict) -> dict:
    """Manifest ``data`` with its ``digest`` (re)computed, as the last field."""
    rest = {k: v for k, v in data.items() if k != DIGEST}
    return {**rest, DIGEST: manifest_digest(rest)}


def _field_sha256(value) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=plain, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def check_unique_keys(checked: dict[str, list], where: str) -> None:
    """No sample key listed twice in the manifest (all splits), in a pass of its own: the keys it
    decodes are freed together, not interleaved with what the manifest keeps."""
    seen: set[str] = set()
    n_keys = 0
    for infos in checked.values():
        for info in infos:
            seen.update(info.keys)
            n_keys += info.num_samples
            if len(seen) != n_keys:
                counts = Counter(k for lst in checked.values() for i in lst for k in i.keys)
                dup = [k for k, c in counts.items() if c > 1]
                raise ManifestError(
                    f"{where}: sample key(s) listed twice, e.g. {sorted(dup)[:3]} (again in {info.name})"
                )


def joined_keys(shards: list) -> bytes:
    """The keys of checked (packed) shards, in order, joined by newlines, as UTF-8."""
    return b"\n".join(s.keys.text for s in shards if len(s.keys))


def check_shard_entry(cls, d, where: str, split: str | None, n_classes: int | None = None):
    """A ``cls`` (:class:`spkr.shards.format.ShardInfo`) from shard entry ``d`` after
    ``ShardInfo.from_dict``'s checks (see there); labels below ``n_classes`` when given. The
    per-sample fields come out packed (:class:`PackedStrs`, :class:`PackedInts`)."""
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: a shard entry is a {type(d).__name__}, not an object")
    name = d.get("name")
    if split is None and isinstance(d.get("split"), str):
        split = d["split"]  # a sidecar names its split
    problem = shard_name_problem(name, split)
    if problem:
        raise ManifestError(f"{where}: shard name {show(name)} {problem}")
    at = f"{where}: shard {name}"
    fields = cls.__dataclass_fields__
    missing = [k for k in fields if k not in d]
    if "checksums" in missing:
        raise ManifestError(
            f"{at} lacks per-sample 'checksums': the manifest predates this spkr version; {REMAKE}"
        )
    if missing:
        raise ManifestError(f"{at}: shard entry lacks {missing}")
    n = check_count(d["num_samples"], "num_samples", at)
    size = check_count(d["bytes"], "bytes", at)
    if "sha256" in fields and not isinstance(d["sha256"], str):
        raise ManifestError(f"{at}: sha256 is {show(d['sha256'])}, not a string")
    keys = check_strs(d["keys"], "keys", at, n)
    if isinstance(keys, PackedStrs):  # packed while parsing or mapped: no key holds a newline
        try:
            joined = bytes(keys.text).decode().replace("\n", "")
        except UnicodeDecodeError as e:
            raise ManifestError(f"{at}: keys are not UTF-8 ({e})") from None
        empty = n and not keys.lengths().all()
    else:
        joined, empty = "".join(keys), "" in keys
    # str.isprintable and `in` scan in C (a regex takes 2.5x as long)
    if not joined.isprintable() or "." in joined or "/" in joined or "\\" in joined or empty:
        bad = next(k for k in keys if not k or not k.isprintable() or BAD_KEY_CHAR.search(k))
        raise ManifestError(
            f"{at}: sample key {show(bad)} is empty or holds '.', '/', '\\' or an unprintable character"
        )
    label_end = INT64_END if n_classes is None else max(n_classes, 1)
    packed = {
        "keys": keys if isinstance(keys, PackedStrs) else PackedStrs.pack(keys),
        "frames": packed_ints(d["frames"], check_ints(d["frames"], "frames", at, n)),
        "labels": packed_ints(d["labels"], check_ints(d["labels"], "labels", at, n, hi=label_end)),
    }
    off = check_ints(d["offsets"], "offsets", at, n, hi=max(size, 1))
    if n:
        if n > 1 and not (np.diff(off) > 0).all():
            raise ManifestError(f"{at}: offsets are not increasing")
        if (off % 512).any():
            raise ManifestError(f"{at}: offsets are not on 512-byte tar block boundaries")
        if off[-1] >= size:
            raise ManifestError(f"{at}: offset {int(off[-1])} lies beyond the shard's {size} bytes")
    packed["offsets"] = packed_ints(d["offsets"], off)
    if "checksums" in fields or "checksums" in d:
        sums = d.get("checksums")
        packed["checksums"] = packed_ints(sums, check_ints(sums, "checksums", at, n, hi=2**64))
    return cls(**{k: packed.get(k, d[k]) for k in fields})


def check_feature_config(fc, where: str) -> FeatureConfig:
    at = f"{where}: feature_config"
    check_string_keys(fc, "feature_config", where)
    for name, f in FeatureConfig.__dataclass_fields__.items():
        if name not in fc:
            continue
        v, t = fc[name], type(f.default)
        if t is float:
            check_number(v, name, at)
        elif t is int:
            check_count(v, name, at, lo=1, hi=2**31)
        elif type(v) is not t:
            raise ManifestError(f"{at}: {name} is {show(v)} (a {type(v).__name__}), not a {t.__name__}")
    try:
        return FeatureConfig.from_dict(fc)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{at}: {e}") from None


def check_stats(st, where: str, n_mels: int) -> None:
    at = f"{where}: stats"
    check_string_keys(st, "stats", where)
    missing = [k for k in ("mean", "std", "min", "max") if k not in st]
    if missing:
        raise ManifestError(f"{at} lacks {missing}")
    check_floats(st["mean"], "mean", at, n_mels)
    check_floats(st["std"], "std", at, n_mels, lo=0.0)
    check_number(st["min"], "min", at)
    check_number(st["max"], "max", at)
    if "num_frames" in st:
        check_count(st["num_frames"], "num_frames", at)
    if "split" in st and not isinstance(st["split"], str):
        raise ManifestError(f"{at}: split is {show(st['split'])}, not a string")


def check_protocol(p, split_names: list[str], n_classes: int, where: str) -> dict[str, int]:
    """Check the manifest's ``protocol`` entry (docs/protocols.md) against its splits; return each
    split's label bound: ``len(labels)`` for classification, ``len(speakers)`` for verification."""
    bounds = {s: max(n_classes, 1) for s in split_names}
    if p is None:
        return bounds
    at = f"{where}: protocol"
    check_string_keys(p, "protocol", where)
    if p.get("name") not in PROTOCOLS:
        raise ManifestError(f"{at}: name {show(p.get('name'))} is not one of {list(PROTOCOLS)}")
    splits = p.get("splits")
    check_string_keys(splits, "protocol splits", where)
    if sorted(splits) != sorted(split_names):
        raise ManifestError(f"{at}: lists splits {sorted(splits)} but the manifest has {sorted(split_names)}")
    for name, entry in splits.items():
        check_string_keys(entry, f"protocol split '{name}'", where)
        kind, role = entry.get("kind"), entry.get("role")
        if kind not in (CLASSIFICATION, VERIFICATION) or role not in ROLES:
            raise ManifestError(
                f"{at}: split '{name}' has kind {show(kind)} / role {show(role)} (kinds: {CLASSIFICATION}, "
                f"{VERIFICATION}; roles: {', '.join(ROLES)})"
            )
        if kind == VERIFICATION:
            bounds[name] = max(_check_verification_entry(entry, name, f"{at}: split '{name}'"), 1)
    train = [n for n, e in splits.items() if e["role"] == "train"]
    if len(train) != 1 or splits[train[0]]["kind"] != CLASSIFICATION:
        raise ManifestError(f"{at}: needs exactly one classification split with role train, has {train}")
    return bounds


def _check_verification_entry(entry: dict, name: str, at: str) -> int:
    """A verification split's speakers, enrollment keys and trial file entry; returns len(speakers)."""
    speakers = check_strs(entry.get("speakers"), "speakers", at)
    if len(set(speakers)) != len(speakers):
        raise ManifestError(f"{at}: speakers lists a speaker twice")
    check_strs(entry.get("enroll_keys"), "enroll_keys", at)
    trials = entry.get("trials")
    check_string_keys(trials, "trials", at)
    if trials.get("path") != trials_path(name):
        raise ManifestError(f"{at}: trials path {show(trials.get('path'))} is not {trials_path(name)!r}")
    if not isinstance(trials.get("sha256"), str) or not SHA256.fullmatch(trials["sha256"]):
        raise ManifestError(f"{at}: trials sha256 {show(trials.get('sha256'))} is not 64 hex digits")
    for count in ("count", "target", "nontarget"):
        check_count(trials.get(count), f"trials {count}", at)
    return len(speakers)


def check_digest(d: dict, where: str) -> None:
    """Every field of manifest ``d`` (as read) has the sha256 its ``digest`` lists; else ManifestError
    naming the field. Without a digest, the fields are not checked but must be ones a manifest
    without a digest holds (:data:`PRE_DIGEST_FIELDS`)."""
    if DIGEST not in d:
        unknown = sorted(set(d) - PRE_DIGEST_FIELDS)
        if unknown:
            raise ManifestError(
                f"{where}: field(s) {unknown} in a manifest without its {DIGEST!r}: the manifest was "
                f"edited; {REMAKE}"
            )
        return
    listed = d[DIGEST]
    check_string_keys(listed, DIGEST, where)
    for field, sha in listed.items():
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            raise ManifestError(f"{where}: digest of {field!r} is {show(sha)}, not 64 hex digits")
    fields = sorted(set(d) - {DIGEST})
    extra, gone = sorted(set(fields) - set(listed)), sorted(set(listed) - set(fields))
    if extra or gone:
        problem = (
            f"field(s) {extra} are not under its digest"
            if extra
            else f"field(s) {gone} of its digest are missing"
        )
        raise ManifestError(f"{where}: {problem}: the manifest was edited; {REMAKE}")
    try:
        actual = manifest_digest(d)
    except (ValueError, RecursionError) as e:  # NaN or infinity, or nesting too deep, in a free-form field
        raise ManifestError(f"{where}: a field cannot be digested ({type(e).__name__}: {e})") from None
    for field in fields:
        if actual[field] != listed[field]:
            raise ManifestError(
                f"{where}: {field!r} does not match the manifest's digest (sha256 {actual[field][:16]}..., "
                f"listed {listed[field][:16]}...): the manifest was edited by hand or assembled from "
                f"another shard set; {REMAKE}"
            )


def check_augment_entry(a, where: str) -> None:
    """The ``augment`` entry: where the copies' descriptions are, their digest and count."""
    if a is None:
        return
    at = f"{where}: augment"
    check_string_keys(a, "augment", where)
    if a.get("path") != AUGMENT_NAME:
        raise ManifestError(f"{at}: path {show(a.get('path'))} is not {AUGMENT_NAME!r}")
    if not isinstance(a.get("sha256"), str) or not SHA256.fullmatch(a["sha256"]):
        raise ManifestError(f"{at}: sha256 {show(a.get('sha256'))} is not 64 hex digits")
    check_count(a.get("count"), "count", at)
    check_count(a.get("copies"), "copies", at, lo=1)

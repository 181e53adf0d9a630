"""The manifest: ``manifest.json`` loaded, validated and read (:class:`Manifest`, :class:`ShardInfo`,
:class:`SplitInfo`), and the identity of a shard set (:func:`dataset_id`). The contract's names,
constants and errors are :mod:`spkr.shards.schema`'s; the checks :mod:`spkr.shards.fields`' and
:mod:`spkr.shards.checks`'; the index files :mod:`spkr.shards.index`'.

``manifest.json``'s ``digest`` holds the sha256 of every other top-level field
(:func:`spkr.shards.checks.manifest_digest`), checked on every load: a field outside the
``dataset_id`` (``stats``, ``class_weights``, the index files' digests, ...) edited by hand is refused,
naming the field. A manifest without ``digest`` loads if it holds only the fields a manifest without
one can hold (:data:`spkr.shards.schema.PRE_DIGEST_FIELDS`; a renamed digest key is refused).

Optional top-level entries (docs/protocols.md): ``protocol`` (absent = ``closed``): each split's kind
(classification: labels are class ids < ``len(labels)``; verification: labels index that split's own
``speakers``), role (train/valid/test), enrollment keys and trial file (path ``trials/<split>.txt``,
sha256); ``augment``: the copies' split, count per utterance, recipe identity and ``augment.jsonl``'s
sha256. Copies appear only in the split with role train. The split name ``trials`` is reserved.
Everything the loader and the charts need is here, so neither opens audio: per-sample keys, frame
counts, labels and byte offsets, per-shard bytes and sha256, the feature config, the label map, class
weights and the training split's per-mel-bin statistics. The tar layout of a sample is
:mod:`spkr.shards.codec`'s.

Everything read from outside (manifest.json, sidecars, index files) is type-, shape- and
range-checked before it is used: a malformed or hostile file fails at load time with a ManifestError
naming the file and what is wrong (never a TypeError, KeyError or RecursionError later, never a read
outside the shards directory).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spkr import storage
from spkr.config import TooDeep, loads_json
from spkr.features import FeatureConfig
from spkr.shards.checks import (
    check_augment_entry,
    check_digest,
    check_feature_config,
    check_protocol,
    check_shard_entry,
    check_stats,
    check_unique_keys,
    joined_keys,
    with_digest,
)
from spkr.shards.fields import REMAKE, check_floats, check_string_keys, check_strs, show
from spkr.shards.index import attach_index, checked_text, read_listed
from spkr.shards.packed import pack_shard_entry, plain
from spkr.shards.schema import (
    CLASSIFICATION,
    CLOSED,
    COPY_SEPARATOR,
    FORMAT,
    INLINE_VERSION,
    MANIFEST_NAME,
    PER_SAMPLE_FIELDS,
    READ_VERSIONS,
    ROLES,
    SAMPLE_CHECKSUM,
    VERIFICATION,
    VERSION,
    DatasetMismatch,
    ManifestError,
    ManifestMismatch,
    split_name_problem,
)


def dataset_id(
    feature_fingerprint: str,
    feature_backend: str,
    labels: list[str],
    split_keys: dict,
    extras: dict | None = None,
) -> str:
    """The identity of a shard set: what its features are and which utterance is in which split, in
    which order. ``split_keys``: {split: ordered keys, or their UTF-8 joined by newlines}. Two shard
    sets with the same id hold the same samples computed the same way; another seed, source split,
    feature config or label map differs. ``extras`` (:func:`dataset_extras`: a non-closed protocol,
    augmentation) is hashed too when given; a closed shard set without copies has no extras, so its
    id depends on features, labels and keys alone."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}\n{feature_fingerprint}\n{feature_backend}\n".encode())
    h.update(json.dumps(list(labels)).encode())
    for split in sorted(split_keys):
        h.update(f"\n[{split}]\n".encode())
        keys = split_keys[split]
        h.update(keys if isinstance(keys, bytes) else "\n".join(keys).encode())
    for name in sorted(extras or {}):
        h.update(f"\n{{{name}}}\n".encode() + json.dumps(extras[name], sort_keys=True).encode())
    return h.hexdigest()[:16]


def dataset_extras(protocol: dict | None, augment: dict | None) -> dict:
    """What besides features, labels and keys decides a shard set's identity: the protocol entry
    (verification label spaces, enrollment keys, trial digests) unless it is ``closed``, and the
    augmentation entry without its folder locations (the source contents are in its identity)."""
    extras = {}
    if protocol is not None and protocol.get("name") != CLOSED:
        extras["protocol"] = protocol
    if augment is not None:
        extras["augment"] = {k: v for k, v in augment.items() if k != "folders"}
    return extras


@dataclass
class ShardInfo:
    """One shard's entry. Read from a manifest or sidecar (:meth:`from_dict`), the per-sample fields
    are :class:`~spkr.shards.packed.PackedStrs` / :class:`~spkr.shards.packed.PackedInts` (equal to the lists they were read from); the
    writer builds it with lists. :meth:`to_dict` gives lists either way."""

    name: str  # relative to the shards directory, e.g. "train/shard-000000.tar"
    num_samples: int
    bytes: int
    sha256: str
    keys: Sequence[str]
    frames: Sequence[int]
    labels: Sequence[int]
    offsets: Sequence[int]  # byte offset of each sample's first tar header
    checksums: Sequence[int]  # spkr.shards.codec.sample_checksum of each sample's byte span

    @classmethod
    def from_dict(cls, d: dict, where: str, split: str | None = None) -> ShardInfo:
        """A shard entry (of a manifest or a sidecar) with every field type- and range-checked, else
        ManifestError naming ``where`` and the shard: a safe name inside ``split``'s folder (a sidecar's
        own ``split`` when not given, see :func:`spkr.shards.schema.shard_name_problem`), int counts, per-sample lists of
        length ``num_samples`` (keys: strings without '.', '/'; frames, labels: ints >= 0; offsets:
        increasing, on tar blocks, inside ``bytes``; checksums: 0 <= c < 2**64)."""
        return check_shard_entry(cls, d, where, split)

    def to_dict(self) -> dict:
        return {k: plain(getattr(self, k)) for k in self.__dataclass_fields__}


@dataclass
class SplitInfo:
    name: str
    shards: list[ShardInfo]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_frames(self) -> int:
        return int(self.frames_array().sum())

    def frames_array(self) -> np.ndarray:
        return self._concat("frames")

    def labels_array(self) -> np.ndarray:
        return self._concat("labels")

    def _concat(self, field: str) -> np.ndarray:
        return np.concatenate(
            [np.zeros(0, np.int64)] + [np.asarray(getattr(s, field), np.int64) for s in self.shards]
        )


def _check_top_level(d, where: str) -> tuple[int, int]:
    """The manifest's format, version, feature config, labels, class weights, statistics and split
    names checked; returns (version, number of classes)."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ManifestError(f"{where}: not a {FORMAT} manifest")
    check_string_keys(d, "manifest", where)
    version = d.get("version")
    if type(version) is not int or version not in READ_VERSIONS:
        old = type(version) is int and version < INLINE_VERSION
        raise ManifestError(
            f"{where}: manifest version {show(version)} (this spkr reads {' and '.join(map(str, READ_VERSIONS))})"
            + (f": the manifest predates this spkr version; {REMAKE}" if old else "")
        )
    for key in ("feature_config", "labels", "splits", "class_weights"):
        if key not in d:
            raise ManifestError(f"{where}: manifest lacks '{key}'")
    cfg = check_feature_config(d["feature_config"], where)
    labels = check_strs(d["labels"], "labels", where)
    n_classes = len(labels)
    if len(set(labels)) != n_classes:
        raise ManifestError(f"{where}: labels lists a label twice")
    if type(d["class_weights"]) is list and len(d["class_weights"]) != n_classes:
        raise ManifestError(f"{where}: {len(d['class_weights'])} class weights for {n_classes} labels")
    check_floats(d["class_weights"], "class_weights", where, n_classes, lo=0.0)
    if d.get("stats") is not None:
        check_stats(d["stats"], where, cfg.n_mels)
    if "skipped" in d and type(d["skipped"]) is not list:
        raise ManifestError(f"{where}: skipped is a {type(d['skipped']).__name__}, not a list")
    check_string_keys(d["splits"], "splits", where)
    for split in d["splits"]:
        problem = split_name_problem(split)
        if problem:
            raise ManifestError(f"{where}: split name {show(split)} {problem}")
    return version, n_classes


class Manifest:
    """A loaded manifest.json with typed accessors. ``self.data`` is the JSON's dict, but that each
    shard entry's per-sample lists are the packed sequences its :class:`ShardInfo` holds (equal to
    those lists; a sample costs its key's bytes + 48 and no Python object; :meth:`to_json` writes
    them as the lists they were)."""

    def __init__(
        self,
        data: dict,
        url: str = "<memory>",
        storage_options: dict | None = None,
        retry: storage.RetryPolicy | None = None,
    ):
        self.data = data
        self.url = url
        self.validate(storage_options, retry)

    # ---------------------------------------------------------------- I/O
    @classmethod
    def load(
        cls, shards: str, storage_options: dict | None = None, retry: storage.RetryPolicy | None = None
    ) -> Manifest:
        """Load ``<shards>/manifest.json``; ``shards`` is a directory or URL prefix. A remote manifest
        is read under ``retry`` (default ``storage.RetryPolicy()``; the same retries as the shards:
        resumed at the byte reached); a read that keeps failing is a ManifestError naming the URL."""
        url = storage.join(str(shards), MANIFEST_NAME)
        try:
            raw = storage.read_bytes(url, storage_options, retry)
        except storage.ReadFailed as e:
            raise ManifestError(f"cannot read the manifest: {e}") from e
        except FileNotFoundError:
            fs, path = storage.get_fs(url, storage_options)
            hint = ""
            try:
                if fs.exists(path.rsplit("/", 1)[0]) and fs.glob(path.rsplit("/", 1)[0] + "/*/*.tar"):
                    hint = " (shards exist but no manifest: the shard run is incomplete; re-run it to finish)"
            except Exception:
                pass
            raise ManifestError(f"{url}: no manifest found{hint}") from None
        try:
            data = loads_json(raw, object_hook=pack_shard_entry)
        except TooDeep:
            raise ManifestError(f"{url}: manifest JSON is nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of > 4300 digits, NaN
            raise ManifestError(f"{url}: manifest is not valid JSON: {e}") from None
        return cls(data, url=url, storage_options=storage_options, retry=retry)

    def to_json(self) -> str:
        """The manifest as one JSON with every per-sample list inline (a version-2 manifest;
        :func:`spkr.shards.index.index_files` splits it into manifest.json + index files)."""
        splits = {
            name: {k: v for k, v in sd.items() if k != "index"} for name, sd in self.data["splits"].items()
        }
        data = with_digest({**self.data, "version": INLINE_VERSION, "splits": splits})
        return json.dumps(data, indent=1, sort_keys=False, default=plain)

    # ---------------------------------------------------------------- checks
    def validate(self, storage_options: dict | None = None, retry: storage.RetryPolicy | None = None) -> None:
        """Check everything the code reads from the manifest (types, shapes, ranges, shard names that
        stay inside the shards directory), else ManifestError naming the file and what is wrong. A
        version-3 manifest's index files are checked and mapped into its shard entries (remote ones
        read with ``storage_options`` under ``retry``)."""
        raw, where = self.data, self.url  # raw: the fields as read, what the digest covers
        version, n_classes = _check_top_level(raw, where)
        label_bounds = check_protocol(raw.get("protocol"), list(raw["splits"]), n_classes, where)
        splits = raw["splits"]
        if version == VERSION:  # the per-sample fields are in index files: mapped into the shard entries
            base = self._base()
            splits = {
                k: attach_index(k, sd, base, f"{where} [{k}]", storage_options, retry)
                for k, sd in splits.items()
            }
        self._checked: dict[str, list[ShardInfo]] = {}  # split() hands out copies: validated once
        packed_splits = {}
        for split, sd in splits.items():
            if not isinstance(sd, dict) or type(sd.get("shards")) is not list:
                raise ManifestError(f"{where}: split '{split}' is not an object with a 'shards' list")
            infos = self._checked[split] = []
            entries = []
            for s in sd["shards"]:
                info = check_shard_entry(ShardInfo, s, f"{where} [{split}]", split, label_bounds[split])
                infos.append(info)
                entries.append({k: getattr(info, k) if k in PER_SAMPLE_FIELDS else v for k, v in s.items()})
            packed_splits[split] = {**sd, "shards": entries}
        self.data = {**raw, "splits": packed_splits}  # the JSON's lists dropped: packed, as checked
        check_unique_keys(self._checked, where)
        self._check_split_keys()
        check_augment_entry(self.data.get("augment"), where)
        self._check_identity()
        check_digest(raw, where)

    def _base(self) -> str:
        return self.url.rsplit("/", 1)[0] if "/" in self.url else "."

    def _check_split_keys(self) -> None:
        """Augmented copies (``<key>~aug<k>``) only in the training split; enrollment keys of a
        verification split are keys of that split."""
        where = self.url
        for split in self.split_names:
            text = joined_keys(self._checked[split]).decode()  # keys decoded only when a check needs them
            if self.split_role(split) != "train" and COPY_SEPARATOR in text:
                copies = [k for k in text.split("\n") if COPY_SEPARATOR in k]
                if copies:
                    raise ManifestError(
                        f"{where}: split '{split}' holds augmented copies (e.g. {copies[0]!r}): copies belong "
                        "only in the training split"
                    )
            if self.split_kind(split) == VERIFICATION:
                missing = sorted(set(self.enroll_keys(split)) - set(text.split("\n")))
                if missing:
                    raise ManifestError(
                        f"{where}: protocol split '{split}' enrolls {len(missing)} key(s) it does not hold, "
                        f"e.g. {missing[0]!r}"
                    )

    def _check_identity(self) -> None:
        """The stored dataset_id must be the one its own contents give (a hand-edited or mixed-up
        manifest is refused), and the checksum algorithm one this spkr knows."""
        d, where = self.data, self.url
        for key in ("dataset_id", "feature_fingerprint", "feature_backend", "sample_checksum"):
            if not isinstance(d.get(key), str):
                raise ManifestError(
                    f"{where}: manifest lacks '{key}' (a string): made by an older spkr? re-run "
                    "python -m spkr.tools.shard into a new --out"
                )
        if d.get("sample_checksum") != SAMPLE_CHECKSUM:
            raise ManifestError(
                f"{where}: per-sample checksum {d.get('sample_checksum')!r} (this spkr checks {SAMPLE_CHECKSUM!r})"
            )
        fingerprint = self.feature_config.fingerprint()
        if d["feature_fingerprint"] != fingerprint:
            raise ManifestError(
                f"{where}: feature_fingerprint {d['feature_fingerprint']} does not match its feature_config "
                f"({fingerprint}): the manifest was edited; re-run python -m spkr.tools.shard"
            )
        expected = dataset_id(
            d["feature_fingerprint"],
            d["feature_backend"],
            d["labels"],
            {name: joined_keys(self._checked[name]) for name in d["splits"]},
            dataset_extras(d.get("protocol"), d.get("augment")),
        )
        if d["dataset_id"] != expected:
            raise ManifestError(
                f"{where}: dataset_id {d['dataset_id']} does not match its contents ({expected}): the "
                "manifest was edited or assembled from another shard set; re-run python -m spkr.tools.shard"
            )

    def check_dataset(self, expected_id: str | None, what: str, *, allow_other: bool = False) -> bool:
        """Refuse (DatasetMismatch) shards that are not the dataset ``what`` (e.g. "checkpoint x.pt")
        was made from; with ``allow_other`` only return False (the caller warns). True when they are."""
        if expected_id is None or expected_id == self.dataset_id:
            return True
        msg = (
            f"{self.url}: dataset {self.dataset_id} is not the dataset of {what} ({expected_id}): other "
            "features, labels, split assignment (shard --seed, corpus) or order"
        )
        if allow_other:
            return False
        raise DatasetMismatch(msg)

    def check_compatible(self, feature_config: dict | None = None, labels: list[str] | None = None) -> None:
        """Raise ManifestMismatch when these shards were made differently from what a model expects."""
        if feature_config is not None and FeatureConfig.from_dict(feature_config) != self.feature_config:
            mine = self.feature_config.to_dict()
            diff = {k: (feature_config.get(k), mine.get(k)) for k in mine if feature_config.get(k) != mine[k]}
            raise ManifestMismatch(
                f"{self.url}: shards were made with a different feature config than the model expects "
                f"(key: (model, shards)) {diff}"
            )
        if labels is not None and list(labels) != self.labels:
            raise ManifestMismatch(
                f"{self.url}: label map differs from the model's ({len(labels)} vs {len(self.labels)} "
                "classes, or a different order)"
            )

    # ---------------------------------------------------------------- accessors
    @property
    def dataset_id(self) -> str:
        return self.data["dataset_id"]

    @property
    def feature_backend(self) -> str:
        return self.data["feature_backend"]

    @property
    def feature_config(self) -> FeatureConfig:
        return FeatureConfig.from_dict(self.data["feature_config"])

    @property
    def labels(self) -> list[str]:
        return list(self.data["labels"])

    @property
    def class_weights(self) -> list[float]:
        return list(self.data["class_weights"])

    @property
    def stats(self) -> dict:
        if self.data.get("stats") is None:
            raise ManifestError(f"{self.url}: manifest has no feature statistics")
        return self.data["stats"]

    @property
    def split_names(self) -> list[str]:
        return list(self.data["splits"])

    def split(self, name: str) -> SplitInfo:
        self._require_split(name)
        shards = [ShardInfo(**vars(s)) for s in self._checked[name]]  # copies of those validated
        return SplitInfo(name=name, shards=shards)

    def _require_split(self, name: str) -> None:
        if name not in self.data["splits"]:
            raise ManifestError(f"{self.url}: no split '{name}' (have {self.split_names})")

    # ---------------------------------------------------------------- protocol (docs/protocols.md)
    @property
    def protocol_name(self) -> str:
        """``closed``, ``closed-session`` or ``open``; ``closed`` when the manifest has no protocol."""
        return (self.data.get("protocol") or {}).get("name", CLOSED)

    def _protocol_split(self, name: str) -> dict:
        self._require_split(name)
        return ((self.data.get("protocol") or {}).get("splits") or {}).get(name, {})

    def split_kind(self, name: str) -> str:
        """``classification`` (labels are class ids) or ``verification`` (labels index
        :meth:`split_speakers`; scored on trials)."""
        return self._protocol_split(name).get("kind", CLASSIFICATION)

    def split_role(self, name: str) -> str | None:
        """``train``, ``valid`` or ``test``: when train/evaluate use the split. Without a protocol:
        the split's name when it is one of these, else None."""
        entry = self._protocol_split(name)
        return entry["role"] if entry else (name if name in ROLES else None)

    def splits_with_role(self, role: str) -> list[str]:
        """The splits with ``role``, in manifest order (``open``: ``valid`` and ``valid-verify``)."""
        return [s for s in self.split_names if self.split_role(s) == role]

    def split_speakers(self, name: str) -> list[str]:
        """The split's label space: ``labels`` for a classification split, the split's own speakers
        for a verification split."""
        entry = self._protocol_split(name)
        return list(entry["speakers"]) if entry.get("kind") == VERIFICATION else self.labels

    def _verification(self, name: str, what: str) -> dict:
        entry = self._protocol_split(name)
        if entry.get("kind") != VERIFICATION:
            raise ManifestError(
                f"{self.url}: split '{name}' is a {self.split_kind(name)} split: it has no {what} "
                f"(verification splits: {[s for s in self.split_names if self.split_kind(s) == VERIFICATION]})"
            )
        return entry

    def enroll_keys(self, name: str) -> list[str]:
        """The enrollment utterances' keys of verification split ``name``."""
        return list(self._verification(name, "enrollment keys")["enroll_keys"])

    @property
    def base_url(self) -> str:
        """The shards directory (or URL prefix) this manifest was loaded from."""
        suffix = "/" + MANIFEST_NAME
        if not self.url.endswith(suffix):
            raise ManifestError(f"{self.url}: an in-memory manifest has no shards directory")
        return self.url[: -len(suffix)]

    def trials_url(self, name: str) -> str:
        """Where verification split ``name``'s trial file is (``<shards>/trials/<split>.txt``)."""
        return storage.join(self.base_url, self._verification(name, "trial file")["trials"]["path"])

    def read_trials(
        self, name: str, storage_options: dict | None = None, retry: storage.RetryPolicy | None = None
    ) -> str:
        """The trial file's text (``<1|0> <enroll_key> <test_key>`` lines; parse it with
        ``spkr.shards.trials.parse_trials``), after checking its sha256 against the manifest's."""
        entry = self._verification(name, "trial file")["trials"]
        url = self.trials_url(name)
        raw = read_listed(url, f"trial file of split '{name}'", storage_options, retry)
        return checked_text(raw, entry["sha256"], url)

    def read_augment_descriptions(
        self, storage_options: dict | None = None, retry: storage.RetryPolicy | None = None
    ) -> list[dict]:
        """The augmented copies' descriptions (``augment.jsonl``, sha256 checked), one per copy in
        manifest key order; [] when the shards hold no copies."""
        entry = self.data.get("augment")
        if entry is None:
            return []
        url = storage.join(self.base_url, entry["path"])
        raw = read_listed(url, "augmentation descriptions file", storage_options, retry)
        lines = checked_text(raw, entry["sha256"], url).splitlines()
        try:
            return [json.loads(line) for line in lines]
        except ValueError as e:
            raise ManifestError(f"{url}: not JSON lines: {e}") from None


def split_summary(shards: list[ShardInfo], sample_rate: int, hop_length: int) -> dict:
    frames = sum(sum(s.frames) for s in shards)
    return {
        "num_samples": sum(s.num_samples for s in shards),
        "num_frames": frames,
        "hours": frames * hop_length / sample_rate / 3600.0,
        "shards": [s.to_dict() for s in shards],
    }

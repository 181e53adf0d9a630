"""The spkr shard format, in one package: what a shards directory holds and how its bytes look.

- :mod:`spkr.shards.schema`: the contract's names, constants, errors (``ManifestError`` and
  subclasses) and name rules; imports nothing of spkr but :mod:`spkr.errors`, so the stages that
  produce a shard set's data (corpus protocols, augmentation) use it too;
- :mod:`spkr.shards.trials`: the trial-list format (``Trial``, ``TrialList``, its writer and reader);
- :mod:`spkr.shards.format`: the manifest (``Manifest``, ``ShardInfo``, ``SplitInfo``) and the
  identity of a shard set (``dataset_id``);
- :mod:`spkr.shards.fields` and :mod:`spkr.shards.checks`: the manifest's validation;
- :mod:`spkr.shards.packed`: the packed per-sample sequences a loaded manifest holds;
- :mod:`spkr.shards.index`: the version-3 index files and the other files a manifest lists;
- :mod:`spkr.shards.codec`: the tar layout of a sample, encoded and decoded (``Sample``,
  ``write_tar``, ``decode_sample``, ``decode_member``, ``ShardError``, ``sample_checksum``);
- :mod:`spkr.shards.stats`: ``RunningStats``, the per-mel-bin feature statistics;
- :mod:`spkr.shards.plan`: the shard plan (``plan_shards``, ``ShardJob``);
- :mod:`spkr.shards.writer`: the write side (featurize, write shards and sidecars, merge the
  manifest); imported on its own, it pulls in audio decoding.

The names below are loaded on first use, so importing :mod:`spkr.shards.schema` or
:mod:`spkr.shards.trials` loads neither the manifest nor the codec. The read side is
:mod:`spkr.stream`; it imports this package, never the reverse.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spkr.shards.codec import Sample, ShardError, sample_checksum
    from spkr.shards.format import Manifest, ShardInfo, SplitInfo
    from spkr.shards.schema import DatasetMismatch, ManifestError, ManifestMismatch
    from spkr.shards.stats import RunningStats

_HOMES = {
    "DatasetMismatch": "schema",
    "Manifest": "format",
    "ManifestError": "schema",
    "ManifestMismatch": "schema",
    "RunningStats": "stats",
    "Sample": "codec",
    "ShardError": "codec",
    "ShardInfo": "format",
    "SplitInfo": "format",
    "sample_checksum": "codec",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)

"""The spkr shard format, in one package: what a shards directory holds and how its bytes look.

- :mod:`spkr.shards.format`: the manifest schema (``Manifest``, ``ShardInfo``, ``SplitInfo``), its
  validation, constants and errors (``ManifestError`` and subclasses);
- :mod:`spkr.shards.codec`: the tar layout of a sample, encoded and decoded (``Sample``,
  ``write_tar``, ``decode_sample``, ``decode_member``, ``ShardError``, ``sample_checksum``);
- :mod:`spkr.shards.stats`: ``RunningStats``, the per-mel-bin feature statistics;
- :mod:`spkr.shards.writer`: the write side (plan, featurize, write shards and sidecars, merge the
  manifest); imported on its own, it pulls in audio decoding.

The read side is :mod:`spkr.stream`; it imports this package, never the reverse.
"""

from spkr.shards.codec import Sample, ShardError, sample_checksum
from spkr.shards.format import (
    DatasetMismatch,
    Manifest,
    ManifestError,
    ManifestMismatch,
    ShardInfo,
    SplitInfo,
)
from spkr.shards.stats import RunningStats

__all__ = [
    "DatasetMismatch",
    "Manifest",
    "ManifestError",
    "ManifestMismatch",
    "RunningStats",
    "Sample",
    "ShardError",
    "ShardInfo",
    "SplitInfo",
    "sample_checksum",
]

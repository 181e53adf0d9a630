"""Streaming spkr shards into training and evaluation (the read side of :mod:`spkr.shards`).

Stages, each a module with its contract in its docstring: :mod:`~spkr.stream.plan` (which samples
every rank and worker reads, in which batches) -> :mod:`~spkr.stream.sources` (byte sources and the
one retrying fetch) -> :mod:`~spkr.stream.reader` (shards -> checked, decoded records) ->
:mod:`~spkr.stream.dataset` (one rank's epoch of records per DataLoader worker) ->
:mod:`~spkr.stream.loader` (``SpeakerLoader``: collate, DataLoader, resume state). Alongside:
:mod:`~spkr.stream.wds` (the same shards as a ``webdataset`` pipeline) and
:mod:`~spkr.stream.data_only` (the loader without a model). :func:`default_rank_world` is spkr's
one rank/world-size lookup.
"""

from spkr.shards.codec import ShardError
from spkr.stream.loader import SpeakerLoader, default_rank_world
from spkr.stream.plan import EpochPlan
from spkr.stream.reader import ShardReader
from spkr.stream.wds import register_webdataset_fsspec, webdataset_pipeline

__all__ = [
    "SpeakerLoader",
    "EpochPlan",
    "ShardError",
    "ShardReader",
    "default_rank_world",
    "register_webdataset_fsspec",
    "webdataset_pipeline",
]

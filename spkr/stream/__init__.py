"""Streaming spkr shards into training and evaluation: the epoch plan, the shard reader, the loader."""

from spkr.stream.loader import SpeakerLoader
from spkr.stream.plan import EpochPlan, plan_for_split
from spkr.stream.reader import ShardError, ShardReader, register_webdataset_fsspec

__all__ = [
    "SpeakerLoader",
    "EpochPlan",
    "plan_for_split",
    "ShardError",
    "ShardReader",
    "register_webdataset_fsspec",
]

"""spkr shards as a ``webdataset`` pipeline, for users who compose their own webdataset pipelines.

    pipeline = webdataset_pipeline("s3://bucket/shards", "train", batch_size=32, shuffle=1000)
    loader = webdataset.WebLoader(pipeline, batch_size=None, num_workers=4)

:func:`webdataset_pipeline` returns a ``webdataset.DataPipeline`` of the stages: the split's shards
(from ``manifest.json``; shuffled per (seed, epoch) the same on every rank with ``shuffle``) ->
``webdataset.split_by_node`` -> ``webdataset.split_by_worker`` -> :class:`SpkrSamples` (each shard
read by a :class:`~spkr.stream.reader.ShardReader`: spkr's retrying fetch for local paths and any
fsspec URL, per-sample checksums, safe decoding by :mod:`spkr.shards.codec` — no pickle, dtype and
shape checks — key/label/frames checked against the manifest) -> ``webdataset.shuffle`` (with
``shuffle``) -> ``webdataset.batched`` (with ``batch_size``: the same padded, normalised batch dict
as :class:`~spkr.stream.loader.SpeakerLoader`). Samples are webdataset-style dicts ``{"__key__",
"__url__", "cls": int, "json": dict, "mel.npy": (frames, n_mels) float16 array}``, so the usual
stages (``.to_tuple("mel.npy", "cls")``, ``.map(...)``) apply.

What it does NOT guarantee (only :class:`~spkr.stream.loader.SpeakerLoader` does): shards are the
unit of splitting, so ranks (and workers) get whole shards — every sample once per epoch, but ranks
get different numbers of samples and batches (none when there are fewer shards than rank x worker
slots), which can hang DDP at the end of an epoch; and no mid-epoch resume.

:func:`register_webdataset_fsspec` is for plain ``webdataset.WebDataset("s3://...")`` users: it lets
webdataset's own ``gopen`` open s3://, gs://, az://, ... through fsspec.
"""

from __future__ import annotations

from collections.abc import Iterator

from spkr import storage
from spkr.shards.format import Manifest, ShardInfo
from spkr.stream.loader import BATCH_DTYPES, Collate, normalisation
from spkr.stream.reader import Record, ShardReader


class SpkrSamples:
    """A webdataset stage: shard names (``{"url": name}`` dicts, or names) in, decoded and checked
    samples out, read under ``base`` by one :class:`ShardReader` per process (``reader_kwargs``)."""

    def __init__(self, base: str, shards: list[ShardInfo], reader_kwargs: dict):
        self.base, self.reader_kwargs = base, reader_kwargs
        self.shards = {s.name: s for s in shards}

    def __call__(self, names) -> Iterator[dict]:
        reader = ShardReader(self.base, **self.reader_kwargs)
        try:
            for item in names:
                shard = self.shards[item["url"] if isinstance(item, dict) else item]
                url = reader.url(shard)
                for rec in reader.iter_range(shard):
                    # own copy: a view would keep the shard's read chunk (or mapping) alive
                    yield {
                        "__key__": rec.key,
                        "__url__": url,
                        "cls": rec.label,
                        "json": rec.meta,
                        "mel.npy": rec.feats.copy(),
                    }
        finally:
            reader.close()


class CollateSamples:
    """``webdataset.batched``'s collation function: samples -> the SpeakerLoader batch dict."""

    def __init__(self, collate: Collate):
        self.collate = collate

    def __call__(self, samples: list[dict]) -> dict:
        records = [Record(0, s["__key__"], s["cls"], s["json"], s["mel.npy"]) for s in samples]
        return self.collate(records, 0, 0)


def webdataset_pipeline(
    url: str,
    split: str,
    *,
    batch_size: int | None = None,
    storage_options: dict | None = None,
    shuffle: int = 0,
    seed: int = 0,
    normalize: bool = True,
    dtype: str = "float32",
    manifest: Manifest | None = None,
    **reader_options,
):
    """A ``webdataset.DataPipeline`` over split ``split`` of the spkr shards at ``url`` (a directory or
    fsspec URL prefix holding ``manifest.json``); see the module docstring. ``shuffle``: sample
    shuffle buffer (0: shards and samples in manifest order); ``batch_size``: batch with
    ``webdataset.batched`` (partial last batch kept), normalised with the manifest's statistics
    unless ``normalize=False``; ``reader_options``: :class:`ShardReader` options (``on_error="skip"``
    drops unreadable samples; ``retries``, ``backoff``, ``cache_dir``, ``chunk_size``, ...)."""
    import webdataset as wds

    retry = storage.RetryPolicy(reader_options.get("retries", 5), reader_options.get("backoff", 0.2))
    manifest = manifest or Manifest.load(url, storage_options, retry=retry)
    shards = manifest.split(split).shards
    n_mels = manifest.feature_config.n_mels
    reader_kwargs = {**reader_options, "storage_options": storage_options, "n_mels": n_mels}
    stages = [wds.SimpleShardList([s.name for s in shards])]
    if shuffle:  # the same shard order on every rank (seed, epoch), before splitting
        stages.append(wds.detshuffle(bufsize=max(len(shards), 1), initial=max(len(shards), 1), seed=seed))
    stages += [wds.split_by_node, wds.split_by_worker, SpkrSamples(str(url), shards, reader_kwargs)]
    if shuffle:
        stages.append(wds.shuffle(shuffle, initial=shuffle, seed=seed))
    if batch_size:
        stats = normalisation(manifest, n_mels) if normalize else {}
        collate = Collate(n_mels, mean=stats.get("mean"), std=stats.get("std"), dtype=BATCH_DTYPES[dtype])
        stages.append(wds.batched(batch_size, collation_fn=CollateSamples(collate), partial=True))
    return wds.DataPipeline(*stages)


def _fsspec_gopen(storage_options: dict | None):
    def gopen(url, mode="rb", bufsize=8192, **kw):
        fs, path = storage.get_fs(url, storage_options)
        return fs.open(path, mode)

    return gopen


FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "r2")


def register_webdataset_fsspec(storage_options: dict | None = None, schemes=FSSPEC_SCHEMES) -> None:
    """Let ``webdataset.WebDataset("s3://...")`` (and gs://, az://, ...) open shards through fsspec
    (webdataset 1.0.2 has no s3 scheme and shells out to gsutil for gs). ``storage_options`` (or
    ``SPKR_STORAGE_OPTIONS``) configure endpoint/credentials."""
    import importlib

    module = importlib.import_module("webdataset.gopen")
    opener = _fsspec_gopen(storage_options)
    for scheme in schemes:
        module.gopen_schemes[scheme] = opener


__all__ = ["webdataset_pipeline", "register_webdataset_fsspec", "SpkrSamples", "CollateSamples"]

"""Where a pipeline's elements come from: the split's PNG files or its TFRecord shards.

The per-file stage of :mod:`chexlib.pipeline.builders`: the split's rows (every one
with a file), sharded by worker before any shuffle; record shards dealt to
workers whole when there are enough of them (the official recipe), else every
n-th record; how many images one worker sees per pass (:func:`count_examples`,
the one rule training's steps per epoch come from); and what a pipeline cache
depends on, so a stale cache file is never read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from chexlib.data.fingerprint import file_stamp
from chexlib.data.metadata import LABELS, SPLITS, DataError, load_metadata
from chexlib.pipeline.config import AUTOTUNE, PipelineConfig
from chexlib.records.manifest import manifest_if_any, read_manifest
from chexlib.records.read import list_shards


def split_table(metadata, split: str):
    """Rows of ``split`` in metadata order; every row must have a file."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if metadata is None:
        raise ValueError(
            "source='raw' needs metadata (chexlib.data.metadata.load_metadata) or data_dir"
        )
    rows = metadata[metadata["split"] == split]
    if rows.empty:
        raise DataError(f"split {split!r} has no images")
    missing = rows.loc[rows["path"].isna(), "image"].tolist()
    if missing:
        raise DataError(
            f"split {split!r}: {len(missing)} image(s) have no file, e.g. {missing[:5]}"
        )
    return rows


def raw_items(metadata, split: str, cfg: PipelineConfig) -> tf.data.Dataset:
    """(path, labels, name) per image of the split, sharded by worker, shuffled in training."""
    rows = split_table(metadata, split)
    labels = rows[list(LABELS)].to_numpy(dtype=np.float32)
    items = tf.data.Dataset.from_tensor_slices(
        (rows["path"].astype(str).tolist(), labels, rows["image"].astype(str).tolist())
    )
    items = items.shard(cfg.num_shards, cfg.shard_index)  # before any shuffle
    if cfg.training and cfg.shuffle_files:
        n = -(-len(rows) // cfg.num_shards)  # the whole shard: a perfect shuffle of names
        items = items.shuffle(n, seed=cfg.random_seed, reshuffle_each_iteration=True)
    return items


def record_format(records_dir) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"raw"`` from the records' manifest; None if it does not say."""
    manifest = manifest_if_any(records_dir)
    return manifest.get("format") if manifest else None


def record_files(records_dir, split: str) -> list[str]:
    """Sorted shard files of ``split``; an error names the folder when there are none."""
    files = [str(f) for f in list_shards(records_dir, split)]
    if not files:
        raise DataError(f"{records_dir}: no TFRecord shards for split {split!r}")
    return files


def record_items(records_dir, split: str, cfg: PipelineConfig) -> tf.data.Dataset:
    """Serialized records of the split: files sharded then shuffled, read (interleaved), prefetched."""
    files = record_files(records_dir, split)
    per_file = len(files) >= cfg.num_shards
    ds = tf.data.Dataset.from_tensor_slices(files)
    if per_file:  # the official recipe: each worker reads its own files
        ds = ds.shard(cfg.num_shards, cfg.shard_index)
        if cfg.training and cfg.shuffle_files:
            ds = ds.shuffle(len(files), seed=cfg.random_seed, reshuffle_each_iteration=True)

    def read(filename):
        return tf.data.TFRecordDataset(filename, buffer_size=cfg.read_buffer_bytes)

    if cfg.interleave and per_file:
        ds = ds.interleave(
            read,
            cycle_length=cfg.cycle_length,
            num_parallel_calls=AUTOTUNE,
            deterministic=cfg.deterministic,
        )
    else:  # one file after another, in order
        ds = ds.flat_map(read)
    if not per_file:  # fewer files than workers: every worker reads all, keeps every n-th record
        ds = ds.shard(cfg.num_shards, cfg.shard_index)
    if cfg.prefetch_records:
        ds = ds.prefetch(AUTOTUNE)
    return ds


def cache_file(cfg: PipelineConfig, source: str, split: str, inputs: list[str]) -> str:
    """A cache file named by everything that decides its content, so a stale one is never read."""
    import hashlib

    folder = Path(cfg.cache)
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256("\n".join(inputs).encode()).hexdigest()[:12]
    name = f"{source}-{split}-{cfg.image_size}px-shard{cfg.shard_index}of{cfg.num_shards}-{digest}"
    return str(folder / name)


def cache_inputs(source: str, split: str, metadata, records_dir) -> list[str]:
    """What a cache depends on (it holds images, labels and names).

    Raw source: a digest of the split's labels and image names, then every
    image file's path, size and modification time (``stat`` only, no pixel
    is read), so edited labels or a replaced image select a new cache.
    Records: the conversion key, then each record file's path, size and time.
    """
    import hashlib

    if source == "raw":
        rows = split_table(metadata, split)
        digest = hashlib.sha256(rows[list(LABELS)].to_numpy(dtype=np.float32).tobytes())
        digest.update("\n".join(rows["image"].astype(str)).encode())
        return [f"labels {digest.hexdigest()}", *map(file_stamp, rows["path"].astype(str))]
    key = str(read_manifest(records_dir).get("key", ""))
    return [key, *map(file_stamp, record_files(records_dir, split))]


def count_examples(
    source: str,
    split: str,
    *,
    metadata=None,
    data_dir=None,
    records_dir=None,
    num_shards: int = 1,
    shard_index: int = 0,
) -> int:
    """Images one worker sees per pass over ``split`` (steps per epoch = this / batch size)."""
    if source == "raw":
        if metadata is None:
            metadata = load_metadata(data_dir)
        n = len(split_table(metadata, split))
        return len(range(shard_index, n, num_shards))
    files = record_files(records_dir, split)
    counts = _records_per_file(records_dir, files)
    # the rule of record_items: whole files dealt round-robin when there are at least
    # as many files as workers, else every num_shards-th record
    if len(files) >= num_shards:
        return sum(counts[f] for f in files[shard_index::num_shards])
    return len(range(shard_index, sum(counts.values()), num_shards))


def _records_per_file(records_dir, files: list[str]) -> dict[str, int]:
    """Records per shard file, from the manifest (counted by reading when it does not say)."""
    shards = read_manifest(records_dir)["shards"]
    known = {
        str(Path(records_dir) / s["file"]): int(s["records"]) for s in shards if "records" in s
    }
    return {f: known[f] if f in known else _count_records(f) for f in files}


def _count_records(filename: str) -> int:
    return int(tf.data.TFRecordDataset(filename).reduce(np.int64(0), lambda n, _: n + 1))

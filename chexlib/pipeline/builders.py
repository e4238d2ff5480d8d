"""tf.data input pipelines for CheXNet: naive and optimized, from PNG files or TFRecords.

Every dataset built here goes through ONE preprocessing path
(:func:`preprocess_image`), whatever the source and the pipeline:

1. decode to one 8-bit channel, whatever the stored layout (RGB, RGBA and
   16-bit PNGs included; JPEG and raw records too), with libspng or
   TensorFlow's decoder (:mod:`chexlib.pipeline.decode`: identical pixels);
2. resize to the model's input size, bilinear with antialiasing done as a
   whole-factor box reduction (fused with a libspng decode) and a small
   bilinear step (:func:`~chexlib.pipeline.decode.resize_gray`), rounded back to
   ``uint8`` so a cached image is bit-identical to a freshly decoded one;
   an image stored at that size already (compact records) passes through;
3. random horizontal flip, in training only (on the ``uint8`` channel);
4. deliver the ``uint8`` grey channel (the uint8 input contract): the model's
   first layer (:mod:`chexlib.train.gray_input`) normalises it ONCE as its
   ImageNet weights expect (the poster's code divided by 255 twice) and
   replicates it to three channels with a 256 x 3 lookup table, on the device
   that runs the model: 12x fewer bytes per batch than three float32 channels,
   and no normalising on the CPU. ``normalize_in_pipeline=True`` does that
   step here instead (for other models, and to measure what the contract saves).

Steps 2-4 are two functions, as the official models split a decoder from a
parser with per-element and per-batch parts: :func:`parse_element` (resize,
draw the flip) and :func:`parse_batch` (apply the flips), which
take one image or a whole batch. ``build_dataset`` runs exactly these two.

Two pipelines differ only in how the work is scheduled:

* ``naive`` (what the poster calls naive): list files, shard, shuffle the
  files (training), read the records one file after another, shuffle records
  (training), repeat, decode and preprocess elements ONE AT A TIME
  (``map`` without ``num_parallel_calls``), batch at the end, and no prefetch
  anywhere. TensorFlow 2.x would silently parallelise the map, add a final
  prefetch, and fuse map and batch into one op that runs ahead of its consumer
  (the ``map_parallelization``, ``inject_prefetch`` and ``map_and_batch_fusion``
  rewrites), so the naive pipeline switches those rewrites off to stay what it says.
* ``optimized``: the TensorFlow official-models recipe. Per-file stage: shard
  by worker BEFORE shuffling, shuffle file names (training only), parallel
  interleave of the record files, prefetch. Per-record stage: shuffle records
  (training only), repeat, parallel map (parse + preprocess), batch with
  static shapes (TF fuses map and batch), normalise whole batches (the
  tf.data guide's vectorized mapping), final prefetch; options for a
  private thread pool, one thread per op, slack and non-determinism. Each
  step is a keyword switch of :func:`build_dataset` (see
  :data:`OPTIMIZED_STEPS`), so an ablation can turn one off at a time.

Beyond the poster: ``cache`` keeps decoded, resized images in memory or in a
local file after the first epoch, and ``data_service`` reads the batches
through a tf.data service (``chexlib.pipeline.dataservice``), whose workers may run on
other hosts: the answer when a node's CPUs cannot feed its accelerators.

Where elements come from (the split's files or record shards, sharding by
worker, how many images a worker sees) is :mod:`chexlib.pipeline.sources`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from chexlib.core.names import SOURCES
from chexlib.data.metadata import LABELS, load_metadata
from chexlib.pipeline.config import AUTOTUNE, NORMALIZATION, PipelineConfig
from chexlib.pipeline.decode import (
    decode_png_gray,
    decode_png_reduced,
    resize_gray,
)
from chexlib.pipeline.sources import cache_file as sources_cache_file
from chexlib.pipeline.sources import cache_inputs, raw_items, record_format, record_items

# re-exported: callers read the split and count examples through the pipeline module
from chexlib.records.read import parse_example

_TORCH_MEAN = (0.485, 0.456, 0.406)  # RGB, on [0, 1]
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # BGR, on [0, 255]


# --- preprocessing: the one shared path ----------------------------------------


def normalization_for(model: str) -> str:
    """``"torch"`` for densenet121, ``"caffe"`` for resnet50, as their Keras weights expect."""
    try:
        return NORMALIZATION[model]
    except KeyError:
        raise ValueError(
            f"unknown model {model!r}; expected one of {tuple(NORMALIZATION)}"
        ) from None


def _affine(model: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per output channel so that ``out = pixel * scale + offset``, pixel in [0, 255]."""
    if normalization_for(model) == "torch":  # (x / 255 - mean) / std, channels RGB
        std = np.array(_TORCH_STD)
        return 1.0 / (255.0 * std), -np.array(_TORCH_MEAN) / std
    # caffe: RGB -> BGR then minus the BGR mean; a grey image is the same in RGB and BGR
    return np.ones(3), -np.array(_CAFFE_MEAN_BGR)


def decode_gray(
    encoded: tf.Tensor, image_format: str, height=None, width=None, png_decoder: str = "tensorflow"
) -> tf.Tensor:
    """Decode ``png``, ``jpeg`` or ``raw`` (one uint8 channel, ``height*width`` bytes) to ``[H, W, 1]``."""
    if image_format == "png":
        return decode_png_gray(encoded, png_decoder)
    if image_format == "jpeg":
        return tf.io.decode_jpeg(encoded, channels=1)
    if image_format == "raw":
        flat = tf.io.decode_raw(encoded, tf.uint8)
        return tf.reshape(flat, tf.stack([tf.cast(height, tf.int32), tf.cast(width, tf.int32), 1]))
    raise ValueError(f"unknown image format {image_format!r}; expected png, jpeg or raw")


def flip_decision(seed=None) -> tf.Tensor:
    """Scalar bool: flip this image? Stateless (reproducible) with a shape-[2]
    ``seed``; TensorFlow's stateful generator when ``seed`` is None."""
    if seed is None:
        return tf.random.uniform([]) < 0.5
    return tf.random.stateless_uniform([], seed=seed) < 0.5


def _mirror(images: tf.Tensor) -> tf.Tensor:
    """Left-right mirror of ``[..., S, S, 1]``, reversing the LAST axis of the
    channel-less view: 3-4x faster in TensorFlow than reversing the width
    axis with its 1-wide channel axis after it."""
    return tf.reverse(images[..., 0], [-1])[..., tf.newaxis]


def apply_flips(images: tf.Tensor, flips: tf.Tensor) -> tf.Tensor:
    """Flip left-right where ``flips`` is true: one grey image ``[S, S, 1]``
    with a scalar, or a batch ``[B, S, S, 1]`` with ``[B]`` (only the flipped
    images are touched, picked out and put back with one partition/stitch)."""
    if images.shape.rank == 3:
        return tf.cond(flips, lambda: _mirror(images), lambda: images)
    which = tf.cast(flips, tf.int32)
    keep, flip = tf.dynamic_partition(images, which, 2)
    keep_at, flip_at = tf.dynamic_partition(tf.range(tf.shape(images)[0]), which, 2)
    out = tf.dynamic_stitch([keep_at, flip_at], [keep, _mirror(flip)])
    return tf.ensure_shape(out, images.shape)


def normalization_table(model: str) -> np.ndarray:
    """``float32 [256, 3]``: the normalised RGB value of each grey level for ``model``."""
    scale, offset = _affine(model)
    return (np.arange(256)[:, None] * scale + offset).astype(np.float32)


def normalize(gray: tf.Tensor, model: str) -> tf.Tensor:
    """``uint8 [..., 1]`` -> ``float32 [..., 3]``: normalise once and replicate, for ``model``.

    A grey level has 256 possible values, so the per-channel affine map is a
    256 x 3 table and normalising is one gather: 2-3x faster on a CPU than
    broadcasting a multiply-add into three channels (interleaving a 3-wide
    last axis is slow in TensorFlow's kernels). Works on one image or a batch.
    """
    table = tf.constant(normalization_table(model))
    out = tf.gather(table, tf.cast(gray[..., 0], tf.int32))
    return tf.ensure_shape(out, gray.shape[:-1].concatenate([3]))


def parse_element(gray: tf.Tensor, image_size: int, training: bool, seed=None):
    """The per-element half of preprocessing: ``uint8 [H, W, 1]`` -> ``(uint8 [S, S, 1],
    flip)``: resized (:func:`resize_gray`) and this image's flip drawn (training only;
    ``seed``: shape-[2] seed of a stateless flip, None for a stateful one)."""
    flip = flip_decision(seed) if training else tf.constant(False)
    return resize_gray(gray, image_size), flip


def parse_batch(
    images: tf.Tensor, flips: tf.Tensor, model: str, training: bool, normalized: bool = False
) -> tf.Tensor:
    """The per-batch half: flip where drawn (training only); the uint8 grey images as
    they are (the model normalises them), or with ``normalized`` normalised once for
    ``model`` and replicated to three channels. Takes one image ``[S, S, 1]`` with a
    scalar flip or a batch ``[B, S, S, 1]`` with ``[B]`` flips (the optimized
    pipeline's vectorized step)."""
    images = apply_flips(images, flips) if training else images
    return normalize(images, model) if normalized else images


def preprocess_image(
    gray,
    image_size: int,
    model: str = "densenet121",
    training: bool = False,
    seed=None,
    normalized: bool = False,
) -> tf.Tensor:
    """The ONE preprocessing path: ``uint8 [H, W, 1]`` -> ``uint8 [S, S, 1]`` (the model
    normalises), or ``float32 [S, S, 3]`` with ``normalized``.

    :func:`parse_element` then :func:`parse_batch` on one image: what every
    pipeline does, per image (naive) or with the second half on whole batches
    (optimized). ``seed`` is a shape-[2] seed of the flip, or None for a
    stateful random flip.
    """
    gray = tf.convert_to_tensor(gray)
    if gray.dtype != tf.uint8:  # the table lookup indexes by 8-bit grey level
        raise TypeError(f"preprocess_image takes uint8 images, not {gray.dtype.name}")
    if gray.shape.rank == 2:
        gray = gray[..., tf.newaxis]
    small, flip = parse_element(gray, image_size, training, seed)
    return parse_batch(small, flip, model, training, normalized)


# --- sources: the per-file stage -------------------------------------------------


def _parse_record(serialized):
    return parse_example(serialized)


def _record_decoder(image_format: str | None, cfg: PipelineConfig):
    """serialized record -> (image [H, W, 1], labels float32 [14], name).

    PNG records are decoded and box-reduced in one step (:func:`decode_png_reduced`,
    ``float32``); raw and JPEG records stay ``uint8`` (a compact record at the
    model size then passes through :func:`resize_gray` untouched).
    """
    size, png_decoder = cfg.image_size, cfg.png_decoder

    def decode(serialized):
        ex = _parse_record(serialized)
        encoded, height, width = ex["image/encoded"], ex["image/height"], ex["image/width"]
        if image_format == "png":  # an image that does not decode fails naming its record
            record = tf.strings.join(["record ", ex["image/filename"]])
            gray = decode_png_reduced(encoded, size, png_decoder, name=record)
        elif image_format is not None:
            gray = decode_gray(encoded, image_format, height, width)
        else:  # the manifest does not say: choose per record
            fmt = ex["image/format"]
            gray = tf.case(
                [
                    (tf.equal(fmt, b"raw"), lambda: decode_gray(encoded, "raw", height, width)),
                    (tf.equal(fmt, b"jpeg"), lambda: decode_gray(encoded, "jpeg")),
                ],
                default=lambda: decode_gray(encoded, "png", png_decoder=png_decoder),
            )
        labels = tf.cast(tf.reshape(ex["image/label"], [len(LABELS)]), tf.float32)
        return gray, labels, ex["image/filename"]

    return decode


def _raw_decoder(cfg: PipelineConfig):
    """(path, labels, name) -> (float32 box-reduced image, labels, name); a file that
    does not decode fails naming its path (:func:`chexlib.pipeline.decode.bad_image`)."""
    size, png_decoder = cfg.image_size, cfg.png_decoder

    def decode(path, labels, name):
        encoded = tf.io.read_file(path)
        return decode_png_reduced(encoded, size, png_decoder, name=path), labels, name

    return decode


# --- the builder -----------------------------------------------------------------


def _options(cfg: PipelineConfig) -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = bool(cfg.deterministic)
    opts.experimental_slack = bool(cfg.slack and cfg.final_prefetch)
    # TF 2.x rewrites a sequential map into a parallel one and appends a
    # prefetch on its own; a step that is switched off must stay off.
    opts.experimental_optimization.map_parallelization = cfg.parallel_map
    opts.experimental_optimization.inject_prefetch = cfg.final_prefetch
    # map + batch fused into one op runs ahead of its consumer in a thread of its own,
    # even with one call at a time: a hidden prefetch, which the naive pipeline has not
    # (measured: the stand-in's naive training 158 images/s fused, 123 not)
    opts.experimental_optimization.map_and_batch_fusion = cfg.parallel_map or cfg.final_prefetch
    if cfg.private_threadpool_size:
        opts.threading.private_threadpool_size = cfg.private_threadpool_size
    if cfg.max_intra_op_parallelism:
        opts.threading.max_intra_op_parallelism = cfg.max_intra_op_parallelism
    return opts


def build_dataset(
    source: str,
    split: str,
    *,
    metadata=None,
    data_dir=None,
    records_dir=None,
    **settings,
) -> tf.data.Dataset:
    """A tf.data pipeline of ``(images, labels)`` batches for one split.

    Args:
        source: ``"raw"`` (PNG files listed in ``metadata``) or ``"records"``
            (TFRecords in ``records_dir``, either variant).
        split: ``"train"``, ``"val"`` or ``"test"``.
        metadata: table from :func:`chexlib.data.metadata.load_metadata` (raw source).
        data_dir: dataset folder, loaded with ``load_metadata`` when
            ``metadata`` is None (raw source).
        records_dir: folder of ``{split}-*.tfrecord`` shards (records source).
        **settings: any field of :class:`PipelineConfig` (pipeline,
            batch_size, image_size, training, model, num_shards,
            shard_index, seed, cache, data_service, and each step switch).

    Returns:
        Training (``training=True``): repeats forever, shuffled, flipped,
        ``float32 [B, S, S, 3]`` images and ``float32 [B, 14]`` labels with a
        static batch dimension (the remainder of each pass is not lost: the
        data repeats, so it starts the next batch). Evaluation
        (``training=False``): every image of this worker's part exactly
        once, in order (metadata order for raw files; shard file order, then
        record order, for records), no flip; the LAST BATCH MAY BE SMALLER,
        so the batch dimension is None. With ``return_names`` a third
        element holds the file names.
    """
    cfg = PipelineConfig(**settings).effective(split)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    if cfg.data_service and not cfg.training:
        raise ValueError(
            "data_service is for training: service workers do not keep evaluation order"
        )
    if source == "raw" and metadata is None and data_dir is not None:
        metadata = load_metadata(data_dir)
    items, decode = _items_and_decoder(source, split, cfg, metadata, records_dir)
    cache_file = None
    if cfg.cache and cfg.cache != "memory":
        cache_file = sources_cache_file(
            cfg, source, split, cache_inputs(source, split, metadata, records_dir)
        )
    ds = _per_record_stage(items, decode, cfg, cache_file, records=source == "records")
    # Options hold for the whole pipeline; set before the final prefetch, which
    # the slack rewrite must find as the last transformation.
    return _delivery_stage(ds.with_options(_options(cfg)), cfg)


def _delivery_stage(ds: tf.data.Dataset, cfg: PipelineConfig) -> tf.data.Dataset:
    """Through the tf.data service when asked (its workers run everything before), then
    the final prefetch."""
    if cfg.data_service:
        ds = ds.apply(
            tf.data.experimental.service.distribute(
                processing_mode=cfg.data_service_mode, service=cfg.data_service
            )
        )
        ds = ds.with_options(_options(cfg))
    if cfg.final_prefetch:
        ds = ds.prefetch(cfg.prefetch_batches or AUTOTUNE)
    return ds


def _items_and_decoder(source: str, split: str, cfg: PipelineConfig, metadata, records_dir):
    """The per-file stage of ``source`` and the decoder of its elements."""
    if source == "raw":
        return raw_items(metadata, split, cfg), _raw_decoder(cfg)
    if records_dir is None:
        raise ValueError("source='records' needs records_dir")
    return record_items(records_dir, split, cfg), _record_decoder(record_format(records_dir), cfg)


def _per_record_stage(
    items, decode, cfg: PipelineConfig, cache_file: str | None, records: bool
) -> tf.data.Dataset:
    """Shuffle records, repeat, preprocess (optionally cached), batch."""
    calls = (cfg.map_parallelism or AUTOTUNE) if cfg.parallel_map else None
    det = cfg.deterministic if cfg.parallel_map else None
    size, model, training = cfg.image_size, cfg.model, cfg.training
    # raw file names are already shuffled as a whole; records are shuffled in a buffer
    shuffle_records = training and cfg.shuffle_buffer > 0 and records
    ds = items
    if cfg.cache:  # decode + resize once, keep the uint8 images; flip and normalise each epoch
        ds = ds.map(
            lambda *e: _decode_resize(decode, size, *e), num_parallel_calls=calls, deterministic=det
        )
        ds = ds.cache(cache_file or "")  # "": in memory
        if training and cfg.shuffle_buffer > 0:
            ds = ds.shuffle(cfg.shuffle_buffer, seed=cfg.random_seed, reshuffle_each_iteration=True)
    elif shuffle_records:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=cfg.random_seed, reshuffle_each_iteration=True)
    seeded = training and cfg.random_seed is not None
    if training:
        ds = ds.repeat()
    if seeded:
        ds = ds.enumerate()  # element index: with the seed, the seed of its flip
    base = (cfg.random_seed or 0) * 1_000_003 + cfg.shard_index

    def element(*e):
        index, e = (e[0], e[1]) if seeded else (None, e)
        e = e if isinstance(e, tuple) else (e,)  # records: one serialized string
        gray, labels, name = e if cfg.cache else decode(*e)  # cached: resized already
        seed = tf.stack([tf.constant(base, tf.int64), index]) if seeded else None
        small, flip = parse_element(gray, size, training, seed)
        if cfg.vectorized_normalize:  # the per-batch half after batching
            return (small, flip, labels, name)
        image = parse_batch(small, flip, model, training, cfg.normalize_in_pipeline)
        return (image, labels, name) if cfg.return_names else (image, labels)

    def whole_batch(images, flips, labels, names):
        images = parse_batch(images, flips, model, training, cfg.normalize_in_pipeline)
        return (images, labels, names) if cfg.return_names else (images, labels)

    ds = ds.map(element, num_parallel_calls=calls, deterministic=det)
    ds = ds.batch(cfg.batch_size, drop_remainder=training)
    if cfg.vectorized_normalize:
        ds = ds.map(whole_batch, num_parallel_calls=calls, deterministic=det)
    return ds


def _decode_resize(decode, size, *e):
    gray, labels, name = decode(*e)
    return resize_gray(gray, size), labels, name


def synthetic_dataset(batch_size: int, image_size: int, seed: int = 0) -> tf.data.Dataset:
    """One random batch repeated forever: no input cost, so the model's throughput ceiling.
    Random uint8 grey images, as the pipelines deliver them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 1), dtype=np.uint8)
    labels = (rng.random((batch_size, len(LABELS))) < 0.1).astype(np.float32)
    return tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(AUTOTUNE)

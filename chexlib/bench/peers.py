"""The loaders users would pick instead of chexlib's pipelines, timed by ``chexlib.bench.measure``.

* ``keras-sequence``: what most CheXNet reimplementations use (CheXNet-Keras):
  a ``keras.utils.Sequence`` reading PNGs with PIL, fed by Keras's
  ``OrderedEnqueuer`` across worker processes, as ``fit(workers=...,
  use_multiprocessing=True)`` does.
* ``keras-directory``: Keras's own ``image_dataset_from_directory`` over the
  same PNG files (a tf.data pipeline: parallel decode, plain bilinear resize
  WITHOUT antialiasing, one grey channel, no normalisation or flip), followed
  by ``prefetch(AUTOTUNE)`` as Keras's guide recommends. It reads every image
  in the split's folder (NIH's ``images/`` holds all splits): for timing, the
  images are alike.

Each returns ``(next_batch, stop)``; a batch's first item holds the images.
"""

from __future__ import annotations

import contextlib
import io
import math
import os

import numpy as np
import tensorflow as tf

from chexlib.core.machine import usable_cores
from chexlib.data.metadata import LABELS
from chexlib.data.png import read_grayscale
from chexlib.pipeline import builders, sources

PEERS = ("keras-sequence", "keras-directory")


# --- keras-sequence: a keras.utils.Sequence read with PIL -----------------------------
def preprocess_numpy(gray: np.ndarray, image_size: int, model: str, flip: bool) -> np.ndarray:
    """The peer's preprocessing: PIL bilinear resize, flip, normalise once -> float32 [S, S, 3]."""
    from PIL import Image

    small = np.asarray(Image.fromarray(gray).resize((image_size, image_size), Image.BILINEAR))
    if flip:
        small = small[:, ::-1]
    scale, offset = builders._affine(model)
    return small[..., None].astype(np.float32) * scale.astype(np.float32) + offset.astype(
        np.float32
    )


class PngSequence(tf.keras.utils.Sequence):
    """Batches of PNGs read with PIL (``chexlib.data.png.read_grayscale``), as CheXNet-Keras does.

    Training order is reshuffled at each epoch end; flips are random per image.
    """

    def __init__(
        self,
        paths,
        labels,
        batch_size: int,
        image_size: int,
        model: str = "densenet121",
        training: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.float32)
        self.batch_size, self.image_size, self.model = batch_size, image_size, model
        self.training, self.seed, self.epoch = training, seed, 0
        self.order = np.arange(len(self.paths))
        self.on_epoch_end()

    def __len__(self) -> int:
        n = len(self.paths)
        return n // self.batch_size if self.training else math.ceil(n / self.batch_size)

    def __getitem__(self, index: int):

        picks = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        flips = rng.random(len(picks)) < 0.5 if self.training else np.zeros(len(picks), bool)
        images = [
            preprocess_numpy(read_grayscale(self.paths[i]), self.image_size, self.model, f)
            for i, f in zip(picks, flips, strict=True)
        ]
        return np.stack(images), self.labels[picks]

    def on_epoch_end(self):
        if self.training:
            self.epoch += 1
            self.order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.paths))


def png_sequence(cfg, metadata) -> PngSequence:
    rows = sources.split_table(metadata, cfg.split)
    training = cfg.split == "train"
    if training and len(rows) < cfg.batch_size:
        raise ValueError(
            f"split {cfg.split!r} has {len(rows)} images, fewer than one batch of {cfg.batch_size}"
        )
    return PngSequence(
        rows["path"].tolist(),
        rows[list(LABELS)].to_numpy(),
        cfg.batch_size,
        cfg.image_size,
        cfg.model,
        training=training,
        seed=cfg.seed,
    )


def keras_batches(cfg, metadata):
    """``(next_batch, stop)`` over a PngSequence fed by Keras's OrderedEnqueuer."""
    workers = cfg.keras_workers or usable_cores()
    enqueuer = tf.keras.utils.OrderedEnqueuer(
        png_sequence(cfg, metadata), use_multiprocessing=cfg.keras_multiprocessing, shuffle=False
    )  # the Sequence shuffles itself
    enqueuer.start(workers=workers, max_queue_size=10)
    generator = enqueuer.get()
    return (lambda: next(generator)), enqueuer.stop


# --- keras-directory: Keras's own image_dataset_from_directory ------------------------


def image_folder(cfg, metadata) -> str:
    """The folder holding the split's PNG files (their common parent)."""
    rows = sources.split_table(metadata, cfg.split)
    if rows.empty:
        raise ValueError(f"split {cfg.split!r} has no images")
    return os.path.commonpath([os.path.dirname(p) for p in rows["path"]])


def keras_directory_dataset(cfg, metadata, single_thread: bool = False) -> tf.data.Dataset:
    """``image_dataset_from_directory`` over the split's folder, repeated, prefetched.

    ``single_thread``: the same work on one thread (a private pool of one, one
    thread per op) for the single-core rate.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # "Found N files." is not a result
        ds = tf.keras.utils.image_dataset_from_directory(
            image_folder(cfg, metadata),
            labels=None,
            color_mode="grayscale",
            batch_size=cfg.batch_size,
            image_size=(cfg.image_size, cfg.image_size),
            shuffle=cfg.split == "train",
            seed=cfg.seed,
        )
    ds = ds.repeat().prefetch(tf.data.AUTOTUNE)
    if single_thread:
        options = tf.data.Options()
        options.threading.private_threadpool_size = 1
        options.threading.max_intra_op_parallelism = 1
        ds = ds.with_options(options)
    return ds


def keras_directory_batches(cfg, metadata, single_thread: bool = False):
    """``(next_batch, stop)`` over :func:`keras_directory_dataset` (batches as 1-tuples)."""
    iterator = iter(keras_directory_dataset(cfg, metadata, single_thread))
    return (lambda: (next(iterator),)), (lambda: None)


def peer_batches(cfg, metadata):
    """``(next_batch, stop)`` of the peer named by ``cfg.pipeline``."""
    if cfg.pipeline == "keras-sequence":
        return keras_batches(cfg, metadata)
    if cfg.pipeline == "keras-directory":
        return keras_directory_batches(cfg, metadata)
    raise ValueError(f"not a peer: {cfg.pipeline!r} (peers: {PEERS})")

"""What a pipeline is built from: :class:`PipelineConfig` (every knob of
:func:`chexlib.pipeline.builders.build_dataset`, defaults from the official recipe)
and the optimized recipe's steps, each with the switch that turns it off."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import tensorflow as tf

from chexlib.core.names import PIPELINES
from chexlib.data.metadata import MODEL_INPUT_SIZE
from chexlib.pipeline.decode import (
    DECODERS,
    resolve_decoder,
)

AUTOTUNE = tf.data.AUTOTUNE


SERVICE_MODES = ("distributed_epoch", "parallel_epochs")


# model -> normalisation of its tf.keras.applications ImageNet weights
NORMALIZATION = {"densenet121": "torch", "resnet50": "caffe"}


# TFRecordDataset read buffer, as in the official ImageNet input function.
READ_BUFFER_BYTES = 8 * 1000 * 1000


# The optimized recipe's speed steps and the switch that turns each one off:
# what the ablation (chexlib.bench.sweeps.ablation) removes one at a time.
OPTIMIZED_STEPS: dict[str, dict] = {
    "parallel-interleave": {"interleave": False},
    "read-prefetch": {"prefetch_records": False},
    "parallel-map": {"parallel_map": False},
    "final-prefetch": {"final_prefetch": False},
    "vectorized-normalize": {"vectorized_normalize": False},
    "single-thread-ops": {"max_intra_op_parallelism": 0},
    "slack": {"slack": False},
    "nondeterminism": {"deterministic": True},
}


# Steps that only exist when reading record files.
RECORD_ONLY_STEPS = ("parallel-interleave", "read-prefetch")


def steps_for(source: str) -> list[str]:
    """Names of the :data:`OPTIMIZED_STEPS` that act on ``source``."""
    return [s for s in OPTIMIZED_STEPS if source == "records" or s not in RECORD_ONLY_STEPS]


def without_steps(*steps: str) -> dict:
    """Keyword switches of :func:`build_dataset` that turn ``steps`` off."""
    switches: dict = {}
    for step in steps:
        if step not in OPTIMIZED_STEPS:
            raise ValueError(f"unknown step {step!r}; expected one of {tuple(OPTIMIZED_STEPS)}")
        switches.update(OPTIMIZED_STEPS[step])
    return switches


@dataclass(frozen=True)
class PipelineConfig:
    """Every knob of :func:`build_dataset`; defaults are the official recipe.

    Attributes:
        pipeline: ``"naive"`` or ``"optimized"`` (see the module docstring).
        batch_size: images per batch (per worker).
        image_size: side of the square model input, in pixels.
        training: training dataset (shuffled, flipped, repeated, static
            batch) or evaluation (every image once, in order). None: the
            split is ``"train"``.
        model: ``"densenet121"`` or ``"resnet50"``; picks the normalisation
            (``normalize_in_pipeline`` only).
        normalize_in_pipeline: deliver the model's normalised three float32
            channels (``[B, S, S, 3]``) instead of the uint8 contract's one grey
            channel (``uint8 [B, S, S, 1]``, normalised by the model's first
            layer, :mod:`chexlib.train.gray_input`): for a model without that
            layer, and for measuring what the contract saves.
        num_shards: number of workers reading disjoint parts (Horovod ranks).
        shard_index: this worker's part, ``0 <= shard_index < num_shards``.
        seed: seed of the file/record shuffles and of the flips.
        cache: None, ``"memory"``, or a folder for a cache file of the
            decoded, resized images (filled during the first epoch).
        data_service: ``"grpc://host:port"`` of a tf.data service dispatcher
            to preprocess on its workers (training only), or None.
        data_service_mode: ``"distributed_epoch"`` (the workers split each
            epoch's files between them: every image once per epoch) or
            ``"parallel_epochs"`` (each worker runs the whole dataset with its
            own fresh random seed; not reproducible).
        shuffle_files: shuffle the file list in training (optimized and naive).
        interleave: read record files in parallel with ``interleave``.
        cycle_length: record files read at once by the interleave.
        prefetch_records: prefetch after the per-file (read) stage.
        shuffle_buffer: records in the shuffle buffer (training; 0: none).
        parallel_map: preprocess elements in parallel (else one at a time).
        map_parallelism: parallel calls of the map; None lets AUTOTUNE pick.
        vectorized_normalize: flip (and normalise) whole batches after
            ``batch`` (a few large ops per batch, the tf.data guide's
            "vectorized mapping") instead of one image at a time inside the
            per-element map. The flip of each image is decided per element
            either way, so both give the same batches.
        final_prefetch: prefetch batches at the end of the pipeline.
        prefetch_batches: size of that prefetch; None lets AUTOTUNE pick.
        private_threadpool_size: threads of a private tf.data pool (0: the
            shared TensorFlow pool).
        max_intra_op_parallelism: threads one op may use. None: 1 for
            optimized (the official recipe: many images in parallel, each op
            on one thread, favours throughput over latency), TensorFlow's
            default for naive; 0: TensorFlow's default. 1 with
            ``private_threadpool_size=1`` pins a naive pipeline to one core.
        slack: ``experimental_slack`` (lets the final prefetch lag a little
            to avoid stalls when several pipelines share the CPU).
        deterministic: keep element order in parallel stages; None: False in
            training (faster), True in evaluation (order is part of its contract).
        read_buffer_bytes: read buffer of each TFRecordDataset.
        return_names: yield ``(images, labels, names)`` with the file names.
        png_decoder: ``"auto"`` (libspng for 8-bit grey PNGs when installed,
            else TensorFlow's ``decode_png``), ``"tensorflow"`` or
            ``"libspng"`` (see :mod:`chexlib.pipeline.decode`; identical pixels).
            A tf.data service's workers decode with TensorFlow: they cannot
            call back into this process's Python.
    """

    pipeline: str = "optimized"
    batch_size: int = 32
    image_size: int = MODEL_INPUT_SIZE
    training: bool | None = None
    model: str = "densenet121"
    normalize_in_pipeline: bool = False
    num_shards: int = 1
    shard_index: int = 0
    seed: int = 0
    cache: str | None = None
    data_service: str | None = None
    data_service_mode: str = "distributed_epoch"
    shuffle_files: bool = True
    interleave: bool = True
    cycle_length: int = 10
    prefetch_records: bool = True
    shuffle_buffer: int = 1024
    parallel_map: bool = True
    map_parallelism: int | None = None
    vectorized_normalize: bool = True
    final_prefetch: bool = True
    prefetch_batches: int | None = None
    private_threadpool_size: int = 0
    max_intra_op_parallelism: int | None = None
    slack: bool = True
    deterministic: bool | None = None
    read_buffer_bytes: int = READ_BUFFER_BYTES
    return_names: bool = False
    png_decoder: str = "auto"

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(f"PipelineConfig: {message}")

        check(
            self.pipeline in PIPELINES,
            f"pipeline must be one of {PIPELINES}, not {self.pipeline!r}",
        )
        check(self.batch_size >= 1, f"batch_size must be >= 1, not {self.batch_size}")
        check(self.image_size >= 8, f"image_size must be >= 8, not {self.image_size}")
        check(
            self.model in NORMALIZATION,
            f"model must be one of {tuple(NORMALIZATION)}, not {self.model!r}",
        )
        check(self.num_shards >= 1, f"num_shards must be >= 1, not {self.num_shards}")
        check(
            0 <= self.shard_index < self.num_shards,
            f"shard_index {self.shard_index} not in [0, {self.num_shards})",
        )
        check(
            self.data_service_mode in SERVICE_MODES,
            f"data_service_mode must be one of {SERVICE_MODES}",
        )
        check(
            self.png_decoder in DECODERS,
            f"png_decoder must be one of {DECODERS}, not {self.png_decoder!r}",
        )
        check(
            not (self.data_service and self.png_decoder == "libspng"),
            "png_decoder 'libspng' runs Python, which tf.data service workers cannot; use 'auto'",
        )
        check(self.cycle_length >= 1, "cycle_length must be >= 1")
        check(self.shuffle_buffer >= 0, "shuffle_buffer must be >= 0")
        check(self.private_threadpool_size >= 0, "private_threadpool_size must be >= 0")
        check(
            self.max_intra_op_parallelism is None or self.max_intra_op_parallelism >= 0,
            "max_intra_op_parallelism must be None or >= 0",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def random_seed(self) -> int | None:
        """Seed of shuffles and flips; None (fresh randomness) when every
        tf.data service worker runs the whole dataset, or they would all
        produce the same stream."""
        shared = self.data_service and self.data_service_mode == "parallel_epochs"
        return None if shared else self.seed

    def effective(self, split: str) -> PipelineConfig:
        """The settings actually used for ``split``: naive and evaluation overrides applied."""
        training = (split == "train") if self.training is None else self.training
        changes: dict = {"training": training}
        changes["png_decoder"] = (
            "tensorflow" if self.data_service else resolve_decoder(self.png_decoder)
        )
        if self.max_intra_op_parallelism is None:
            changes["max_intra_op_parallelism"] = 1 if self.pipeline == "optimized" else 0
        if self.pipeline == "naive":  # the poster's naive pipeline: every speed step off
            changes.update(
                interleave=False,
                prefetch_records=False,
                parallel_map=False,
                vectorized_normalize=False,
                final_prefetch=False,
                slack=False,
                deterministic=True,
            )
        if not training:  # every image once, in order: no shuffle, sequential reads
            changes.update(
                shuffle_files=False, shuffle_buffer=0, interleave=False, deterministic=True
            )
        elif changes.get("deterministic", self.deterministic) is None:
            changes["deterministic"] = False
        return dataclasses.replace(self, **changes)

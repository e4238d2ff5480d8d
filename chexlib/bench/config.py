"""What one pipeline benchmark measures: :class:`BenchConfig`, every knob of
``chexlib bench-pipeline`` with its default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from chexlib.bench.peers import PEERS
from chexlib.core.flags import option
from chexlib.core.names import PIPELINES, SOURCES
from chexlib.data.metadata import MODEL_INPUT_SIZE
from chexlib.pipeline.config import NORMALIZATION, OPTIMIZED_STEPS, without_steps

BENCH_PIPELINES = (*PIPELINES, *PEERS)


SIMULATED = "simulated accelerator: sleeps batch/rate seconds per batch, no real device"


@dataclass(frozen=True)
class BenchConfig:
    """One pipeline measurement; every field is a ``chexlib bench-pipeline`` flag.

    A flag is named for its field (``_`` -> ``-``) but for ``--data``,
    ``--records``, ``--warmup``, ``--data-service`` and the switches
    ``--no-single-core`` and ``--keras-threads``.

    Attributes:
        pipeline: ``naive``, ``optimized``, ``keras-sequence`` or ``keras-directory``.
        source: ``raw`` (PNG files) or ``records`` (TFRecords, either variant).
        data_dir: dataset folder in the NIH layout (raw source).
        records_dir: TFRecord folder (records source).
        split: split read (``train``: shuffled, flipped, repeated).
        batch_size: images per batch.
        image_size: model input side in pixels.
        model: picks the normalisation (densenet121 or resnet50).
        warmup_batches: batches before timing starts.
        batches: timed batches, split into ``windows`` equal windows.
        windows: timed windows (the median and spread are over them).
        min_window_sec: a window also lasts at least this long, so fast
            sources are timed over seconds, not milliseconds.
        device_rate: images/s of a simulated accelerator, or None (none).
        single_core: also measure the single-core rate and the limit.
        single_core_batches: timed batches of the single-core measurement.
        keras_workers: enqueuer workers of keras-sequence (None: all cores).
        keras_multiprocessing: keras-sequence workers are processes (else threads).
        data_service_workers: read through a local tf.data service with this
            many worker processes (0: no service).
        cache: pipeline cache (None, ``"memory"`` or a folder).
        disable: optimized steps turned off (names in ``pipeline.OPTIMIZED_STEPS``).
        seed: seed of shuffles and flips.
        png_decoder: PNG decoder of chexlib's pipelines (``auto``,
            ``tensorflow``, ``libspng``; see :mod:`chexlib.pipeline.decode`).
        reference_rates: also measure the independent limit and the
            decoders alone (raw source).
        paired_with: also time this pipeline against another one in
            alternating rounds in this process (:mod:`chexlib.bench.paired`);
            empty: not.
    """

    pipeline: str = option("pipeline to time", default="optimized", choices=BENCH_PIPELINES)
    source: str = option("PNG files (raw) or TFRecords", default="raw", choices=SOURCES)
    data_dir: str | None = option(
        "dataset folder in the NIH layout (raw source)", default=None, flag="--data"
    )
    records_dir: str | None = option(
        "TFRecord folder (records source)", default=None, flag="--records"
    )
    split: str = option(
        "split read (train: shuffled, repeated)",
        default="train",
        choices=("train", "val", "test"),
    )
    batch_size: int = option("images per batch", default=32)
    image_size: int = option("model input side (pixels)", default=MODEL_INPUT_SIZE)
    model: str = option(
        "picks the normalisation", default="densenet121", choices=tuple(NORMALIZATION)
    )
    warmup_batches: int = option("batches before timing", default=10, flag="--warmup")
    batches: int = option("timed batches (split into --windows windows)", default=60)
    windows: int = option("timed windows: images/s is their median", default=5)
    min_window_sec: float = option(
        "a timed window also lasts at least this many seconds (fast sources)", default=1.0
    )
    device_rate: float | None = option(
        "SIMULATED accelerator speed (images/s): sleeps batch/R s per batch; reports utilization",
        default=None,
    )
    single_core: bool = option("skip the single-core rate and limit", default=True)
    single_core_batches: int = option("batches timed for the single-core rate", default=6)
    keras_workers: int | None = option(
        "keras-sequence enqueuer workers (default: cores)", default=None
    )
    keras_multiprocessing: bool = option(
        "keras-sequence workers are threads, not processes", default=True, flag="--keras-threads"
    )
    data_service_workers: int = option(
        "read through a local tf.data service with N worker processes",
        default=0,
        flag="--data-service",
    )
    cache: str | None = option("cache decoded images: 'memory' or a folder", default=None)
    disable: tuple[str, ...] = option(
        "turn off one optimized step (repeatable): an ablation from the command line",
        default=(),
        choices=tuple(OPTIMIZED_STEPS),
    )
    seed: int = option("seed of shuffles and flips", default=0)
    normalize_in_pipeline: bool = option(
        "deliver normalised float32 x3 channels (the contract before the model took uint8 grey)",
        default=False,
    )
    png_decoder: str = option(
        "PNG decoder of chexlib's pipelines (auto: libspng when installed)",
        default="auto",
        choices=("auto", "tensorflow", "libspng"),
    )
    reference_rates: bool = option(
        "raw PNG: also measure the independent limit (decode_png + plain bilinear, "
        "one thread x cores) and each decoder alone",
        default=False,
    )
    paired_with: str = option(
        "also time against this pipeline in alternating rounds in this process "
        "(a ratio free of drift between processes)",
        default="",
        choices=("", *BENCH_PIPELINES),
    )

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(f"BenchConfig: {message}")

        check(
            self.pipeline in BENCH_PIPELINES,
            f"pipeline must be one of {BENCH_PIPELINES}, not {self.pipeline!r}",
        )
        check(
            self.source in SOURCES,
            f"source must be one of {SOURCES}, not {self.source!r}",
        )
        check(self.source != "raw" or self.data_dir, "source 'raw' needs data_dir")
        check(self.source != "records" or self.records_dir, "source 'records' needs records_dir")
        check(
            self.pipeline not in PEERS or self.source == "raw",
            f"{self.pipeline} reads PNG files (source 'raw')",
        )
        check(
            not self.reference_rates or self.source == "raw",
            "reference rates are measured on PNG files (source 'raw')",
        )
        check(self.batch_size >= 1 and self.image_size >= 8, "batch_size >= 1 and image_size >= 8")
        check(self.windows >= 1 and self.batches >= self.windows, "need batches >= windows >= 1")
        check(self.min_window_sec >= 0, "min_window_sec must be >= 0")
        check(
            self.warmup_batches >= 0 and self.single_core_batches >= 1,
            "warm-up >= 0, single-core batches >= 1",
        )
        check(self.device_rate is None or self.device_rate > 0, "device_rate must be > 0 images/s")
        check(
            not self.disable or self.pipeline == "optimized",
            "disable applies to the optimized pipeline",
        )
        check(
            not self.paired_with
            or (self.paired_with in BENCH_PIPELINES and self.paired_with != self.pipeline),
            f"paired_with must be another of {BENCH_PIPELINES}, not {self.paired_with!r}",
        )
        check(
            self.paired_with not in PEERS or self.source == "raw",
            f"{self.paired_with} reads PNG files (source 'raw')",
        )
        without_steps(*self.disable)  # names checked here

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def pipeline_settings(self) -> dict:
        """Keyword arguments of ``pipeline.build_dataset`` for this measurement."""
        return dict(
            pipeline=self.pipeline,
            batch_size=self.batch_size,
            image_size=self.image_size,
            model=self.model,
            training=self.split == "train",
            seed=self.seed,
            cache=self.cache,
            png_decoder=self.png_decoder,
            normalize_in_pipeline=self.normalize_in_pipeline,
            **without_steps(*self.disable),
        )

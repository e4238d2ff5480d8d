"""Timing input pipelines alone (no model): images/s, the CPU limit, a simulated accelerator.

``chexlib bench-pipeline`` and the profiling notebook measure the same way:

* Warm-up batches first (thread pools, AUTOTUNE, shuffle buffers, page
  cache), then ``windows`` timed windows; images/s is the median window, with
  the spread (min, max, 1.96 std) beside it: never a single run.
* In the same run, the single-core rate of the source: the same
  preprocessing, pinned to one thread (a naive pipeline on a private pool of
  one thread, one thread per op). ``limit = cores x single-core rate`` is what
  the CPUs could deliver if every core decoded images all the time; a
  pipeline's ``fraction_of_limit`` says how close it gets.
* The loaders users would pick instead (:mod:`chexlib.bench_peers`):
  ``keras-sequence`` (a ``keras.utils.Sequence`` with PIL, as CheXNet-Keras)
  and ``keras-directory`` (Keras's ``image_dataset_from_directory``).
* CPU milliseconds per image: the process's CPU time over the images it
  delivered, the cost that decides how many cores an accelerator needs.
* With ``reference_rates`` (raw PNG): what any user would compute as the
  limit, measured in the same run: one thread of TensorFlow's ``decode_png``
  plus a plain bilinear resize, times the cores; and each decoder alone
  (CPU ms per image, one thread).
* ``device_rate``: a SIMULATED accelerator that consumes each batch for
  ``batch / rate`` seconds by sleeping (no CPU used), standing in for a GPU
  training at ``rate`` images/s. Utilization = busy time / wall time; input
  stall = time spent waiting for the next batch. Every output that uses it
  says "simulated". ``--device-times X --device-reference RECORD`` sets the
  rate to X times the single-core rate of an earlier record.

The profiling notebook's sweeps (every pipeline on every source, the
ablation, the simulated-device sweep) and the conclusions written from them
are in :mod:`chexlib.bench_sweeps`, kept importable from here, as is the
printout of one measurement (:func:`chexlib.bench_report.describe`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tensorflow as tf

from chexlib import pipeline
from chexlib.bench_peers import PEERS, keras_directory_batches, peer_batches, png_sequence
from chexlib.data import MODEL_INPUT_SIZE
from chexlib.flags import add_flags, config_from_args, option
from chexlib.pipeline import NORMALIZATION, OPTIMIZED_STEPS, SOURCES
from chexlib.results import environment_info, usable_cores, write_json

BENCH_PIPELINES = ("naive", "optimized", *PEERS)
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
            ``tensorflow``, ``libspng``; see :mod:`chexlib.imageops`).
        reference_rates: also measure the independent limit and the
            decoders alone (raw source).
        paired_with: also time this pipeline against another one in
            alternating rounds in this process (:mod:`chexlib.bench_paired`);
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
            self.source in pipeline.SOURCES,
            f"source must be one of {pipeline.SOURCES}, not {self.source!r}",
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
        pipeline.without_steps(*self.disable)  # names checked here

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
            **pipeline.without_steps(*self.disable),
        )


# --- timing ------------------------------------------------------------------------


@dataclass
class Timing:
    """Windows of one timed run."""

    window_rates: list[float] = field(default_factory=list)  # images/s per window
    images: int = 0
    wall_sec: float = 0.0
    # 1-min load average before and after: is the machine shared with other work?
    load_average: tuple[float, float] = (0.0, 0.0)
    cpu_sec: float = 0.0  # CPU time of this process (all its threads) while timed
    stall_sec: float = 0.0  # waiting for the next batch
    busy_sec: float = 0.0  # simulated device busy

    def summary(self, device_rate: float | None) -> dict:
        rates = self.window_rates
        out = {
            "images_per_sec": statistics.median(rates),
            "images_per_sec_windows": rates,
            "images_per_sec_spread": {
                "min": min(rates),
                "max": max(rates),
                "ci95": 1.96 * statistics.stdev(rates) if len(rates) > 1 else 0.0,
            },
            "timed_images": self.images,
            "timed_wall_sec": self.wall_sec,
            "load_average_1min": list(self.load_average),
            "process_cpu_sec": self.cpu_sec,
            # cores this process kept busy; worker processes (keras-sequence) are not counted
            "process_cores_busy": self.cpu_sec / self.wall_sec if self.wall_sec else 0.0,
            "input_stall_sec": self.stall_sec,
            "stall_fraction": self.stall_sec / self.wall_sec if self.wall_sec else 0.0,
        }
        if device_rate:
            out.update(
                device=SIMULATED,
                device_rate=device_rate,
                utilization=self.busy_sec / self.wall_sec if self.wall_sec else 0.0,
                device_busy_sec=self.busy_sec,
            )
        return out


def time_batches(
    next_batch,
    *,
    warmup: int,
    batches: int,
    windows: int,
    device_rate: float | None = None,
    progress: str | None = None,
    min_window_sec: float = 0.0,
) -> Timing:
    """Pull ``warmup`` batches, then time ``batches`` more in ``windows`` windows.

    A window also lasts at least ``min_window_sec``: a fast source (compact
    records: thousands of images/s) would otherwise be timed over a few
    hundredths of a second, where scheduling noise is the whole measurement.

    Args:
        next_batch: callable returning the next batch (its first item's
            leading dimension is the number of images).
        device_rate: if set, a SIMULATED device sleeps ``n / device_rate``
            seconds after each batch of ``n`` images (CPU idle meanwhile,
            as with a real accelerator); the input pipeline keeps working
            in its own threads.
        progress: tqdm description, or None for no bar.
    """
    from tqdm.auto import tqdm

    for _ in range(warmup):
        next_batch()
    timing, per_window = Timing(), batches // windows
    bar = tqdm(
        total=per_window * windows,
        desc=progress,
        unit="batch",
        disable=progress is None,
        leave=False,
    )
    load_before = _load()
    cpu_start = time.process_time()
    start = time.perf_counter()
    for _ in range(windows):
        t0, images, pulled = time.perf_counter(), 0, 0
        while pulled < per_window or time.perf_counter() - t0 < min_window_sec:
            pulled += 1
            a = time.perf_counter()
            batch = next_batch()
            timing.stall_sec += time.perf_counter() - a
            n = int(batch[0].shape[0])
            images += n
            if device_rate:  # busy time is the intended one: sleep overshoot counts as idle
                time.sleep(n / device_rate)
                timing.busy_sec += n / device_rate
            bar.update()
        timing.window_rates.append(images / (time.perf_counter() - t0))
        timing.images += images
    timing.wall_sec = time.perf_counter() - start
    timing.cpu_sec = time.process_time() - cpu_start
    timing.load_average = (load_before, _load())
    bar.close()
    return timing


def _load() -> float:
    """1-minute load average (runnable processes): above the core count, timings share the CPUs."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# --- what is timed -------------------------------------------------------------------


def metadata_for(cfg: BenchConfig, metadata=None):
    """The dataset table of a raw-source measurement: ``metadata`` if given, else loaded."""
    if metadata is not None or cfg.source != "raw":
        return metadata
    from chexlib.data import load_metadata

    return load_metadata(cfg.data_dir)


def tf_batches(cfg: BenchConfig, metadata=None, data_service: str | None = None, **overrides):
    """An endless ``next_batch`` callable over the tf.data pipeline of ``cfg``."""
    settings = {**cfg.pipeline_settings(), **overrides}
    if data_service:
        settings["data_service"] = data_service
    ds = pipeline.build_dataset(
        cfg.source, cfg.split, metadata=metadata, records_dir=cfg.records_dir, **settings
    )
    if not settings["training"]:
        ds = ds.repeat()  # evaluation passes, one after another, for timing
    iterator = iter(ds)
    return lambda: next(iterator)


def pipeline_batches(cfg: BenchConfig, metadata=None, data_service: str | None = None):
    """``(next_batch, stop)`` of the pipeline or peer named by ``cfg.pipeline``."""
    if cfg.pipeline in PEERS:
        return peer_batches(cfg, metadata)
    return tf_batches(cfg, metadata, data_service=data_service), (lambda: None)


def single_core_rate(cfg: BenchConfig, metadata=None) -> float:
    """Images/s of the same preprocessing pinned to one thread (median of 3 windows)."""
    metadata = metadata_for(cfg, metadata)
    windows = min(3, cfg.single_core_batches)
    batches = windows * max(1, cfg.single_core_batches // windows)
    if cfg.pipeline == "keras-directory":  # its own tf.data pipeline, on one thread
        next_batch, _ = keras_directory_batches(cfg, metadata, single_thread=True)
    elif cfg.pipeline == "keras-sequence":  # its own preprocessing, in a plain loop
        seq = png_sequence(cfg, metadata)
        state = {"i": 0}

        def next_batch():
            state["i"] += 1
            return seq[state["i"] % len(seq)]
    else:
        # the optimized recipe's work (vectorized normalisation included) on ONE
        # thread: the best one core does, so limit = cores x this is a fair ceiling
        next_batch = tf_batches(
            cfg,
            metadata,
            pipeline="optimized",
            private_threadpool_size=1,
            max_intra_op_parallelism=1,
            cache=None,
        )
    timing = time_batches(
        next_batch, warmup=1, batches=batches, windows=windows, min_window_sec=cfg.min_window_sec
    )
    return statistics.median(timing.window_rates)


# --- one measurement ---------------------------------------------------------------


def measure(
    cfg: BenchConfig, metadata=None, single_core: float | None = None, progress: bool = False
) -> dict:
    """Time ``cfg`` and return its record (the JSON of ``chexlib bench-pipeline``).

    Args:
        cfg: what to measure.
        metadata: the dataset table, if already loaded (raw source).
        single_core: a single-core rate measured earlier for the same source
            and preprocessing; None measures it now (if ``cfg.single_core``).
        progress: show a progress bar of the timed batches.
    """
    metadata = metadata_for(cfg, metadata)
    if single_core is None and cfg.single_core:
        single_core = single_core_rate(cfg, metadata)
    stop, service = (lambda: None), None
    try:
        if cfg.data_service_workers and cfg.pipeline not in PEERS:
            from chexlib.dataservice import start_local_service

            service = start_local_service(cfg.data_service_workers)
        next_batch, stop = pipeline_batches(cfg, metadata, service.address if service else None)
        timing = time_batches(
            next_batch,
            warmup=cfg.warmup_batches,
            batches=cfg.batches,
            windows=cfg.windows,
            device_rate=cfg.device_rate,
            progress=f"{cfg.pipeline} {cfg.source}" if progress else None,
            min_window_sec=cfg.min_window_sec,
        )
    finally:
        stop()
        if service:
            service.stop()
    record = _record(cfg, timing, single_core)
    if cfg.reference_rates:
        record.update(reference_rates(cfg, metadata))
        limit = record["independent_limit_images_per_sec"]
        record["fraction_of_independent_limit"] = record["images_per_sec"] / limit
        fastest = min(record["decoder_ms_per_image"].values())
        if record["cpu_ms_per_image"]:
            record["cpu_ms_per_image_over_fastest_decoder"] = record["cpu_ms_per_image"] / fastest
    if cfg.paired_with:
        from chexlib.bench_paired import paired_rounds

        record["paired"] = paired_rounds(cfg, cfg.paired_with, metadata)
    return record


# --- what any user would compare against ------------------------------------------


def reference_rates(cfg: BenchConfig, metadata, decoder_images: int = 48) -> dict:
    """The independent limit and each PNG decoder alone, measured now on the split's files.

    * independent limit: ``cores x`` the images/s of ONE thread doing
      TensorFlow's ``decode_png`` + a plain bilinear resize (no antialiasing),
      the limit any user would compute, independent of chexlib's own recipe;
    * ``decoder_ms_per_image``: CPU milliseconds per image of each decoder
      alone (TensorFlow's, and libspng's when installed), one thread, the best
      of three passes over ``decoder_images`` files held in memory.
    """
    from chexlib import spng

    paths = pipeline.split_table(metadata, cfg.split)["path"].tolist()
    size = [cfg.image_size, cfg.image_size]

    def decode_resize(path):
        return tf.image.resize(tf.io.decode_png(tf.io.read_file(path), channels=1), size)

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    ds = tf.data.Dataset.from_tensor_slices(paths).repeat().map(decode_resize)
    iterator = iter(ds.batch(cfg.batch_size).with_options(options))
    windows = min(3, cfg.single_core_batches)
    timing = time_batches(
        lambda: (next(iterator),),
        warmup=1,
        batches=windows * max(1, cfg.single_core_batches // windows),
        windows=windows,
        min_window_sec=cfg.min_window_sec,
    )
    single = statistics.median(timing.window_rates)

    blobs = [Path(p).read_bytes() for p in paths[:decoder_images]]
    decoders = {"tensorflow": lambda b: tf.io.decode_png(b, channels=1)}
    if spng.available():
        decoders["libspng"] = spng.decode_gray8
    ms = {}
    for name, decode in decoders.items():
        decode(blobs[0])  # first call: kernels and libraries loaded
        passes = []
        for _ in range(3):
            start = time.process_time()
            for b in blobs:
                decode(b)
            passes.append((time.process_time() - start) / len(blobs))
        ms[name] = 1000 * min(passes)
    return {
        "independent_single_core_images_per_sec": single,
        "independent_limit_images_per_sec": usable_cores() * single,
        "decoder_ms_per_image": ms,
        "decode_in_tf_data_cpu_ms_per_image": _decode_in_tf_data(cfg, paths, min(ms, key=ms.get)),
    }


def _decode_in_tf_data(cfg: BenchConfig, paths: list[str], decoder: str) -> float:
    """CPU ms per image of reading and decoding alone in a parallel tf.data map (no resize,
    flip or normalisation; batched, prefetched): the floor of any pipeline with ``decoder``."""
    from chexlib.imageops import decode_png_gray, drain_python_calls

    def decode(path):  # a scalar out: the decoded image is not copied into the batch
        return tf.reduce_max(decode_png_gray(tf.io.read_file(path), decoder))

    ds = tf.data.Dataset.from_tensor_slices(paths).repeat()
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(cfg.batch_size).prefetch(2)
    pull = iter(ds).__next__
    timing = time_batches(
        lambda: (pull(),),
        warmup=2,
        batches=max(3, cfg.single_core_batches),
        windows=1,
        min_window_sec=cfg.min_window_sec,
    )
    pull = None  # the iterator goes, its threads stop: nothing runs beside later timings
    drain_python_calls(quiet_sec=0.2)
    return 1000 * timing.cpu_sec / timing.images


def _record(cfg: BenchConfig, timing: Timing, single_core: float | None) -> dict:
    env = environment_info(with_gpus=False)
    out = {
        "pipeline": cfg.pipeline,
        "source": cfg.source,
        "variant": _variant(cfg),
        "disabled_steps": list(cfg.disable),
        **timing.summary(cfg.device_rate),
    }
    cores = usable_cores()
    out["cpu_count"] = cores
    if single_core:
        limit = cores * single_core
        out.update(
            single_core_images_per_sec=single_core,
            limit_images_per_sec=limit,
            fraction_of_limit=out["images_per_sec"] / limit,
        )
    out["settings"] = cfg.to_dict()
    if cfg.pipeline == "keras-sequence":  # its worker processes' CPU time is not ours to count
        out["cpu_ms_per_image"] = None
    else:
        out["cpu_ms_per_image"] = 1000 * timing.cpu_sec / timing.images if timing.images else None
    if cfg.pipeline not in PEERS:
        settings = pipeline.PipelineConfig(**cfg.pipeline_settings())
        out["pipeline_settings"] = settings.effective(cfg.split).to_dict()
    out["versions"] = env["versions"]
    out["environment"] = env
    return out


def _variant(cfg: BenchConfig) -> str:
    """``raw`` for PNG files, else the records' variant from their manifest (png or compact)."""
    if cfg.source == "raw":
        return "raw"
    try:
        from chexlib import records

        return records.read_manifest(cfg.records_dir).get("variant", "records")
    except (ImportError, OSError, ValueError):
        return "records"


# --- command line ---------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPipelineCommand:
    """``chexlib bench-pipeline``'s own options, not part of the measurement's config."""

    json: str | None = option("write the measurement record here", default=None)
    device_times: float | None = option(
        "a SIMULATED device at this many times the single-core rate of --device-reference "
        "(instead of --device-rate)",
        default=None,
    )
    device_reference: str | None = option(
        "a measurement record with a single-core rate (bench-pipeline --reference-rates --json)",
        default=None,
    )

    def device_rate(self) -> float | None:
        """``device_times`` x the reference record's single-core images/s; None without."""
        from chexlib.results import read_json

        if self.device_times is None:
            return None
        if not self.device_reference:
            raise ValueError("--device-times needs --device-reference RECORD")
        rate = read_json(self.device_reference, expect=dict).get("single_core_images_per_sec")
        if not rate:
            raise ValueError(f"{self.device_reference}: no single_core_images_per_sec in it")
        return round(self.device_times * rate, 1)


def add_bench_pipeline_arguments(parser) -> None:
    """A flag per :class:`BenchConfig` field (help, choices in its metadata), then the
    command's own (:class:`BenchPipelineCommand`)."""
    add_flags(parser, BenchConfig, default_help="")
    add_flags(parser, BenchPipelineCommand, default_help="")


def run_bench_pipeline(args) -> int:
    """``chexlib bench-pipeline``: time one pipeline, print it, optionally write JSON."""
    from chexlib.bench_report import describe

    command = config_from_args(BenchPipelineCommand, args)
    try:
        cfg = config_from_args(BenchConfig, args)
        if command.device_times is not None:
            if cfg.device_rate is not None:
                raise ValueError("give --device-rate or --device-times, not both")
            cfg = dataclasses.replace(cfg, device_rate=command.device_rate())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = measure(cfg, progress=sys.stderr.isatty())
    print(describe(result))
    if command.json:
        write_json(command.json, result)
        print(f"  written: {command.json}")
    return 0


# --- kept importable from here ---------------------------------------------------------

# module -> names of the profiling notebook's sweeps, conclusions and figures
_ELSEWHERE = {
    "chexlib.bench_sweeps": (
        "NOTEBOOK_SOURCES",
        "ProfileConfig",
        "ablation",
        "ablation_sweep",
        "conclusion_markdown",
        "prepare_sources",
        "throughput_sweep",
        "utilization_sweep",
    ),
    "chexlib.bench_plots": ("plot_ablation", "plot_throughput", "plot_utilization"),
    "chexlib.bench_report": ("describe",),
}


def __getattr__(name: str):
    """``bench.throughput_sweep`` and the others of ``_ELSEWHERE``, imported when first used
    (``chexlib.bench_sweeps`` imports this module; figures need no TensorFlow)."""
    for module, names in _ELSEWHERE.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

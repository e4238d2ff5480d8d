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
  says "simulated".
"""

from __future__ import annotations

import dataclasses
import math
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
from chexlib.results import environment_info, usable_cores, write_json

BENCH_PIPELINES = ("naive", "optimized", *PEERS)
SIMULATED = "simulated accelerator: sleeps batch/rate seconds per batch, no real device"


@dataclass(frozen=True)
class BenchConfig:
    """One pipeline measurement.

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

    pipeline: str = "optimized"
    source: str = "raw"
    data_dir: str | None = None
    records_dir: str | None = None
    split: str = "train"
    batch_size: int = 32
    image_size: int = MODEL_INPUT_SIZE
    model: str = "densenet121"
    warmup_batches: int = 10
    batches: int = 60
    windows: int = 5
    min_window_sec: float = 1.0
    device_rate: float | None = None
    single_core: bool = True
    single_core_batches: int = 6
    keras_workers: int | None = None
    keras_multiprocessing: bool = True
    data_service_workers: int = 0
    cache: str | None = None
    disable: tuple[str, ...] = ()
    seed: int = 0
    png_decoder: str = "auto"
    reference_rates: bool = False
    paired_with: str = ""

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


def _metadata(cfg: BenchConfig, metadata=None):
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
    metadata = _metadata(cfg, metadata)
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
    metadata = _metadata(cfg, metadata)
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


def describe(result: dict) -> str:
    """A few human lines about one measurement record."""
    s = result["settings"]
    spread = result["images_per_sec_spread"]
    lines = [
        f"{result['pipeline']} pipeline, source {result['variant']} ({s['split']} split), "
        f"batch {s['batch_size']}, {s['image_size']}px"
        + (f", without {', '.join(result['disabled_steps'])}" if result["disabled_steps"] else ""),
        f"  images/s: {result['images_per_sec']:.1f} median of {len(result['images_per_sec_windows'])} windows "
        f"(min {spread['min']:.1f}, max {spread['max']:.1f}, 1.96 std {spread['ci95']:.1f})",
    ]
    before, after = result["load_average_1min"]
    shared = max(before, after) > result["cpu_count"]
    lines.append(
        f"  machine load (1-min average) {before:.1f} -> {after:.1f} on {result['cpu_count']} cores"
        + (" (SHARED: timings are not reliable)" if shared else "")
        + f"; this process kept {result['process_cores_busy']:.2f} cores busy"
    )
    if "limit_images_per_sec" in result:
        lines.append(
            f"  single core: {result['single_core_images_per_sec']:.1f} images/s; limit "
            f"({result['cpu_count']} cores x single core): {result['limit_images_per_sec']:.1f} images/s; "
            f"fraction of limit: {result['fraction_of_limit']:.1%}"
        )
    if result.get("cpu_ms_per_image"):
        lines.append(
            f"  CPU time: {result['cpu_ms_per_image']:.2f} ms per image (all threads of this process)"
        )
    if "independent_limit_images_per_sec" in result:
        decoders = ", ".join(f"{k} {v:.2f}" for k, v in result["decoder_ms_per_image"].items())
        lines.append(
            f"  independent limit ({result['cpu_count']} cores x one thread of decode_png + plain "
            f"bilinear): {result['independent_limit_images_per_sec']:.1f} images/s; fraction: "
            f"{result['fraction_of_independent_limit']:.1%}; decoders alone (CPU ms/image): {decoders}"
        )
    if "utilization" in result:
        lines.append(
            f"  [SIMULATED accelerator at {result['device_rate']:.1f} images/s] utilization "
            f"{result['utilization']:.1%}, input stall {result['input_stall_sec']:.2f} s "
            f"({result['stall_fraction']:.1%} of wall time)"
        )
    if "paired" in result:
        p = result["paired"]
        lines.append(
            f"  paired with {p['with']} ({p['rounds']} alternating rounds in this process): "
            f"ratio {p['ratio']:.2f}x (rounds {p['ratio_min']:.2f}..{p['ratio_max']:.2f})"
        )
    return "\n".join(lines)


# --- sweeps for the profiling notebook ------------------------------------------------


def _configs(name: str, spec: dict, pipelines, settings: dict) -> list[BenchConfig]:
    out = []
    for p in pipelines:
        if p in PEERS and spec["source"] != "raw":
            continue  # the peers read PNG files only (documented in the notebook)
        out.append(
            BenchConfig(
                pipeline=p,
                source=spec["source"],
                data_dir=spec.get("data_dir"),
                records_dir=spec.get("records_dir"),
                **settings,
            )
        )
    return out


def throughput_sweep(
    sources: dict[str, dict],
    pipelines=("naive", "optimized", "keras-sequence", "keras-directory"),
    metadata=None,
    progress: bool = True,
    **settings,
):
    """Measure every pipeline on every source; one row per measurement.

    Args:
        sources: name -> ``{"source": "raw"|"records", "data_dir": ..., "records_dir": ...}``.
        pipelines: names from ``BENCH_PIPELINES``; the peers run on raw sources only.
        metadata: dataset table for raw sources, if loaded.
        **settings: other ``BenchConfig`` fields (batch_size, windows, ...).

    Returns:
        DataFrame: source_name, pipeline, images_per_sec, min/max, windows
        (list), single-core rate, limit, fraction_of_limit.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    jobs = [(n, c) for n, spec in sources.items() for c in _configs(n, spec, pipelines, settings)]
    single: dict = {}  # (source name, peer or None) -> single-core rate, measured once
    rows = []
    for name, cfg in tqdm(jobs, desc="throughput", disable=not progress):
        key = (name, cfg.pipeline if cfg.pipeline in PEERS else None)
        if key not in single:
            single[key] = single_core_rate(cfg, metadata)
        rows.append({"source_name": name, **_row(measure(cfg, metadata, single_core=single[key]))})
    return pd.DataFrame(rows)


def _row(r: dict) -> dict:
    return {
        "pipeline": r["pipeline"],
        "source": r["source"],
        "source_variant": r["variant"],
        "images_per_sec": r["images_per_sec"],
        "images_per_sec_min": r["images_per_sec_spread"]["min"],
        "images_per_sec_max": r["images_per_sec_spread"]["max"],
        "windows": r["images_per_sec_windows"],
        "single_core_images_per_sec": r.get("single_core_images_per_sec"),
        "limit_images_per_sec": r.get("limit_images_per_sec"),
        "fraction_of_limit": r.get("fraction_of_limit"),
        "utilization": r.get("utilization"),
        "stall_fraction": r["stall_fraction"],
        "device_rate": r.get("device_rate"),
        "png_decoder": r.get("pipeline_settings", {}).get("png_decoder"),
        # CPU time of this process per image (all its threads): what feeding one image
        # costs in core-milliseconds, whatever the number of cores
        "cpu_ms_per_image": r.get("cpu_ms_per_image"),
        "cpu_count": r["cpu_count"],
    }


def ablation(
    source: str,
    *,
    data_dir=None,
    records_dir=None,
    metadata=None,
    steps=None,
    include_naive: bool = True,
    progress: bool = True,
    **settings,
):
    """The optimized pipeline, then optimized minus one step at a time (then naive).

    Args:
        source: ``raw`` or ``records``.
        steps: step names (``pipeline.OPTIMIZED_STEPS``); default all that act on the source.
        include_naive: add the naive pipeline (every step off) as the last row.
        **settings: other ``BenchConfig`` fields.

    Returns:
        DataFrame: variant, step, images_per_sec (+ min/max), fraction_of_limit,
        relative (throughput / optimized with all steps).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    base = BenchConfig(
        pipeline="optimized", source=source, data_dir=data_dir, records_dir=records_dir, **settings
    )
    metadata = _metadata(base, metadata)
    single = single_core_rate(base, metadata)
    variants = [("optimized (all steps)", None, base)]
    variants += [
        (f"minus {s}", s, dataclasses.replace(base, disable=(s,)))
        for s in (steps or pipeline.steps_for(source))
    ]
    if include_naive:
        variants.append(("naive (no steps)", "all", dataclasses.replace(base, pipeline="naive")))
    rows = []
    for label, step, cfg in tqdm(variants, desc=f"ablation {source}", disable=not progress):
        rows.append(
            {"variant": label, "step": step, **_row(measure(cfg, metadata, single_core=single))}
        )
    df = pd.DataFrame(rows)
    df["relative"] = df["images_per_sec"] / df["images_per_sec"].iloc[0]
    return df


def ablation_sweep(
    sources: dict[str, dict], names, metadata=None, progress: bool = True, **settings
):
    """:func:`ablation` on each source in ``names`` (keys of ``sources``), stacked, with ``source_name``."""
    import pandas as pd

    parts = [
        ablation(
            sources[n]["source"],
            data_dir=sources[n].get("data_dir"),
            records_dir=sources[n].get("records_dir"),
            metadata=metadata,
            progress=progress,
            **settings,
        ).assign(source_name=n)
        for n in names
    ]
    return pd.concat(parts, ignore_index=True)


def utilization_sweep(
    source: str,
    rates,
    *,
    data_dir=None,
    records_dir=None,
    metadata=None,
    pipelines=("naive", "optimized"),
    rates_are_fractions: bool = True,
    progress: bool = True,
    **settings,
):
    """SIMULATED accelerator utilization against its speed, for each pipeline.

    Args:
        rates: device speeds; fractions of the measured CPU limit when
            ``rates_are_fractions`` (portable across machines), else images/s.
        pipelines: pipelines compared (default naive vs optimized).
        **settings: other ``BenchConfig`` fields.

    Returns:
        DataFrame: pipeline, device_rate (images/s), rate_vs_limit,
        utilization, stall_fraction, images_per_sec, limit_images_per_sec.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    base = BenchConfig(
        pipeline="optimized", source=source, data_dir=data_dir, records_dir=records_dir, **settings
    )
    metadata = _metadata(base, metadata)
    single = single_core_rate(base, metadata)
    limit = usable_cores() * single
    jobs = [(p, r * limit if rates_are_fractions else float(r)) for p in pipelines for r in rates]
    rows = []
    for p, rate in tqdm(jobs, desc="utilization (simulated)", disable=not progress):
        cfg = dataclasses.replace(base, pipeline=p, device_rate=rate)
        row = _row(measure(cfg, metadata, single_core=single))
        rows.append({**row, "rate_vs_limit": rate / limit, "device": SIMULATED})
    return pd.DataFrame(rows)


# --- figures and the computed conclusion ---------------------------------------------


# The figures live in chexlib.bench_plots (no TensorFlow there); kept importable from here.
from chexlib.bench_plots import plot_ablation, plot_throughput, plot_utilization  # noqa: E402, F401


def _pick(df, **match):
    rows = df
    for k, v in match.items():
        rows = rows[rows[k] == v]
    return rows["images_per_sec"].iloc[0] if len(rows) else None


def conclusion_markdown(
    throughput=None, ablation_df=None, utilization=None, cores: int | None = None
) -> str:
    """A short conclusion written from the measured numbers (Markdown)."""
    cores = cores or usable_cores()
    lines = [
        f"**What these numbers say** (measured on this machine: {cores} CPU cores, no GPU):",
        "",
    ]
    if throughput is not None and len(throughput):
        lines += _throughput_findings(throughput)
    if ablation_df is not None and len(ablation_df):
        lines += _ablation_findings(ablation_df)
    if utilization is not None and len(utilization):
        lines += _utilization_findings(utilization)
    return "\n".join(lines)


def _throughput_findings(df) -> list[str]:
    out = []
    for name in dict.fromkeys(df["source_name"]):
        part = df[df["source_name"] == name]
        opt, naive = _pick(part, pipeline="optimized"), _pick(part, pipeline="naive")
        keras = _pick(part, pipeline="keras-sequence")
        directory = _pick(part, pipeline="keras-directory")
        if opt is None:
            continue
        text = f"- **{name}**: optimized {opt:.0f} images/s"
        if naive:
            text += f", {opt / naive:.2f}x naive ({naive:.0f})"
        frac = part.loc[part["pipeline"] == "optimized", "fraction_of_limit"].iloc[0]
        if frac is not None and not math.isnan(frac):
            text += f"; {frac:.0%} of the CPU limit"
        if keras:
            text += f"; {opt / keras:.2f}x the Keras Sequence peer ({keras:.0f})"
        if directory:
            text += (
                f"; {opt / directory:.2f}x Keras's image_dataset_from_directory "
                f"({directory:.0f}, no antialiasing)"
            )
        out.append(text + ".")
    opt = df[df["pipeline"] == "optimized"].set_index("source_name")["images_per_sec"]
    if "raw" in opt.index:
        for name, value in opt.items():
            if name != "raw":
                gain = value / opt["raw"]
                poster = (
                    "; the poster measured +8 % to +13 % for PNG bytes in TFRecords, in training"
                    if name == "records-png"
                    else ""
                )
                out.append(
                    f"- Optimized on **{name}** reads {gain:.2f}x as fast as on raw PNG files "
                    f"({gain - 1:+.0%}{poster})."
                )
    over = df[df["fraction_of_limit"].fillna(0) > 1.05]
    if len(over):
        out.append(
            f"- {len(over)} measurement(s) exceed the limit by more than 5 %: the single-core "
            "rate was measured low (noise, or per-batch overhead that one thread pays in full)."
        )
    return out + [""]


def _ablation_findings(df) -> list[str]:
    out = []
    hue = "source_name" if "source_name" in df else "source"
    for name in dict.fromkeys(df[hue]):
        part = df[(df[hue] == name) & df["step"].notna() & (df["step"] != "all")]
        if not len(part):
            continue
        worst = part.loc[part["relative"].idxmin()]
        free = part[part["relative"] >= 0.95]["step"].tolist()
        text = (
            f"- Ablation on **{name}**: removing *{worst['step']}* costs the most "
            f"({1 - worst['relative']:.0%} of the optimized throughput)"
        )
        if free:
            text += f"; removing {', '.join(free)} costs under 5 % here"
        out.append(text + ".")
    return out + [""]


def _utilization_findings(df) -> list[str]:
    out = []
    for p in dict.fromkeys(df["pipeline"]):
        part = df[df["pipeline"] == p].sort_values("device_rate")
        kept = part[part["utilization"] >= 0.95]
        if len(kept):
            best = kept.iloc[-1]
            out.append(
                f"- SIMULATED accelerator, **{p}**: utilization stays >= 95 % up to "
                f"{best['device_rate']:.0f} images/s ({best['rate_vs_limit']:.0%} of the CPU limit)."
            )
        else:
            out.append(
                f"- SIMULATED accelerator, **{p}**: utilization never reaches 95 % "
                f"(best {part['utilization'].max():.0%})."
            )
    out.append(
        "- A device faster than the CPU limit starves whatever the pipeline: then the answer is "
        "cheaper records (compact) or more CPUs (the tf.data service)."
    )
    return out + [""]


# --- the profiling notebook's parameters ------------------------------------------------

NOTEBOOK_SOURCES = ("raw", "records-png", "records-compact")


@dataclass(frozen=True)
class ProfileConfig:
    """Parameters of ``notebooks/03_pipeline_profiling.ipynb``, validated.

    Attributes:
        output_dir: where the run record, figures and converted records go.
        data_dir: dataset in the NIH layout.
        generate: generate a dataset into data_dir when it holds none.
        n_images: images generated.
        source_size: side of the generated PNGs (NIH: 1024).
        sources: any of ``raw``, ``records-png``, ``records-compact``.
        pipelines: any of ``naive``, ``optimized``, ``keras-sequence``, ``keras-directory``.
        batch_size, image_size, model: what the pipelines produce.
        warmup_batches: batches before timing.
        batches: timed batches per measurement.
        repeats: timed windows per measurement (median and spread over them).
        device_rate_fractions: SIMULATED device speeds as fractions of the CPU limit.
        utilization_source: source of the simulated-device sweep.
        ablation_sources: sources on which optimized loses one step at a time.
        images_per_shard: records per TFRecord shard when converting.
        records_size: side of the compact records' images.
        keras_workers: processes of the Keras Sequence peer (0: all cores).
        data_service_workers: also read through a local tf.data service with
            this many workers (0: skip).
        seed: seed of generation, shuffles and flips.
    """

    output_dir: str
    data_dir: str
    generate: bool = True
    n_images: int = 300
    source_size: int = 1024
    sources: tuple[str, ...] = NOTEBOOK_SOURCES
    pipelines: tuple[str, ...] = BENCH_PIPELINES
    batch_size: int = 32
    image_size: int = MODEL_INPUT_SIZE
    model: str = "densenet121"
    warmup_batches: int = 10
    batches: int = 40
    repeats: int = 5
    min_window_sec: float = 1.0
    device_rate_fractions: tuple[float, ...] = (0.25, 0.5, 0.7, 0.9, 1.2)
    utilization_source: str = "raw"
    ablation_sources: tuple[str, ...] = ("raw", "records-compact")
    images_per_shard: int = 32
    records_size: int = 256
    keras_workers: int = 0
    data_service_workers: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("sources", "pipelines", "device_rate_fractions", "ablation_sources"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(f"ProfileConfig: {message}")

        check(bool(self.output_dir) and bool(self.data_dir), "output_dir and data_dir are required")
        bad = [s for s in self.sources if s not in NOTEBOOK_SOURCES]
        check(not bad, f"unknown sources {bad}; choose from {NOTEBOOK_SOURCES}")
        bad = [p for p in self.pipelines if p not in BENCH_PIPELINES]
        check(not bad, f"unknown pipelines {bad}; choose from {BENCH_PIPELINES}")
        bad = [
            s for s in (*self.ablation_sources, self.utilization_source) if s not in self.sources
        ]
        check(not bad, f"ablation/utilization sources {bad} are not among sources {self.sources}")
        check(bool(self.ablation_sources), "ablation_sources must name at least one source")
        check(self.n_images >= 2 * self.batch_size, "generate at least two batches of images")
        check(
            self.batch_size >= 1 and self.image_size >= 8 and self.source_size >= 32,
            "sizes out of range",
        )
        check(self.repeats >= 1 and self.batches >= self.repeats, "need batches >= repeats >= 1")
        check(all(f > 0 for f in self.device_rate_fractions), "device rate fractions must be > 0")
        check(
            self.model in pipeline.NORMALIZATION,
            f"model must be one of {tuple(pipeline.NORMALIZATION)}",
        )
        check(
            self.keras_workers >= 0 and self.data_service_workers >= 0, "worker counts must be >= 0"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def bench_settings(self) -> dict:
        """``BenchConfig`` fields shared by every measurement of the notebook."""
        return dict(
            batch_size=self.batch_size,
            image_size=self.image_size,
            model=self.model,
            warmup_batches=self.warmup_batches,
            batches=self.batches,
            windows=self.repeats,
            min_window_sec=self.min_window_sec,
            keras_workers=self.keras_workers or None,
            seed=self.seed,
        )


def prepare_sources(cfg: ProfileConfig, progress: bool = True) -> dict[str, dict]:
    """Generate the dataset if asked and absent, and convert the record variants the sources need.

    Records go to ``output_dir/records-<variant>``; a finished conversion with
    the same settings is reused (``records.convert`` resumes and skips).

    Returns:
        name -> ``{"source", "data_dir", "records_dir"}`` for each of ``cfg.sources``.
    """
    from chexlib.data import CSV_NAMES

    data_dir = Path(cfg.data_dir)
    if cfg.generate and not any((data_dir / n).is_file() for n in CSV_NAMES):
        from chexlib.synth import generate

        generate(
            data_dir, n_images=cfg.n_images, size=cfg.source_size, seed=cfg.seed, progress=progress
        )
    sources = {}
    for name in cfg.sources:
        spec = {"source": "raw", "data_dir": str(data_dir), "records_dir": None}
        if name.startswith("records-"):
            from chexlib import records

            variant = name.removeprefix("records-")
            records_dir = Path(cfg.output_dir) / name
            extra = {"size": cfg.records_size} if variant == "compact" else {}
            records.convert(
                data_dir,
                records_dir,
                variant=variant,
                images_per_shard=cfg.images_per_shard,
                progress=progress,
                overwrite=True,
                **extra,
            )
            spec.update(source="records", records_dir=str(records_dir))
        sources[name] = spec
    return sources


# --- command line ---------------------------------------------------------------------


def add_bench_pipeline_arguments(parser) -> None:
    a = parser.add_argument
    a("--pipeline", choices=BENCH_PIPELINES, default="optimized", help="pipeline to time")
    a("--source", choices=pipeline.SOURCES, default="raw", help="PNG files (raw) or TFRecords")
    a("--data", dest="data_dir", default=None, help="dataset folder in the NIH layout (raw source)")
    a("--records", dest="records_dir", default=None, help="TFRecord folder (records source)")
    a(
        "--split",
        default="train",
        choices=("train", "val", "test"),
        help="split read (train: shuffled, repeated)",
    )
    a("--batch-size", type=int, default=32, help="images per batch")
    a("--image-size", type=int, default=224, help="model input side (pixels)")
    a(
        "--model",
        default="densenet121",
        choices=tuple(pipeline.NORMALIZATION),
        help="picks the normalisation",
    )
    a("--batches", type=int, default=60, help="timed batches (split into --windows windows)")
    a("--windows", type=int, default=5, help="timed windows: images/s is their median")
    a("--warmup", dest="warmup_batches", type=int, default=10, help="batches before timing")
    a(
        "--min-window-sec",
        type=float,
        default=1.0,
        help="a timed window also lasts at least this many seconds (fast sources)",
    )
    a(
        "--device-rate",
        type=float,
        default=None,
        help="SIMULATED accelerator speed (images/s): sleeps batch/R s per batch; reports utilization",
    )
    a(
        "--no-single-core",
        dest="single_core",
        action="store_false",
        help="skip the single-core rate and limit",
    )
    a("--single-core-batches", type=int, default=6, help="batches timed for the single-core rate")
    a(
        "--keras-workers",
        type=int,
        default=None,
        help="keras-sequence enqueuer workers (default: cores)",
    )
    a(
        "--keras-threads",
        dest="keras_multiprocessing",
        action="store_false",
        help="keras-sequence workers are threads, not processes",
    )
    a(
        "--data-service",
        dest="data_service_workers",
        type=int,
        default=0,
        help="read through a local tf.data service with N worker processes",
    )
    a("--cache", default=None, help="cache decoded images: 'memory' or a folder")
    a(
        "--disable",
        action="append",
        default=[],
        choices=tuple(pipeline.OPTIMIZED_STEPS),
        help="turn off one optimized step (repeatable): an ablation from the command line",
    )
    a("--seed", type=int, default=0, help="seed of shuffles and flips")
    a(
        "--png-decoder",
        choices=("auto", "tensorflow", "libspng"),
        default="auto",
        help="PNG decoder of chexlib's pipelines (auto: libspng when installed)",
    )
    a(
        "--reference-rates",
        action="store_true",
        help="raw PNG: also measure the independent limit (decode_png + plain bilinear, "
        "one thread x cores) and each decoder alone",
    )
    a(
        "--paired-with",
        default="",
        choices=("", *BENCH_PIPELINES),
        help="also time against this pipeline in alternating rounds in this process "
        "(a ratio free of drift between processes)",
    )
    a("--json", default=None, help="write the measurement record here")


def run_bench_pipeline(args) -> int:
    """``chexlib bench-pipeline``: time one pipeline, print it, optionally write JSON."""
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["disable"] = tuple(values.get("disable") or ())
    try:
        cfg = BenchConfig(**values)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = measure(cfg, progress=sys.stderr.isatty())
    print(describe(result))
    if args.json:
        write_json(args.json, result)
        print(f"  written: {args.json}")
    return 0

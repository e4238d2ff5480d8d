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
* The loaders users would pick instead (:mod:`chexlib.bench.peers`):
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
are in :mod:`chexlib.bench.sweeps`, kept importable from here, as is the
printout of one measurement (:func:`chexlib.report.benchmarks.describe`).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from chexlib.bench.config import BenchConfig
from chexlib.bench.paired import paired_rounds
from chexlib.bench.peers import PEERS
from chexlib.bench.timing import (
    Timing,
    metadata_for,
    pipeline_batches,
    single_core_rate,
    time_batches,
)
from chexlib.core.files import read_json, write_json
from chexlib.core.flags import add_flags, config_from_args, option
from chexlib.core.machine import environment_info, usable_cores
from chexlib.pipeline import config, sources, spng
from chexlib.pipeline.dataservice import start_local_service
from chexlib.pipeline.decode import decode_png_gray, drain_python_calls
from chexlib.records import read
from chexlib.report.benchmarks import describe

# --- timing ------------------------------------------------------------------------


# --- what is timed -------------------------------------------------------------------


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

    paths = sources.split_table(metadata, cfg.split)["path"].tolist()
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
        settings = config.PipelineConfig(**cfg.pipeline_settings())
        out["pipeline_settings"] = settings.effective(cfg.split).to_dict()
    out["versions"] = env["versions"]
    out["environment"] = env
    return out


def _variant(cfg: BenchConfig) -> str:
    """``raw`` for PNG files, else the records' variant from their manifest (png or compact)."""
    if cfg.source == "raw":
        return "raw"
    try:
        return read.read_manifest(cfg.records_dir).get("variant", "records")
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

        if self.device_times is None:
            return None
        if not self.device_reference:
            raise ValueError("--device-times needs --device-reference RECORD")
        rate = read_json(self.device_reference, expect=dict).get("single_core_images_per_sec")
        if not rate:
            raise ValueError(f"{self.device_reference}: no single_core_images_per_sec in it")
        return round(self.device_times * rate, 1)


def add_arguments(parser) -> None:
    """A flag per :class:`BenchConfig` field (help, choices in its metadata), then the
    command's own (:class:`BenchPipelineCommand`)."""
    add_flags(parser, BenchConfig, default_help="")
    add_flags(parser, BenchPipelineCommand, default_help="")


def run(args) -> int:
    """``chexlib bench-pipeline``: time one pipeline, print it, optionally write JSON."""

    command = config_from_args(BenchPipelineCommand, args)
    cfg = config_from_args(BenchConfig, args)
    if command.device_times is not None:
        if cfg.device_rate is not None:
            raise ValueError("give --device-rate or --device-times, not both")
        cfg = dataclasses.replace(cfg, device_rate=command.device_rate())
    result = measure(cfg, progress=sys.stderr.isatty())
    print(describe(result))
    if command.json:
        write_json(command.json, result)
        print(f"  written: {command.json}")
    return 0

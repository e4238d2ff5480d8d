"""Timing an input pipeline: warm-up batches, then timed windows (median and
spread), optionally against a simulated accelerator; the batches of a
configured pipeline; its single-core rate."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from chexlib.bench.config import SIMULATED, BenchConfig
from chexlib.bench.peers import PEERS, keras_directory_batches, peer_batches, png_sequence
from chexlib.data.metadata import load_metadata
from chexlib.pipeline import builders


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
    batch_bytes: int = 0  # bytes of the images of one batch (what a host-to-device copy moves)

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
            "bytes_per_batch": self.batch_bytes,
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
    load_before, cpu_start, start = _load(), time.process_time(), time.perf_counter()
    for _ in range(windows):
        t0, images, pulled = time.perf_counter(), 0, 0
        while pulled < per_window or time.perf_counter() - t0 < min_window_sec:
            pulled += 1
            a = time.perf_counter()
            batch = next_batch()
            timing.stall_sec += time.perf_counter() - a
            n = int(batch[0].shape[0])
            images += n
            timing.batch_bytes = _nbytes(batch[0])
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


def _nbytes(images) -> int:
    """Bytes of a batch of images, a tensor or an array, from its shape and dtype."""
    dtype = images.dtype  # numpy's has itemsize, TensorFlow's size
    return int(np.prod(images.shape)) * int(getattr(dtype, "itemsize", None) or dtype.size)


def _load() -> float:
    """1-minute load average (runnable processes): above the core count, timings share the CPUs."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def metadata_for(cfg: BenchConfig, metadata=None):
    """The dataset table of a raw-source measurement: ``metadata`` if given, else loaded."""
    if metadata is not None or cfg.source != "raw":
        return metadata

    return load_metadata(cfg.data_dir)


def tf_batches(cfg: BenchConfig, metadata=None, data_service: str | None = None, **overrides):
    """An endless ``next_batch`` callable over the tf.data pipeline of ``cfg``."""
    settings = {**cfg.pipeline_settings(), **overrides}
    if data_service:
        settings["data_service"] = data_service
    ds = builders.build_dataset(
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

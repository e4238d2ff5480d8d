"""Measuring TFRecord conversion: parallel speed-up, bytes on disk, and decode cost.

Benchmarks, not tests: they print numbers measured side by side in one run.
``chexlib bench-records DATA_DIR`` converts the dataset with each
variant at 1 and at N workers into fresh folders and prints a table (seconds,
images/s, speed-up, bytes on disk against the raw PNG folder, TensorFlow
decode cost per image); ``--formats`` adds the raw-vs-JPEG comparison that
chose the compact format. Notebook 02 calls the same functions.
"""

from __future__ import annotations

import io
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chexlib.core.flags import add_flags, config_from_args, option
from chexlib.core.machine import environment_info
from chexlib.data.metadata import MODEL_INPUT_SIZE, load_metadata
from chexlib.records import convert, read, shards
from chexlib.records.manifest import MANIFEST, read_manifest


def raw_png_bytes(data_dir) -> int:
    """Bytes of the listed source PNGs (the raw-folder baseline)."""
    df = load_metadata(data_dir, allow_missing=True)
    return int(sum(Path(p).stat().st_size for p in df["path"].dropna()))


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat; None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)  # idle and iowait are not busy


def time_conversion(data_dir, out_dir, variant: str, workers: int, **kwargs) -> dict:
    """Convert into a fresh ``out_dir`` (deleted first, so nothing is reused) and time it."""
    shutil.rmtree(out_dir, ignore_errors=True)
    before, start = _cpu_ticks(), time.perf_counter()
    manifest = convert.convert(
        data_dir, out_dir, variant=variant, workers=workers, progress=False, **kwargs
    )
    seconds, after = time.perf_counter() - start, _cpu_ticks()
    totals = manifest["totals"]
    # Share of all cores busy during the run (ours and anyone else's): with one
    # worker on an otherwise idle 2-core machine it is about 50 %.
    busy = (after[0] - before[0]) / max(1, after[1] - before[1]) if before and after else None
    return {
        "source": f"{variant} records",
        "variant": variant,
        "format": manifest["format"],
        "workers": workers,
        "seconds": seconds,
        "images": totals["records"],
        "images_per_s": totals["records"] / seconds,
        "bytes": totals["bytes"] + (Path(out_dir) / MANIFEST).stat().st_size,
        "records_dir": str(out_dir),
        "machine_busy": busy,
        "worker_cpu_seconds": manifest["conversion"]["worker_cpu_seconds"],
    }


def _time_map(items: list, fn, repeats: int = 5) -> float:
    """Median seconds per item of ``fn`` over in-memory ``items``, one element at a time.

    The elements are consumed by ``reduce`` inside TensorFlow, so Python's
    per-element iteration cost is not counted; tf.data's own per-element
    cost is (training pays it too).
    """
    import tensorflow as tf

    # Repeat small samples so the fixed cost of a pass does not count as per-image cost.
    passes = max(1, -(-400 // len(items)))
    ds = tf.data.Dataset.from_tensor_slices(items).repeat(passes).map(fn, num_parallel_calls=1)
    consume = tf.function(lambda: ds.reduce(np.int64(0), lambda n, _: n + 1))
    count = int(consume())  # warm-up: tracing and first calls
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        consume()
        times.append((time.perf_counter() - start) / count)
    return statistics.median(times)


def decode_cost(source, size: int = MODEL_INPUT_SIZE, n: int = 200, repeats: int = 3) -> float:
    """Milliseconds per image to turn stored bytes into a ``size`` x ``size`` uint8 image.

    ``source`` is a records folder (its train records) or a dataset folder (its
    PNG files). Bytes are read into memory first, so only decode (+ resize)
    is timed, on one thread, as the training pipeline's map does per image.
    """
    import tensorflow as tf

    # here: it loads TensorFlow; importing this module does not
    from chexlib.pipeline.builders import decode_gray

    # here: it loads TensorFlow; importing this module does not
    from chexlib.pipeline.decode import resize_gray

    source = Path(source)
    if (source / MANIFEST).is_file():
        manifest = read_manifest(source)
        fmt, stored = manifest["format"], manifest.get("size")
        ds = tf.data.TFRecordDataset(read.list_shards(source, "train")).take(n)
        items = [bytes(r.numpy()) for r in ds]

        def fn(serialized):
            ex = read.parse_example(serialized)
            gray = decode_gray(ex["image/encoded"], fmt, ex["image/height"], ex["image/width"])
            # compact records already at the training size need no resize (TF would still do work)
            return gray if stored == size else resize_gray(gray, size)
    else:
        df = load_metadata(source)
        items = [Path(p).read_bytes() for p in df["path"].head(n)]

        def fn(encoded):
            return resize_gray(decode_gray(encoded, "png"), size)

    return 1000 * _time_map(items, fn, repeats)


def compare_compact_formats(
    data_dir, n: int = 200, size: int = MODEL_INPUT_SIZE, jpeg_quality: int = 95
) -> pd.DataFrame:
    """Raw uint8 vs JPEG for compact records: TF decode ms/image, bytes/image, PSNR.

    The images go through the converter's own :func:`records_shards.encode_image`.
    """
    import tensorflow as tf
    from PIL import Image

    paths = load_metadata(data_dir)["path"].head(n).tolist()
    rows, raw_pixels = [], None
    for fmt in shards.COMPACT_FORMATS:
        settings = shards.ConvertSettings(
            "compact", size=size, compact_format=fmt, jpeg_quality=jpeg_quality
        )
        encoded = [shards.encode_image(p, settings)[0] for p in paths]
        if fmt == "raw":
            raw_pixels = [np.frombuffer(e, np.uint8).reshape(size, size) for e in encoded]
            ms = 1000 * _time_map(
                encoded, lambda e: tf.reshape(tf.io.decode_raw(e, tf.uint8), [size, size, 1])
            )
            psnr = float("inf")
        else:
            ms = 1000 * _time_map(encoded, lambda e: tf.io.decode_jpeg(e, channels=1))
            decoded = [np.asarray(Image.open(io.BytesIO(e))) for e in encoded]
            mse = np.mean(
                [
                    np.mean((d.astype(float) - r) ** 2)
                    for d, r in zip(decoded, raw_pixels, strict=True)
                ]
            )
            psnr = float(10 * np.log10(255**2 / mse)) if mse > 0 else float("inf")
        rows.append(
            {
                "format": fmt,
                "decode_ms": ms,
                "bytes_per_image": float(np.mean([len(e) for e in encoded])),
                "psnr_db": psnr,
                "images": len(paths),
            }
        )
    return pd.DataFrame(rows).set_index("format")


def conversion_table(
    runs: list[dict], raw_bytes: int, decode_ms: dict | None = None
) -> pd.DataFrame:
    """One row per source (raw PNG folder, then each variant x worker count) for plots and reports.

    Repeated runs of the same variant and worker count are summarised by the
    median time, with the fastest and slowest beside it.

    Args:
        runs: results of :func:`time_conversion`.
        raw_bytes: bytes of the raw PNG folder (:func:`raw_png_bytes`).
        decode_ms: optional source name -> decode ms/image (:func:`decode_cost`).
    """
    keys = ["source", "variant", "workers"]
    timed = (
        pd.DataFrame(runs)
        .groupby(keys, sort=False)
        .agg(
            seconds=("seconds", "median"),
            seconds_min=("seconds", "min"),
            seconds_max=("seconds", "max"),
            repeats=("seconds", "size"),
            machine_busy=("machine_busy", "median"),
            worker_cpu_seconds=("worker_cpu_seconds", "median"),
            images=("images", "first"),
            bytes=("bytes", "first"),
        )
    )
    timed = timed.reset_index()
    timed["images_per_s"] = timed["images"] / timed["seconds"]
    raw = {"source": "raw PNG folder", "variant": "raw", "workers": None, "bytes": raw_bytes}
    table = pd.concat([pd.DataFrame([raw]), timed], ignore_index=True)
    table["MiB"] = table["bytes"] / 2**20
    table["bytes_vs_png"] = table["bytes"] / raw_bytes
    one = timed[timed["workers"] == min(timed["workers"])].set_index("variant")["seconds"]
    table["speedup"] = [
        one[v] / s if v in one and s == s else None
        for v, s in zip(table["variant"], table["seconds"], strict=True)
    ]
    if decode_ms:
        table["decode_ms_per_image"] = table["source"].map(decode_ms)
    return table


def plot_conversion(table: pd.DataFrame):
    """Bar charts of conversion time, images/s, size on disk (and decode cost) per source."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    metrics = [
        ("seconds", "conversion time (s)"),
        ("images_per_s", "conversion images/s"),
        ("MiB", "size on disk (MiB)"),
    ]
    if "decode_ms_per_image" in table:
        metrics.append(("decode_ms_per_image", "decode + resize, ms/image"))
    data = table.assign(
        workers=table["workers"].map(lambda w: "-" if pd.isna(w) else f"{int(w)} worker(s)")
    )
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    for ax, (column, title) in zip(axes, metrics, strict=True):
        part = data.dropna(subset=[column])
        if column in ("MiB", "decode_ms_per_image"):  # one bar per source
            part = part.drop_duplicates("source")
            sns.barplot(data=part, x="source", y=column, ax=ax, color="tab:blue")
        else:
            part = part[part["variant"] != "raw"]
            sns.barplot(data=part, x="source", y=column, hue="workers", ax=ax)
        ax.set_title(title)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class ConversionStudy:
    """Parameters of notebook 02, validated.

    Attributes:
        data_dir: dataset folder in the NIH layout.
        output_dir: where the notebook writes params.json, metrics.json, figures.
        records_dir: parent of one records folder per variant and worker count.
        variants: variants to convert (``png``, ``compact``).
        images_per_shard: most records per shard.
        workers: worker counts to time (the last is used for the kept records).
        compact_size: stored size of compact records.
        decode_samples: records timed per source for the decode cost (0: skip).
        repeats: conversions per variant and worker count (the table shows the median).
    """

    data_dir: str
    output_dir: str
    records_dir: str
    variants: tuple = ("png", "compact")
    images_per_shard: int = 256
    workers: tuple = (1, 2)
    compact_size: int = MODEL_INPUT_SIZE
    decode_samples: int = 200
    repeats: int = 1

    def __post_init__(self):
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "workers", tuple(int(w) for w in self.workers))
        bad = [v for v in self.variants if v not in shards.VARIANTS]
        if not self.variants or bad:
            raise ValueError(
                f"VARIANTS must be a non-empty subset of {shards.VARIANTS}, got {self.variants}"
            )
        if not self.workers or min(self.workers) < 1:
            raise ValueError(f"WORKERS must be positive integers, got {self.workers}")
        if self.images_per_shard < 1:
            raise ValueError(f"IMAGES_PER_SHARD must be >= 1, got {self.images_per_shard}")
        if not 8 <= self.compact_size <= 4096:
            raise ValueError(f"COMPACT_SIZE must be in [8, 4096], got {self.compact_size}")
        if self.repeats < 1:
            raise ValueError(f"REPEATS must be >= 1, got {self.repeats}")
        if self.decode_samples < 0:
            raise ValueError(f"DECODE_SAMPLES must be >= 0, got {self.decode_samples}")
        load_metadata(self.data_dir)  # fails here, naming the problem, if the dataset is not usable

    def to_dict(self) -> dict:
        return asdict(self)

    def records_path(self, variant: str, workers: int) -> Path:
        return Path(self.records_dir) / f"{variant}-w{workers}"


def run_study(study: ConversionStudy, progress: bool = True) -> tuple[pd.DataFrame, list[dict]]:
    """Convert each variant with each worker count; return the table and the runs."""
    from tqdm.auto import tqdm

    runs = []  # interleaved, so a busy spell of the machine hits every configuration alike
    plan = [(v, w) for _ in range(study.repeats) for v in study.variants for w in study.workers]
    for variant, workers in tqdm(plan, desc="conversions", disable=not progress):
        runs.append(
            time_conversion(
                study.data_dir,
                study.records_path(variant, workers),
                variant,
                workers,
                images_per_shard=study.images_per_shard,
                size=study.compact_size,
            )
        )
    decode_ms = None
    if study.decode_samples:
        decode_ms = {
            "raw PNG folder": decode_cost(study.data_dir, study.compact_size, study.decode_samples)
        }
        for variant in study.variants:
            folder = study.records_path(variant, study.workers[-1])
            decode_ms[f"{variant} records"] = decode_cost(
                folder, study.compact_size, study.decode_samples
            )
    return conversion_table(runs, raw_png_bytes(study.data_dir), decode_ms), runs


@dataclass(frozen=True)
class BenchRecordsCommand:
    """One ``chexlib bench-records`` call: ``data_dir`` is its positional argument, the rest flags."""

    data_dir: str = option(
        "dataset folder (e.g. from `chexlib synth --images 400 --size 1024`)", positional=True
    )
    work_dir: str = option("records are written under here", default="outputs/bench_records")
    variants: tuple[str, ...] = option(
        "record variants to convert",
        default=shards.VARIANTS,
        choices=shards.VARIANTS,
        nargs="+",
    )
    workers: tuple[int, ...] = option("worker counts", default=(1, 2), nargs="+")
    images_per_shard: int = option("records per shard", default=32)
    size: int = option("compact size, the training input side by default", default=MODEL_INPUT_SIZE)
    decode_samples: int = option("records timed for decode cost (0: skip)", default=200)
    formats: bool = option("also compare raw vs JPEG compact records", default=False)
    repeats: int = option("conversions per configuration (median)", default=3)

    def study(self) -> ConversionStudy:
        """The conversion study these options ask for (records kept under ``work_dir``)."""
        return ConversionStudy(
            self.data_dir,
            self.work_dir,
            self.work_dir,
            self.variants,
            self.images_per_shard,
            self.workers,
            self.size,
            self.decode_samples,
            self.repeats,
        )


def add_arguments(parser) -> None:
    """``DATA_DIR`` positional, then one flag per other :class:`BenchRecordsCommand` field."""
    add_flags(parser, BenchRecordsCommand)


def run(args) -> int:
    """``chexlib bench-records``: convert with each variant and worker count, time it."""
    config = config_from_args(BenchRecordsCommand, args)
    study = config.study()

    env = environment_info(with_gpus=False)
    print(f"{env['cpu_count']} usable cores ({env['cpu']}); load average before: {os.getloadavg()}")
    table, _ = run_study(study)
    pd.set_option("display.width", 200)
    print(table.drop(columns=["bytes"]).round(3).to_string(index=False))
    for variant in study.variants:
        rows = table[table["variant"] == variant].set_index("workers")["seconds"]
        base = rows[min(rows.index)]
        speedups = ", ".join(f"{int(w)} workers {base / s:.2f}x" for w, s in rows.items())
        print(f"speed-up of {variant} conversion over {int(min(rows.index))} worker(s): {speedups}")
    print(f"load average after: {os.getloadavg()} (other work on the machine skews the timings)")
    if config.formats:
        print(
            compare_compact_formats(
                config.data_dir, n=config.decode_samples or 200, size=config.size
            ).round(3)
        )
    return 0

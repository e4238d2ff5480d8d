"""A generated dataset in exactly the NIH ChestX-ray14 layout: the writer and ``chexlib synth``.

``generate`` writes what the NIH download unpacks to, so every other part of
chexlib runs unchanged on it::

    OUT_DIR/
      Data_Entry_2017.csv     the NIH header, every column, one row per image
      train_val_list.txt      split by patient
      test_list.txt           about ``test_fraction`` of the images
      BBox_List_2017.csv      NIH's box list: a box per planted finding of the test split
      images/*.png            8-bit grayscale, ``size`` x ``size``
      synth.json              the arguments (makes a rerun resumable)

What is drawn lives in two modules: :mod:`chexlib.synth.metadata` (patients,
findings, views and the split, with NIH's statistics) and
:mod:`chexlib.synth.image` (a chest with its planted findings, and each
finding's box). This module writes them to disk, resumably and in parallel.


Everything is a function of the arguments only: the metadata comes from one
seeded stream, every image from streams keyed by (seed, patient) and (seed,
image number), so the output is byte-identical for any number of workers.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chexlib.core.files import write_bytes_atomic, write_text_atomic
from chexlib.core.flags import add_flags, config_from_args, option
from chexlib.data.metadata import LABELS, NO_FINDING, TEST_LIST, TRAIN_VAL_LIST
from chexlib.synth.image import BOXED, encode_png, finding_boxes, render_image
from chexlib.synth.metadata import (
    CSV_COLUMNS,
    CSV_HEADER,
    check_count,
    sample_metadata,
    split_by_patient,
)

CSV_NAME = "Data_Entry_2017.csv"
MANIFEST = "synth.json"
# Bump when the bytes written for the same arguments change, so an old
# output directory is not mistaken for a current one.
FORMAT_VERSION = 2
BBOX_NAME = "BBox_List_2017.csv"
# NIH's header, ``Image Index,Finding Label,Bbox [x,y,w,h],,,``: the bracketed
# box is four columns, and three empty ones follow (on every row too).
BBOX_HEADER: tuple[str, ...] = (
    "Image Index",
    "Finding Label",
    "Bbox [x",
    "y",
    "w",
    "h]",
    "",
    "",
    "",
)


# --- one task per image: its PNG, its boxes ----------------------------------


def _write_one(task: tuple) -> int:
    """Render and write one image atomically; returns its size in bytes."""
    path, findings, size, seed, index, patient, view, gender = task
    data = encode_png(render_image(findings, size, seed, index, patient, view, gender))
    # a killed run never leaves a truncated PNG behind; no fsync: a generated set is
    # regenerated (thousands of small files would each wait for the disk)
    write_bytes_atomic(path, data, sync=False)
    return len(data)


def _box_rows(task: tuple) -> list[tuple]:
    """The box list's rows of one image (a task as for :func:`_write_one`)."""
    path, findings, size, seed, index, patient, view, gender = task
    boxes = finding_boxes(findings, size, seed, index, patient, view, gender)
    return [(Path(path).name, label, *box, "", "", "") for label, box in boxes.items()]


def write_boxes(
    out: Path, meta: pd.DataFrame, is_test: np.ndarray, args: dict, workers: int
) -> int:
    """Write ``BBox_List_2017.csv`` (when missing) for the test images; return its row count."""
    if (out / BBOX_NAME).is_file():
        return max(0, len((out / BBOX_NAME).read_text().splitlines()) - 1)
    labels = meta[list(BOXED)].to_numpy().any(axis=1)
    tasks = [t for t in _tasks(out, meta, args, every=True) if is_test[t[4]] and labels[t[4]]]
    if workers > 1 and len(tasks) > 1:
        chunk = max(1, min(16, len(tasks) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            rows = [r for rs in pool.map(_box_rows, tasks, chunksize=chunk) for r in rs]
    else:
        rows = [r for task in tasks for r in _box_rows(task)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(BBOX_HEADER)
    writer.writerows(rows)
    write_text_atomic(out / BBOX_NAME, buf.getvalue())
    return len(rows)


# --- the dataset on disk ------------------------------------------------------


def _arguments(n_images, size, seed, test_fraction, workers) -> dict:
    """Validate the arguments; return the ones that determine the output."""
    check_count(n_images)
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 32:
        raise ValueError(f"size must be an integer >= 32 pixels, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if workers is not None and (not isinstance(workers, int | np.integer) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    return {
        "generator": "chexlib.synth",  # the name its outputs were first written with
        "format": FORMAT_VERSION,
        "n_images": int(n_images),
        "size": int(size),
        "seed": int(seed),
        "test_fraction": float(test_fraction),
    }


def _claim(out: Path, args: dict) -> None:
    """Make ``out`` ours: new or empty, or a synth output of the same arguments.

    Raises:
        FileExistsError: ``out`` holds anything else; nothing is touched.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        _check_manifest(out, args)
        for stale in (out / "images").glob("*.tmp"):  # left by a killed run
            stale.unlink()
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / MANIFEST, json.dumps(args, indent=2, sort_keys=True) + "\n")
    (out / "images").mkdir(exist_ok=True)


def _check_manifest(out: Path, args: dict) -> None:
    manifest = out / MANIFEST
    refuse = f"refusing to write into {out}; choose a new or empty directory, or delete it first"
    if not manifest.is_file():
        raise FileExistsError(
            f"{out} is not empty and has no {MANIFEST}, so it is not a synth output: {refuse}"
        )
    try:
        old = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise FileExistsError(f"{manifest} is unreadable ({err}): {refuse}") from None
    if old != args:
        diffs = [
            f"{k}={old.get(k)!r} on disk vs {args.get(k)!r} asked"
            for k in sorted(set(old) | set(args))
            if old.get(k) != args.get(k)
        ]
        raise FileExistsError(
            f"{out} holds a synth dataset made with other arguments ({'; '.join(diffs)}): {refuse}"
        )


def write_tables(out: Path, meta: pd.DataFrame, is_test: np.ndarray) -> None:
    """Write the CSV and the two split lists (only those missing: they are deterministic)."""
    if not (out / CSV_NAME).is_file():
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        for row in meta[list(CSV_COLUMNS)].itertuples(index=False, name=None):
            writer.writerow((*row, ""))  # the real rows end with a comma too
        write_text_atomic(out / CSV_NAME, buf.getvalue())
    names = meta["Image Index"].to_numpy()
    for list_name, chosen in ((TRAIN_VAL_LIST, ~is_test), (TEST_LIST, is_test)):
        if not (out / list_name).is_file():
            write_text_atomic(out / list_name, "".join(f"{n}\n" for n in sorted(names[chosen])))


def _tasks(out: Path, meta: pd.DataFrame, args: dict, every: bool = False) -> list[tuple]:
    """One task per image not yet on disk (so an interrupted run resumes), or per image."""
    tasks = []
    labels = meta[list(LABELS)].to_numpy().astype(bool)
    cols = ("Image Index", "Patient ID", "View Position", "Patient Gender")
    for index, (name, patient, view, gender) in enumerate(meta[list(cols)].itertuples(index=False)):
        path = out / "images" / name
        if every or not path.is_file():
            findings = tuple(k for k, on in zip(LABELS, labels[index], strict=True) if on)
            tasks.append(
                (str(path), findings, args["size"], args["seed"], index, int(patient), view, gender)
            )
    return tasks


def _render_all(tasks: list[tuple], workers: int, progress: bool) -> None:
    if not tasks:
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="synth", unit="img", disable=not progress)
    with bar:
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                _write_one(task)
                bar.update()
            return
        chunk = max(1, min(16, len(tasks) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            for _ in pool.map(_write_one, tasks, chunksize=chunk):
                bar.update()


def generate(
    out_dir: str | Path,
    n_images: int = 2000,
    size: int = 1024,
    seed: int = 0,
    workers: int | None = None,
    test_fraction: float = 0.2,
    progress: bool = True,
) -> dict:
    """Write a dataset in the NIH ChestX-ray14 layout (see the module docstring).

    Rerunning with the same arguments only renders the images still missing,
    so an interrupted run resumes and a finished one returns at once.

    Args:
        out_dir: folder to create or fill; must be new, empty, or a synth
            output of the same arguments.
        n_images: number of images (and CSV rows).
        size: width and height of every PNG in pixels (NIH: 1024).
        seed: seed of everything drawn; same arguments give the same bytes.
        workers: processes rendering images (default: ``os.cpu_count()``);
            does not change the output.
        test_fraction: fraction of images, as whole patients, in test_list.txt.
        progress: show a progress bar.

    Returns:
        A summary: image, patient and split counts, No Finding fraction,
        bytes on disk, images rendered by this call, rows of the box list
        (``boxes``), and timings.

    Raises:
        ValueError: an argument is out of range.
        FileExistsError: ``out_dir`` holds something else (nothing is touched).
    """
    start = time.perf_counter()
    args = _arguments(n_images, size, seed, test_fraction, workers)
    workers = int(workers or os.cpu_count() or 1)
    out = Path(out_dir)
    _claim(out, args)
    meta = sample_metadata(args["n_images"], args["seed"])
    is_test = split_by_patient(meta, args["test_fraction"], args["seed"])
    write_tables(out, meta, is_test)
    tasks = _tasks(out, meta, args)
    render_start = time.perf_counter()
    _render_all(tasks, workers, progress)
    render_seconds = time.perf_counter() - render_start
    boxes = write_boxes(out, meta, is_test, args, workers)
    summary = _summary(out, meta, is_test, args, len(tasks), workers, start, render_seconds)
    return {**summary, "boxes": boxes, "seconds": round(time.perf_counter() - start, 3)}


def _summary(out, meta, is_test, args, rendered, workers, start, render_seconds) -> dict:
    total = sum((out / "images" / n).stat().st_size for n in meta["Image Index"])
    patients = meta["Patient ID"]
    return {
        "out_dir": str(out),
        "images": len(meta),
        "patients": int(patients.nunique()),
        "train_val_images": int((~is_test).sum()),
        "test_images": int(is_test.sum()),
        "test_patients": int(patients[is_test].nunique()),
        "no_finding": round(float((meta["Finding Labels"] == NO_FINDING).mean()), 4),
        "size": args["size"],
        "seed": args["seed"],
        "bytes": int(total),
        "mean_image_kb": round(total / len(meta) / 1024, 1),
        "rendered": rendered,
        "already_present": len(meta) - rendered,
        "workers": workers,
        "render_seconds": round(render_seconds, 3),
        "images_per_second": round(rendered / render_seconds, 2) if rendered else None,
        "seconds": round(time.perf_counter() - start, 3),
    }


# --- command line -------------------------------------------------------------


@dataclass(frozen=True)
class SynthCommand:
    """One ``chexlib synth`` call: ``out_dir`` is its positional argument, every other field a flag."""

    out_dir: str = option(
        "folder to write (new, empty, or an earlier synth output)", positional=True
    )
    images: int = option("number of images", default=2000)
    size: int = option("image width and height in pixels", default=1024)
    seed: int = option("seed; same arguments give the same bytes", default=0)
    workers: int | None = option("rendering processes; None: all cores", default=None)
    test_fraction: float = option("fraction of images in test_list.txt", default=0.2)
    progress: bool = option("hide the progress bar", default=True)  # the switch is --no-progress


def add_arguments(parser) -> None:
    """``OUT_DIR`` positional, then one flag per other :class:`SynthCommand` field."""
    add_flags(parser, SynthCommand)


def run(args) -> int:
    """``chexlib synth OUT_DIR``: generate (or finish) a dataset and print its summary."""
    config = config_from_args(SynthCommand, args)
    summary = generate(
        config.out_dir,
        n_images=config.images,
        size=config.size,
        seed=config.seed,
        workers=config.workers,
        test_fraction=config.test_fraction,
        progress=config.progress,
    )
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    return 0

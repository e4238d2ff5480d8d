"""The shards of a conversion: the settings that decide their bytes, the plan, and their worker.

This module is all a conversion worker process loads (it never imports
TensorFlow); :mod:`chexlib.records.convert` drives the workers, and its
docstring shows the output folder.

Images of a split are dealt round-robin over ``ceil(N / images_per_shard)``
shards (or ``shards``), so every image is in exactly one record and shard
sizes differ by at most one (:func:`plan_shards`). A worker writes a whole
shard under a temporary name in ``.convert/`` and renames it when complete,
then writes the shard's sidecar (:func:`write_shard`). A rerun reuses a shard
only when its sidecar carries the same run key (settings + source
fingerprint, :func:`chexlib.data.fingerprint.metadata_fingerprint`) and the file's sha256 still
matches.

Every source image is fully decoded (:func:`encode_image`), in both
variants, so a missing or corrupt file stops the shard with its name; with
``skip_bad`` it is left out instead and listed in the sidecar with its reason.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from chexlib.core.files import fsync_dir, read_json, write_json
from chexlib.data.metadata import LABELS, MODEL_INPUT_SIZE, SPLITS, DataError
from chexlib.data.png import BadImage, check_png
from chexlib.records.manifest import STATE_DIR
from chexlib.records.schema import SCHEMA_VERSION, encode_example, frame_record

VARIANTS = ("png", "compact")
COMPACT_FORMATS = ("raw", "jpeg")
# raw, measured on 200 generated 1024-px images resized to 256 (chexlib.bench.records
# --formats): TF decodes raw in ~0.15-0.25 ms vs ~0.3-0.4 ms for JPEG q95 (tf.data
# overhead included), with no loss after the resize, for 64 KiB vs ~9 KiB per image.
DEFAULT_COMPACT_FORMAT = "raw"
RESAMPLE = "PIL LANCZOS, reducing_gap=2.0"
LOCK = ".convert.lock"  # held (flock) by the one conversion writing into a folder


class RecordsError(DataError):
    """A records folder cannot be written or read as asked; the message says why."""


# --- settings, source fingerprint, shard plan ----------------------------------


@dataclass(frozen=True)
class ConvertSettings:
    """Everything that decides the bytes of the shards (workers do not).

    Attributes:
        variant: ``"png"`` (original file bytes) or ``"compact"`` (resized once).
        images_per_shard: most records per shard; shards = ceil(images / this).
        shards: shards per split instead (fewer when a split has fewer images).
        size: compact only: stored width and height in pixels.
        compact_format: compact only: ``"raw"`` uint8 rows or ``"jpeg"``.
        jpeg_quality: compact JPEG only: quality 1-100.
        val_fraction: fraction of train_val moved to validation (by patient).
        seed: seed of the validation split.
    """

    variant: str = "png"
    images_per_shard: int = 256
    shards: int | None = None
    size: int = MODEL_INPUT_SIZE
    compact_format: str = DEFAULT_COMPACT_FORMAT
    jpeg_quality: int = 95
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.shards is None and (
            not isinstance(self.images_per_shard, int) or self.images_per_shard < 1
        ):
            raise ValueError(
                f"images_per_shard must be a positive integer, got {self.images_per_shard!r}"
            )
        if self.shards is not None and (not isinstance(self.shards, int) or self.shards < 1):
            raise ValueError(f"shards must be a positive integer, got {self.shards!r}")
        if not isinstance(self.size, int) or not 8 <= self.size <= 4096:
            raise ValueError(f"size must be an integer in [8, 4096], got {self.size!r}")
        if self.compact_format not in COMPACT_FORMATS:
            raise ValueError(
                f"compact_format must be one of {COMPACT_FORMATS}, got {self.compact_format!r}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")

    @property
    def image_format(self) -> str:
        """The ``image/format`` of every record: png, raw or jpeg."""
        return "png" if self.variant == "png" else self.compact_format

    def to_dict(self) -> dict:
        """The settings that matter for this variant (others are None)."""
        d = asdict(self)
        d["images_per_shard"] = None if self.shards is not None else self.images_per_shard
        if self.variant == "png":
            d.update(size=None, compact_format=None, jpeg_quality=None)
        elif self.compact_format != "jpeg":
            d["jpeg_quality"] = None
        d["format"] = self.image_format
        d["resample"] = RESAMPLE if self.variant == "compact" else None
        d["schema_version"] = SCHEMA_VERSION
        return d

    def shard_count(self, n_images: int) -> int:
        """Shards for a split of ``n_images`` (0 for an empty split)."""
        if n_images == 0:
            return 0
        if self.shards is not None:
            return min(self.shards, n_images)
        return math.ceil(n_images / self.images_per_shard)


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its images as (image, path, labels, patient_id)."""

    split: str
    index: int
    count: int
    items: tuple = field(repr=False)

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index, self.count)


def plan_shards(df, settings: ConvertSettings) -> list[ShardJob]:
    """Deal each split's images round-robin over its shards (CSV order within a shard)."""
    jobs = []
    labels = df[list(LABELS)].to_numpy(dtype=np.int64)
    for split in SPLITS:
        rows = np.flatnonzero((df["split"] == split).to_numpy() & df["path"].notna().to_numpy())
        k = settings.shard_count(len(rows))
        for i in range(k):
            items = tuple(
                (
                    df["image"].iat[r],
                    df["path"].iat[r],
                    tuple(labels[r].tolist()),
                    int(df["patient_id"].iat[r]),
                )
                for r in rows[i::k]
            )
            jobs.append(ShardJob(split, i, k, items))
    return jobs


# --- the worker: one whole shard --------------------------------------------------

_progress_queue = None


def init_worker(progress_queue) -> None:
    """Process-pool initializer: the worker's ticks go to ``progress_queue``."""
    global _progress_queue
    _progress_queue = progress_queue
    # Ticks are only for the progress bar: never let an unread one keep a worker from exiting.
    progress_queue.cancel_join_thread()


def _tick(n: int) -> None:
    if _progress_queue is not None and n:
        _progress_queue.put(n)


def encode_image(path: str, settings: ConvertSettings) -> tuple[bytes, int, int]:
    """Read and check one source image; return (``image/encoded``, height, width).

    The file is checked as training decodes it (:func:`chexlib.data.png.check_png`:
    PNG signature, header, decompression bomb, then a full decode), so a JPEG
    named ``.png`` never becomes a record with ``image/format`` png.

    Raises:
        OSError: (:class:`chexlib.data.png.BadImage`) the file is missing,
            unreadable, not a PNG or does not decode; the message names the file.
    """
    from PIL import Image

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise BadImage(f"{path}: cannot read file ({err.strerror or err})") from err
    gray, _ = check_png(data, name=str(path))  # a full decode: corrupt files fail here
    if settings.variant == "png":
        return data, gray.shape[0], gray.shape[1]
    size = settings.size
    small = Image.fromarray(gray, mode="L").resize(
        (size, size), resample=Image.Resampling.LANCZOS, reducing_gap=2.0
    )
    if settings.compact_format == "raw":
        return small.tobytes(), size, size
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=settings.jpeg_quality)
    return buf.getvalue(), size, size


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _reusable(out: Path, job: ShardJob, key: str, skip_bad: bool) -> dict | None:
    """The sidecar of a finished shard if it belongs to this run and the file is intact."""

    shard, sidecar = out / job.name, out / STATE_DIR / f"{job.name}.json"
    try:
        info = read_json(sidecar)
    except (OSError, ValueError):
        return None
    if info.get("key") != key or not shard.is_file() or shard.stat().st_size != info.get("bytes"):
        return None
    if info.get("skipped") and not skip_bad:
        return None  # written with --skip-bad; without it the bad image must stop the run
    return info if sha256_file(shard) == info.get("sha256") else None


def _unique() -> str:
    """A name part no other process (on any host sharing the folder) uses."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def _reason(err: OSError, path: str) -> str:
    text = str(err)
    return text[len(path) + 2 :] if text.startswith(f"{path}: ") else text


def write_shard(
    job: ShardJob, settings: ConvertSettings, out_dir: str, key: str, skip_bad: bool
) -> dict:
    """Write (or reuse) one shard; return its sidecar record.

    The shard is written to ``.convert/NAME.HOST.PID.RANDOM.tmp`` (no other
    process ever uses that name), flushed to disk and renamed, then its
    sidecar (run key, records, bytes, sha256, skips) is written; a shard
    without a matching sidecar is never trusted.
    """

    out = Path(out_dir)
    reused = _reusable(out, job, key, skip_bad)
    if reused is not None:
        _tick(len(job.items))
        return {**reused, "reused": True}
    cpu_start = time.process_time()
    written = _write_records(out, job, settings, skip_bad)
    info = {"file": job.name, "split": job.split, "index": job.index, **written, "key": key}
    write_json(out / STATE_DIR / f"{job.name}.json", info)
    return {**info, "reused": False, "cpu_seconds": time.process_time() - cpu_start}


def _write_records(out: Path, job: ShardJob, settings: ConvertSettings, skip_bad: bool) -> dict:
    """Write the shard under a temporary name, flush it to disk and rename it into place.

    Returns:
        The shard's ``records``, ``bytes``, ``sha256`` and ``skipped`` images.
    """
    tmp = out / STATE_DIR / f"{job.name}.{_unique()}.tmp"
    sha, records, nbytes, skipped = hashlib.sha256(), 0, 0, []
    try:
        with open(tmp, "wb") as fh:
            for item in job.items:
                record = _framed_record(item, job.split, settings, skip_bad, skipped)
                if record is not None:
                    fh.write(record)
                    sha.update(record)
                    records, nbytes = records + 1, nbytes + len(record)
                _tick(1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out / job.name)
        fsync_dir(out)  # the rename itself reaches the disk
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"records": records, "bytes": nbytes, "sha256": sha.hexdigest(), "skipped": skipped}


def _framed_record(
    item: tuple, split: str, settings: ConvertSettings, skip_bad: bool, skipped: list
) -> bytes | None:
    """One image (as in :class:`ShardJob`) as a framed record.

    A bad image stops the run, or with ``skip_bad`` is appended to ``skipped``
    with its reason and gives None.
    """
    image, path, labels, patient_id = item
    try:
        encoded, height, width = encode_image(path, settings)
    except OSError as err:
        if not skip_bad:
            raise RecordsError(
                f"{err}\n(rerun with --skip-bad to leave bad images out; "
                "each is then listed in manifest.json with its reason)"
            ) from None
        skipped.append({"image": image, "split": split, "reason": _reason(err, path)})
        return None
    example = encode_example(
        encoded, settings.image_format, height, width, labels, image, patient_id
    )
    return frame_record(example)

"""TFRecords of ChestX-ray14: a parallel, resumable, verified converter and the reader side.

Two variants share one record schema (:data:`SCHEMA`, compatible with the
poster's records):

``png``
    ``image/encoded`` holds the original PNG file bytes, as the poster did.
    Every training read still decodes a 1024 x 1024 PNG; what the records save
    is file-system work (one large sequential file instead of thousands of
    small ones), which the poster measured at +8 % to +13 % throughput.
``compact``
    Each image is decoded once (:func:`chexlib.images.decode_grayscale`: RGB,
    RGBA and 16-bit sources all become one 8-bit channel), resized once to
    ``size`` x ``size`` with PIL's Lanczos filter (``reducing_gap=2.0``: a
    2x box reduction first, then Lanczos), and stored as raw ``uint8`` rows
    (``image/format`` b"raw"; JPEG at quality 95 is the alternative,
    ``compact_format="jpeg"``). Conversion costs more and the records no
    longer hold the original pixels, but a training read is a memcpy instead of
    a full-size PNG decode and resize.

Layout of an output folder::

    OUT_DIR/
      train-00000-of-00305.tfrecord   one set of shards per split
      ...
      manifest.json                   written last: settings, source fingerprint,
                                      per shard records/bytes/sha256, totals, skips
      .convert/                       state of the conversion: settings.json and one
                                      sidecar per finished shard (used to resume)
      .convert.lock                   locked while a conversion runs; names its process

Every source image is fully decoded during conversion, in both variants, so a
missing or corrupt file stops the run with its name; with ``skip_bad`` it is
left out instead and listed in the manifest with its reason, and the per-split
totals count it (records + skipped = images listed).

Images of a split are dealt round-robin over ``ceil(N / images_per_shard)``
shards (or ``shards``), so every image is in exactly one record and shard
sizes differ by at most one. Worker processes each write whole shards under a
temporary name in ``.convert/`` and rename them when complete. A rerun of the
same command reuses a shard only when its sidecar carries the same run key
(settings + source fingerprint) and the file's sha256 still matches; an output
folder from other settings or another dataset is refused (``overwrite=True``
deletes it). The same input and settings give byte-identical shards for any
number of workers.

Workers write records without importing TensorFlow (3-6 s and ~450 MB per
process): ``tf.train.Example`` is a fixed, small protobuf, encoded here by
hand, and the TFRecord framing needs only CRC-32C, taken from TensorFlow's
own shared library through ctypes when possible (a NumPy implementation is
the fallback). TensorFlow itself reads every record back in the tests and in
:func:`verify_records`.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import functools
import hashlib
import importlib.util
import io
import json
import math
import multiprocessing as mp
import os
import queue
import secrets
import shutil
import socket
import struct
import sys
import time
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from chexlib.data import LABELS, MODEL_INPUT_SIZE, SPLITS, DataError, load_metadata

VARIANTS = ("png", "compact")
COMPACT_FORMATS = ("raw", "jpeg")
# raw, measured on 200 generated 1024-px images resized to 256 (chexlib.bench_records
# --formats): TF decodes raw in ~0.15-0.25 ms vs ~0.3-0.4 ms for JPEG q95 (tf.data
# overhead included), with no loss after the resize, for 64 KiB vs ~9 KiB per image.
DEFAULT_COMPACT_FORMAT = "raw"
RESAMPLE = "PIL LANCZOS, reducing_gap=2.0"
# Bump when the bytes written for the same settings change: old shards are then stale.
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STATE_DIR = ".convert"
LOCK = ".convert.lock"  # held (flock) by the one conversion writing into a folder

SCHEMA: dict[str, str] = {
    "image/encoded": "bytes: the PNG file (png variant) or the resized image as raw uint8 rows or JPEG (compact)",
    "image/format": 'bytes: b"png", b"jpeg" or b"raw" (one value for a whole conversion)',
    "image/height": "int64: rows of the stored image",
    "image/width": "int64: columns of the stored image",
    "image/label": "int64 x 14: 0/1 per finding, in chexlib.data.LABELS order",
    "image/filename": "bytes: NIH image name, e.g. b'00000001_000.png'",
    "image/patient_id": "int64: NIH Patient ID",
}


class RecordsError(DataError):
    """A records folder cannot be written or read as asked; the message says why."""


# --- the schema on the TensorFlow side -----------------------------------------


@functools.cache
def feature_spec() -> dict:
    """The ``tf.io`` feature spec of :data:`SCHEMA` (also available as ``FEATURES``)."""
    import tensorflow as tf

    return {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
        "image/label": tf.io.FixedLenFeature([len(LABELS)], tf.int64),
        "image/filename": tf.io.FixedLenFeature([], tf.string),
        "image/patient_id": tf.io.FixedLenFeature([], tf.int64),
    }


def __getattr__(name: str):
    # FEATURES is built on first use so that importing this module (as every
    # conversion worker does) never imports TensorFlow.
    if name == "FEATURES":
        return feature_spec()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_example(serialized):
    """Parse one serialized record with :data:`FEATURES` (usable inside ``tf.data`` map)."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, feature_spec())


# --- writing records without TensorFlow ----------------------------------------

_MASK64 = (1 << 64) - 1


def _varint(value: int) -> bytes:
    value &= _MASK64  # negative int64 -> ten-byte two's complement, as protobuf does
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:
    return _field(1, _field(1, value))  # Feature.bytes_list(1) -> BytesList.value(1)


def _int64_feature(values) -> bytes:
    packed = b"".join(_varint(int(v)) for v in values)
    return _field(3, _field(1, packed))  # Feature.int64_list(3) -> packed Int64List.value(1)


def encode_example(
    encoded: bytes,
    image_format: str,
    height: int,
    width: int,
    labels,
    filename: str,
    patient_id: int,
) -> bytes:
    """Serialize one ``tf.train.Example`` of :data:`SCHEMA` (keys in sorted order)."""
    features = {
        "image/encoded": _bytes_feature(encoded),
        "image/filename": _bytes_feature(filename.encode()),
        "image/format": _bytes_feature(image_format.encode()),
        "image/height": _int64_feature([height]),
        "image/label": _int64_feature(labels),
        "image/patient_id": _int64_feature([patient_id]),
        "image/width": _int64_feature([width]),
    }
    # Example.features(1) -> Features.feature(1): map entries of key(1), value(2)
    entries = b"".join(
        _field(1, _field(1, key.encode()) + _field(2, value))
        for key, value in sorted(features.items())
    )
    return _field(1, entries)


# CRC-32C (Castagnoli), reflected polynomial, as used by the TFRecord framing.
_POLY = 0x82F63B78


def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_T8 = _crc_table()
_T8_LIST = _T8.tolist()


def _zero_bytes(regs: np.ndarray, n: int) -> np.ndarray:
    """Advance raw CRC registers over ``n`` zero bytes."""
    for _ in range(n):
        regs = _T8[regs & 0xFF] ^ (regs >> 8)
    return regs


# A 4-byte step on register c with word w is Z4(c ^ w), and Z4 is linear: split it in two halves.
_WORD_LO = _zero_bytes(np.arange(1 << 16, dtype=np.uint32), 4)
_WORD_HI = _zero_bytes(np.arange(1 << 16, dtype=np.uint32) << np.uint32(16), 4)


def _mulmod(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial (reflected bit order, as in zlib's crc32_combine)."""
    m, p = 1 << 31, 0
    while a:
        if a & m:
            p ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


_X2N = [1 << 30]  # x^(2^k) mod P
for _ in range(63):
    _X2N.append(_mulmod(_X2N[-1], _X2N[-1]))


def _shift(register: int, nbytes: int) -> int:
    """The raw register after ``nbytes`` zero bytes: register * x^(8 n) mod P."""
    k, p = 3, 1 << 31
    while nbytes:
        if nbytes & 1:
            p = _mulmod(_X2N[k], p)
        nbytes >>= 1
        k += 1
    return _mulmod(p, register)


@functools.cache
def _shift_tables(nbytes: int) -> np.ndarray:
    """Four byte tables applying :func:`_shift` by ``nbytes`` to a vector of registers."""
    basis = [_shift(1 << i, nbytes) for i in range(32)]
    idx = np.arange(256)
    tables = np.zeros((4, 256), np.uint32)
    for k in range(4):
        for bit in range(8):
            tables[k] ^= np.where((idx >> bit) & 1, basis[8 * k + bit], 0).astype(np.uint32)
    return tables


_LANE = 64  # bytes per lane of the vectorised CRC


def _crc32c_numpy(data: bytes) -> int:
    """CRC-32C in NumPy: many lanes in parallel, then combined pairwise.

    With a zero start register, leading zero bytes change nothing, so the data
    is zero-padded in front to whole lanes, each lane's raw CRC is computed at
    once, and lanes are merged as ``shift(left, len(right)) ^ right``.
    """
    n = len(data)
    if n < 1024:  # a plain loop is faster for record headers and small payloads
        reg = 0xFFFFFFFF
        for byte in data:
            reg = _T8_LIST[(reg ^ byte) & 0xFF] ^ (reg >> 8)
        return reg ^ 0xFFFFFFFF
    buf = np.zeros(n + (-n) % _LANE, np.uint8)
    buf[len(buf) - n :] = np.frombuffer(data, np.uint8)
    words = np.ascontiguousarray(buf.view("<u4").reshape(-1, _LANE // 4).T)
    regs = np.zeros(words.shape[1], np.uint32)
    for row in words:
        x = regs ^ row
        regs = _WORD_LO[x & 0xFFFF] ^ _WORD_HI[x >> 16]
    span = _LANE
    while len(regs) > 1:
        if len(regs) % 2:  # a zero lane in front is a no-op
            regs = np.concatenate((np.zeros(1, np.uint32), regs))
        t, left, right = _shift_tables(span), regs[0::2], regs[1::2]
        regs = (
            t[0][left & 0xFF]
            ^ t[1][(left >> 8) & 0xFF]
            ^ t[2][(left >> 16) & 0xFF]
            ^ t[3][left >> 24]
            ^ right
        )
        span *= 2
    return (_shift(0xFFFFFFFF, n) ^ int(regs[0])) ^ 0xFFFFFFFF


# The C++ symbol of tsl::crc32c::Extend(uint32, const char*, size_t) (TF >= 2.13), then the older name.
_TF_CRC_SYMBOLS = ("_ZN3tsl6crc32c6ExtendEjPKcm", "_ZN10tensorflow6crc32c6ExtendEjPKcm")


@functools.cache
def _tf_crc32c():
    """TensorFlow's accelerated CRC-32C through ctypes (no Python TF import), or None."""
    try:
        spec = importlib.util.find_spec("tensorflow")  # finds the package without importing it
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for name in ("libtensorflow_framework.so.2", "libtensorflow_framework.2.dylib"):
            if not (Path(folder) / name).is_file():
                continue
            try:
                lib = ctypes.CDLL(str(Path(folder) / name))
            except OSError:
                continue
            for symbol in _TF_CRC_SYMBOLS:
                fn = getattr(lib, symbol, None)
                if fn is None:
                    continue
                fn.restype = ctypes.c_uint32
                fn.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]
                if fn(0, b"123456789", 9) == 0xE3069283:  # the CRC-32C check value
                    return fn
    return None


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (TensorFlow's C++ routine when loadable, else NumPy)."""
    fn = _tf_crc32c()
    return int(fn(0, data, len(data))) if fn is not None else _crc32c_numpy(data)


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    header = struct.pack("<Q", len(data))
    return header + _masked_crc(header) + data + _masked_crc(data)


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


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def dataset_fingerprint(df) -> str:
    """sha256 of the metadata files and of every image's name, size and mtime.

    Cheap on 112,120 files (one ``stat`` each) and changes when any listed
    image or the CSV/split lists change. Copying the dataset without keeping
    modification times changes it too (the converter then asks for overwrite).
    """
    h = hashlib.sha256()
    csv_path = Path(df.attrs["csv"])
    for path in (
        csv_path,
        csv_path.with_name("train_val_list.txt"),
        csv_path.with_name("test_list.txt"),
    ):
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    for image, path in zip(df["image"], df["path"], strict=True):
        if not isinstance(path, str):  # None/NaN: listed but missing (skip_bad)
            h.update(f"{image}\0missing\n".encode())
        else:
            st = os.stat(path)
            h.update(f"{image}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


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


def _init_worker(progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    # Ticks are only for the progress bar: never let an unread one keep a worker from exiting.
    progress_queue.cancel_join_thread()


def _tick(n: int) -> None:
    if _progress_queue is not None and n:
        _progress_queue.put(n)


def encode_image(path: str, settings: ConvertSettings) -> tuple[bytes, int, int]:
    """Read and check one source image; return (``image/encoded``, height, width).

    The file is checked as training decodes it (:func:`chexlib.images.check_png`:
    PNG signature, header, decompression bomb, then a full decode), so a JPEG
    named ``.png`` never becomes a record with ``image/format`` png.

    Raises:
        OSError: (:class:`chexlib.images.BadImage`) the file is missing,
            unreadable, not a PNG or does not decode; the message names the file.
    """
    from PIL import Image

    from chexlib.images import BadImage, check_png

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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _reusable(out: Path, job: ShardJob, key: str, skip_bad: bool) -> dict | None:
    """The sidecar of a finished shard if it belongs to this run and the file is intact."""
    from chexlib.results import read_json

    shard, sidecar = out / job.name, out / STATE_DIR / f"{job.name}.json"
    try:
        info = read_json(sidecar)
    except (OSError, ValueError):
        return None
    if info.get("key") != key or not shard.is_file() or shard.stat().st_size != info.get("bytes"):
        return None
    if info.get("skipped") and not skip_bad:
        return None  # written with --skip-bad; without it the bad image must stop the run
    return info if _sha256_file(shard) == info.get("sha256") else None


def _unique() -> str:
    """A name part no other process (on any host sharing the folder) uses."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (some network file systems)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(err: OSError, path: str) -> str:
    text = str(err)
    return text[len(path) + 2 :] if text.startswith(f"{path}: ") else text


def write_shard(
    job: ShardJob, settings: ConvertSettings, out_dir: str, key: str, skip_bad: bool
) -> dict:
    """Write (or reuse) one shard; return its sidecar record.

    The shard is written to ``.convert/NAME.HOST.PID.RANDOM.tmp`` (no other
    process ever uses that name), flushed to disk and renamed, then its sidecar (run key, records, bytes, sha256, skips) is
    written; a shard without a matching sidecar is never trusted.
    """
    from chexlib.results import write_json

    out = Path(out_dir)
    reused = _reusable(out, job, key, skip_bad)
    if reused is not None:
        _tick(len(job.items))
        return {**reused, "reused": True}
    tmp = out / STATE_DIR / f"{job.name}.{_unique()}.tmp"
    sha, records, nbytes, skipped = hashlib.sha256(), 0, 0, []
    cpu_start = time.process_time()
    try:
        with open(tmp, "wb") as fh:
            for image, path, labels, patient_id in job.items:
                try:
                    encoded, height, width = encode_image(path, settings)
                except OSError as err:
                    if not skip_bad:
                        raise RecordsError(
                            f"{err}\n(rerun with --skip-bad to leave bad images out; "
                            "each is then listed in manifest.json with its reason)"
                        ) from None
                    skipped.append(
                        {"image": image, "split": job.split, "reason": _reason(err, path)}
                    )
                    _tick(1)
                    continue
                example = encode_example(
                    encoded, settings.image_format, height, width, labels, image, patient_id
                )
                record = frame_record(example)
                fh.write(record)
                sha.update(record)
                records, nbytes = records + 1, nbytes + len(record)
                _tick(1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out / job.name)
        _fsync_dir(out)  # the rename itself reaches the disk
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    info = {
        "file": job.name,
        "split": job.split,
        "index": job.index,
        "records": records,
        "bytes": nbytes,
        "sha256": sha.hexdigest(),
        "skipped": skipped,
        "key": key,
    }
    write_json(out / STATE_DIR / f"{job.name}.json", info)
    return {**info, "reused": False, "cpu_seconds": time.process_time() - cpu_start}


# --- the conversion ---------------------------------------------------------------


def _describe_change(old: dict, new: dict) -> str:
    changes = [
        f"{k}: {old.get('settings', {}).get(k)!r} -> {v!r}"
        for k, v in new["settings"].items()
        if old.get("settings", {}).get(k) != v
    ]
    if old.get("fingerprint") != new["fingerprint"]:
        changes.append(
            f"source dataset fingerprint: {str(old.get('fingerprint'))[:12]} -> {new['fingerprint'][:12]}"
        )
    return "; ".join(changes) or "unknown origin (no .convert/settings.json)"


def _ours(out: Path) -> list[Path]:
    """Files a conversion writes into ``out`` (what overwrite deletes)."""
    return sorted(out.glob("*.tfrecord")) + [
        p for p in (out / MANIFEST, out / STATE_DIR) if p.exists()
    ]


@contextlib.contextmanager
def conversion_lock(out: Path):
    """Hold ``OUT/.convert.lock`` for a whole conversion: one per folder at a time.

    An ``flock`` is released by the kernel when its holder exits or is
    killed, so a dead run never leaves a stale lock; the file's text (PID,
    host, start time) names the holder for the error a second run gets.

    Raises:
        RecordsError: another process holds the lock.
    """
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (out / LOCK).read_text(errors="replace").strip() or "process unknown"
            raise RecordsError(
                f"{out}: another conversion is writing into this folder ({holder}); wait for "
                "it to finish (rerun the same command to resume), or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _claim(out: Path, state: dict, overwrite: bool) -> None:
    """Make ``out`` ours for this run: resume the same run, refuse (or wipe) another's."""
    from chexlib.results import read_json, write_json

    marker = out / STATE_DIR / "settings.json"
    try:
        previous = read_json(marker)
    except (OSError, ValueError):
        previous = None
    found = _ours(out) if out.is_dir() else []
    if previous is not None and previous.get("key") == state["key"]:
        for tmp in (out / STATE_DIR).glob("*.tmp"):  # left by a killed run
            tmp.unlink()
    elif found:
        if not overwrite:
            raise RecordsError(
                f"{out} holds TFRecords of a different conversion ({_describe_change(previous or {}, state)}); "
                "its shards are never reused. Choose another output folder, or pass --overwrite "
                "(overwrite=True) to delete them."
            )
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (out / MANIFEST).unlink(missing_ok=True)  # the set is incomplete until the end
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    write_json(marker, state)


def _drain(progress_queue, bar) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return


def _pool_context():
    """Worker processes that start from a clean interpreter, cheaply.

    Not ``fork``: the caller may have imported TensorFlow, whose threads do not
    survive a fork. ``forkserver`` starts one clean server that imports this
    module once and forks each worker from it, so a worker costs milliseconds
    instead of a fresh interpreter's imports (which, on small datasets, would
    eat much of the parallel speed-up); ``spawn`` where there is no forkserver.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


def _run_jobs(
    jobs, settings, out: Path, key: str, skip_bad: bool, workers: int, progress: bool
) -> list[dict]:
    """Write the shards over a process pool; each worker writes whole shards."""
    from tqdm.auto import tqdm

    ctx = _pool_context()
    progress_queue = ctx.Queue()
    results = []
    bar = tqdm(
        total=sum(len(j.items) for j in jobs),
        unit="img",
        desc=f"convert {settings.variant}",
        disable=not progress,
    )
    with (
        bar,
        ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(progress_queue,)
        ) as pool,
    ):
        # Largest shards first, so no worker is left with a big one at the end.
        by_size = sorted(jobs, key=lambda j: -len(j.items))
        pending = {pool.submit(write_shard, j, settings, str(out), key, skip_bad) for j in by_size}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(progress_queue, bar)
                results.extend(f.result() for f in done)  # re-raises a worker's error
        except BaseException:
            for f in pending:
                f.cancel()  # running shards still finish (and stay valid for a rerun)
            raise
        bar.update(bar.total - bar.n)
    return results


def convert(
    data_dir,
    out_dir,
    variant: str = "png",
    images_per_shard: int = 256,
    shards: int | None = None,
    workers: int | None = None,
    size: int = MODEL_INPUT_SIZE,
    skip_bad: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    compact_format: str = DEFAULT_COMPACT_FORMAT,
    jpeg_quality: int = 95,
    overwrite: bool = False,
) -> dict:
    """Convert a dataset in the NIH layout to sharded TFRecords (see the module docstring).

    Args:
        data_dir: dataset folder (``chexlib.data.load_metadata`` layout).
        out_dir: output folder: new, empty, or an earlier run of the same
            settings and data (resumed: valid shards are kept). One
            conversion per folder at a time (a second one is refused).
        variant: ``"png"`` (original bytes) or ``"compact"`` (resized once).
        images_per_shard: most records per shard (default 256).
        shards: shards per split instead of ``images_per_shard``.
        workers: processes writing shards (default: all usable cores); does
            not change the output.
        size: compact: stored width and height (default 224, the training size).
        skip_bad: leave out missing or corrupt images, listing each with its
            reason in the manifest, instead of stopping at the first.
        val_fraction: validation fraction of train_val, by patient.
        seed: seed of the validation split.
        progress: show a progress bar over images.
        compact_format: compact: ``"raw"`` (default) or ``"jpeg"``.
        jpeg_quality: compact JPEG quality.
        overwrite: delete the TFRecords of a different conversion in ``out_dir``.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        DataError: bad metadata, or a listed image missing (without skip_bad).
        RecordsError: a source image does not decode (without skip_bad),
            ``out_dir`` holds another conversion (without overwrite), or
            another process is converting into ``out_dir`` right now.
    """
    from chexlib.results import usable_cores, write_json

    start = time.perf_counter()
    settings = ConvertSettings(
        variant, images_per_shard, shards, size, compact_format, jpeg_quality, val_fraction, seed
    )
    df = load_metadata(data_dir, val_fraction=val_fraction, seed=seed, allow_missing=skip_bad)
    fingerprint = dataset_fingerprint(df)
    key = _sha256_json({"settings": settings.to_dict(), "fingerprint": fingerprint})
    out = Path(out_dir)
    state = {
        "key": key,
        "settings": settings.to_dict(),
        "fingerprint": fingerprint,
        "data_dir": str(Path(data_dir).resolve()),
    }
    with conversion_lock(out):
        _claim(out, state, overwrite)
        jobs = plan_shards(df, settings)
        workers = max(1, min(int(workers or usable_cores()), len(jobs) or 1))
        infos = _run_jobs(jobs, settings, out, key, skip_bad, workers, progress) if jobs else []
        run = {"seconds": time.perf_counter() - start, "workers": workers, "skip_bad": skip_bad}
        manifest = build_manifest(settings, df, fingerprint, key, infos, run)
        write_json(out / MANIFEST, manifest)
    return manifest


def build_manifest(
    settings: ConvertSettings, df, fingerprint: str, key: str, infos: list[dict], run: dict
) -> dict:
    """The manifest: settings, source, per-shard facts, per-split totals, every skip."""
    from chexlib import __version__
    from chexlib.results import versions

    order = {s: i for i, s in enumerate(SPLITS)}
    infos = sorted(infos, key=lambda i: (order[i["split"]], i["index"]))
    split_of = dict(zip(df["image"], df["split"], strict=True))
    skipped = [
        {"image": e["image"], "split": split_of[e["image"]], "reason": e["reason"]}
        for e in df.attrs.get("excluded", [])
    ]
    skipped += [s for i in infos for s in i["skipped"]]
    splits = {}
    for split in SPLITS:
        mine = [i for i in infos if i["split"] == split]
        images = int((df["split"] == split).sum())
        records = sum(i["records"] for i in mine)
        n_skipped = sum(s["split"] == split for s in skipped)
        if records + n_skipped != images:  # every image counted in or out
            raise RecordsError(
                f"{split}: {records} records + {n_skipped} skipped != {images} images"
            )
        splits[split] = {
            "images": images,
            "records": records,
            "skipped": n_skipped,
            "shards": len(mine),
            "bytes": sum(i["bytes"] for i in mine),
        }
    totals = {
        k: sum(s[k] for s in splits.values())
        for k in ("images", "records", "skipped", "shards", "bytes")
    }
    seconds = run["seconds"]
    return {
        "complete": True,
        "variant": settings.variant,
        "format": settings.image_format,
        "size": settings.size if settings.variant == "compact" else None,
        "resample": RESAMPLE if settings.variant == "compact" else None,
        "schema_version": SCHEMA_VERSION,
        "settings": {**settings.to_dict(), "skip_bad": run["skip_bad"]},
        "key": key,
        "source": {
            "data_dir": str(Path(df.attrs["csv"]).parent),
            "csv": Path(df.attrs["csv"]).name,
            "fingerprint": fingerprint,
            "images": len(df),
        },
        "splits": splits,
        "totals": totals,
        "shards": [
            {k: i[k] for k in ("file", "split", "index", "records", "bytes", "sha256")}
            for i in infos
        ],
        "skipped": skipped,
        "schema": SCHEMA,
        "conversion": {
            "seconds": round(seconds, 3),
            "workers": run["workers"],
            "images_per_second": round(totals["records"] / seconds, 2) if seconds > 0 else None,
            "shards_written": sum(not i["reused"] for i in infos),
            "shards_reused": sum(bool(i["reused"]) for i in infos),
            # CPU time of the workers on written shards: against workers x seconds it shows
            # how much of the cores the conversion got (other load on the machine shows here).
            "worker_cpu_seconds": round(sum(i.get("cpu_seconds", 0.0) for i in infos), 3),
        },
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": {**versions(), "chexlib": __version__},
    }


# --- reading ----------------------------------------------------------------------


def read_manifest(records_dir) -> dict:
    """The ``manifest.json`` of a finished conversion.

    Raises:
        FileNotFoundError: no manifest (not a conversion, or not finished yet).
    """
    from chexlib.results import read_json

    path = Path(records_dir) / MANIFEST
    if not path.is_file():
        hint = (
            (
                " (a conversion was started here but has not finished: rerun the same "
                "`chexlib convert` command to resume it)"
            )
            if (Path(records_dir) / STATE_DIR).is_dir()
            else ""
        )
        raise FileNotFoundError(
            f"{records_dir}: no {MANIFEST}; not a finished chexlib conversion{hint}"
        )
    return read_json(path)


def list_shards(records_dir, split: str) -> list[str]:
    """Sorted shard paths of ``split`` from the manifest.

    Raises:
        FileNotFoundError: no manifest.
        RecordsError: the set is incomplete, the split has no shards, or a
            listed shard file is missing.
    """
    records_dir = Path(records_dir)
    manifest = read_manifest(records_dir)
    if not manifest.get("complete"):
        raise RecordsError(f"{records_dir}: the manifest says the shard set is incomplete")
    if split not in manifest.get("splits", {}):
        raise RecordsError(
            f"{records_dir}: unknown split {split!r}; have {sorted(manifest.get('splits', {}))}"
        )
    files = sorted(str(records_dir / s["file"]) for s in manifest["shards"] if s["split"] == split)
    if not files:
        totals = manifest["splits"][split]
        raise RecordsError(
            f"{records_dir}: no shards for split {split!r} "
            f"({totals['images']} images listed, {totals['skipped']} skipped)"
        )
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise RecordsError(
            f"{records_dir}: {len(missing)} shard(s) of the manifest are missing: {missing[:5]}"
        )
    return files


# --- verification -----------------------------------------------------------------


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_records`: every difference found, as a sentence."""

    records_dir: str
    splits: dict = field(default_factory=dict)  # split -> {"expected", "records"}
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.differences

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _expected_records(df, manifest: dict) -> dict:
    """image -> (split, labels, patient_id) for every image not skipped by the conversion."""
    skipped = {e["image"] for e in manifest.get("skipped", [])}
    labels = df[list(LABELS)].to_numpy(dtype=np.int64)
    return {
        image: (split, tuple(labels[r].tolist()), int(pid))
        for r, (image, split, pid) in enumerate(
            zip(df["image"], df["split"], df["patient_id"], strict=True)
        )
        if image not in skipped
    }


def _check_record(
    ex: dict, shard: dict, manifest: dict, expected: dict, seen: dict, decode: bool
) -> list[str]:
    name = ex["image/filename"].decode()
    where = f"{shard['file']}: {name}"
    if name not in expected:
        skipped = any(e["image"] == name for e in manifest.get("skipped", []))
        return [
            f"{where}: "
            + ("listed as skipped but has a record" if skipped else "not in the metadata")
        ]
    if name in seen:
        return [f"{where}: duplicate (also in {seen[name]})"]
    seen[name] = shard["file"]
    split, labels, patient_id = expected[name]
    problems = []
    if split != shard["split"]:
        problems.append(f"in a {shard['split']} shard but the metadata puts it in {split}")
    got = tuple(int(v) for v in ex["image/label"])
    if got != labels:
        problems.append(f"labels {got} != metadata {labels}")
    if int(ex["image/patient_id"]) != patient_id:
        problems.append(f"patient_id {int(ex['image/patient_id'])} != metadata {patient_id}")
    fmt, h, w = ex["image/format"].decode(), int(ex["image/height"]), int(ex["image/width"])
    if fmt != manifest["format"]:
        problems.append(f"format {fmt!r} != manifest {manifest['format']!r}")
    if manifest.get("size") and (h, w) != (manifest["size"], manifest["size"]):
        problems.append(f"stored {h}x{w}, manifest size {manifest['size']}")
    if fmt == "raw" and len(ex["image/encoded"]) != h * w:
        problems.append(f"{len(ex['image/encoded'])} raw bytes for {h}x{w}")
    if decode and fmt in ("png", "jpeg"):
        problems += _decode_problems(ex["image/encoded"], fmt, h, w)
    return [f"{where}: {p}" for p in problems]


def _decode_problems(encoded: bytes, fmt: str, h: int, w: int) -> list[str]:
    import tensorflow as tf

    try:
        image = (
            tf.io.decode_png(encoded, channels=1)
            if fmt == "png"
            else tf.io.decode_jpeg(encoded, channels=1)
        )
    except tf.errors.OpError as err:
        return [f"does not decode ({err.message.splitlines()[0]})"]
    return (
        []
        if tuple(image.shape) == (h, w, 1)
        else [f"decodes to {tuple(image.shape)}, record says {h}x{w}"]
    )


def _verify_shard(
    path: Path, shard: dict, manifest: dict, expected: dict, seen: dict, decode: bool
) -> list[str]:
    import tensorflow as tf

    if not path.is_file():
        return [f"{shard['file']}: missing"]
    problems = []
    sha = _sha256_file(path)
    if sha != shard["sha256"]:
        problems.append(
            f"{shard['file']}: sha256 {sha[:16]}... != manifest {shard['sha256'][:16]}... "
            "(the file changed after conversion)"
        )
    n = 0
    try:
        for ex in tf.data.TFRecordDataset(str(path)).map(parse_example).as_numpy_iterator():
            n += 1
            problems += _check_record(ex, shard, manifest, expected, seen, decode)
    except tf.errors.OpError as err:
        problems.append(
            f"{shard['file']}: unreadable after {n} records ({err.message.splitlines()[0]})"
        )
    if n != shard["records"]:
        problems.append(f"{shard['file']}: {n} records read, manifest says {shard['records']}")
    return problems


def verify_records(
    records_dir, data_dir, decode: bool = False, progress: bool = True
) -> VerifyReport:
    """Read every record back and compare with the metadata and the manifest.

    Checks each shard's sha256 and record count against the manifest, and each
    record's file name, split, labels, patient id, format and size against the
    metadata (loaded with the conversion's val_fraction and seed); then that
    every image of the metadata is in exactly one record or listed as skipped.

    Args:
        records_dir: output folder of :func:`convert`.
        data_dir: the dataset that was converted.
        decode: also decode every PNG/JPEG image (slow for the png variant).
        progress: show a progress bar over shards.
    """
    from tqdm.auto import tqdm

    out = Path(records_dir)
    manifest = read_manifest(out)
    settings = manifest["settings"]
    df = load_metadata(
        data_dir, val_fraction=settings["val_fraction"], seed=settings["seed"], allow_missing=True
    )
    report = VerifyReport(str(out))
    if dataset_fingerprint(df) != manifest["source"]["fingerprint"]:
        report.notes.append(
            "the dataset's fingerprint (CSV, lists, file sizes and times) differs from the "
            "converted one; records are checked against the metadata as it is now"
        )
    expected, seen = _expected_records(df, manifest), {}
    listed = {s["file"] for s in manifest["shards"]}
    report.differences += [
        f"{p.name}: shard file not in the manifest"
        for p in sorted(out.glob("*.tfrecord"))
        if p.name not in listed
    ]
    for shard in tqdm(manifest["shards"], unit="shard", desc="verify", disable=not progress):
        report.differences += _verify_shard(
            out / shard["file"], shard, manifest, expected, seen, decode
        )
    report.differences += [
        f"{image} ({split}): in the metadata but in no record and not listed as skipped"
        for image, (split, _, _) in expected.items()
        if image not in seen
    ]
    for split in SPLITS:
        want = sum(1 for s, _, _ in expected.values() if s == split)
        got = sum(1 for image in seen if expected[image][0] == split)
        report.splits[split] = {
            "expected": want,
            "records": got,
            "manifest": manifest["splits"].get(split, {}).get("records"),
        }
        if manifest["splits"].get(split, {}).get("records") != want:
            report.differences.append(
                f"{split}: manifest counts {manifest['splits'][split]['records']} records, "
                f"the metadata expects {want}"
            )
    return report


# --- command line -----------------------------------------------------------------


def add_convert_arguments(parser) -> None:
    parser.add_argument("data_dir", help="dataset folder in the NIH ChestX-ray14 layout")
    parser.add_argument(
        "out_dir", help="output folder (new, or an interrupted run of the same command)"
    )
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default="png",
        help="png: original file bytes; compact: decoded and resized once (default png)",
    )
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--images-per-shard", type=int, default=256, help="most records per shard (default 256)"
    )
    how.add_argument(
        "--shards", type=int, default=None, help="shards per split instead of --images-per-shard"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="processes writing shards (default: all cores)"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=MODEL_INPUT_SIZE,
        help=f"compact: stored width and height (default {MODEL_INPUT_SIZE}, the training input: read without a resize)",
    )
    parser.add_argument(
        "--compact-format",
        choices=COMPACT_FORMATS,
        default=DEFAULT_COMPACT_FORMAT,
        help=f"compact: raw uint8 or JPEG (default {DEFAULT_COMPACT_FORMAT})",
    )
    parser.add_argument(
        "--jpeg-quality", type=int, default=95, help="compact JPEG quality (default 95)"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out missing/corrupt images (listed in the manifest) instead of stopping",
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="validation fraction (default 0.1)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the validation split (default 0)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete TFRecords of a different conversion found in OUT_DIR",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_convert(args) -> int:
    """``chexlib convert DATA_DIR OUT_DIR``: convert (or resume) and print the totals."""
    try:
        manifest = convert(
            args.data_dir,
            args.out_dir,
            variant=args.variant,
            images_per_shard=args.images_per_shard,
            shards=args.shards,
            workers=args.workers,
            size=args.size,
            skip_bad=args.skip_bad,
            val_fraction=args.val_fraction,
            seed=args.seed,
            progress=not args.no_progress,
            compact_format=args.compact_format,
            jpeg_quality=args.jpeg_quality,
            overwrite=args.overwrite,
        )
    except (DataError, ValueError, BrokenExecutor) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permission denied, OUT_DIR is a file ...
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    print(f"{args.out_dir}: {manifest['variant']} records (image/format {manifest['format']!r})")
    for split, t in manifest["splits"].items():
        print(
            f"  {split:<5} {t['records']:>7} records in {t['shards']:>4} shards, "
            f"{t['bytes'] / 2**20:9.1f} MiB, {t['skipped']} skipped"
        )
    for entry in manifest["skipped"]:
        print(f"  skipped {entry['image']} ({entry['split']}): {entry['reason']}")
    c = manifest["conversion"]
    print(
        f"  {c['seconds']:.1f} s with {c['workers']} worker(s), {c['images_per_second']} images/s; "
        f"{c['shards_written']} shards written, {c['shards_reused']} reused"
    )
    return 0


def add_verify_records_arguments(parser) -> None:
    parser.add_argument("out_dir", help="output folder of chexlib convert")
    parser.add_argument("--data", required=True, help="the dataset folder that was converted")
    parser.add_argument(
        "--decode", action="store_true", help="also decode every PNG/JPEG image (slow)"
    )
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_verify_records(args) -> int:
    """``chexlib verify-records OUT_DIR --data DATA_DIR``: exit 0 only when nothing differs."""
    try:
        report = verify_records(
            args.out_dir, args.data, decode=args.decode, progress=not args.no_progress
        )
    except (OSError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, t in report.splits.items():
        print(f"  {split:<5} {t['records']:>7} records read, {t['expected']:>7} expected")
    for note in report.notes:
        print(f"note: {note}")
    shown = report.differences[:200]
    for line in shown:
        print(f"  DIFF {line}")
    if len(report.differences) > len(shown):
        print(f"  ... {len(report.differences) - len(shown)} more differences")
    if args.json:
        from chexlib.results import write_json

        write_json(args.json, report.to_dict())
    print("PASSED" if report.passed else f"FAILED: {len(report.differences)} difference(s)")
    return 0 if report.passed else 1

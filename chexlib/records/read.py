"""TFRecords of ChestX-ray14, the reading side: parse, list and verify converted records.

Two variants share one record schema (:data:`SCHEMA`, compatible with the
poster's records):

``png``
    ``image/encoded`` holds the original PNG file bytes, as the poster did.
    Every training read still decodes a 1024 x 1024 PNG; what the records save
    is file-system work (one large sequential file instead of thousands of
    small ones), which the poster measured at +8 % to +13 % throughput.
``compact``
    Each image is decoded once (:func:`chexlib.data.png.decode_grayscale`: RGB,
    RGBA and 16-bit sources all become one 8-bit channel), resized once to
    ``size`` x ``size`` with PIL's Lanczos filter (``reducing_gap=2.0``: a
    2x box reduction first, then Lanczos), and stored as raw ``uint8`` rows
    (``image/format`` b"raw"; JPEG at quality 95 is the alternative,
    ``compact_format="jpeg"``). Conversion costs more and the records no
    longer hold the original pixels, but a training read is a memcpy instead of
    a full-size PNG decode and resize.

The records modules, in the order the data flows:

- :mod:`chexlib.records.schema`: one record: :data:`SCHEMA` and its bytes,
  written without TensorFlow.
- :mod:`chexlib.records.shards`: the settings of a conversion and the worker
  process that writes one shard.
- :mod:`chexlib.records.manifest`: the finished set's ``manifest.json``, read
  in one place.
- :mod:`chexlib.records.convert`: :func:`convert`, the parallel, resumable
  driver, its manifest and ``chexlib convert`` (folder layout in its docstring).
- this module: the TensorFlow side (:func:`feature_spec`, :func:`parse_example`),
  :func:`list_shards` for the input pipelines, and
  :func:`verify_records` behind ``chexlib verify-records``.

"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from chexlib.core.files import write_json
from chexlib.core.flags import add_flags, config_from_args, option
from chexlib.data.fingerprint import metadata_fingerprint
from chexlib.data.metadata import LABELS, SPLITS, load_metadata
from chexlib.data.png import decode_grayscale
from chexlib.records.manifest import read_manifest
from chexlib.records.shards import (
    ConvertSettings,
    RecordsError,
    encode_image,
    sha256_file,
)

# --- the schema on the TensorFlow side -----------------------------------------


@functools.cache
def feature_spec() -> dict:
    """The ``tf.io`` feature spec of :data:`SCHEMA`."""
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


def parse_example(serialized):
    """Parse one serialized record with :func:`feature_spec` (usable inside ``tf.data`` map)."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, feature_spec())


# --- reading ----------------------------------------------------------------------


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


def _content_checker(manifest: dict, df) -> Callable[[str, bytes], list[str]]:
    """What compares a record's stored image with its source file as it is now.

    png variant: the stored bytes must be the file's bytes. compact: the source is
    resized again as the conversion did (:func:`chexlib.records.shards.encode_image`) and
    the pixels compared: raw rows may differ by 2 grey levels at most, JPEG by 1 on
    average (another PIL may round differently; another image differs by tens).
    """
    paths = dict(zip(df["image"], df["path"], strict=True))
    fmt = manifest["format"]
    compact = None
    if fmt != "png":
        quality = (manifest.get("settings") or {}).get("jpeg_quality") or 95
        compact = ConvertSettings(
            variant="compact", size=manifest["size"], compact_format=fmt, jpeg_quality=quality
        )

    def check(name: str, stored: bytes) -> list[str]:
        path = paths.get(name)
        if not isinstance(path, str):
            return ["its source file is missing now: nothing to compare it with"]
        try:
            if compact is None:
                same = Path(path).read_bytes() == stored
            else:
                same = _same_pixels(encode_image(path, compact)[0], stored, fmt)
        except OSError as err:  # BadImage names the file and the reason
            return [f"its source cannot be compared: {err}"]
        if same:
            return []
        return [
            f"stored image differs from its source file {path} (replaced after the "
            "conversion? rerun chexlib convert)"
        ]

    return check


def _same_pixels(expected: bytes, stored: bytes, fmt: str) -> bool:
    """Whether two compact images (raw rows or JPEG) hold the same picture (see above)."""

    def pixels(data: bytes) -> np.ndarray:
        if fmt == "raw":
            return np.frombuffer(data, np.uint8).astype(np.int16)
        return decode_grayscale(data).astype(np.int16).ravel()

    a, b = pixels(expected), pixels(stored)
    if a.shape != b.shape:
        return False
    diff = np.abs(a - b)
    return bool(diff.max(initial=0) <= 2) if fmt == "raw" else bool(diff.mean() <= 1.0)


def _check_record(
    ex: dict,
    shard: dict,
    manifest: dict,
    expected: dict,
    seen: dict,
    decode: bool,
    content: Callable[[str, bytes], list[str]] | None = None,
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
    if content is not None:
        problems += content(name, ex["image/encoded"])
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
    path: Path,
    shard: dict,
    manifest: dict,
    expected: dict,
    seen: dict,
    decode: bool,
    content: Callable[[str, bytes], list[str]] | None = None,
) -> list[str]:
    import tensorflow as tf

    if not path.is_file():
        return [f"{shard['file']}: missing"]
    problems = []
    sha = sha256_file(path)
    if sha != shard["sha256"]:
        problems.append(
            f"{shard['file']}: sha256 {sha[:16]}... != manifest {shard['sha256'][:16]}... "
            "(the file changed after conversion)"
        )
    n = 0
    try:
        for ex in tf.data.TFRecordDataset(str(path)).map(parse_example).as_numpy_iterator():
            n += 1
            problems += _check_record(ex, shard, manifest, expected, seen, decode, content)
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
    When the dataset's fingerprint differs from the converted one (a file
    replaced, touched or removed), or with ``decode``, each record's image is
    also compared with its source file (:func:`_content_checker`): a replaced
    image is a difference naming it, not only a note.

    Args:
        records_dir: output folder of :func:`convert`.
        data_dir: the dataset that was converted.
        decode: also decode every PNG/JPEG image and compare every image with its
            source file (slow: reads the dataset again).
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
    changed = metadata_fingerprint(df) != manifest["source"]["fingerprint"]
    if changed:
        report.notes.append(
            "the dataset's fingerprint (CSV, lists, file sizes and times) differs from the "
            "converted one; records are checked against the metadata as it is now, and "
            "every record's image against its source file"
        )
    content = _content_checker(manifest, df) if changed or decode else None
    expected, seen = _expected_records(df, manifest), {}
    listed = {s["file"] for s in manifest["shards"]}
    report.differences += [
        f"{p.name}: shard file not in the manifest"
        for p in sorted(out.glob("*.tfrecord"))
        if p.name not in listed
    ]
    for shard in tqdm(manifest["shards"], unit="shard", desc="verify", disable=not progress):
        report.differences += _verify_shard(
            out / shard["file"], shard, manifest, expected, seen, decode, content
        )
    report.differences += [
        f"{image} ({split}): in the metadata but in no record and not listed as skipped"
        for image, (split, _, _) in expected.items()
        if image not in seen
    ]
    _count_splits(report, manifest, expected, seen)
    return report


def _count_splits(report: VerifyReport, manifest: dict, expected: dict, seen: dict) -> None:
    """Per split: records expected, read and counted by the manifest (a difference if unequal)."""
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


# --- command line (``chexlib convert``'s is in chexlib.records.convert) ------------


@dataclass(frozen=True)
class VerifyRecordsCommand:
    """One ``chexlib verify-records`` call: ``out_dir`` is its positional argument, the rest flags."""

    out_dir: str = option("output folder of chexlib convert", positional=True)
    data: str = option("the dataset folder that was converted")
    decode: bool = option(
        "also decode every PNG/JPEG image and compare each image with its source file (slow)",
        default=False,
    )
    json: str | None = option("also write the report as JSON here", default=None)
    progress: bool = option("hide the progress bar", default=True)  # the switch is --no-progress


def add_arguments(parser) -> None:
    """``OUT_DIR`` positional, then one flag per other :class:`VerifyRecordsCommand` field."""
    add_flags(parser, VerifyRecordsCommand)


def run(args) -> int:
    """``chexlib verify-records OUT_DIR --data DATA_DIR``: exit 0 only when nothing differs."""
    config = config_from_args(VerifyRecordsCommand, args)
    report = verify_records(
        config.out_dir, config.data, decode=config.decode, progress=config.progress
    )
    for split, t in report.splits.items():
        print(f"  {split:<5} {t['records']:>7} records read, {t['expected']:>7} expected")
    for note in report.notes:
        print(f"note: {note}")
    shown = report.differences[:200]
    for line in shown:
        print(f"  DIFF {line}")
    if len(report.differences) > len(shown):
        print(f"  ... {len(report.differences) - len(shown)} more differences")
    if config.json:
        write_json(config.json, report.to_dict())
    print("PASSED" if report.passed else f"FAILED: {len(report.differences)} difference(s)")
    return 0 if report.passed else 1

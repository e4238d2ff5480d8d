"""NIH ChestX-ray14 metadata: labels, official splits, a patient-wise validation split.

The layout read here is the one the NIH download unpacks to::

    DATA_DIR/
      Data_Entry_2017.csv          (or Data_Entry_2017_v2020.csv)
      train_val_list.txt           official train+validation image names
      test_list.txt                official test image names
      images/*.png                 either one folder of images ...
      images_001/images/*.png      ... or the twelve archive folders
      ...
      images_012/images/*.png

``chexlib synth`` writes the same layout, so real and generated data go
through the same code. Every image is either in the returned table or
rejected with an error that names the file or CSV row; nothing is dropped
silently.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from chexlib.core.flags import add_flags, config_from_args, option
from chexlib.data.png import BadImage, read_png

# The 14 findings in the order of the CheXNet paper, spelled as in the NIH CSV.
LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
SPLITS = ("train", "val", "test")
# CheXNet's model input side (224 x 224): the default of training, the pipelines and
# compact records alike, so records written with defaults are read without a resize.
MODEL_INPUT_SIZE = 224
# Columns of the NIH CSV that chexlib reads (the others are carried along untouched).
_REQUIRED = ("Image Index", "Finding Labels", "Patient ID")


class DataError(ValueError):
    """The dataset on disk does not match the NIH layout; the message says where."""


def find_csv(data_dir: str | Path) -> Path:
    """Return the metadata CSV of ``data_dir`` (the 2017 file, else the v2020 one)."""
    data_dir = Path(data_dir)
    for name in CSV_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(f"{data_dir}: no {' or '.join(CSV_NAMES)} found")


def _scan_images(data_dir: str | Path) -> tuple[dict[str, Path], dict[str, str]]:
    """(name -> path of each image file, name -> why a ``*.png`` entry is not a file)."""
    data_dir = Path(data_dir).resolve()
    folders = [data_dir / "images"] + sorted(data_dir.glob("images_*/images"))
    found: dict[str, Path] = {}
    odd: dict[str, str] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:  # scandir: fast on 112k files
            for entry in entries:
                if not entry.name.lower().endswith(".png"):
                    continue
                if not entry.is_file():  # no stat unless it is a symlink
                    odd[entry.name] = _not_a_file(Path(entry.path))
                    continue
                if entry.name in found:
                    raise DataError(
                        f"duplicate image {entry.name}: in {found[entry.name].parent} "
                        f"and in {folder}"
                    )
                found[entry.name] = folder / entry.name
    return found, odd


def _not_a_file(path: Path) -> str:
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"missing file (dangling symlink {path} -> {target})"
    return f"missing file ({path} is not a regular file)"


def parse_findings(text: str, where: str) -> list[int]:
    """Turn ``"Effusion|Mass"`` or ``"No Finding"`` into 14 0/1 ints."""
    names = [t.strip() for t in text.split("|") if t.strip()]
    if not names:
        raise DataError(f"{where}: empty 'Finding Labels'")
    if names == [NO_FINDING]:
        return [0] * len(LABELS)
    unknown = [n for n in names if n not in LABELS]
    if unknown:
        hint = " ('No Finding' cannot be combined with findings)" if NO_FINDING in unknown else ""
        raise DataError(f"{where}: unknown label(s) {unknown}{hint}; known: {', '.join(LABELS)}")
    return [int(label in names) for label in LABELS]


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file (a byte-order mark is dropped).

    Raises:
        DataError: the file cannot be read, or is not UTF-8 (e.g. latin-1);
            the message names the file and the physical line.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path} line {line}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None


def _records(csv_path: Path):
    """Yield (physical line where the record starts, fields) for each CSV record."""
    reader = csv.reader(io.StringIO(read_text(csv_path), newline=""))
    start = 1
    try:
        for row in reader:
            yield start, row
            start = reader.line_num + 1  # a quoted field may span several lines
    except csv.Error as err:
        raise DataError(f"{csv_path} line {start}: malformed CSV ({err})") from None


def read_entries(csv_path: str | Path) -> pd.DataFrame:
    """Read the NIH CSV into one row per image with the 14 label columns.

    Raises:
        DataError: a bad encoding, a missing column, a malformed row or a
            duplicate image, naming the CSV's physical line.
    """
    csv_path = Path(csv_path)
    records = _records(csv_path)
    try:
        _, header = next(records)
    except StopIteration:
        raise DataError(f"{csv_path}: empty file") from None
    header = [h.strip() for h in header]
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing}; header is {header}")
    col = {name: header.index(name) for name in header if name}
    rows, seen = [], {}
    for line_no, row in records:
        if not any(cell.strip() for cell in row):
            continue  # blank line
        where = f"{csv_path.name} line {line_no}"
        if len(row) < len(col):
            raise DataError(f"{where}: expected {len(header)} fields, got {len(row)}: {row}")
        image = row[col["Image Index"]].strip()
        if not image:
            raise DataError(f"{where}: empty 'Image Index'")
        if image in seen:
            raise DataError(f"{where}: duplicate image {image} (first on line {seen[image]})")
        seen[image] = line_no
        try:
            patient = int(row[col["Patient ID"]])
        except ValueError:
            raise DataError(
                f"{where} ({image}): 'Patient ID' is not an integer: {row[col['Patient ID']]!r}"
            ) from None
        labels = parse_findings(row[col["Finding Labels"]], f"{where} ({image})")
        rows.append(_entry(image, patient, labels, row, col, f"{where} ({image})"))
    if not rows:
        raise DataError(f"{csv_path}: no image rows")
    return pd.DataFrame(rows)


def _entry(
    image: str, patient: int, labels: list[int], row: list[str], col: dict, where: str
) -> dict:
    def opt(name: str) -> str | None:
        return row[col[name]].strip() if name in col else None

    entry = {"image": image, "patient_id": patient}
    follow_up = opt("Follow-up #")
    if follow_up and not follow_up.isdigit():
        raise DataError(f"{where}: 'Follow-up #' is not an integer: {follow_up!r}")
    entry["follow_up"] = int(follow_up) if follow_up else None
    entry["age"] = parse_age(opt("Patient Age"), where)
    entry["gender"] = opt("Patient Gender")
    entry["view"] = opt("View Position")
    entry.update(zip(LABELS, labels, strict=True))
    return entry


# The first NIH release wrote ages with a unit: "058Y" years, "058M" months, "030D" days.
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([YMD]?)", re.IGNORECASE)
_YEARS_PER_UNIT = {"": 1.0, "Y": 1.0, "M": 1 / 12, "D": 1 / 365.25}


def parse_age(text: str | None, where: str = "") -> float | None:
    """Age in years from ``"58"``, ``"058Y"``, ``"058M"`` (months) or ``"030D"`` (days).

    An empty field is None (unknown). Implausible numbers (NIH has a few
    ages over 100) are kept as written; only text that is not an age is refused.

    Raises:
        DataError: the text is not a number with an optional Y/M/D unit.
    """
    if text is None or text == "":
        return None
    match = _AGE.fullmatch(text.strip())
    if not match:
        raise DataError(
            f"{where}: 'Patient Age' is not an age: {text!r} "
            "(expected a number of years, or e.g. 058Y, 058M, 030D)"
        )
    return float(match.group(1)) * _YEARS_PER_UNIT[match.group(2).upper()]


def read_list(path: str | Path) -> list[str]:
    """Read a split list (one image name per line), rejecting duplicates."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split list not found")
    names = [ln.strip() for ln in read_text(path).splitlines() if ln.strip()]
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        raise DataError(f"{path}: image(s) listed twice: {_few(dupes)}")
    return names


def assign_splits(
    entries: pd.DataFrame,
    train_val: list[str],
    test: list[str],
    val_fraction: float = 0.1,
    seed: int = 0,
    where: str = "",
    require_train: bool = True,
) -> pd.Series:
    """Return the split (train/val/test) of every entry.

    Test is the official list. Validation takes whole patients from
    train_val, in a seeded random order, until it holds ``val_fraction`` of
    the train_val images, so no patient is in two of train/val and the same
    arguments always give the same split. A split that leaves no training image
    is refused (``DataError``) unless ``require_train`` is False.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tv, te = set(train_val), set(test)
    both = tv & te
    if both:
        raise DataError(f"{where}{TRAIN_VAL_LIST} and {TEST_LIST} overlap: {_few(sorted(both))}")
    known = set(entries["image"])
    for list_name, names in ((TRAIN_VAL_LIST, train_val), (TEST_LIST, test)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DataError(f"{where}{list_name} names image(s) not in the CSV: {_few(unknown)}")
    unlisted = [n for n in entries["image"] if n not in tv and n not in te]
    if unlisted:
        raise DataError(
            f"{where}image(s) in the CSV but in neither {TRAIN_VAL_LIST} nor {TEST_LIST}: "
            f"{_few(unlisted)}"
        )
    _refuse_patients_in_both(entries, te, where)

    split = pd.Series(np.where(entries["image"].isin(te), "test", "train"), index=entries.index)
    in_tv = split == "train"
    counts = entries.loc[in_tv].groupby("patient_id").size().sort_index()
    order = np.random.default_rng(seed).permutation(counts.index.to_numpy())
    target = val_fraction * int(in_tv.sum())
    cumulative = counts.loc[order].cumsum().to_numpy()
    n_val = int(np.searchsorted(cumulative, target)) + 1 if target > 0 else 0
    val_patients = set(order[:n_val].tolist())
    split[in_tv & entries["patient_id"].isin(val_patients)] = "val"
    if require_train:
        _refuse_empty_train(split, len(counts), val_fraction, seed, where)
    return split


def _refuse_empty_train(
    split: pd.Series, patients: int, val_fraction: float, seed: int, where: str
) -> None:
    """No training without training images: the train split must keep at least one."""
    counts = {name: int((split == name).sum()) for name in SPLITS}
    if counts["train"]:
        return
    shown = ", ".join(f"{name} {n}" for name, n in counts.items())
    if counts["val"] == 0:
        why = f"{TRAIN_VAL_LIST} lists no image"
    else:
        why = (
            f"the patient-wise validation split (val_fraction {val_fraction}, seed {seed}) "
            f"moved all {counts['val']} train_val image(s), of {patients} patient(s), to val; "
            "lower val_fraction or add patients"
        )
    raise DataError(f"{where}the train split is empty (images: {shown}): {why}")


def _refuse_patients_in_both(entries: pd.DataFrame, test: set[str], where: str) -> None:
    """The official lists split by patient: one patient on both sides would leak into test."""
    in_test = entries["image"].isin(test)
    both = sorted(
        set(entries.loc[in_test, "patient_id"]) & set(entries.loc[~in_test, "patient_id"])
    )
    if not both:
        return
    shown = []
    for pid in both[:10]:
        mine = entries[entries["patient_id"] == pid]
        tv_image = mine.loc[~in_test[mine.index], "image"].iat[0]
        test_image = mine.loc[in_test[mine.index], "image"].iat[0]
        shown.append(f"patient {pid} ({tv_image} in {TRAIN_VAL_LIST}, {test_image} in {TEST_LIST})")
    more = f" ... ({len(both)} patients in all)" if len(both) > 10 else ""
    raise DataError(
        f"{where}patient(s) in both {TRAIN_VAL_LIST} and {TEST_LIST} (all images of a patient "
        f"must be on one side, or test results leak): {'; '.join(shown)}{more}"
    )


def load_metadata(
    data_dir: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    csv_name: str | None = None,
    allow_missing: bool = False,
    require_train: bool = True,
) -> pd.DataFrame:
    """Load ChestX-ray14 metadata: one row per image with labels, paths and split.

    Args:
        data_dir: folder in the NIH layout (see the module docstring).
        val_fraction: fraction of train_val images moved to validation, by patient.
        seed: seed of the patient-wise validation split.
        csv_name: metadata file to read; default Data_Entry_2017.csv, else the v2020 one.
        allow_missing: if False, an image listed in the CSV but absent on disk
            is an error. If True it is counted out: its ``path`` is None and
            ``df.attrs["excluded"]`` lists it with the reason.
        require_train: refuse a split that leaves no training image (False: the
            caller only reads the files, as ``chexlib validate`` does).

    Returns:
        DataFrame with columns ``image``, ``path``, ``patient_id``,
        ``follow_up``, ``age``, ``gender``, ``view``, the 14 ``LABELS`` (0/1
        int) and ``split`` (train/val/test), in CSV order.

    Raises:
        DataError: a file that is not UTF-8, unknown label, malformed row or
            age, duplicate image, missing image (a dangling symlink counts as
            missing), or split lists that overlap, name unknown images or put
            one patient on both sides; the message names the file and its
            physical line where there is one.
    """
    data_dir = Path(data_dir).resolve()
    csv_path = data_dir / csv_name if csv_name else find_csv(data_dir)
    entries = read_entries(csv_path)
    entries["split"] = assign_splits(
        entries,
        read_list(data_dir / TRAIN_VAL_LIST),
        read_list(data_dir / TEST_LIST),
        val_fraction=val_fraction,
        seed=seed,
        where=f"{data_dir}: ",
        require_train=require_train,
    )
    on_disk, odd = _scan_images(data_dir)
    entries.insert(1, "path", [str(on_disk[n]) if n in on_disk else None for n in entries["image"]])
    missing = entries.loc[entries["path"].isna(), "image"].tolist()
    if missing and not allow_missing:
        reasons = [f"{n}: {odd[n]}" for n in missing if n in odd]
        raise DataError(
            f"{data_dir}: {len(missing)} image(s) listed in {csv_path.name} are not in images/ "
            f"or images_*/images/: {_few(missing)}" + "".join(f"\n  {r}" for r in reasons[:10])
        )
    entries.attrs["excluded"] = [
        {"image": n, "reason": odd.get(n, "missing file")} for n in missing
    ]
    entries.attrs["csv"] = str(csv_path)
    entries[list(LABELS)] = entries[list(LABELS)].astype("int64")
    return entries


def split_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Images, patients and label prevalence per split (a table for notebooks)."""
    rows = []
    for split in SPLITS:
        part = df[df["split"] == split]
        row = {"split": split, "images": len(part), "patients": part["patient_id"].nunique()}
        row.update({label: float(part[label].mean()) if len(part) else 0.0 for label in LABELS})
        rows.append(row)
    return pd.DataFrame(rows).set_index("split")


def _few(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


# --- validation of the files themselves --------------------------------------


@dataclass
class ValidationReport:
    """Outcome of :func:`validate_images`: every image counted once."""

    ok: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    # (image, reason): truncated, wrong format, decompression bomb, unreadable ...
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    layouts: Counter = field(default_factory=Counter)  # stored layout -> count, e.g. "RGBA"
    why_missing: dict[str, str] = field(default_factory=dict)  # image -> reason

    @property
    def passed(self) -> bool:
        return not self.missing and not self.corrupt

    def to_dict(self) -> dict:
        return {
            "ok": len(self.ok),
            "missing": sorted(self.missing),
            "missing_reasons": {i: self.why_missing.get(i, "missing file") for i in self.missing},
            "corrupt": [{"image": i, "reason": r} for i, r in sorted(self.corrupt)],
            "layouts": dict(self.layouts),
            "passed": self.passed,
        }


def _check_one(path: str) -> tuple[str, str | None, bool]:
    """Check one file as training decodes it; return (layout, error, missing)."""

    try:
        return read_png(path)[1], None, False
    except BadImage as err:
        reason = str(err).removeprefix(f"{path}: ")
        gone = isinstance(err.__cause__, FileNotFoundError)  # vanished, or a dangling link
        return ("missing" if gone else "unreadable"), reason, gone


def validate_images(
    df: pd.DataFrame, workers: int | None = None, progress: bool = True
) -> ValidationReport:
    """Check that every image of ``df`` exists and decodes as training will decode it.

    Each file is checked by :func:`chexlib.data.png.read_png`: PNG signature
    (a JPEG, GIF, TIFF or BMP named ``.png`` is a wrong format), header (a
    decompression bomb is refused before decoding), then a full decode.
    """
    from tqdm.auto import tqdm

    report = ValidationReport()
    present = df[df["path"].notna()]
    report.missing = df.loc[df["path"].isna(), "image"].tolist()
    report.why_missing = {e["image"]: e["reason"] for e in df.attrs.get("excluded", [])}
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_check_one, present["path"], chunksize=16)
        bar = tqdm(results, total=len(present), desc="validate", unit="img", disable=not progress)
        for image, (layout, error, gone) in zip(present["image"], bar, strict=True):
            if gone:
                report.missing.append(image)
                report.why_missing[image] = "missing file (gone since the folder was listed)"
                continue
            report.layouts[layout] += 1
            if error:
                report.corrupt.append((image, error))
            else:
                report.ok.append(image)
    return report


@dataclass(frozen=True)
class ValidateCommand:
    """One ``chexlib validate`` call: ``data_dir`` is its positional argument, the rest flags."""

    data_dir: str = option("dataset folder in the NIH ChestX-ray14 layout", positional=True)
    workers: int | None = option("decode processes; None: all cores", default=None)
    json: str | None = option("also write the report as JSON here", default=None)


def add_arguments(parser) -> None:
    """``DATA_DIR`` positional, then one flag per other :class:`ValidateCommand` field."""
    add_flags(parser, ValidateCommand)


def run(args) -> int:
    """``chexlib validate DATA_DIR``: exit 0 only when every image is present and decodes."""
    config = config_from_args(ValidateCommand, args)
    import json

    df = load_metadata(config.data_dir, allow_missing=True, require_train=False)  # files only
    report = validate_images(df, workers=config.workers)
    print(f"{config.data_dir}: {len(df)} images listed")
    print(f"  ok:      {len(report.ok)}")
    print(f"  missing: {len(report.missing)}")
    for name in sorted(report.missing):
        reason = report.why_missing.get(name, "missing file")
        print(f"    missing  {name}" + ("" if reason == "missing file" else f": {reason}"))
    print(f"  corrupt: {len(report.corrupt)}")
    for name, reason in sorted(report.corrupt):
        print(f"    corrupt  {name}: {reason}")
    print("  stored layouts (all decode to one 8-bit channel):")
    for layout, n in report.layouts.most_common():
        print(f"    {n:>7}  {layout}")
    if config.json:
        Path(config.json).write_text(json.dumps(report.to_dict(), indent=2))
    print("PASSED" if report.passed else "FAILED")
    return 0 if report.passed else 1


# --- prevalence and the data-prep notebook's configuration -------------------

# Fraction of all 112,120 NIH images carrying each finding (REFERENCE.md).
NIH_PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.103, "Cardiomegaly": 0.025, "Effusion": 0.119, "Infiltration": 0.177,
    "Mass": 0.052, "Nodule": 0.056, "Pneumonia": 0.013, "Pneumothorax": 0.047,
    "Consolidation": 0.042, "Edema": 0.021, "Emphysema": 0.022, "Fibrosis": 0.015,
    "Pleural_Thickening": 0.030, "Hernia": 0.002,
}  # fmt: skip
NIH_NO_FINDING = 0.538


def prevalence_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per label: prevalence in ``df`` beside the NIH figure (long format, for seaborn)."""
    ours = {label: float(df[label].mean()) for label in LABELS}
    ours[NO_FINDING] = float((df[list(LABELS)].sum(axis=1) == 0).mean())
    nih = {**NIH_PREVALENCE, NO_FINDING: NIH_NO_FINDING}
    rows = [{"label": k, "source": "this dataset", "prevalence": v} for k, v in ours.items()]
    rows += [{"label": k, "source": "NIH ChestX-ray14", "prevalence": v} for k, v in nih.items()]
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class DataPrepConfig:
    """Parameters of ``notebooks/01_data_prep.ipynb``, validated."""

    data_dir: str
    output_dir: str
    generate: bool = True
    n_images: int = 2000
    image_size: int = 1024
    seed: int = 0
    val_fraction: float = 0.1
    workers: int | None = None

    def __post_init__(self):
        if self.n_images < 10:
            raise ValueError(f"n_images must be at least 10, got {self.n_images}")
        if not 32 <= self.image_size <= 4096:
            raise ValueError(f"image_size must be in [32, 4096], got {self.image_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not self.generate and not Path(self.data_dir).is_dir():
            raise ValueError(f"data_dir {self.data_dir} does not exist and generate is False")

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

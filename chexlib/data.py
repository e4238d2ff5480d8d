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
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

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


def index_images(data_dir: str | Path) -> dict[str, Path]:
    """Map image file name -> path for ``images/`` and ``images_NNN/images/``.

    Raises:
        DataError: the same file name appears in two folders.
    """
    data_dir = Path(data_dir).resolve()
    folders = [data_dir / "images"] + sorted(data_dir.glob("images_*/images"))
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:  # scandir: fast on 112k files
            for entry in entries:
                if not entry.name.lower().endswith(".png"):
                    continue
                if entry.name in found:
                    raise DataError(
                        f"duplicate image {entry.name}: in {found[entry.name].parent} "
                        f"and in {folder}"
                    )
                found[entry.name] = folder / entry.name
    return found


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


def read_entries(csv_path: str | Path) -> pd.DataFrame:
    """Read the NIH CSV into one row per image with the 14 label columns.

    Raises:
        DataError: a missing column, a malformed row or a duplicate image,
            naming the CSV line.
    """
    csv_path = Path(csv_path)
    with open(csv_path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{csv_path}: empty file") from None
        missing = [c for c in _REQUIRED if c not in header]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {missing}; header is {header}")
        col = {name: header.index(name) for name in header if name}
        rows, seen = [], {}
        for line_no, row in enumerate(reader, start=2):
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
            rows.append(_entry(image, patient, labels, row, col))
    if not rows:
        raise DataError(f"{csv_path}: no image rows")
    return pd.DataFrame(rows)


def _entry(image: str, patient: int, labels: list[int], row: list[str], col: dict) -> dict:
    def opt(name: str) -> str | None:
        return row[col[name]].strip() if name in col else None

    entry = {"image": image, "patient_id": patient}
    entry["follow_up"] = _int_or_none(opt("Follow-up #"))
    entry["age"] = _int_or_none(opt("Patient Age"))
    entry["gender"] = opt("Patient Gender")
    entry["view"] = opt("View Position")
    entry.update(zip(LABELS, labels, strict=True))
    return entry


def _int_or_none(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    digits = text.rstrip("YMD")  # the first NIH release wrote ages like "058Y"
    return int(digits) if digits.isdigit() else None


def read_list(path: str | Path) -> list[str]:
    """Read a split list (one image name per line), rejecting duplicates."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split list not found")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
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
) -> pd.Series:
    """Return the split (train/val/test) of every entry.

    Test is the official list. Validation takes whole patients from
    train_val, in a seeded random order, until it holds ``val_fraction`` of
    the train_val images, so no patient is in two of train/val and the same
    arguments always give the same split.
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

    split = pd.Series(np.where(entries["image"].isin(te), "test", "train"), index=entries.index)
    in_tv = split == "train"
    counts = entries.loc[in_tv].groupby("patient_id").size().sort_index()
    order = np.random.default_rng(seed).permutation(counts.index.to_numpy())
    target = val_fraction * int(in_tv.sum())
    cumulative = counts.loc[order].cumsum().to_numpy()
    n_val = int(np.searchsorted(cumulative, target)) + 1 if target > 0 else 0
    val_patients = set(order[:n_val].tolist())
    split[in_tv & entries["patient_id"].isin(val_patients)] = "val"
    return split


def load_metadata(
    data_dir: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    csv_name: str | None = None,
    allow_missing: bool = False,
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

    Returns:
        DataFrame with columns ``image``, ``path``, ``patient_id``,
        ``follow_up``, ``age``, ``gender``, ``view``, the 14 ``LABELS`` (0/1
        int) and ``split`` (train/val/test), in CSV order.

    Raises:
        DataError: unknown label, malformed row, duplicate image, missing
            image, or split lists that overlap or name unknown images.
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
    )
    on_disk = index_images(data_dir)
    entries.insert(1, "path", [str(on_disk[n]) if n in on_disk else None for n in entries["image"]])
    missing = entries.loc[entries["path"].isna(), "image"].tolist()
    if missing and not allow_missing:
        raise DataError(
            f"{data_dir}: {len(missing)} image(s) listed in {csv_path.name} are not in images/ "
            f"or images_*/images/: {_few(missing)}"
        )
    entries.attrs["excluded"] = [{"image": n, "reason": "missing file"} for n in missing]
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
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    layouts: Counter = field(default_factory=Counter)  # stored layout -> count, e.g. "RGBA"

    @property
    def passed(self) -> bool:
        return not self.missing and not self.corrupt

    def to_dict(self) -> dict:
        return {
            "ok": len(self.ok),
            "missing": sorted(self.missing),
            "corrupt": [{"image": i, "reason": r} for i, r in sorted(self.corrupt)],
            "layouts": dict(self.layouts),
            "passed": self.passed,
        }


def _check_one(path: str) -> tuple[str, str | None, tuple[int, int] | None]:
    """Decode one file; return (layout, error, shape)."""
    from PIL import Image

    from chexlib.images import to_grayscale_u8

    try:
        with Image.open(path) as img:
            layout = f"{img.mode} {img.width}x{img.height}"
            img.load()  # full decode: truncated or corrupt data fails here
            return layout, None, to_grayscale_u8(img).shape
    except (OSError, ValueError, SyntaxError) as err:
        return "unreadable", f"cannot decode image ({err})", None


def validate_images(
    df: pd.DataFrame, workers: int | None = None, progress: bool = True
) -> ValidationReport:
    """Check that every image of ``df`` exists and decodes to one channel."""
    from tqdm.auto import tqdm

    report = ValidationReport()
    present = df[df["path"].notna()]
    report.missing = df.loc[df["path"].isna(), "image"].tolist()
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_check_one, present["path"], chunksize=16)
        bar = tqdm(results, total=len(present), desc="validate", unit="img", disable=not progress)
        for image, (layout, error, _) in zip(present["image"], bar, strict=True):
            report.layouts[layout] += 1
            if error:
                report.corrupt.append((image, error))
            else:
                report.ok.append(image)
    return report


def add_arguments(parser) -> None:
    parser.add_argument("data_dir", help="dataset folder in the NIH ChestX-ray14 layout")
    parser.add_argument(
        "--workers", type=int, default=None, help="decode processes (default: all cores)"
    )
    parser.add_argument("--json", default=None, help="also write the report as JSON here")


def run(args) -> int:
    """``chexlib validate DATA_DIR``: exit 0 only when every image is present and decodes."""
    import json

    try:
        df = load_metadata(args.data_dir, allow_missing=True)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = validate_images(df, workers=args.workers)
    print(f"{args.data_dir}: {len(df)} images listed")
    print(f"  ok:      {len(report.ok)}")
    print(f"  missing: {len(report.missing)}")
    for name in sorted(report.missing):
        print(f"    missing  {name}")
    print(f"  corrupt: {len(report.corrupt)}")
    for name, reason in sorted(report.corrupt):
        print(f"    corrupt  {name}: {reason}")
    print("  stored layouts (all decode to one 8-bit channel):")
    for layout, n in report.layouts.most_common():
        print(f"    {n:>7}  {layout}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
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

"""chexlib.data.metadata and chexlib.data.png on a hand-made folder in the NIH layout."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chexlib.data.metadata import LABELS, DataError, load_metadata, split_summary, validate_images
from chexlib.data.png import read_grayscale

HEADER = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
    "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
    "OriginalImagePixelSpacing[x", "y]", "",
]  # fmt: skip

# (image, findings, patient); the archive folder each image goes to is below.
ROWS = [
    ("00000001_000.png", "Cardiomegaly", 1),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1),
    ("00000002_000.png", "No Finding", 2),
    ("00000003_000.png", "Hernia|Effusion|Mass", 3),
    ("00000003_001.png", "No Finding", 3),
    ("00000004_000.png", "Pleural_Thickening", 4),
    ("00000005_000.png", "No Finding", 5),
    ("00000006_000.png", "Infiltration|Nodule", 6),
]
TEST = ["00000005_000.png", "00000006_000.png"]


def _write_dataset(root: Path, rows=ROWS, test=TEST, layout: str = "archives") -> Path:
    """An NIH-layout folder; ``layout`` is "flat" (images/) or "archives" (images_00N/images/)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "Data_Entry_2017.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        for i, (image, findings, patient) in enumerate(rows):
            writer.writerow([image, findings, i, patient, 50, "M", "PA", 32, 32, 0.14, 0.14, ""])
    names = [r[0] for r in rows]
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(n for n in names if n not in test) + "\n")
    rng = np.random.default_rng(0)
    for i, image in enumerate(names):
        folder = root / ("images" if layout == "flat" else f"images_{1 + i % 2:03d}/images")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(folder / image)
    return root


@pytest.fixture()
def nih(tmp_path):
    return _write_dataset(tmp_path / "nih")


@pytest.mark.parametrize("layout", ["flat", "archives"])
def test_reads_both_folder_layouts(tmp_path, layout):
    df = load_metadata(_write_dataset(tmp_path / layout, layout=layout))
    assert len(df) == len(ROWS)
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in df["path"])
    assert list(df["image"]) == [r[0] for r in ROWS]


def test_labels_no_finding_and_multilabel(nih):
    df = load_metadata(nih).set_index("image")
    assert len(LABELS) == 14 and LABELS[0] == "Atelectasis" and LABELS[-1] == "Hernia"
    assert df.loc["00000002_000.png", list(LABELS)].sum() == 0  # No Finding = all zeros
    row = df.loc["00000003_000.png"]
    assert {lab for lab in LABELS if row[lab] == 1} == {"Hernia", "Effusion", "Mass"}
    assert df.loc["00000001_001.png", "Emphysema"] == 1
    assert df[list(LABELS)].dtypes.map(lambda d: d.kind == "i").all()
    assert df["patient_id"].dtype.kind == "i"


def test_test_split_is_the_official_list(nih):
    df = load_metadata(nih, val_fraction=0.3)
    assert sorted(df.loc[df["split"] == "test", "image"]) == sorted(TEST)
    assert set(df["split"]) == {"train", "val", "test"}


def test_validation_split_by_patient_seeded_and_stable(synth_dir):
    a = load_metadata(synth_dir, val_fraction=0.2, seed=3)
    b = load_metadata(synth_dir, val_fraction=0.2, seed=3)
    c = load_metadata(synth_dir, val_fraction=0.2, seed=4)
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()
    patients = a.groupby("patient_id")["split"].nunique()
    assert (patients == 1).all(), "a patient appears in two splits"
    tv = a[a["split"] != "test"]
    assert 0.1 <= (tv["split"] == "val").mean() <= 0.35
    summary = split_summary(a)
    assert summary["images"].sum() == len(a)


def _rewrite_csv(root: Path, edit) -> None:
    path = root / "Data_Entry_2017.csv"
    rows = list(csv.reader(path.open()))
    edit(rows)
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda r: r[3].__setitem__(1, "Cardiomegaly|Broken_Heart"),
            r"line 4 .*unknown label.*Broken_Heart",
        ),
        (lambda r: r[2].__setitem__(3, "abc"), r"line 3 .*Patient ID.*not an integer"),
        (lambda r: r.__setitem__(5, r[5][:3]), r"line 6: expected 12 fields"),
        (lambda r: r.append(list(r[1])), r"line 10: duplicate image 00000001_000.png"),
        (lambda r: r[4].__setitem__(1, ""), r"line 5 .*empty 'Finding Labels'"),
    ],
    ids=["unknown-label", "bad-patient", "short-row", "duplicate", "empty-labels"],
)
def test_bad_csv_rows_name_the_row(nih, edit, message):
    _rewrite_csv(nih, edit)
    with pytest.raises(DataError, match=message):
        load_metadata(nih)


def test_missing_image_is_an_error_or_counted_out(nih):
    victim = next(nih.glob("images_*/images/00000004_000.png"))
    victim.unlink()
    with pytest.raises(DataError, match="00000004_000.png"):
        load_metadata(nih)
    df = load_metadata(nih, allow_missing=True)
    assert len(df) == len(ROWS)  # still counted, with no path and a reason
    assert df.attrs["excluded"] == [{"image": "00000004_000.png", "reason": "missing file"}]


def test_duplicate_file_across_archives(nih):
    src = next(nih.glob("images_001/images/*.png"))
    (nih / "images_002/images" / src.name).write_bytes(src.read_bytes())
    with pytest.raises(DataError, match=f"duplicate image {src.name}"):
        load_metadata(nih)


@pytest.mark.parametrize(
    ("lists", "message"),
    [
        ({"test_list.txt": TEST + ["00000001_000.png"]}, "overlap.*00000001_000.png"),
        (
            {"test_list.txt": TEST + ["99999999_000.png"]},
            "test_list.txt names image.*99999999_000.png",
        ),
        ({"test_list.txt": TEST[:1]}, "neither .*00000006_000.png"),
        ({"test_list.txt": TEST + TEST[:1]}, "listed twice.*00000005_000.png"),
    ],
    ids=["overlap", "unknown", "unlisted", "twice"],
)
def test_bad_split_lists(nih, lists, message):
    for name, names in lists.items():
        (nih / name).write_text("\n".join(names) + "\n")
    with pytest.raises(DataError, match=message):
        load_metadata(nih)


def test_v2020_csv_is_found(nih):
    (nih / "Data_Entry_2017.csv").rename(nih / "Data_Entry_2017_v2020.csv")
    assert len(load_metadata(nih)) == len(ROWS)


# --- decoding to one channel -------------------------------------------------


def _variants(gray: np.ndarray) -> dict[str, Image.Image]:
    rgb = np.repeat(gray[..., None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full_like(gray[..., None], 200)], axis=2)
    wide = gray.astype(np.uint16) * 257  # 16-bit with the same 8-bit content
    return {
        "L": Image.fromarray(gray, "L"),
        "RGB": Image.fromarray(rgb, "RGB"),
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "I;16": Image.fromarray(wide),
        "LA": Image.fromarray(np.stack([gray, gray], axis=2), "LA"),
    }


def test_every_layout_decodes_to_one_8bit_channel(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (24, 40), dtype=np.uint8)
    for mode, img in _variants(gray).items():
        path = tmp_path / f"{mode.replace(';', '')}.png"
        img.save(path)
        out = read_grayscale(path)
        assert out.shape == (24, 40) and out.dtype == np.uint8, mode
        assert np.abs(out.astype(int) - gray).max() <= 1, mode


def test_validate_counts_ok_missing_corrupt(nih):
    images = sorted(nih.glob("images_*/images/*.png"))
    images[0].unlink()  # missing
    images[1].write_bytes(images[1].read_bytes()[:60])  # truncated: corrupt
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(images[2])  # odd layout, valid
    report = validate_images(load_metadata(nih, allow_missing=True), workers=1, progress=False)
    assert report.missing == [images[0].name]
    assert [name for name, _ in report.corrupt] == [images[1].name]
    assert len(report.ok) == len(ROWS) - 2
    assert any(k.startswith("RGBA") for k in report.layouts)
    assert not report.passed


def test_validate_cli_exit_status_and_names(nih):
    cmd = [sys.executable, "-m", "chexlib.cli.main", "validate", str(nih), "--workers", "1"]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASSED" in ok.stdout
    bad = next(nih.glob("images_*/images/00000002_000.png"))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    fail = subprocess.run(cmd, capture_output=True, text=True)
    assert fail.returncode == 1
    assert "corrupt: 1" in fail.stdout and "00000002_000.png" in fail.stdout


def test_validate_cli_reports_metadata_errors(nih):
    _rewrite_csv(nih, lambda r: r[2].__setitem__(1, "Dragon"))
    res = subprocess.run(
        [sys.executable, "-m", "chexlib.cli.main", "validate", str(nih)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "Dragon" in res.stderr


# --- encodings, age units, physical lines, patients in both lists, symlinks -----------------


def test_latin1_csv_is_refused_naming_file_and_physical_line(nih):
    _rewrite_csv(nih, lambda r: r[4].__setitem__(5, "Féminin"))
    path = nih / "Data_Entry_2017.csv"
    path.write_bytes(path.read_text().encode("latin-1"))
    with pytest.raises(DataError, match=r"Data_Entry_2017.csv line 5: not UTF-8 \(byte 0xe9"):
        load_metadata(nih)


def test_byte_order_marks_are_accepted(nih):
    for name in ("Data_Entry_2017.csv", "test_list.txt", "train_val_list.txt"):
        path = nih / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    df = load_metadata(nih)
    assert len(df) == len(ROWS) and df["image"].iat[0] == ROWS[0][0]
    assert sorted(df.loc[df["split"] == "test", "image"]) == sorted(TEST)


def test_ages_with_units_are_converted_to_years(nih):
    ages = ["058Y", "058M", "030D", "61", "", "7y", "0.5", "100"]
    _rewrite_csv(nih, lambda r: [r[i + 1].__setitem__(4, a) for i, a in enumerate(ages)])
    got = load_metadata(nih)["age"].tolist()
    want = [58.0, 58 / 12, 30 / 365.25, 61.0, None, 7.0, 0.5, 100.0]
    for g, w in zip(got, want, strict=True):
        assert (w is None and np.isnan(g)) or g == pytest.approx(w), (got, want)


@pytest.mark.parametrize("junk", ["abc", "58Q", "-3", "5 8", "Y"])
def test_junk_age_is_refused_with_file_and_line(nih, junk):
    _rewrite_csv(nih, lambda r: r[3].__setitem__(4, junk))
    with pytest.raises(
        DataError, match=r"Data_Entry_2017.csv line 4 .*'Patient Age' is not an age"
    ):
        load_metadata(nih)


def test_error_lines_are_physical_lines_of_the_file(nih):
    def edit(rows):
        rows[2][11] = "a note\nover two lines"  # a quoted field holding a newline (line 3-4)
        rows[5][1] = "Dragon"  # record 6 of the file, on physical line 7

    _rewrite_csv(nih, edit)
    with pytest.raises(DataError, match=r"line 7 .*Dragon"):
        load_metadata(nih)
    _rewrite_csv(nih, lambda r: (r[5].__setitem__(1, "Mass"), r.append(list(r[3]))))
    with pytest.raises(DataError, match=r"line 11: duplicate image \S+ \(first on line 5\)"):
        load_metadata(nih)


def test_patient_in_both_official_lists_is_refused_by_name(nih):
    (nih / "test_list.txt").write_text("\n".join([*TEST, "00000003_001.png"]) + "\n")
    names = [r[0] for r in ROWS if r[0] not in TEST and r[0] != "00000003_001.png"]
    (nih / "train_val_list.txt").write_text("\n".join(names) + "\n")
    with pytest.raises(
        DataError,
        match=r"patient\(s\) in both .*patient 3 \(00000003_000.png in train_val_list.txt, "
        r"00000003_001.png in test_list.txt\)",
    ):
        load_metadata(nih)


def test_dangling_symlink_is_missing_not_corrupt(nih, tmp_path):
    victim = next(nih.glob("images_*/images/00000004_000.png"))
    victim.unlink()
    victim.symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError, match=r"00000004_000.png: missing file \(dangling symlink"):
        load_metadata(nih)
    df = load_metadata(nih, allow_missing=True)
    assert df.attrs["excluded"][0]["reason"].startswith("missing file (dangling symlink")
    report = validate_images(df, workers=1, progress=False)
    assert report.missing == ["00000004_000.png"] and not report.corrupt
    assert "dangling symlink" in report.to_dict()["missing_reasons"]["00000004_000.png"]

"""Hostile and unlucky inputs: `validate` and `convert` name every bad file, never crash.

Each file is made for real on disk (truncated, empty, another format under a
.png name, a PNG whose header claims 20000 x 20000, a dangling symlink) and
each command runs as a real process of the installed ``chexlib`` script.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chexlib.data.png import BadImage, check_png, png_header_problem, read_grayscale
from chexlib.records import read

CHEXLIB = str(Path(sys.executable).with_name("chexlib"))


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG with a valid signature and IHDR (correct CRC) claiming ``width`` x ``height``."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * (width + 1))  # one row; the rest is missing
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    mode = "RGB" if fmt == "JPEG" else "L"
    Image.new(mode, (16, 16), 128).save(buf, format=fmt)
    return buf.getvalue()


# name in the dataset -> (how the file is damaged, what the report must say about it)
BAD = {
    "truncated": ("truncated", "cannot decode image"),
    "empty": ("empty", "empty file (0 bytes)"),
    "jpeg": ("JPEG", "wrong format: JPEG, not PNG"),
    "gif": ("GIF", "wrong format: GIF, not PNG"),
    "tiff": ("TIFF", "wrong format: TIFF, not PNG"),
    "bmp": ("BMP", "wrong format: BMP, not PNG"),
    "bomb": ("bomb", "decompression bomb: header claims 20000x20000"),
}


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "bomb":
        path.write_bytes(huge_png())
    else:
        path.write_bytes(_encoded(how))


@pytest.fixture(scope="module")
def bad_dataset(synth_dir, tmp_path_factory):
    """A copy of the synthetic set with one image of each kind of damage and a dangling link.

    Returns (data_dir, {kind: image name}).
    """
    data = tmp_path_factory.mktemp("bad") / "data"
    shutil.copytree(synth_dir, data, symlinks=True)
    images = sorted((data / "images").glob("*.png"))
    names = {}
    for (kind, (how, _)), path in zip(BAD.items(), images[::7], strict=False):
        _damage(path, how)
        names[kind] = path.name
    link = images[-1]
    link.unlink()
    link.symlink_to(data / "nowhere" / link.name)
    names["dangling"] = link.name
    return data, names


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([CHEXLIB, *args], capture_output=True, text=True, timeout=timeout)


def _line_of(text: str, name: str) -> str:
    lines = [ln for ln in text.splitlines() if name in ln]
    assert lines, f"{name} not named in:\n{text}"
    return lines[0]


# --- the checks themselves ------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BAD))
def test_check_png_refuses_each_kind_by_reason(kind, tmp_path):
    how, reason = BAD[kind]
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(path)
    _damage(path, how)
    with pytest.raises(BadImage, match="^" + re.escape(f"x.png: {reason}")):
        check_png(path.read_bytes(), name="x.png")


def test_huge_header_is_refused_before_decoding_and_by_pil_paths_too(tmp_path):
    assert "20000x20000 (400,000,000 pixels)" in png_header_problem(huge_png())
    path = tmp_path / "bomb.png"
    path.write_bytes(huge_png())
    with pytest.raises(OSError, match="bomb.png"):  # was a DecompressionBombError
        read_grayscale(path)


def test_a_good_png_passes_with_its_layout():
    buf = io.BytesIO()
    Image.new("RGBA", (40, 24)).save(buf, format="PNG")
    gray, layout = check_png(buf.getvalue())
    assert gray.shape == (24, 40) and gray.dtype == np.uint8 and layout == "RGBA 40x24"


# --- the commands -------------------------------------------------------------------------


def test_validate_names_every_bad_file_with_its_reason(bad_dataset, tmp_path):
    data, names = bad_dataset
    report_path = tmp_path / "report.json"
    res = _run("validate", str(data), "--workers", "2", "--json", str(report_path))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    for kind, (_, reason) in BAD.items():
        line = _line_of(res.stdout, names[kind])
        assert "corrupt" in line and reason in line, line
    line = _line_of(res.stdout, names["dangling"])
    assert "missing" in line and "dangling symlink" in line, line
    report = json.loads(report_path.read_text())
    assert report["missing"] == [names["dangling"]]
    assert "dangling symlink" in report["missing_reasons"][names["dangling"]]
    assert {c["image"] for c in report["corrupt"]} == {names[k] for k in BAD}
    assert report["ok"] == 120 - len(BAD) - 1


def test_convert_skip_bad_skips_each_with_its_reason_and_training_can_decode_the_rest(
    bad_dataset, tmp_path
):
    data, names = bad_dataset
    out = tmp_path / "records"
    res = _run("convert", str(data), str(out), "--skip-bad", "--workers", "2", "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    skipped = {e["image"]: e["reason"] for e in read.read_manifest(out)["skipped"]}
    assert set(skipped) == set(names.values())
    for kind, (_, reason) in BAD.items():
        assert reason in skipped[names[kind]], (kind, skipped[names[kind]])
        assert reason in _line_of(res.stdout, f"skipped {names[kind]}")
    assert "dangling symlink" in skipped[names["dangling"]]
    # every record left is what tf.io.decode_png accepts (the decode training runs)
    check = _run("verify-records", str(out), "--data", str(data), "--decode", "--no-progress")
    assert check.returncode == 0, check.stdout + check.stderr


def test_convert_without_skip_bad_stops_with_one_error_line(bad_dataset, tmp_path):
    data, names = bad_dataset
    res = _run("convert", str(data), str(tmp_path / "strict"), "--no-progress")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("chexlib convert: error: ") and names["dangling"] in res.stderr
    assert "dangling symlink" in res.stderr

    fixed = tmp_path / "fixed"  # a copy whose only problems are the damaged files
    shutil.copytree(data, fixed, symlinks=True)
    link = fixed / "images" / names["dangling"]
    link.unlink()
    shutil.copy(synth_dir_image(data, names), link)
    res = _run("convert", str(fixed), str(tmp_path / "strict2"), "--no-progress", "--workers", "1")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("chexlib convert: error: ") and "--skip-bad" in res.stderr
    assert any(names[k] in res.stderr and BAD[k][1] in res.stderr for k in BAD), res.stderr


def synth_dir_image(data: Path, names: dict) -> Path:
    """An undamaged image of the bad dataset."""
    bad = set(names.values())
    return next(p for p in sorted((data / "images").glob("*.png")) if p.name not in bad)


def test_convert_into_a_file_is_one_error_line(synth_dir, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    res = _run("convert", str(synth_dir), str(target), "--no-progress")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("chexlib convert: error: ") and str(target) in res.stderr


# --- malformed metadata fed to every command that reads it ---------------------------

HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
)
CSVS = {
    "latin-1": (
        HEADER
        + "00000001_000.png,No Finding,0,1,058Y,M,PA\n00000002_000.png,Effusion,0,2,40,F,Poitrine é\n"
    ).encode("latin-1"),
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe",
    "empty": b"",
    "header-only": HEADER.encode(),
    "no-columns": b"a,b,c\n1,2,3\n",
    "junk-age": (HEADER + "00000001_000.png,No Finding,0,1,old,M,PA\n").encode(),
    "nul": (HEADER + "00000001_000.png,No Finding,0,1,5\x00,M,PA\n").encode(),
    "unclosed-quote": (HEADER + '00000001_000.png,"No Finding,0,1,58,M,PA\n').encode(),
}
CSV_REASONS = {
    "latin-1": "line 3: not UTF-8",
    "binary": "line 1: not UTF-8",
    "empty": "empty file",
    "header-only": "no image rows",
    "no-columns": "missing column",
    "junk-age": "line 2 .*Patient Age",
    "nul": "line 2 .*Patient Age",
    "unclosed-quote": "line 2",
}


@pytest.mark.parametrize("command", ["validate", "convert", "train"])
@pytest.mark.parametrize("kind", list(CSVS))
def test_malformed_csv_gives_one_error_line_naming_the_file(kind, command, tmp_path):

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "Data_Entry_2017.csv").write_bytes(CSVS[kind])
    (data / "train_val_list.txt").write_text("00000001_000.png\n")
    (data / "test_list.txt").write_text("00000002_000.png\n")
    args = {
        "validate": [str(data)],
        "convert": [str(data), str(tmp_path / "out")],
        "train": ["--data", str(data), "--model", "tiny", "--out", str(tmp_path / "run")],
    }[command]
    res = _run(command, *args, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    errors = [
        line for line in res.stderr.splitlines() if re.match(r"(chexlib \w+: )?error: ", line)
    ]
    assert len(errors) == 1 and "Data_Entry_2017.csv" in errors[0], res.stderr
    assert re.search(CSV_REASONS[kind], res.stderr), res.stderr

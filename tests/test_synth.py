"""Tests of the generated ChestX-ray14-format dataset (chexlib.synth.generate, synth_metadata, synth_image)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chexlib.data.metadata import LABELS, load_metadata
from chexlib.synth import generate, image, metadata

REAL_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """60 images of 64x64, rendered in this process."""
    out = tmp_path_factory.mktemp("synth") / "small"
    generate.generate(out, n_images=60, size=64, seed=5, workers=1, progress=False)
    return out


# --- determinism ----------------------------------------------------------------


def test_same_arguments_give_the_same_bytes_whatever_the_workers(tmp_path, small):
    again = tmp_path / "again"
    generate.generate(again, n_images=60, size=64, seed=5, workers=2, progress=False)
    assert _files(again) == _files(small)


def test_another_seed_gives_another_dataset(tmp_path, small):
    other = tmp_path / "other"
    generate.generate(other, n_images=60, size=64, seed=6, workers=1, progress=False)
    a, b = _files(small), _files(other)
    assert a[generate.CSV_NAME] != b[generate.CSV_NAME]
    shared = sorted(n for n in set(a) & set(b) if n.startswith("images/"))
    assert shared and all(a[n] != b[n] for n in shared)


# --- layout ---------------------------------------------------------------------


def test_csv_has_the_real_header_and_well_formed_rows(small):
    lines = (small / generate.CSV_NAME).read_text().splitlines()
    assert lines[0] == REAL_HEADER
    rows = list(csv.reader(lines[1:]))
    assert len(rows) == 60
    assert {len(r) for r in rows} == {12} and {r[-1] for r in rows} == {""}
    for name, findings, follow_up, patient, age, gender, view, w, h, sx, sy, _ in rows:
        assert name == f"{int(patient):08d}_{int(follow_up):03d}.png"
        assert findings == "No Finding" or set(findings.split("|")) <= set(LABELS)
        assert 0 < int(age) <= 95 and gender in "MF" and view in ("PA", "AP")
        assert int(w) > 1000 and int(h) > 1000 and float(sx) == float(sy) > 0
    names = [r[0] for r in rows]
    assert names == sorted(names)


def test_csv_reads_like_the_real_file_with_pandas(small):
    df = pd.read_csv(small / generate.CSV_NAME)
    assert list(df.columns[:11]) == list(metadata.CSV_COLUMNS)
    assert df.columns[11].startswith("Unnamed") and df.iloc[:, 11].isna().all()


def test_split_lists_cover_every_image_once_and_keep_patients_apart(small):
    names = set(pd.read_csv(small / generate.CSV_NAME)["Image Index"])
    train_val = (small / "train_val_list.txt").read_text().splitlines()
    test = (small / "test_list.txt").read_text().splitlines()
    assert sorted(train_val + test) == sorted(names)
    patient = re.compile(r"^(\d{8})_\d{3}\.png$")
    assert not {patient.match(n)[1] for n in train_val} & {patient.match(n)[1] for n in test}


def test_test_fraction_is_met_by_whole_patients():
    meta = metadata.sample_metadata(2000, seed=0)
    for fraction in (0.1, 0.2, 0.3):
        is_test = metadata.split_by_patient(meta, fraction, seed=0)
        assert abs(is_test.mean() - fraction) < 0.01
        by_patient = pd.Series(is_test).groupby(meta["Patient ID"]).nunique()
        assert (by_patient == 1).all()


def test_images_are_8_bit_grayscale_of_the_asked_size(small):
    pngs = sorted((small / "images").glob("*.png"))
    assert len(pngs) == 60
    for path in pngs[:5]:
        with Image.open(path) as img:
            assert (img.mode, img.size) == ("L", (64, 64))


def test_chexlib_data_loads_the_output(small):
    df = load_metadata(small)
    assert len(df) == 60 and df["path"].notna().all()
    assert set(df["split"]) <= {"train", "val", "test"}


# --- metadata model -------------------------------------------------------------


@pytest.fixture(scope="module")
def big_meta() -> pd.DataFrame:
    return metadata.sample_metadata(20_000, seed=0)


def test_prevalence_matches_nih(big_meta):
    # Tolerance: 10 % of the NIH figure plus 0.3 points. The model's marginals
    # are exact, so this only allows for sampling noise (about 5 standard errors
    # for Infiltration, with patients' follow-ups correlated).
    observed = big_meta[list(LABELS)].mean()
    for label in LABELS:
        nih = metadata.PREVALENCE[label]
        assert abs(observed[label] - nih) <= 0.1 * nih + 0.003, (label, observed[label], nih)
    no_finding = (big_meta["Finding Labels"] == "No Finding").mean()
    assert abs(no_finding - 0.538) < 0.015
    assert (big_meta[list(LABELS)].sum(axis=1) == 0).mean() == no_finding


def test_patients_and_views_look_like_nih(big_meta):
    images_per_patient = len(big_meta) / big_meta["Patient ID"].nunique()
    assert abs(images_per_patient - metadata.MEAN_FOLLOWUPS) < 0.25
    assert abs((big_meta["View Position"] == "AP").mean() - 0.40) < 0.03
    assert abs((big_meta["Patient Gender"] == "M").mean() - 0.565) < 0.03


def test_findings_co_occur_and_persist_across_follow_ups(big_meta):
    def lift(a, b):  # P(a | b) / P(a)
        return big_meta.loc[big_meta[b] == 1, a].mean() / big_meta[a].mean()

    assert lift("Effusion", "Atelectasis") > 1.5
    assert lift("Effusion", "Edema") > 1.5
    assert lift("Mass", "Nodule") > 1.5
    # The same patient's next image keeps a chronic finding far more often than chance.
    nxt = big_meta.groupby("Patient ID")["Emphysema"].shift(-1)
    has = big_meta["Emphysema"] == 1
    assert nxt[has].mean() > 5 * big_meta["Emphysema"].mean()


# --- images ---------------------------------------------------------------------


def test_a_1024_png_is_as_large_as_a_real_one():
    for index, findings in enumerate([(), ("Mass", "Effusion", "Cardiomegaly")]):
        pixels = image.render_image(findings, size=1024, seed=0, index=index, patient=index + 1)
        assert pixels.shape == (1024, 1024) and pixels.dtype == np.uint8
        assert 300_000 <= len(image.encode_png(pixels)) <= 500_000


def _small(pixels: np.ndarray, side: int = 64) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((side, side), Image.BOX), dtype=np.float64)


def test_a_1024_image_downscales_to_what_its_256_drawing_does():
    # Justifies drawing at 256 in the learnability test below.
    args = dict(findings=("Nodule", "Pneumothorax"), seed=1, index=3, patient=2)
    big = _small(image.render_image(size=1024, **args))
    base = _small(image.render_image(size=256, **args))
    assert np.abs(big - base).mean() < 1.0


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    ranks = pd.Series(score).rank().to_numpy()
    n_pos = positive.sum()
    return (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(score) - n_pos))


def test_every_finding_is_learnable_at_64x64():
    # 300 images, each finding present with probability 0.3, each image its own
    # patient; a ridge classifier on 64x64 pixels, fit on 210, scored on 90.
    rng = np.random.default_rng(1)
    y = rng.random((300, len(LABELS))) < 0.3
    x = np.stack(
        [
            _small(
                image.render_image(
                    [k for k, on in zip(LABELS, row, strict=True) if on],
                    size=256,
                    seed=3,
                    index=i,
                    patient=i + 1,
                    view=("PA", "AP")[i % 2],
                )
            ).ravel()
            for i, row in enumerate(y)
        ]
    )
    fit, held = slice(0, 210), slice(210, None)
    z = (x - x[fit].mean(0)) / (x[fit].std(0) + 1e-3)
    gram = z[fit] @ z[fit].T  # ridge in its dual form: 210 x 210, not 4096 x 4096
    alpha = np.linalg.solve(gram + 100 * np.eye(210), y[fit] - y[fit].mean(0))
    scores = z[held] @ (z[fit].T @ alpha)
    auroc = {k: _auroc(scores[:, i], y[held, i]) for i, k in enumerate(LABELS)}
    assert np.mean(list(auroc.values())) > 0.85, auroc
    assert min(auroc.values()) > 0.65, auroc


def _core_spread(label: str, index: int) -> float:
    """Coefficient of variation of what ``label`` adds inside the middle of its box, as the
    demo's learning run sees it (1024 px stored, compact records at 128 px, Lanczos)."""
    args = dict(size=1024, seed=2, index=index, patient=index + 1)

    def at_128(pixels):
        return np.asarray(Image.fromarray(pixels).resize((128, 128), Image.LANCZOS), dtype=float)

    diff = at_128(image.render_image((label,), **args)) - at_128(image.render_image((), **args))
    x, y, w, h = (v / 8 for v in image.finding_boxes((label,), **args)[label])
    core = diff[int(y + h / 4) : int(y + 3 * h / 4), int(x + w / 4) : int(x + 3 * w / 4)]
    return float(core.std() / abs(core.mean()))


@pytest.mark.parametrize("index", [0, 1])
def test_fine_structure_survives_the_128_px_input(index):
    # A pooled CNN tells findings apart by look, not place: Fibrosis' reticular mesh and
    # Consolidation's air bronchograms must still vary inside the finding at 128 px,
    # while a Mass is uniform inside its sharp edge.
    assert _core_spread("Fibrosis", index) > 0.3
    assert _core_spread("Consolidation", index) > 0.25
    assert _core_spread("Mass", index) < 0.05


# --- re-runs, refusals, CLI -----------------------------------------------------


def test_rerun_renders_only_what_is_missing(tmp_path):
    out = tmp_path / "resume"
    first = generate.generate(out, n_images=20, size=64, seed=2, workers=1, progress=False)
    before = _files(out)
    assert first["rendered"] == 20
    for path in sorted((out / "images").glob("*.png"))[:3]:
        path.unlink()
    (out / "images" / "00000001_000.png.tmp").write_bytes(b"half")  # as a killed run leaves
    assert (
        generate.generate(out, n_images=20, size=64, seed=2, workers=1, progress=False)["rendered"]
        == 3
    )
    assert _files(out) == before
    assert (
        generate.generate(out, n_images=20, size=64, seed=2, workers=1, progress=False)["rendered"]
        == 0
    )


def test_refuses_a_folder_that_is_not_its_own(tmp_path, small):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synth output"):
        generate.generate(foreign, n_images=5, size=64, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    before = _files(small)
    with pytest.raises(FileExistsError, match="n_images=60 on disk vs 61 asked"):
        generate.generate(small, n_images=61, size=64, seed=5, progress=False)
    assert _files(small) == before


@pytest.mark.parametrize(
    "kwargs",
    [{"n_images": 0}, {"size": 8}, {"seed": -1}, {"test_fraction": 1.0}, {"workers": 0}],
)
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate.generate(
            tmp_path / "x", **{"n_images": 5, "size": 64, "progress": False, **kwargs}
        )
    assert not (tmp_path / "x").exists()


def test_cli_prints_the_summary_and_fails_cleanly(tmp_path, capsys):
    from chexlib.cli.main import main

    out = str(tmp_path / "cli")
    argv = ["synth", out, "--images", "8", "--size", "64", "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^images\s+8$", printed, re.M) and "test_images" in printed
    assert main([*argv[:3], "9", *argv[4:]]) == 2
    assert "other arguments" in capsys.readouterr().err


# --- planted boxes (BBox_List_2017.csv) -------------------------------------------


def test_box_list_has_nih_header_and_a_row_per_boxed_test_finding(small):
    lines = (small / generate.BBOX_NAME).read_text().splitlines()
    assert lines[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    rows = list(csv.reader(lines[1:]))
    assert rows and {len(r) for r in rows} == {9} and {tuple(r[6:]) for r in rows} == {("", "", "")}
    test = set((small / "test_list.txt").read_text().splitlines())
    entries = pd.read_csv(small / generate.CSV_NAME).set_index("Image Index")["Finding Labels"]
    expected = {
        (name, label) for name in test for label in entries[name].split("|") if label in image.BOXED
    }
    assert {(r[0], r[1]) for r in rows} == expected and len(rows) == len(expected)
    for _, _, *box, _, _, _ in rows:
        x, y, w, h = map(float, box)
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64


def test_box_list_reads_like_nih_with_pandas(small):
    df = pd.read_csv(small / generate.BBOX_NAME)
    assert list(df.columns[:6]) == ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]
    assert all(c.startswith("Unnamed") for c in df.columns[6:]) and len(df.columns) == 9
    assert df.iloc[:, 6:].isna().all().all()


def _mass_inside(mass: np.ndarray, box, scale: float) -> float:
    x, y, w, h = (round(v / scale) for v in box)
    return float(mass[y : y + h, x : x + w].sum() / mass.sum())


@pytest.mark.parametrize("view", ["PA", "AP"])
def test_each_box_holds_most_of_its_finding_drawn_alone(view):
    # 512 px: boxes are in stored pixels, the drawing grid is 256 (scale 2).
    for index in range(4):
        args = dict(size=512, seed=11, index=index, patient=index + 3, view=view)
        boxes = image.finding_boxes(image.BOXED, **args)
        assert set(boxes) == set(image.BOXED)
        for label, box in boxes.items():
            mass = image.finding_mass(label, **args)
            assert _mass_inside(mass, box, 2.0) > 0.8, (label, index, box)
            assert box[2] * box[3] < 0.35 * 512 * 512, (label, box)  # a place, not the image
    assert image.finding_boxes(("Emphysema",), size=64) == {}  # diffuse: no box


def test_boxes_follow_the_jitter_and_scale_with_the_stored_size():
    one = image.finding_boxes(("Nodule",), size=256, seed=0, index=1, patient=1)["Nodule"]
    other = image.finding_boxes(("Nodule",), size=256, seed=0, index=2, patient=2)["Nodule"]
    assert one != other
    big = image.finding_boxes(("Nodule",), size=1024, seed=0, index=1, patient=1)["Nodule"]
    assert big == tuple(4 * v for v in one)


def test_a_dataset_written_before_the_box_list_gets_it_on_rerun(tmp_path, small):
    out = tmp_path / "old"
    generate.generate(out, n_images=60, size=64, seed=5, workers=1, progress=False)
    (out / generate.BBOX_NAME).unlink()
    again = generate.generate(out, n_images=60, size=64, seed=5, workers=1, progress=False)
    assert again["rendered"] == 0 and again["boxes"] > 0
    assert _files(out) == _files(small)

"""Adversarial inputs to training and its data (issue 26, findings 4-7): real files, real runs.

Every run is a ``chexlib`` process on a generated dataset of 40 images of 64 px
(the tiny model, 32 px input, one or two epochs); each test damages a real file
or sends a real signal and checks the one line the command ends with.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chexlib.data.metadata import DataError, load_metadata
from chexlib.pipeline import spng
from chexlib.train import config as train_config

CHEXLIB = str(Path(sys.executable).with_name("chexlib"))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
TINY = [
    "--model", "tiny", "--image-size", "32", "--batch-size", "8", "--warmup-epochs", "0",
    "--verbose", "0",
]  # fmt: skip


def _run(*args, timeout: float = 240, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHEXLIB, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=cwd,
    )


def _error_line(res: subprocess.CompletedProcess, command: str = "train") -> str:
    """The one ``chexlib COMMAND: error:`` line of a failed run (and no traceback)."""
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(f"chexlib {command}: error: ")]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """40 generated images of 64 px (30 train_val, 10 test), made by ``chexlib synth``."""
    out = tmp_path_factory.mktemp("adv") / "data"
    res = _run("synth", out, "--images", 40, "--size", 64, "--workers", 1, "--no-progress")
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def one_epoch(data, tmp_path_factory) -> Path:
    """A finished one-epoch run: its checkpoint is what the resume tests damage."""
    out = tmp_path_factory.mktemp("base") / "run"
    res = _run("train", "--data", data, "--out", out, "--epochs", 1, *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["epochs_done"] == 1
    return out


# --- 4. flags out of range; a run that diverges ----------------------------------------

OUT_OF_RANGE = [
    ("image_size", 100000),
    ("image_size", 16),
    ("batch_size", 0),
    ("batch_size", 1_000_000),
    ("learning_rate", float("inf")),
    ("learning_rate", float("nan")),
    ("learning_rate", 0.0),
    ("learning_rate", -1e-3),
    ("learning_rate", 5.0),
    ("epochs", 0),
    ("steps_per_epoch", 0),
    ("val_fraction", float("nan")),
    ("val_fraction", 1.0),
    ("plateau_factor", float("inf")),
    ("seed", -1),
]


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE)
def test_each_numeric_flag_out_of_range_is_refused_by_its_flag_name(field, value):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag} must be in .*, not {value!r}"):
        train_config.TrainConfig(data="d", **{field: value})
    train_config.TrainConfig(data="d")  # the defaults are in range


@pytest.mark.parametrize(
    ("flag", "value"), [("--image-size", "100000"), ("--learning-rate", "inf")]
)
def test_out_of_range_flags_end_train_in_one_line_before_tensorflow_is_imported(
    data, tmp_path, flag, value
):
    # TensorFlow made unimportable: a run that got as far as starting it fails differently
    script = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "from chexlib.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, flag, value]
    res = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert res.returncode == 2, res.stderr[-3000:]
    line = _error_line(res)
    assert f"{flag} must be in" in line and line.endswith(f"not {value}"), line
    assert not (tmp_path / "run").exists()


def test_a_diverged_epoch_ends_the_run_non_zero_and_keeps_the_last_good_checkpoint(
    data, one_epoch, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    # epoch 2 goes on at a learning rate of 1e30 (a checkpoint's): its loss becomes NaN
    state_path = out / "checkpoints" / "epoch-0001" / "state.json"
    state = json.loads(state_path.read_text())
    state["learning_rate"] = 1e30
    state_path.write_text(json.dumps(state))
    metrics = (out / "metrics.json").read_bytes()

    res = _run("train", "--data", data, "--out", out, "--epochs", 2, "--resume", *TINY)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    line = _error_line(res)
    assert "diverged in epoch 2" in line and "loss nan" in line, line
    assert "the last checkpoint, epoch 1, is kept" in line, line
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest == {"dir": "epoch-0001", "epochs_done": 1}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "latest.json"]
    assert (out / "metrics.json").read_bytes() == metrics  # no record of the diverged run


# --- 5. an image that is not a PNG, met during training -----------------------------------


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(buf, format="JPEG")
    return buf.getvalue()


# (split of the damaged image, its new bytes, what the error line says about it)
NOT_PNG = {
    "html-in-train": ("train", lambda png: b"<html><body>502 Bad Gateway</body></html>\n", "not a PNG"),
    "truncated-in-train": ("train", lambda png: png[: len(png) // 2], "cannot decode"),
    "jpeg-in-test": ("test", lambda png: _jpeg_bytes(), "not a PNG"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(NOT_PNG))
def test_an_image_that_does_not_decode_in_training_is_named_in_one_line(data, tmp_path, case):
    split, damage, says = NOT_PNG[case]
    if case.startswith("truncated") and not spng.available():
        pytest.skip("a PNG cut short is named by the libspng decoder; TensorFlow's does not say")
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    table = load_metadata(copy)
    victim = Path(table.loc[table["split"] == split, "path"].iloc[0])
    victim.write_bytes(damage(victim.read_bytes()))
    out = tmp_path / "run"

    batch = int((table["split"] == "train").sum())  # one step: every training image, epoch 1
    res = _run("train", "--data", copy, "--out", out, "--epochs", 1, *TINY, "--batch-size", batch)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    line = _error_line(res)
    assert f"{victim}: {says}" in line, line
    if split == "test":  # met after the epoch's checkpoint: the line says it is kept
        assert json.loads((out / "checkpoints" / "latest.json").read_text())["epochs_done"] == 1
        assert "the last checkpoint, epoch 1, is kept" in line, line
    else:  # met in the first epoch: nothing was checkpointed, and the line says so
        assert not (out / "checkpoints" / "latest.json").exists()
        assert "no checkpoint in" in line, line


# --- 6. verify-records: a source image replaced after the conversion ----------------------


@pytest.mark.parametrize("variant", ["png", "compact"])
def test_verify_records_fails_naming_a_source_image_replaced_by_another_valid_one(
    data, tmp_path, variant
):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    records = tmp_path / "records"
    extra = ["--size", 32] if variant == "compact" else []
    res = _run("convert", copy, records, "--variant", variant, *extra, "--workers", 1,
               "--no-progress")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    check = ("verify-records", records, "--data", copy, "--no-progress")
    assert _run(*check).returncode == 0

    table = load_metadata(copy)
    victim = Path(table["path"].iloc[3])
    rng = np.random.default_rng(1)  # another valid 64 px grey PNG under the same name
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(victim)
    res = _run(*check)
    assert res.returncode == 1, res.stdout[-3000:]
    diffs = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("DIFF")]
    assert len(diffs) == 1, res.stdout[-3000:]
    assert f"{victim.name}: stored image differs from its source file {victim}" in diffs[0]
    assert "FAILED: 1 difference(s)" in res.stdout


# --- 7. damaged checkpoint records; an empty training split; SIGTERM ------------------------

DAMAGE = {  # what is written where, relative to the run's checkpoints/ folder
    "pointer without dir": ("latest.json", '{"epochs_done": 1}'),
    "pointer out of its folder": ("latest.json", '{"dir": "../..", "epochs_done": 1}'),
    "state without learning rate": ("epoch-0001/state.json", None),
    "index not a table": ("epoch-0001/ckpt.index", "junk"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_the_file(
    data, one_epoch, tmp_path, case
):
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    name, text = DAMAGE[case]
    damaged = out / "checkpoints" / name
    if text is None:
        state = json.loads(damaged.read_text())
        del state["learning_rate"]
        text = json.dumps(state)
    damaged.write_text(text)

    res = _run("train", "--data", data, "--out", out, "--epochs", 2, "--resume", *TINY)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    line = _error_line(res)
    assert str(damaged) in line, line
    assert (out / "checkpoints" / "epoch-0001" / "ckpt.index").exists()  # nothing removed


def test_a_validation_split_that_leaves_no_training_image_is_refused(data, tmp_path):
    train_val = len((data / "train_val_list.txt").read_text().split())
    test = len((data / "test_list.txt").read_text().split())
    counts = f"train 0, val {train_val}, test {test}"
    with pytest.raises(DataError, match=f"the train split is empty \\(images: {counts}\\)"):
        load_metadata(data, val_fraction=0.99)
    assert (load_metadata(data, val_fraction=0.1)["split"] == "train").sum() > 0

    res = _run("convert", data, tmp_path / "records", "--val-fraction", 0.99, "--no-progress")
    assert res.returncode == 2 and "train split is empty" in _error_line(res, "convert")
    res = _run("train", "--data", data, "--out", tmp_path / "run", "--val-fraction", 0.99, *TINY)
    assert res.returncode == 2, res.stderr[-3000:]
    line = _error_line(res)
    assert f"the train split is empty (images: {counts})" in line and "val_fraction 0.99" in line


def test_sigterm_ends_train_with_one_line_naming_the_checkpoint_kept_and_status_143(data, tmp_path):
    out = tmp_path / "run"
    argv = [CHEXLIB, "train", "--data", data, "--out", out, "--epochs", 1000, *TINY]
    proc = subprocess.Popen(
        list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "latest.json").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    done = json.loads((out / "checkpoints" / "latest.json").read_text())["epochs_done"]
    assert 1 <= done < 1000
    last = stderr.strip().splitlines()[-1]
    assert last == (
        f"chexlib train: terminated (SIGTERM); the last checkpoint, epoch {done}, is kept in "
        f"{out / 'checkpoints'}"
    ), stderr[-3000:]

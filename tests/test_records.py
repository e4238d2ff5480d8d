"""chexlib.records.read (and records_*): conversion round trips, resume after a kill, stale shards, skips, verification."""

from __future__ import annotations

import hashlib
import json
import math
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

from chexlib.cli.main import main as cli_main
from chexlib.data.metadata import LABELS, SPLITS, DataError
from chexlib.data.png import read_grayscale
from chexlib.records import convert, read, schema, shards
from chexlib.records.manifest import MANIFEST, STATE_DIR

SHARD = 16  # records per shard in these tests; no split of the fixture is a multiple of it


def _convert(data_dir, out, **kwargs):
    kwargs = {"images_per_shard": SHARD, "workers": 2, "progress": False, **kwargs}
    return convert.convert(data_dir, out, **kwargs)


def _read_all(records_dir, split):
    import tensorflow as tf

    ds = tf.data.TFRecordDataset(read.list_shards(records_dir, split)).map(read.parse_example)
    return list(ds.as_numpy_iterator())


def _shas(records_dir) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(records_dir).glob("*.tfrecord"))
    }


@pytest.fixture(scope="module")
def png_records(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "png"
    return out, _convert(synth_dir, out)


@pytest.fixture(scope="module")
def compact_records(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "compact"
    return out, _convert(synth_dir, out, variant="compact", size=32)


# --- the record bytes ---------------------------------------------------------------


def test_crc32c_matches_reference_for_every_length():
    assert schema.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert schema.crc32c(b"") == 0
    rng = np.random.default_rng(0)
    for n in (1, 7, 1023, 1024, 1025, 4099, 65536, 100_003):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        reg = 0xFFFFFFFF
        for byte in data:  # bit-by-bit reference
            reg ^= byte
            for _ in range(8):
                reg = (reg >> 1) ^ 0x82F63B78 if reg & 1 else reg >> 1
        expected = reg ^ 0xFFFFFFFF
        assert schema._crc32c_numpy(data) == expected, n
        assert schema.crc32c(data) == expected, n


def test_hand_encoded_example_equals_tensorflow_example():
    import tensorflow as tf

    labels = [1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    data = schema.encode_example(b"\x00\xffpixels", "raw", 2, 4, labels, "00000001_000.png", 30805)
    feature = tf.train.Feature
    expected = tf.train.Example(
        features=tf.train.Features(
            feature={
                "image/encoded": feature(bytes_list=tf.train.BytesList(value=[b"\x00\xffpixels"])),
                "image/format": feature(bytes_list=tf.train.BytesList(value=[b"raw"])),
                "image/height": feature(int64_list=tf.train.Int64List(value=[2])),
                "image/width": feature(int64_list=tf.train.Int64List(value=[4])),
                "image/label": feature(int64_list=tf.train.Int64List(value=labels)),
                "image/filename": feature(
                    bytes_list=tf.train.BytesList(value=[b"00000001_000.png"])
                ),
                "image/patient_id": feature(int64_list=tf.train.Int64List(value=[30805])),
            }
        )
    )
    assert tf.train.Example.FromString(data) == expected
    parsed = read.parse_example(tf.constant(data))
    assert parsed["image/label"].numpy().tolist() == labels
    assert set(read.feature_spec()) == set(schema.SCHEMA)


# --- round trips ----------------------------------------------------------------------


def test_png_round_trip_keeps_every_image_in_exactly_one_record(png_records, synth_metadata):
    import tensorflow as tf

    out, manifest = png_records
    assert manifest["variant"] == "png" and manifest["format"] == "png" and manifest["complete"]
    for split in SPLITS:
        part = synth_metadata[synth_metadata["split"] == split].set_index("image")
        assert len(part) % SHARD != 0  # the remainder must not be dropped
        files = read.list_shards(out, split)
        k = math.ceil(len(part) / SHARD)
        assert [Path(f).name for f in files] == [
            f"{split}-{i:05d}-of-{k:05d}.tfrecord" for i in range(k)
        ]
        per_shard = [s["records"] for s in manifest["shards"] if s["split"] == split]
        assert sum(per_shard) == len(part) and max(per_shard) - min(per_shard) <= 1
        rows = _read_all(out, split)
        names = [r["image/filename"].decode() for r in rows]
        assert sorted(names) == sorted(part.index)  # each image once
        for row, name in zip(rows, names, strict=True):
            meta = part.loc[name]
            assert row["image/label"].tolist() == meta[list(LABELS)].tolist()
            assert row["image/patient_id"] == meta["patient_id"]
            assert row["image/format"] == b"png"
            assert row["image/encoded"] == Path(meta["path"]).read_bytes()  # the original file
            assert (row["image/height"], row["image/width"]) == (128, 128)
        sample = rows[0]
        decoded = tf.io.decode_png(sample["image/encoded"], channels=1).numpy()[..., 0]
        np.testing.assert_array_equal(decoded, read_grayscale(part.loc[names[0], "path"]))
        assert manifest["splits"][split] == {
            "images": len(part),
            "records": len(part),
            "skipped": 0,
            "shards": k,
            "bytes": sum(Path(f).stat().st_size for f in files),
        }
    assert {s["sha256"] for s in manifest["shards"]} == set(_shas(out).values())


def test_compact_records_hold_one_resized_channel(compact_records, synth_metadata):
    out, manifest = compact_records
    assert (manifest["format"], manifest["size"], manifest["resample"]) == (
        "raw",
        32,
        shards.RESAMPLE,
    )
    rows = _read_all(out, "val")
    part = synth_metadata.set_index("image")
    assert len(rows) == manifest["splits"]["val"]["records"]
    for row in rows[:5]:
        assert row["image/format"] == b"raw" and (row["image/height"], row["image/width"]) == (
            32,
            32,
        )
        pixels = np.frombuffer(row["image/encoded"], np.uint8)
        assert pixels.size == 32 * 32  # one channel
        source = Image.fromarray(read_grayscale(part.loc[row["image/filename"].decode(), "path"]))
        reference = source.resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0)
        np.testing.assert_array_equal(pixels.reshape(32, 32), np.asarray(reference))


def test_same_input_gives_identical_shards_for_any_worker_count(
    synth_dir, compact_records, tmp_path
):
    out, _ = compact_records
    one = _convert(synth_dir, tmp_path / "w1", variant="compact", size=32, workers=1)
    assert one["conversion"]["workers"] == 1
    assert _shas(tmp_path / "w1") == _shas(out)


def test_shards_option_sets_shards_per_split(synth_dir, tmp_path):
    manifest = _convert(
        synth_dir, tmp_path / "k3", shards=3, variant="compact", size=16, compact_format="jpeg"
    )
    assert manifest["format"] == "jpeg"
    assert {s: t["shards"] for s, t in manifest["splits"].items()} == {s: 3 for s in SPLITS}
    assert manifest["settings"]["images_per_shard"] is None and manifest["settings"]["shards"] == 3
    assert all(len(read.list_shards(tmp_path / "k3", s)) == 3 for s in SPLITS)


# --- resume, stale shards --------------------------------------------------------------


@pytest.mark.slow
def test_conversion_killed_part_way_resumes_to_the_uninterrupted_result(
    synth_dir, png_records, tmp_path
):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "chexlib.cli.main", "convert", str(synth_dir), str(out)]
    cmd += ["--images-per-shard", "1", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tfrecord")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the conversion finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its worker processes
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = list(out.glob("*.tfrecord"))
    assert 0 < len(done) < 120 and not (out / MANIFEST).exists()
    with pytest.raises(FileNotFoundError, match="resume"):
        read.list_shards(out, "train")
    import tensorflow as tf

    for path in done:  # renamed only when complete: every visible shard reads cleanly
        assert sum(1 for _ in tf.data.TFRecordDataset(str(path))) == 1

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    manifest = read.read_manifest(out)
    assert manifest["conversion"]["shards_reused"] >= len(done) - 1  # the last may lack its sidecar
    assert not list((out / STATE_DIR).glob("*.tmp"))

    fresh = _convert(synth_dir, tmp_path / "fresh", images_per_shard=1)
    assert _shas(out) == _shas(tmp_path / "fresh")
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in fresh["shards"]]
    # ... and a different shard size from the same data gives different files (sanity)
    assert _shas(out) != _shas(png_records[0])


def test_other_settings_or_data_never_reuse_stale_shards(
    synth_dir, png_records, compact_records, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(png_records[0], out)
    before = _shas(out)
    with pytest.raises(shards.RecordsError, match="variant: 'png' -> 'compact'") as err:
        _convert(synth_dir, out, variant="compact", size=32)
    assert "--overwrite" in str(err.value)
    assert _shas(out) == before  # refused without touching anything
    _convert(synth_dir, out, variant="compact", size=32, overwrite=True)
    assert _shas(out) == _shas(compact_records[0])  # no png shard left behind

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)  # copy2 keeps times: the same fingerprint
    out2 = tmp_path / "out2"
    shutil.copytree(png_records[0], out2)
    manifest = _convert(data, out2)
    assert manifest["conversion"]["shards_reused"] == len(manifest["shards"])
    image = next((data / "images").glob("*.png"))
    Image.fromarray(255 - read_grayscale(image)).save(image)  # the same image, changed
    with pytest.raises(shards.RecordsError, match="source dataset fingerprint"):
        _convert(data, out2)


def test_a_damaged_shard_is_rewritten_not_reused(synth_dir, png_records, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(png_records[0], out)
    victim = out / png_records[1]["shards"][0]["file"]
    damaged = bytearray(victim.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    victim.write_bytes(bytes(damaged))
    manifest = _convert(synth_dir, out)
    assert manifest["conversion"]["shards_written"] == 1
    assert _shas(out) == _shas(png_records[0])


# --- bad images, verification ----------------------------------------------------------


def test_skip_bad_lists_every_skipped_image_and_counts_it(synth_dir, synth_metadata, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    corrupt, missing = sorted((data / "images").glob("*.png"))[3:5]
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated
    with pytest.raises(
        shards.RecordsError, match=f"{corrupt.name}.*cannot decode(.|\n)*--skip-bad"
    ):
        _convert(data, tmp_path / "strict1")
    missing.unlink()
    with pytest.raises(DataError, match=missing.name):
        _convert(data, tmp_path / "strict2")

    manifest = _convert(data, tmp_path / "lenient", skip_bad=True)
    skipped = {e["image"]: e for e in manifest["skipped"]}
    assert set(skipped) == {corrupt.name, missing.name}
    assert "cannot decode" in skipped[corrupt.name]["reason"]
    assert skipped[missing.name]["reason"] == "missing file"
    split_of = synth_metadata.set_index("image")["split"]
    assert all(e["split"] == split_of[name] for name, e in skipped.items())
    assert (
        manifest["totals"]["records"] == len(synth_metadata) - 2
        and manifest["totals"]["skipped"] == 2
    )
    for split, t in manifest["splits"].items():
        assert (
            t["records"] + t["skipped"] == t["images"] == (synth_metadata["split"] == split).sum()
        )
    assert manifest["settings"]["skip_bad"] is True
    report = read.verify_records(tmp_path / "lenient", data, progress=False)
    assert report.passed, report.differences


def test_verify_records_passes_then_catches_tampering(synth_dir, png_records, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(png_records[0], out)
    assert cli_main(["verify-records", str(out), "--data", str(synth_dir), "--no-progress"]) == 0
    assert "PASSED" in capsys.readouterr().out

    # 1. bytes flipped inside a record: sha256 and TensorFlow's CRC both object
    shard = out / png_records[1]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    report = read.verify_records(out, synth_dir, progress=False)
    assert not report.passed
    assert any(shard.name in d and "sha256" in d for d in report.differences)

    # 2. a well-formed shard with one wrong label, and a manifest updated to match its sha256
    import tensorflow as tf

    shutil.copy2(png_records[0] / shard.name, shard)
    examples = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(shard))]
    label = examples[0].features.feature["image/label"].int64_list.value
    label[0] = 1 - label[0]
    shard.write_bytes(b"".join(schema.frame_record(e.SerializeToString()) for e in examples))
    manifest = json.loads((out / MANIFEST).read_text())
    entry = next(s for s in manifest["shards"] if s["file"] == shard.name)
    entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (out / MANIFEST).write_text(json.dumps(manifest))
    report = read.verify_records(out, synth_dir, progress=False)
    assert len(report.differences) == 1 and "labels" in report.differences[0], report.differences

    # 3. a shard deleted: its images are reported missing; the command exits non-zero
    shard.unlink()
    assert cli_main(["verify-records", str(out), "--data", str(synth_dir), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert f"{shard.name}: missing" in printed and "in no record" in printed and "FAILED" in printed


def test_reading_errors_name_the_problem(tmp_path, png_records):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read.read_manifest(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(png_records[0], out)
    with pytest.raises(shards.RecordsError, match="unknown split 'holdout'"):
        read.list_shards(out, "holdout")
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(shards.RecordsError, match="incomplete"):
        read.list_shards(out, "train")
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / manifest["shards"][0]["file"]).unlink()
    with pytest.raises(shards.RecordsError, match="missing"):
        read.list_shards(out, "train")


def test_cli_rejects_bad_settings_before_any_work(synth_dir, tmp_path, capsys):
    code = cli_main(
        ["convert", str(synth_dir), str(tmp_path / "x"), "--variant", "compact", "--size", "4"]
    )
    assert code == 2 and "size must be" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_conversion_notebook_runs_under_papermill(synth_dir, tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    from chexlib.study.notebook import KERNEL, run_notebook

    if KERNEL not in KernelSpecManager().find_kernel_specs():
        monkeypatch.setenv("CHEXLIB_KERNEL", "python3")
    out = tmp_path / "run"
    params = {
        "DATA_DIR": str(synth_dir),
        "OUTPUT_DIR": str(out),
        "RECORDS_DIR": str(tmp_path / "records"),
        "IMAGES_PER_SHARD": 32,
        "WORKERS": [1, 2],
        "COMPACT_SIZE": 32,
        "DECODE_SAMPLES": 8,
    }
    run_notebook("02_tfrecord_conversion", out / "02_tfrecord_conversion.ipynb", params)
    metrics = json.loads((out / "metrics.json").read_text())
    sources = {row["source"] for row in metrics["table"]}
    assert sources == {"raw PNG folder", "png records", "compact records"}
    assert len(metrics["table"]) == 5  # the folder, then 2 variants x 2 worker counts
    assert all(v["passed"] for v in metrics["verified"].values())
    assert all(row["decode_ms_per_image"] > 0 for row in metrics["table"])
    assert (out / "conversion.png").stat().st_size > 0
    assert json.loads((out / "params.json").read_text())["compact_size"] == 32


# --- one conversion per folder ------------------------------------------------------------


@pytest.mark.slow
def test_second_conversion_into_one_folder_is_refused_naming_the_first(synth_dir, tmp_path):
    """Two real `chexlib convert` processes into one folder: the second refuses, the first lives."""
    out = tmp_path / "shared"
    cmd = [str(Path(sys.executable).with_name("chexlib")), "convert", str(synth_dir), str(out)]
    cmd += ["--images-per-shard", "1", "--workers", "1", "--no-progress"]
    first = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    lock, deadline = out / shards.LOCK, time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline:
        held = lock.is_file() and f"pid {first.pid} " in lock.read_text()
        if held and list(out.glob("*.tfrecord")):  # locked and part-way through its shards
            break
        time.sleep(0.005)
    assert first.poll() is None, "the first conversion finished before the second started"
    os.killpg(first.pid, signal.SIGSTOP)  # freeze it (and its workers) while holding the lock
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stdout + second.stderr
    assert "Traceback" not in second.stderr
    assert f"another conversion is writing into this folder (pid {first.pid} on" in second.stderr

    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err.decode()  # its temporary shards were left alone
    assert read.verify_records(out, synth_dir, progress=False).passed
    assert not list((out / STATE_DIR).glob("*.tmp"))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # lock released
    assert again.returncode == 0, again.stderr


def test_temporary_shard_names_are_unique_per_process_and_call():
    names = {shards._unique() for _ in range(100)}
    assert len(names) == 100
    assert all(f".{os.getpid()}." in n for n in names)

"""chexlib.train.recipe: config and CLI, AUROC bookkeeping, learning on planted signals, resume.

Training runs here are single-rank (a job of one Horovod rank, in this process or
in a ``chexlib train`` subprocess); the multi-rank runs are in test_launch.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from chexlib.core.run_record import RunRecord
from chexlib.data.metadata import LABELS
from chexlib.report import training
from chexlib.train import checkpoints, evaluate, inputs, recipe
from chexlib.train import config as train_config

CHEXLIB = str(Path(sys.executable).parent / "chexlib")


def tiny_config(data_dir, out, **changes) -> train_config.TrainConfig:
    """A seconds-long run of the tiny test model on a generated dataset."""
    base = dict(
        data=str(data_dir),
        out=str(out),
        model="tiny",
        image_size=32,
        batch_size=8,
        epochs=2,
        warmup_epochs=0,
        verbose=0,
        throughput_warmup_steps=2,
        throughput_window_steps=2,
    )
    return train_config.TrainConfig(**{**base, **changes})


def run_cli(config: train_config.TrainConfig, env: dict | None = None, timeout: float = 300):
    return subprocess.run(
        [CHEXLIB, "train", *train_config.config_to_argv(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# --- config and command line -------------------------------------------------------


def test_config_validates():
    with pytest.raises(ValueError, match="source raw needs --data"):
        train_config.TrainConfig()
    with pytest.raises(ValueError, match="model must be one of"):
        train_config.TrainConfig(data="d", model="vgg")
    with pytest.raises(ValueError, match="source records needs --records"):
        train_config.TrainConfig(source="records", data="d")
    with pytest.raises(ValueError, match="--synthetic without data needs --steps-per-epoch"):
        train_config.TrainConfig(synthetic=True)
    assert (
        train_config.TrainConfig(synthetic=True, steps_per_epoch=5).to_dict()["synthetic"] is True
    )


def test_cli_flags_mirror_the_config():
    parser = argparse.ArgumentParser()
    train_config.add_train_arguments(parser)
    flags = {a.dest for a in parser._actions} - {"help"}
    assert flags == {f.name for f in dataclasses.fields(train_config.TrainConfig)}
    config = train_config.TrainConfig(
        data="/d",
        records="/r",
        source="records",
        pipeline="naive",
        model="resnet50",
        weights="imagenet",
        image_size=256,
        batch_size=64,
        epochs=7,
        steps_per_epoch=9,
        learning_rate=5e-4,
        scale_lr=False,
        warmup_epochs=5,
        precision="bfloat16",
        xla=True,
        synthetic=True,
        resume=True,
        seed=3,
        out="/o",
    )
    assert (
        train_config.config_from_args(parser.parse_args(train_config.config_to_argv(config)))
        == config
    )


def test_fault_spec():
    assert recipe.parse_fault("rank=1,epoch=0,step=3", rank=1) == (0, 3)
    assert recipe.parse_fault("rank=1,epoch=0,step=3", rank=0) is None
    assert recipe.parse_fault(None, rank=0) is None
    with pytest.raises(ValueError, match="rank=R,epoch=E,step=S"):
        recipe.parse_fault("rank=1", rank=1)


def test_epoch_seed_depends_on_seed_and_epoch_only():
    assert inputs.epoch_seed(0, 3) == inputs.epoch_seed(0, 3)
    assert len({inputs.epoch_seed(s, e) for s in range(3) for e in range(5)}) == 15


# --- evaluation bookkeeping ---------------------------------------------------------


def test_auroc_single_valued_and_nan_classes_are_none_with_reason():
    rng = np.random.default_rng(0)
    labels = (rng.random((50, 14)) < 0.3).astype("float32")
    labels[:, 0] = 0  # no positives
    labels[:, 1] = 1  # no negatives
    scores = rng.random((50, 14)).astype("float32")
    scores[:, 2] = np.nan  # a diverged model
    scores[:, 3] = labels[:, 3]  # perfect
    values, reasons = evaluate.auroc_per_class(labels, scores, "val")
    assert list(values) == list(LABELS)
    assert (
        values["Atelectasis"] is None and "only negative examples in val" in reasons["Atelectasis"]
    )
    assert values["Cardiomegaly"] is None and "only positive" in reasons["Cardiomegaly"]
    assert values["Effusion"] is None and "not finite" in reasons["Effusion"]
    assert values["Infiltration"] == 1.0
    assert set(reasons) == {"Atelectasis", "Cardiomegaly", "Effusion"}
    defined = [v for v in values.values() if v is not None]
    assert evaluate.mean_auroc(values) == pytest.approx(np.mean(defined))
    assert evaluate.mean_auroc(dict.fromkeys(LABELS)) is None


def test_binary_crossentropy_matches_keras():
    import tensorflow as tf

    rng = np.random.default_rng(1)
    labels = (rng.random((20, 14)) < 0.3).astype("float32")
    scores = rng.random((20, 14)).astype("float32")
    keras = float(tf.keras.losses.BinaryCrossentropy()(labels, scores))
    assert evaluate.binary_crossentropy(labels, scores) == pytest.approx(keras, rel=1e-5)


def test_throughput_warms_up_once_per_run_and_skips_each_epochs_first_step():
    from chexlib.train.callbacks import ThroughputCallback, throughput_summary

    cb = ThroughputCallback(batch_size=4, warmup_steps=2, window_steps=3)
    for epoch in range(2):
        cb.on_epoch_begin(epoch)
        for step in range(7):
            slow = (epoch, step) in {(0, 0), (0, 1), (1, 0)}  # warm-up, and after evaluation
            time.sleep(0.2 if slow else 0.02)
            cb.on_train_batch_end(step)
    # epoch 0: steps 0-1 warm-up, 2-6 timed; epoch 1: step 0 untimed (no end before it), 1-6 timed
    assert [(e, b) for e, b, _ in cb.timed] == [(0, b) for b in range(2, 7)] + [
        (1, b) for b in range(1, 7)
    ]
    rates, index, note = cb.result()
    assert len(rates) == 3 and index == [0, 1, 2] and note is None  # 11 timed steps // 3
    assert all(50 < r < 4 / 0.02 * 1.01 for r in rates)  # ~200 images/s, far above warm-up's 20
    summary = throughput_summary(rates)
    assert summary["windows"] == 3 and summary["ci95"] == pytest.approx(1.96 * np.std(rates))
    assert throughput_summary([])["median"] is None
    assert cb.epoch_rate(1) is not None and cb.epoch_rate(5) is None


def test_short_runs_report_what_was_timed_never_nothing():
    from chexlib.train.callbacks import measured_rates, throughput_summary

    # 8 epochs of 18 steps, warm-up 10, windows of 10: the old per-epoch warm-up timed nothing
    timed = [(e, b, 0.1) for e in range(8) for b in range(1, 18) if e * 18 + b >= 10]
    rates, _, note = measured_rates(timed, [], batch_size=8, window=10)
    assert len(rates) == len(timed) // 10 == 12 and note is None
    assert rates[0] == pytest.approx(80.0)
    # fewer timed steps than one window: their rate, with a note
    rates, _, note = measured_rates(timed[:4], [], batch_size=8, window=10)
    assert rates == [pytest.approx(80.0)] and "rate over 4 timed steps" in note
    summary = throughput_summary(rates, note)
    assert summary["median"] == pytest.approx(80.0) and summary["windows"] == 0
    assert summary["ci95"] is None and summary["note"] == note
    # every step was warm-up: the warm-up steps' rate, with a note
    rates, _, note = measured_rates([], [(0, 1, 0.5), (0, 2, 0.5)], batch_size=8, window=10)
    assert rates == [pytest.approx(16.0)] and "warm-up" in note
    assert measured_rates([], [], 8, 10)[0] == []


def test_paired_windows_stay_aligned_with_the_dataset_across_epochs():
    """The dataset picks synthetic batches by step count in each epoch; the callback's
    windows must cover exactly the same steps, in every epoch, also after warm-up ends."""
    import tensorflow as tf

    from chexlib.train.callbacks import ThroughputCallback, full_windows, untimed_steps

    steps, warmup, window = 7, 9, 2  # warm-up runs into the second epoch
    config = train_config.TrainConfig(
        data="unused", batch_size=2, image_size=32, throughput_warmup_steps=warmup,
        throughput_window_steps=window, paired_synthetic=True,
    )  # fmt: skip
    real = tf.data.Dataset.from_tensors(
        (tf.zeros([2, 32, 32, 1], tf.uint8), tf.zeros([2, 14]))
    ).repeat()
    cb = ThroughputCallback(2, warmup, window, paired=True)
    kinds = {}
    for epoch in range(4):
        untimed = untimed_steps(warmup, steps, epoch)
        batches = inputs.paired_with_synthetic(real, config, untimed).take(steps)
        kinds[epoch] = ["real" if not np.any(x.numpy()) else "synthetic" for x, _ in batches]
        cb.on_epoch_begin(epoch)
        for step in range(steps):
            cb.on_train_batch_end(step)
    windows = full_windows(cb.timed, window, per_epoch=True)
    assert windows, "some windows were timed"
    for epoch in range(4):
        batches = [b for e, b, _ in cb.timed if e == epoch]
        for k in range(len([w for w in windows if w[0] == epoch])):
            chunk = {kinds[epoch][b] for b in batches[k * window : (k + 1) * window]}
            assert chunk == {"real" if k % 2 == 0 else "synthetic"}, (epoch, k, chunk)
    assert kinds[0][:warmup] == ["real"] * steps  # the whole first epoch is warm-up


# --- training runs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    """1,500 generated images at 64 px: enough positives per class for a stable AUROC."""
    from chexlib.synth.generate import generate

    out = tmp_path_factory.mktemp("planted") / "data"
    generate(out, n_images=1500, size=64, seed=3, workers=2, progress=False)
    return out


@pytest.mark.slow
def test_tiny_model_learns_planted_signals(planted_dir, tmp_path):
    """Mean AUROC far above chance on the planted patterns (0.80-0.92 seen over seeds; threshold 0.75)."""
    config = tiny_config(planted_dir, tmp_path / "run", image_size=64, batch_size=32, epochs=8)
    record = recipe.train(config)
    assert record.history[-1]["val_mean_auroc"] >= 0.75
    assert record.mean_auroc >= 0.75 and record.auroc_split == "test"
    # the run record has the keys the study reads
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in (
        "images_per_sec",
        "images_per_sec_per_rank",
        "auroc",
        "mean_auroc",
        "history",
        "ranks",
    ):
        assert key in saved
    assert list(saved["auroc"]) == list(LABELS) and saved["ranks"] == 1
    versions = saved["environment"]["versions"]
    assert saved["images_per_sec"] > 0 and versions["horovod"] == "0.28.1"
    assert versions.get("tensorflow") or versions.get("tensorflow-cpu")
    assert "CPU" in saved["environment"]["hardware"] or saved["environment"]["gpus"]
    splits = _split_counts(planted_dir)  # every val and test image counted exactly once
    assert (saved["val_images"], saved["test_images"]) == (splits["val"], splits["test"])
    assert len(saved["history"]) == 8 and saved["history"][0]["val_auroc"].keys() == set(LABELS)
    assert json.loads((tmp_path / "run" / "params.json").read_text())["model"] == "tiny"
    assert (tmp_path / "run" / "history.csv").exists() and (tmp_path / "run" / "auroc.csv").exists()


def _split_counts(data_dir) -> dict:
    from chexlib.data.metadata import load_metadata

    return load_metadata(data_dir)["split"].value_counts().to_dict()


def _digest(model) -> str:
    digest = hashlib.sha256()
    for var in model.variables:
        digest.update(np.ascontiguousarray(var.numpy()).tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_resume_after_a_killed_run_matches_an_uninterrupted_run(synth_dir, tmp_path):
    common = dict(epochs=3, warmup_epochs=1, deterministic=True)
    whole = recipe.train(tiny_config(synth_dir, tmp_path / "whole", **common))

    killed = tiny_config(synth_dir, tmp_path / "killed", **common)
    proc = run_cli(killed, env={recipe.FAULT_ENV: "rank=0,epoch=2,step=3"})
    assert proc.returncode == recipe.FAULT_EXIT_CODE, proc.stderr[-2000:]
    latest = json.loads((tmp_path / "killed" / "checkpoints" / "latest.json").read_text())
    assert latest["epochs_done"] == 2  # epoch 3 died before its checkpoint
    assert not (tmp_path / "killed" / "metrics.json").exists()

    other = dataclasses.replace(killed, resume=True, seed=1, pipeline="naive", image_size=48)
    with pytest.raises(ValueError, match="other settings") as refused:
        recipe.train(other)
    for difference in ("seed: checkpoint 0, this run 1", "pipeline: checkpoint 'optimized', this "
                       "run 'naive'", "image_size: checkpoint 32, this run 48"):  # fmt: skip
        assert difference in str(refused.value)
    resumed = recipe.train(dataclasses.replace(killed, resume=True))
    assert resumed.resumed_from_epoch == 2
    for a, b in zip(whole.history, resumed.history, strict=True):
        for key in ("loss", "val_loss", "val_mean_auroc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["epoch"], key)
    assert resumed.mean_auroc == pytest.approx(whole.mean_auroc, abs=1e-6)
    assert resumed.images_per_sec > 0  # one epoch of 8 steps after the resume is timed

    # resuming a finished run trains nothing and leaves its record byte for byte
    record = (tmp_path / "whole" / "metrics.json").read_bytes()
    again = run_cli(dataclasses.replace(killed, out=str(tmp_path / "whole"), resume=True))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to train" in again.stdout
    assert (tmp_path / "whole" / "metrics.json").read_bytes() == record
    finished = recipe.train(dataclasses.replace(killed, out=str(tmp_path / "whole"), resume=True))
    assert finished == RunRecord.from_dict(json.loads(record))  # the stored record, typed

    # the checkpoint is also a --weights source: the final model, variable for variable
    from chexlib.train.models import build_model

    loaded = build_model("tiny", image_size=32, weights=str(tmp_path / "killed"))
    assert _digest(loaded) == resumed.weights_sha256_per_rank[0]


def test_resume_settings_cover_what_changes_the_result(synth_dir):
    config = tiny_config(synth_dir, "/runs/a")
    from chexlib.data.metadata import load_metadata

    fingerprint = checkpoints.data_fingerprint(config, load_metadata(synth_dir))
    saved = checkpoints.result_settings(config, ranks=2, fingerprint=fingerprint)
    assert {"seed", "pipeline", "source", "model", "learning_rate", "batch_size"} <= set(saved)
    assert not {"out", "epochs", "verbose", "horovod_timeline", "data"} & set(saved)  # no effect
    moved = dataclasses.replace(config, out="/elsewhere", epochs=9, data="/copy/of/the/data")
    assert (
        checkpoints.resume_differences(saved, checkpoints.result_settings(moved, 2, fingerprint))
        == []
    )
    changed = dataclasses.replace(config, seed=4, learning_rate=0.5)
    differences = checkpoints.resume_differences(
        saved, checkpoints.result_settings(changed, 1, "f" * 64)
    )
    assert [d.split(":")[0] for d in differences] == [
        "learning_rate", "seed", "ranks", "data_fingerprint",
    ]  # fmt: skip
    assert checkpoints.data_fingerprint(dataclasses.replace(config, data=None, synthetic=True,
                                                  steps_per_epoch=3)) is None  # fmt: skip


@pytest.mark.slow
def test_two_ranks_killed_then_resumed_match_an_uninterrupted_run(synth_dir, tmp_path):
    """horovodrun, 2 ranks: rank 1 dies in epoch 2; the resumed job ends like a whole one."""
    common = dict(epochs=2, warmup_epochs=1, deterministic=True, batch_size=4,
                  steps_per_epoch=6)  # fmt: skip
    whole = tiny_config(synth_dir, tmp_path / "whole", **common)
    proc = run_horovodrun(whole)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tiny_config(synth_dir, tmp_path / "killed", **common)
    proc = run_horovodrun(killed, env={recipe.FAULT_ENV: "rank=1,epoch=1,step=2"})
    assert proc.returncode != 0
    latest = json.loads((tmp_path / "killed" / "checkpoints" / "latest.json").read_text())
    assert latest["epochs_done"] == 1 and not (tmp_path / "killed" / "metrics.json").exists()
    proc = run_horovodrun(dataclasses.replace(killed, resume=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("whole", "killed"))
    assert b["resumed_from_epoch"] == 1 and b["ranks"] == a["ranks"] == 2
    assert a["weights_in_sync"] and b["weights_in_sync"]
    for x, y in zip(a["history"], b["history"], strict=True):
        for key in ("loss", "val_loss", "val_mean_auroc", "lr"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["epoch"], key)
    assert b["mean_auroc"] == pytest.approx(a["mean_auroc"], abs=1e-6)


def run_horovodrun(config: train_config.TrainConfig, np: int = 2, env: dict | None = None):
    from chexlib.launch.horovodrun import horovodrun_command

    return subprocess.run(
        horovodrun_command(config, np=np),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_eight_short_epochs_report_images_per_sec(synth_dir, tmp_path):
    """8 epochs of 18 steps with the default warm-up and window (10, 10): timed, never null."""
    config = tiny_config(
        synth_dir, tmp_path / "short", epochs=8, batch_size=2, steps_per_epoch=18,
        throughput_warmup_steps=10, throughput_window_steps=10, evaluate=False, checkpoint=False,
    )  # fmt: skip
    record = recipe.train(config)
    per_rank = record.throughput["per_rank"][0]
    assert record.images_per_sec > 0 and record.throughput["note"] is None
    assert record.throughput["timed_steps"] == 8 + 7 * 17  # warm-up once, then each epoch's
    assert per_rank["windows"] == 12  # first step after the epoch boundary not timed
    assert all(h["images_per_sec"] > 0 for h in record.history[1:])

    tiny = recipe.train(dataclasses.replace(config, out=str(tmp_path / "tiny"), epochs=1,
                                       steps_per_epoch=5))  # fmt: skip
    assert tiny.images_per_sec > 0 and "warm-up" in tiny.throughput["note"]


def test_existing_checkpoint_needs_resume(synth_dir, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text('{"dir": "epoch-0001"}')
    from chexlib.cli.main import main

    assert (
        main(["train", *train_config.config_to_argv(tiny_config(synth_dir, tmp_path / "run"))]) == 2
    )


@pytest.mark.slow
def test_synthetic_run_measures_throughput_without_data(tmp_path):
    config = train_config.TrainConfig(
        synthetic=True,
        steps_per_epoch=10,
        model="tiny",
        image_size=32,
        batch_size=4,
        epochs=1,
        out=str(tmp_path / "syn"),
        verbose=0,
        throughput_warmup_steps=2,
        throughput_window_steps=2,
    )
    record = recipe.train(config)
    assert record.images_per_sec > 0 and record.throughput["per_rank"][0]["windows"] == 4
    assert record.mean_auroc is None and set(record.auroc_reasons.values()) == {
        "synthetic data: no evaluation"
    }
    assert json.loads((tmp_path / "syn" / "metrics.json").read_text())["synthetic"] is True


def test_paired_windows_alternate_real_and_synthetic_batches():
    import numpy as np
    import tensorflow as tf

    config = train_config.TrainConfig(
        synthetic=False, data="unused", batch_size=2, image_size=32,
        throughput_warmup_steps=3, throughput_window_steps=2, paired_synthetic=True,
    )  # fmt: skip
    real = tf.data.Dataset.from_tensors(
        (tf.zeros([2, 32, 32, 1], tf.uint8), tf.zeros([2, 14]))
    ).repeat()  # real batches are all zeros; synthetic ones are random grey levels
    kinds = [
        "real" if not np.any(images.numpy()) else "synthetic"
        for images, _ in inputs.paired_with_synthetic(real, config).take(11)
    ]
    assert kinds == ["real"] * 3 + ["real", "real", "synthetic", "synthetic"] * 2
    from chexlib.train.callbacks import paired_summary

    pairs = paired_summary([10.0, 20.0, 9.0, 10.0, 5.0], [0, 1, 2, 3, 0])
    assert pairs["pairs"] == 2 and pairs["ratio_median"] == pytest.approx(0.7)


@pytest.mark.slow
def test_paired_synthetic_run_reports_real_over_synthetic(synth_dir, tmp_path):
    config = tiny_config(
        synth_dir,
        tmp_path / "paired",
        epochs=1,
        batch_size=4,
        steps_per_epoch=9,  # the whole training shard of the test dataset at batch 8
        throughput_warmup_steps=0,
        paired_synthetic=True,
    )  # the first step (never timed), then 4 windows of 2: real, synthetic, real, synthetic
    result = subprocess.run(
        [CHEXLIB, "train", *train_config.config_to_argv(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "paired" / "metrics.json").read_text())
    paired = metrics["paired_synthetic"][0]
    assert paired["pairs"] == 2 and paired["real_median"] > 0 and paired["synthetic_median"] > 0
    assert metrics["fraction_of_synthetic_paired"] == pytest.approx(paired["ratio_median"])
    assert metrics["throughput"]["per_rank"][0]["windows"] == 2  # images/s from real windows only
    assert metrics["mean_auroc"] is None  # half the steps saw random data: no evaluation
    record = RunRecord.from_dict(metrics)
    ceiling = training.paired_ceiling(record)  # what the notebook plots and records as the ceiling
    assert ceiling.images_per_sec == pytest.approx(paired["synthetic_median"])
    assert training.throughput_frame({"synthetic (paired)": ceiling})["windows"].tolist() == [2]
    assert training.paired_ceiling(dataclasses.replace(record, paired_synthetic=None)) is None
    with pytest.raises(ValueError, match="drop --synthetic"):
        tiny_config(synth_dir, tmp_path / "x", synthetic=True, paired_synthetic=True)


@pytest.mark.slow
def test_mixed_precision_and_xla_on_cpu(synth_dir, tmp_path):
    """Both switches work on CPU (XLA by auto-clustering; a GPU would be needed to see
    float16's speed-up): mixed float16 compute, recorded as such."""
    config = tiny_config(
        synth_dir,
        tmp_path / "mp",
        epochs=1,
        steps_per_epoch=6,
        precision="float16",
        xla=True,
        checkpoint=False,
    )
    proc = run_cli(config, env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Compiled cluster using XLA" in proc.stderr
    metrics = json.loads((tmp_path / "mp" / "metrics.json").read_text())
    assert metrics["precision"] == "float16" and metrics["mixed_precision"] and metrics["xla"]
    assert np.isfinite(metrics["history"][0]["loss"])


# --- compute precision -------------------------------------------------------------


@pytest.mark.parametrize(
    "requested,has_gpu,flags,chosen",
    [
        ("auto", True, set(), "float16"),
        ("auto", False, {"avx2", "avx512_bf16"}, "bfloat16"),
        ("auto", False, {"amx_bf16"}, "bfloat16"),
        ("auto", False, {"avx2", "avx512f"}, "float32"),
        ("bfloat16", False, set(), "bfloat16"),  # asked for: kept, even where it is emulated
        ("float32", True, {"avx512_bf16"}, "float32"),
    ],
)
def test_auto_precision_follows_the_hardware_and_says_why(requested, has_gpu, flags, chosen):
    precision, why = train_config.choose_precision(requested, has_gpu, flags)
    assert precision == chosen
    if chosen == "float32" and requested == "auto":
        assert "no native bfloat16" in why  # a CPU without bf16 is told, not silently slow


def test_bfloat16_keeps_variables_gradients_and_head_in_float32():
    """Under --precision bfloat16 the layers compute in bfloat16 but the weights, the
    gradients Horovod averages across ranks, and the sigmoid head stay float32."""
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    from chexlib.train import process
    from chexlib.train.models import build_model

    hvd.init()
    with process.compute_policy("bfloat16", xla=False):
        assert process.precision_now() == "bfloat16"
        model = build_model("tiny", image_size=32, weights="none")
        x = tf.random.uniform([4, 32, 32, 3])
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_mean(tf.keras.losses.binary_crossentropy(tf.ones_like(out), out))
        grads = tape.gradient(loss, model.trainable_variables)
        inner = [layer for layer in model.layers if layer.compute_dtype == "bfloat16"]
        assert inner, "no layer computes in bfloat16"
        assert out.dtype == tf.float32 and loss.dtype == tf.float32
        assert {v.dtype for v in model.trainable_variables} == {tf.float32}
        assert {g.dtype for g in grads} == {tf.float32}  # what the allreduce averages
    assert process.precision_now() == "float32"  # reset after the run


@pytest.mark.slow
def test_a_bfloat16_run_learns_the_planted_findings_as_well_as_float32(planted_dir, tmp_path):
    """Same seed and data: the bf16 run's test AUROC within 0.03 of float32's."""
    aurocs = {}
    for precision in ("float32", "bfloat16"):
        config = tiny_config(
            planted_dir, tmp_path / precision, image_size=64, batch_size=32, epochs=8,
            precision=precision,
        )  # fmt: skip
        record = recipe.train(config)
        assert record.precision == precision
        aurocs[precision] = record.mean_auroc
    assert aurocs["float32"] >= 0.75
    assert abs(aurocs["bfloat16"] - aurocs["float32"]) <= 0.03, aurocs

"""chexlib.bench.measure: timing windows, the limit, the simulated device, the CLI and notebook 03.

Timings are not asserted (benchmarks are not tests): only that the numbers
exist, are consistent with each other and are labelled as they should be.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from chexlib.bench import config, measure, peers, sweeps, timing
from chexlib.cli.main import main
from chexlib.report import benchmarks

TINY = dict(
    batch_size=4,
    image_size=32,
    warmup_batches=1,
    batches=4,
    windows=2,
    single_core_batches=2,
    min_window_sec=0.0,
)


def fake_batches(seconds_per_batch: float, n: int = 4):
    batch = (np.zeros((n, 2)), np.zeros((n, 14)))

    def next_batch():
        time.sleep(seconds_per_batch)
        return batch

    return next_batch


def test_a_window_lasts_at_least_min_window_sec():
    timed = timing.time_batches(
        fake_batches(0.0), warmup=0, batches=2, windows=2, min_window_sec=0.2
    )
    assert len(timed.window_rates) == 2 and timed.wall_sec >= 0.4
    assert timed.images > 2 * 4  # more batches than asked were pulled to fill the time


def test_time_batches_windows_and_simulated_utilization():
    # What time_batches decides is asserted exactly: windows, images, the device's busy
    # time (the intended n / rate, never the measured sleep) and utilization = busy / wall.
    # time.sleep never returns early, so every bound below that rests on it holds on a
    # loaded machine; the one upper bound on overhead keeps a wide margin (see there).
    pulls = []

    def counted(next_batch):
        def pull():
            pulls.append(1)
            return next_batch()

        return pull

    fast = timing.time_batches(
        counted(fake_batches(0.0)), warmup=1, batches=6, windows=3, device_rate=200.0
    )
    assert len(pulls) == 1 + 6  # the warm-up batch, then 2 per window
    assert len(fast.window_rates) == 3 and fast.images == 24
    assert fast.busy_sec == pytest.approx(24 / 200.0)  # intended busy time, not measured
    summary = fast.summary(200.0)
    assert summary["device"] == config.SIMULATED and "simulated" in summary["device"]
    assert summary["device_busy_sec"] == fast.busy_sec
    assert summary["utilization"] == fast.busy_sec / fast.wall_sec
    # the device sleeps 8 / 200 s per window of 8 images: no window can beat its rate
    assert max(fast.window_rates) <= 200.0 * (1 + 1e-9)
    assert fast.wall_sec >= fast.busy_sec + fast.stall_sec
    # Input that never waits: the device is busy most of the time. Each 20 ms batch may
    # lose up to 20 ms to sleep overshoot and scheduling (0.5), 4x the 5 ms of overshoot
    # that failed the former bound of 0.8 on a busy 2-core machine.
    assert summary["utilization"] > 0.5
    # input slower than the device: the device starves. 4 pulls of >= 40 ms each against
    # 16 / 400 s = 40 ms of device time: utilization <= 0.04 / (0.04 + 0.16) = 0.2,
    # whatever the machine does (sleeps only ever last longer)
    slow = timing.time_batches(
        fake_batches(0.04), warmup=0, batches=4, windows=2, device_rate=400.0
    )
    assert slow.images == 16 and slow.busy_sec == pytest.approx(16 / 400.0)
    assert slow.stall_sec >= 4 * 0.04
    assert slow.summary(400.0)["utilization"] <= 0.04 / (0.04 + 4 * 0.04)
    assert slow.summary(400.0)["utilization"] < summary["utilization"]
    assert "utilization" not in slow.summary(None)


def test_bench_config_rejects_bad_settings(synth_dir):
    with pytest.raises(ValueError, match="keras-sequence reads PNG"):
        config.BenchConfig(pipeline="keras-sequence", source="records", records_dir="x")
    with pytest.raises(ValueError, match="needs data_dir"):
        config.BenchConfig(source="raw")
    with pytest.raises(ValueError, match="unknown step"):
        config.BenchConfig(data_dir=str(synth_dir), disable=("magic",))
    with pytest.raises(ValueError, match="device_rate"):
        config.BenchConfig(data_dir=str(synth_dir), device_rate=0)


def test_measure_reports_limit_and_settings(synth_dir, synth_metadata):
    cfg = config.BenchConfig(
        pipeline="optimized", data_dir=str(synth_dir), device_rate=5000.0, **TINY
    )
    r = measure.measure(cfg, synth_metadata)
    for key in (
        "pipeline",
        "source",
        "images_per_sec",
        "single_core_images_per_sec",
        "limit_images_per_sec",
        "fraction_of_limit",
        "utilization",
        "cpu_count",
        "versions",
        "settings",
        "pipeline_settings",
        "images_per_sec_windows",
        "input_stall_sec",
    ):
        assert key in r, key
    assert r["limit_images_per_sec"] == pytest.approx(
        r["cpu_count"] * r["single_core_images_per_sec"]
    )
    assert r["fraction_of_limit"] == pytest.approx(r["images_per_sec"] / r["limit_images_per_sec"])
    assert r["device"] == config.SIMULATED and 0 < r["utilization"] <= 1
    assert r["pipeline_settings"]["parallel_map"] is True
    assert "SIMULATED" in benchmarks.describe(r)
    json.dumps(r)  # serialisable as is


def test_keras_sequence_peer_reads_the_same_files(synth_dir, synth_metadata):
    cfg = config.BenchConfig(
        pipeline="keras-sequence", data_dir=str(synth_dir), keras_workers=2, **TINY
    )
    seq = peers.png_sequence(cfg, synth_metadata)
    x, y = seq[0]
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32 and y.shape == (4, 14)
    train = synth_metadata[synth_metadata["split"] == "train"]
    assert sorted(seq.paths) == sorted(train["path"])
    r = measure.measure(cfg, synth_metadata)
    assert (
        r["pipeline"] == "keras-sequence" and r["images_per_sec"] > 0 and "fraction_of_limit" in r
    )


def test_keras_directory_peer_is_keras_own_loader_over_the_split_folder(synth_dir, synth_metadata):
    from chexlib.bench.peers import image_folder, keras_directory_dataset

    cfg = config.BenchConfig(pipeline="keras-directory", data_dir=str(synth_dir), **TINY)
    folder = image_folder(cfg, synth_metadata)
    assert all(p.startswith(folder) for p in synth_metadata["path"])
    images = next(iter(keras_directory_dataset(cfg, synth_metadata)))
    assert images.shape == (4, 32, 32, 1) and images.dtype == tf.float32  # no normalisation
    r = measure.measure(cfg, synth_metadata)
    assert r["pipeline"] == "keras-directory" and r["images_per_sec"] > 0
    assert r["cpu_ms_per_image"] > 0 and r["single_core_images_per_sec"] > 0
    with pytest.raises(ValueError, match="reads PNG files"):
        config.BenchConfig(pipeline="keras-directory", source="records", records_dir="x")


def test_reference_rates_measure_the_independent_limit_and_each_decoder(synth_dir, synth_metadata):
    from chexlib.pipeline import spng

    cfg = config.BenchConfig(
        pipeline="optimized", data_dir=str(synth_dir), reference_rates=True, **TINY
    )
    r = measure.measure(cfg, synth_metadata)
    assert r["independent_limit_images_per_sec"] == pytest.approx(
        r["cpu_count"] * r["independent_single_core_images_per_sec"]
    )
    assert r["fraction_of_independent_limit"] == pytest.approx(
        r["images_per_sec"] / r["independent_limit_images_per_sec"]
    )
    decoders = r["decoder_ms_per_image"]
    assert set(decoders) == ({"tensorflow", "libspng"} if spng.available() else {"tensorflow"})
    assert all(v > 0 for v in decoders.values())
    assert r["cpu_ms_per_image_over_fastest_decoder"] == pytest.approx(
        r["cpu_ms_per_image"] / min(decoders.values())
    )
    assert "independent limit" in benchmarks.describe(r)
    assert r["decode_in_tf_data_cpu_ms_per_image"] > 0


def test_paired_rounds_alternate_two_real_pipelines_in_one_process(
    synth_dir, synth_metadata, monkeypatch
):
    from chexlib.bench import paired

    # Observe each round: every pipeline paired_rounds builds (timing.pipeline_batches,
    # which _timed_round imports when called), when it is stopped, and the rate its
    # round returned. The pipelines, their batches and their timing stay the real ones.
    events = []
    real_batches, real_round = timing.pipeline_batches, paired._timed_round

    def watched_batches(cfg, metadata=None, data_service=None):
        next_batch, stop = real_batches(cfg, metadata, data_service)
        events.append(("start", cfg.pipeline))

        def watched_stop():
            stop()
            events.append(("stop", cfg.pipeline))

        return next_batch, watched_stop

    def watched_round(cfg, metadata, warmup, batches):
        rate, cpu_ms = real_round(cfg, metadata, warmup, batches)
        events.append(("timed", cfg.pipeline, rate))
        return rate, cpu_ms

    monkeypatch.setattr(timing, "pipeline_batches", watched_batches)
    monkeypatch.setattr(paired, "_timed_round", watched_round)
    cfg = config.BenchConfig(
        pipeline="optimized", data_dir=str(synth_dir), paired_with="keras-directory", **TINY
    )
    r = measure.measure(cfg, synth_metadata)  # its own measurement does not go through these
    p = r["paired"]
    assert p["with"] == "keras-directory" and p["rounds"] == len(p["ratios"]) == 6
    # A, B, then B, A, ...: each pipeline built, stopped, then timed, before the other starts
    a, b = "optimized", "keras-directory"
    order = [name for r_ in range(6) for name in ((a, b) if r_ % 2 == 0 else (b, a))]
    assert [e[:2] for e in events] == [
        (what, name) for name in order for what in ("start", "stop", "timed")
    ]
    timed = {a: [], b: []}
    for what, name, *rate in events:
        if what == "timed":
            timed[name].append(rate[0])
    # the record holds the rates the rounds returned, in round order, and ratios of them
    assert p["images_per_sec"] == timed and min(timed[a] + timed[b]) > 0
    assert all(len(v) == 6 and min(v) > 0 for v in p["cpu_ms_per_image"].values())
    assert p["ratios"] == [x / y for x, y in zip(timed[a], timed[b], strict=True)]
    # the documented summary: the median of the per-round ratios, with its range
    assert p["ratio"] == statistics.median(p["ratios"])
    assert (p["ratio_min"], p["ratio_max"]) == (min(p["ratios"]), max(p["ratios"]))
    assert "paired with keras-directory" in benchmarks.describe(r)
    # no round is not a measurement: refused before anything is built, naming the argument
    events.clear()
    for rounds, batches in ((0, 30), (6, 0)):
        with pytest.raises(
            ValueError, match=f"rounds and batches must be >= 1, not {rounds} and {batches}"
        ):
            paired.paired_rounds(cfg, b, synth_metadata, rounds=rounds, batches=batches)
    assert events == []
    with pytest.raises(ValueError, match="paired_with"):
        config.BenchConfig(pipeline="optimized", data_dir="x", paired_with="optimized")
    with pytest.raises(ValueError, match="reads PNG files"):
        config.BenchConfig(source="records", records_dir="x", paired_with="keras-directory")


def test_cli_bench_pipeline_writes_json(synth_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(
        [
            "bench-pipeline",
            "--pipeline",
            "naive",
            "--data",
            str(synth_dir),
            "--batch-size",
            "4",
            "--image-size",
            "32",
            "--batches",
            "4",
            "--windows",
            "2",
            "--warmup",
            "1",
            "--single-core-batches",
            "2",
            "--disable",
            "slack",
            "--json",
            str(out),
        ]
    )
    assert code == 2  # --disable is for the optimized pipeline
    code = main(
        [
            "bench-pipeline",
            "--data",
            str(synth_dir),
            "--batch-size",
            "4",
            "--image-size",
            "32",
            "--batches",
            "4",
            "--windows",
            "2",
            "--warmup",
            "1",
            "--single-core-batches",
            "2",
            "--disable",
            "parallel-map",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    r = json.loads(out.read_text())
    assert r["pipeline"] == "optimized" and r["disabled_steps"] == ["parallel-map"]
    assert r["pipeline_settings"]["parallel_map"] is False
    assert "fraction of limit" in capsys.readouterr().out

    # a SIMULATED device at N x the single-core rate of that record: the rate comes from it
    small = ["--data", str(synth_dir), "--batch-size", "4", "--image-size", "32", "--batches",
             "4", "--windows", "2", "--warmup", "1", "--single-core-batches", "2"]  # fmt: skip
    device = tmp_path / "device.json"
    times = ["--device-times", "2", "--device-reference", str(out), "--json", str(device)]
    assert main(["bench-pipeline", *small, *times]) == 0
    expected = round(2 * r["single_core_images_per_sec"], 1)
    assert json.loads(device.read_text())["device_rate"] == pytest.approx(expected)
    assert main(["bench-pipeline", *small, *times, "--device-rate", "5"]) == 2  # one or other
    assert main(["bench-pipeline", *small, "--device-times", "2"]) == 2  # needs the reference
    assert "--device-reference" in capsys.readouterr().err


def _dataset_ops(ds: tf.data.Dataset) -> list[str]:
    """The dataset ops of a built pipeline's graph, input first, output last."""
    from tensorflow.core.framework import graph_pb2

    graph = graph_pb2.GraphDef.FromString(ds._as_serialized_graph().numpy())
    return [node.op for node in graph.node if node.op.endswith("Dataset") or "DatasetV" in node.op]


def test_ablation_removes_one_step_at_a_time(synth_dir, synth_metadata, monkeypatch):
    from chexlib.pipeline import builders
    from chexlib.pipeline.config import OPTIMIZED_STEPS, without_steps

    # Observe what each measurement really ran: the record measure() returned (its
    # pipeline_settings are PipelineConfig's effective settings) and the keyword
    # arguments and graph of the tf.data pipeline it built. Nothing is replaced.
    measured, built, current = [], [], {}
    real_measure, real_build = sweeps.measure, builders.build_dataset

    def watched_measure(cfg, *args, **kwargs):
        current["label"] = len(measured)
        record = real_measure(cfg, *args, **kwargs)
        measured.append((cfg, record))
        return record

    def watched_build(source, split, **kwargs):
        ds = real_build(source, split, **kwargs)
        if "label" in current:  # not the single-core rate, measured before the variants
            built.append((current["label"], kwargs, _dataset_ops(ds)))
        return ds

    monkeypatch.setattr(sweeps, "measure", watched_measure)
    monkeypatch.setattr(builders, "build_dataset", watched_build)
    df = sweeps.ablation(
        "raw",
        data_dir=str(synth_dir),
        metadata=synth_metadata,
        progress=False,
        steps=["parallel-map", "final-prefetch"],
        **TINY,
    )
    assert df["variant"].tolist() == [
        "optimized (all steps)",
        "minus parallel-map",
        "minus final-prefetch",
        "naive (no steps)",
    ]
    assert df["step"].tolist()[1:] == ["parallel-map", "final-prefetch", "all"]
    assert df["relative"].iloc[0] == 1.0 and (df["images_per_sec"] > 0).all()
    assert df["limit_images_per_sec"].nunique() == 1  # one single-core measurement for all
    # one measurement per row, and the row is that measurement
    assert len(measured) == 4
    assert df["images_per_sec"].tolist() == [rec["images_per_sec"] for _, rec in measured]
    assert [len([b for b in built if b[0] == i]) for i in range(4)] == [1, 1, 1, 1]

    def differences(settings: dict, full: dict) -> dict:
        """What ``settings`` sets otherwise than ``full`` (or that ``full`` leaves unset)."""
        assert full.keys() <= settings.keys()
        missing = object()
        return {  # the dataset table is passed as the same object every time
            k: v
            for k, v in settings.items()
            if v is not full.get(k, missing) and (k not in full or v != full[k])
        }

    full_record, full_kwargs = measured[0][1], built[0][1]
    assert full_record["disabled_steps"] == []
    expected = {1: ("parallel-map",), 2: ("final-prefetch",), 3: tuple(OPTIMIZED_STEPS)}
    for i, steps in expected.items():
        cfg, record = measured[i]
        switches = without_steps(*steps)
        if i == 3:  # naive: every step's switch off, and the pipeline named naive
            switches = {**switches, "pipeline": "naive"}
        # the settings the pipeline was built with differ from the full recipe's in
        # exactly the switches of the removed step(s), each set to its "off" value
        assert (
            differences(record["pipeline_settings"], full_record["pipeline_settings"]) == switches
        ), df["variant"][i]
        if i < 3:
            assert record["disabled_steps"] == list(steps)
            assert differences(built[i][1], full_kwargs) == switches
        else:
            assert record["pipeline"] == cfg.pipeline == "naive"
    # and the built graphs lose what each step adds (tests/test_real_behaviour.py checks
    # every switch on its own; here: the ablation's own builds)
    ops = {i: graph for i, _, graph in built}
    assert ops[0][-1] == "PrefetchDataset" and "ParallelMapDatasetV2" in ops[0]
    assert "ParallelMapDatasetV2" not in ops[1] and "MapDataset" in ops[1]
    assert ops[1][-1] == "PrefetchDataset"
    assert ops[2][-1] != "PrefetchDataset" and "ParallelMapDatasetV2" in ops[2]
    assert "ParallelMapDatasetV2" not in ops[3] and ops[3][-1] != "PrefetchDataset"


def _fake_results(tmp_path, **changes):
    def rec(pipeline, ips, **extra):
        return {
            "pipeline": pipeline,
            "images_per_sec": ips,
            "cpu_count": 2,
            "settings": {"batch_size": 32, "image_size": 224},
            **extra,
        }

    files = {
        "naive-raw": rec("naive", 100.0),
        "optimized-raw": rec(
            "optimized",
            190.0,
            fraction_of_limit=0.95,
            limit_images_per_sec=200.0,
            single_core_images_per_sec=100.0,
            fraction_of_independent_limit=0.92,
            independent_limit_images_per_sec=206.5,
            cpu_ms_per_image=5.0,
            decoder_ms_per_image={"tensorflow": 6.0, "libspng": 4.5},
            cpu_ms_per_image_over_fastest_decoder=5.0 / 4.5,
            decode_in_tf_data_cpu_ms_per_image=4.75,
        ),
        "optimized-compact": rec("optimized", 2500.0, cpu_ms_per_image=0.3),
        "keras-raw": rec("keras-sequence", 150.0),
        "keras-directory-raw": rec("keras-directory", 160.0),
        "device-naive": rec("naive", 60.0, utilization=0.45, device_rate=150.0),
        "device-optimized": rec("optimized", 139.0, utilization=0.99, device_rate=150.0),
    }
    for name, change in changes.items():
        files[name.replace("_", "-")].update(change)
    for name, r in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    return tmp_path


def test_report_prints_each_ratio_with_its_target(tmp_path):
    from chexlib.report.benchmarks import report

    text = report(_fake_results(tmp_path))
    assert "1.90x" in text and ">= 1.8x" in text
    assert "92.0%" in text and "1.11x" in text and "<= 1.2x" in text
    assert "13.16x" in text and "0.30" in text and "1.19x" in text  # compact, keras-directory
    assert "SIMULATED" in text and "1.50x single core" in text
    assert "MISS" not in text and text.count("PASS") == 8
    assert "4.50 | 4.75 | 5.00" in text  # decoder alone | in tf.data | the whole recipe


def test_report_says_miss_when_a_target_is_missed(tmp_path):
    from chexlib.report.benchmarks import report

    slow = {"cpu_ms_per_image": 7.0, "cpu_ms_per_image_over_fastest_decoder": 7.0 / 4.5}
    text = report(
        _fake_results(tmp_path, optimized_raw=slow, keras_directory_raw={"images_per_sec": 180.0})
    )
    misses = [line for line in text.splitlines() if line.endswith("MISS")]
    assert len(misses) == 2, text
    assert any("image_dataset_from_directory" in m for m in misses)
    assert any("CPU ms/image" in m for m in misses)


def test_report_judges_keras_directory_by_the_paired_rounds_when_measured(tmp_path):
    from chexlib.report.benchmarks import report

    # separate runs say 190/160 = 1.19x (pass); the paired rounds in one process say 1.05x
    paired = {"with": "keras-directory", "rounds": 6, "ratio": 1.05, "ratio_min": 0.98,
              "ratio_max": 1.12}  # fmt: skip
    text = report(_fake_results(tmp_path, optimized_raw={"paired": paired}))
    keras = [line for line in text.splitlines() if "image_dataset_from_directory" in line]
    assert len(keras) == 2, text
    assert "6 paired rounds, 0.98..1.12" in keras[0] and keras[0].endswith("MISS")
    assert keras[1].startswith("(info)") and "separate runs" in keras[1] and "1.19x" in keras[1]
    assert keras[1].endswith("info")


def test_bench_report_command_needs_records(tmp_path, capsys):
    from chexlib.cli.main import main

    assert main(["bench-report", str(tmp_path)]) == 2
    assert "no *.json" in capsys.readouterr().err
    assert main(["bench-report", str(_fake_results(tmp_path))]) == 0
    assert "PASS" in capsys.readouterr().out


def test_conclusion_is_computed_from_the_numbers():
    throughput = pd.DataFrame(
        [
            {
                "source_name": "raw",
                "pipeline": "naive",
                "images_per_sec": 100.0,
                "fraction_of_limit": 0.5,
            },
            {
                "source_name": "raw",
                "pipeline": "optimized",
                "images_per_sec": 190.0,
                "fraction_of_limit": 0.95,
            },
            {
                "source_name": "raw",
                "pipeline": "keras-sequence",
                "images_per_sec": 95.0,
                "fraction_of_limit": 0.4,
            },
            {
                "source_name": "records-compact",
                "pipeline": "optimized",
                "images_per_sec": 1900.0,
                "fraction_of_limit": 0.9,
            },
        ]
    )
    ablation = pd.DataFrame(
        [
            {
                "source_name": "raw",
                "variant": "optimized (all steps)",
                "step": None,
                "relative": 1.0,
            },
            {
                "source_name": "raw",
                "variant": "minus parallel-map",
                "step": "parallel-map",
                "relative": 0.52,
            },
            {"source_name": "raw", "variant": "minus slack", "step": "slack", "relative": 0.99},
        ]
    )
    utilization = pd.DataFrame(
        [
            {"pipeline": "naive", "device_rate": 50.0, "utilization": 0.7, "rate_vs_limit": 0.25},
            {
                "pipeline": "optimized",
                "device_rate": 50.0,
                "utilization": 0.99,
                "rate_vs_limit": 0.25,
            },
            {
                "pipeline": "optimized",
                "device_rate": 150.0,
                "utilization": 0.97,
                "rate_vs_limit": 0.75,
            },
        ]
    )
    text = sweeps.conclusion_markdown(throughput, ablation, utilization, cores=2)
    assert "1.90x naive" in text and "95% of the CPU limit" in text and "2.00x the Keras" in text
    assert "10.00x as fast" in text
    assert "*parallel-map* costs the most (48%" in text and "slack" in text
    assert "up to 150 images/s" in text and "never reaches 95 %" in text


def test_profile_config_validates():
    with pytest.raises(ValueError, match="unknown sources"):
        sweeps.ProfileConfig(output_dir="x", data_dir="d", sources=["raw", "hdf5"])
    with pytest.raises(ValueError, match="are not among sources"):
        sweeps.ProfileConfig(
            output_dir="x", data_dir="d", sources=["raw"], ablation_sources=["records-compact"]
        )
    with pytest.raises(ValueError, match="batches >= repeats"):
        sweeps.ProfileConfig(output_dir="x", data_dir="d", batches=2, repeats=5)
    cfg = sweeps.ProfileConfig(
        output_dir="x", data_dir="d", sources=["raw"], ablation_sources=["raw"]
    )
    assert cfg.sources == ("raw",) and cfg.to_dict()["batch_size"] == 32
    assert cfg.bench_settings()["windows"] == cfg.repeats


def _kernel_env(monkeypatch):
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "jupyter"), "kernelspec", "list"],
        capture_output=True,
        text=True,
    )
    if "chexlib" not in listed.stdout:
        monkeypatch.setenv("CHEXLIB_KERNEL", "python3")


@pytest.mark.slow
def test_notebook_03_runs_with_tiny_parameters(synth_dir, tmp_path, monkeypatch):
    from chexlib.study.notebook import run_notebook

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    _kernel_env(monkeypatch)
    out = tmp_path / "run"
    params = dict(
        OUTPUT_DIR=str(out),
        DATA_DIR=str(synth_dir),
        SOURCES=["raw", "records-compact"],
        PIPELINES=["naive", "optimized", "keras-sequence"],
        BATCH_SIZE=4,
        IMAGE_SIZE=32,
        WARMUP_BATCHES=1,
        BATCHES=4,
        REPEATS=2,
        DEVICE_RATE_FRACTIONS=[0.5, 1.5],
        ABLATION_SOURCES=["raw"],
        RECORDS_SIZE=48,
        KERAS_WORKERS=2,
        MIN_WINDOW_SEC=0.0,
    )
    run_notebook("03_pipeline_profiling", out / "03_pipeline_profiling.ipynb", params)
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "params.json").read_text())["batch_size"] == 4
    assert {r["pipeline"] for r in metrics["throughput"]} == {
        "naive",
        "optimized",
        "keras-sequence",
    }
    assert {r["source_name"] for r in metrics["throughput"]} == {"raw", "records-compact"}
    assert len(metrics["utilization"]) == 4 and "simulated" in metrics["utilization_note"]
    assert metrics["conclusion"].startswith("**What these numbers say**")
    for figure in ("throughput.png", "ablation.png", "utilization.png"):
        assert (out / figure).stat().st_size > 1000


def _fake_train_run(folder, ranks: int, real: float, synthetic: float, pairs: int = 4):
    folder.mkdir(parents=True)
    paired = [
        {"pairs": pairs, "synthetic_median": synthetic / ranks, "ratio_min": 0.9, "ratio_max": 1.05}
        for _ in range(ranks)
    ]
    metrics = {
        "model": "standin",
        "ranks": ranks,
        "images_per_sec": real,
        "paired_synthetic": paired,
        "fraction_of_synthetic_paired": real / synthetic,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_bench_train_report_tabulates_runs_against_the_paired_target(tmp_path, capsys):
    runs = [
        _fake_train_run(tmp_path / "standin-optimized-raw-np1", 1, 99.0, 100.0),
        _fake_train_run(tmp_path / "standin-optimized-raw-np2", 2, 180.0, 200.0),
        _fake_train_run(tmp_path / "standin-naive-raw-np1", 1, 50.0, 100.0, pairs=0),
    ]
    assert main(["bench-report", str(tmp_path), "--runs", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "standin-naive-raw-np1: a rank has no (real, synthetic) window pair" in out
    assert "1 rank(s), optimized-raw: real = 99.0% of synthetic" in out and "meets" in out
    assert "2 rank(s), optimized-raw: real = 90.0% of synthetic" in out and "MISSES" in out
    table = pd.read_csv(tmp_path / "summary.csv")
    assert table.set_index("ranks").loc[2, "vs_1_rank"] == pytest.approx(180 / 99)

"""The reporting layer on hand-made run records: tidy table, shared ceilings, scaling,
gains with noise, verdicts, the feeding projection; and that none of it starts TensorFlow."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from chexlib.core.run_record import RunRecord, RunRecordError
from chexlib.data.metadata import LABELS
from chexlib.report import feeding, summary, verdicts


def training_record(**changes) -> RunRecord:
    """A realistic 1-rank training run's record (as ``chexlib train`` writes it), changed."""
    base = RunRecord(
        rank=0, ranks=1, model="resnet50", source="raw", pipeline="optimized", synthetic=False,
        paired_synthetic=None, fraction_of_synthetic_paired=None, image_size=128,
        batch_size_per_rank=8, global_batch_size=8, learning_rate=1e-3, steps_per_epoch=10,
        epochs=1, resumed_from_epoch=None, images_per_sec=10.0, images_per_sec_per_rank=10.0,
        images_per_sec_ci95=None,
        throughput={"per_rank": [{"median": 10.0, "ci95": None, "windows": 3, "note": None}],
                    "warmup_steps": 2, "window_steps": 2, "timed_steps": 6, "note": None},
        auroc=dict.fromkeys(LABELS), auroc_reasons=dict.fromkeys(LABELS, "no evaluation"),
        auroc_split=None, mean_auroc=None, test_images=None, test_loss=None, val_images=None,
        val_mean_auroc=None, val_auroc=None, history=[{"epoch": 1, "loss": 0.5, "lr": 1e-3}],
        weights_sha256_per_rank=["ab" * 32], weights_in_sync=True, wall_seconds=12.0,
        pin_cores=0, cores_per_rank=[None], mixed_precision=False, xla=False,
        environment={"hardware": "CPU only: 2x test", "cpu_count": 2, "cpu": "test CPU",
                     "gpus": []},
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def record(run_id, pipeline, ranks, rate, synthetic=None, source="raw", records="", paired=False,
           model="resnet50", pin=0, ci=None, auroc=None, split=None, epochs=1):  # fmt: skip
    """A study's record of a notebook-04 training run (``collect_runs`` shape)."""
    run = training_record(
        model=model, pipeline=pipeline, source=source, ranks=ranks, pin_cores=pin,
        images_per_sec=rate, images_per_sec_per_rank=rate / ranks, images_per_sec_ci95=ci,
        mean_auroc=auroc, auroc_split=split, epochs=epochs,
        environment={"hardware": "CPU only: 2x test", "cpu_count": 1 if pin else 2,
                     "cpu": "test CPU", "gpus": []},
        paired_synthetic=[{"pairs": 3, "ratio_min": 0.7, "ratio_max": 0.9}] if paired else None,
    )  # fmt: skip
    ceiling = {
        "synthetic_images_per_sec": synthetic,
        "synthetic_images_per_sec_per_rank": synthetic / ranks if synthetic else None,
        "model_ms_per_image": 1000.0 * ranks / synthetic if synthetic else None,
        "fraction_of_synthetic": rate / synthetic if synthetic else None,
        "ceiling_kind": "separate" if synthetic else None,
    }
    run = run.with_ceiling("horovod.run", ceiling, ["throughput.png"])
    return {"run_id": run_id, "metrics": run.to_dict(), "params": {"train": {"records": records}}}


def test_training_table_shares_the_synthetic_ceiling_and_computes_efficiency():
    table = summary.training_table(
        [
            record("a", "naive", 1, 8.0, synthetic=10.0, paired=True),
            record("b", "optimized", 1, 9.0),
            record("c", "optimized", 2, 12.0, synthetic=16.0),
            record("d", "naive", 2, 10.0),
        ]
    )
    row = table.set_index("run_id")
    assert row.loc["b", "synthetic_images_per_sec"] == 10.0 and row.loc["b", "synthetic_shared"]
    assert row.loc["b", "fraction_of_synthetic"] == pytest.approx(0.9)
    assert row.loc["d", "fraction_of_synthetic"] == pytest.approx(10.0 / 16.0)
    assert not row.loc["a", "synthetic_shared"]
    assert row.loc["c", "scaling_efficiency"] == pytest.approx(12.0 / (2 * 9.0))
    assert row.loc["d", "scaling_efficiency"] == pytest.approx(10.0 / (2 * 8.0))
    assert row.loc["a", "bound"] == "input-bound" and row.loc["b", "bound"] == "compute-bound"
    assert (row.loc["a", "fraction_min"], row.loc["a", "fraction_max"]) == (0.7, 0.9)
    assert table.set_index("run_id")["synthetic_paired"].to_dict() == {
        "a": True, "b": False, "c": False, "d": False,
    }  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    from chexlib.report import summary_plots

    fig = summary_plots.plot_ceiling(table, "2 CPU cores, no GPU")
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "paired: ceiling from alternating windows" in caption
    assert "1 paired" in caption and "2 shared" in caption and "1 separate run" in caption
    assert "2 CPU cores, no GPU" in fig._suptitle.get_text()


def test_pinned_runs_scale_against_pinned_runs_only_and_repeats_keep_the_newest(tmp_path):
    runs = [
        record("shared1", "optimized", 1, 10.0),
        record("pin1", "optimized", 1, 6.0, pin=1),
        record("pin2", "optimized", 2, 11.4, pin=1),
        record("pin2-old", "optimized", 2, 3.0, pin=1),
    ]
    # two real run folders; the finish time is their metrics.json's mtime. The older one
    # is written last and its run_id sorts last, so neither the write order nor a
    # tie-break by run_id can pick the newest: only the finish times can
    for rec, finished in ((runs[2], 1_700_000_600), (runs[3], 1_700_000_000)):
        rec["run_dir"] = str(tmp_path / "train" / rec["run_id"])
        _write_run(tmp_path / "train" / rec["run_id"], rec)
        os.utime(tmp_path / "train" / rec["run_id"] / "metrics.json", (finished, finished))
    table = summary.training_table(runs).set_index("run_id")
    assert "pin2-old" not in table.index and "pin2" in table.index  # the newest repeat
    kept = table.loc["pin2"]
    assert kept["repeats"] == 2 and kept["finished"] == 1_700_000_600
    assert kept["images_per_sec"] == 11.4
    # weak scaling: against the pinned 1-rank run, never the shared-cores one
    assert kept["scaling_efficiency"] == pytest.approx(11.4 / (2 * 6.0))
    assert kept["scaling_kind"] == "weak: 1 core(s) per rank"
    assert summary.hardware_caption(runs) == "2 CPU cores, no GPU (test CPU)"


def test_ratio_noise_decides_within_noise():
    a = pd.Series({"images_per_sec": 104.0, "images_per_sec_ci95": 10.4, "run_id": "a"})
    b = pd.Series({"images_per_sec": 100.0, "images_per_sec_ci95": 5.0, "run_id": "b"})
    inside = summary.ratio_with_noise(a, b)
    assert inside["ratio"] == pytest.approx(1.04) and inside["within_noise"]
    assert inside["noise"] == pytest.approx((0.1**2 + 0.05**2) ** 0.5)
    far = summary.ratio_with_noise({**a, "images_per_sec": 200.0, "images_per_sec_ci95": 2.0}, b)
    assert not far["within_noise"] and far["runs"] == ["a", "b"]


def _study_tables():
    runs = [
        record("sn", "naive", 1, 100.0, synthetic=500.0, model="standin", paired=True, ci=5.0),
        record("so", "optimized", 1, 210.0, synthetic=520.0, model="standin", paired=True, ci=8.0),
        record("sp", "optimized", 1, 212.0, synthetic=520.0, model="standin", ci=8.0,
               source="records"),
        record("d1", "optimized", 1, 10.0, model="densenet121", pin=1, ci=0.5),
        record("d2", "optimized", 2, 18.0, model="densenet121", pin=1, ci=0.5),
        record("learn", "optimized", 1, 900.0, model="standin", auroc=0.83, split="test",
               source="records", epochs=20),
    ]  # fmt: skip
    train = summary.training_table(runs)
    # records runs without a manifest are "records"; name them as the study would
    train.loc[train["run_id"] == "sp", "input"] = "png-records"
    throughput = pd.DataFrame(
        {"pipeline": ["optimized"] * 3, "source_variant": ["raw", "png", "compact"],
         "cpu_ms_per_image": [10.0, 9.5, 0.2]}
    )  # fmt: skip
    costs = feeding.input_costs(throughput)
    return {
        "train": train,
        "hardware": "2 CPU cores, no GPU",
        "input_costs": costs,
        "feeding": feeding.projection(costs),
    }


def test_verdicts_have_every_claim_and_follow_the_thresholds(tmp_path):
    result = verdicts.verdicts(_study_tables())
    by_id = {c["id"]: c for c in result["claims"]}
    assert list(by_id) == ["pipeline", "records", "png-records", "scaling", "ceiling",
                           "learning", "localization", "feeding", "cross-node",
                           "allreduce-model", "scaling-projection"]  # fmt: skip
    assert by_id["pipeline"]["measured"] == pytest.approx(2.1)
    assert by_id["pipeline"]["verdict"] == "supported" and by_id["pipeline"]["runs"] == ["so", "sn"]
    assert by_id["records"]["verdict"] == "not testable here"  # no compact-records run
    assert by_id["png-records"]["verdict"] == "not supported"
    assert "within the noise" in by_id["png-records"]["note"]
    # 0.90 +- 0.05 (both runs' windows) straddles the 0.85 threshold
    assert by_id["scaling"]["measured"] == pytest.approx(0.9) and by_id["scaling"]["verdict"] == (
        "inconclusive"
    )
    assert by_id["learning"]["measured"] == pytest.approx(0.83)
    assert by_id["feeding"]["verdict"] == "not testable here"  # no published H100 rate
    assert "A100 AMP" in by_id["feeding"]["note"]
    for claim in result["claims"]:
        assert set(claim) == {"id", "question", "measured", "noise", "unit", "threshold",
                              "comparison", "threshold_source", "threshold_why", "verdict",
                              "runs", "note", "left_out"}  # fmt: skip
        assert claim["left_out"] == []  # every record of this study was readable
        assert claim["verdict"] in verdicts.VERDICTS
    path = verdicts.write_verdicts(result, tmp_path)
    assert json.loads(path.read_text())["hardware"] == "2 CPU cores, no GPU"
    text = verdicts.conclusions(result)
    assert "**pipeline: supported**" in text and "2 CPU cores, no GPU" in text


def test_feeding_projection_multiplies_measured_cost_by_published_rate():
    costs = pd.DataFrame({"input": ["raw PNG"], "cpu_ms_per_image": [10.0], "measurements": [1]})
    table = feeding.projection(costs).set_index(["gpu", "precision", "model"])
    a100 = table.loc[("A100", "AMP", "resnet50")]
    assert a100["cores_per_gpu"] == pytest.approx(24.7)  # 2470 images/s x 10 ms
    assert not a100["poster_node_feeds"] and not a100["big_node_feeds"]  # 10 and 14 cores/GPU
    poster = table.loc[("V100", "FP32", "densenet121")]
    assert poster["cores_per_gpu"] == pytest.approx(1.8512) and poster["poster_node_feeds"]
    assert table.loc[("A100", "AMP", "densenet121"), "cores_per_gpu"] < a100["cores_per_gpu"]
    h100 = table.loc[("H100", "AMP", "densenet121")]
    assert pd.isna(h100["cores_per_gpu"]) and "no published" in h100["source"]


def test_reporting_layer_does_not_start_tensorflow():
    """Importing every module of the TensorFlow-free layers (and the notebooks' helpers)
    leaves TensorFlow unloaded: the summary runs where it is not installed."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import chexlib\n"
        "layers = ('core', 'data', 'synth', 'report', 'study')\n"
        "names = [m.name for m in pkgutil.walk_packages(chexlib.__path__, 'chexlib.')\n"
        "         if m.name.split('.')[1] in layers]\n"
        "names += ['chexlib.records.manifest', 'chexlib.walkthrough.teaching']\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names), 'tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, loaded = out.stdout.split()
    assert int(count) >= 30 and loaded == "False", out.stdout


def test_localization_claim_reads_the_explain_run():
    tables = _study_tables()
    claims = {c["id"]: c for c in verdicts.verdicts(tables)["claims"]}
    assert claims["localization"]["verdict"] == "not testable here"
    tables["localization"] = [
        {"run_id": "gc", "hit_rate": 0.17, "hit_rate_chance": 0.04, "hit_rate_pooled": 0.2,
         "mean_iou": 0.1, "model": "standin", "layer": "tiny_relu3", "boxes": 160,
         "findings_with_boxes": 12},
    ]  # fmt: skip
    claim = {c["id"]: c for c in verdicts.verdicts(tables)["claims"]}["localization"]
    assert claim["verdict"] == "not supported" and claim["measured"] == pytest.approx(0.17)
    assert claim["runs"] == ["gc"] and "chance 0.04" in claim["note"]


def _write_run(folder, rec, status=None):
    """A run folder as ``chexlib train --out`` (status None) or ``chexlib study`` writes it."""
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(rec["params"]))
    (folder / "metrics.json").write_text(json.dumps(rec["metrics"]))
    if status:
        (folder / "run.json").write_text(json.dumps({"status": status, "parameters": {}}))


def test_hand_made_runs_join_the_study_once_each(tmp_path):
    study = tmp_path / "study"
    _write_run(study / "train" / "a1", record("a1", "optimized", 1, 9.0), status="complete")
    hand = tmp_path / "jupyter"
    # notebook 04's OUTPUT_DIR: its record, and the training run's own record in run/
    _write_run(hand / "04_distributed_training", record("nb", "naive", 1, 5.0))
    _write_run(hand / "04_distributed_training" / "run", record("nb-run", "naive", 1, 5.0))
    cli = training_record(pipeline="optimized", ranks=2, images_per_sec=15.0)  # chexlib train --out
    _write_run(hand / "cli" / "ranks2", {"metrics": cli.to_dict(), "params": {}})
    synthetic = training_record(synthetic=True, images_per_sec=50.0)  # a ceiling, not training
    _write_run(hand / "cli" / "ceiling", {"metrics": synthetic.to_dict(), "params": {}})

    assert summary.hand_run_dirs([hand]) == [
        (hand / "04_distributed_training").resolve(), (hand / "cli" / "ceiling").resolve(),
        (hand / "cli" / "ranks2").resolve(),
    ]  # fmt: skip
    # the study's own run given again by hand, and a pattern: no duplicates
    tables = summary.load_study(study, run_dirs=[hand, study / "train" / "a1", f"{hand}/cl*"])
    assert tables["stages"] == {"train": 1, summary.HAND_STAGE: 2}
    train = tables["train"].set_index("run_id")
    assert sorted(train.index) == ["04_distributed_training", "a1", "ranks2"]
    assert train.loc["ranks2", "scaling_efficiency"] == pytest.approx(15.0 / (2 * 9.0))

    only_hand = summary.load_study("", run_dirs=[hand / "cli" / "ranks2"])
    assert list(only_hand["train"]["run_id"]) == ["ranks2"]


def test_summary_config_checks_the_hand_made_run_folders(tmp_path):
    cfg = summary.SummaryConfig(study_dir="", output_dir=str(tmp_path), run_dirs=[tmp_path])
    assert cfg.run_dirs == (str(tmp_path),)
    with pytest.raises(ValueError, match="does not exist"):
        summary.SummaryConfig(study_dir="", output_dir="x", run_dirs=[tmp_path / "missing"])
    with pytest.raises(ValueError, match="nothing to summarise"):
        summary.SummaryConfig(study_dir="", output_dir="x")


def test_a_study_without_training_runs_has_untestable_verdicts_not_errors():
    # e.g. papermill_runs/check.yaml on a dataset whose training stage failed
    train = summary.training_table([])
    assert train.empty and {"model", "ranks", "pipeline", "bound"} <= set(train.columns)
    tables = {**_study_tables(), "train": train}
    result = verdicts.verdicts(tables)
    by_id = {c["id"]: c for c in result["claims"]}
    for claim in ("pipeline", "records", "scaling", "ceiling", "learning"):
        assert by_id[claim]["verdict"] == "not testable here", claim


def test_training_columns_are_the_columns_of_a_training_row():
    row = summary._training_row(record("r", "optimized", 1, 100.0))
    assert [k for k in row if not k.startswith("auroc.")] == summary.TRAINING_COLUMNS


def test_a_renamed_training_key_fails_naming_the_run_and_the_key(tmp_path):
    bad = record("a", "optimized", 1, 9.0)
    bad["metrics"]["img_per_sec"] = bad["metrics"].pop("images_per_sec")
    bad["run_dir"] = str(tmp_path / "train" / "a")
    with pytest.raises(RunRecordError, match=r"train/a/metrics.json.*missing images_per_sec"):
        summary.training_table([bad, record("b", "optimized", 2, 15.0)])
    other = {"run_id": "p", "metrics": {"throughput": [], "ablation": []}, "params": {}}
    table = summary.training_table([other, record("b", "optimized", 2, 15.0)])
    assert table["run_id"].tolist() == ["b"]  # another stage's record is not a training run

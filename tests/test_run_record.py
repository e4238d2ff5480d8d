"""The training run's record as a type: the JSON round trip keeps every key in
order, and a missing or unknown key fails naming it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from chexlib.core.run_record import (
    CEILING_KEYS,
    SCHEMA_VERSION,
    RunRecord,
    RunRecordError,
    is_training_record,
)
from chexlib.core.runs import write_run_record
from chexlib.data.metadata import LABELS


def train_metrics() -> dict:
    """A ``metrics.json`` as ``chexlib train`` writes it: a 1-rank evaluated run (from the demo)."""
    auroc = {label: 0.5 + 0.03 * i for i, label in enumerate(LABELS)}
    window = {"windows": 4, "median": 946.0, "mean": 930.2, "std": 112.9, "ci95": 221.3,
              "min": 610.0, "max": 1010.0, "note": None}  # fmt: skip
    return {
        "rank": 0, "ranks": 1, "model": "standin", "source": "records", "pipeline": "optimized",
        "synthetic": False, "paired_synthetic": None, "fraction_of_synthetic_paired": None,
        "image_size": 128, "batch_size_per_rank": 32, "global_batch_size": 32,
        "learning_rate": 0.002, "steps_per_epoch": 45, "epochs": 2, "resumed_from_epoch": None,
        "images_per_sec": 946.0, "images_per_sec_per_rank": 946.0, "images_per_sec_ci95": 221.3,
        "throughput": {"per_rank": [window], "warmup_steps": 10, "window_steps": 10,
                       "timed_steps": 40, "note": None},
        "auroc": auroc, "auroc_reasons": {}, "auroc_split": "test", "mean_auroc": 0.695,
        "test_images": 400, "test_loss": 0.145, "val_images": 160, "val_mean_auroc": 0.70,
        "val_auroc": auroc,
        "history": [
            {"epoch": e, "loss": 0.26 / e, "lr": 0.002, "val_loss": 0.15 / e,
             "val_mean_auroc": 0.58 + 0.1 * e, "val_auroc": auroc}
            for e in (1, 2)
        ],
        "weights_sha256_per_rank": ["aa" * 32], "weights_in_sync": True, "wall_seconds": 51.3,
        "pin_cores": 0, "cores_per_rank": [[0, 1]], "mixed_precision": False, "xla": False,
        "environment": {"host": "vm", "cpu": "AMD EPYC", "cpu_count": 2,
                        "versions": {"python": "3.11.7"}, "gpus": [],
                        "hardware": "CPU only: 2x AMD EPYC"},
    }  # fmt: skip


CEILING = {
    "synthetic_images_per_sec": 1200.0,
    "synthetic_images_per_sec_per_rank": 1200.0,
    "model_ms_per_image": 0.83,
    "fraction_of_synthetic": 0.79,
    "ceiling_kind": "separate",
}
FIGURES = ["learning_curves.png", "auroc_comparison.png", "predictions.png", "throughput.png"]


def test_a_train_record_round_trips_with_its_keys_in_order(tmp_path):
    metrics = train_metrics()
    record = RunRecord.from_dict(metrics)
    assert record.addition is None and record.launch is None
    assert record.precision == "float32"  # a version-1 record: read in from mixed_precision
    assert list(record.to_dict().items()) == [
        ("schema_version", SCHEMA_VERSION),
        *metrics.items(),
        ("precision", "float32"),
    ]
    write_run_record(tmp_path, {}, record.to_dict())  # as write_outputs does
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert list(written) == ["schema_version", *metrics, "precision"]
    assert RunRecord.from_dict(written) == record
    assert RunRecord.read(tmp_path / "metrics.json") == record


def test_a_ceiling_adds_launch_ceiling_and_figures_at_the_end():
    record = RunRecord.from_dict(train_metrics()).with_ceiling("horovod.run", CEILING, FIGURES)
    d = record.to_dict()
    assert list(d) == [
        "schema_version",
        *train_metrics(),
        "precision",
        "launch",
        *CEILING_KEYS,
        "figures",
    ]
    assert d["launch"] == "horovod.run" and d["figures"] == FIGURES
    assert RunRecord.from_dict(d) == record and record.addition == "ceiling"
    no_ceiling = dict.fromkeys(CEILING_KEYS)  # no synthetic run: the keys stay, null
    unmeasured = record.with_ceiling("horovodrun", no_ceiling, FIGURES)
    assert RunRecord.from_dict(unmeasured.to_dict()) == unmeasured
    with pytest.raises(RunRecordError, match="ceiling keys"):
        record.with_ceiling("horovod.run", {**CEILING, "ratio": 1.0}, FIGURES)


def test_a_rank_table_adds_launch_and_the_rows():
    rows = [{"rank": 0, "images_per_sec_rank": 10.0}, {"rank": 1, "images_per_sec_rank": 11.0}]
    record = RunRecord.from_dict(train_metrics()).with_rank_table("ipyparallel", rows)
    d = record.to_dict()
    assert list(d) == ["schema_version", *train_metrics(), "precision", "launch", "rank_table"]
    assert RunRecord.from_dict(d) == record and record.addition == "rank table"


@pytest.mark.parametrize("key", ["images_per_sec", "history", "environment", "rank"])
def test_a_missing_key_is_named(key):
    metrics = train_metrics()
    del metrics[key]
    with pytest.raises(RunRecordError, match=f"missing {key}$"):
        RunRecord.from_dict(metrics)


def test_an_unknown_or_renamed_key_is_named():
    metrics = train_metrics()
    metrics["img_per_sec"] = metrics.pop("images_per_sec")
    with pytest.raises(RunRecordError, match="missing images_per_sec; unknown img_per_sec"):
        RunRecord.from_dict(metrics)


def test_part_of_an_addition_is_refused_naming_the_rest():
    d = RunRecord.from_dict(train_metrics()).with_ceiling("horovod.run", CEILING, FIGURES)
    d = d.to_dict()
    del d["ceiling_kind"], d["figures"]
    with pytest.raises(RunRecordError, match="missing ceiling_kind, figures"):
        RunRecord.from_dict(d)
    with pytest.raises(RunRecordError, match="unknown rank_table"):
        RunRecord.from_dict({**d, "ceiling_kind": None, "figures": [], "rank_table": []})
    with pytest.raises(RunRecordError, match="null figures"):
        RunRecord.from_dict({**d, "ceiling_kind": None, "figures": None})


def test_training_records_are_told_from_other_stages():
    assert is_training_record(train_metrics())
    assert is_training_record({"images_per_sec": 1.0})  # renamed others: from_dict names them
    profiling = {"throughput": [], "ablation": [], "utilization": [], "environment": {}}
    explain = {"model": "standin", "image_size": 128, "hit_rate": 0.2, "environment": {}}
    assert not is_training_record(profiling) and not is_training_record(explain)


def test_a_record_written_before_a_new_field_reads_with_the_fields_default():
    """A field added later (here: a subclass with one more field) takes its default
    when an older record lacks it; a field without a default is still required."""
    newer = dataclasses.make_dataclass(
        "NewerRunRecord", [("hosts", list, dataclasses.field(default_factory=list))],
        bases=(RunRecord,), frozen=True,
    )  # fmt: skip
    old = train_metrics()  # version 1: no schema_version key at all
    assert "schema_version" not in old
    record = newer.from_dict(old)
    assert record.hosts == [] and record.images_per_sec == old["images_per_sec"]
    assert newer.from_dict({**old, "hosts": ["node1", "node2"]}).hosts == ["node1", "node2"]


@pytest.mark.parametrize("version", [SCHEMA_VERSION, 1])
def test_this_and_older_schema_versions_read(version):
    assert RunRecord.from_dict({"schema_version": version, **train_metrics()}).rank == 0


def test_a_newer_schema_version_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, **train_metrics()}))
    with pytest.raises(
        RunRecordError, match=rf"{path}: written by a newer chexlib .*schema {SCHEMA_VERSION + 1}"
    ):
        RunRecord.read(path)
    for bad in (0, "2", True, None):
        with pytest.raises(RunRecordError, match="schema_version must be a positive integer"):
            RunRecord.from_dict({**train_metrics(), "schema_version": bad})


def test_an_older_mixed_precision_record_reads_as_float16():
    old = {**train_metrics(), "mixed_precision": True}  # version 1: no precision key
    assert RunRecord.from_dict(old).precision == "float16"
    assert RunRecord.from_dict({**old, "schema_version": 2}).precision == "float16"

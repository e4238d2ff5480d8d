"""Each claim of ``verdicts.json`` at its threshold, just under and just over it.

The fixture tables are built as the summary builds them: run records through
``summary.training_table``, records folders with a real ``manifest.json``, the
profiling stage's costs through ``feeding.projection``. The thresholds and their
directions below are the specification (the poster's questions), not read from
the code, so a changed threshold or a flipped comparison fails here.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from test_summary import record

from chexlib.core.reference import GPU_RATES
from chexlib.report import feeding, summary, verdicts

EPS = 1e-6
# claim id: (threshold, the measured value must be at most it)
THRESHOLDS = {
    "pipeline": (1.5, False),
    "records": (3.0, False),
    "png-records": (1 + 8.39 / 100, False),  # the poster's smaller records gain, +8.39 %
    "scaling": (0.85, False),
    "ceiling": (0.9, False),
    "learning": (0.80, False),
    "localization": (0.6, False),
    "feeding": (112 / 8, True),  # an 8-GPU node's 14 cores per GPU
}


def _records_dir(tmp_path, variant: str) -> str:
    """A converted folder as far as the summary reads it: its manifest names the variant."""
    folder = tmp_path / f"{variant}-records"
    folder.mkdir()
    manifest = {"shards": [], "splits": {}, "format": "tfrecord", "variant": variant}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def _train(runs) -> dict:
    return {"train": summary.training_table(runs), "hardware": "2 CPU cores, no GPU"}


# Each builder gives the tables of a study whose one measurement for the claim is
# ``value``, chosen so the code computes it without rounding (x / 1.0).
def _pipeline(value, tmp_path, monkeypatch):
    return _train([
        record("opt", "optimized", 1, value, model="standin"),
        record("naive", "naive", 1, 1.0, model="standin"),
    ])  # fmt: skip


def _records_claim(variant):
    def build(value, tmp_path, monkeypatch):
        folder = _records_dir(tmp_path, variant)
        return _train([
            record("rec", "optimized", 1, value, model="standin", source="records",
                   records=folder),
            record("png", "optimized", 1, 1.0, model="standin"),
        ])  # fmt: skip

    return build


def _scaling(value, tmp_path, monkeypatch):
    # efficiency = images/s at 2 ranks / (2 x images/s at 1 rank) = value / 1.0
    return _train([
        record("d1", "optimized", 1, 0.5, model="densenet121", pin=1),
        record("d2", "optimized", 2, value, model="densenet121", pin=1),
    ])  # fmt: skip


def _ceiling(value, tmp_path, monkeypatch):
    # paired windows in the same run: real / synthetic = value / 1.0
    return _train([record("so", "optimized", 1, value, synthetic=1.0, model="standin",
                          paired=True)])  # fmt: skip


def _learning(value, tmp_path, monkeypatch):
    return _train([
        record("learn", "optimized", 1, 50.0, model="standin", auroc=value, split="test",
               epochs=20),
        # a better validation score does not count: the claim is on the test split
        record("val", "optimized", 1, 50.0, model="tiny", auroc=0.99, split="val", epochs=20),
    ])  # fmt: skip


def _localization(value, tmp_path, monkeypatch):
    tables = _train([])
    tables["localization"] = [
        {"run_id": "gc", "hit_rate": value, "hit_rate_chance": 0.04, "hit_rate_pooled": 0.2,
         "mean_iou": 0.1, "model": "standin", "layer": "tiny_relu3", "boxes": 160,
         "findings_with_boxes": 12},
        {"run_id": "worse", "hit_rate": value - 0.1},
    ]  # fmt: skip
    return tables


def _feeding(value, tmp_path, monkeypatch):
    # the day an H100 DenseNet121 rate is published: value x 1000 images/s at 1 CPU ms/image
    rate = ("H100", "AMP", "densenet121", value * 1000.0, "a published H100 rate")
    monkeypatch.setattr(feeding, "GPU_RATES", [*GPU_RATES, rate])
    monkeypatch.setattr(feeding, "MISSING_RATES", {})
    throughput = pd.DataFrame(
        {"pipeline": ["optimized"] * 2, "source_variant": ["raw", "compact"],
         "cpu_ms_per_image": [1.0, 0.2]}
    )  # fmt: skip
    costs = feeding.input_costs(throughput)
    return {**_train([]), "input_costs": costs, "feeding": feeding.projection(costs)}


BUILD = {
    "pipeline": _pipeline,
    "records": _records_claim("compact"),
    "png-records": _records_claim("png"),
    "scaling": _scaling,
    "ceiling": _ceiling,
    "learning": _learning,
    "localization": _localization,
    "feeding": _feeding,
}


def test_every_claim_has_a_threshold_test():
    assert [c.id for c in verdicts.CLAIMS] == list(THRESHOLDS) == list(BUILD)


@pytest.mark.parametrize("offset", [-EPS, 0.0, EPS], ids=["under", "at", "over"])
@pytest.mark.parametrize("claim_id", list(THRESHOLDS))
def test_each_verdict_at_just_under_and_just_over_its_threshold(
    claim_id, offset, tmp_path, monkeypatch
):
    threshold, at_most = THRESHOLDS[claim_id]
    value = threshold + offset
    result = verdicts.verdicts(BUILD[claim_id](value, tmp_path, monkeypatch))
    claims = {c["id"]: c for c in result["claims"]}
    claim = claims[claim_id]
    assert claim["threshold"] == threshold
    assert claim["measured"] == value  # computed exactly, so the comparison is the one tested
    passes = offset <= 0 if at_most else offset >= 0
    assert claim["verdict"] == ("supported" if passes else "not supported")
    # the fixture answers this claim only: the others have nothing to measure
    others = {c["id"]: c["verdict"] for c in result["claims"] if c["id"] != claim_id}
    assert set(others.values()) == {"not testable here"}, others

    line = next(x for x in verdicts.conclusions(result).splitlines() if f"**{claim_id}:" in x)
    sign = "<=" if at_most else ">="
    assert line.startswith(f"- **{claim_id}: {claim['verdict']}**. {claim['question']} ")
    assert f"Measured {value:.2f} {claim['unit']} (threshold {sign} {threshold:.2f})" in line
    assert line.endswith(f". {claim['note']}.")


def test_the_feeding_verdict_agrees_with_the_projection_of_the_big_node(tmp_path, monkeypatch):
    """At the node's 14 cores per GPU, the projection says it feeds; the claim agrees."""
    for offset, feeds in ((-EPS, True), (0.0, True), (EPS, False)):
        tables = _feeding(14.0 + offset, tmp_path, monkeypatch)
        table = tables["feeding"]
        h100 = table[(table["gpu"] == "H100") & (table["model"] == "densenet121")
                     & (table["input"] == "raw PNG")].iloc[0]  # fmt: skip
        assert bool(h100["big_node_feeds"]) is feeds
        claim = {c["id"]: c for c in verdicts.verdicts(tables)["claims"]}["feeding"]
        assert claim["verdict"] == ("supported" if feeds else "not supported")
        assert claim["note"] == "a published H100 rate; projection"


def test_conclusions_say_each_verdict_and_only_what_verdicts_json_holds():
    claim = {"question": "Q?", "unit": "x", "runs": [], "note": "why"}
    result = {
        "hardware": "2 CPU cores, no GPU",
        "claims": [
            {**claim, "id": "pipeline", "measured": 2.0, "threshold": 1.5, "verdict": "supported"},
            {**claim, "id": "scaling", "measured": 0.5, "threshold": 0.85,
             "verdict": "not supported"},
            {**claim, "id": "ceiling", "measured": None, "threshold": 0.9,
             "verdict": "not testable here"},
            {**claim, "id": "feeding", "measured": 20.0, "threshold": 14.0,
             "verdict": "not supported"},
        ],
    }  # fmt: skip
    lines = verdicts.conclusions(result).splitlines()
    assert lines[:2] == ["Verdicts on 2 CPU cores, no GPU (`verdicts.json`):", ""]
    assert lines[2:] == [
        "- **pipeline: supported**. Q? Measured 2.00 x (threshold >= 1.50). why.",
        "- **scaling: not supported**. Q? Measured 0.50 x (threshold >= 0.85). why.",
        "- **ceiling: not testable here**. Q? Not measured. why.",
        "- **feeding: not supported**. Q? Measured 20.00 x (threshold <= 14.00). why.",
    ]

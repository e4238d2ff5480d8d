"""Every study spec runs a notebook after every notebook whose outputs it reads.

What each notebook reads and writes is declared in ``chexlib.study.dataflow``;
the check expands each spec as ``chexlib study`` does (no notebook runs) and
compares the folders its runs read and write.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from chexlib.study.dataflow import (
    NOTEBOOKS,
    WALKTHROUGH,
    order_problems,
    overlap,
    parameter_defaults,
    read_from,
)
from chexlib.study.notebook import REPO
from chexlib.study.runner import expand, load_spec

SPECS = sorted((REPO / "papermill_runs").glob("*.yaml"))


def _runs(spec: dict, tmp_path: Path):
    return expand(spec, tmp_path / "outputs")


@pytest.mark.parametrize("spec_path", SPECS, ids=[p.stem for p in SPECS])
def test_each_spec_runs_a_notebook_after_those_it_reads(spec_path, tmp_path):
    spec = load_spec(spec_path)
    undeclared = {Path(s["notebook"]).stem for s in spec["stages"]} - set(NOTEBOOKS)
    assert not undeclared, f"declare them in chexlib.study.dataflow.NOTEBOOKS: {undeclared}"
    assert order_problems(_runs(spec, tmp_path)) == []


def _swapped(spec: dict, a: str, b: str) -> dict:
    names = [s["name"] for s in spec["stages"]]
    i, j = names.index(a), names.index(b)
    spec["stages"][i], spec["stages"][j] = spec["stages"][j], spec["stages"][i]
    return spec


def test_the_summary_before_grad_cam_is_refused(tmp_path):
    spec = _swapped(load_spec(REPO / "papermill_runs" / "demo.yaml"), "explain", "summary")
    (problem,) = order_problems(_runs(spec, tmp_path))
    assert problem.startswith("stage summary (05_summary) reads ")
    assert problem.endswith("which stage explain (06_explain) writes after it")


def test_records_before_the_data_is_refused(tmp_path):
    spec = _swapped(load_spec(REPO / "papermill_runs" / "smoke.yaml"), "data", "records")
    problems = order_problems(_runs(spec, tmp_path))
    assert "stage records (02_tfrecord_conversion) reads " in problems[0]
    assert problems[0].endswith("which stage data (01_data_prep) writes after it")


def test_a_reader_in_the_stage_of_its_writer_is_refused(tmp_path):
    # runs of one stage may run at the same time (--jobs): Grad-CAM moved into the
    # stage of the run it explains might read that run before it exists
    runs = _runs(load_spec(REPO / "papermill_runs" / "smoke.yaml"), tmp_path)
    runs = [replace(r, stage="train") if r.stage == "explain" else r for r in runs]
    (problem,) = order_problems(runs)
    assert problem.startswith("stage train (06_explain) reads ")
    assert problem.endswith("which stage train (04_distributed_training) writes in the same stage")


def test_overlap_is_inside_either_way_and_follows_globs():
    assert overlap("/o/demo", "/o/demo/explain/abc")
    assert overlap("/o/demo/learning/abc/run", "/o/demo/learning")
    assert overlap("/o/demo/train/raw-pinned_*", "/o/demo/train/raw-pinned_1f2e")
    assert not overlap("/o/demo/train", "/o/demo/training")
    assert not overlap("/o/demo/data", "/o/demo/records/x")


def test_the_walkthrough_reads_only_what_comes_before_it():
    for i, name in enumerate(WALKTHROUGH):
        assert set(read_from(name)) <= set(WALKTHROUGH[:i]), name


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_declared_folders_are_parameters_of_the_notebook(name):
    defaults = parameter_defaults(name)
    io = NOTEBOOKS[name]
    named = set(io.reads) | set(io.writes) | {c for c in io.writes.values() if c}
    assert named <= set(defaults), named - set(defaults)

"""Issue 26's adversarial findings on ``chexlib study``, on real files and processes:
a hostile specification (alias bomb, deep nesting, a huge name) is one short error
line in a moment; a bad or missing run record is named by the summary and by the
verdicts that might have used it, and makes a complete summary stale; two studies
on one folder do not both run it."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from test_summary import record

from chexlib.core.runs import RecordWarning, write_run_record
from chexlib.report import summary, verdicts
from chexlib.study.notebook import REPO
from chexlib.study.runner import expand, load_spec, run_study
from chexlib.study.summary_inputs import inputs_digest

CHEXLIB = Path(sys.executable).parent / "chexlib"


def _study_error(spec: Path, tmp_path: Path, timeout: float = 30) -> tuple[list[str], float]:
    """``chexlib study SPEC --dry-run`` as a process: its stderr lines and how long it took."""
    start = time.monotonic()
    res = subprocess.run(
        [str(CHEXLIB), "study", str(spec), "--dry-run", "--outputs", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    return res.stderr.splitlines(), time.monotonic() - start


def _bomb() -> str:
    lines = ['      A0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"      A{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    return "stages:\n  - name: s\n    notebook: n\n    parameters:\n" + "\n".join(lines) + "\n"


HOSTILE = {
    # a billion "lol"s from 10 lines: expanding it hung the dry run past 90 s
    "bomb": (_bomb, r"line 10 holds more than 100,000 values \(aliases expanded\); refused"),
    # 500 nested lists: a RecursionError traceback of ~3,000 lines
    "deep": (
        lambda: (
            "stages:\n  - {name: s, notebook: n, parameters: {A: " + "[" * 500 + "]" * 500 + "}}\n"
        ),
        r"nested deeper than 32 levels \(line 2\)",
    ),
    "self": (
        lambda: "stages:\n  - {name: s, notebook: n, parameters: {A: &a [1, *a]}}\n",
        r"the value at line 2 contains itself \(through an alias\)",
    ),
    # a 10 MB name was echoed back whole
    "10mb": (
        lambda: "name: " + "x" * 10_000_000 + "\nstages: [{name: s, notebook: n}]\n",
        r"10,000,0\d\d characters, more than the 262,144 a study specification may have",
    ),
    "long-name": (
        lambda: "name: " + "x" * 200_000 + "\nstages: [{name: s, notebook: n}]\n",
        r"name 'x{79}\.\.\. \(200,002 characters\) is not a safe name",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_spec_is_one_short_error_line_in_a_moment(tmp_path, case):
    text, message = HOSTILE[case]
    spec = tmp_path / f"{case}.yaml"
    spec.write_text(text())
    lines, seconds = _study_error(spec, tmp_path)
    assert len(lines) == 1, lines[:5]
    assert lines[0].startswith(f"chexlib study: error: {spec}: "), lines[0][:300]
    assert re.search(message, lines[0]), lines[0][:300]
    assert len(lines[0]) < 400 + len(str(spec))
    assert seconds < 8, f"took {seconds:.1f} s"


def test_the_bounds_leave_real_specs_alone(tmp_path):
    for path in sorted((REPO / "papermill_runs").glob("*.yaml")):
        plain = yaml.safe_load(path.read_text())
        assert [s["parameters"] for s in load_spec(path)["stages"]] == [
            s["parameters"] for s in plain["stages"]
        ]
    shared = tmp_path / "shared.yaml"  # anchors, aliases and merge keys as people write them
    shared.write_text(
        "stages:\n  - {name: a, notebook: n, parameters: &base {EPOCHS: 2, SIZES: [64, 128]}}\n"
        "  - {name: b, notebook: n, parameters: {<<: *base, MODEL: m}}\n"
        "  - {name: c, notebook: n, parameters: *base}\n"
    )
    stages = load_spec(shared)["stages"]
    assert stages[1]["parameters"] == {"EPOCHS": 2, "SIZES": [64, 128], "MODEL": "m"}
    assert stages[0]["parameters"] == stages[2]["parameters"] == {"EPOCHS": 2, "SIZES": [64, 128]}


# --- bad or missing run records ------------------------------------------------------


def _mini_study(tmp_path: Path) -> tuple[Path, dict]:
    """A study folder as ``chexlib study`` leaves it after two stand-in training runs
    (naive 10 images/s, optimized 30: the pipeline claim is supported at 3.0x), with
    the spec of its train and summary stages; returns the spec and the runs by name."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    spec = tmp_path / "mini.yaml"
    stages = [
        {
            "name": "train",
            "notebook": "04_distributed_training",
            "grid": {"PIPELINE": ["naive", "optimized"]},
            "parameters": {"MODEL": "standin"},
        },
        {
            "name": "summary",
            "notebook": "05_summary",
            "output_dir": "{study_dir}/summary",
            "html": "summary.html",
            "parameters": {"STUDY_DIR": "{study_dir}"},
        },
    ]
    spec.write_text(json.dumps({"name": "mini", "stages": stages}))
    runs = {r.parameters.get("PIPELINE", "summary"): r for r in expand(load_spec(spec), out)}
    for pipeline in ("naive", "optimized"):
        run = runs[pipeline]
        rec = record(run.run_id, pipeline, 1, 30.0 if pipeline == "optimized" else 10.0,
                     model="standin")  # fmt: skip
        write_run_record(run.run_dir, rec["params"], rec["metrics"])
        marker = {"stage": run.stage, "notebook": run.notebook, "parameters": run.parameters}
        (run.run_dir / "run.json").write_text(json.dumps({**marker, "status": "complete"}))
    return spec, runs


def _set_rate(run_dir: Path, value) -> None:
    """Edit ``images_per_sec`` in a run's metrics.json by hand (NaN written as JSON's NaN)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["images_per_sec"] = value
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def _claim(result: dict, claim_id: str) -> dict:
    return next(c for c in result["claims"] if c["id"] == claim_id)


def _statuses(spec: Path, out: Path) -> dict[str, str]:
    lines: list[str] = []
    run_study(spec, outputs=out, dry_run=True, log=lines.append)
    return {p[1]: p[0] for p in (line.split() for line in lines) if len(p) == 2}


@pytest.mark.parametrize("bad", ["nan", "string", "deleted"])
def test_a_bad_record_is_named_by_the_verdicts_that_used_it(tmp_path, bad):
    spec, runs = _mini_study(tmp_path)
    tables = summary.load_study(runs["summary"].study_dir)
    assert _claim(verdicts.verdicts(tables), "pipeline")["verdict"] == verdicts.SUPPORTED
    naive = runs["naive"].run_dir
    if bad == "deleted":
        (naive / "metrics.json").unlink()
    else:
        _set_rate(naive, math.nan if bad == "nan" else "fast")
    with pytest.warns(RecordWarning, match=re.escape(f"run left out: {naive}: ")):
        tables = summary.load_study(runs["summary"].study_dir)
    result = verdicts.verdicts(tables)
    pipeline = _claim(result, "pipeline")
    problem = {
        "nan": "metrics.json: images_per_sec is nan (not a finite number)",
        "string": "metrics.json: images_per_sec is 'fast' (not a finite number)",
        "deleted": "metrics.json is missing (the run is marked complete)",
    }[bad]
    assert pipeline["verdict"] == verdicts.NOT_TESTABLE and pipeline["measured"] is None
    assert pipeline["left_out"] == [str(naive)] and f"{naive} ({problem})" in pipeline["note"]
    assert [(p["run_dir"], p["problem"]) for p in result["left_out"]] == [(str(naive), problem)]
    # a claim measured on other runs does not list it; the conclusions name it first
    assert _claim(result, "localization")["left_out"] == []
    text = verdicts.conclusions(result)
    assert f"- `{naive}`: {problem}" in text and "1 run(s) left out" in text
    # the optimized run alone is still in the tables
    assert list(tables["train"]["run_id"]) == [runs["optimized"].run_id]


def test_a_complete_summary_is_stale_once_a_record_it_read_changes(tmp_path):
    spec, runs = _mini_study(tmp_path)
    out, summary_run = tmp_path / "out", runs["summary"]
    summary_run.run_dir.mkdir(parents=True)
    marker = {"stage": "summary", "notebook": summary_run.notebook,
              "parameters": summary_run.parameters, "status": "complete"}  # fmt: skip
    (summary_run.run_dir / "run.json").write_text(json.dumps(marker))
    # a summary written before it kept what it read: it cannot know, so it reruns
    assert _statuses(spec, out)["summary/summary"] == "stale"
    marker["inputs_sha256"] = inputs_digest(
        summary_run.study_dir, summary_run.run_dir
    )  # as execute() records it
    (summary_run.run_dir / "run.json").write_text(json.dumps(marker))
    assert _statuses(spec, out)["summary/summary"] == "complete"
    # its own outputs are not its inputs
    write_run_record(summary_run.run_dir, {}, {"runs": 2})
    assert _statuses(spec, out)["summary/summary"] == "complete"
    naive = runs["naive"].run_dir
    for edit in (
        lambda: _set_rate(naive, math.nan),
        lambda: _set_rate(naive, "fast"),
        lambda: (naive / "metrics.json").unlink(),
        lambda: (naive / "params.json").write_text("{}"),
    ):
        edit()
        assert _statuses(spec, out)["summary/summary"] == "stale"
        marker["inputs_sha256"] = inputs_digest(summary_run.study_dir, summary_run.run_dir)
        (summary_run.run_dir / "run.json").write_text(json.dumps(marker))
        assert _statuses(spec, out)["summary/summary"] == "complete"


@pytest.mark.slow
def test_the_summary_notebook_reruns_and_names_an_edited_record(tmp_path):
    """notebooks/05_summary.ipynb itself, run by the study runner (about 15 s a run)."""
    spec, runs = _mini_study(tmp_path)
    out, folder = tmp_path / "out", runs["summary"].run_dir

    def summarise() -> tuple[list, dict]:
        result = run_study(spec, outputs=out, only=["summary"], html=False, log=print)
        assert result.ok, result.failed
        return result.ran, json.loads((folder / "verdicts.json").read_text())

    ran, result = summarise()
    assert len(ran) == 1 and _claim(result, "pipeline")["verdict"] == verdicts.SUPPORTED
    assert _claim(result, "pipeline")["measured"] == pytest.approx(3.0)
    assert summarise()[0] == []  # already complete
    naive = runs["naive"].run_dir
    _set_rate(naive, math.nan)  # "supported" became "not supported, Measured nan x naive"
    ran, result = summarise()
    assert len(ran) == 1, "the summary was not rerun after a record it read changed"
    pipeline = _claim(result, "pipeline")
    assert pipeline["verdict"] == verdicts.NOT_TESTABLE and pipeline["left_out"] == [str(naive)]
    assert "images_per_sec is nan" in pipeline["note"]
    conclusions = json.loads((folder / "metrics.json").read_text())["conclusions"]
    assert f"`{naive}`: metrics.json: images_per_sec is nan" in conclusions
    (naive / "metrics.json").unlink()  # "not testable" with no word of why
    ran, result = summarise()
    assert len(ran) == 1 and _claim(result, "pipeline")["left_out"] == [str(naive)]
    assert f"{naive} (metrics.json is missing" in _claim(result, "pipeline")["note"]


# --- one study per folder ------------------------------------------------------------


def _waiting_notebook(path: Path) -> None:
    """A notebook that counts its runs, says it started, and waits to be released."""
    source = textwrap.dedent(
        """
        import os, time
        from pathlib import Path
        from chexlib.core.runs import write_run_record
        here = Path(OUTPUT_DIR)
        with open(here.parent.parent / "executions.txt", "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        (here / "started").write_text("yes")
        deadline = time.time() + 120
        while not (here.parent.parent / "release").exists() and time.time() < deadline:
            time.sleep(0.2)
        write_run_record(OUTPUT_DIR, {}, {"value": 1})
        """
    )
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('OUTPUT_DIR = "."')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)


def test_a_second_study_on_the_same_folder_is_refused_naming_the_first(tmp_path):
    notebook = tmp_path / "wait.ipynb"
    _waiting_notebook(notebook)
    spec = tmp_path / "locked.yaml"
    spec.write_text(json.dumps({"name": "locked", "stages": [
        {"name": "s", "notebook": str(notebook), "parameters": {}}]}))  # fmt: skip
    out, study = tmp_path / "out", tmp_path / "out" / "locked"
    command = [str(CHEXLIB), "study", str(spec), "--outputs", str(out), "--no-html"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)  # fmt: skip
    second = None
    try:
        deadline = time.monotonic() + 120
        while not list(study.glob("s/*/started")):
            assert first.poll() is None, first.communicate(timeout=30)
            assert time.monotonic() < deadline, "the first study never started its run"
            time.sleep(0.2)
        second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)  # fmt: skip
        stdout, stderr = second.communicate(timeout=60)
        assert second.returncode == 2, (stdout, stderr)
        (line,) = stderr.splitlines()
        assert line.startswith(f"chexlib study: error: {study}: another chexlib study is running")
        assert f"pid {first.pid} on {socket.gethostname()}, since 20" in line
        (study / "release").write_text("go")
        stdout, stderr = first.communicate(timeout=120)
        assert first.returncode == 0, (stdout, stderr)
        assert len((study / "executions.txt").read_text().split()) == 1  # ran once
        # the lock died with its holder: the next study starts, and finds nothing to do
        again = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "1 already complete, 0 to run" in again.stdout
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)

"""chexlib.study.runner: grids, stable run ids, resume, failures, on a probe notebook."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chexlib.core.files import RecordError, write_json
from chexlib.study.runner import SpecError, expand, load_spec, run_study

PROBE = Path(__file__).parent / "notebooks" / "probe.ipynb"


def _spec(tmp_path, grid, fail_values=(), name="probe") -> Path:
    spec = {
        "name": name,
        "stages": [
            {
                "name": "square",
                "notebook": str(PROBE),
                "grid": {"VALUE": grid},
                "parameters": {"FAIL": False},
            }
        ],
    }
    if fail_values:
        spec["stages"].append(
            {
                "name": "broken",
                "notebook": str(PROBE),
                "grid": {"VALUE": list(fail_values)},
                "parameters": {"FAIL": True},
            }
        )
        spec["stages"].append({"name": "after", "notebook": str(PROBE), "parameters": {"VALUE": 9}})
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def test_expand_gives_stable_distinct_ids(tmp_path):
    spec = load_spec(_spec(tmp_path, [1, 2, 3]))
    a, b = expand(spec, tmp_path / "out"), expand(spec, tmp_path / "out")
    assert [r.run_dir for r in a] == [r.run_dir for r in b]
    assert len({r.run_id for r in a}) == 3
    assert all(r.run_id.startswith(f"value-{v}_") for r, v in zip(a, [1, 2, 3], strict=True))
    assert a[0].parameters["OUTPUT_DIR"] == str(a[0].run_dir)


def test_spec_errors_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - name: x\n    notebook: n\n    grid: {A: 3}\n")
    with pytest.raises(SpecError, match="bad.yaml stage 1 .*grid values must be non-empty lists"):
        load_spec(bad)
    bad.write_text("stages:\n  - name: x\n    notebook: n\n    parameters: {A: '{nope}'}\n")
    with pytest.raises(SpecError, match=r"unknown placeholder \{nope\}"):
        expand(load_spec(bad), tmp_path)


@pytest.mark.slow
def test_runs_resumes_and_reports_failures(tmp_path):
    out = tmp_path / "out"
    lines: list[str] = []
    first = run_study(_spec(tmp_path, [2, 3], fail_values=[7]), outputs=out, log=lines.append)
    assert not first.ok and len(first.ran) == 3 and len(first.failed) == 1  # 'after' still ran
    failed_run, reason = first.failed[0]
    assert "probe asked to fail (VALUE=7)" in reason
    assert failed_run.executed.is_file() and failed_run.executed.with_suffix(".html").is_file()
    assert any("FAILED" in line for line in lines)
    assert any(str(failed_run.executed) in line for line in lines)
    metrics = json.loads((out / "probe/square" / first.ran[0].run_id / "metrics.json").read_text())
    assert metrics["value_squared"] == 4

    # An interrupted run (marker says running) is rerun; complete ones are skipped.
    done = first.ran[1]
    marker = json.loads((done.run_dir / "run.json").read_text())
    (done.run_dir / "run.json").write_text(json.dumps({**marker, "status": "running"}))
    second = run_study(_spec(tmp_path, [2, 3]), outputs=out, log=lines.append)
    assert [r.run_id for r in second.ran] == [done.run_id]
    assert {r.run_id for r in second.skipped} == {first.ran[0].run_id}
    assert second.ok


@pytest.mark.slow
def test_cli_exit_status(tmp_path):
    spec = _spec(tmp_path, [1], fail_values=[5])
    cmd = [
        sys.executable,
        "-m",
        "chexlib.cli.main",
        "study",
        str(spec),
        "--outputs",
        str(tmp_path / "o"),
    ]
    dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True)
    assert dry.returncode == 0 and "3 runs, 0 already complete" in dry.stdout
    res = subprocess.run(cmd + ["--no-html"], capture_output=True, text=True)
    assert res.returncode == 1 and "failed: broken/value-5_" in res.stdout
    again = subprocess.run(cmd + ["--only", "square"], capture_output=True, text=True)
    assert again.returncode == 0 and "1 already complete, 0 to run" in again.stdout


def test_cases_cross_the_grid_and_label_run_ids(tmp_path):
    spec_path = tmp_path / "cases.yaml"
    spec_path.write_text(
        "stages:\n  - name: s\n    notebook: n\n    grid: {B: [1, 2]}\n"
        "    cases:\n      - {A: '{study_dir}/x', _label: first}\n      - {A: plain}\n"
    )
    runs = expand(load_spec(spec_path), tmp_path / "out")
    assert [(r.parameters["A"].split("/")[-1], r.parameters["B"]) for r in runs] == [
        ("x", 1),
        ("x", 2),
        ("plain", 1),
        ("plain", 2),
    ]
    assert all("_label" not in r.parameters for r in runs)
    assert runs[0].run_id.startswith("first_b-1_") and runs[2].run_id.startswith("a-plain_b-1_")


@pytest.mark.slow
def test_summary_reruns_after_new_runs_and_strays_are_named(tmp_path):
    def spec(values):
        path = tmp_path / "collect.yaml"
        stages = [
            {"name": "square", "notebook": str(PROBE), "grid": {"VALUE": values}},
            {
                "name": "summary",
                "notebook": str(PROBE),
                "output_dir": "{study_dir}/summary",
                "parameters": {"VALUE": 0},
            },
        ]
        path.write_text(json.dumps({"name": "collect", "stages": stages}))
        return path

    out, lines = tmp_path / "out", []
    first = run_study(spec([1]), outputs=out, html=False, log=lines.append)
    assert [r.stage for r in first.ran] == ["square", "summary"]
    assert not run_study(spec([1]), outputs=out, html=False, log=lines.append).ran
    # A new run in an earlier stage makes the complete summary stale: it collects again.
    second = run_study(spec([1, 2]), outputs=out, html=False, log=lines.append)
    assert [(r.stage, r.parameters["VALUE"]) for r in second.ran] == [("square", 2), ("summary", 0)]
    # So does an earlier run that finished after it (rerun by hand, or by --only).
    summary_marker = out / "collect/summary/run.json"
    square_marker = second.ran[0].run_dir / "run.json"
    stamp = summary_marker.stat().st_mtime
    os.utime(square_marker, (stamp + 5, stamp + 5))
    lines.clear()
    run_study(spec([1, 2]), outputs=out, dry_run=True, log=lines.append)
    assert any(line.split() == ["stale", "summary/summary"] for line in lines)
    # A run folder the spec no longer lists is named: summaries would still read it.
    lines.clear()
    run_study(spec([2]), outputs=out, dry_run=True, log=lines.append)
    stray = [line for line in lines if "is not a run of this spec" in line]
    assert len(stray) == 1 and first.ran[0].run_id in stray[0]


GOOD_STAGE = "  - {name: s, notebook: n}\n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: 123\nstages:\n" + GOOD_STAGE, r"name must be a string, not int \(123\)"),
        ("name: ../up\nstages:\n" + GOOD_STAGE, r"name '../up' is not a safe name"),
        ("name: a/b\nstages:\n" + GOOD_STAGE, r"name 'a/b' is not a safe name"),
        ("name: '..'\nstages:\n" + GOOD_STAGE, r"name '..' is not a safe name"),
        ("stages:\n  - {name: a/b, notebook: n}\n", r"stage 1: name 'a/b' is not a safe name"),
        ("stages:\n  - {name: 7, notebook: n}\n", r"stage 1: name must be a string, not int"),
        ("stages:\n  - {name: '.', notebook: n}\n", r"stage 1: name '.' is not a safe name"),
        (
            "stages:\n  - {name: s, notebook: n, cases: [{A: 1, _label: ../evil}]}\n",
            r"stage 1 \(s\): cases\[0\]._label '../evil' is not a safe name",
        ),
        (
            "stages:\n  - {name: s, notebook: n, cases: [{A: 1, _label: 5}]}\n",
            r"cases\[0\]._label must be a string, not int",
        ),
        ("stages:\n  - {name: s, notebook: 5}\n", r"stage 1 \(s\): notebook must be a non-empty"),
        (
            "stages:\n  - {name: s, notebook: n, parameters: [1]}\n",
            r"'parameters' must be a mapping",
        ),
        ("stages:\n  - {name: s, notebook: n, grid: {A B: [1]}}\n", r"'grid': keys must be"),
        (
            "stages:\n  - {name: s, notebook: n, html: ../x.html}\n",
            r"html '../x.html' is not a safe",
        ),
        (
            "stages:\n  - {name: s, notebook: n, parameter: {A: 1}}\n",
            r"unknown key\(s\) \['parameter'\]",
        ),
        ("hosts: 3\nstages:\n" + GOOD_STAGE, r"hosts must be a string, not int"),
        ("vars: {d: [1]}\nstages:\n" + GOOD_STAGE, r"vars.d must be a string or a number"),
        ("vars: [1]\nstages:\n" + GOOD_STAGE, r"vars must be a mapping"),
        ("stages: 3\n", r"a study needs a non-empty 'stages' list"),
        ("- just\n- a list\n", r"a study specification is a mapping"),
    ],
)
def test_spec_fields_are_type_checked_and_named(tmp_path, text, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(SpecError, match=message) as info:
        load_spec(spec)
    assert str(spec) in str(info.value)


def test_run_folders_never_land_outside_outputs(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("stages:\n  - {name: s, notebook: n, output_dir: '{outputs}/../elsewhere'}\n")
    with pytest.raises(SpecError, match="run folder .*elsewhere is not inside the outputs folder"):
        expand(load_spec(spec), tmp_path / "out")
    bad_name = tmp_path / "my study.yaml"  # the default name comes from the file name
    bad_name.write_text("stages:\n" + GOOD_STAGE)
    with pytest.raises(SpecError, match=r"name \(from the file name; set 'name:'\)"):
        load_spec(bad_name)
    for run in expand(load_spec(_spec(tmp_path, [1, "../../x", "a/b"])), tmp_path / "out"):
        assert run.run_dir.is_relative_to(tmp_path / "out" / "probe" / "square")


def test_bad_spec_is_one_error_line_from_the_command(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: 123\nstages:\n" + GOOD_STAGE)
    chexlib = Path(sys.executable).parent / "chexlib"
    res = subprocess.run([str(chexlib), "study", str(spec)], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.splitlines() == [
        f"chexlib study: error: {spec}: name must be a string, not int (123)"
    ]


def test_corrupt_run_json_is_named(tmp_path):
    spec = _spec(tmp_path, [1, 2])
    first, second = expand(load_spec(spec), tmp_path / "out")
    write_json(first.run_dir / "run.json", {"status": "complete", "parameters": {}})
    second.run_dir.mkdir(parents=True)
    (second.run_dir / "run.json").write_bytes(b"\x00\x00\x00")  # a crash left zeros
    with pytest.raises(RecordError, match=f"{second.run_dir / 'run.json'}: corrupt JSON record"):
        run_study(spec, outputs=tmp_path / "out", dry_run=True, log=lambda line: None)
    (second.run_dir / "run.json").write_text("[]")
    with pytest.raises(RecordError, match="run.json: expected a JSON object, found array"):
        run_study(spec, outputs=tmp_path / "out", dry_run=True, log=lambda line: None)


# --- timeouts ------------------------------------------------------------------------


def test_timeout_comes_from_the_stage_else_the_spec_and_is_checked(tmp_path):
    spec = tmp_path / "t.yaml"
    spec.write_text(
        "timeout: 600\nstages:\n  - {name: a, notebook: n}\n  - {name: b, notebook: n, timeout: 5}\n"
        "  - {name: c, notebook: n, timeout: null}\n"
    )
    runs = expand(load_spec(spec), tmp_path / "out")
    assert [r.timeout for r in runs] == [600, 5, None]
    assert "TIMEOUT" not in runs[1].parameters  # not a notebook parameter: run ids stay
    for text, where in [
        ("timeout: ten\nstages:\n" + GOOD_STAGE, f"{spec}: timeout"),
        ("stages:\n  - {name: s, notebook: n, timeout: -5}\n", f"{spec} stage 1 (s): timeout"),
        ("stages:\n  - {name: s, notebook: n, timeout: true}\n", f"{spec} stage 1 (s): timeout"),
    ]:
        spec.write_text(text)
        with pytest.raises(SpecError, match="must be a positive number of seconds") as info:
            load_spec(spec)
        assert str(info.value).startswith(where)


def _sleeper_notebook(path: Path) -> Path:
    """A notebook that sleeps SECONDS, then writes its run record."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "chexlib", "display_name": "Python (chexlib)", "language": "python"
    }  # fmt: skip
    nb.metadata["language_info"] = {"name": "python"}
    params = nbformat.v4.new_code_cell('OUTPUT_DIR: str = "."  # run folder\nSECONDS: int = 0')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell(
            "import time\n\nfrom chexlib.core.runs import write_run_record\n\ntime.sleep(SECONDS)\n"
            'write_run_record(OUTPUT_DIR, {"SECONDS": SECONDS}, {"slept": SECONDS})'
        ),
    ]
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_a_run_over_its_stage_timeout_fails_and_the_study_goes_on(tmp_path):
    notebook = _sleeper_notebook(tmp_path / "sleeper.ipynb")
    spec = tmp_path / "hang.yaml"
    spec.write_text(
        "stages:\n"
        f"  - {{name: stuck, notebook: {notebook}, timeout: 20, parameters: {{SECONDS: 3600}}}}\n"
        f"  - {{name: after, notebook: {notebook}, parameters: {{SECONDS: 0}}}}\n"
    )
    lines: list[str] = []
    start = time.monotonic()
    result = run_study(spec, outputs=tmp_path / "out", html=False, log=lines.append)
    assert time.monotonic() - start < 90
    assert [r.stage for r in result.ran] == ["after"]
    ((stuck, reason),) = result.failed
    assert stuck.stage == "stuck" and reason.startswith(
        "timed out after 20 s (timeout of stage stuck)"
    )
    record = json.loads((stuck.run_dir / "run.json").read_text())
    assert record["status"] == "failed" and record["error"] == reason
    assert any("timed out after 20 s" in line for line in lines)  # in the closing report
    assert not _alive_in(stuck.run_dir)  # the kernel and what it started are gone


def _alive_in(folder: Path) -> list:
    """Processes below this one still running in ``folder`` (a kernel works in its run folder)."""
    import psutil

    alive = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and Path(proc.cwd()) == folder.resolve():
                alive.append(proc)
    return alive

"""System errors end every command in one ``error:`` line, and records are never half-written.

Real files and real processes: the ``chexlib`` console script run as a
subprocess; a full disk is a real ``RLIMIT_FSIZE`` in the child (the kernel
refuses the write with ``EFBIG`` halfway through, as it would with ``ENOSPC``),
which works as root too, unlike permission bits.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import require

from chexlib.cli.main import main
from chexlib.core.files import RecordError, read_json, write_json
from chexlib.core.runs import RecordWarning, collect_runs

CHEXLIB = Path(sys.executable).parent / "chexlib"
NOBODY = 65534  # as root, permission tests run their child as this user


def _preexec(limit: int | None = None):
    """A ``preexec_fn``: files of the child cannot grow past ``limit`` bytes."""

    def apply():
        if limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _unprivileged_prefix() -> list[str]:
    """As root, run the child as ``nobody`` (via util-linux ``setpriv``), so
    permission bits stop it as they stop any user; as a user, nothing to do."""
    if os.geteuid() != 0:
        return []
    require(
        shutil.which("setpriv"),
        "runs as root and setpriv is missing: permission bits would not stop root",
    )
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def chexlib(*args, limit=None, unprivileged=False, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    prefix = _unprivileged_prefix() if unprivileged else []
    return subprocess.run(
        [*prefix, str(CHEXLIB), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
        preexec_fn=_preexec(limit),
    )


@pytest.fixture()
def shared_tmp():
    """A temporary folder a child running as ``nobody`` can enter (pytest's is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="chexlib-perm-"))
    folder.chmod(0o755)
    yield folder
    for sub in folder.rglob("*"):
        if sub.is_dir():
            sub.chmod(0o755)
    shutil.rmtree(folder)


def assert_one_error_line(res: subprocess.CompletedProcess, command: str, *expected: str) -> str:
    """Exit status non-zero, no traceback, and exactly one ``chexlib <cmd>: error:`` line."""
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"chexlib {command}: error:"), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _spec(tmp_path: Path, name: str = "probe") -> Path:
    notebook = Path(__file__).parent / "notebooks" / "probe.ipynb"
    stage = {"name": "square", "notebook": str(notebook), "grid": {"VALUE": [1]}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"name": name, "stages": [stage]}))
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "data"
    res = chexlib("synth", out, "--images", 8, "--size", 32, "--workers", 1, "--no-progress")
    assert res.returncode == 0, res.stderr
    return out


# --- an output path that is a file (ENOTDIR / EEXIST: works as root) ------------------


def test_study_outputs_under_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = chexlib("study", _spec(tmp_path), "--outputs", blocker / "out", "--no-html")
    assert_one_error_line(res, "study", str(blocker), "Not a directory")


def test_study_outputs_is_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = chexlib("study", _spec(tmp_path), "--outputs", blocker, "--no-html")
    assert_one_error_line(res, "study", str(blocker))
    assert blocker.read_text() == "not a folder"


def test_validate_json_report_under_a_file(tmp_path, tiny_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = chexlib("validate", tiny_data, "--workers", 1, "--json", blocker / "report.json")
    assert_one_error_line(res, "validate", str(blocker))


def test_synth_output_under_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = chexlib("synth", blocker / "data", "--images", 4, "--size", 32, "--no-progress")
    assert_one_error_line(res, "synth")


def test_convert_output_under_a_file(tmp_path, tiny_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = chexlib("convert", tiny_data, blocker / "records", "--workers", 1, "--no-progress")
    assert_one_error_line(res, "convert")


# --- permission denied (not as root) --------------------------------------------------


def test_study_in_a_read_only_folder(shared_tmp):
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    spec = _spec(shared_tmp)
    spec.chmod(0o644)
    res = chexlib("study", spec, "--outputs", locked / "out", "--no-html", unprivileged=True)
    assert_one_error_line(res, "study", str(locked / "out"), "Permission denied")


def test_publish_into_a_read_only_docs_folder(shared_tmp):
    summary = shared_tmp / "outputs" / "summary"
    write_json(summary / "metrics.json", {"conclusions": "- new"})
    (summary / "scaling_efficiency.png").write_bytes(b"\x89PNG new")
    for folder in (shared_tmp / "outputs", summary):
        folder.chmod(0o755)
    for f in summary.iterdir():
        f.chmod(0o644)
    docs = shared_tmp / "docs"
    docs.mkdir(mode=0o555)
    docs.chmod(0o555)
    readme = shared_tmp / "README.md"
    original = "# project\n<!-- results:begin -->\nold\n<!-- results:end -->\n"
    readme.write_text(original)
    readme.chmod(0o666)
    res = chexlib("publish-results", summary, "--readme", readme, "--docs", docs, unprivileged=True)
    assert_one_error_line(res, "publish-results", str(docs), "Permission denied")
    assert readme.read_text() == original
    assert list(docs.iterdir()) == []


# --- a full disk -------------------------------------------------------------------


def test_full_disk_is_one_error_line_and_no_partial_file(tmp_path):
    """publish-results runs out of room while writing the README: one line, README intact."""
    summary = tmp_path / "outputs" / "summary"
    write_json(summary / "metrics.json", {"conclusions": "- a long conclusion\n" * 2000})
    readme = tmp_path / "README.md"
    original = "# project\n<!-- results:begin -->\nold\n<!-- results:end -->\n"
    readme.write_text(original)
    res = chexlib(
        "publish-results", summary, "--readme", readme, "--docs", tmp_path / "docs", limit=8192
    )
    assert_one_error_line(res, "publish-results", "File too large")
    assert readme.read_text() == original
    assert not [p for p in tmp_path.rglob("*.tmp")]


# --- the dispatcher, in process ------------------------------------------------------


def test_dispatcher_reports_project_errors_in_one_line(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    status = main(["publish-results", str(tmp_path / "nowhere"), "--readme", str(readme)])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("chexlib publish-results: error: ") and err.count("\n") == 1
    assert "needs exactly one" in err


def test_corrupt_run_json_is_named_by_the_study_command(tmp_path):
    from chexlib.study.runner import expand, load_spec

    spec = _spec(tmp_path)
    (run,) = expand(load_spec(spec), tmp_path / "out")
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "run.json").write_text('{"status": "comp')  # cut short
    res = chexlib("study", spec, "--outputs", tmp_path / "out", "--dry-run")
    assert_one_error_line(res, "study", str(run.run_dir / "run.json"), "corrupt JSON record")
    assert res.returncode == 2


# --- write_json / read_json ------------------------------------------------------------


class _Unserialisable:
    pass


def test_write_json_failing_to_serialise_leaves_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"images_per_sec": 10.0})
    before = path.read_bytes()
    big = {"rows": [{"i": i} for i in range(1000)] + [{"bad": _Unserialisable()}]}
    with pytest.raises(TypeError, match="_Unserialisable"):
        write_json(path, big)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_write_json_cut_off_halfway_leaves_previous_file(tmp_path):
    """The kernel stops the write after 4 KiB: the old record survives, no temp file remains."""
    path = tmp_path / "metrics.json"
    write_json(path, {"images_per_sec": 10.0})
    before = path.read_bytes()
    script = textwrap.dedent(
        f"""
        from chexlib.core.files import write_json
        try:
            write_json({str(path)!r}, {{"rows": list(range(100000))}})
        except OSError as err:
            raise SystemExit(f"failed: {{err.errno}}")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        preexec_fn=_preexec(limit=4096),
    )
    assert "failed: 27" in res.stderr  # EFBIG, after a partial write
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_write_json_makes_values_json_safe(tmp_path):
    path = tmp_path / "m.json"
    write_json(
        path,
        {
            "nan": float("nan"),
            "inf": np.float32("inf"),
            "int": np.int64(3),
            "flag": np.bool_(True),
            "array": np.arange(3),
            "nested": [{"x": np.float64("nan")}, (1, Path("/a/b"))],
        },
    )
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {
        "nan": None,
        "inf": None,
        "int": 3,
        "flag": True,
        "array": [0, 1, 2],
        "nested": [{"x": None}, [1, "/a/b"]],
    }


@pytest.mark.parametrize(
    "content, reason",
    [('{"status": "compl', "corrupt JSON record"), ("", "empty JSON record"), ("[1]", "object")],
)
def test_read_json_of_a_bad_record_names_the_file(tmp_path, content, reason):
    path = tmp_path / "run.json"
    path.write_text(content)
    with pytest.raises(RecordError, match=reason) as info:
        read_json(path, expect=dict)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_collect_runs_leaves_out_a_corrupt_run_and_names_it(tmp_path):
    for name in ("good", "bad"):
        write_json(tmp_path / "train" / name / "run.json", {"status": "complete", "parameters": {}})
        write_json(tmp_path / "train" / name / "metrics.json", {"images_per_sec": 1.0})
    (tmp_path / "train" / "bad" / "metrics.json").write_text('{"images_per_sec": 1.')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = collect_runs(tmp_path)
    assert [r["run_id"] for r in records] == ["good"]
    named = [w for w in caught if issubclass(w.category, RecordWarning)]
    assert len(named) == 1 and str(tmp_path / "train" / "bad" / "metrics.json") in str(
        named[0].message
    )
    with pytest.raises(RecordError, match="bad/metrics.json"):
        collect_runs(tmp_path, on_error="raise")


def test_table_records_are_json_safe_rows():
    import pandas as pd

    from chexlib.core.runs import table_records

    table = pd.DataFrame(
        {"name": ["a", "b"], "rate": [1.5, float("nan")], "n": np.array([1, 2], np.int64)}
    )
    table["windows"] = [[1.0, float("nan")], [2.0]]
    rows = table_records(table)
    assert rows == [
        {"name": "a", "rate": 1.5, "n": 1, "windows": [1.0, None]},
        {"name": "b", "rate": None, "n": 2, "windows": [2.0]},
    ]
    json.dumps(rows, allow_nan=False)


# --- every command reports its errors the same way, in one place ---------------------

BAD_INVOCATIONS = {
    "synth": ["synth", "{tmp}/s", "--images", "0", "--no-progress"],
    "validate": ["validate", "{tmp}/nowhere"],
    "convert": ["convert", "{tmp}/nowhere", "{tmp}/out", "--no-progress"],
    "verify-records": ["verify-records", "{tmp}/nowhere", "--data", "{tmp}/nowhere"],
    "bench-pipeline": ["bench-pipeline", "--data", "{tmp}", "--device-times", "2"],
    "train": ["train", "--data", "{tmp}/nowhere", "--out", "{tmp}/run", "--epochs", "1"],
    "explain": ["explain", "{tmp}/no-run", "--data", "{tmp}/nowhere"],
    "study": ["study", "{tmp}/no-spec.yaml"],
    "publish-results": ["publish-results", "{tmp}/no-summary"],
}


@pytest.mark.parametrize("command", sorted(BAD_INVOCATIONS))
def test_every_command_reports_a_user_error_in_one_prefixed_line(command, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in BAD_INVOCATIONS[command]]
    res = subprocess.run([CHEXLIB, *argv], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    assert_one_error_line(res, command)


def test_a_value_error_from_a_library_keeps_its_traceback_but_chexlibs_own_does_not():
    from chexlib.cli import main as cli_main
    from chexlib.pipeline.config import without_steps

    with pytest.raises(ValueError) as numpy_error:
        np.zeros(3).reshape(7)
    assert not cli_main.is_user_error(numpy_error.value)  # numpy's: a bug, traceback kept
    with pytest.raises(ValueError) as ours:
        without_steps("no-such-step")
    assert cli_main.is_user_error(ours.value)  # chexlib's, about a value it was given


def test_a_reader_that_leaves_ends_the_command_quietly(tmp_path):
    """`chexlib ... | head`: the reader closes the pipe before the command writes; the
    command ends with 141 (128 + SIGPIPE, as a shell reports it) and no error line."""
    spec = Path(__file__).resolve().parents[1] / "papermill_runs" / "smoke.yaml"
    argv = [str(CHEXLIB), "study", str(spec), "--dry-run", "--outputs", str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the first line is written: that write finds no reader
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Broken pipe" not in stderr and "Traceback" not in stderr, stderr

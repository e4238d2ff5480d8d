"""The test suite's own guards (tests/conftest.py, pyproject.toml): every test has a
deadline, a hang fails with the test's name, and require() fails in CI where it skips
locally.

Each guard is shown on a throw-away test file run by a real ``pytest`` subprocess with
this project's pyproject.toml and conftest.py copied next to it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import conftest
import psutil

ROOT = Path(__file__).resolve().parent.parent


def run_pytest(tmp_path: Path, name: str, source: str, **env) -> tuple[int, str, float]:
    """``pytest tests/NAME`` in a copy of this project's test setup: (exit, output, seconds)."""
    (tmp_path / "tests").mkdir(exist_ok=True)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "tests" / "conftest.py")
    (tmp_path / "tests" / name).write_text(textwrap.dedent(source))
    clean = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith("PYTEST_")}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"tests/{name}"],
        cwd=tmp_path,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def test_this_run_gives_every_test_a_deadline(request):
    assert float(request.config.getini("timeout") or 0) > 0
    assert request.config.getini("timeout_method") == "signal"
    assert conftest._timeout_of(request.node) == float(request.config.getini("timeout"))


def test_a_hung_test_fails_with_its_name_and_the_run_goes_on(tmp_path):
    code, out, seconds = run_pytest(
        tmp_path,
        "test_hang.py",
        """
        import time

        import pytest

        import conftest


        @pytest.mark.timeout(2)
        def test_sleeps_past_its_timeout():
            time.sleep(60)


        def test_after_the_hang():
            pass


        @pytest.mark.slow
        def test_slow_tests_get_the_longer_deadline(request):
            assert request.node.get_closest_marker("timeout").args == (conftest.SLOW_TIMEOUT,)
        """,
    )
    assert code == 1, out
    assert "FAILED tests/test_hang.py::test_sleeps_past_its_timeout - Failed: Timeout" in out, out
    assert "1 failed, 2 passed" in out, out
    assert seconds < 50, out  # stopped at its 2 s deadline, not after its 60 s sleep


def test_a_test_stuck_in_c_code_ends_the_run_naming_it(tmp_path):
    """With SIGALRM blocked, the main thread never runs pytest-timeout's handler, as when
    it waits inside a TensorFlow op: the backstop ends the run and kills the children."""
    child_pid = tmp_path / "child.pid"
    code, out, seconds = run_pytest(
        tmp_path,
        "test_stuck.py",
        f"""
        import signal
        import subprocess
        import time

        import pytest


        @pytest.mark.timeout(1)
        def test_stuck_outside_python():
            child = subprocess.Popen(["sleep", "300"])
            open({str(child_pid)!r}, "w").write(str(child.pid))
            signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGALRM}})
            time.sleep(60)
        """,
        CHEXLIB_TIMEOUT_GRACE="3",
    )
    assert code == 1, out
    assert (
        "+++ Timeout: tests/test_stuck.py::test_stuck_outside_python still runs 3 s after "
        "its 1 s timeout"
    ) in out, out
    assert "in test_stuck_outside_python" in out, out  # the stack of the main thread
    assert seconds < 50, out
    pid = int(child_pid.read_text())
    deadline = time.monotonic() + 10
    while not ended(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ended(pid), f"the stuck test's child {pid} still runs"


def ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # killed, not yet reaped
    except psutil.NoSuchProcess:
        return True


REQUIRES = """
from conftest import require


def test_needs_a_missing_library():
    require(False, "libexample is not installed")


def test_has_what_it_needs():
    require(True, "never shown")
"""


def test_require_skips_with_its_reason_locally(tmp_path):
    code, out, _ = run_pytest(tmp_path, "test_requires.py", REQUIRES)
    assert code == 0, out
    assert "SKIPPED [1] tests/test_requires.py:6: libexample is not installed" in out, out
    assert "1 passed, 1 skipped" in out, out


def test_require_fails_in_ci(tmp_path):
    code, out, _ = run_pytest(tmp_path, "test_requires.py", REQUIRES, CI="true")
    assert code == 1, out
    assert (
        "FAILED tests/test_requires.py::test_needs_a_missing_library - Failed: "
        "required in CI (CI=true), so not skipped: libexample is not installed"
    ) in out, out
    assert "1 failed, 1 passed" in out, out

"""Shared fixtures: one small generated dataset for the whole suite; a deadline for every
test; :func:`require`, a skip that fails in CI; :class:`OutputLines`, bounded reads of a
child's output."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import queue
import subprocess
import sys
import threading
import time

import psutil
import pytest

# Quiet TensorFlow's C++ start-up logging in test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# --- a hang fails the test that hangs --------------------------------------------------
# pyproject.toml sets pytest-timeout's default (600 s) and its "signal" method: SIGALRM
# makes the hung test FAIL with its name while the run goes on, and its fixtures and
# `finally:` blocks still run, so its child processes are killed. (The "thread" method
# would end the whole run at the first hang, skipping every later test and all
# teardown.) A signal only acts when the main thread runs Python again, so a test
# stuck inside C code (a TensorFlow op, a gRPC wait) ignores it: the backstop below ends
# the run then, naming the test, as the "thread" method would.
SLOW_TIMEOUT = 1200  # s, an end-to-end test (marked slow) with no timeout of its own:
# the longest, the smoke study, takes 3-5 min on 2 idle cores, 4x under this
BACKSTOP_GRACE = float(os.environ.get("CHEXLIB_TIMEOUT_GRACE", "60"))  # s after the timeout


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


def _timeout_of(item) -> float:
    """The test's pytest-timeout deadline in seconds (0: none)."""
    marker = item.get_closest_marker("timeout")
    if marker is not None and (marker.args or "timeout" in marker.kwargs):
        value = marker.args[0] if marker.args else marker.kwargs["timeout"]
    else:
        value = item.config.getoption("timeout", None) or item.config.getini("timeout")
    return float(value or 0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item):
    timeout = _timeout_of(item)
    backstop = None
    if timeout > 0:
        backstop = threading.Timer(timeout + BACKSTOP_GRACE, _end_the_run, args=(item, timeout))
        backstop.daemon = True
        backstop.start()
    try:
        return (yield)
    finally:
        if backstop is not None:
            backstop.cancel()


def _end_the_run(item, timeout: float) -> None:
    """The test ignored pytest-timeout's signal: name it, dump every thread, kill its
    children and end the test run."""
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with contextlib.suppress(Exception):
            capture.suspend_global_capture(in_=True)
    sys.stderr.write(
        f"\n+++ Timeout: {item.nodeid} still runs {BACKSTOP_GRACE:.0f} s after its "
        f"{timeout:.0f} s timeout, stuck where pytest-timeout's signal cannot stop it "
        "(C code); its threads, then the test run ends +++\n"
    )
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os._exit(1)


# --- no silent skip in CI ----------------------------------------------------------------
def in_ci() -> bool:
    """The tests run in CI (``.ci/run`` exports CI=true, as CI services do)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def require(condition: object, reason: str) -> None:
    """Skip the test with ``reason`` unless ``condition``; in CI, FAIL instead.

    For what the project installs or the CI machine has (a declared dependency, an
    unprivileged user, a non-loopback address): there a skip would hide a broken
    setup. Tests that may legitimately skip anywhere use ``pytest.skip``.
    """
    __tracebackhide__ = True  # the skip is reported at the caller's line
    if condition:
        return
    if in_ci():
        pytest.fail(f"required in CI (CI=true), so not skipped: {reason}", pytrace=False)
    pytest.skip(reason)


# --- bounded reads of a child process's output -------------------------------------------
class OutputLines:
    """The lines a child process writes to one of its pipes, read by a thread, each
    stamped (``time.monotonic()``, ``time.time()``) as it arrives, so that every wait
    for the next line has a deadline: a missed one kills the process (and its
    children) and fails the test, naming what it waited for. The thread closes the
    pipe at its end."""

    def __init__(self, proc: subprocess.Popen, stream=None, name: str = "the child"):
        self.proc, self.name = proc, name
        self.lines: list[tuple[float, float, str]] = []  # (monotonic, wall clock, line)
        self._queue: queue.Queue = queue.Queue()
        stream = proc.stdout if stream is None else stream
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        """Closes ``stream`` at its end (a close by another thread could wait on this read)."""
        with contextlib.suppress(ValueError, OSError), stream:
            for line in stream:
                self._queue.put((time.monotonic(), time.time(), line.rstrip("\n")))
        self._queue.put(None)  # end of output

    def next(self, timeout: float, waiting_for: str) -> str | None:
        """The next line, or None at the end of output; fails after ``timeout`` s."""
        return self._next(time.monotonic() + timeout, timeout, waiting_for)

    def until(self, match, timeout: float, waiting_for: str) -> str:
        """Lines up to the first that ``match(line)`` accepts, which is returned."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next(deadline, timeout, waiting_for)
            if line is None:
                self.fail(f"output ended (exit {self.proc.poll()}) before {waiting_for}")
            if match(line):
                return line

    def to_end(self, timeout: float, waiting_for: str) -> list[str]:
        """Every line up to the end of output, within ``timeout`` s in all."""
        deadline = time.monotonic() + timeout
        while self._next(deadline, timeout, waiting_for) is not None:
            pass
        return [line for _, _, line in self.lines]

    def _next(self, deadline: float, timeout: float, waiting_for: str) -> str | None:
        try:
            item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            item = False  # failed below, not in this handler: no chained queue.Empty
        if item is False:
            self.fail(f"waited {timeout:.0f} s for {waiting_for}, in vain")
        if item is None:
            self._queue.put(None)  # stays at the end
            return None
        self.lines.append(item)
        return item[2]

    def fail(self, what: str) -> None:
        kill_tree(self.proc)
        tail = "\n".join(line for _, _, line in self.lines[-20:])
        pytest.fail(
            f"{self.name} (pid {self.proc.pid}): {what}; killed it. Its last lines:\n{tail}",
            pytrace=False,
        )


def call_within(timeout: float, waiting_for: str, fn, on_timeout=None):
    """``fn()`` in a daemon thread: its result (or its exception), or, after ``timeout``
    s, ``on_timeout()`` (e.g. stop the server it waits on) and a failure naming what it
    waited for. For blocking calls into C code (a tf.data iterator reading from a
    service) that no signal interrupts; the stuck thread is left behind."""
    done: queue.Queue = queue.Queue()

    def call():
        try:
            done.put((True, fn()))
        except BaseException as err:  # handed to the test's thread
            done.put((False, err))

    threading.Thread(target=call, daemon=True).start()
    try:
        ok, value = done.get(timeout=timeout)
    except queue.Empty:
        ok, value = None, None  # failed below, not in this handler: no chained queue.Empty
    if ok is None:
        if on_timeout is not None:
            on_timeout()
        pytest.fail(
            f"nothing within {timeout:.0f} s while waiting for {waiting_for}", pytrace=False
        )
    if not ok:
        raise value
    return value


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and every process it started, and reap it."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A generated ChestX-ray14-format dataset: 120 images of 128x128."""
    from chexlib.synth.generate import generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, n_images=120, size=128, seed=7, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_metadata(synth_dir):
    from chexlib.data.metadata import load_metadata

    return load_metadata(synth_dir)

"""The ranks of a launched Horovod job: stuck and failed ones found, their stacks, stopped.

Every launch mode of :mod:`chexlib.launch.launcher` uses these so that nothing hangs and
every failure names a rank:

* each rank installs :func:`install_stack_dump`: on :data:`STACK_SIGNAL` it
  writes every thread's Python stack to a file, which :func:`collect_stacks`
  reads back as the innermost frames of its main thread;
* a :class:`Watchdog` fires once a job's timeout has passed; the launcher then
  finds the ranks still running (:func:`rank_processes`, :func:`rank_pid`),
  asks them for their stacks, kills them (:func:`kill_tree`) and raises
  :class:`LaunchError` with :func:`timeout_message`: the rank sleeping on a
  dead file system, not the one waiting for it in an allreduce.

:func:`warn_exposed` says when a launcher's unauthenticated server has to be
reachable from other hosts.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

STACK_SIGNAL = signal.SIGUSR1  # a rank that receives it writes its Python stacks


class LaunchError(RuntimeError):
    """A launched job failed or timed out; the message names the rank(s) and why."""


# --- in each rank ------------------------------------------------------------------------


def write_note(path: Path, text: str) -> None:
    """Write ``text`` to ``path``; nothing when the folder is not there."""
    with contextlib.suppress(OSError):  # a rank on another host has no such folder
        path.write_text(text)


def install_stack_dump(status_dir: str | Path, rank: int) -> None:
    """Runs in a rank: on :data:`STACK_SIGNAL` write every thread's stack to a file.

    ``<status_dir>/rank<R>.pid`` says the handler is in place (a process
    without it would die of the signal), ``rank<R>.stack`` receives the stacks.
    """
    folder = Path(status_dir)
    try:
        stack = open(folder / f"rank{rank}.stack", "w")  # noqa: SIM115 - kept open for the handler
    except OSError:
        return
    faulthandler.register(STACK_SIGNAL, file=stack, all_threads=True)
    write_note(folder / f"rank{rank}.pid", str(os.getpid()))


# --- in the launcher ---------------------------------------------------------------------


def _where(stack_text: str, lines: int = 6) -> str:
    """The innermost frames of the main thread in a :mod:`faulthandler` dump, innermost first.

    A dump lists the newest thread first, so the main thread is the last block.
    """
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", stack_text.strip())
    frames = [line.strip() for line in blocks[-1].splitlines()[1:] if "File" in line]
    return "\n      ".join(frames[:lines]) or "(no Python stack recorded)"


def collect_stacks(status_dir: str | Path, pids: dict[int, int], wait: float = 1.0) -> dict:
    """Signal each rank's process for its stacks; return ``{rank: innermost frames}``.

    Only processes that recorded a ``rank<R>.pid`` with the same pid are
    signalled (they have the handler); the others get no stack.
    """
    folder, asked = Path(status_dir), []
    for rank, pid in pids.items():
        try:
            recorded = int((folder / f"rank{rank}.pid").read_text())
        except (OSError, ValueError):
            continue
        if recorded == pid:
            with contextlib.suppress(OSError):
                os.kill(pid, STACK_SIGNAL)
                asked.append(rank)
    if asked:
        time.sleep(wait)  # the handler writes within milliseconds; the file system may lag
    stacks = {}
    for rank in asked:
        with contextlib.suppress(OSError):
            stacks[rank] = _where((folder / f"rank{rank}.stack").read_text())
    return stacks


def rank_processes(root: int, command_part: str = "horovod.runner.run_task") -> dict[int, list]:
    """``{rank: [processes]}`` of the Horovod ranks below process ``root`` on this host.

    A rank is found by ``command_part`` in its command line, and its
    rank by the ``HOROVOD_RANK`` of its environment (or command line: the
    shell and ssh processes that start it carry ``HOROVOD_RANK=R``).
    """
    import psutil

    found: dict[int, list] = {}
    for proc in psutil.Process(root).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            if command_part not in cmdline:
                continue
            rank = proc.environ().get("HOROVOD_RANK")
        except (psutil.Error, OSError):
            continue
        match = re.search(r"HOROVOD_RANK=(\d+)", cmdline)
        rank = rank if rank is not None else (match.group(1) if match else None)
        if rank is not None:
            found.setdefault(int(rank), []).append(proc)
    return found


def rank_pid(procs: list) -> int:
    """The rank's Python process among ``procs``, not the shell that started it."""
    import psutil

    def cmdline(proc) -> str:
        try:
            return " ".join(proc.cmdline())
        except psutil.Error:
            return ""

    inner = [p for p in procs if "HOROVOD_RANK=" not in cmdline(p)]
    return (inner or procs)[-1].pid


def kill_tree(procs: list) -> None:
    """Kill each process of ``procs`` and everything it started."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for p in [*proc.children(recursive=True), proc]:
                with contextlib.suppress(psutil.Error):
                    p.kill()


class Watchdog:
    """Calls ``expire()`` once ``timeout`` seconds have passed (then every few seconds, to
    catch ranks that started late) until its ``with`` block ends; ``report`` holds the first
    result."""

    def __init__(self, timeout: float | None, expire):
        self.timeout, self.expire = timeout, expire
        self.fired, self.report = False, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="chexlib-watchdog")

    def _watch(self) -> None:
        if self._stop.wait(self.timeout):
            return
        self.fired, self.report = True, self.expire()
        while not self._stop.wait(2.0):
            self.expire()

    def __enter__(self) -> Watchdog:
        if self.timeout is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def timeout_message(what: str, timeout: float, np: int, stuck: dict[int, str] | None) -> str:
    """A timed-out job's message: the ranks still running (``stuck``: rank -> where), the ended."""
    stuck = stuck or {}
    names = ", ".join(str(r) for r in stuck) or "none found on this host"
    done = [r for r in range(np) if r not in stuck]
    lines = [
        f"{what}: timed out after {timeout:g} s; rank(s) still running: {names} "
        f"(stopped). Ranks that had ended: {', '.join(map(str, done)) or 'none'}.",
        *(f"  rank {rank} ({where})" for rank, where in stuck.items()),
    ]
    return "\n".join(lines)


def warn_exposed(what: str, where: str) -> None:
    """One line on stderr: a service that cannot be kept to loopback, and the trust model."""
    print(
        f"warning: {what}: listening on {where} without authentication (ranks on other hosts "
        "connect to it); run only on a private cluster network, or firewall it",
        file=sys.stderr,
        flush=True,
    )

"""Starting the ranks with Horovod's own launchers: ``horovod.run`` and ``horovodrun``.

``horovod.run`` (:func:`run`, or :func:`run_function` for any function)
    starts N processes that run ``train(config)`` and hands the rank-0
    result back to the caller: a notebook (papermill or JupyterLab) trains on
    N ranks and gets the metrics as a dict. With every rank on this host its
    rendezvous and result servers listen on 127.0.0.1 only.
``horovodrun`` (:func:`run_horovodrun`)
    runs ``horovodrun -np N -H host1:4,host2:4 --gloo chexlib train ...`` as a
    subprocess, the command built by :func:`horovodrun_command` from a
    ``TrainConfig``; :func:`mpirun_command` builds the Open MPI one for
    clusters whose Horovod has MPI. On hosts with several network interfaces,
    name the one the ranks talk over (``network_interface``, or the environment
    variable :data:`NETWORK_INTERFACE_ENV`): horovodrun gets
    ``--network-interface NAME --disable-cache``.

Both are bounded by a timeout and name the rank that failed or got stuck
(:mod:`chexlib.launch.processes`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from chexlib.core.run_record import RunRecord
from chexlib.launch.processes import (
    LaunchError,
    Watchdog,
    collect_stacks,
    install_stack_dump,
    kill_tree,
    rank_pid,
    rank_processes,
    timeout_message,
    warn_exposed,
    write_note,
)
from chexlib.launch.rank_log import RankLog, pump
from chexlib.train.config import config_to_argv
from chexlib.train.recipe import train

# The network interface the ranks talk over (e.g. eth0, ib0), when not given as an argument.
NETWORK_INTERFACE_ENV = "CHEXLIB_NETWORK_INTERFACE"

# --- horovod.run -------------------------------------------------------------------------


def _all_local(hosts: str | None) -> bool:
    """Every host of ``"host:slots,..."`` is this machine (None: localhost)."""
    if not hosts:
        return True
    from horovod.runner.util.network import filter_local_addresses

    names = [h.rpartition(":")[0] or h for h in hosts.split(",")]
    return not filter_local_addresses(names)


def _remote_settings(hosts: str | None) -> dict:
    """``horovod.run``'s settings for other hosts: no cache of host checks (an hour of
    stale answers while nodes come and go) and :data:`NETWORK_INTERFACE_ENV`'s interface.
    Nothing for this host alone (its servers listen on 127.0.0.1)."""
    if _all_local(hosts):
        return {}
    return {
        "disable_cache": True,
        "network_interface": os.environ.get(NETWORK_INTERFACE_ENV) or None,
    }


@contextlib.contextmanager
def _horovod_servers_on_loopback(hosts: str | None):
    """While ``horovod.run`` runs: its rendezvous and function/result servers bind 127.0.0.1.

    Horovod 0.28 binds them to every interface (``find_port`` uses ``('', port)``)
    although, with local hosts only, the ranks reach them at 127.0.0.1. Other
    hosts need them reachable: then the binding stays and a warning says so.
    """
    from horovod.runner.http import http_server

    if not _all_local(hosts):
        warn_exposed("horovod.run's rendezvous and result servers", "every network interface")
        yield
        return

    def loopback_port(server_factory):
        server = server_factory(("127.0.0.1", 0))  # 0: the system picks a free port
        return server, server.server_address[1]

    original, http_server.find_port = http_server.find_port, loopback_port
    try:
        yield
    finally:
        http_server.find_port = original


def _rank_main(fn, args: tuple, kwargs: dict, status_dir: str):
    """What each ``horovod.run`` process runs: ``fn``, ready to dump its stacks, errors noted."""
    rank = int(os.environ.get("HOROVOD_RANK", "0"))
    install_stack_dump(status_dir, rank)
    for stream in (sys.stdout, sys.stderr):  # a pipe to the launcher: lines as they come
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True)
    try:
        return fn(*args, **kwargs)
    except BaseException as err:
        write_note(Path(status_dir) / f"rank{rank}.error", f"{type(err).__name__}: {err}")
        raise


@contextlib.contextmanager
def _output_to(log: RankLog | None):
    """While it runs: ``sys.stdout`` and ``sys.stderr`` (Horovod's rank lines) go to ``log``."""
    if log is None:
        yield
        return
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def run_function(
    fn,
    args: tuple = (),
    kwargs: dict | None = None,
    np: int = 1,
    hosts: str | None = None,
    timeout: float | None = None,
    start_timeout: int = 120,
    verbose: int = 0,
    log: RankLog | None = None,
) -> list:
    """``horovod.run(fn, ...)`` on ``np`` Gloo ranks, bounded and with failures named.
    Must run in the main thread (Horovod installs signal handlers). Other hosts are
    reached over :data:`NETWORK_INTERFACE_ENV`'s interface when it is set.

    Args:
        fn: a picklable function (Horovod sends it to the ranks with cloudpickle).
        timeout: seconds for the whole job; then the ranks still running are
            stopped and :class:`LaunchError` names them with where they were.
        log: an open :class:`RankLog` the ranks' lines go to (Horovod writes
            them to ``sys.stdout``/``sys.stderr``, redirected to it meanwhile);
            None: they go to ``sys.stdout``/``sys.stderr`` as Horovod prefixes them.

    Returns:
        ``fn``'s return value on every rank, by rank.
    Raises:
        LaunchError: a rank exited non-zero or raised, or the timeout passed.
    """
    import horovod

    status = Path(tempfile.mkdtemp(prefix="chexlib-ranks-"))
    error = None
    try:
        stop = functools.partial(_stop_stuck_ranks, status)
        with (
            Watchdog(timeout, stop) as watchdog,
            _horovod_servers_on_loopback(hosts),
            _output_to(log),
        ):
            try:
                results = horovod.run(
                    _rank_main,
                    args=(fn, tuple(args), dict(kwargs or {}), str(status)),
                    np=np,
                    hosts=hosts or f"localhost:{np}",
                    use_gloo=True,
                    **_remote_settings(hosts),
                    start_timeout=start_timeout,
                    verbose=verbose,
                )
            except Exception as err:  # Horovod raises RuntimeError or its own exceptions
                error = err
        if error is not None and watchdog.fired:
            message = timeout_message("horovod.run", timeout, np, watchdog.report)
            raise LaunchError(message) from error
        if error is not None:
            raise LaunchError(_failure_message(error, status, hosts)) from error
    finally:
        shutil.rmtree(status, ignore_errors=True)
    return results


def _stop_stuck_ranks(status_dir: Path) -> dict[int, str]:
    """Stacks of the ``horovod.run`` ranks still running, then kill them: ``{rank: where}``."""
    procs = rank_processes(os.getpid())
    pids = {rank: rank_pid(ps) for rank, ps in procs.items()}
    stacks = collect_stacks(status_dir, pids)
    for ps in procs.values():
        kill_tree(ps)
    return {rank: f"pid {pids[rank]}, {stacks.get(rank, 'no stack')}" for rank in sorted(procs)}


def _failure_message(error: Exception, status_dir: Path, hosts: str | None = None) -> str:
    """Which rank failed first and how, from Horovod's message and the ranks' error notes;
    the hosts that no longer answer on ssh (a node lost, a link cut) when there are others."""
    text = str(error)
    first = re.search(r"Process name: (\S+)\s+Exit code: (-?\d+)", text)
    parts = [f"rank {first.group(1)} exited first, with status {first.group(2)}"] if first else []
    for note in sorted(status_dir.glob("rank*.error")):
        with contextlib.suppress(OSError):
            parts.append(f"rank {note.stem.removeprefix('rank')} raised {note.read_text()[:500]}")
    summary = "; ".join(parts) or f"{type(error).__name__}"
    return (
        f"horovod.run failed{lost_nodes_note(hosts)}: {summary}. The other ranks were stopped.\n"
        f"Horovod: {text.strip()[-1500:]}"
    )


def run(
    config,
    np: int = 1,
    hosts: str | None = None,
    start_timeout: int = 120,
    verbose: int = 0,
    timeout: float | None = None,
    log: RankLog | None = None,
) -> RunRecord:
    """Run ``chexlib.train.recipe.train(config)`` on ``np`` Horovod ranks (Gloo); return rank 0's record.

    Args:
        config: a ``chexlib.train.config.TrainConfig``.
        np: number of ranks.
        hosts: ``"host1:slots,..."``; None: ``localhost:np``. Other hosts are
            reached by ssh, as horovodrun does.
        start_timeout: seconds the ranks may take to start.
        timeout: seconds for the whole job (None: no limit).
        log: an open :class:`RankLog` for the ranks' output (see :func:`run_function`).

    Raises:
        LaunchError: a rank exited non-zero or raised (the others are
            stopped), or ``timeout`` passed; the message names the rank(s).
    """

    results = run_function(
        train,
        args=(config,),
        np=np,
        hosts=hosts,
        timeout=timeout,
        start_timeout=start_timeout,
        verbose=verbose,
        log=log,
    )
    return results[0]


# --- horovodrun / mpirun -----------------------------------------------------------------


def _tool(name: str) -> str:
    """``name`` from this environment's bin folder when it is there, else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def horovodrun_command(
    config, np: int, hosts: str | None = None, network_interface: str | None = None
) -> list[str]:
    """``horovodrun -np N -H hosts --gloo chexlib train <flags>`` for ``config``.

    Args:
        network_interface: the interface every host reaches the others on (the same
            name on every host); None: :data:`NETWORK_INTERFACE_ENV`, else Horovod
            finds the interfaces all hosts share. Named, horovodrun also gets
            ``--disable-cache``: its cached host checks (an hour) would hide nodes
            that came and went.
    """
    nic = network_interface or os.environ.get(NETWORK_INTERFACE_ENV) or None
    return [
        _tool("horovodrun"),
        "-np",
        str(np),
        "-H",
        hosts or f"localhost:{np}",
        "--gloo",
        *(["--network-interface", nic, "--disable-cache"] if nic else []),
        _tool("chexlib"),
        "train",
        *config_to_argv(config),
    ]


def mpirun_command(config, np: int, hosts: str | None = None) -> list[str]:
    """The Open MPI command Horovod documents, for a Horovod built with MPI (not this one)."""

    return [
        "mpirun",
        "-np",
        str(np),
        "-H",
        hosts or f"localhost:{np}",
        "-bind-to",
        "none",
        "-map-by",
        "slot",
        "-x",
        "NCCL_DEBUG=INFO",
        "-x",
        "LD_LIBRARY_PATH",
        "-x",
        "PATH",
        "-mca",
        "pml",
        "ob1",
        "-mca",
        "btl",
        "^openib",
        _tool("chexlib"),
        "train",
        *config_to_argv(config),
    ]


def run_horovodrun(
    config,
    np: int,
    hosts: str | None = None,
    timeout: float | None = None,
    env: dict | None = None,
    log: RankLog | None = None,
    network_interface: str | None = None,
) -> RunRecord:
    """Run :func:`horovodrun_command` as a subprocess; return the record rank 0 wrote.

    Args:
        network_interface: see :func:`horovodrun_command`.
        log: an open :class:`RankLog`: each line horovodrun prints (every
            rank's, ``[R]<stdout>:``-prefixed) is passed on to it as it comes.
            Either way the last lines are kept for the error message.

    Raises:
        LaunchError: non-zero exit (:func:`failure_summary`, then the end of the
            output without Python tracebacks); or ``timeout`` passed: the ranks
            still running are named and killed.
    """
    command = horovodrun_command(config, np, hosts, network_interface)
    unbuffered = {"PYTHONUNBUFFERED": "1"} if log else {}  # ranks print each line at once
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        env={**os.environ, **unbuffered, **(env or {})},
    )
    out, err = deque(maxlen=40), deque(maxlen=40)  # the error message's tail: stdout, then stderr
    pumps = [
        threading.Thread(target=pump, args=(pipe, keep, log), daemon=True)
        for pipe, keep in ((proc.stdout, out), (proc.stderr, err))
    ]
    for reader in pumps:
        reader.start()
    stuck = None
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = rank_processes(proc.pid, "train")
        stuck = {r: f"pid {rank_pid(ps)}" for r, ps in sorted(ranks.items())}
        for ps in ranks.values():
            kill_tree(ps)
        proc.kill()
        proc.wait()
    for reader in pumps:
        reader.join(timeout=30)  # the pipes close when the last process holding them ends
    if stuck is not None:
        tail = "\n".join([*out, *err][-20:])
        message = timeout_message("horovodrun", timeout, np, stuck)
        raise LaunchError(f"{message}\n{' '.join(command)}\n{tail}")
    if proc.returncode != 0:
        raise LaunchError(_failure(config.out, proc.returncode, hosts, command, [*out, *err]))
    return RunRecord.read(Path(config.out) / "metrics.json")


def _failure(out: str, status: int, hosts: str | None, command: list[str], lines: list[str]):
    """The message of a failed horovodrun: the summary, the command, the output's end."""
    lines = [ln for ln in lines if not _traceback_line(ln)]
    summary = failure_summary(out, status, hosts, lines)
    return f"{summary}\n{' '.join(command)}\n" + "\n".join(lines[-40:])


def _traceback_line(line: str) -> bool:
    """A line of a Python traceback (its frames, their source lines indented, or an
    empty rank-prefixed line): no news in a failure."""
    text = re.sub(r"^\[\d+\]<std(out|err)>:", "", line)
    return (
        not text.strip()
        or text.startswith("    ")
        or text.lstrip().startswith(('File "', "Traceback (most recent", "^^^"))
    )


# A peer lost in a collective, as Gloo and Horovod put it (the first such line is quoted).
_LOST_PEER = re.compile(
    r"Timed out waiting \d+ms for \w+ operation|Connection (closed|reset|refused)"
    r"|Read error|Horovod has been shut down|HorovodInternalError"
)


def failure_summary(out: str, status: int, hosts: str | None, lines: list[str]) -> str:
    """One line: the run's folder, the exit status, the hosts that no longer answer
    on their ssh port (a node down or its link cut), and the first Gloo/Horovod
    error line of the output."""
    text = f"training run {out} failed: horovodrun exit status {status}"
    if hosts:
        text += f" on hosts {hosts}{lost_nodes_note(hosts)}"
    cause = next((ln for ln in lines if _LOST_PEER.search(ln)), None)
    if cause is not None:
        rank = re.match(r"\[(\d+)\]", cause)  # horovodrun's prefix of a rank's line
        who = f"rank {rank.group(1)}: " if rank else ""
        text += f"; {who}{cause[_LOST_PEER.search(cause).start() :].strip()[:200]}"
    return text


def lost_nodes_note(hosts: str | None) -> str:
    """``"; lost node(s) node2: ..."`` when hosts of ``hosts`` other than this one do not
    answer on their ssh port now; ``""`` when all answer (or there are none)."""
    lost = unreachable_hosts(hosts) if hosts else []
    if not lost:
        return ""
    return (
        f"; lost node(s) {', '.join(lost)}: not answering on ssh port 22 now "
        "(node down or its network link cut?)"
    )


def unreachable_hosts(hosts: str, port: int = 22, timeout: float = 3.0) -> list[str]:
    """The hosts of ``"host:slots,..."`` (other machines) whose ``port`` does not
    answer within ``timeout`` s, checked side by side."""
    names = [h.rpartition(":")[0] or h for h in hosts.split(",")]
    remote = [n for n in names if not _all_local(n)]

    def answers(name: str) -> bool:
        try:
            with socket.create_connection((name, port), timeout=timeout):
                return True
        except OSError:
            return False

    with ThreadPoolExecutor(max(1, len(remote))) as pool:
        return [n for n, ok in zip(remote, pool.map(answers, remote), strict=True) if not ok]

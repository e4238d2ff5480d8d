"""Launching Horovod training: horovodrun, ``horovod.run`` and ipyparallel engines.

Three ways to start N ranks of :func:`chexlib.train.train`, all with Gloo (no
MPI is needed; ``mpirun`` commands are built for clusters that have it):

``horovodrun`` (a shell, or :func:`run_horovodrun` from Python)
    ``horovodrun -np N -H host1:4,host2:4 --gloo chexlib train ...``. The
    command is built by :func:`horovodrun_command` from a ``TrainConfig``.
``horovod.run`` (:func:`run`, or :func:`run_function` for any function)
    starts N processes that run ``train(config)`` and hands the rank-0
    result back to the caller: a notebook (papermill or JupyterLab) trains on
    N ranks and gets the metrics as a dict.
ipyparallel (:class:`HorovodCluster`)
    starts N ipyparallel engines and wires them as ONE Horovod job, the way
    ``horovodrun`` wires its processes: the launcher runs Horovod's HTTP
    rendezvous server and gives every engine the ``HOROVOD_*`` variables
    (rank, size, local and cross rank, rendezvous address and port,
    ``HOROVOD_CONTROLLER=gloo``, ``HOROVOD_CPU_OPERATIONS=gloo``). Then
    ``hvd.init()`` on the engines forms the job, and a JupyterLab user can run
    training cells on every rank with ``%%px`` and inspect each one.

Nothing hangs and every failure names a rank:

- A rank that dies or raises stops the job: horovodrun and ``horovod.run``
  terminate the other ranks; :class:`HorovodCluster` interrupts the other
  engines (and kills those that do not stop). :class:`LaunchError` names the
  rank and its error.
- ``LaunchConfig.timeout`` bounds every mode. When it passes, the ranks still
  running are asked for their Python stacks (``SIGUSR1``, through
  :mod:`faulthandler`), killed, and :class:`LaunchError` names each of them
  with the line it was stuck on: the rank sleeping on a dead file system, not
  the one waiting for it in an allreduce.

Watching a long job: with ``LaunchConfig.log_output`` (on by default when
``CHEXLIB_LOG_OUTPUT=1``, which ``chexlib study --log-output`` sets for its
kernels) every rank's output is passed on line by line as it comes, prefixed
with its rank (``[1] Epoch 3/10 ...``), to this process's stdout (a notebook's
cell output, in a kernel) and appended to ``ranks.log`` in the training run's
folder. What is kept for error messages stays as it was.

Network: Horovod's rendezvous and result servers accept unauthenticated
requests, so when every rank runs on this host they listen on 127.0.0.1 only
(for ``horovod.run`` and :class:`HorovodCluster`). With other hosts they must
be reachable from them; chexlib then warns that the port is open to the
network (run on a private cluster network, or firewall the port).
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from chexlib.ranklog import RankLog, echo_engines, pump

MODES = ("horovod.run", "horovodrun", "ipyparallel")
STACK_SIGNAL = signal.SIGUSR1  # a rank that receives it writes its Python stacks
LOG_OUTPUT_ENV = "CHEXLIB_LOG_OUTPUT"  # "1": LaunchConfig streams the ranks' output by default
RANK_LOG = "ranks.log"  # the ranks' output, in the training run's folder, when streamed


def log_output_default() -> bool:
    """``LaunchConfig.log_output`` when not given: ``CHEXLIB_LOG_OUTPUT=1`` in the environment."""
    return os.environ.get(LOG_OUTPUT_ENV, "") == "1"


class LaunchError(RuntimeError):
    """A launched job failed or timed out; the message names the rank(s) and why."""


@dataclass(frozen=True)
class LaunchConfig:
    """How to start the ranks.

    Attributes:
        mode: ``horovod.run``, ``horovodrun`` or ``ipyparallel``.
        ranks: number of Horovod ranks (processes).
        hosts: ``"host1:slots,host2:slots"``; None: all ranks on this machine.
        timeout: seconds the whole job may take in any mode, start-up
            included; then the ranks still running are stopped and named
            (None: no limit).
        log_output: pass every rank's output on as it comes, line by line and
            prefixed ``[R] ``, to stdout, and append it to ``ranks.log`` in the
            training run's folder (``TrainConfig.out``). Default: on when
            ``CHEXLIB_LOG_OUTPUT=1`` (``chexlib study --log-output`` sets it).
    """

    mode: str = "horovod.run"
    ranks: int = 1
    hosts: str | None = None
    timeout: float | None = None
    log_output: bool = field(default_factory=log_output_default)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"LaunchConfig: mode must be one of {MODES}, not {self.mode!r}")
        if self.ranks < 1:
            raise ValueError(f"LaunchConfig: ranks must be >= 1, not {self.ranks}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(
                f"LaunchConfig: timeout must be > 0 seconds or None, not {self.timeout}"
            )
        if self.hosts is not None:
            slots = sum(int(h.rpartition(":")[2] or 1) for h in self.hosts.split(","))
            if slots < self.ranks:
                raise ValueError(
                    f"LaunchConfig: hosts {self.hosts!r} offer {slots} slots for {self.ranks} ranks"
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def launch(config, launch_config: LaunchConfig) -> dict:
    """Train ``config`` (a ``TrainConfig``) with the ranks and mode of ``launch_config``.

    Returns:
        Rank 0's metrics (the same dict that is written to ``metrics.json``).

    Raises:
        LaunchError: a rank failed, or the job outlived ``launch_config.timeout``.
    """
    lc = launch_config
    header = f"{lc.mode}, {lc.ranks} rank(s)"
    streamed = RankLog(Path(config.out) / RANK_LOG, header=header) if lc.log_output else None
    with streamed or contextlib.nullcontext() as log:
        if lc.mode == "horovod.run":
            return run(config, np=lc.ranks, hosts=lc.hosts, timeout=lc.timeout, log=log)
        if lc.mode == "horovodrun":
            return run_horovodrun(config, np=lc.ranks, hosts=lc.hosts, timeout=lc.timeout, log=log)
        deadline = None if lc.timeout is None else time.monotonic() + lc.timeout
        with HorovodCluster(n=lc.ranks) as cluster:  # starting the engines counts too
            left = None if deadline is None else max(1.0, deadline - time.monotonic())
            return cluster.train(config, timeout=left, log=log)


# --- noticing stuck and failed ranks -----------------------------------------------


def _write_text(path: Path, text: str) -> None:
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
    _write_text(folder / f"rank{rank}.pid", str(os.getpid()))


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
        _write_text(Path(status_dir) / f"rank{rank}.error", f"{type(err).__name__}: {err}")
        raise


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


def _rank_processes(root: int, command_part: str = "horovod.runner.run_task") -> dict[int, list]:
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


def _kill_tree(procs: list) -> None:
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for p in [*proc.children(recursive=True), proc]:
                with contextlib.suppress(psutil.Error):
                    p.kill()


class _Watchdog:
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

    def __enter__(self) -> _Watchdog:
        if self.timeout is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# --- horovod.run -----------------------------------------------------------------


def _all_local(hosts: str | None) -> bool:
    """Every host of ``"host:slots,..."`` is this machine (None: localhost)."""
    if not hosts:
        return True
    from horovod.runner.util.network import filter_local_addresses

    names = [h.rpartition(":")[0] or h for h in hosts.split(",")]
    return not filter_local_addresses(names)


def _warn_exposed(what: str, where: str) -> None:
    """One line on stderr: a service that cannot be kept to loopback, and the trust model."""
    print(
        f"warning: {what}: listening on {where} without authentication (ranks on other hosts "
        "connect to it); run only on a private cluster network, or firewall it",
        file=sys.stderr,
        flush=True,
    )


@contextlib.contextmanager
def _horovod_servers_on_loopback(hosts: str | None):
    """While ``horovod.run`` runs: its rendezvous and function/result servers bind 127.0.0.1.

    Horovod 0.28 binds them to every interface (``find_port`` uses ``('', port)``)
    although, with local hosts only, the ranks reach them at 127.0.0.1. Other
    hosts need them reachable: then the binding stays and a warning says so.
    """
    from horovod.runner.http import http_server

    if not _all_local(hosts):
        _warn_exposed("horovod.run's rendezvous and result servers", "every network interface")
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

    Must run in the main thread (Horovod installs signal handlers).

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
            _Watchdog(timeout, stop) as watchdog,
            _horovod_servers_on_loopback(hosts),
            contextlib.redirect_stdout(log) if log else contextlib.nullcontext(),
            contextlib.redirect_stderr(log) if log else contextlib.nullcontext(),
        ):
            try:
                results = horovod.run(
                    _rank_main,
                    args=(fn, tuple(args), dict(kwargs or {}), str(status)),
                    np=np,
                    hosts=hosts or f"localhost:{np}",
                    use_gloo=True,
                    start_timeout=start_timeout,
                    verbose=verbose,
                )
            except Exception as err:  # Horovod raises RuntimeError or its own exceptions
                error = err
        if error is not None and watchdog.fired:
            message = _timeout_message("horovod.run", timeout, np, watchdog.report)
            raise LaunchError(message) from error
        if error is not None:
            raise LaunchError(_failure_message(error, status)) from error
    finally:
        shutil.rmtree(status, ignore_errors=True)
    return results


def _stop_stuck_ranks(status_dir: Path) -> dict[int, str]:
    """Stacks of the ``horovod.run`` ranks still running, then kill them: ``{rank: where}``."""
    procs = _rank_processes(os.getpid())
    pids = {rank: _rank_pid(ps) for rank, ps in procs.items()}
    stacks = collect_stacks(status_dir, pids)
    for ps in procs.values():
        _kill_tree(ps)
    return {rank: f"pid {pids[rank]}, {stacks.get(rank, 'no stack')}" for rank in sorted(procs)}


def _rank_pid(procs: list) -> int:
    """The rank's Python process among ``procs``, not the shell that started it."""
    import psutil

    def cmdline(proc) -> str:
        try:
            return " ".join(proc.cmdline())
        except psutil.Error:
            return ""

    inner = [p for p in procs if "HOROVOD_RANK=" not in cmdline(p)]
    return (inner or procs)[-1].pid


def _timeout_message(what: str, timeout: float, np: int, stuck: dict[int, str] | None) -> str:
    stuck = stuck or {}
    names = ", ".join(str(r) for r in stuck) or "none found on this host"
    done = [r for r in range(np) if r not in stuck]
    lines = [
        f"{what}: timed out after {timeout:g} s; rank(s) still running: {names} "
        f"(stopped). Ranks that had ended: {', '.join(map(str, done)) or 'none'}.",
        *(f"  rank {rank} ({where})" for rank, where in stuck.items()),
    ]
    return "\n".join(lines)


def _failure_message(error: Exception, status_dir: Path) -> str:
    """Which rank failed first and how, from Horovod's message and the ranks' error notes."""
    text = str(error)
    first = re.search(r"Process name: (\S+)\s+Exit code: (-?\d+)", text)
    parts = [f"rank {first.group(1)} exited first, with status {first.group(2)}"] if first else []
    for note in sorted(status_dir.glob("rank*.error")):
        with contextlib.suppress(OSError):
            parts.append(f"rank {note.stem.removeprefix('rank')} raised {note.read_text()[:500]}")
    summary = "; ".join(parts) or f"{type(error).__name__}"
    return (
        f"horovod.run failed: {summary}. The other ranks were stopped.\n"
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
) -> dict:
    """Run ``chexlib.train.train(config)`` on ``np`` Horovod ranks (Gloo); return rank 0's result.

    Args:
        config: a ``chexlib.train.TrainConfig``.
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
    from chexlib.train import train

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


# --- horovodrun / mpirun ------------------------------------------------------------


def _tool(name: str) -> str:
    """``name`` from this environment's bin folder when it is there, else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def horovodrun_command(config, np: int, hosts: str | None = None) -> list[str]:
    """``horovodrun -np N -H hosts --gloo chexlib train <flags>`` for ``config``."""
    from chexlib.train import config_to_argv

    return [
        _tool("horovodrun"),
        "-np",
        str(np),
        "-H",
        hosts or f"localhost:{np}",
        "--gloo",
        _tool("chexlib"),
        "train",
        *config_to_argv(config),
    ]


def mpirun_command(config, np: int, hosts: str | None = None) -> list[str]:
    """The Open MPI command Horovod documents, for a Horovod built with MPI (not this one)."""
    from chexlib.train import config_to_argv

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
) -> dict:
    """Run :func:`horovodrun_command` as a subprocess; return the metrics rank 0 wrote.

    Args:
        log: an open :class:`RankLog`: each line horovodrun prints (every
            rank's, ``[R]<stdout>:``-prefixed) is passed on to it as it comes.
            Either way the last lines are kept for the error message.

    Raises:
        LaunchError: non-zero exit, with the end of the output; or ``timeout``
            passed: the ranks still running are named and killed.
    """
    from chexlib.results import read_json

    command = horovodrun_command(config, np, hosts)
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
        ranks = _rank_processes(proc.pid, "train")
        stuck = {r: f"pid {_rank_pid(ps)}" for r, ps in sorted(ranks.items())}
        for ps in ranks.values():
            _kill_tree(ps)
        proc.kill()
        proc.wait()
    for reader in pumps:
        reader.join(timeout=30)  # the pipes close when the last process holding them ends
    if stuck is not None:
        tail = "\n".join([*out, *err][-20:])
        message = _timeout_message("horovodrun", timeout, np, stuck)
        raise LaunchError(f"{message}\n{' '.join(command)}\n{tail}")
    if proc.returncode != 0:
        tail = "\n".join([*out, *err][-40:])
        raise LaunchError(f"exit status {proc.returncode}: {' '.join(command)}\n{tail}")
    return read_json(Path(config.out) / "metrics.json")


# --- ipyparallel ----------------------------------------------------------------------


def engine_host() -> str:
    """Runs on an engine: its host name."""
    return socket.gethostname()


def set_engine_env(env: dict) -> int:
    """Runs on an engine: set Horovod's variables before ``hvd.init()`` reads them."""
    os.environ.update(env)
    return os.getpid()


def engine_horovod_check() -> dict:
    """Runs on an engine: ``hvd.init()`` and an allreduce of the rank (a wiring check)."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    total = hvd.allreduce(tf.constant(float(hvd.rank())), op=hvd.Sum)
    return {
        "rank": hvd.rank(),
        "size": hvd.size(),
        "local_rank": hvd.local_rank(),
        "rank_sum": float(total.numpy()),
        "pid": os.getpid(),
    }


def slot_env(slot, addr: str, port: int, iface: str | None) -> dict:
    """The variables horovodrun's Gloo launcher gives one slot (rank) of the job."""
    env = {
        "HOROVOD_HOSTNAME": slot.hostname,
        "HOROVOD_RANK": str(slot.rank),
        "HOROVOD_SIZE": str(slot.size),
        "HOROVOD_LOCAL_RANK": str(slot.local_rank),
        "HOROVOD_LOCAL_SIZE": str(slot.local_size),
        "HOROVOD_CROSS_RANK": str(slot.cross_rank),
        "HOROVOD_CROSS_SIZE": str(slot.cross_size),
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
    }
    if iface:
        env["HOROVOD_GLOO_IFACE"] = iface
    return env


class RendezvousService:
    """Horovod's HTTP rendezvous server (its handler and key-value store) on one address.

    Horovod's own ``RendezvousServer.start()`` binds every interface; this
    binds ``host`` only: ``"127.0.0.1"`` when every engine is on this host.
    The server accepts unauthenticated reads and writes, so anything else
    is exposed to the network and :class:`HorovodCluster` warns about it.
    """

    def __init__(self, plan, host: str = "127.0.0.1"):
        from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

        self.httpd = RendezvousHTTPServer((host, 0), RendezvousHandler, False)
        self.httpd.init(plan)
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """(bound host, port)."""
        return self.httpd.server_address[:2]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def _remote_error(err: Exception) -> str:
    """``ValueError: message`` for an ipyparallel RemoteError, else the exception's own text."""
    name, value = getattr(err, "ename", None), getattr(err, "evalue", None)
    text = f"{name}: {value}" if name else f"{type(err).__name__}: {err}"
    return text.strip()[:1500]


class HorovodCluster:
    """ipyparallel engines wired as one Horovod (Gloo) job.

    Usage in JupyterLab::

        cluster = HorovodCluster(n=2).start()   # engines + rendezvous, %px magics on
        %%px
        import horovod.tensorflow.keras as hvd
        hvd.init(); print(hvd.rank(), hvd.size())

    or ``cluster.train(config, timeout=...)`` to run :func:`chexlib.train.train`
    on every engine and get rank 0's metrics (:meth:`run` does it for any
    function). ``cluster.stop()`` (or a ``with`` block) shuts the engines and
    the rendezvous server down.

    :meth:`run` never hangs on a failed rank: when one rank raises or its
    engine dies, the others (waiting in a collective for it) are interrupted,
    then killed if they do not stop, and :class:`LaunchError` names the rank
    and its error. With ``timeout`` the ranks still running are named with
    their Python stacks (local engines) and stopped the same way. After any
    failure the engines' Horovod job is over; start a new cluster.

    Args:
        n: number of engines = Horovod ranks.
        rendezvous_addr: address the engines reach the launcher at; default
            127.0.0.1 when every engine is on this host, else this host's address.
            The rendezvous server listens on this address only.
        iface: network interface for Gloo (``lo`` for a local cluster).
        cluster_kwargs: passed to ``ipyparallel.Cluster`` (e.g. ``engines="ssh"``).
    """

    def __init__(
        self,
        n: int = 2,
        rendezvous_addr: str | None = None,
        iface: str | None = None,
        **cluster_kwargs,
    ):
        self.n, self.addr, self.iface = n, rendezvous_addr, iface
        self.cluster_kwargs = cluster_kwargs
        self.cluster = self.client = self.view = self.server = None
        self.ranks: dict[int, int] = {}  # engine id -> Horovod rank
        self.pids: dict[int, int] = {}  # engine id -> process id (meaningful when local)
        self.local = False
        self.status_dir: Path | None = None  # where local engines dump their stacks

    def start(self, activate: bool = True, timeout: float = 120) -> HorovodCluster:
        import ipyparallel as ipp

        self.cluster = ipp.Cluster(n=self.n, **self.cluster_kwargs)
        try:
            self.client = self.cluster.start_and_connect_sync(activate=False)
            self.client.wait_for_engines(self.n, timeout=timeout)
            self.view = self.client[:]  # all engines, ordered by engine id
            self.view.block = True
            self._wire()
        except BaseException:
            self.stop()
            raise
        if activate and _in_ipython():
            self.view.activate()  # %px / %%px magics
        return self

    def _wire(self) -> None:
        """Start the rendezvous server, assign ranks per host, export the variables."""
        from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

        ids = sorted(self.client.ids)
        hosts = dict(zip(ids, self.view.apply_sync(engine_host), strict=True))
        self.local = all(h == socket.gethostname() for h in hosts.values())
        order = list(dict.fromkeys(hosts[i] for i in ids))  # hosts in order of first engine
        counts = {h: sum(1 for i in ids if hosts[i] == h) for h in order}
        plan = get_host_assignments(
            parse_hosts(",".join(f"{h}:{counts[h]}" for h in order)), self.n
        )
        addr = self.addr or (
            "127.0.0.1" if self.local else socket.gethostbyname(socket.gethostname())
        )
        self.server = RendezvousService(plan, addr)
        port = self.server.address[1]
        if not socket.gethostbyname(addr).startswith("127."):
            _warn_exposed("HorovodCluster's Horovod rendezvous server", f"{addr}:{port}")
        iface = self.iface or ("lo" if self.local else None)
        if self.local:  # engines dump their stacks here when a run times out
            self.status_dir = Path(tempfile.mkdtemp(prefix="chexlib-engines-"))
        slots = {h: [s for s in plan if s.hostname == h] for h in order}
        for host in order:
            for engine, slot in zip([i for i in ids if hosts[i] == host], slots[host], strict=True):
                env = slot_env(slot, addr, port, iface)
                self.pids[engine] = self.client[engine].apply_sync(set_engine_env, env)
                self.ranks[engine] = slot.rank
                if self.local:
                    self.client[engine].apply_sync(install_stack_dump, self.status_dir, slot.rank)

    def check(self, timeout: float | None = 300) -> list[dict]:
        """``hvd.init()`` and an allreduce on every engine; one dict per engine, by rank."""
        return [r for _, r in sorted(self.run(engine_horovod_check, timeout=timeout).items())]

    def train(self, config, timeout: float | None = None, log: RankLog | None = None) -> dict:
        """Run ``chexlib.train.train(config)`` on every engine; return rank 0's metrics.

        ``log``: an open :class:`RankLog` the engines' output lines go to as they come.

        Raises:
            LaunchError: a rank raised or died (named, the others stopped), or
                ``timeout`` seconds passed (the ranks still running named).
        """
        from chexlib.train import train

        return self.run(train, config, timeout=timeout, log=log)[0]

    def run(self, fn, *args, timeout: float | None = None, log: RankLog | None = None) -> dict:
        """Run ``fn(*args)`` on every engine at once; return ``{rank: result}``.

        With ``log`` (an open :class:`RankLog`), each engine's output lines are
        passed on to it as they come, prefixed with the engine's rank.

        Raises:
            LaunchError: a rank raised or its engine died (the others are
                stopped), or ``timeout`` seconds passed; the message names them.
        """
        pending = {self.ranks[e]: self.client[e].apply_async(fn, *args) for e in sorted(self.ranks)}
        deadline = None if timeout is None else time.monotonic() + timeout
        results, failures = {}, {}
        every, shown = dict(pending), {}  # every rank's result, for its output
        try:
            while pending and not failures:
                time.sleep(0.2)
                self._poll(pending, results, failures)
                if log is not None:
                    echo_engines(every, shown, log)
                overdue = deadline is not None and time.monotonic() > deadline
                if pending and not failures and overdue:
                    self._time_out(pending, timeout)
        finally:
            if log is not None:
                echo_engines(every, shown, log, final=True)
        if failures:
            end = time.monotonic() + 3.0  # the others' errors follow within moments; keep them
            while pending and time.monotonic() < end:
                time.sleep(0.2)
                self._poll(pending, results, failures)
            self._stop_ranks(pending)
            first = next(iter(failures))
            lines = [f"  rank {rank}: {error}" for rank, error in failures.items()]
            raise LaunchError(
                f"HorovodCluster: rank {first} failed first (a rank raised or died); stopped "
                f"rank(s) {', '.join(map(str, sorted(pending))) or 'none'} that were still "
                "running. The Horovod job of these engines is over: stop() this cluster and start "
                "a new one.\n" + "\n".join(lines)
            )
        return results

    def _poll(self, pending: dict, results: dict, failures: dict) -> None:
        """Move finished ranks from ``pending`` to ``results`` or ``failures``."""
        for rank, ar in list(pending.items()):
            if ar.ready():
                del pending[rank]
                try:
                    results[rank] = ar.get()
                except Exception as err:  # RemoteError, EngineError, ...
                    failures[rank] = _remote_error(err)
            elif self._engine_dead(rank):
                del pending[rank]
                failures[rank] = f"its engine (pid {self._pid(rank)}) died"

    def _engine(self, rank: int) -> int:
        return next(e for e, r in self.ranks.items() if r == rank)

    def _pid(self, rank: int) -> int:
        return self.pids[self._engine(rank)]

    def _engine_dead(self, rank: int) -> bool:
        if not self.local:
            return False  # ipyparallel's heartbeat reports it (an EngineError) in a while
        import psutil

        try:
            return psutil.Process(self._pid(rank)).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    def _time_out(self, pending: dict, timeout: float) -> None:
        pids = {rank: self._pid(rank) for rank in pending}
        stacks = collect_stacks(self.status_dir, pids) if self.status_dir else {}
        self._stop_ranks(pending)
        stuck = {
            rank: f"engine {self._engine(rank)}, pid {pids[rank]}, {stacks.get(rank, 'no stack')}"
            for rank in sorted(pending)
        }
        message = _timeout_message("HorovodCluster", timeout, self.n, stuck)
        raise LaunchError(f"{message}\nThe Horovod job of these engines is over: start a new one.")

    def _stop_ranks(self, pending: dict, grace: float = 5.0) -> None:
        """Interrupt the engines of ``pending`` ranks; kill those still busy after ``grace``."""
        if not pending:
            return
        self._signal(list(pending), signal.SIGINT)
        end = time.monotonic() + grace
        while time.monotonic() < end and not all(ar.ready() for ar in pending.values()):
            time.sleep(0.2)
        self._signal([rank for rank, ar in pending.items() if not ar.ready()], signal.SIGKILL)

    def _signal(self, ranks: list[int], signum: int) -> None:
        if not ranks:
            return
        if not self.local:  # engines on other hosts: ipyparallel's launcher signals them all
            self.cluster.signal_engines_sync(signum)
            return
        for rank in ranks:
            with contextlib.suppress(OSError):
                os.kill(self._pid(rank), signum)

    def stop(self) -> None:
        if self.cluster is not None:
            try:
                self.cluster.stop_cluster_sync()
            finally:
                self.cluster = self.client = self.view = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.status_dir is not None:
            shutil.rmtree(self.status_dir, ignore_errors=True)
            self.status_dir = None

    def __enter__(self) -> HorovodCluster:
        return self.start() if self.cluster is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

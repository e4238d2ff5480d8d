"""ipyparallel engines wired as one Horovod job: :class:`HorovodCluster`.

It starts N ipyparallel engines and wires them the way ``horovodrun`` wires
its processes: the launcher runs Horovod's HTTP rendezvous server
(:class:`RendezvousService`, on 127.0.0.1 when every engine is on this host)
and gives every engine the ``HOROVOD_*`` variables of its slot
(:func:`slot_env`: rank, size, local and cross rank, rendezvous address and
port, ``HOROVOD_CONTROLLER=gloo``, ``HOROVOD_CPU_OPERATIONS=gloo``). Then
``hvd.init()`` on the engines forms the job, and a JupyterLab user can run
training cells on every rank with ``%%px`` and inspect each one.

A rank that raises or whose engine dies stops the others (interrupted, then
killed), and :class:`~chexlib.launch.processes.LaunchError` names it; so does a
timeout, with the stacks of the ranks still running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

from chexlib.launch.processes import (
    LaunchError,
    collect_stacks,
    install_stack_dump,
    timeout_message,
    warn_exposed,
)
from chexlib.launch.rank_log import RankLog, echo_engines
from chexlib.train.recipe import train

# --- run on the engines ------------------------------------------------------------------


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


# --- wiring ------------------------------------------------------------------------------


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

    or ``cluster.train(config, timeout=...)`` to run :func:`chexlib.train.recipe.train`
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
            warn_exposed("HorovodCluster's Horovod rendezvous server", f"{addr}:{port}")
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

    def train(self, config, timeout: float | None = None, log: RankLog | None = None):
        """Run ``chexlib.train.recipe.train(config)`` on every engine; return rank 0's
        :class:`~chexlib.core.run_record.RunRecord`.

        ``log``: an open :class:`RankLog` the engines' output lines go to as they come.

        Raises:
            LaunchError: a rank raised or died (named, the others stopped), or
                ``timeout`` seconds passed (the ranks still running named).
        """

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
        message = timeout_message("HorovodCluster", timeout, self.n, stuck)
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

"""Launching Horovod training: horovodrun, ``horovod.run`` and ipyparallel engines.

Three ways to start N ranks of :func:`chexlib.train.train`, all with Gloo (no
MPI is needed; ``mpirun`` commands are built for clusters that have it):

``horovodrun`` (a shell, or :func:`run_horovodrun` from Python)
    ``horovodrun -np N -H host1:4,host2:4 --gloo chexlib train ...``. The
    command is built by :func:`horovodrun_command` from a ``TrainConfig``.
``horovod.run`` (:func:`run`)
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

In every mode a rank that dies stops the job with an error, never a hang:
horovodrun and ``horovod.run`` terminate the other ranks and fail with the dead
rank's exit status; on ipyparallel engines the surviving ranks' collectives
fail and :meth:`HorovodCluster.train` raises :class:`LaunchError`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MODES = ("horovod.run", "horovodrun", "ipyparallel")


class LaunchError(RuntimeError):
    """A launched job failed; the message holds the command and the end of its output."""


@dataclass(frozen=True)
class LaunchConfig:
    """How to start the ranks.

    Attributes:
        mode: ``horovod.run``, ``horovodrun`` or ``ipyparallel``.
        ranks: number of Horovod ranks (processes).
        hosts: ``"host1:slots,host2:slots"``; None: all ranks on this machine.
        timeout: seconds before a ``horovodrun`` job is killed (None: no limit).
    """

    mode: str = "horovod.run"
    ranks: int = 1
    hosts: str | None = None
    timeout: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"LaunchConfig: mode must be one of {MODES}, not {self.mode!r}")
        if self.ranks < 1:
            raise ValueError(f"LaunchConfig: ranks must be >= 1, not {self.ranks}")
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
    """
    lc = launch_config
    if lc.mode == "horovod.run":
        return run(config, np=lc.ranks, hosts=lc.hosts)
    if lc.mode == "horovodrun":
        return run_horovodrun(config, np=lc.ranks, hosts=lc.hosts, timeout=lc.timeout)
    with HorovodCluster(n=lc.ranks) as cluster:
        return cluster.train(config)


# --- horovod.run -----------------------------------------------------------------


def run(
    config, np: int = 1, hosts: str | None = None, start_timeout: int = 120, verbose: int = 0
) -> dict:
    """Run ``chexlib.train.train(config)`` on ``np`` Horovod ranks (Gloo); return rank 0's result.

    Args:
        config: a ``chexlib.train.TrainConfig``.
        np: number of ranks.
        hosts: ``"host1:slots,..."``; None: ``localhost:np``. Other hosts are
            reached by ssh, as horovodrun does.
        start_timeout: seconds the ranks may take to start.

    Raises:
        RuntimeError: from Horovod when a rank exits non-zero (the others are stopped).
    """
    import horovod

    from chexlib.train import train

    results = horovod.run(
        train,
        args=(config,),
        np=np,
        hosts=hosts or f"localhost:{np}",
        use_gloo=True,
        start_timeout=start_timeout,
        verbose=verbose,
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
    config, np: int, hosts: str | None = None, timeout: float | None = None, env: dict | None = None
) -> dict:
    """Run :func:`horovodrun_command` as a subprocess; return the metrics rank 0 wrote.

    Raises:
        LaunchError: non-zero exit or timeout, with the end of the output.
    """
    from chexlib.results import read_json

    command = horovodrun_command(config, np, hosts)
    try:
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired as err:
        raise LaunchError(f"timed out after {timeout} s: {' '.join(command)}") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
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


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


class HorovodCluster:
    """ipyparallel engines wired as one Horovod (Gloo) job.

    Usage in JupyterLab::

        cluster = HorovodCluster(n=2).start()   # engines + rendezvous, %px magics on
        %%px
        import horovod.tensorflow.keras as hvd
        hvd.init(); print(hvd.rank(), hvd.size())

    or ``cluster.train(config)`` to run :func:`chexlib.train.train` on every
    engine and get rank 0's metrics. ``cluster.stop()`` (or a ``with`` block)
    shuts the engines and the rendezvous server down.

    A dead engine makes the others fail (tested). An engine whose cell raises
    a Python error while the others wait in a collective leaves them waiting:
    interrupt them (``cluster.client.abort()``) or ``stop()`` the cluster.
    After any failure the engines' Horovod job is over; start a new cluster.

    Args:
        n: number of engines = Horovod ranks.
        rendezvous_addr: address the engines reach the launcher at; default
            127.0.0.1 when every engine is on this host, else this host's address.
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
        from horovod.runner.http.http_server import RendezvousServer

        ids = sorted(self.client.ids)
        hosts = dict(zip(ids, self.view.apply_sync(engine_host), strict=True))
        local = all(h == socket.gethostname() for h in hosts.values())
        order = list(dict.fromkeys(hosts[i] for i in ids))  # hosts in order of first engine
        counts = {h: sum(1 for i in ids if hosts[i] == h) for h in order}
        plan = get_host_assignments(
            parse_hosts(",".join(f"{h}:{counts[h]}" for h in order)), self.n
        )
        self.server = RendezvousServer()
        port = self.server.start()
        self.server.init(plan)
        addr = self.addr or ("127.0.0.1" if local else socket.gethostbyname(socket.gethostname()))
        iface = self.iface or ("lo" if local else None)
        slots = {h: [s for s in plan if s.hostname == h] for h in order}
        for host in order:
            for engine, slot in zip([i for i in ids if hosts[i] == host], slots[host], strict=True):
                self.client[engine].apply_sync(set_engine_env, slot_env(slot, addr, port, iface))
                self.ranks[engine] = slot.rank

    def check(self) -> list[dict]:
        """``hvd.init()`` and an allreduce on every engine; one dict per engine, by rank."""
        return sorted(self.view.apply_sync(engine_horovod_check), key=lambda r: r["rank"])

    def train(self, config) -> dict:
        """Run ``chexlib.train.train(config)`` on every engine; return rank 0's metrics."""
        import ipyparallel as ipp

        from chexlib.train import train

        try:
            results = self.view.apply_sync(train, config)
        except (ipp.error.CompositeError, ipp.error.EngineError) as err:
            raise LaunchError(
                "training failed on the ipyparallel engines (a rank raised or died; when a rank "
                "dies the others stop with a Horovod error). The Horovod job of these engines is "
                f"over: stop() this cluster and start a new one.\n{str(err)[:3000]}"
            ) from err
        return next(r for r in results if r.get("rank") == 0)

    def stop(self) -> None:
        if self.cluster is not None:
            try:
                self.cluster.stop_cluster_sync()
            finally:
                self.cluster = self.client = self.view = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self) -> HorovodCluster:
        return self.start() if self.cluster is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

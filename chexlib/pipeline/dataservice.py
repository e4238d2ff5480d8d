"""Disaggregated preprocessing: a tf.data service dispatcher and workers.

When a node's CPUs cannot decode images as fast as its accelerators train,
more CPUs on OTHER hosts can do it: the tf.data service runs the input
pipeline on worker processes and streams finished batches to the trainer.
``chexlib.pipeline.builders.build_dataset(..., data_service=ADDRESS)`` reads through
one. The workers open the image files by the paths in the pipeline, so on a
cluster they need the same shared file system as the trainer.

On one machine (tests, notebooks)::

    with start_local_service(n_workers=2) as service:
        ds = build_dataset("raw", "train", metadata=md, data_service=service.address)

From a shell, a dispatcher and N workers on this host (prints the address)::

    chexlib data-service local --workers 2

On a cluster, one dispatcher and one worker per CPU host::

    chexlib data-service dispatcher --port 5050
    chexlib data-service worker --dispatcher HOST:5050 --port 5051 --host "$(hostname)"

Network: TensorFlow's servers listen on every interface (TF 2.15 has no bind
address option) and have no authentication; a client that reaches a worker
can make it read any file this user can read. Every server prints a warning
naming its port when it starts. Run the service on a private cluster network
only, or firewall its ports to the trainers' hosts (the trust model Dask and
Ray document for their schedulers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from chexlib.core.flags import add_flags, config_from_args, option

READY = "READY"  # first line a server process prints, followed by its address


class LocalService:
    """A dispatcher and ``n_workers`` workers running as child processes.

    Use as a context manager (``with start_local_service(2) as s:``); the
    processes end on exit. ``address`` is what ``build_dataset`` takes.
    """

    def __init__(self, n_workers: int = 2, port: int = 0, timeout: float = 120.0):
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, not {n_workers}")
        self.n_workers, self.port, self.timeout = n_workers, port, timeout
        self.address: str | None = None
        self.worker_addresses: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._logdir = Path(tempfile.mkdtemp(prefix="chexlib-dataservice-"))

    def start(self) -> LocalService:
        self.address = self._spawn("dispatcher", ["--port", str(self.port)])
        dispatcher = self.address.removeprefix("grpc://")
        for i in range(self.n_workers):
            self.worker_addresses.append(self._spawn(f"worker{i}", ["--dispatcher", dispatcher]))
        return self

    def _spawn(self, name: str, args: list[str]) -> str:
        role = "dispatcher" if name == "dispatcher" else "worker"
        log = open(self._logdir / f"{name}.log", "w")  # noqa: SIM115 - the child owns it
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "chexlib.cli.main", "data-service", role, *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        log.close()
        self._procs.append(proc)
        line = _read_line(proc, self.timeout)
        if not line.startswith(READY):
            self.stop()
            tail = (self._logdir / f"{name}.log").read_text()[-2000:]
            raise RuntimeError(
                f"tf.data service {name} did not start (exit {proc.poll()}):\n{tail}"
            )
        return line.split()[1]

    def stop(self) -> None:
        """End the worker processes, then the dispatcher."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        self._procs.clear()

    @property
    def log_dir(self) -> Path:
        """Folder of the dispatcher's and workers' logs."""
        return self._logdir

    def alive(self) -> bool:
        """Every process of the service still runs."""
        return all(p.poll() is None for p in self._procs)

    def __enter__(self) -> LocalService:
        return self.start() if not self._procs else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """First stdout line of a child, or "" if it exits or takes longer than ``timeout``."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            return proc.stdout.readline().strip()
        if proc.poll() is not None:
            return ""
    return ""


def start_local_service(n_workers: int = 2, port: int = 0, timeout: float = 120.0) -> LocalService:
    """Start a dispatcher and ``n_workers`` workers on this machine; returns a context manager.

    Args:
        n_workers: worker processes (each runs whole input pipelines).
        port: dispatcher port; 0 picks a free one.
        timeout: seconds to wait for each process to come up.
    """
    return LocalService(n_workers, port, timeout).start()


# TensorFlow 2.15's tf.data service servers bind 0.0.0.0:PORT (server_lib.cc,
# GrpcDataServerBase::Start); DispatcherConfig and WorkerConfig have no bind
# address (``worker_address`` is only the name workers register under). So
# chexlib cannot keep them to loopback: it says so when they start.
def exposure_warning(addresses: list[str]) -> str:
    """The warning line for tf.data service servers at ``addresses`` (``grpc://host:port``)."""
    ports = ", ".join(a.rpartition(":")[2] for a in addresses)
    return (
        f"warning: the tf.data service listens on port(s) {ports} of every network interface "
        "(TensorFlow offers no bind address) and has no authentication: anyone who can reach "
        "these ports can make a worker read files this user can read. Run it only on a "
        "trusted private cluster network, or firewall these ports (allow the trainers' hosts only)"
    )


def serve(role: str, port: int = 0, dispatcher: str | None = None, host: str | None = None) -> None:
    """Run one dispatcher or worker in this process until it is terminated.

    ``host``: the name trainers on other hosts reach a worker at; TensorFlow
    registers a worker as ``localhost:PORT`` unless told, which only works
    when the trainer runs on the same host.
    """
    import tensorflow as tf

    service = tf.data.experimental.service
    if role == "dispatcher":
        server = service.DispatchServer(service.DispatcherConfig(port=port))
        address = server.target
    else:
        worker_address = f"{host}:%port%" if host else "localhost:%port%"
        server = service.WorkerServer(
            service.WorkerConfig(
                dispatcher_address=dispatcher, worker_address=worker_address, port=port
            )
        )
        address = f"grpc://{server._address}"  # the bound port (port=0 picks one)
    print(READY, address, flush=True)
    print(exposure_warning([address]), file=sys.stderr, flush=True)
    server.join()


ROLES = ("dispatcher", "worker", "local")


@dataclass(frozen=True)
class DataServiceCommand:
    """One ``chexlib data-service`` call: ``role`` is its positional argument, the rest flags."""

    role: str = option(
        "dispatcher or worker: one server in this process; local: a dispatcher and "
        "--workers workers as child processes on this host, until Ctrl-C",
        positional=True,
        choices=ROLES,
    )
    port: int = option("port to listen on (0: any free port)", default=0)
    dispatcher: str | None = option("HOST:PORT of the dispatcher (workers)", default=None)
    workers: int = option("worker processes (local)", default=2)
    host: str | None = option(
        "worker: host name trainers reach it at (unset: localhost; on a cluster, "
        "this host's name, e.g. $(hostname))",
        default=None,
    )


def add_arguments(parser) -> None:
    """``ROLE`` positional, then one flag per other :class:`DataServiceCommand` field."""
    add_flags(parser, DataServiceCommand)


def run(args) -> int:
    """``chexlib data-service ROLE``: serve until terminated (local: until Ctrl-C or a child ends)."""
    config = config_from_args(DataServiceCommand, args)
    if config.role == "worker" and not config.dispatcher:
        raise SystemExit("chexlib data-service worker: needs --dispatcher HOST:PORT")
    if config.role != "local":
        serve(config.role, config.port, config.dispatcher, config.host)
        return 0

    def interrupted(*_):
        raise KeyboardInterrupt

    service = LocalService(config.workers, config.port)
    signal.signal(signal.SIGTERM, interrupted)  # `kill` too stops the child processes
    try:
        service.start()
        print(
            f"tf.data service: dispatcher {service.address}, workers "
            f"{' '.join(service.worker_addresses)}; logs in {service.log_dir}",
            flush=True,
        )
        print(
            f"read through it with --data-service {service.address} "
            "(or build_dataset(..., data_service=ADDRESS)); Ctrl-C stops it",
            flush=True,
        )
        addresses = [service.address, *service.worker_addresses]
        print(exposure_warning(addresses), file=sys.stderr, flush=True)
        while service.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:  # also when interrupted while starting: no orphaned servers
        service.stop()
    print("a tf.data service process ended; stopped the others", file=sys.stderr)
    return 1

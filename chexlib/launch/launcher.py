"""Launching Horovod training: horovodrun, ``horovod.run`` and ipyparallel engines.

Three ways to start N ranks of :func:`chexlib.train.recipe.train`, all with Gloo (no
MPI is needed; ``mpirun`` commands are built for clusters that have it):

``horovodrun`` (a shell, or :func:`run_horovodrun` from Python)
    ``horovodrun -np N -H host1:4,host2:4 --gloo chexlib train ...``. The
    command is built by :func:`horovodrun_command` from a ``TrainConfig``.
``horovod.run`` (:func:`run`, or :func:`run_function` for any function)
    starts N processes that run ``train(config)`` and hands the rank-0
    result back to the caller: a notebook (papermill or JupyterLab) trains on
    N ranks and gets the run's :class:`~chexlib.core.run_record.RunRecord`.
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

Watching a long job: with ``LaunchConfig.log_output`` (notebooks pass their
``LOG_OUTPUT`` parameter, which ``chexlib study --log-output`` sets) every rank's output is passed on line by line as it comes, prefixed
with its rank (``[1] Epoch 3/10 ...``), to this process's stdout (a notebook's
cell output, in a kernel) and appended to ``ranks.log`` in the training run's
folder. What is kept for error messages stays as it was.

Network: Horovod's rendezvous and result servers accept unauthenticated
requests, so when every rank runs on this host they listen on 127.0.0.1 only
(for ``horovod.run`` and :class:`HorovodCluster`). With other hosts they must
be reachable from them; chexlib then warns that the port is open to the
network (run on a private cluster network, or firewall the port).

This module holds :class:`LaunchConfig` and :func:`launch`; the modes live in
:mod:`chexlib.launch.horovodrun` (``horovod.run``, ``horovodrun``, ``mpirun``) and
:mod:`chexlib.launch.engines` (ipyparallel), what they share to watch and stop
the ranks in :mod:`chexlib.launch.processes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from chexlib.core.run_record import RunRecord
from chexlib.launch.engines import (
    HorovodCluster,
)
from chexlib.launch.horovodrun import (
    run,
    run_horovodrun,
)
from chexlib.launch.rank_log import RankLog

MODES = ("horovod.run", "horovodrun", "ipyparallel")
RANK_LOG = "ranks.log"  # the ranks' output, in the training run's folder, when streamed


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
            training run's folder (``TrainConfig.out``). Notebooks pass their
            ``LOG_OUTPUT`` parameter (``chexlib study --log-output`` sets it).
    """

    mode: str = "horovod.run"
    ranks: int = 1
    hosts: str | None = None
    timeout: float | None = None
    log_output: bool = False

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


def launch(config, launch_config: LaunchConfig) -> RunRecord:
    """Train ``config`` (a ``TrainConfig``) with the ranks and mode of ``launch_config``.

    Returns:
        Rank 0's record (what is written to ``metrics.json``), in every mode.

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

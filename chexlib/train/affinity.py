"""Give each Horovod rank its own CPU cores (``chexlib train --pin-cores N``).

Without pinning, the ranks on one machine share every core, so "2 ranks" on a
2-core machine is two processes fighting over the same cores and a scaling
figure measures the fight. With ``--pin-cores N``, local rank ``r`` runs on the
``r``-th block of ``N`` cores this process may use, and TensorFlow's intra- and
inter-op thread pools (which also run tf.data) get ``N`` threads. One rank on
one core against two ranks on one core each then compares equal resources per
rank: ``images/s(2) / (2 x images/s(1))`` is Horovod's own overhead (weak
scaling). On a cluster node, ``--pin-cores 10`` with 4 ranks gives each GPU's
rank its 10 cores, as ``horovodrun``'s MPI binding would.

Linux only (``os.sched_setaffinity``); elsewhere pinning fails with a clear error.
"""

from __future__ import annotations

import os
from pathlib import Path


class AffinityError(ValueError):
    """The requested pinning cannot be done here; the message says why."""


def available_cores() -> list[int]:
    """Cores this process may run on now (respects taskset, cgroups, Slurm)."""
    if not hasattr(os, "sched_getaffinity"):
        raise AffinityError("CPU pinning needs Linux (os.sched_getaffinity is not available)")
    return sorted(os.sched_getaffinity(0))


def rank_cores(local_rank: int, local_size: int, cores_per_rank: int, available=None) -> list[int]:
    """The block of ``cores_per_rank`` cores of ``local_rank`` among ``local_size`` ranks."""
    cores = list(available) if available is not None else available_cores()
    need = local_size * cores_per_rank
    if cores_per_rank < 1:
        raise AffinityError(f"--pin-cores must be >= 1, not {cores_per_rank}")
    if need > len(cores):
        raise AffinityError(
            f"--pin-cores {cores_per_rank} with {local_size} rank(s) on this machine needs "
            f"{need} cores; this process may use {len(cores)} ({cores})"
        )
    return cores[local_rank * cores_per_rank : (local_rank + 1) * cores_per_rank]


def pin_process(cores: list[int]) -> None:
    """Pin every thread of this process to ``cores``; threads started later inherit it.

    ``sched_setaffinity(0, ...)`` changes the calling thread only, and threads
    already running (Horovod's background thread, started by ``hvd.init()``)
    would keep all cores, so each thread of ``/proc/self/task`` is set.
    """
    if not hasattr(os, "sched_setaffinity"):
        raise AffinityError("CPU pinning needs Linux (os.sched_setaffinity is not available)")
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    os.sched_setaffinity(0, cores)


def set_tensorflow_threads(n: int) -> None:
    """Intra- and inter-op threads (the latter also run tf.data) = ``n``.

    TensorFlow reads these once, when its runtime starts: a process that has
    already run TensorFlow with other values (an ipyparallel engine training
    again) cannot change them, and is told so.
    """
    import tensorflow as tf

    threading = tf.config.threading
    if (
        threading.get_intra_op_parallelism_threads(),
        threading.get_inter_op_parallelism_threads(),
    ) == (n, n):
        return
    try:
        threading.set_intra_op_parallelism_threads(n)
        threading.set_inter_op_parallelism_threads(n)
    except RuntimeError as err:
        raise AffinityError(
            f"--pin-cores {n}: TensorFlow already started with other thread counts in this "
            f"process; restart it (or the ipyparallel engines) to pin: {err}"
        ) from None

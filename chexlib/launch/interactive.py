"""Horovod ranks you can talk to: ipyparallel engines as one job, cell by cell.

:class:`chexlib.launch.engines.HorovodCluster` starts N ipyparallel engines and wires
them as one Horovod (Gloo) job. This module is what a notebook needs around it,
so that its cells stay free of functions:

- :func:`start_cluster` starts the engines, turns on the ``%px`` / ``%%px``
  magics and makes sure the engines stop: at ``cluster.stop()``, when a cell
  of the kernel fails (papermill stops at a failed cell; a Horovod job with a
  failed rank cannot go on), and when the kernel exits;
- :func:`engine_env` shows the ``HOROVOD_*`` variables each engine was given;
- :func:`gather` pulls a variable from every engine, keyed by Horovod rank;
- :func:`rank_table` turns what :func:`chexlib.train.recipe.train` returned on each
  rank into one row per rank.

No TensorFlow is imported here: the engines import it when they train.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys

from chexlib.launch.engines import HorovodCluster

ENV_SHOWN = (
    "HOROVOD_RANK",
    "HOROVOD_SIZE",
    "HOROVOD_LOCAL_RANK",
    "HOROVOD_LOCAL_SIZE",
    "HOROVOD_CROSS_RANK",
    "HOROVOD_CROSS_SIZE",
    "HOROVOD_CONTROLLER",
    "HOROVOD_GLOO_RENDEZVOUS_ADDR",
    "HOROVOD_GLOO_RENDEZVOUS_PORT",
)


class _StopOnError:
    """IPython ``post_run_cell`` hook: stop the cluster when a cell fails.

    It runs before the kernel answers the cell, so papermill (which stops at a
    failed cell and then shuts the kernel down) never leaves engines behind.
    The hook removes itself once its cluster is stopped.
    """

    def __init__(self, cluster: HorovodCluster, shell):
        self.cluster, self.shell = cluster, shell

    def __call__(self, result) -> None:
        if self.cluster.cluster is None:  # stopped already (cluster.stop() or an earlier failure)
            self.detach()
            return
        if result.success:
            return
        print(
            "chexlib: a cell failed, so the Horovod engines are stopped (a job with a failed "
            "rank cannot go on); run start_cluster() again to continue",
            file=sys.stderr,
            flush=True,
        )
        self.detach()
        self.cluster.stop()

    def detach(self) -> None:
        if self in self.shell.events.callbacks["post_run_cell"]:
            self.shell.events.unregister("post_run_cell", self)


def start_cluster(
    ranks: int = 2, stop_on_error: bool = True, timeout: float = 120, **cluster_kwargs
) -> HorovodCluster:
    """Start ``ranks`` ipyparallel engines wired as one Horovod job; turn on ``%%px``.

    The engines stop at ``cluster.stop()``, when the kernel exits and, with
    ``stop_on_error`` (in IPython), as soon as any cell of the kernel fails.

    Args:
        ranks: engines = Horovod ranks (all on this machine unless
            ``cluster_kwargs`` says otherwise, e.g. ``engines="ssh"``).
        stop_on_error: stop the engines when a cell fails. Turn it off to keep
            them through a typo while exploring in JupyterLab; a failed rank
            still ends the Horovod job.
        timeout: seconds to wait for the engines to register.
        cluster_kwargs: passed to ``ipyparallel.Cluster``.

    Returns:
        The started :class:`~chexlib.launch.engines.HorovodCluster`: ``.view`` is a
        blocking view of all engines, ``.ranks`` maps engine id to rank.
    """
    # Engines that ran TensorFlow exit 1 on ipyparallel's SIGTERM, with a harmless traceback
    # it logs as a warning, page after page; errors still show.
    cluster_kwargs.setdefault("log_level", logging.ERROR)
    cluster = HorovodCluster(n=ranks, **cluster_kwargs).start(activate=True, timeout=timeout)
    atexit.register(cluster.stop)  # stop() is idempotent; ipyparallel stops only its part
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None:
        # %%px streams each engine's output as it comes; its task bar (after 2 s by default)
        # only says 0/N, then N/N, and stays at 0 % in a saved notebook. A day's delay hides
        # it; -1 would too, but then %%px stops waiting for the engines' last output lines.
        shell.run_line_magic("pxconfig", f"--progress-after {24 * 3600}")
        if stop_on_error:
            shell.events.register("post_run_cell", _StopOnError(cluster, shell))
    return cluster


def horovod_env() -> dict:
    """Runs on an engine: its process, host and the ``HOROVOD_*`` variables it was given."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        **{name: os.environ.get(name) for name in ENV_SHOWN},
    }


def engine_env(cluster: HorovodCluster):
    """One column per engine (``engine 0``, ...): its pid, host and ``HOROVOD_*`` variables."""
    import pandas as pd

    engines = sorted(cluster.ranks)
    rows = cluster.client[engines].apply_sync(horovod_env)
    columns = {f"engine {e}": row for e, row in zip(engines, rows, strict=True)}
    return pd.DataFrame(columns).reindex(["pid", "host", *ENV_SHOWN])


def gather(cluster: HorovodCluster, name: str) -> dict:
    """The value of the variable ``name`` on every engine: ``{rank: value}``, by rank."""
    by_rank = {rank: engine for engine, rank in cluster.ranks.items()}
    return {rank: cluster.client[by_rank[rank]].pull(name, block=True) for rank in sorted(by_rank)}


def rank_table(records: dict):
    """One row per rank from ``{rank: train(config)}``, each a
    :class:`~chexlib.core.run_record.RunRecord` (see :func:`gather`).

    Columns: rank, ranks; the last epoch's training loss (averaged over ranks
    by Horovod's metric averaging, so equal on every rank) and validation loss;
    the test loss and mean AUROC; the rank's own images/s (median over timed
    windows) and the job's; the first 12 hex digits of the rank's weights and
    whether all ranks hold the same weights.
    """
    import pandas as pd

    rows = []
    for rank, r in sorted(records.items()):
        last = r.history[-1] if r.history else {}  # an epoch without validation has no val_loss
        per_rank = r.throughput.get("per_rank") or []  # none when nothing was timed
        own = per_rank[rank] if rank < len(per_rank) else {}
        rows.append(
            {
                "rank": r.rank,
                "ranks": r.ranks,
                "loss": last.get("loss"),
                "val_loss": last.get("val_loss"),
                "test_loss": r.test_loss,
                "mean_auroc": r.mean_auroc,
                "images_per_sec_rank": own.get("median"),
                "images_per_sec_job": r.images_per_sec,
                "weights_sha256": r.weights_sha256_per_rank[rank][:12],
                "weights_in_sync": r.weights_in_sync,
            }
        )
    return pd.DataFrame(rows)

"""Make this process one Horovod rank: what must be set before, at and around ``hvd.init()``.

XLA reads ``TF_XLA_FLAGS`` and Horovod its ``HOROVOD_*`` variables once, when
they start, so :func:`before_horovod_init` sets them first. After
``hvd.init()``: :func:`pin_cores` gives the rank its own CPU cores (before
TensorFlow starts its thread pools), :func:`pin_gpu` one GPU per local rank,
and :func:`compute_policy` sets the compute precision and XLA for one run only (an
ipyparallel engine may train again). :func:`read_timeline` reads the Horovod
timeline that ``--horovod-timeline`` asks for.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from chexlib.core.machine import cpu_flags
from chexlib.train import affinity
from chexlib.train.affinity import AffinityError, available_cores
from chexlib.train.config import choose_precision

if TYPE_CHECKING:
    from chexlib.train.config import TrainConfig


def before_horovod_init(config: TrainConfig) -> None:
    """The environment XLA and Horovod read once: set before TensorFlow or Horovod starts."""
    if config.xla:  # before TensorFlow starts: XLA reads its flags once
        xla_cpu_flag()
    import horovod.tensorflow.keras as hvd

    if config.horovod_timeline:
        timeline_env(config.horovod_timeline, hvd.is_initialized())
    drop_bad_horovod_env()
    if not hvd.is_initialized():
        quiet_single_rank_env()


# The job's size as launchers set it: horovodrun (Gloo) and chexlib's engines, Open MPI,
# PMI (MPICH, Slurm's srun); PMIx sets a rank but no size.
LAUNCHER_SIZE_ENV = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
SINGLE_RANK_CYCLE_MS = "10"


def quiet_single_rank_env() -> None:
    """Horovod: a job of one rank wakes Horovod's thread every 10 ms, not every 1 ms.

    Horovod's background thread runs a cycle every ``HOROVOD_CYCLE_TIME`` ms
    (default 1) even when no other rank exists; measured here (CPU time of an
    idle initialized process) it then takes 2.3-2.6 % of a core from training
    steps that use every core, 0.6 % at 10 ms. A job of one rank has no
    allreduce in its steps (plain Adam, see :mod:`chexlib.train.recipe`), only
    a few collectives per epoch (gathers of the evaluation, the record), each
    waiting at most one cycle. A value the user set is kept.
    """
    sizes = [os.environ.get(v) for v in LAUNCHER_SIZE_ENV]
    several = any(size not in (None, "", "1") for size in sizes) or "PMIX_RANK" in os.environ
    if "HOROVOD_CYCLE_TIME" in os.environ or several:
        return
    os.environ["HOROVOD_CYCLE_TIME"] = SINGLE_RANK_CYCLE_MS
    _SET_BY_US.add("HOROVOD_CYCLE_TIME")


_SET_BY_US: set[str] = set()


def after_horovod_init() -> None:
    """Remove what only ``hvd.init()`` needed to read, so that jobs this process launches
    next (a notebook's ``horovodrun`` of several ranks) start with Horovod's defaults."""
    while _SET_BY_US:
        os.environ.pop(_SET_BY_US.pop(), None)


def pin_gpu(local_rank: int) -> None:
    """Horovod: one GPU per process (the local rank's), growing memory as needed."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        try:
            tf.config.set_visible_devices(gpus[local_rank % len(gpus)], "GPU")
        except RuntimeError:  # an engine training again: its GPU is already pinned
            pass


KERAS_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def resolve_precision(requested: str) -> tuple[str, str]:
    """(precision, why) of ``--precision`` here: ``auto`` looks at the GPUs and CPU flags."""
    import tensorflow as tf

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    return choose_precision(requested, has_gpu, cpu_flags())


def precision_now() -> str:
    """The precision of the Keras policy in force (what a run inside compute_policy uses)."""
    import tensorflow as tf

    name = tf.keras.mixed_precision.global_policy().name
    return {policy: precision for precision, policy in KERAS_POLICIES.items()}.get(name, name)


@contextlib.contextmanager
def compute_policy(precision: str, xla: bool):
    """The compute precision (a Keras mixed policy: float32 variables, head and loss;
    ``auto`` resolved here) and XLA auto-clustering for the run inside, reset after it."""
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    precision, why = resolve_precision(precision)
    if precision != "float32":
        tf.keras.mixed_precision.set_global_policy(KERAS_POLICIES[precision])
    if hvd.rank() == 0:  # Horovod: only rank 0 logs
        print(f"chexlib train: {precision} compute ({why})", file=sys.stderr, flush=True)
    if xla:
        # auto-clustering: XLA compiles what it can; Horovod's ops (no XLA kernel) stay in TF
        tf.config.optimizer.set_jit("autoclustering")
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")  # engines may train again
        if xla:
            tf.config.optimizer.set_jit(False)


def timeline_env(path: str, initialized: bool) -> None:
    """Horovod: ``HOROVOD_TIMELINE`` for ``hvd.init()``, which reads it once (rank 0 writes)."""
    if initialized:  # an ipyparallel engine that already joined its job
        print(
            "chexlib train: --horovod-timeline: Horovod was initialized before this run in this "
            "process; its timeline is set at hvd.init() only, so none is written",
            file=sys.stderr,
        )
        return
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.environ["HOROVOD_TIMELINE"] = str(target)  # Horovod: the timeline's file


def read_timeline(path: str | Path) -> list[dict]:
    """The events of a Horovod timeline (Chrome trace JSON, array format).

    Horovod writes ``[`` and then one event per line, each followed by a comma,
    and may not write the closing ``]`` before its process ends. The Trace Event
    Format makes that ``]`` optional and Chrome's trace viewer reads such files;
    this does the same: a trailing comma is dropped and the bracket added.
    """
    import json

    text = Path(path).read_text().strip()
    if not text.endswith("]"):
        text = text.rstrip(",") + "]"
    return json.loads(text)


def drop_bad_horovod_env() -> None:
    """Horovod: remove tuning variables that are not numbers, so Horovod's defaults apply.

    ``horovod.run`` in Horovod 0.28.1 passes ``HOROVOD_CYCLE_TIME="(None,)"`` and
    ``HOROVOD_CACHE_CAPACITY="(None,)"`` to its ranks (a stray comma in
    ``horovod.runner._HorovodArgs``). The C++ side reads the cycle time as 0 and
    its background thread spins without sleeping: measured here, a 1-rank
    job pinned to one core trained at 63 images/s instead of 116.
    """
    for name in ("HOROVOD_CYCLE_TIME", "HOROVOD_CACHE_CAPACITY"):
        value = os.environ.get(name)
        if value is None:
            continue
        try:
            float(value)
        except ValueError:
            del os.environ[name]


def pin_cores(cores_per_rank: int, local_rank: int, local_size: int) -> None:
    """Horovod: this rank on its own block of cores; TensorFlow's threads sized to it."""

    cores = affinity.rank_cores(local_rank, local_size, cores_per_rank)
    affinity.pin_process(cores)
    affinity.set_tensorflow_threads(len(cores))


def cores_now() -> list[int] | None:
    """The cores this process may run on (None where the OS does not say)."""

    try:
        return available_cores()
    except AffinityError:
        return None


def xla_cpu_flag() -> None:
    """Let XLA auto-clustering act on CPU too (``--tf_xla_cpu_global_jit``).

    ``jit_compile=True`` on the whole training step fails with Horovod: its
    allreduce has no XLA kernel. Auto-clustering compiles the rest; on CPU it
    needs this flag, which XLA reads from ``TF_XLA_FLAGS`` once, when it first
    starts (so in a process that already ran TensorFlow, set it beforehand).
    """
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if "--tf_xla_cpu_global_jit" not in flags:
        os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_cpu_global_jit".strip()

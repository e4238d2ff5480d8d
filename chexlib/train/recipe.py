"""CheXNet training with Horovod: correct, measured, resumable.

:func:`train` is what every Horovod rank runs. It reads top to bottom in the
order of Horovod's Keras example, and each line that exists only for
distribution carries a ``# Horovod:`` comment:

1. ``hvd.init()``; one GPU per local rank with memory growth (when GPUs exist);
2. data sharded by rank (:mod:`chexlib.train.inputs`); every rank takes the same
   number of steps per epoch, from the smallest shard;
3. the learning rate scaled by the number of ranks (``--no-scale-lr`` turns
   it off) and ``hvd.DistributedOptimizer`` around Adam (gradients averaged by
   allreduce; a job of one rank trains with plain Adam, as fast as a plain
   Keras ``fit``: ``make bench-train`` measures it);
4. the initial variables broadcast from rank 0 (after a ``--resume`` restore);
5. callbacks: metric averaging and LR warm-up over ``--warmup-epochs`` (at
   more than one rank), then
   ReduceLROnPlateau on the validation loss; only rank 0 checkpoints, writes
   TensorBoard files and prints progress;
6. one Keras ``fit()`` per epoch; only rank 0 writes results.

Model, optimizer and callbacks are made in :func:`train` and passed on as
values; the configuration and its flags are in :mod:`chexlib.train.config`,
the process set-up around ``hvd.init()`` in :mod:`chexlib.train.process`, and the
record of the run in :mod:`chexlib.train.outputs`.

Evaluation (:mod:`chexlib.train.evaluate`): every rank predicts its shard of the
validation split, the predictions are gathered (``hvd.allgather``), so each
image counts exactly once (checked against the split size), and the per-class
AUROC (scikit-learn) and their mean are computed each epoch; the test split is
evaluated at the end. A class with only one label value in a split has no
AUROC: it is recorded as None with the reason.

Throughput: warm-up once per run (the first ``--throughput-warmup-steps``
steps, and the first step after each evaluation), then every step is timed,
in windows of ``--throughput-window-steps``; the median and spread per rank
and in total are reported, like Horovod's synthetic benchmark. With no full
window, the rate over what was timed is reported with a note (see
:mod:`chexlib.train.callbacks`). ``--synthetic`` replaces the input pipeline with
one repeated random batch: the model's ceiling in the same configuration.

Fault tolerance (:mod:`chexlib.train.checkpoints`): rank 0 writes a checkpoint after
every epoch (model, optimizer, LR-schedule state and history; written to a
temporary folder and renamed, so a crash never leaves half a checkpoint).
``--resume`` continues after the last complete epoch, and only the same run:
every setting that changes the result (:data:`NOT_RESULT` lists those that do
not), the number of ranks and a fingerprint of the data must match, else it
refuses and lists every difference. A resumed run whose checkpoint already
reached ``--epochs`` trains nothing and leaves its ``metrics.json`` as it is.
Without ``--resume`` a folder holding a checkpoint is refused. Each epoch's
data order and flips depend only on (seed, epoch), so a resumed run repeats
what an uninterrupted run would have done, up to floating-point noise
(bit-exact order needs ``--deterministic``; the optimized pipeline is
non-deterministic by default, as in the official recipe). A rank that dies
makes ``horovodrun`` / ``horovod.run`` stop the others and exit non-zero.

Seeing inside a run: ``--tensorboard DIR`` (rank 0) writes per-epoch scalars
(loss, learning rate, per-class and mean validation AUROC, images/s) and, with
``--profile-steps A,B``, a TF profiler trace of steps A..B for TensorBoard's
profile tab (input-pipeline analysis, trace viewer; needs the
``tensorboard-plugin-profile`` package to view). ``--horovod-timeline FILE``
sets ``HOROVOD_TIMELINE`` before ``hvd.init()``: rank 0 writes Horovod's
timeline, a Chrome trace (:func:`read_timeline` reads it). (Not ``--timeline``:
horovodrun reads its own options after the command too, and ``--timeline`` is
an ambiguous prefix of its ``--timeline-filename``.)

Test hook (fault injection, for tests only): the environment variable
``CHEXLIB_FAULT_INJECT="rank=R,epoch=E,step=S"`` makes rank R exit with
status 17 at step S of epoch E (0-based), as a crashed rank would.

TensorFlow and Horovod are imported when a run starts, so ``chexlib train
--help`` and the config are quick to import.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from chexlib.core.run_record import RunRecord
from chexlib.data.metadata import DataError
from chexlib.report.training import summary_text
from chexlib.train import checkpoints, process
from chexlib.train.config import (
    TrainConfig,
    add_train_arguments,
    config_from_args,
    parse_profile_steps,
)
from chexlib.train.evaluate import (
    split_scorers,
)
from chexlib.train.inputs import RankData
from chexlib.train.models import build_model
from chexlib.train.outputs import run_metrics, write_outputs

FAULT_ENV = "CHEXLIB_FAULT_INJECT"
FAULT_EXIT_CODE = 17


def parse_fault(text: str | None, rank: int) -> tuple[int, int] | None:
    """``"rank=1,epoch=0,step=3"`` -> (epoch, step) if it targets ``rank``."""
    if not text:
        return None
    try:
        parts = dict(item.split("=") for item in text.split(","))
        target = (int(parts["rank"]), int(parts["epoch"]), int(parts["step"]))
    except (KeyError, ValueError):
        raise ValueError(f"{FAULT_ENV}={text!r}: expected 'rank=R,epoch=E,step=S'") from None
    return target[1:] if target[0] == rank else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``chexlib train``'s flags (from :class:`~chexlib.train.config.TrainConfig`)."""
    add_train_arguments(parser)


SIGTERM_EXIT = 128 + signal.SIGTERM  # 143: what a shell reports for a process SIGTERM ended


class Terminated(BaseException):
    """SIGTERM arrived during ``chexlib train`` (raised by its handler).

    A ``BaseException``, as ``KeyboardInterrupt`` is, so that no ``except Exception``
    on the way (a restore that reports any error, Keras) turns it into something else.
    """


def run(args: argparse.Namespace) -> int:
    """``chexlib train``: one Horovod rank (run it under horovodrun for N ranks).

    SIGTERM (a scheduler's or horovodrun's stop) ends it with one line saying which
    checkpoint remains, and exit status 143.
    """
    config = config_from_args(args)
    try:
        with _sigterm_raises():
            record = train(config)
    except Terminated:
        print(
            f"chexlib train: terminated (SIGTERM); {checkpoints.last_checkpoint(config.out)}",
            file=sys.stderr,
            flush=True,
        )
        return SIGTERM_EXIT
    if record.rank == 0:
        print(summary_text(record))
    return 0


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises :class:`Terminated` in the main thread (once: a second one ends the
    process at once); the previous handler is back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (a notebook's worker thread)
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _naming_bad_images(config: TrainConfig):
    """An image the input pipeline could not decode ends the run with one
    :class:`DataError` naming it (:func:`chexlib.pipeline.decode.bad_image`) and the
    checkpoint kept; any other error passes unchanged.

    Why here and not a check of every file before training: the pipeline's check of the
    PNG signature costs nothing per image and sees every image as it is decoded (raw
    files and records, every split, a file replaced during the run), where a pre-pass
    would read the head of every file on every run (112,120 opens for NIH) and still
    miss a PNG cut short; ``chexlib validate`` is the full check before training.
    """
    import tensorflow as tf

    # here: it loads TensorFlow; importing this module does not
    from chexlib.pipeline.decode import bad_image

    try:
        yield
    except tf.errors.InvalidArgumentError as err:
        found = bad_image(err.message)
        if found is None and "DecodePng" not in err.message:
            raise
        if found is None:  # TensorFlow's decoder on a PNG cut short: it does not say which
            found = f"an image does not decode ({_op_reason(err.message, 'DecodePng')}; "
            found += "TensorFlow's decoder does not name it)"
        check = (
            f"chexlib validate {config.data}"
            if config.source == "raw"
            else f"chexlib verify-records {config.records} --data DATA --decode"
        )
        raise DataError(
            f"{found}; training stopped and {checkpoints.last_checkpoint(config.out)}; "
            f"`{check}` lists every bad image"
        ) from None


# --- the recipe ------------------------------------------------------------------


def _op_reason(message: str, op: str) -> str:
    """TensorFlow's reason in an error message: the line before ``[[{{node OP}}]]``."""
    lines = [re.sub(r"\{\{.*?\}\}\s*", "", ln).strip() for ln in message.splitlines()]
    at = next((i for i, ln in enumerate(message.splitlines()) if "{{node" in ln and op in ln), 0)
    return next((ln for ln in reversed(lines[:at]) if ln), lines[0] if lines else message)


def train(config: TrainConfig) -> RunRecord:
    """Train CheXNet on this Horovod rank and return the run's record (the same on every rank
    but for its ``rank``).

    Call it on every rank (``horovodrun ... chexlib train``, :func:`chexlib.launch.horovodrun.run`
    or ipyparallel engines); a single process is a job of one rank. Only rank 0 writes files.
    """
    process.before_horovod_init(config)  # XLA and Horovod read their settings once
    import horovod.tensorflow as hvd_tf
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    # Horovod: initialize Horovod.
    hvd.init()
    process.after_horovod_init()
    rank, ranks = hvd.rank(), hvd.size()
    if config.pin_cores:  # before TensorFlow starts its thread pools
        process.pin_cores(config.pin_cores, hvd.local_rank(), hvd.local_size())
    # Horovod: pin one GPU per process (its local rank), growing memory as needed.
    process.pin_gpu(hvd.local_rank())
    with process.compute_policy(config.precision, config.xla):  # for this run only
        # Horovod: each rank reads its own shard of every split.
        data = RankData(config, rank, ranks)
        checkpoints.refuse_overwrite(config)
        started = time.perf_counter()
        tf.keras.utils.set_random_seed(config.seed)  # the same initial weights on every rank
        model = build_model(config.model, config.image_size, config.weights)
        # Horovod: scale the learning rate by the number of ranks (the global batch grows).
        lr = config.learning_rate * (ranks if config.scale_lr else 1)
        optimizer = _optimizer(lr, ranks)
        loss = tf.keras.losses.BinaryCrossentropy()
        model.compile(optimizer=optimizer, loss=loss, jit_compile=False)  # --xla: auto-clustering
        scorers, split_sizes = split_scorers(model, data, data.evaluated)
        steps = data.steps_per_epoch()  # Horovod: the same on every rank (allgather of shards)
        settings = checkpoints.settings_once(config, ranks, data.metadata)
        resumed = checkpoints.restore(config, rank, model, optimizer, settings)
        if resumed.finished is not None:  # a finished run: trained nothing, wrote nothing
            return dataclasses.replace(resumed.finished, rank=rank)  # rank 0 read it
        # Horovod: broadcast the initial variables (and, on resume, optimizer state) from rank 0
        # before the first step. Not BroadcastGlobalVariablesCallback: it acts after the first
        # step of the first fit() call, so on resume it would copy rank 0's BatchNorm statistics
        # of that step to the others, where an uninterrupted run did not.
        hvd_tf.broadcast_variables(model.variables, root_rank=0)
        if optimizer.variables():
            hvd_tf.broadcast_variables(optimizer.variables(), root_rank=0)
        # Horovod: average metrics, warm the LR up; only rank 0 checkpoints, logs and prints.
        callbacks, throughput = _callbacks(
            config, lr, steps, model, optimizer, resumed, scorers, settings
        )
        with _naming_bad_images(config):  # a file that does not decode, named
            _fit_epochs(config, model, data, callbacks, steps, resumed.start_epoch)
            test = scorers["test"]() if scorers else None
        record = run_metrics(
            config, model, throughput, resumed, lr, steps, split_sizes, test, started
        )
        if rank == 0:  # Horovod: only rank 0 writes results
            write_outputs(Path(config.out), config, record)
        return record


def _optimizer(lr: float, ranks: int):
    """Adam; Horovod: wrapped so gradients are averaged over ranks by allreduce.

    One rank has nothing to average, and the wrapper would still add a conditional
    per variable to every step, so it trains with plain Adam (the same variables:
    checkpoints move between rank counts).
    """
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    optimizer = tf.keras.optimizers.Adam(lr)
    return hvd.DistributedOptimizer(optimizer) if ranks > 1 else optimizer


def _horovod_callbacks(config: TrainConfig, lr, steps: int, talk: int) -> list:
    """Horovod's callbacks; none at one rank, where both are no-ops and the warm-up
    would still act every step."""
    import horovod.tensorflow.keras as hvd

    if hvd.size() == 1:
        return []
    return [
        # Horovod: average metrics among ranks at the end of every epoch.
        hvd.callbacks.MetricAverageCallback(),
        # Horovod: ramp the LR up to lr (= base x ranks) over the first epochs (large-batch
        # warm-up).
        hvd.callbacks.LearningRateWarmupCallback(
            initial_lr=lr, warmup_epochs=config.warmup_epochs, steps_per_epoch=steps, verbose=talk
        ),
    ]


def _callbacks(config: TrainConfig, lr, steps, model, optimizer, resumed, scorers, settings):
    """The run's Keras callbacks in the order they run, and its throughput callback.

    Horovod's come first, as in its Keras example (at more than one rank). ``resumed``
    (a checkpoints.Resumed) holds the history and plateau state to go on from; ``scorers``
    (evaluate.split_scorers)
    is empty without evaluation; ``settings`` is what each checkpoint records for --resume.
    The evaluation appends each epoch's record to the history before TensorBoard
    and the checkpoint read it; the checkpoint saves the plateau's counters after
    they change.
    """
    import horovod.tensorflow.keras as hvd

    # here: it loads TensorFlow; importing this module does not
    from chexlib.train import callbacks as train_callbacks

    c, rank, history = config, hvd.rank(), resumed.history
    talk = int(rank == 0 and c.verbose > 0)  # Horovod: only rank 0 reports LR changes
    throughput = train_callbacks.ThroughputCallback(
        c.batch_size, c.throughput_warmup_steps, c.throughput_window_steps, c.paired_synthetic
    )
    plateau = train_callbacks.PlateauCallback(
        c.warmup_epochs,
        monitor="val_loss",
        factor=c.plateau_factor,
        patience=c.plateau_patience,
        verbose=talk,
    )
    if resumed.plateau is not None:  # its counters go on from the checkpoint
        plateau.set_state(resumed.plateau)
    callbacks = [
        *_horovod_callbacks(c, lr, steps, talk),
        throughput,
        train_callbacks.EvaluationCallback(history, hvd.size(), throughput, scorers.get("val")),
        # NaN or inf loss: stop before the checkpoint (the same on every rank, averaged)
        train_callbacks.DivergenceCallback(Path(c.out)),
    ]
    if scorers:  # needs val_loss; after warm-up, on the (identical) gathered val loss
        callbacks.append(plateau)
    if rank == 0 and c.tensorboard:  # Horovod: only rank 0 writes TensorBoard files
        profile = parse_profile_steps(c.profile_steps)
        callbacks.append(
            train_callbacks.TensorBoardCallback(history, c.tensorboard, profile, steps)
        )
    # Horovod: only rank 0 writes checkpoints, so ranks never overwrite each other.
    if rank == 0 and c.checkpoint:
        run = {"config": c, "ranks": hvd.size(), "settings": settings}  # recorded with each
        save = train_callbacks.CheckpointCallback
        callbacks.append(save(Path(c.out), model, optimizer, plateau, history, **run))
    if rank == 0 and c.verbose:  # Horovod: only rank 0 prints progress
        callbacks.append(train_callbacks.EpochProgbar(c.epochs))
    fault = parse_fault(os.environ.get(FAULT_ENV), rank)
    if fault:
        callbacks.append(train_callbacks.FaultInjectionCallback(*fault, FAULT_ENV, FAULT_EXIT_CODE))
    return callbacks, throughput


def _fit_epochs(config: TrainConfig, model, data: RankData, callbacks, steps: int, start: int):
    """Train epochs ``start`` .. ``--epochs`` - 1 (0-based), one Keras ``fit()`` per epoch.

    One fit() per epoch: each epoch's dataset is seeded by (seed, epoch), so a
    resumed run sees the same batches as an uninterrupted one.
    """
    import horovod.tensorflow.keras as hvd

    # here: it loads TensorFlow; importing this module does not
    from chexlib.train.callbacks import TensorBoardCallback, untimed_steps

    if hvd.rank() == 0:  # Horovod: only rank 0 writes (the run folder exists from now on)
        Path(config.out).mkdir(parents=True, exist_ok=True)
    try:
        for epoch in range(start, config.epochs):
            untimed = untimed_steps(config.throughput_warmup_steps, steps, epoch - start)
            model.fit(
                data.train(epoch, untimed),
                steps_per_epoch=steps,
                initial_epoch=epoch,
                epochs=epoch + 1,
                callbacks=callbacks,
                verbose=config.verbose if hvd.rank() == 0 else 0,
            )
    finally:
        for callback in callbacks:  # a profiler trace cut short is still written
            if isinstance(callback, TensorBoardCallback):
                callback.stop_profiler()

"""The Keras callbacks of a training run, and the throughput accounting they feed.

Imported only when a run starts (it imports TensorFlow), by :mod:`chexlib.train.recipe`.
Each callback is given the values it reads or updates (the model, the
optimizer, the run's history list, a scorer), never the run as an object.

Throughput: the first ``throughput_warmup_steps`` steps of the run (compilation,
pipeline start-up) are not timed, nor is the first step of each later epoch
(evaluation and checkpointing happen between epochs, and a new epoch starts
its input iterator). Every other step is timed, from the end of the step
before it to its own end, and the timed steps are grouped into windows of
``throughput_window_steps``. A run's images/s is the median over windows;
when no full window exists, the rate over what was timed is reported with a
note (and, failing that, the rate over the warm-up steps), never nothing.

With ``--paired-synthetic`` the dataset alternates real and synthetic windows
by step count within each epoch (:func:`chexlib.train.inputs.paired_with_synthetic`);
its windows then restart at each epoch, after :func:`untimed_steps` steps,
so the callback's windows are exactly the dataset's.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

from chexlib.data.metadata import LABELS
from chexlib.train.checkpoints import last_checkpoint, save_checkpoint
from chexlib.train.evaluate import sync_moving_statistics

# --- throughput accounting (pure functions) --------------------------------------------


def untimed_steps(warmup_steps: int, steps_per_epoch: int, epochs_before: int) -> int:
    """Steps at the start of an epoch that are not timed.

    Args:
        warmup_steps: the run's warm-up (``throughput_warmup_steps``).
        steps_per_epoch: steps of every epoch.
        epochs_before: epochs this process already trained (0 for its first).

    Returns:
        What is left of the warm-up, and at least 1: an epoch's first step has
        no step end before it to be timed from.
    """
    return max(1, warmup_steps - epochs_before * steps_per_epoch)


def full_windows(steps: list[tuple], window: int, per_epoch: bool) -> list[tuple]:
    """Group timed steps into full windows.

    Args:
        steps: ``(epoch, step in epoch, seconds)`` of every timed step, in order.
        window: steps per window.
        per_epoch: windows restart at each epoch (paired runs); else they run on
            across epochs.

    Returns:
        ``(epoch, index, seconds)`` of each full window: ``index`` counts the
        windows of its epoch (``per_epoch``) or of the run; a window spanning
        epochs carries the epoch it ends in.
    """
    out, count, seconds, index, current = [], 0, 0.0, 0, None
    for epoch, _, dt in steps:
        if per_epoch and epoch != current:
            count, seconds, index, current = 0, 0.0, 0, epoch
        count, seconds = count + 1, seconds + dt
        if count == window:
            out.append((epoch, index, seconds))
            count, seconds, index = 0, 0.0, index + 1
    return out


def measured_rates(
    timed: list[tuple],
    warm: list[tuple],
    batch_size: int,
    window: int,
    paired: bool = False,
) -> tuple[list[float], list[int], str | None]:
    """Images/s of one rank from its step times: full windows, else what was timed.

    Args:
        timed: ``(epoch, step in epoch, seconds)`` of each timed step.
        warm: the same for warm-up steps that had a step end before them.
        batch_size: images per step.
        window: steps per window.
        paired: windows alternate real (even index) / synthetic per epoch.

    Returns:
        ``(rates, window_indices, note)``: one rate per full window (all windows,
        real and synthetic, when ``paired``) and no note; else one rate over the
        timed steps (all real when paired: no window 1 ever started), or over the
        warm-up steps, with a note saying so; ``([], [], note)`` when no step could
        be timed.
    """
    windows = full_windows(timed, window, per_epoch=paired)
    if windows:
        return [window * batch_size / s for _, _, s in windows], [i for _, i, _ in windows], None
    for steps, what in ((timed, "timed steps"), (warm, "warm-up steps (no step after warm-up)")):
        seconds = sum(dt for _, _, dt in steps)
        if steps and seconds > 0:
            note = f"no full window of {window} steps: rate over {len(steps)} {what}"
            return [len(steps) * batch_size / seconds], [0], note
    return [], [], "no step could be timed (only the first step of each epoch ran)"


def throughput_summary(rates: list[float], note: str | None = None) -> dict:
    """Median and spread of window rates (images/s); ``ci95`` = 1.96 x std as Horovod reports.

    A rate that is not a full window (``note`` set) counts as no window: ``windows``
    is 0 and the spread is None.
    """
    if not rates:
        return {"windows": 0, "median": None, "mean": None, "std": None, "ci95": None, "note": note}
    r = np.asarray(rates, dtype=np.float64)
    full = note is None
    return {
        "windows": len(r) if full else 0,
        "median": float(np.median(r)),
        "mean": float(r.mean()),
        "std": float(r.std()) if full else None,
        "ci95": float(1.96 * r.std()) if full else None,
        "min": float(r.min()),
        "max": float(r.max()),
        "note": note,
    }


def paired_summary(rates: list[float], indices: list[int]) -> dict:
    """Real/synthetic from alternating windows: each real window k (even) with
    the synthetic window k + 1 of the same epoch that follows it."""
    import itertools

    ratios, real, synth = [], [], []
    for (i, a), (j, b) in itertools.pairwise(zip(indices, rates, strict=True)):
        if i % 2 == 0 and j == i + 1:
            ratios.append(a / b)
            real.append(a)
            synth.append(b)
    if not ratios:
        return {"pairs": 0, "ratio_median": None, "real_median": None, "synthetic_median": None}
    return {
        "pairs": len(ratios),
        "ratio_median": float(np.median(ratios)),
        "ratio_min": float(np.min(ratios)),
        "ratio_max": float(np.max(ratios)),
        "real_median": float(np.median(real)),
        "synthetic_median": float(np.median(synth)),
    }


def real_rates(rates: list[float], indices: list[int], note: str | None, paired: bool) -> list:
    """The rates of real input: with ``paired``, the even windows (a fallback rate is real)."""
    if not paired or note is not None:
        return rates
    return [r for r, i in zip(rates, indices, strict=True) if i % 2 == 0]


# --- callbacks ---------------------------------------------------------------------------


class ThroughputCallback(tf.keras.callbacks.Callback):
    """Step times of this rank (see the module docstring for what is timed).

    A callback that overrides batch hooks makes Keras fetch the loss each step,
    so each step has finished when its end is timed.
    """

    def __init__(self, batch_size: int, warmup_steps: int, window_steps: int, paired=False):
        super().__init__()
        self.batch_size, self.warmup, self.window = batch_size, warmup_steps, window_steps
        self.paired = paired
        self.timed: list[tuple] = []  # (epoch, step in epoch, seconds) of each timed step
        self.warm: list[tuple] = []  # the same for warm-up steps
        self.steps_seen, self.epoch, self.last = 0, 0, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.last = epoch, None  # an epoch's first step is not timed

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        last, self.last = self.last, now
        self.steps_seen += 1
        if last is not None:
            (self.warm if self.steps_seen <= self.warmup else self.timed).append(
                (self.epoch, batch, now - last)
            )

    def result(self, epoch: int | None = None) -> tuple[list[float], list[int], str | None]:
        """:func:`measured_rates` of the run so far, or of one epoch."""

        def pick(steps):
            return [s for s in steps if epoch is None or s[0] == epoch]

        return measured_rates(
            pick(self.timed), pick(self.warm), self.batch_size, self.window, self.paired
        )

    def epoch_rate(self, epoch: int) -> float | None:
        """Images/s of real input in one epoch: the median of its windows (or its fallback)."""
        rates = real_rates(*self.result(epoch), paired=self.paired)
        return float(np.median(rates)) if rates else None


class EvaluationCallback(tf.keras.callbacks.Callback):
    """Validation AUROC and loss each epoch (all ranks), and the per-epoch history.

    Args:
        history: the run's per-epoch records; one is appended each epoch.
        ranks: the number of Horovod ranks.
        throughput: this rank's step times (for the epoch's images/s).
        score_val: scores the model on the validation split
            (:func:`chexlib.train.evaluate.split_scorers`); None: no evaluation.
    """

    def __init__(
        self,
        history: list[dict],
        ranks: int,
        throughput: ThroughputCallback,
        score_val: Callable[[], dict] | None = None,
    ):
        super().__init__()
        self.history, self.ranks, self.throughput = history, ranks, throughput
        self.score_val = score_val

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        import horovod.tensorflow as hvd_tf

        logs = logs if logs is not None else {}
        train_seconds = time.perf_counter() - self.start
        sync_moving_statistics(self.model, self.ranks)
        record = {
            "epoch": epoch + 1,
            "loss": None if logs.get("loss") is None else float(logs["loss"]),
            "lr": float(tf.keras.backend.get_value(self.model.optimizer.learning_rate)),
        }
        if self.score_val is not None:
            result = self.score_val()
            logs["val_loss"] = result["loss"]
            logs["val_mean_auroc"] = _nan(result["mean_auroc"])
            record.update(
                val_loss=result["loss"],
                val_mean_auroc=result["mean_auroc"],
                val_auroc=result["auroc"],
                val_auroc_reasons=result["auroc_reasons"],
            )
        rate = self.throughput.epoch_rate(epoch)
        # Horovod: every rank's rate of this epoch, for the job's images/s.
        rates = hvd_tf.allgather_object(rate) if self.ranks > 1 else [rate]
        record.update(
            train_seconds=train_seconds,
            eval_seconds=time.perf_counter() - self.start - train_seconds,
            images_per_sec_rank=rate,
            images_per_sec=float(sum(rates)) if all(r is not None for r in rates) else None,
        )
        self.history.append(record)


class PlateauCallback(tf.keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau that starts after warm-up and whose state survives resume.

    Warm-up sets the LR every step until it ends, so a plateau decision
    before then would be overwritten; its counters are checkpointed.
    """

    def __init__(self, warmup_epochs: int, **kwargs):
        super().__init__(**kwargs)
        self.warmup_epochs, self.restored = warmup_epochs, None

    def on_train_begin(self, logs=None):
        if self.restored is None:  # fit() is called per epoch: reset once, not every call
            super().on_train_begin(logs)
            self.restored = self.get_state()

    def on_epoch_end(self, epoch, logs=None):
        if epoch >= self.warmup_epochs:
            super().on_epoch_end(epoch, logs)

    def get_state(self) -> dict:
        """Counters for the checkpoint; ``best`` is None until a first value (JSON has no inf)."""
        best = float(self.best)
        return {
            "wait": int(self.wait),
            "best": best if np.isfinite(best) else None,
            "cooldown_counter": int(self.cooldown_counter),
        }

    def set_state(self, state: dict) -> None:
        self._reset()  # best = +-inf for the mode, replaced only by a recorded value
        self.wait = state["wait"]
        if state["best"] is not None:
            self.best = state["best"]
        self.cooldown_counter = state["cooldown_counter"]
        self.restored = state


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and the checkpoint kept."""


class DivergenceCallback(tf.keras.callbacks.Callback):
    """Stop the run when an epoch's loss or validation loss is NaN or infinite.

    Checked at the epoch's end, after :class:`EvaluationCallback` and Horovod's
    metric averaging (so every rank sees the same values and stops at the same
    point, where a per-step check on one rank's loss would leave the others
    waiting in the next allreduce), and before :class:`CheckpointCallback`: the
    diverged epoch is never checkpointed and the last good checkpoint stays.

    Raises:
        TrainingDiverged: one line, naming the epoch, the values and the checkpoint kept.
    """

    def __init__(self, out: Path):
        super().__init__()
        self.out = out

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        bad = {
            key: float(logs[key])
            for key in ("loss", "val_loss")
            if logs.get(key) is not None and not math.isfinite(float(logs[key]))
        }
        if bad:
            values = ", ".join(f"{key} {value}" for key, value in bad.items())
            raise TrainingDiverged(
                f"training diverged in epoch {epoch + 1} ({values}); epoch {epoch + 1} was not "
                f"checkpointed and {last_checkpoint(self.out)}; lower --learning-rate and "
                "start a new run (another --out)"
            )


class CheckpointCallback(tf.keras.callbacks.Callback):
    """Rank 0: a complete checkpoint after every epoch (:func:`save_checkpoint`).

    Args:
        out: the run folder.
        model, optimizer: what is saved (the optimizer passed to ``compile``, not
            ``model.optimizer``: under mixed precision that is Keras' loss-scale wrapper).
        plateau: the run's :class:`PlateauCallback`, whose counters are saved (so this
            callback comes after it).
        history: the run's per-epoch records (after :class:`EvaluationCallback`).
        config, ranks, settings: recorded with each checkpoint (:func:`save_checkpoint`).
    """

    def __init__(
        self, out: Path, model, optimizer, plateau, history: list[dict], *, config, ranks, settings
    ):
        super().__init__()
        self.out, self.saved_model, self.optimizer = out, model, optimizer
        self.plateau, self.history = plateau, history
        self.recorded = {"config": config, "ranks": ranks, "settings": settings}

    def on_epoch_end(self, epoch, logs=None):
        save_checkpoint(
            self.out,
            epoch + 1,
            model=self.saved_model,
            optimizer=self.optimizer,
            plateau=self.plateau.get_state(),
            history=self.history,
            **self.recorded,
        )


class TensorBoardCallback(tf.keras.callbacks.Callback):
    """Rank 0: per-epoch scalars for TensorBoard, and a profiler trace of some steps.

    Scalars (step = epoch, 1-based): ``loss``, ``learning_rate``, ``val_loss``,
    ``val_mean_auroc``, ``val_auroc/<label>`` (defined classes), ``images_per_sec``
    (all ranks) and ``images_per_sec_per_rank``; read from the epoch's record in
    ``history``, so it must come after :class:`EvaluationCallback`.

    ``profile`` = (first, last): steps of the run, 1-based, counted over all
    epochs (a resumed run goes on counting), traced by the TF profiler into
    ``logdir/plugins/profile/<time>/`` (TensorBoard's profile tab).
    """

    def __init__(
        self,
        history: list[dict],
        logdir: str,
        profile: tuple[int, int] | None,
        steps_per_epoch: int,
    ):
        super().__init__()
        self.history, self.logdir, self.profile = history, logdir, profile
        self.steps_per_epoch, self.tracing = steps_per_epoch, False
        self.writer = tf.summary.create_file_writer(logdir)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        step = self.epoch * self.steps_per_epoch + batch + 1
        if self.profile and step == self.profile[0] and not self.tracing:
            tf.profiler.experimental.start(self.logdir)
            self.tracing = True

    def on_train_batch_end(self, batch, logs=None):
        step = self.epoch * self.steps_per_epoch + batch + 1
        if self.tracing and step >= self.profile[1]:
            self.stop_profiler()

    def stop_profiler(self) -> None:
        """Write the trace (also when training ends before the last profiled step)."""
        if self.tracing:
            tf.profiler.experimental.stop()
            self.tracing = False

    def on_epoch_end(self, epoch, logs=None):
        record = self.history[-1]
        scalars = {
            "loss": record.get("loss"),
            "learning_rate": record.get("lr"),
            "val_loss": record.get("val_loss"),
            "val_mean_auroc": record.get("val_mean_auroc"),
            "images_per_sec": record.get("images_per_sec"),
            "images_per_sec_per_rank": record.get("images_per_sec_rank"),
        }
        for label in LABELS:
            scalars[f"val_auroc/{label}"] = (record.get("val_auroc") or {}).get(label)
        with self.writer.as_default():
            for name, value in scalars.items():
                if value is not None:
                    tf.summary.scalar(name, value, step=epoch + 1)
        self.writer.flush()


class FaultInjectionCallback(tf.keras.callbacks.Callback):
    """TEST HOOK: exit this rank abruptly at a given (epoch, step), like a crash."""

    def __init__(self, epoch: int, step: int, env: str, code: int):
        super().__init__()
        self.at, self.epoch, self.env, self.code = (epoch, step), -1, env, code

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            print(
                f"chexlib train: {self.env}: rank exits with status {self.code} "
                f"at epoch {self.epoch} step {batch} (fault injection)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(self.code)


class EpochProgbar(tf.keras.callbacks.ProgbarLogger):
    """Keras' progress bar, but "Epoch 3/10" counts the run's epochs (fit() runs one at a time)."""

    def __init__(self, epochs: int):
        super().__init__(count_mode="steps")
        self.total_epochs = epochs

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.total_epochs


def _nan(value) -> float:
    return float("nan") if value is None else float(value)

"""CheXNet training with Horovod: correct, measured, resumable.

:func:`train` is what every Horovod rank runs. It reads in the order of
Horovod's Keras example, and each line that exists only for distribution
carries a ``# Horovod:`` comment:

1. ``hvd.init()``; one GPU per local rank with memory growth (when GPUs exist);
2. the learning rate scaled by the number of ranks (``--no-scale-lr`` turns
   it off) and warmed up over ``--warmup-epochs``;
3. ``hvd.DistributedOptimizer`` around Adam (gradients averaged by allreduce);
4. callbacks: broadcast of the initial variables from rank 0, metric
   averaging, LR warm-up, then ReduceLROnPlateau on the validation loss;
5. data sharded by rank; steps per epoch from the shard size;
6. only rank 0 logs, checkpoints and writes results.

Evaluation: every rank predicts its shard of the validation split, the
predictions are gathered (``hvd.allgather``), so each image counts exactly
once (checked against the split size), and the per-class AUROC (scikit-learn)
and their mean are computed each epoch; the test split is evaluated at the end.
A class with only one label value in a split has no AUROC: it is recorded as
None with the reason.

Throughput: :class:`ThroughputCallback` times windows of steps after the
first steps of each epoch (compilation, pipeline start-up) and reports the
median and spread per rank and in total, like Horovod's synthetic benchmark.
``--synthetic`` replaces the input pipeline with one repeated random batch:
the model's ceiling in the same configuration.

Fault tolerance: rank 0 writes a checkpoint after every epoch (model,
optimizer, LR-schedule state and history; written to a temporary folder and
renamed, so a crash never leaves half a checkpoint). ``--resume`` continues
after the last complete epoch. Each epoch's data order and flips depend only
on (seed, epoch), so a resumed run repeats what an uninterrupted run would
have done, up to floating-point noise (bit-exact order needs
``--deterministic``; the optimized pipeline is non-deterministic by default,
as in the official recipe). A rank that dies makes ``horovodrun`` /
``horovod.run`` stop the others and exit non-zero.

Test hook (fault injection, for tests only): the environment variable
``CHEXLIB_FAULT_INJECT="rank=R,epoch=E,step=S"`` makes rank R exit with
status 17 at step S of epoch E (0-based), as a crashed rank would.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chexlib.data import LABELS
from chexlib.reference import (
    CHEXNET_MEAN_AUROC,
    CHEXNET_TEST_AUROC,
    POSTER_MEAN_AUROC,
    POSTER_VAL_AUROC,
)

FAULT_ENV = "CHEXLIB_FAULT_INJECT"
FAULT_EXIT_CODE = 17
CHECKPOINTS = "checkpoints"


def _opt(help_text: str, **kwargs):
    return field(metadata={"help": help_text}, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """One training run; every field is a ``chexlib train`` flag (``_`` -> ``-``)."""

    out: str = _opt(
        "run folder: checkpoints, params.json, metrics.json, CSVs", default="outputs/train"
    )
    data: str | None = _opt(
        "dataset folder in the NIH layout (source raw; split sizes for records)", default=None
    )
    records: str | None = _opt(
        "TFRecord folder made by `chexlib convert` (source records)", default=None
    )
    source: str = _opt("input: raw PNG files or TFRecords", default="raw")
    pipeline: str = _opt("tf.data pipeline: naive or optimized", default="optimized")
    model: str = _opt(
        "densenet121, resnet50, tiny (a small test/teaching CNN), or standin (the same small "
        "CNN standing in for a fast accelerator: cheaper per image than the PNG decode)",
        default="densenet121",
    )
    weights: str = _opt(
        "none | imagenet (Keras cache) | /path/notop.h5 | chexlib run folder", default="none"
    )
    image_size: int = _opt("input side in pixels", default=224)
    batch_size: int = _opt("images per batch PER RANK", default=16)
    epochs: int = _opt("epochs in all (a resumed run continues up to this)", default=3)
    steps_per_epoch: int | None = _opt(
        "cap on steps per epoch; None: the smallest rank shard / batch", default=None
    )
    learning_rate: float = _opt(
        "Adam learning rate for ONE rank (scaled by ranks, see --scale-lr)", default=1e-3
    )
    scale_lr: bool = _opt("multiply the learning rate by the number of ranks", default=True)
    warmup_epochs: int = _opt("epochs of Horovod LR warm-up from lr to lr x ranks", default=5)
    plateau_factor: float = _opt("ReduceLROnPlateau factor on validation loss", default=0.1)
    plateau_patience: int = _opt("ReduceLROnPlateau patience in epochs", default=1)
    mixed_precision: bool = _opt("mixed_float16 compute (float32 head and loss)", default=False)
    xla: bool = _opt("XLA auto-clustering of the training step", default=False)
    synthetic: bool = _opt(
        "train on one repeated random batch: the throughput ceiling", default=False
    )
    paired_synthetic: bool = _opt(
        "BENCHMARK ONLY: alternate timed windows between the real input and one repeated "
        "random batch in the same process (real/synthetic without run-to-run noise); "
        "half the steps train on random data, so no evaluation",
        default=False,
    )
    resume: bool = _opt("continue from the last complete epoch in --out", default=False)
    seed: int = _opt("seed of weights, data order and flips (per epoch: seed, epoch)", default=0)
    deterministic: bool = _opt(
        "deterministic tf.data order (slower; bit-reproducible runs)", default=False
    )
    pin_cores: int = _opt(
        "0: no pinning; N: each rank on its own N cores (local rank r: the r-th block of N), "
        "TensorFlow's intra/inter-op threads = N",
        default=0,
    )
    data_service: str | None = _opt(
        "grpc://host:port of a tf.data service dispatcher", default=None
    )
    val_fraction: float = _opt("fraction of train_val moved to validation, by patient", default=0.1)
    evaluate: bool = _opt("per-class AUROC on val each epoch and on test at the end", default=True)
    checkpoint: bool = _opt("write a checkpoint after every epoch (rank 0)", default=True)
    throughput_warmup_steps: int = _opt(
        "steps of each epoch not timed (compilation, start-up)", default=10
    )
    throughput_window_steps: int = _opt("steps per timed throughput window", default=10)
    verbose: int = _opt(
        "Keras progress on rank 0: 0 silent, 1 bar, 2 one line per epoch", default=1
    )

    def __post_init__(self):
        from chexlib.models import MODELS

        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(f"TrainConfig: {message}")

        check(
            self.source in ("raw", "records"), f"source must be raw or records, not {self.source!r}"
        )
        check(
            self.pipeline in ("naive", "optimized"),
            f"pipeline must be naive or optimized, not {self.pipeline!r}",
        )
        check(self.model in MODELS, f"model must be one of {MODELS}, not {self.model!r}")
        check(self.pin_cores >= 0, f"pin_cores must be >= 0, not {self.pin_cores}")
        check(self.image_size >= 32, f"image_size must be >= 32, not {self.image_size}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, not {self.batch_size}")
        check(self.epochs >= 1, f"epochs must be >= 1, not {self.epochs}")
        check(
            self.steps_per_epoch is None or self.steps_per_epoch >= 1,
            "steps_per_epoch must be >= 1",
        )
        check(self.learning_rate > 0, f"learning_rate must be > 0, not {self.learning_rate}")
        check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, not {self.warmup_epochs}")
        check(
            0 < self.plateau_factor < 1,
            f"plateau_factor must be in (0, 1), not {self.plateau_factor}",
        )
        check(
            self.throughput_warmup_steps >= 0 and self.throughput_window_steps >= 1,
            "throughput_warmup_steps must be >= 0 and throughput_window_steps >= 1",
        )
        check(
            not (self.synthetic and self.paired_synthetic),
            "--paired-synthetic already alternates with synthetic data; drop --synthetic",
        )
        if not self.synthetic:
            check(self.source != "raw" or self.data, "source raw needs --data DATA_DIR")
            check(self.source != "records" or self.records, "source records needs --records DIR")
        else:
            check(
                self.data or self.records or self.steps_per_epoch,
                "--synthetic without data needs --steps-per-epoch",
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- command line ------------------------------------------------------------

_TYPES = {"str": str, "str | None": str, "int": int, "int | None": int, "float": float}
_CHOICES = {"source": ("raw", "records"), "pipeline": ("naive", "optimized"), "verbose": (0, 1, 2)}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, with its default and help."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        else:
            parser.add_argument(
                flag,
                type=_TYPES[f.type],
                default=f.default,
                choices=_choices(f.name),
                help=help_text,
            )


def _choices(name: str):
    from chexlib.models import MODELS

    return MODELS if name == "model" else _CHOICES.get(name)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def config_to_argv(config: TrainConfig) -> list[str]:
    """The ``chexlib train`` flags that reproduce ``config`` (non-default fields only)."""
    argv = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def run_train(args: argparse.Namespace) -> int:
    """``chexlib train``: one Horovod rank (run it under horovodrun for N ranks)."""
    from chexlib.data import DataError
    from chexlib.models import WeightsError

    try:
        config = config_from_args(args)
        metrics = train(config)
    except (ValueError, DataError, WeightsError, FileExistsError, FileNotFoundError) as err:
        print(f"chexlib train: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a peer's failure surfaces here; say so, exit non-zero
        if type(err).__name__ == "HorovodInternalError":
            print(
                f"chexlib train: a Horovod collective failed (another rank died?): {err}",
                file=sys.stderr,
            )
            return 1
        raise
    if metrics.get("rank", 0) == 0:
        print(summary_text(metrics))
    return 0


# --- data for one rank -----------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """The data seed of one epoch: a function of (seed, epoch) only, so resume repeats it."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


class RankData:
    """The datasets and split sizes one Horovod rank uses."""

    def __init__(self, config: TrainConfig, rank: int, size: int):
        from chexlib.models import PIPELINE_MODEL

        self.config, self.rank, self.size = config, rank, size
        self.metadata = None
        if config.data and config.source == "raw":
            from chexlib.data import load_metadata

            self.metadata = load_metadata(config.data, val_fraction=config.val_fraction)
        self.common = {
            "metadata": self.metadata,
            "records_dir": config.records if config.source == "records" else None,
            "pipeline": config.pipeline,
            "batch_size": config.batch_size,
            "image_size": config.image_size,
            "model": PIPELINE_MODEL[config.model],
            "num_shards": size,
            "shard_index": rank,
        }
        self.has_data = not config.synthetic or bool(config.data or config.records)

    def split_size(self, split: str) -> int:
        """Images in ``split`` (all ranks together)."""
        return self.shard_size(split, num_shards=1, shard_index=0)

    def shard_size(
        self, split: str, num_shards: int | None = None, shard_index: int | None = None
    ) -> int:
        """Images of ``split`` one rank reads per pass (default: this rank)."""
        from chexlib import pipeline

        n = self.size if num_shards is None else num_shards
        i = self.rank if shard_index is None else shard_index
        if self.config.source == "records":
            counts = _manifest_shard_records(self.config.records, split)
            if counts is not None:  # the manifest knows: no need to read every record
                return _records_shard_size(counts, n, i)
        return pipeline.count_examples(
            self.config.source,
            split,
            metadata=self.metadata,
            records_dir=self.common["records_dir"],
            num_shards=n,
            shard_index=i,
        )

    def train(self, epoch: int):
        """Training batches of one epoch; order and flips depend on (seed, epoch) only."""
        from chexlib import pipeline

        if self.config.synthetic:
            return pipeline.synthetic_dataset(
                self.config.batch_size, self.config.image_size, seed=self.config.seed
            )
        real = pipeline.build_dataset(
            self.config.source,
            "train",
            training=True,
            seed=epoch_seed(self.config.seed, epoch),
            deterministic=True if self.config.deterministic else None,
            data_service=self.config.data_service,
            **self.common,
        )
        return paired_with_synthetic(real, self.config) if self.config.paired_synthetic else real

    def evaluation(self, split: str):
        """Every image of this rank's part of ``split`` once (the last batch may be smaller)."""
        from chexlib import pipeline

        return pipeline.build_dataset(self.config.source, split, training=False, **self.common)


def paired_with_synthetic(real, config: TrainConfig):
    """Warm-up steps from ``real``, then windows alternating ``real`` / synthetic.

    Window k after warm-up (``throughput_window_steps`` steps each) is real for
    even k and synthetic for odd k, so :class:`ThroughputCallback` windows pair
    up. Adjacent windows share the machine's state of the moment, which cancels
    the slow drifts that make separate runs differ by 10 % or more here.
    """
    import tensorflow as tf

    from chexlib import pipeline

    synthetic = pipeline.synthetic_dataset(config.batch_size, config.image_size, seed=config.seed)
    w = config.throughput_window_steps
    warmup = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat(
        config.throughput_warmup_steps
    )
    pairs = tf.data.Dataset.from_tensor_slices(tf.constant([0] * w + [1] * w, tf.int64)).repeat()
    return tf.data.Dataset.choose_from_datasets([real, synthetic], warmup.concatenate(pairs))


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


def _manifest_shard_records(records_dir, split: str) -> list[int] | None:
    """Records per shard file of ``split``, in file order, from the conversion manifest."""
    from chexlib import records

    try:
        manifest = records.read_manifest(records_dir)
        shards = sorted(
            (s for s in manifest["shards"] if s["split"] == split), key=lambda s: s["file"]
        )
        return [int(s["records"]) for s in shards]
    except (FileNotFoundError, KeyError, TypeError):
        return None


def _records_shard_size(counts: list[int], num_shards: int, shard_index: int) -> int:
    """Records a worker reads, by the pipeline's rule (``chexlib.pipeline._record_items``):
    whole files dealt round-robin when there are at least as many files as workers,
    else every ``num_shards``-th record."""
    if len(counts) >= num_shards:
        return sum(counts[shard_index::num_shards])
    return len(range(shard_index, sum(counts), num_shards))


# --- evaluation ----------------------------------------------------------------


def auroc_per_class(
    labels: np.ndarray, scores: np.ndarray, split: str = "val"
) -> tuple[dict, dict]:
    """Per-class AUROC; undefined ones are None with a reason (never an exception).

    Returns:
        ``({label: auroc or None}, {label: reason})`` for the 14 labels.
    """
    from sklearn.metrics import roc_auc_score

    values, reasons = {}, {}
    for k, label in enumerate(LABELS):
        y, s = labels[:, k], scores[:, k]
        positives = int(y.sum())
        if len(y) == 0:
            values[label], reasons[label] = None, f"no images in {split}"
        elif positives in (0, len(y)):
            kind = "negative" if positives == 0 else "positive"
            values[label], reasons[label] = (
                None,
                f"only {kind} examples in {split} ({len(y)} images)",
            )
        elif not np.all(np.isfinite(s)):
            values[label], reasons[label] = None, "predictions are not finite (training diverged)"
        else:
            values[label] = float(roc_auc_score(y, s))
    return values, reasons


def mean_auroc(values: dict) -> float | None:
    defined = [v for v in values.values() if v is not None]
    return float(np.mean(defined)) if defined else None


def binary_crossentropy(labels: np.ndarray, scores: np.ndarray, eps: float = 1e-7) -> float:
    """Mean BCE over images and classes, clipped like Keras."""
    if len(labels) == 0:
        return float("nan")
    p = np.clip(scores.astype(np.float64), eps, 1 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def evaluate_split(predict, dataset, split: str, expected: int | None) -> dict:
    """Predict this rank's shard, gather all ranks' predictions, score them.

    Every rank returns the same result. ``expected`` (the split size) is checked
    against the gathered count: each image must be counted exactly once.
    """
    import horovod.tensorflow as hvd_tf
    import tensorflow as tf

    scores, labels = [], []
    for images, y in dataset:
        scores.append(predict(images).numpy())
        labels.append(y.numpy())
    scores = np.concatenate(scores) if scores else np.zeros((0, len(LABELS)), np.float32)
    labels = np.concatenate(labels) if labels else np.zeros((0, len(LABELS)), np.float32)
    # Horovod: gather every rank's shard, so each image is scored exactly once.
    scores = hvd_tf.allgather(tf.constant(scores, tf.float32)).numpy()
    labels = hvd_tf.allgather(tf.constant(labels, tf.float32)).numpy()
    if expected is not None and len(scores) != expected:
        raise RuntimeError(f"{split}: evaluated {len(scores)} images, the split has {expected}")
    values, reasons = auroc_per_class(labels, scores, split)
    return {
        "loss": binary_crossentropy(labels, scores),
        "auroc": values,
        "auroc_reasons": reasons,
        "mean_auroc": mean_auroc(values),
        "images": len(scores),
    }


# --- callbacks -------------------------------------------------------------------


def throughput_summary(rates: list[float]) -> dict:
    """Median and spread of window rates (images/s); ``ci95`` = 1.96 x std as Horovod reports."""
    if not rates:
        return {"windows": 0, "median": None, "mean": None, "std": None, "ci95": None}
    r = np.asarray(rates, dtype=np.float64)
    return {
        "windows": len(r),
        "median": float(np.median(r)),
        "mean": float(r.mean()),
        "std": float(r.std()),
        "ci95": float(1.96 * r.std()),
        "min": float(r.min()),
        "max": float(r.max()),
    }


def _make_callbacks():
    """Callback classes (defined here so TensorFlow is imported only when training)."""
    import tensorflow as tf

    class ThroughputCallback(tf.keras.callbacks.Callback):
        """Images/s of this rank over windows of steps, after warm-up steps in each epoch.

        Evaluation and checkpointing happen between epochs, outside every window.
        A callback that overrides batch hooks makes Keras fetch the loss each step,
        so each step has finished when its end is timed.
        """

        def __init__(self, batch_size: int, warmup_steps: int, window_steps: int):
            super().__init__()
            self.batch_size, self.warmup, self.window = batch_size, warmup_steps, window_steps
            self.rates: list[float] = []
            self.window_index: list[int] = []  # each rate's window number within its epoch
            self.epoch_rates: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.step, self.start, self.epoch_rates = 0, None, []
            if self.warmup == 0:
                self.start, self.in_window = time.perf_counter(), 0

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            now = time.perf_counter()
            if self.start is None:
                if self.step >= self.warmup:
                    self.start, self.in_window = now, 0
                return
            self.in_window += 1
            if self.in_window == self.window:
                rate = self.window * self.batch_size / (now - self.start)
                self.rates.append(rate)
                self.window_index.append(len(self.epoch_rates))
                self.epoch_rates.append(rate)
                self.start, self.in_window = now, 0

    class EvaluationCallback(tf.keras.callbacks.Callback):
        """Validation AUROC and loss each epoch (all ranks), and the per-epoch history."""

        def __init__(self, run: _Run):
            super().__init__()
            self.run = run

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            train_seconds = time.perf_counter() - self.start
            self.run.sync_moving_statistics()
            record = {
                "epoch": epoch + 1,
                "loss": _float(logs.get("loss")),
                "lr": float(tf.keras.backend.get_value(self.model.optimizer.learning_rate)),
            }
            if self.run.evaluate:
                result = self.run.evaluate_split("val")
                logs["val_loss"] = result["loss"]
                logs["val_mean_auroc"] = _nan(result["mean_auroc"])
                record.update(
                    val_loss=result["loss"],
                    val_mean_auroc=result["mean_auroc"],
                    val_auroc=result["auroc"],
                    val_auroc_reasons=result["auroc_reasons"],
                )
            rates = self.run.throughput.epoch_rates
            if self.run.config.paired_synthetic:  # odd windows ran on synthetic batches
                rates = rates[0::2]
            record.update(
                train_seconds=train_seconds,
                eval_seconds=time.perf_counter() - self.start - train_seconds,
                images_per_sec_rank=float(np.median(rates)) if rates else None,
            )
            self.run.history.append(record)

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
            return {
                "wait": int(self.wait),
                "best": float(self.best),
                "cooldown_counter": int(self.cooldown_counter),
            }

        def set_state(self, state: dict) -> None:
            self._reset()
            self.wait, self.best = state["wait"], state["best"]
            self.cooldown_counter = state["cooldown_counter"]
            self.restored = state

    class CheckpointCallback(tf.keras.callbacks.Callback):
        """Rank 0: a complete checkpoint after every epoch (see :meth:`_Run.save_checkpoint`)."""

        def __init__(self, run: _Run):
            super().__init__()
            self.run = run

        def on_epoch_end(self, epoch, logs=None):
            self.run.save_checkpoint(epoch + 1)

    class FaultInjectionCallback(tf.keras.callbacks.Callback):
        """TEST HOOK: exit this rank abruptly at a given (epoch, step), like a crash."""

        def __init__(self, epoch: int, step: int):
            super().__init__()
            self.at, self.epoch = (epoch, step), -1

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            if (self.epoch, batch) == self.at:
                print(
                    f"chexlib train: {FAULT_ENV}: rank exits with status {FAULT_EXIT_CODE} "
                    f"at epoch {self.epoch} step {batch} (fault injection)",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(FAULT_EXIT_CODE)

    class EpochProgbar(tf.keras.callbacks.ProgbarLogger):
        """Keras' progress bar, but "Epoch 3/10" counts the run's epochs (fit() runs one at a time)."""

        def __init__(self, epochs: int):
            super().__init__(count_mode="steps")
            self.total_epochs = epochs

        def set_params(self, params):
            super().set_params(params)
            self.epochs = self.total_epochs

    return (
        ThroughputCallback,
        EvaluationCallback,
        PlateauCallback,
        CheckpointCallback,
        FaultInjectionCallback,
        EpochProgbar,
    )


def _float(value) -> float | None:
    return None if value is None else float(value)


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


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


# --- the run ---------------------------------------------------------------------


def train(config: TrainConfig) -> dict:
    """Train CheXNet on this Horovod rank and return the run's metrics.

    Call it on every rank (``horovodrun ... chexlib train``, :func:`chexlib.launch.run`
    or ipyparallel engines); a single process is a job of one rank. Every rank
    returns the same metrics; only rank 0 writes files.
    """
    if config.xla:  # before TensorFlow starts: XLA reads its flags once
        _xla_cpu_flag()
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    # Horovod: initialize Horovod.
    hvd.init()
    if config.pin_cores:  # before TensorFlow starts its thread pools
        _pin(config.pin_cores, hvd.local_rank(), hvd.local_size())
    # Horovod: pin one GPU per process (its local rank), growing memory as needed.
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        try:
            tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
        except RuntimeError:  # an engine training again: its GPU is already pinned
            pass
    if config.mixed_precision:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
    if config.xla:
        # auto-clustering: XLA compiles what it can; Horovod's ops (no XLA kernel) stay in TF
        tf.config.optimizer.set_jit("autoclustering")
    try:
        return _Run(config).fit()
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")  # engines may train again
        if config.xla:
            tf.config.optimizer.set_jit(False)


def _pin(cores_per_rank: int, local_rank: int, local_size: int) -> None:
    """Horovod: this rank on its own block of cores; TensorFlow's threads sized to it."""
    from chexlib import affinity

    cores = affinity.rank_cores(local_rank, local_size, cores_per_rank)
    affinity.pin_process(cores)
    affinity.set_tensorflow_threads(len(cores))


def _cores_now() -> list[int] | None:
    """The cores this process may run on (None where the OS does not say)."""
    from chexlib.affinity import AffinityError, available_cores

    try:
        return available_cores()
    except AffinityError:
        return None


def _xla_cpu_flag() -> None:
    """Let XLA auto-clustering act on CPU too (``--tf_xla_cpu_global_jit``).

    ``jit_compile=True`` on the whole training step fails with Horovod: its
    allreduce has no XLA kernel. Auto-clustering compiles the rest; on CPU it
    needs this flag, which XLA reads from ``TF_XLA_FLAGS`` once, when it first
    starts (so in a process that already ran TensorFlow, set it beforehand).
    """
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if "--tf_xla_cpu_global_jit" not in flags:
        os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_cpu_global_jit".strip()


class _Run:
    """State of one training run on one rank (built by :func:`train`)."""

    def __init__(self, config: TrainConfig):
        import horovod.tensorflow.keras as hvd

        self.config = config
        self.rank, self.size = hvd.rank(), hvd.size()
        self.out = Path(config.out)
        self.history: list[dict] = []
        self.data = RankData(config, self.rank, self.size)
        self.evaluate = (
            config.evaluate
            and self.data.has_data
            and not (config.synthetic or config.paired_synthetic)
        )
        self._check_out_dir()

    # -- set-up ------------------------------------------------------------------

    def _check_out_dir(self) -> None:
        pointer = self.out / CHECKPOINTS / "latest.json"
        if pointer.exists() and not self.config.resume and self.config.checkpoint:
            raise FileExistsError(
                f"{self.out} holds a checkpoint from an earlier run: pass --resume to "
                f"continue it, or choose another --out"
            )

    def steps_per_epoch(self) -> int:
        """Steps every rank takes per epoch: the smallest shard / batch (then the cap)."""
        import horovod.tensorflow as hvd_tf

        if not self.data.has_data:
            return int(self.config.steps_per_epoch)
        # Horovod: all ranks must take the same number of steps (each step is an allreduce).
        shards = hvd_tf.allgather_object(self.data.shard_size("train"))
        steps = min(shards) // self.config.batch_size
        if steps < 1:
            raise ValueError(
                f"train split: the smallest rank shard has {min(shards)} images, fewer than "
                f"--batch-size {self.config.batch_size}; lower the batch size or the ranks"
            )
        return min(steps, self.config.steps_per_epoch or steps)

    def build(self) -> None:
        import horovod.tensorflow.keras as hvd
        import tensorflow as tf

        from chexlib.models import build_model

        c = self.config
        tf.keras.utils.set_random_seed(c.seed)  # the same initial weights on every rank
        self.model = build_model(c.model, c.image_size, c.weights)
        # Horovod: scale the learning rate by the number of ranks (the global batch grows with them).
        self.lr = c.learning_rate * (self.size if c.scale_lr else 1)
        # Horovod: wrap Adam so gradients are averaged over ranks by allreduce.
        self.optimizer = hvd.DistributedOptimizer(tf.keras.optimizers.Adam(self.lr))
        self.model.compile(
            optimizer=self.optimizer, loss=tf.keras.losses.BinaryCrossentropy(), jit_compile=False
        )  # --xla uses auto-clustering instead (see train)
        self.predict = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)
        self.expected = {}
        if self.evaluate:
            self.eval_sets = {s: self.data.evaluation(s) for s in ("val", "test")}
            self.expected = {s: self.data.split_size(s) for s in ("val", "test")}

    def callbacks(self, steps: int) -> list:
        import horovod.tensorflow.keras as hvd

        Throughput, Evaluation, Plateau, Checkpoint, Fault, Progbar = _make_callbacks()
        c = self.config
        self.throughput = Throughput(
            c.batch_size, c.throughput_warmup_steps, c.throughput_window_steps
        )
        self.plateau = Plateau(
            c.warmup_epochs,
            monitor="val_loss",
            factor=c.plateau_factor,
            patience=c.plateau_patience,
            verbose=int(self.rank == 0 and c.verbose > 0),
        )
        callbacks = [
            # Horovod: broadcast initial variable states from rank 0 to all other ranks.
            hvd.callbacks.BroadcastGlobalVariablesCallback(0),
            # Horovod: average metrics among ranks at the end of every epoch.
            hvd.callbacks.MetricAverageCallback(),
            # Horovod: ramp the LR from lr to lr x ranks over the first epochs (large-batch warm-up).
            hvd.callbacks.LearningRateWarmupCallback(
                initial_lr=self.lr,
                warmup_epochs=c.warmup_epochs,
                steps_per_epoch=steps,
                verbose=int(self.rank == 0 and c.verbose > 0),
            ),
            self.throughput,
            Evaluation(self),
        ]
        if self.evaluate:  # needs val_loss; after warm-up, on the (identical) gathered val loss
            callbacks.append(self.plateau)
        # Horovod: only rank 0 writes checkpoints, so ranks never overwrite each other.
        if self.rank == 0 and c.checkpoint:
            callbacks.append(Checkpoint(self))
        if self.rank == 0 and c.verbose:  # Horovod: only rank 0 prints progress
            callbacks.append(Progbar(c.epochs))
        fault = parse_fault(os.environ.get(FAULT_ENV), self.rank)
        if fault:
            callbacks.append(Fault(*fault))
        return callbacks

    # -- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self, epochs_done: int) -> None:
        """Write epoch ``epochs_done`` to a temporary folder, rename it, then move the pointer."""
        import tensorflow as tf

        from chexlib.results import read_json, write_json

        root = self.out / CHECKPOINTS
        name = f"epoch-{epochs_done:04d}"
        tmp = root / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tf.train.Checkpoint(model=self.model, optimizer=self.optimizer).write(str(tmp / "ckpt"))
        state = {
            "epochs_done": epochs_done,
            "dir": name,
            "config": self.config.to_dict(),
            "ranks": self.size,
            "learning_rate": float(tf.keras.backend.get_value(self.optimizer.learning_rate)),
            "plateau": self.plateau.get_state(),
            "history": self.history,
        }
        write_json(tmp / "state.json", state)
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(tmp, root / name)
        previous = (
            read_json(root / "latest.json")["dir"] if (root / "latest.json").exists() else None
        )
        write_json(root / "latest.json", {"dir": name, "epochs_done": epochs_done})
        if previous and previous != name:
            shutil.rmtree(root / previous, ignore_errors=True)

    def restore(self) -> int:
        """Resume: rank 0 loads the last complete checkpoint; returns the first epoch to run."""
        import horovod.tensorflow as hvd_tf

        state, error = None, None
        if self.rank == 0 and self.config.resume:
            try:
                state = self._load_checkpoint()
            except Exception as err:  # every rank must hear of it, not wait in the broadcast
                error = f"--resume: cannot continue from {self.out / CHECKPOINTS}: {err}"
        # Horovod: every rank continues from rank 0's state (or stops with its error).
        state, error = hvd_tf.broadcast_object((state, error), root_rank=0)
        if error:
            raise ValueError(error)
        if state is None:
            if self.config.resume and self.rank == 0:
                print(f"chexlib train: --resume: no checkpoint in {self.out}; starting at epoch 1")
            return 0
        if self.rank != 0:
            self.optimizer.build(self.model.trainable_variables)
        self.optimizer.learning_rate.assign(state["learning_rate"])
        self.plateau.set_state(state["plateau"])
        self.history = list(state["history"])
        if self.rank == 0:
            print(
                f"chexlib train: resumed after epoch {state['epochs_done']} from {self.out / CHECKPOINTS}"
            )
        return int(state["epochs_done"])

    def _load_checkpoint(self) -> dict | None:
        """Rank 0: model and optimizer from the newest complete checkpoint; its state, or None."""
        import tensorflow as tf

        from chexlib.results import read_json

        root = self.out / CHECKPOINTS
        if not (root / "latest.json").exists():
            return None
        latest = read_json(root / "latest.json")
        state = read_json(root / latest["dir"] / "state.json")
        for key in ("model", "image_size", "source", "batch_size"):
            if state["config"][key] != getattr(self.config, key):
                raise ValueError(
                    f"the checkpoint has {key}={state['config'][key]!r}, this run {getattr(self.config, key)!r}"
                )
        self.optimizer.build(self.model.trainable_variables)  # slots must exist to be restored
        checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)
        checkpoint.read(str(root / latest["dir"] / "ckpt")).assert_existing_objects_matched()
        return state

    # -- training ------------------------------------------------------------------------

    def sync_moving_statistics(self) -> None:
        """Average the non-trainable variables (BatchNorm moving mean/variance) over ranks.

        Each rank updates them from its own batches only, so without this the
        ranks would evaluate, and rank 0 would checkpoint, slightly different models.
        """
        import horovod.tensorflow as hvd_tf

        variables = self.model.non_trainable_variables
        if self.size > 1 and variables:
            # Horovod: one grouped allreduce (average) of all moving statistics.
            averaged = hvd_tf.grouped_allreduce([v.value() for v in variables], op=hvd_tf.Average)
            for var, value in zip(variables, averaged, strict=True):
                var.assign(value)

    def weights_digest(self) -> str:
        """sha256 of every model variable: equal on all ranks when they are in sync."""
        import hashlib

        digest = hashlib.sha256()
        for var in self.model.variables:
            digest.update(np.ascontiguousarray(var.numpy()).tobytes())
        return digest.hexdigest()

    def evaluate_split(self, split: str) -> dict:
        return evaluate_split(self.predict, self.eval_sets[split], split, self.expected.get(split))

    def fit(self) -> dict:
        import horovod.tensorflow as hvd_tf

        c = self.config
        started = time.perf_counter()
        self.build()
        steps = self.steps_per_epoch()
        callbacks = self.callbacks(steps)
        start_epoch = self.restore()
        # Horovod: start every rank from rank 0's weights (and, on resume, optimizer state);
        # the broadcast callback alone would only sync after the first step.
        hvd_tf.broadcast_variables(self.model.variables, root_rank=0)
        if self.optimizer.variables():
            hvd_tf.broadcast_variables(self.optimizer.variables(), root_rank=0)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        for epoch in range(start_epoch, c.epochs):
            # One fit() per epoch: each epoch's dataset is seeded by (seed, epoch), so a
            # resumed run sees the same batches as an uninterrupted one.
            self.model.fit(
                self.data.train(epoch),
                steps_per_epoch=steps,
                initial_epoch=epoch,
                epochs=epoch + 1,
                callbacks=callbacks,
                verbose=c.verbose if self.rank == 0 else 0,
            )
        test = self.evaluate_split("test") if self.evaluate else None
        metrics = self.metrics(steps, start_epoch, test, time.perf_counter() - started)
        if self.rank == 0:  # Horovod: only rank 0 writes results
            write_outputs(self.out, self.config, metrics)
        return metrics

    def metrics(self, steps: int, start_epoch: int, test: dict | None, seconds: float) -> dict:
        import horovod.tensorflow as hvd_tf

        from chexlib.results import environment_info

        # Horovod: collect every rank's throughput windows.
        rates, index = self.throughput.rates, self.throughput.window_index
        paired = None
        if self.config.paired_synthetic:  # images/s from the real windows only
            paired = hvd_tf.allgather_object(paired_summary(rates, index))
            rates = [r for r, i in zip(rates, index, strict=True) if i % 2 == 0]
        per_rank = hvd_tf.allgather_object(throughput_summary(rates))
        digests = hvd_tf.allgather_object(self.weights_digest())
        cores = hvd_tf.allgather_object(_cores_now())  # per rank: pinned or not
        medians = [r["median"] for r in per_rank]
        timed = all(m is not None for m in medians)
        last = self.history[-1] if self.history else {}
        final = (
            test
            if test is not None
            else (
                {
                    "auroc": last.get("val_auroc"),
                    "auroc_reasons": last.get("val_auroc_reasons"),
                    "mean_auroc": last.get("val_mean_auroc"),
                    "images": None,
                }
                if last.get("val_auroc")
                else None
            )
        )
        none_reason = (
            "synthetic data: no evaluation"
            if self.config.synthetic or self.config.paired_synthetic
            else "evaluation switched off"
        )
        c = self.config
        return {
            "rank": self.rank,
            "ranks": self.size,
            "model": c.model,
            "source": c.source,
            "pipeline": c.pipeline,
            "synthetic": c.synthetic,
            "paired_synthetic": paired,  # per rank, with --paired-synthetic
            "fraction_of_synthetic_paired": (
                float(np.median([p["ratio_median"] for p in paired]))
                if paired and all(p["ratio_median"] for p in paired)
                else None
            ),
            "image_size": c.image_size,
            "batch_size_per_rank": c.batch_size,
            "global_batch_size": c.batch_size * self.size,
            "learning_rate": self.lr,
            "steps_per_epoch": steps,
            "epochs": c.epochs,
            "resumed_from_epoch": start_epoch or None,
            "images_per_sec": float(sum(medians)) if timed else None,
            "images_per_sec_per_rank": float(np.mean(medians)) if timed else None,
            "images_per_sec_ci95": float(sum(r["ci95"] for r in per_rank)) if timed else None,
            "throughput": {
                "per_rank": per_rank,
                "warmup_steps": c.throughput_warmup_steps,
                "window_steps": c.throughput_window_steps,
                "note": None if timed else "too few steps after warm-up for one timed window",
            },
            "auroc": final["auroc"] if final else dict.fromkeys(LABELS),
            "auroc_reasons": final["auroc_reasons"]
            if final
            else dict.fromkeys(LABELS, none_reason),
            "auroc_split": "test" if test is not None else ("val" if final else None),
            "mean_auroc": final["mean_auroc"] if final else None,
            "test_images": test["images"] if test else None,
            "test_loss": test["loss"] if test else None,
            "val_images": self.expected.get("val"),
            "val_mean_auroc": last.get("val_mean_auroc"),
            "val_auroc": last.get("val_auroc"),
            "history": self.history,
            "weights_sha256_per_rank": digests,
            "weights_in_sync": len(set(digests)) == 1,
            "wall_seconds": seconds,
            "pin_cores": c.pin_cores,
            "cores_per_rank": cores,
            "mixed_precision": c.mixed_precision,
            "xla": c.xla,
            "environment": environment_info(),
        }


# --- outputs -------------------------------------------------------------------


def history_frame(metrics: dict):
    """Per-epoch history as a table: loss, val_loss, mean and per-class val AUROC, LR, times."""
    import pandas as pd

    rows = []
    for h in metrics["history"]:
        row = {k: v for k, v in h.items() if not isinstance(v, dict)}
        row.update({f"val_auroc/{k}": v for k, v in (h.get("val_auroc") or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def auroc_table(metrics: dict):
    """Per-class AUROC of this run beside CheXNet's (test) and the poster's (validation)."""
    import pandas as pd

    split = metrics.get("auroc_split") or "val"
    rows = [
        {
            "label": label,
            f"ours ({split})": metrics["auroc"].get(label),
            "CheXNet (test)": CHEXNET_TEST_AUROC[label],
            "poster (val)": POSTER_VAL_AUROC[label],
            "note": (metrics.get("auroc_reasons") or {}).get(label, ""),
        }
        for label in LABELS
    ]
    rows.append(
        {
            "label": "mean",
            f"ours ({split})": metrics.get("mean_auroc"),
            "CheXNet (test)": CHEXNET_MEAN_AUROC,
            "poster (val)": POSTER_MEAN_AUROC,
            "note": "ours: mean of the defined classes",
        }
    )
    table = pd.DataFrame(rows).set_index("label")
    numeric = [c for c in table.columns if c != "note"]
    table[numeric] = table[numeric].astype(float)  # None -> NaN
    return table


def throughput_frame(runs: dict):
    """Images/s per rank (median and 1.96 std over windows) of named runs, e.g. real vs synthetic."""
    import pandas as pd

    rows = []
    for name, metrics in runs.items():
        for rank, r in enumerate(metrics["throughput"]["per_rank"]):
            rows.append(
                {
                    "input": name,
                    "rank": rank,
                    "images_per_sec": r["median"],
                    "ci95": r["ci95"],
                    "windows": r["windows"],
                    "total_images_per_sec": metrics["images_per_sec"],
                }
            )
    return pd.DataFrame(rows)


def paired_ceiling(metrics: dict) -> dict | None:
    """The synthetic-data ceiling a ``--paired-synthetic`` run measured, shaped like a
    run's metrics for :func:`throughput_frame` (per-rank median of the synthetic
    windows, total their sum); None unless every rank has a (real, synthetic) pair."""
    paired = metrics.get("paired_synthetic")
    if not paired or not all(p["pairs"] for p in paired):
        return None
    medians = [p["synthetic_median"] for p in paired]
    return {
        "images_per_sec": float(sum(medians)),
        "images_per_sec_per_rank": float(np.mean(medians)),
        "throughput": {
            "per_rank": [
                {"median": p["synthetic_median"], "ci95": None, "windows": p["pairs"]}
                for p in paired
            ]
        },
    }


def ceiling_metrics(metrics: dict, synthetic: dict | None = None) -> dict:
    """The synthetic-data ceiling of a run and real / synthetic, for its run record.

    ``synthetic`` is a separate ``--synthetic`` run of the same configuration;
    without it, the ceiling comes from the run's own paired windows
    (``--paired-synthetic``), whose ratio is the median over ranks of each
    rank's median (real window / the synthetic window after it): adjacent
    windows share the machine's state, so this ratio is the less noisy one.
    """
    paired = paired_ceiling(metrics)
    ceiling, kind = (synthetic, "separate") if synthetic else (paired, "paired" if paired else None)
    real = metrics.get("images_per_sec")
    if kind == "paired":
        fraction = metrics.get("fraction_of_synthetic_paired")
    else:
        fraction = real / ceiling["images_per_sec"] if real and ceiling else None
    per_rank = ceiling["images_per_sec_per_rank"] if ceiling else None
    return {
        "synthetic_images_per_sec": ceiling["images_per_sec"] if ceiling else None,
        "synthetic_images_per_sec_per_rank": per_rank,
        # the model's own cost: wall ms per image of one rank with its cores, no input work
        "model_ms_per_image": 1000.0 / per_rank if per_rank else None,
        "fraction_of_synthetic": fraction,
        "ceiling_kind": kind,
    }


def write_outputs(out: Path, config: TrainConfig, metrics: dict) -> None:
    """params.json, metrics.json (with environment), history.csv and auroc.csv in ``out``."""
    from chexlib.results import write_run_record

    out.mkdir(parents=True, exist_ok=True)
    params = {**config.to_dict(), "ranks": metrics["ranks"]}
    write_run_record(out, params, json_safe(metrics))
    history_frame(metrics).to_csv(out / "history.csv", index=False)
    auroc_table(metrics).to_csv(out / "auroc.csv")


def json_safe(obj):
    """NaN/inf -> None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def summary_text(metrics: dict) -> str:
    """A few lines for the terminal."""

    def fmt(v, spec=".1f"):
        return "n/a" if v is None else format(v, spec)

    lines = [
        f"{metrics['model']} {metrics['source']}/{metrics['pipeline']}"
        f"{' (synthetic)' if metrics['synthetic'] else ''}: {metrics['ranks']} rank(s), "
        f"batch {metrics['batch_size_per_rank']}/rank, {metrics['steps_per_epoch']} steps/epoch",
        f"  throughput: {fmt(metrics['images_per_sec'])} images/s total, "
        f"{fmt(metrics['images_per_sec_per_rank'])} per rank (+- {fmt(metrics['images_per_sec_ci95'])})",
        f"  mean AUROC ({metrics['auroc_split'] or 'n/a'}): {fmt(metrics['mean_auroc'], '.3f')}",
        f"  wall time: {metrics['wall_seconds']:.1f} s",
    ]
    return "\n".join(lines)

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

Throughput: warm-up once per run (the first ``--throughput-warmup-steps``
steps, and the first step after each evaluation), then every step is timed,
in windows of ``--throughput-window-steps``; the median and spread per rank
and in total are reported, like Horovod's synthetic benchmark. With no full
window, the rate over what was timed is reported with a note (see
:mod:`chexlib.callbacks`). ``--synthetic`` replaces the input pipeline with
one repeated random batch: the model's ceiling in the same configuration.

Fault tolerance: rank 0 writes a checkpoint after every epoch (model,
optimizer, LR-schedule state and history; written to a temporary folder and
renamed, so a crash never leaves half a checkpoint). ``--resume`` continues
after the last complete epoch, and only the same run: every setting that
changes the result (:data:`NOT_RESULT` lists those that do not), the number of
ranks and a fingerprint of the data must match, else it refuses and lists every
difference. A resumed run whose checkpoint already reached ``--epochs`` trains
nothing and leaves its ``metrics.json`` as it is. Without ``--resume`` a folder
holding a checkpoint is refused. Each epoch's data order and flips depend only
on (seed, epoch), so a resumed run repeats what an uninterrupted run would
have done, up to floating-point noise (bit-exact order needs
``--deterministic``; the optimized pipeline is non-deterministic by default,
as in the official recipe). A rank that dies makes ``horovodrun`` /
``horovod.run`` stop the others and exit non-zero.

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
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chexlib.data import LABELS, MODEL_INPUT_SIZE
from chexlib.run_report import auroc_table, history_frame, summary_text

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
    image_size: int = _opt("input side in pixels", default=MODEL_INPUT_SIZE)
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
        "steps at the start of the run not timed (compilation, start-up); the first step "
        "after each evaluation is not timed either",
        default=10,
    )
    throughput_window_steps: int = _opt("steps per timed throughput window", default=10)
    verbose: int = _opt(
        "Keras progress on rank 0: 0 silent, 1 bar, 2 one line per epoch", default=1
    )
    tensorboard: str | None = _opt(
        "TensorBoard folder (rank 0): per-epoch loss, LR, val AUROC, images/s", default=None
    )
    profile_steps: str | None = _opt(
        "'A,B': TF profiler trace of steps A..B of the run (1-based) into --tensorboard",
        default=None,
    )
    horovod_timeline: str | None = _opt(
        "Horovod timeline file (Chrome trace JSON, written by rank 0)", default=None
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
        check(
            not self.profile_steps or bool(self.tensorboard),
            "--profile-steps writes into the --tensorboard folder; pass --tensorboard DIR",
        )
        parse_profile_steps(self.profile_steps)  # raises ValueError with the flag named
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


def parse_profile_steps(text: str | None) -> tuple[int, int] | None:
    """``"5,8"`` -> (5, 8): the first and last step to profile (1-based, first <= last)."""
    if not text:
        return None
    try:
        first, last = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"TrainConfig: profile_steps must be 'A,B', not {text!r}") from None
    if not 1 <= first <= last:
        raise ValueError(f"TrainConfig: profile_steps needs 1 <= A <= B, not {text!r}")
    return first, last


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


# --- what a resumed run must share with its checkpoint -------------------------------

# Settings that do not change what a run computes, so --resume does not compare them:
# where files go, how long it runs, how it is watched. The data folders are compared
# by content (the data fingerprint), not by path. Every other field, and any new one,
# is compared.
NOT_RESULT = frozenset(
    {"out", "data", "records", "epochs", "resume", "checkpoint", "verbose", "pin_cores"}
    | {"tensorboard", "profile_steps", "horovod_timeline", "data_service"}
)
# Measurement only, except with --paired-synthetic, where they decide which steps
# train on synthetic batches.
THROUGHPUT_SETTINGS = frozenset({"throughput_warmup_steps", "throughput_window_steps"})


def result_settings(config: TrainConfig, ranks: int, fingerprint: str | None) -> dict:
    """Everything that changes a run's result: the compared fields, ranks, data fingerprint."""
    skip = NOT_RESULT | (frozenset() if config.paired_synthetic else THROUGHPUT_SETTINGS)
    settings = {k: v for k, v in config.to_dict().items() if k not in skip}
    settings.update(
        ranks=ranks,
        data_fingerprint=fingerprint,
        uses_data_service=bool(config.data_service),  # the service decides the order
    )
    return settings


def resume_differences(saved: dict, current: dict) -> list[str]:
    """``"name: checkpoint X, this run Y"`` for every setting that differs.

    A setting the checkpoint does not record (written by an older chexlib) is
    not compared.
    """

    def show(key, value):
        return repr(value[:12] + "...") if key == "data_fingerprint" and value else repr(value)

    return [
        f"{key}: checkpoint {show(key, saved[key])}, this run {show(key, value)}"
        for key, value in current.items()
        if key in saved and saved[key] != value
    ]


def data_fingerprint(config: TrainConfig, metadata=None) -> str | None:
    """sha256 of the data a run reads, cheap to compute (one ``stat`` per file).

    Raw source: the metadata files (CSV and split lists) and each listed
    image's name and size. Records source: the manifest's shard list (names,
    record counts, sha256) and each shard's size on disk. None for synthetic
    data without a dataset. File times are left out, so a copied dataset
    still resumes.
    """
    import hashlib

    digest = hashlib.sha256()
    if config.source == "records" and config.records:
        from chexlib import records

        for shard in records.read_manifest(config.records)["shards"]:
            size = (Path(config.records) / shard["file"]).stat().st_size
            keys = (shard["file"], shard["records"], shard.get("sha256"), size)
            digest.update("\0".join(map(str, keys)).encode() + b"\n")
        return digest.hexdigest()
    if metadata is None:
        return None
    csv_path = Path(metadata.attrs["csv"])
    for name in (csv_path.name, "train_val_list.txt", "test_list.txt"):
        data = (csv_path.parent / name).read_bytes()
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    for image, path in zip(metadata["image"], metadata["path"], strict=True):
        size = os.stat(path).st_size if isinstance(path, str) else "missing"
        digest.update(f"{image}\0{size}\n".encode())
    return digest.hexdigest()


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
        # the pipeline's own rule (and the manifest's counts for records)
        return pipeline.count_examples(
            self.config.source,
            split,
            metadata=self.metadata,
            records_dir=self.common["records_dir"],
            num_shards=n,
            shard_index=i,
        )

    def train(self, epoch: int, untimed: int | None = None):
        """Training batches of one epoch; order and flips depend on (seed, epoch) only.

        Args:
            epoch: 0-based epoch of the run.
            untimed: with ``--paired-synthetic``, the steps at the start of this
                epoch that are not timed (:func:`chexlib.callbacks.untimed_steps`).
        """
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
        if not self.config.paired_synthetic:
            return real
        return paired_with_synthetic(real, self.config, untimed)

    def evaluation(self, split: str):
        """Every image of this rank's part of ``split`` once (the last batch may be smaller)."""
        from chexlib import pipeline

        return pipeline.build_dataset(self.config.source, split, training=False, **self.common)


def paired_with_synthetic(real, config: TrainConfig, untimed: int | None = None):
    """Untimed steps from ``real``, then windows alternating ``real`` / synthetic.

    Window k after the untimed steps (``throughput_window_steps`` steps each) is
    real for even k and synthetic for odd k. The throughput callback restarts its
    windows at each epoch after the same number of untimed steps
    (:func:`chexlib.callbacks.untimed_steps`; default: the run's first epoch,
    ``max(1, throughput_warmup_steps)``), so its windows pair up with these.
    Adjacent windows share the machine's state of the moment, which cancels
    the slow drifts that make separate runs differ by 10 % or more here.
    """
    import tensorflow as tf

    from chexlib import pipeline

    synthetic = pipeline.synthetic_dataset(config.batch_size, config.image_size, seed=config.seed)
    w = config.throughput_window_steps
    if untimed is None:
        untimed = max(1, config.throughput_warmup_steps)
    warmup = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat(untimed)
    pairs = tf.data.Dataset.from_tensor_slices(tf.constant([0] * w + [1] * w, tf.int64)).repeat()
    return tf.data.Dataset.choose_from_datasets([real, synthetic], warmup.concatenate(pairs))


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


# --- fault injection (test hook) ---------------------------------------------------


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

    if config.horovod_timeline:
        _timeline_env(config.horovod_timeline, hvd.is_initialized())
    _drop_bad_horovod_env()
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


def _timeline_env(path: str, initialized: bool) -> None:
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


def _drop_bad_horovod_env() -> None:
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

        from chexlib import callbacks as cb

        c = self.config
        self.throughput = cb.ThroughputCallback(
            c.batch_size, c.throughput_warmup_steps, c.throughput_window_steps, c.paired_synthetic
        )
        self.plateau = cb.PlateauCallback(
            c.warmup_epochs,
            monitor="val_loss",
            factor=c.plateau_factor,
            patience=c.plateau_patience,
            verbose=int(self.rank == 0 and c.verbose > 0),
        )
        # Horovod: the initial variables go from rank 0 to all ranks by the explicit broadcast
        # in fit(), before the first step, instead of BroadcastGlobalVariablesCallback: that
        # acts after the first step of the first fit() call, so on resume it would copy rank
        # 0's BatchNorm statistics of that step to the others, where an uninterrupted run did not.
        callbacks = [
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
            cb.EvaluationCallback(self),
        ]
        if self.evaluate:  # needs val_loss; after warm-up, on the (identical) gathered val loss
            callbacks.append(self.plateau)
        self.tensorboard = None
        if self.rank == 0 and c.tensorboard:  # Horovod: only rank 0 writes TensorBoard files
            profile = parse_profile_steps(c.profile_steps)
            self.tensorboard = cb.TensorBoardCallback(self, c.tensorboard, profile, steps)
            callbacks.append(self.tensorboard)
        # Horovod: only rank 0 writes checkpoints, so ranks never overwrite each other.
        if self.rank == 0 and c.checkpoint:
            callbacks.append(cb.CheckpointCallback(self))
        if self.rank == 0 and c.verbose:  # Horovod: only rank 0 prints progress
            callbacks.append(cb.EpochProgbar(c.epochs))
        fault = parse_fault(os.environ.get(FAULT_ENV), self.rank)
        if fault:
            callbacks.append(cb.FaultInjectionCallback(*fault, FAULT_ENV, FAULT_EXIT_CODE))
        return callbacks

    # -- checkpoints -------------------------------------------------------------------

    def settings(self) -> dict:
        """Rank 0: :func:`result_settings` of this run (the data fingerprint computed once)."""
        if not hasattr(self, "_settings"):
            fingerprint = data_fingerprint(self.config, self.data.metadata)
            self._settings = result_settings(self.config, self.size, fingerprint)
        return self._settings

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
            "settings": self.settings(),  # what --resume compares
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

    def restore(self) -> tuple[int, dict | None]:
        """Resume: rank 0 loads the last complete checkpoint.

        Returns:
            ``(first epoch to run, None)``, or ``(epochs done, the stored metrics)``
            when the checkpoint already reached ``--epochs`` and its
            ``metrics.json`` is complete: then nothing is trained or written.
        """
        import horovod.tensorflow as hvd_tf

        state, error, finished = None, None, None
        if self.rank == 0 and self.config.resume:
            try:
                state = self._load_checkpoint()
                finished = self._finished_metrics(state)
            except Exception as err:  # every rank must hear of it, not wait in the broadcast
                error = f"--resume: cannot continue from {self.out / CHECKPOINTS}: {err}"
        # Horovod: every rank continues from rank 0's state (or stops with its error).
        state, error, finished = hvd_tf.broadcast_object((state, error, finished), root_rank=0)
        if error:
            raise ValueError(error)
        if state is None:
            if self.config.resume and self.rank == 0:
                print(f"chexlib train: --resume: no checkpoint in {self.out}; starting at epoch 1")
            return 0, None
        if finished is not None:
            if self.rank == 0:
                print(
                    f"chexlib train: --resume: {self.out} already trained {state['epochs_done']} "
                    f"epoch(s) (--epochs {self.config.epochs}); nothing to train, metrics.json "
                    "left as it is"
                )
            return int(state["epochs_done"]), finished
        if self.rank != 0:
            self.optimizer.build(self.model.trainable_variables)
        self.optimizer.learning_rate.assign(state["learning_rate"])
        self.plateau.set_state(state["plateau"])
        self.history = list(state["history"])
        if self.rank == 0:
            print(
                f"chexlib train: resumed after epoch {state['epochs_done']} from {self.out / CHECKPOINTS}"
            )
        return int(state["epochs_done"]), None

    def _load_checkpoint(self) -> dict | None:
        """Rank 0: model and optimizer from the newest complete checkpoint; its state, or None.

        Raises:
            ValueError: the checkpoint is of another run, listing every difference.
        """
        import tensorflow as tf

        from chexlib.results import read_json

        root = self.out / CHECKPOINTS
        if not (root / "latest.json").exists():
            return None
        latest = read_json(root / "latest.json")
        state = read_json(root / latest["dir"] / "state.json")
        saved = state.get("settings") or {**state["config"], "ranks": state.get("ranks")}
        differences = resume_differences(saved, self.settings())
        if differences:
            raise ValueError(
                "it was written by a run with other settings; this run differs in "
                + "; ".join(differences)
                + ". Use the checkpoint's settings, or another --out for a new run"
            )
        self.optimizer.build(self.model.trainable_variables)  # slots must exist to be restored
        checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)
        checkpoint.read(str(root / latest["dir"] / "ckpt")).assert_existing_objects_matched()
        return state

    def _finished_metrics(self, state: dict | None) -> dict | None:
        """Rank 0: the run's metrics.json when ``state`` reached --epochs and wrote it, else None."""
        from chexlib.results import read_json

        path = self.out / "metrics.json"
        if state is None or state["epochs_done"] < self.config.epochs or not path.is_file():
            return None
        metrics = read_json(path, expect=dict)
        # metrics of this checkpoint, not of a shorter run that was then extended
        return metrics if len(metrics.get("history") or []) == state["epochs_done"] else None

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

        from chexlib.callbacks import untimed_steps

        c = self.config
        started = time.perf_counter()
        self.build()
        steps = self.steps_per_epoch()
        callbacks = self.callbacks(steps)
        start_epoch, finished = self.restore()
        if finished is not None:  # a finished run: trained nothing, wrote nothing
            return finished
        # Horovod: start every rank from rank 0's weights (and, on resume, optimizer state);
        # the broadcast callback alone would only sync after the first step.
        hvd_tf.broadcast_variables(self.model.variables, root_rank=0)
        if self.optimizer.variables():
            hvd_tf.broadcast_variables(self.optimizer.variables(), root_rank=0)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        try:
            for epoch in range(start_epoch, c.epochs):
                # One fit() per epoch: each epoch's dataset is seeded by (seed, epoch), so a
                # resumed run sees the same batches as an uninterrupted one.
                untimed = untimed_steps(c.throughput_warmup_steps, steps, epoch - start_epoch)
                self.model.fit(
                    self.data.train(epoch, untimed),
                    steps_per_epoch=steps,
                    initial_epoch=epoch,
                    epochs=epoch + 1,
                    callbacks=callbacks,
                    verbose=c.verbose if self.rank == 0 else 0,
                )
        finally:
            if self.tensorboard is not None:  # a trace cut short is still written
                self.tensorboard.stop_profiler()
        test = self.evaluate_split("test") if self.evaluate else None
        metrics = self.metrics(steps, start_epoch, test, time.perf_counter() - started)
        if self.rank == 0:  # Horovod: only rank 0 writes results
            write_outputs(self.out, self.config, metrics)
        return metrics

    def throughput_metrics(self) -> dict:
        """Images/s of the run (sum over ranks) and each rank's windows and notes."""
        import horovod.tensorflow as hvd_tf

        from chexlib.callbacks import paired_summary, real_rates, throughput_summary

        c = self.config
        rates, index, note = self.throughput.result()
        paired = None
        if c.paired_synthetic:
            # Horovod: every rank's (real, synthetic) window pairs.
            paired = hvd_tf.allgather_object(paired_summary(rates, index))
        real = real_rates(rates, index, note, c.paired_synthetic)  # images/s from real input only
        # Horovod: collect every rank's throughput windows.
        per_rank = hvd_tf.allgather_object(throughput_summary(real, note))
        medians = [r["median"] for r in per_rank]
        cis = [r["ci95"] for r in per_rank]
        timed = all(m is not None for m in medians)
        notes = sorted({f"rank {i}: {r['note']}" for i, r in enumerate(per_rank) if r["note"]})
        return {
            "paired_synthetic": paired,  # per rank, with --paired-synthetic
            "fraction_of_synthetic_paired": (
                float(np.median([p["ratio_median"] for p in paired]))
                if paired and all(p["ratio_median"] for p in paired)
                else None
            ),
            "images_per_sec": float(sum(medians)) if timed else None,
            "images_per_sec_per_rank": float(np.mean(medians)) if timed else None,
            "images_per_sec_ci95": float(sum(cis)) if all(x is not None for x in cis) else None,
            "throughput": {
                "per_rank": per_rank,
                "warmup_steps": c.throughput_warmup_steps,
                "window_steps": c.throughput_window_steps,
                "timed_steps": len(self.throughput.timed),
                "note": "; ".join(notes) or None,
            },
        }

    def final_auroc(self, test: dict | None) -> dict:
        """Per-class and mean AUROC of the run: test if evaluated, else the last val."""
        last = self.history[-1] if self.history else {}
        if test is not None:
            final, split = test, "test"
        elif last.get("val_auroc"):
            final, split = {k: last.get(f"val_{k}") for k in ("auroc", "auroc_reasons")}, "val"
            final["mean_auroc"] = last.get("val_mean_auroc")
        else:
            reason = (
                "synthetic data: no evaluation"
                if self.config.synthetic or self.config.paired_synthetic
                else "evaluation switched off"
            )
            final, split = {"auroc": dict.fromkeys(LABELS), "mean_auroc": None}, None
            final["auroc_reasons"] = dict.fromkeys(LABELS, reason)
        return {
            "auroc": final["auroc"],
            "auroc_reasons": final["auroc_reasons"],
            "auroc_split": split,
            "mean_auroc": final["mean_auroc"],
        }

    def metrics(self, steps: int, start_epoch: int, test: dict | None, seconds: float) -> dict:
        import horovod.tensorflow as hvd_tf

        from chexlib.results import environment_info

        throughput = self.throughput_metrics()
        digests = hvd_tf.allgather_object(self.weights_digest())  # Horovod: every rank's weights
        cores = hvd_tf.allgather_object(_cores_now())  # Horovod: per rank: pinned or not
        last = self.history[-1] if self.history else {}
        c = self.config
        return {
            "rank": self.rank,
            "ranks": self.size,
            "model": c.model,
            "source": c.source,
            "pipeline": c.pipeline,
            "synthetic": c.synthetic,
            "paired_synthetic": throughput.pop("paired_synthetic"),
            "fraction_of_synthetic_paired": throughput.pop("fraction_of_synthetic_paired"),
            "image_size": c.image_size,
            "batch_size_per_rank": c.batch_size,
            "global_batch_size": c.batch_size * self.size,
            "learning_rate": self.lr,
            "steps_per_epoch": steps,
            "epochs": c.epochs,
            "resumed_from_epoch": start_epoch or None,
            **throughput,
            **self.final_auroc(test),
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


def write_outputs(out: Path, config: TrainConfig, metrics: dict) -> None:
    """params.json, metrics.json (with environment), history.csv and auroc.csv in ``out``."""
    from chexlib.results import write_run_record

    out.mkdir(parents=True, exist_ok=True)
    params = {**config.to_dict(), "ranks": metrics["ranks"]}
    write_run_record(out, params, metrics)  # write_json makes NaN and numpy values JSON-safe
    history_frame(metrics).to_csv(out / "history.csv", index=False)
    auroc_table(metrics).to_csv(out / "auroc.csv")

"""The configuration of a training run, and its ``chexlib train`` flags.

:class:`TrainConfig` is a frozen dataclass that validates itself; each field is
one flag (``_`` becomes ``-``, built by :mod:`chexlib.core.flags`), with the field's help
text, choices and default.
:func:`add_train_arguments` makes the flags, :func:`config_from_args` reads
them back and :func:`config_to_argv` writes the flags that reproduce a config
(for ``horovodrun ... chexlib train``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from chexlib.core import flags
from chexlib.core.flags import option
from chexlib.core.names import MODELS, PIPELINES, SOURCES
from chexlib.data.metadata import MODEL_INPUT_SIZE

# Compute precisions of --precision; "auto" is resolved when the run starts.
PRECISIONS = ("float32", "bfloat16", "float16", "auto")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU flags of native bfloat16 arithmetic


def choose_precision(requested: str, has_gpu: bool, flags: set[str]) -> tuple[str, str]:
    """(precision, why) for ``--precision requested`` on this machine.

    ``auto``: float16 on a GPU, bfloat16 on a CPU with native bf16 instructions,
    float32 otherwise. An explicit choice is kept as asked.
    """
    if requested != "auto":
        return requested, "as asked (--precision)"
    if has_gpu:
        return "float16", "auto: a GPU"
    native = sorted(set(BF16_FLAGS) & flags)
    if native:
        return "bfloat16", f"auto: the CPU has {', '.join(native)}"
    return "float32", f"auto: the CPU has no native bfloat16 ({' or '.join(BF16_FLAGS)})"


@dataclass(frozen=True)
class TrainConfig:
    """One training run; every field is a ``chexlib train`` flag (``_`` -> ``-``)."""

    out: str = option(
        "run folder: checkpoints, params.json, metrics.json, CSVs", default="outputs/train"
    )
    data: str | None = option(
        "dataset folder in the NIH layout (source raw; split sizes for records)", default=None
    )
    records: str | None = option(
        "TFRecord folder made by `chexlib convert` (source records)", default=None
    )
    source: str = option("input: raw PNG files or TFRecords", choices=SOURCES, default="raw")
    pipeline: str = option(
        "tf.data pipeline: naive or optimized", choices=PIPELINES, default="optimized"
    )
    model: str = option(
        "densenet121, resnet50, tiny (a small test/teaching CNN), or standin (the same small "
        "CNN standing in for a fast accelerator: cheaper per image than the PNG decode)",
        choices=MODELS,
        default="densenet121",
    )
    weights: str = option(
        "none | imagenet (Keras cache) | /path/notop.h5 | chexlib run folder", default="none"
    )
    image_size: int = option("input side in pixels", default=MODEL_INPUT_SIZE)
    batch_size: int = option("images per batch PER RANK", default=16)
    epochs: int = option("epochs in all (a resumed run continues up to this)", default=3)
    steps_per_epoch: int | None = option(
        "cap on steps per epoch; None: the smallest rank shard / batch", default=None
    )
    learning_rate: float = option(
        "Adam learning rate for ONE rank (scaled by ranks, see --scale-lr)", default=1e-3
    )
    scale_lr: bool = option("multiply the learning rate by the number of ranks", default=True)
    warmup_epochs: int = option("epochs of Horovod LR warm-up from lr to lr x ranks", default=5)
    plateau_factor: float = option("ReduceLROnPlateau factor on validation loss", default=0.1)
    plateau_patience: int = option("ReduceLROnPlateau patience in epochs", default=1)
    precision: str = option(
        "compute precision (head and loss stay float32): float32; bfloat16 (fast on CPUs "
        "with avx512_bf16 or amx_bf16); float16 (GPUs); auto: the fastest this machine has",
        default="float32",
        choices=PRECISIONS,
    )
    xla: bool = option("XLA auto-clustering of the training step", default=False)
    synthetic: bool = option(
        "train on one repeated random batch: the throughput ceiling", default=False
    )
    paired_synthetic: bool = option(
        "BENCHMARK ONLY: alternate timed windows between the real input and one repeated "
        "random batch in the same process (real/synthetic without run-to-run noise); "
        "half the steps train on random data, so no evaluation",
        default=False,
    )
    resume: bool = option("continue from the last complete epoch in --out", default=False)
    seed: int = option("seed of weights, data order and flips (per epoch: seed, epoch)", default=0)
    deterministic: bool = option(
        "deterministic tf.data order (slower; bit-reproducible runs)", default=False
    )
    pin_cores: int = option(
        "0: no pinning; N: each rank on its own N cores (local rank r: the r-th block of N), "
        "TensorFlow's intra/inter-op threads = N",
        default=0,
    )
    data_service: str | None = option(
        "grpc://host:port of a tf.data service dispatcher", default=None
    )
    val_fraction: float = option(
        "fraction of train_val moved to validation, by patient", default=0.1
    )
    evaluate: bool = option(
        "per-class AUROC on val each epoch and on test at the end", default=True
    )
    checkpoint: bool = option("write a checkpoint after every epoch (rank 0)", default=True)
    throughput_warmup_steps: int = option(
        "steps at the start of the run not timed (compilation, start-up); the first step "
        "after each evaluation is not timed either",
        default=10,
    )
    throughput_window_steps: int = option("steps per timed throughput window", default=10)
    verbose: int = option(
        "Keras progress on rank 0: 0 silent, 1 bar, 2 one line per epoch",
        choices=(0, 1, 2),
        default=1,
    )
    tensorboard: str | None = option(
        "TensorBoard folder (rank 0): per-epoch loss, LR, val AUROC, images/s", default=None
    )
    profile_steps: str | None = option(
        "'A,B': TF profiler trace of steps A..B of the run (1-based) into --tensorboard",
        default=None,
    )
    horovod_timeline: str | None = option(
        "Horovod timeline file (Chrome trace JSON, written by rank 0)", default=None
    )

    def __post_init__(self):

        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(f"TrainConfig: {message}")

        check(self.source in SOURCES, f"source must be raw or records, not {self.source!r}")
        check(
            self.pipeline in PIPELINES,
            f"pipeline must be naive or optimized, not {self.pipeline!r}",
        )
        check(self.model in MODELS, f"model must be one of {MODELS}, not {self.model!r}")
        out_of_range = range_problems(self)  # before TensorFlow starts, naming each flag
        check(not out_of_range, "; ".join(out_of_range))
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


# The numeric flags' bounds, as intervals ("[" / "]" include the bound, "(" / ")" do not),
# checked by TrainConfig before TensorFlow starts. Above 2048 px is twice NIH's 1024 px
# images (a batch of 100000 px images ran 48 s into TensorFlow, then out of memory); an
# Adam learning rate above 1 only diverges; NaN and inf are outside every interval.
_RANGES: dict[str, tuple[str, float, float, str]] = {
    "image_size": ("[", 32, 2048, "]"),
    "batch_size": ("[", 1, 4096, "]"),
    "epochs": ("[", 1, 100_000, "]"),
    "steps_per_epoch": ("[", 1, 10**9, "]"),  # or None
    "learning_rate": ("(", 0.0, 1.0, "]"),
    "warmup_epochs": ("[", 0, 100_000, "]"),
    "plateau_factor": ("(", 0.0, 1.0, ")"),
    "plateau_patience": ("[", 0, 100_000, "]"),
    "seed": ("[", 0, 2**31 - 1, "]"),
    "pin_cores": ("[", 0, 4096, "]"),
    "val_fraction": ("[", 0.0, 1.0, ")"),
    "throughput_warmup_steps": ("[", 0, 10**9, "]"),
    "throughput_window_steps": ("[", 1, 10**9, "]"),
}


def range_problems(config: TrainConfig) -> list[str]:
    """``"--flag must be in [low, high], not value"`` for every numeric field out of its range."""
    problems = []
    for name, (opening, low, high, closing) in _RANGES.items():
        value = getattr(config, name)
        if value is None and name == "steps_per_epoch":
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        ok = (
            number
            and math.isfinite(value)
            and (low <= value if opening == "[" else low < value)
            and (value <= high if closing == "]" else value < high)
        )
        if not ok:
            flag = "--" + name.replace("_", "-")
            problems.append(f"{flag} must be in {opening}{low}, {high}{closing}, not {value!r}")
    return problems


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


# --- command line: flags from the fields (chexlib.core.flags) ----------------------

# every bool is --name/--no-name; argparse adds a bool's default to its help itself
_FLAGS = dict(negatable=True, default_help=" (default: {default})")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, with its default and help."""
    flags.add_flags(parser, TrainConfig, **_FLAGS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return flags.config_from_args(TrainConfig, args)


def config_to_argv(config: TrainConfig) -> list[str]:
    """The ``chexlib train`` flags that reproduce ``config`` (non-default fields only)."""
    return flags.config_to_argv(config, negatable=_FLAGS["negatable"])

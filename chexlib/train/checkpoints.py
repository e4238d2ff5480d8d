"""Checkpoints of a training run: written every epoch, resumed only by the same run.

Rank 0 writes a checkpoint after every epoch (model, optimizer, LR-schedule
state and history) into ``<out>/checkpoints/``: written to a temporary folder
and renamed, then ``latest.json`` points at it, so a crash never leaves half a
checkpoint. :func:`restore` continues after the last complete epoch, and only
the same run: every setting that changes the result (:data:`NOT_RESULT` lists
those that do not), the number of ranks and a fingerprint of the data must
match, else it refuses and lists every difference. A checkpoint that already
reached ``--epochs`` (with its ``metrics.json``) is finished: nothing is
trained or written. Without ``--resume`` a folder holding a checkpoint is
refused (:func:`refuse_overwrite`).

TensorFlow and Horovod are imported inside the functions that use them.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chexlib.core.files import RecordError, read_json, write_json
from chexlib.core.run_record import RunRecord
from chexlib.data.fingerprint import metadata_fingerprint, shards_fingerprint
from chexlib.records.manifest import read_manifest
from chexlib.train.config import TrainConfig

CHECKPOINTS = "checkpoints"  # the folder under --out
LATEST = "latest.json"  # the pointer to the newest complete checkpoint
# What each record must hold, and of which type (checked on reading, naming the file).
_POINTER_KEYS = {"dir": str, "epochs_done": int}
_STATE_KEYS = {
    "epochs_done": int,
    "config": dict,
    "learning_rate": int | float,
    "history": list,
    "plateau": dict | None,
}


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
    """The fingerprint of the data a run reads (:mod:`chexlib.data.fingerprint`, one
    ``stat`` per file): the records' shard set, or the raw dataset's metadata and
    images; None for synthetic data without a dataset."""
    if config.source == "records" and config.records:
        return shards_fingerprint(config.records, read_manifest(config.records))
    if metadata is None:
        return None
    return metadata_fingerprint(metadata)


def settings_once(config: TrainConfig, ranks: int, metadata=None) -> Callable[[], dict]:
    """Rank 0: :func:`result_settings` of a run, its data fingerprint computed once, when needed.

    A run that neither resumes nor checkpoints never reads the file sizes.
    """
    return functools.cache(
        lambda: result_settings(config, ranks, data_fingerprint(config, metadata))
    )


def refuse_overwrite(config: TrainConfig) -> None:
    """Refuse an ``--out`` holding a checkpoint unless the run resumes it (or never checkpoints)."""
    pointer = Path(config.out) / CHECKPOINTS / LATEST
    if pointer.exists() and not config.resume and config.checkpoint:
        raise FileExistsError(
            f"{config.out} holds a checkpoint from an earlier run: pass --resume to "
            f"continue it, or choose another --out"
        )


def read_checkpoint_record(path: Path, keys: dict[str, type]) -> dict:
    """A checkpoint's JSON record (``latest.json`` or ``state.json``) holding ``keys``.

    Raises:
        RecordError: the file is not JSON, not an object, lacks a key or holds one of
            another type, or (``latest.json``) points outside its folder; the message
            names the file.
        OSError: the file cannot be read (``FileNotFoundError`` names it).
    """
    record = read_json(path, expect=dict)
    wrong = [
        f"{key!r} {'missing' if key not in record else 'is ' + type(record[key]).__name__}"
        for key, kind in keys.items()
        if key not in record or not isinstance(record[key], kind) or isinstance(record[key], bool)
    ]
    pointed = record.get("dir")
    if "dir" in keys and isinstance(pointed, str) and pointed != Path(pointed).name:
        wrong.append(f"'dir' {pointed!r} is not a folder name in {path.parent}")
    if wrong:
        raise RecordError(
            f"{path}: damaged checkpoint record ({'; '.join(wrong)}); delete "
            f"{path.parent if path.name == LATEST else path.parent.parent} to start over, "
            "or choose another --out"
        )
    return record


def last_checkpoint(out) -> str:
    """Where a stopped run leaves its checkpoints, in words (for the line that stops it)."""
    pointer = Path(out) / CHECKPOINTS / LATEST
    if not pointer.exists():
        return f"no checkpoint in {pointer.parent}"
    try:
        done = read_checkpoint_record(pointer, _POINTER_KEYS)["epochs_done"]
    except (OSError, ValueError) as err:
        return f"the checkpoint pointer is unreadable ({err})"
    return f"the last checkpoint, epoch {done}, is kept in {pointer.parent}"


def save_checkpoint(
    out: Path,
    epochs_done: int,
    *,
    model,
    optimizer,
    config: TrainConfig,
    settings: Callable[[], dict],
    ranks: int,
    plateau: dict,
    history: list[dict],
) -> None:
    """Rank 0: write epoch ``epochs_done`` to a temporary folder, rename it, move the pointer.

    ``plateau`` is the ReduceLROnPlateau state (``PlateauCallback.get_state``);
    the folder of the checkpoint before is removed once the pointer has moved.
    """
    import tensorflow as tf

    root = out / CHECKPOINTS
    name = f"epoch-{epochs_done:04d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tf.train.Checkpoint(model=model, optimizer=optimizer).write(str(tmp / "ckpt"))
    state = {
        "epochs_done": epochs_done,
        "dir": name,
        "config": config.to_dict(),
        "settings": settings(),  # what --resume compares
        "ranks": ranks,
        "learning_rate": float(tf.keras.backend.get_value(optimizer.learning_rate)),
        "plateau": plateau,
        "history": history,
    }
    write_json(tmp / "state.json", state)
    shutil.rmtree(root / name, ignore_errors=True)
    os.replace(tmp, root / name)
    pointer = root / LATEST
    previous = read_checkpoint_record(pointer, _POINTER_KEYS)["dir"] if pointer.exists() else None
    write_json(pointer, {"dir": name, "epochs_done": epochs_done})
    if previous and previous != name:
        shutil.rmtree(root / previous, ignore_errors=True)


@dataclass(frozen=True)
class Resumed:
    """Where a run starts: what :func:`restore` found.

    Attributes:
        start_epoch: the first epoch to train (0-based; the epochs already done).
        history: the per-epoch records of those epochs.
        plateau: the ReduceLROnPlateau state to continue from, or None.
        finished: the stored record of a run that already reached ``--epochs``
            (then nothing is trained or written), else None.
    """

    start_epoch: int
    history: list[dict]
    plateau: dict | None = None
    finished: RunRecord | None = None


def restore(
    config: TrainConfig, rank: int, model, optimizer, settings: Callable[[], dict]
) -> Resumed:
    """``--resume``: rank 0 loads the last complete checkpoint; every rank continues from it.

    Loads the weights into ``model`` and ``optimizer`` (rank 0; the others get
    them by the broadcast before the first step) and sets the learning rate on
    every rank. Without ``--resume``, or with no checkpoint, the run starts at
    epoch 0.

    Raises:
        ValueError: on every rank, when rank 0 cannot continue from the checkpoint
            (another run's settings, a damaged file), with rank 0's reason.
    """
    import horovod.tensorflow as hvd_tf

    out = Path(config.out)
    state, error, finished = None, None, None
    if rank == 0 and config.resume:
        try:
            state = _load_checkpoint(out / CHECKPOINTS, model, optimizer, settings)
            finished = _finished_metrics(out, config, state)
        except Exception as err:  # every rank must hear of it, not wait in the broadcast
            error = f"--resume: cannot continue from {out / CHECKPOINTS}: {err}"
    # Horovod: every rank continues from rank 0's state (or stops with its error).
    state, error, finished = hvd_tf.broadcast_object((state, error, finished), root_rank=0)
    if error:
        raise ValueError(error)
    if state is None:
        if config.resume and rank == 0:
            print(f"chexlib train: --resume: no checkpoint in {out}; starting at epoch 1")
        return Resumed(0, [])
    if finished is not None:
        if rank == 0:
            print(
                f"chexlib train: --resume: {out} already trained {state['epochs_done']} "
                f"epoch(s) (--epochs {config.epochs}); nothing to train, metrics.json "
                "left as it is"
            )
        return Resumed(int(state["epochs_done"]), [], finished=finished)
    if rank != 0:
        optimizer.build(model.trainable_variables)
    optimizer.learning_rate.assign(state["learning_rate"])
    if rank == 0:
        print(f"chexlib train: resumed after epoch {state['epochs_done']} from {out / CHECKPOINTS}")
    return Resumed(int(state["epochs_done"]), list(state["history"]), state["plateau"])


def _load_checkpoint(root: Path, model, optimizer, settings: Callable[[], dict]) -> dict | None:
    """Rank 0: model and optimizer from the newest complete checkpoint; its state, or None.

    Raises:
        ValueError: the checkpoint is of another run, listing every difference.
    """
    import tensorflow as tf

    if not (root / LATEST).exists():
        return None
    latest = read_checkpoint_record(root / LATEST, _POINTER_KEYS)
    state = read_checkpoint_record(root / latest["dir"] / "state.json", _STATE_KEYS)
    saved = state.get("settings") or {**state["config"], "ranks": state.get("ranks")}
    differences = resume_differences(saved, settings())
    if differences:
        raise ValueError(
            "it was written by a run with other settings; this run differs in "
            + "; ".join(differences)
            + ". Use the checkpoint's settings, or another --out for a new run"
        )
    optimizer.build(model.trainable_variables)  # slots must exist to be restored
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    prefix = root / latest["dir"] / "ckpt"
    try:
        checkpoint.read(str(prefix)).assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as err:  # TF's do not name the files
        reason = (getattr(err, "message", None) or str(err)).strip().splitlines()[0]
        raise RecordError(f"{prefix}.index / .data-*: cannot be restored ({reason})") from None
    return state


def _finished_metrics(out: Path, config: TrainConfig, state: dict | None) -> RunRecord | None:
    """Rank 0: the run's metrics.json when ``state`` reached --epochs and wrote it, else None."""

    path = out / "metrics.json"
    if state is None or state["epochs_done"] < config.epochs or not path.is_file():
        return None
    metrics = read_json(path, expect=dict)
    # metrics of this checkpoint, not of a shorter run that was then extended
    if len(metrics.get("history") or []) != state["epochs_done"]:
        return None
    return RunRecord.from_dict(metrics)  # a record that is not a training run's fails here

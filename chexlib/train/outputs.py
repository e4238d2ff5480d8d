"""A training run's record (a :class:`~chexlib.core.run_record.RunRecord`) and the files rank 0 writes.

:func:`run_metrics` gathers what every rank measured (throughput windows,
weights digest, pinned cores; Horovod collectives, so every rank calls it and
gets the same record) and adds the run's AUROC, history and environment.
:func:`write_outputs` writes ``params.json``, ``metrics.json``,
``history.csv`` and ``auroc.csv`` into the run folder (rank 0 only).
"""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import numpy as np

from chexlib.core.machine import environment_info
from chexlib.core.run_record import RunRecord
from chexlib.core.runs import write_run_record
from chexlib.data.metadata import LABELS
from chexlib.report.training import auroc_table, history_frame
from chexlib.train.config import TrainConfig
from chexlib.train.process import cores_now, precision_now


def throughput_metrics(config: TrainConfig, throughput) -> dict:
    """Images/s of the run (sum over ranks) and each rank's windows and notes.

    Args:
        config: the run's config.
        throughput: this rank's :class:`chexlib.train.callbacks.ThroughputCallback`.
    """
    import horovod.tensorflow as hvd_tf

    # here: it loads TensorFlow; importing this module does not
    from chexlib.train.callbacks import paired_summary, real_rates, throughput_summary

    c = config
    rates, index, note = throughput.result()
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
            "timed_steps": len(throughput.timed),
            "note": "; ".join(notes) or None,
        },
    }


def final_auroc(config: TrainConfig, history: list[dict], test: dict | None) -> dict:
    """Per-class and mean AUROC of the run: test if evaluated, else the last val."""
    last = history[-1] if history else {}
    if test is not None:
        final, split = test, "test"
    elif last.get("val_auroc"):
        final, split = {k: last.get(f"val_{k}") for k in ("auroc", "auroc_reasons")}, "val"
        final["mean_auroc"] = last.get("val_mean_auroc")
    else:
        reason = (
            "synthetic data: no evaluation"
            if config.synthetic or config.paired_synthetic
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


def weights_digest(model) -> str:
    """sha256 of every model variable: equal on all ranks when they are in sync."""
    digest = hashlib.sha256()
    for var in model.variables:
        digest.update(np.ascontiguousarray(var.numpy()).tobytes())
    return digest.hexdigest()


def run_metrics(
    config: TrainConfig,
    model,
    throughput,
    resumed,
    learning_rate: float,
    steps: int,
    split_sizes: dict,
    test: dict | None,
    started: float,
) -> RunRecord:
    """The run's record (``metrics.json``); every rank calls it and gets the same record.
    ``throughput`` is this rank's :class:`chexlib.train.callbacks.ThroughputCallback`,
    ``resumed`` the run's :class:`chexlib.train.checkpoints.Resumed` (its history now
    complete), ``learning_rate`` the one scaled by ranks, ``split_sizes`` and ``test``
    the evaluation's (empty, None without), ``started`` the run's ``perf_counter()``.
    """
    import horovod.tensorflow as hvd_tf

    seconds = time.perf_counter() - started
    c = config
    speed = throughput_metrics(config, throughput)
    digests = hvd_tf.allgather_object(weights_digest(model))  # Horovod: every rank's weights
    cores = hvd_tf.allgather_object(cores_now())  # Horovod: per rank: pinned or not
    history, ranks = resumed.history, hvd_tf.size()
    last = history[-1] if history else {}
    precision = precision_now()  # inside the run's compute_policy: what it really used
    return RunRecord(
        rank=hvd_tf.rank(),
        ranks=ranks,
        model=c.model,
        source=c.source,
        pipeline=c.pipeline,
        synthetic=c.synthetic,
        image_size=c.image_size,
        batch_size_per_rank=c.batch_size,
        global_batch_size=c.batch_size * ranks,
        learning_rate=learning_rate,
        steps_per_epoch=steps,
        epochs=c.epochs,
        resumed_from_epoch=resumed.start_epoch or None,
        **speed,  # paired windows and images/s
        **final_auroc(config, history, test),
        test_images=test["images"] if test else None,
        test_loss=test["loss"] if test else None,
        val_images=split_sizes.get("val"),
        val_mean_auroc=last.get("val_mean_auroc"),
        val_auroc=last.get("val_auroc"),
        history=history,
        weights_sha256_per_rank=digests,
        weights_in_sync=len(set(digests)) == 1,
        wall_seconds=seconds,
        pin_cores=c.pin_cores,
        cores_per_rank=cores,
        hosts_per_rank=hvd_tf.allgather_object(socket.gethostname()),  # Horovod: each rank's host
        mixed_precision=precision != "float32",
        precision=precision,
        xla=c.xla,
        environment=environment_info(),
    )


def write_outputs(out: Path, config: TrainConfig, record: RunRecord) -> None:
    """params.json, metrics.json (with environment), history.csv and auroc.csv in ``out``."""

    out.mkdir(parents=True, exist_ok=True)
    params = {**config.to_dict(), "ranks": record.ranks}
    write_run_record(out, params, record.to_dict())  # write_json makes NaN and numpy JSON-safe
    history_frame(record).to_csv(out / "history.csv", index=False)
    auroc_table(record).to_csv(out / "auroc.csv")

"""Two input pipelines timed in alternating rounds in one process.

Separate ``chexlib bench-pipeline`` runs are minutes apart, and on a shared
machine the same pipeline's rate drifts by about 10 % from one process to
the next: as much as the difference between chexlib's pipeline and Keras's
``image_dataset_from_directory``. Here each round builds the first pipeline,
warms it up, times it, stops it, then does the same with the second (the
order alternating from round to round), so both meet the same machine state;
the ratio is the median of the per-round ratios, given with its range.

Each pipeline is stopped (its iterator dropped and collected, any libspng
call drained) before the other starts, so neither runs in the background of
the other's window and the process CPU time of a window is its own.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics


def _timed_round(cfg, metadata, warmup: int, batches: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of one fresh pipeline: ``warmup`` batches, then
    ``batches`` batches timed as one window (their total, not a median)."""
    # here: it loads TensorFlow; importing this module does not
    from chexlib.bench.timing import pipeline_batches, time_batches

    # here: it loads TensorFlow; importing this module does not
    from chexlib.pipeline.decode import drain_python_calls

    next_batch, stop = pipeline_batches(cfg, metadata)
    try:
        timing = time_batches(
            next_batch,
            warmup=warmup,
            batches=batches,
            windows=1,
            min_window_sec=cfg.min_window_sec,
        )
    finally:
        stop()
        del next_batch
        gc.collect()
        drain_python_calls(quiet_sec=0.2)
    cpu_ms = 1000 * timing.cpu_sec / timing.images if timing.images else float("nan")
    return timing.window_rates[0], cpu_ms


def paired_rounds(
    cfg, other: str, metadata, rounds: int = 6, warmup: int = 30, batches: int = 30
) -> dict:
    """Time ``cfg.pipeline`` and ``other`` in ``rounds`` alternating rounds.

    A fresh pipeline needs a long warm-up: tf.data's autotuner starts small and
    grows its parallelism and buffers over the first seconds (measured: Keras's
    loader ran its first 12 batches at half its steady rate, at twice the CPU
    time per image, the extra being the buffers it fills ahead), so each round
    pulls ``warmup`` batches before its ``batches`` timed ones.

    Returns:
        ``{"with": other, "rounds", "batches_per_round", "images_per_sec":
        {name: [per round]}, "cpu_ms_per_image": {name: [per round]},
        "ratios": [first / other per round], "ratio": median, "ratio_min",
        "ratio_max"}``. Keras-sequence CPU times are not comparable (its
        workers are processes) and are not asked for here.
    """
    if rounds < 1 or batches < 1:
        raise ValueError(f"rounds and batches must be >= 1, not {rounds} and {batches}")
    names = (cfg.pipeline, other)
    rates: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            one = dataclasses.replace(cfg, pipeline=name, device_rate=None, paired_with="")
            rate, ms = _timed_round(one, metadata, warmup, batches)
            rates[name].append(rate)
            cpu[name].append(ms)
    ratios = [a / b for a, b in zip(rates[names[0]], rates[other], strict=True)]
    return {
        "with": other,
        "rounds": rounds,
        "warmup_batches_per_round": warmup,
        "batches_per_round": batches,
        "images_per_sec": rates,
        "cpu_ms_per_image": cpu,
        "ratios": ratios,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }

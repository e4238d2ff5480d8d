"""Per-stage times of the input pipeline on raw PNG: each stage timed alone, one image
at a time on the calling thread, with the functions the pipelines run.

What a thread of the naive or the optimized pipeline does per batch is these
stages in some order and on some threads; :mod:`chexlib.report.pipeline_timeline`
draws both schedules from this record (notebook 03 writes it into its run record
as ``stage_times``). A stage's time is the median over the images, after one
warm-up call that traces it.
"""

from __future__ import annotations

import statistics
import time

import tensorflow as tf

from chexlib.core.machine import usable_cores
from chexlib.pipeline.builders import parse_batch, parse_element
from chexlib.pipeline.decode import decode_png_reduced

# stage name -> what it is, in the order an image meets them (the last runs per batch)
STAGES = {
    "read file": "tf.io.read_file of the PNG",
    "decode + box-reduce": "decode_png_reduced: PNG bytes to a box-reduced float image",
    "resize + draw flip": "parse_element: antialiased resize to the model size, flip drawn",
    "batch + flips": "stack the batch's images, parse_batch flips the drawn ones",
}
PER_BATCH = ("batch + flips",)


def _median_ms(call, inputs) -> tuple[float, list]:
    call(inputs[0])  # traces the tf.function: not timed
    times, outputs = [], []
    for item in inputs:
        start = time.perf_counter()
        out = call(item)
        _ = out.numpy() if hasattr(out, "numpy") else out  # wait for the result
        times.append(1000 * (time.perf_counter() - start))
        outputs.append(out)
    return statistics.median(times), outputs


def stage_times(
    paths,
    *,
    image_size: int,
    batch_size: int,
    model: str = "densenet121",
    png_decoder: str = "tensorflow",
    images: int = 16,
    batches: int = 3,
) -> dict:
    """Milliseconds of each stage (:data:`STAGES`) on the first ``images`` of ``paths``.

    Returns:
        ``ms_per_image`` (the per-image stages), ``ms_per_batch`` (the per-batch one,
        timed on ``batches`` batches of ``batch_size``), ``images``, ``batch_size``,
        ``image_size``, ``png_decoder``, ``cores`` (this process's) and ``stages``
        (what each one is).
    """
    paths = [str(p) for p in list(paths)[:images]]
    if not paths:
        raise ValueError("stage_times needs at least one PNG path")
    size = int(image_size)
    read = tf.function(tf.io.read_file)
    decode = tf.function(lambda b: decode_png_reduced(b, size, png_decoder))
    element = tf.function(lambda g: parse_element(g, size, True)[0])
    flips = tf.constant([i % 2 == 0 for i in range(batch_size)])
    batch = tf.function(lambda small: parse_batch(tf.stack(small), flips, model, True))
    read_ms, encoded = _median_ms(read, [tf.constant(p) for p in paths])
    decode_ms, grays = _median_ms(decode, encoded)
    element_ms, smalls = _median_ms(element, grays)
    groups = [[smalls[(b * batch_size + i) % len(smalls)] for i in range(batch_size)]
              for b in range(max(2, batches))]  # fmt: skip
    batch_ms, _ = _median_ms(batch, groups)
    return {
        "source": "raw",
        "ms_per_image": {
            "read file": read_ms,
            "decode + box-reduce": decode_ms,
            "resize + draw flip": element_ms,
        },
        "ms_per_batch": {"batch + flips": batch_ms},
        "images": len(paths),
        "batch_size": int(batch_size),
        "image_size": size,
        "png_decoder": png_decoder,
        "cores": usable_cores(),
        "stages": dict(STAGES),
    }

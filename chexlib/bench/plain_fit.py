"""The baseline of ``chexlib bench-loop``: a plain Keras ``fit`` of chexlib's model.

What a Keras user would write, and nothing of chexlib's training loop: the
model of :func:`chexlib.train.models.build_model`, Adam, binary cross-entropy,
``fit`` on the same repeated random batch that ``chexlib train --synthetic``
uses (:func:`chexlib.pipeline.builders.synthetic_dataset`), no Horovod, no
callbacks but the step clock. The clock is chexlib's own
:class:`~chexlib.train.callbacks.ThroughputCallback`, so both sides of the
comparison are timed by the same code over the same steps and windows.

Run as ``python -m chexlib.bench.plain_fit ARGS``; it prints one JSON line:
``{"images_per_sec": median of the window rates, "windows": [...], ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys


def plain_fit(
    model: str,
    image_size: int,
    batch_size: int,
    warmup_steps: int,
    window_steps: int,
    windows: int,
    precision: str = "float32",
    verbose: int = 1,
    seed: int = 0,
) -> dict:
    """Train ``warmup_steps + windows x window_steps`` steps; the rate of each window."""
    import numpy as np
    import tensorflow as tf

    # here: it loads TensorFlow; importing this module does not
    from chexlib.pipeline.builders import synthetic_dataset

    # here: it loads TensorFlow; importing this module does not
    from chexlib.train.callbacks import ThroughputCallback, measured_rates

    # here: it loads TensorFlow; importing this module does not
    from chexlib.train.models import build_model
    from chexlib.train.process import KERAS_POLICIES  # the policy chexlib train sets

    tf.keras.mixed_precision.set_global_policy(KERAS_POLICIES[precision])
    tf.keras.utils.set_random_seed(seed)
    net = build_model(model, image_size)
    net.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    clock = ThroughputCallback(batch_size, warmup_steps, window_steps)
    steps = warmup_steps + windows * window_steps
    data = synthetic_dataset(batch_size, image_size, seed=seed)
    net.fit(data, steps_per_epoch=steps, epochs=1, callbacks=[clock], verbose=verbose)
    rates, _, note = measured_rates(clock.timed, clock.warm, batch_size, window_steps)
    return {
        "images_per_sec": float(np.median(rates)) if rates else None,
        "windows": [float(r) for r in rates],
        "note": note,
        "precision": precision,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chexlib.bench.plain_fit", description=__doc__)
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--window-steps", type=int, default=3)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    args = parser.parse_args(argv)
    result = plain_fit(
        args.model,
        args.image_size,
        args.batch_size,
        args.warmup_steps,
        args.window_steps,
        args.windows,
        args.precision,
        args.verbose,
    )
    print(json.dumps(result), flush=True)  # the last line of stdout: what bench-loop reads
    return 0


if __name__ == "__main__":
    sys.exit(main())

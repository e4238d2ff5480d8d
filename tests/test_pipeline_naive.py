"""The naive pipeline stays naive: none of TensorFlow's rewrites may add overlap to it."""

from __future__ import annotations

from chexlib.pipeline import builders


def _rewrites(ds) -> dict:
    o = ds.options().experimental_optimization
    return {
        "map_parallelization": o.map_parallelization,
        "inject_prefetch": o.inject_prefetch,
        "map_and_batch_fusion": o.map_and_batch_fusion,
    }


def test_naive_switches_off_every_rewrite_that_overlaps_work(synth_metadata):
    common = dict(metadata=synth_metadata, batch_size=4, image_size=32, training=True)
    naive = builders.build_dataset("raw", "train", pipeline="naive", **common)
    optimized = builders.build_dataset("raw", "train", pipeline="optimized", **common)
    # a fused map+batch runs ahead of its consumer in its own thread: a hidden prefetch
    assert _rewrites(naive) == dict.fromkeys(_rewrites(naive), False)
    assert _rewrites(optimized) == dict.fromkeys(_rewrites(optimized), True)

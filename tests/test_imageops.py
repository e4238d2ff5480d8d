"""Decoding and resizing (chexlib.pipeline.decode, chexlib.pipeline.spng) on real-size images."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import tensorflow as tf
from conftest import require
from PIL import Image

from chexlib.pipeline import decode as pipeline_decode
from chexlib.pipeline import spng
from chexlib.synth.image import encode_png, render_image


@pytest.fixture()
def _spng():
    """libspng (pyspng-seunglab, a declared dependency): skipped without it, failed in CI."""
    require(spng.available(), f"libspng cannot be called: {spng.unavailable_reason()}")


needs_spng = pytest.mark.usefixtures("_spng")


@pytest.fixture(scope="module")
def radiographs() -> list[bytes]:
    """Three generated 1024 x 1024 radiographs (NIH's size), as PNG bytes."""
    findings = [(), ("Mass", "Effusion"), ("Cardiomegaly",)]
    return [
        encode_png(render_image(f, 1024, 3, i, i + 1, "PA", "M")) for i, f in enumerate(findings)
    ]


def _reference(encoded: bytes, size: int) -> np.ndarray:
    """TensorFlow's own antialiased bilinear resize, rounded to uint8."""
    gray = tf.io.decode_png(encoded, channels=1)
    out = tf.image.resize(gray, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8).numpy()


@pytest.mark.parametrize("size", [224, 256, 320])
def test_fast_antialias_matches_the_reference_within_three_levels(radiographs, size):
    # the stated tolerance: no pixel off by more than 3 grey levels, mean under 0.2
    # (a 4 x 4 box where the reference uses a triangle filter 8 px wide; measured
    # on generated radiographs: max 2-3, mean 0.10-0.13; plain bilinear: max 5-7,
    # mean 0.35-0.46)
    for encoded in radiographs:
        fast = pipeline_decode.resize_gray(pipeline_decode.decode_png_gray(encoded), size).numpy()
        diff = np.abs(fast.astype(int) - _reference(encoded, size).astype(int))
        assert fast.shape == (size, size, 1) and fast.dtype == np.uint8
        assert diff.max() <= 3, (size, diff.max())
        assert diff.mean() < 0.2, (size, diff.mean())


def test_without_antialiasing_the_same_check_fails(radiographs):
    # the tolerance above is tight enough to tell a plain bilinear resize apart
    gray = tf.io.decode_png(radiographs[1], channels=1)
    plain = tf.cast(tf.round(tf.image.resize(gray, [224, 224])), tf.uint8).numpy()
    diff = np.abs(plain.astype(int) - _reference(radiographs[1], 224).astype(int))
    assert diff.max() > 3 or diff.mean() >= 0.2


@needs_spng
def test_both_decoders_give_identical_pixels(radiographs):
    for encoded in radiographs:
        ours = pipeline_decode.decode_png_gray(encoded, "libspng").numpy()
        theirs = pipeline_decode.decode_png_gray(encoded, "tensorflow").numpy()
        assert ours.dtype == np.uint8 and ours.shape == theirs.shape == (1024, 1024, 1)
        np.testing.assert_array_equal(ours, theirs)
        reduced = [
            pipeline_decode.decode_png_reduced(encoded, 224, d).numpy() for d in DECODERS_USED
        ]
        np.testing.assert_array_equal(reduced[0], reduced[1])


DECODERS_USED = ("libspng", "tensorflow")


def _png(array: np.ndarray, mode: str | None, **save) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode)
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


@needs_spng
@pytest.mark.parametrize("layout", ["RGB", "RGBA", "I;16", "P", "interlaced-L"])
def test_libspng_leaves_other_layouts_to_tensorflow(layout):
    rng = np.random.default_rng(0)
    if layout in ("RGB", "RGBA"):
        data = _png(rng.integers(0, 256, (40, 30, len(layout)), dtype=np.uint8), layout)
    elif layout == "I;16":
        data = _png(rng.integers(0, 65536, (40, 30), dtype=np.uint16), None)
    elif layout == "P":
        rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), "RGB")
        data = _png(np.asarray(rgb.convert("P", palette=Image.Palette.ADAPTIVE)), "P")
    else:
        data = _png(rng.integers(0, 256, (40, 30), dtype=np.uint8), "L", interlace=1)
    ours = pipeline_decode.decode_png_gray(data, "libspng").numpy()
    np.testing.assert_array_equal(ours, tf.io.decode_png(data, channels=1).numpy())


@needs_spng
def test_a_corrupt_png_is_an_error_from_either_decoder(radiographs):
    broken = radiographs[0][: len(radiographs[0]) // 2]
    for decoder in DECODERS_USED:  # inside tf.data both surface as InvalidArgumentError
        decode = tf.function(lambda e, d=decoder: pipeline_decode.decode_png_gray(e, d))
        with pytest.raises(tf.errors.InvalidArgumentError):
            decode(tf.constant(broken)).numpy()
    with pytest.raises(ValueError, match="libspng"):
        spng.decode_gray8(broken)


@needs_spng
def test_libspng_decodes_without_holding_the_gil():
    # a 4096 px PNG takes tens of milliseconds to decode; if the GIL were held,
    # this thread could not run a single Python line until the decode returned
    big = _png(np.random.default_rng(1).integers(0, 256, (4096, 4096), dtype=np.uint8), "L")
    started, done, ticks = threading.Event(), threading.Event(), [0]

    def decode():
        started.set()
        spng.decode_gray8(big)
        done.set()

    worker = threading.Thread(target=decode)
    worker.start()
    started.wait()
    while not done.is_set():
        ticks[0] += 1
    worker.join()
    assert ticks[0] > 10_000, f"main thread ran {ticks[0]} loop steps during the decode"


@pytest.mark.parametrize(
    ("height", "width", "size", "factor"),
    [
        (1024, 1024, 224, 4),
        (1024, 1024, 256, 4),
        (1024, 1024, 512, 2),
        (1000, 1000, 224, 4),
        (1023, 1023, 224, 3),
        (1021, 1021, 224, 1),
        (224, 224, 224, 1),
        (100, 100, 224, 1),
    ],
)
def test_box_factor_is_the_largest_whole_divisor_keeping_the_size(height, width, size, factor):
    assert pipeline_decode.box_factor(height, width, size) == factor
    gray = np.random.default_rng(2).integers(0, 256, (height, width), dtype=np.uint8)
    out = pipeline_decode.box_reduce_numpy(gray, size)
    f = factor
    expected = gray.reshape(height // f, f, width // f, f).astype(np.float64).mean((1, 3))
    np.testing.assert_allclose(out, expected, atol=1e-4)
    in_graph = pipeline_decode.box_reduce(tf.constant(gray[..., None]), size).numpy()[..., 0]
    np.testing.assert_allclose(in_graph, expected, atol=1e-3)


def test_an_image_at_the_model_size_passes_through_untouched():
    gray = tf.constant(np.random.default_rng(3).integers(0, 256, (224, 224, 1), dtype=np.uint8))
    assert np.array_equal(pipeline_decode.resize_gray(gray, 224).numpy(), gray.numpy())


def test_unknown_or_unavailable_decoders_are_named():
    with pytest.raises(ValueError, match="png decoder must be one of"):
        pipeline_decode.resolve_decoder("pillow")
    assert pipeline_decode.resolve_decoder("auto") in ("libspng", "tensorflow")


EXIT_WHILE_BUSY = """
import sys
import tensorflow as tf
from chexlib.pipeline import decode
paths = sys.argv[1:]
ds = tf.data.Dataset.from_tensor_slices(paths).repeat().map(
    lambda p: decode.decode_png_reduced(tf.io.read_file(p), 224, "libspng"),
    num_parallel_calls=tf.data.AUTOTUNE).batch(8).prefetch(tf.data.AUTOTUNE)
iterator = iter(ds)
next(iterator)
print("leaving with the pipeline busy", flush=True)
"""


@needs_spng
def test_a_process_exits_while_its_libspng_pipeline_is_busy(radiographs, tmp_path):
    # without the exit drain the interpreter's finalization waits forever for
    # tf.numpy_function calls that can no longer take the GIL (3 hangs in 3 runs)
    import subprocess
    import sys

    paths = []
    for i, encoded in enumerate(radiographs):
        path = tmp_path / f"{i}.png"
        path.write_bytes(encoded)
        paths.append(str(path))
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", EXIT_WHILE_BUSY, *paths],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "leaving with the pipeline busy" in done.stdout


def test_drain_returns_at_once_when_nothing_runs():
    assert pipeline_decode.drain_python_calls(quiet_sec=0.0, limit_sec=1.0)

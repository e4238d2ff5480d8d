"""Decoding and resizing one grey image: the per-element work of every pipeline.

Decoding (``decode_*``): PNG bytes -> one 8-bit channel, by TensorFlow's
``decode_png`` or by libspng (:mod:`chexlib.pipeline.spng`, about 0.7 of the time on
NIH's 8-bit grey PNGs, called without the GIL so map threads decode in
parallel). Both give identical pixels; TensorFlow's decoder is the fallback
and handles every other PNG layout (RGB, RGBA, palette, 16-bit).

Resizing (:func:`resize_gray`): bilinear WITH antialiasing, as
``tf.image.resize(..., antialias=True)`` does (each output pixel averages
the whole area it covers, so fine structure in a 1024 px radiograph does not
alias into a 224 px one), at a fraction of its cost:

1. a box reduction by the largest whole factor ``f`` that divides the image
   and leaves at least ``size`` pixels (1024 -> 256 for 224: each output is
   the exact mean of 4 x 4 pixels, the antialiasing);
2. a plain bilinear resize over the small remaining factor (256 -> 224), with
   antialiasing only when that factor is 1.5 or more (sizes without a large
   whole divisor).

Measured on one core, 1024 -> 224 px: 2.6 ms with ``antialias=True``, about
1 ms this way (0.3 ms of it when libspng's decode does step 1 in NumPy);
the largest difference from the reference is 2-3 grey levels at 224-320 px,
the mean 0.10-0.13 (a 4 x 4 box where the reference uses a triangle filter;
plain bilinear: 5-7 and 0.35-0.46); tests/test_imageops.py checks both on
real-size images.
"""

from __future__ import annotations

import atexit
import functools
import re
import threading
import time

import numpy as np
import tensorflow as tf

from chexlib.data.png import PNG_SIGNATURE
from chexlib.pipeline import spng

DECODERS = ("auto", "tensorflow", "libspng")
# residual factor after the box reduction above which the bilinear step antialiases too
ANTIALIAS_FROM = 1.5


def resolve_decoder(decoder: str) -> str:
    """``auto`` -> ``libspng`` when it can be called, else ``tensorflow``.

    Raises:
        ValueError: an unknown name, or ``libspng`` asked for and not available.
    """
    if decoder not in DECODERS:
        raise ValueError(f"png decoder must be one of {DECODERS}, not {decoder!r}")
    if decoder == "auto":
        return "libspng" if spng.available() else "tensorflow"
    if decoder == "libspng" and not spng.available():
        raise ValueError(f"png decoder 'libspng' asked for, but {spng.unavailable_reason()}")
    return decoder


# --- the box factor ---------------------------------------------------------------


def box_factor(height: int, width: int, size: int) -> int:
    """Largest whole ``f`` dividing both sides with ``min(height, width) // f >= size`` (>= 1)."""
    for f in range(max(1, min(height, width) // size), 1, -1):
        if height % f == 0 and width % f == 0:
            return f
    return 1


def _box_factor_tf(height: tf.Tensor, width: tf.Tensor, size: int) -> tf.Tensor:
    """:func:`box_factor` on int32 tensors."""
    candidates = tf.range(tf.maximum(tf.minimum(height, width) // size, 1), 0, -1)
    divides = tf.logical_and(tf.equal(height % candidates, 0), tf.equal(width % candidates, 0))
    return tf.boolean_mask(candidates, divides)[0]  # 1 always divides


def box_reduce_numpy(gray: np.ndarray, size: int) -> np.ndarray:
    """``uint8 [H, W]`` -> ``float32 [H/f, W/f]``: means of ``f x f`` blocks (``f`` = :func:`box_factor`)."""
    f = box_factor(gray.shape[0], gray.shape[1], size)
    if f == 1:
        return gray.astype(np.float32)
    wide = np.uint16 if f * f <= 257 else np.uint32  # 257 x 255 fits in 16 bits
    # strided adds, one pass over the image (NumPy releases the GIL inside them)
    rows = np.add(gray[0::f], gray[1::f], dtype=wide)
    for i in range(2, f):
        rows += gray[i::f]
    blocks = rows[:, 0::f] + rows[:, 1::f]
    for j in range(2, f):
        blocks += rows[:, j::f]
    return blocks.astype(np.float32) * np.float32(1.0 / (f * f))


def box_reduce(gray: tf.Tensor, size: int) -> tf.Tensor:
    """``uint8 [H, W, 1]`` -> ``float32 [H/f, W/f, 1]``, as :func:`box_reduce_numpy`.

    ``method="area"`` with a whole factor averages exactly the ``f x f`` block
    of each output pixel.
    """
    shape = tf.shape(gray)
    f = _box_factor_tf(shape[0], shape[1], size)
    return tf.image.resize(gray, [shape[0] // f, shape[1] // f], method="area")


# --- libspng calls inside tf.data, and a clean exit ----------------------------------
#
# A tf.data map that calls Python (tf.numpy_function) must not be busy when the
# interpreter finalizes: its worker threads can no longer take the GIL, so the
# iterator's destructor waits forever for calls that never finish (measured: a
# script that exits right after its first batch hung 3 times out of 3). Every
# libspng call is counted; an atexit hook (which runs before finalization) waits
# until no call has been running for a moment: the producers have filled their
# buffers and stopped, and the destructor then has nothing to wait for.


class _Calls:
    lock = threading.Lock()
    running = 0
    last_active = 0.0  # time.monotonic() of the last start or end
    hooked = False


def _counted(fn):
    """``fn`` with its calls counted for :func:`drain_python_calls`."""

    @functools.wraps(fn)
    def call(*args):
        with _Calls.lock:
            _Calls.running += 1
            _Calls.last_active = time.monotonic()
        try:
            return fn(*args)
        finally:
            with _Calls.lock:
                _Calls.running -= 1
                _Calls.last_active = time.monotonic()

    with _Calls.lock:
        if not _Calls.hooked:
            atexit.register(drain_python_calls)
            _Calls.hooked = True
    return call


def drain_python_calls(quiet_sec: float = 0.5, limit_sec: float = 60.0) -> bool:
    """Wait until no libspng call has run for ``quiet_sec`` (at most ``limit_sec``).

    Returns True when quiet. Called at exit; safe to call any time.
    """
    deadline = time.monotonic() + limit_sec
    while time.monotonic() < deadline:
        with _Calls.lock:
            quiet = _Calls.running == 0 and time.monotonic() - _Calls.last_active >= quiet_sec
        if quiet:
            return True
        time.sleep(0.05)  # releases the GIL: the running calls finish
    return False


# --- naming the image a decode failed on ---------------------------------------------
#
# A failure inside a tf.data map reaches the caller as a TensorFlow error naming an op,
# not the element. Given the element's ``name`` (a file's path, a record's image), the
# decoders below first check the PNG signature (a string compare: tf.io.decode_png
# fails on HTML or GIF bytes and silently decodes JPEG bytes, which chexlib validate
# and convert refuse), and libspng's errors carry the name; both fail with
# ``<<chexlib bad image|NAME|REASON>>`` in the message, which :func:`bad_image` finds.

_BAD_IMAGE = re.compile(r"<<chexlib bad image\|([^\n]*)\|([^|\n]*?)>>")


def bad_image(message: str) -> str | None:
    """``"NAME: reason"`` when a TensorFlow error message is a decode failure of a named
    image (see above), else None."""
    found = _BAD_IMAGE.search(message)
    return f"{found.group(1)}: {found.group(2)}" if found else None


def _marked(name, reason) -> list:
    """The failure's text in parts (strings or string tensors) to join."""
    return ["<<chexlib bad image|", name, "|", reason, ">>"]


def _signature_checked(encoded: tf.Tensor, name: tf.Tensor) -> tf.Tensor:
    """``encoded``, once its first bytes are PNG's signature (else a named failure)."""
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(PNG_SIGNATURE)), PNG_SIGNATURE)
    reason = "not a PNG file (no PNG signature; `chexlib validate` names its format)"
    check = tf.debugging.Assert(is_png, [tf.strings.join(_marked(name, reason))])
    with tf.control_dependencies([check]):
        return tf.identity(encoded)


def _with_error(fn, dtype):
    """``fn(data)`` as ``call(data) -> (result, b"")``, or ``(empty, reason)`` when it
    raises: the failure is reported by an assertion naming the image, not by a Python
    exception inside TensorFlow (which logs its traceback)."""

    @functools.wraps(fn)
    def call(data):
        try:
            return fn(data), b""
        except Exception as err:  # noqa: BLE001 -- any decode failure, named after
            return np.zeros((0, 0), dtype.as_numpy_dtype), str(err).encode(errors="replace")

    return call


def _spng_call(fn, encoded: tf.Tensor, name: tf.Tensor | None, dtype) -> tf.Tensor:
    """``fn(encoded bytes)`` through ``tf.numpy_function``, counted, its errors naming ``name``."""
    if name is None:
        return tf.numpy_function(_counted(fn), [encoded], dtype, stateful=False)
    out, error = tf.numpy_function(
        _counted(_with_error(fn, dtype)), [encoded], [dtype, tf.string], stateful=False
    )
    reason = tf.strings.join(["cannot decode (", error, ")"])
    check = tf.debugging.Assert(tf.equal(error, ""), [tf.strings.join(_marked(name, reason))])
    with tf.control_dependencies([check]):
        return tf.identity(out)


# --- decoding ---------------------------------------------------------------------


def decode_png_gray(
    encoded: tf.Tensor, decoder: str = "tensorflow", name: tf.Tensor | None = None
) -> tf.Tensor:
    """PNG bytes -> ``uint8 [H, W, 1]`` (RGB/RGBA reduced to luma, 16-bit scaled to 8).

    ``name`` (a string tensor: the file or record): bytes that are not a PNG, or that
    libspng cannot decode, fail with an error naming it (:func:`bad_image`).
    """
    if name is not None:
        encoded = _signature_checked(encoded, name)
    if resolve_decoder(decoder) == "tensorflow":
        return tf.io.decode_png(encoded, channels=1, dtype=tf.uint8)

    def with_spng():
        gray = _spng_call(spng.decode_gray8, encoded, name, tf.uint8)
        return tf.ensure_shape(gray, [None, None])[..., tf.newaxis]

    return _by_layout(encoded, with_spng, lambda: tf.io.decode_png(encoded, channels=1))


def decode_png_reduced(
    encoded: tf.Tensor, size: int, decoder: str = "tensorflow", name: tf.Tensor | None = None
) -> tf.Tensor:
    """PNG bytes -> ``float32 [H/f, W/f, 1]``: decoded and box-reduced (:func:`box_reduce`).

    With libspng both steps run in one NumPy call without the GIL; the result
    equals TensorFlow's decode followed by :func:`box_reduce`. ``name``: as in
    :func:`decode_png_gray`.
    """
    if name is not None:
        encoded = _signature_checked(encoded, name)
    if resolve_decoder(decoder) == "tensorflow":
        return box_reduce(decode_png_gray(encoded), size)

    def with_spng():
        def decode(data):
            return box_reduce_numpy(spng.decode_gray8(data), size)

        small = _spng_call(decode, encoded, name, tf.float32)
        return tf.ensure_shape(small, [None, None])[..., tf.newaxis]

    return _by_layout(encoded, with_spng, lambda: box_reduce(decode_png_gray(encoded), size))


def _by_layout(encoded: tf.Tensor, gray8, other) -> tf.Tensor:
    """``gray8()`` for an 8-bit grey PNG (header bytes 24-25), ``other()`` for anything else."""
    head = tf.strings.substr(tf.strings.substr(encoded, 0, 26, unit="BYTE") + b"\0" * 26, 24, 2)
    depth_colour = tf.io.decode_raw(head, tf.uint8)
    is_gray8 = tf.logical_and(
        tf.equal(tf.strings.substr(encoded, 0, 8), b"\x89PNG\r\n\x1a\n"),
        tf.reduce_all(tf.equal(depth_colour, tf.constant([8, 0], tf.uint8))),
    )
    return tf.cond(is_gray8, gray8, other)


# --- resizing ---------------------------------------------------------------------


def resize_gray(image: tf.Tensor, size: int) -> tf.Tensor:
    """``[H, W, 1]`` -> ``uint8 [S, S, 1]``: antialiased bilinear, rounded (see the module docstring).

    ``image`` is a decoded ``uint8`` image or a box-reduced ``float32`` one
    (:func:`decode_png_reduced`). A ``uint8`` image already ``S x S``
    (compact records written at the training size) passes through untouched.
    """
    if image.dtype == tf.uint8:
        height, width = image.shape[0], image.shape[1]
        if (height, width) == (size, size):  # static shape: decided while tracing
            return image
        if height is None or width is None:
            shape = tf.shape(image)
            same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
            out = tf.cond(
                same, lambda: tf.identity(image), lambda: _finish(box_reduce(image, size), size)
            )
            return tf.ensure_shape(out, [size, size, 1])
        image = box_reduce(image, size)
    return _finish(image, size)


def _finish(small: tf.Tensor, size: int) -> tf.Tensor:
    """``float32 [h, w, 1]`` (after the box step) -> ``uint8 [S, S, 1]``."""
    shape = tf.shape(small)
    residual = tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) / size
    out = tf.cond(
        residual >= ANTIALIAS_FROM,
        lambda: tf.image.resize(small, [size, size], method="bilinear", antialias=True),
        lambda: tf.image.resize(small, [size, size], method="bilinear"),
    )
    out = tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(out, [size, size, 1])

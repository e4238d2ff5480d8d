"""libspng, the fastest PNG decoder measured here, called without Python's GIL.

On 1024 x 1024 8-bit grey PNGs (one core) libspng decodes in about 0.7 of
TensorFlow's ``decode_png`` time. It only helps inside tf.data if several map
threads can decode at once, and the ``pyspng`` binding holds the GIL while it
decodes (measured: a Python thread running beside it gets half its normal
rate; beside this module it keeps its full rate). So this module calls the
same C functions through ``ctypes``, which releases the GIL for the length of
each foreign call.

The library is the one compiled into the ``pyspng-seunglab`` wheel (its
``_pyspng_c`` extension exports libspng's C API). When the wheel is missing, or
its symbols are not what this module expects, :func:`available` is False,
:func:`unavailable_reason` says why, and chexlib decodes with TensorFlow.

Only 8-bit grey PNGs (NIH's format) go through libspng; RGB, RGBA, palette,
16-bit and low-bit-depth images keep TensorFlow's decoder, whose conversion
to one channel is the reference.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util

import numpy as np

_FMT_G8 = 64  # enum spng_format: 8-bit grey output
_CRC_USE = 2  # enum spng_crc_action: do not compute chunk CRCs (as pyspng); zlib's Adler-32 still checks the pixels
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Ihdr(ctypes.Structure):
    _fields_ = [
        ("width", ctypes.c_uint32),
        ("height", ctypes.c_uint32),
        ("bit_depth", ctypes.c_uint8),
        ("color_type", ctypes.c_uint8),
        ("compression_method", ctypes.c_uint8),
        ("filter_method", ctypes.c_uint8),
        ("interlace_method", ctypes.c_uint8),
    ]


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not)."""
    spec = importlib.util.find_spec("_pyspng_c")
    if spec is None or not spec.origin:
        return None, "pyspng-seunglab is not installed"
    try:
        lib = ctypes.CDLL(spec.origin)  # CDLL (not PyDLL): calls release the GIL
        c_void_p, c_size_t, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        signatures = {
            "spng_ctx_new": ([c_int], c_void_p),
            "spng_ctx_free": ([c_void_p], None),
            "spng_set_crc_action": ([c_void_p, c_int, c_int], c_int),
            "spng_set_png_buffer": ([c_void_p, c_void_p, c_size_t], c_int),
            "spng_get_ihdr": ([c_void_p, ctypes.POINTER(_Ihdr)], c_int),
            "spng_decode_image": ([c_void_p, c_void_p, c_size_t, c_int, c_int], c_int),
            "spng_strerror": ([c_int], ctypes.c_char_p),
        }
        for name, (args, result) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, result
    except (OSError, AttributeError) as e:
        return None, f"libspng in {spec.origin} is not usable: {e}"
    return lib, ""


def available() -> bool:
    """True when libspng can be called (see :func:`unavailable_reason` otherwise)."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why libspng is not used ("" when it is)."""
    return _load()[1]


def _as_buffer(data) -> np.ndarray:
    """The PNG's bytes as a 1-d ``uint8`` array, without a copy: from ``bytes`` or
    from the 0-d byte-string array ``tf.numpy_function`` passes."""
    if isinstance(data, np.ndarray):
        return data if data.dtype == np.uint8 else data.reshape(1).view(np.uint8)
    return np.frombuffer(data, np.uint8)


def is_gray8(data) -> bool:
    """True for a PNG whose header says 8-bit greyscale (colour type 0)."""
    head = _as_buffer(data)[:26].tobytes()
    # signature (8), IHDR length and type (8), width (4), height (4), bit depth, colour type
    return len(head) == 26 and head[:8] == _PNG_SIGNATURE and head[24] == 8 and head[25] == 0


def decode_gray8(data) -> np.ndarray:
    """An 8-bit grey PNG -> ``uint8 [H, W]``, the GIL released while libspng decodes.

    Raises:
        ValueError: not an 8-bit grey PNG, or libspng reports an error (its message).
        RuntimeError: libspng is not available.
    """
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"libspng is not available: {why}")
    buffer = _as_buffer(data)  # read in place: libspng gets its address
    if not is_gray8(buffer):
        raise ValueError("not an 8-bit greyscale PNG")
    ctx = lib.spng_ctx_new(0)
    if not ctx:
        raise MemoryError("libspng could not allocate a decoder")
    try:
        _check(lib, lib.spng_set_crc_action(ctx, _CRC_USE, _CRC_USE))
        _check(lib, lib.spng_set_png_buffer(ctx, buffer.ctypes.data, buffer.nbytes))
        ihdr = _Ihdr()
        _check(lib, lib.spng_get_ihdr(ctx, ctypes.byref(ihdr)))
        out = np.empty((ihdr.height, ihdr.width), np.uint8)
        _check(lib, lib.spng_decode_image(ctx, out.ctypes.data, out.nbytes, _FMT_G8, 0))
        return out
    finally:
        lib.spng_ctx_free(ctx)


def _check(lib, code: int) -> None:
    if code != 0:
        raise ValueError(f"libspng: {lib.spng_strerror(code).decode(errors='replace')}")

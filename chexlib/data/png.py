"""Decoding chest X-rays to one 8-bit channel, whatever the stored layout.

ChestX-ray14 is 8-bit grayscale, but a few of its PNGs are stored as RGB or
RGBA, and other sources give 16-bit grayscale. Everything in chexlib sees the
same thing: a ``uint8`` array of shape ``(height, width)``. The tf.data path
(``chexlib.pipeline.builders``) decodes with ``tf.io.decode_png(channels=1)``, which
applies the same rules; tests pin that the two agree.

:func:`check_png` is the gate in front of both: ``chexlib validate`` and
``chexlib convert`` accept a file only if it is a PNG by its signature, its
header is sane (no decompression bomb) and every row decodes.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# PIL modes holding more than 8 bits per sample in one channel.
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# What PIL raises on a bad file (a DecompressionBombError is not an OSError).
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def to_grayscale_u8(img: Image.Image) -> np.ndarray:
    """Return an opened PIL image as a ``uint8`` (H, W) array.

    Colour is reduced to luma (ITU-R 601), alpha is dropped, and 16-bit
    samples are scaled to 8 bits by rounding ``v / 257`` (as libpng does).
    """
    if img.mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if img.mode in _WIDE_MODES:
        wide = np.asarray(img).astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).clip(0, 255).astype(np.uint8)
    if img.mode in ("LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr"):
        img = img.convert("RGB")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def read_grayscale(path: str | Path) -> np.ndarray:
    """Decode an image file fully (every chunk checked) to ``uint8`` (H, W).

    Raises:
        OSError: the file is missing, truncated or not an image; the message
            names the file.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decodes every row: truncated files fail here
            return to_grayscale_u8(img)
    except _PIL_ERRORS as err:
        raise OSError(f"{path}: cannot decode image ({err})") from err


def decode_grayscale(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Like :func:`read_grayscale` for encoded bytes already in memory."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_grayscale_u8(img)
    except _PIL_ERRORS as err:
        raise OSError(f"{name}: cannot decode image ({err})") from err


# --- checking a file the way training decodes it -----------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Most pixels chexlib decodes from one file: 8192 x 8192 (NIH images are 1024 x 1024).
# A header claiming more is refused before any decode, as a decompression bomb.
MAX_PIXELS = 8192 * 8192
# First bytes of the formats most often found under a .png name.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "RIFF/WebP"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\x97JB2", "JBIG2"),
)


class BadImage(OSError):
    """A file that training could not decode; the message is ``"PATH: reason"``."""


def sniff_format(head: bytes) -> str:
    """Name the format of a file from its first bytes: ``"PNG"``, ``"JPEG"``, ... or ``"unknown"``."""
    if head.startswith(PNG_SIGNATURE):
        return "PNG"
    return next((name for sig, name in _SIGNATURES if head.startswith(sig)), "unknown")


def png_header_problem(data: bytes) -> str | None:
    """Why ``tf.io.decode_png`` would refuse ``data`` from its first 33 bytes, or None.

    Checks, before any decode: the PNG signature, a well-formed IHDR chunk
    with its CRC, and a pixel count below :data:`MAX_PIXELS`. Only PNG is
    accepted: ``tf.io.decode_png(channels=1)`` fails in training on GIF, BMP
    and TIFF bytes, and decodes JPEG bytes, which would then sit in records
    labelled ``image/format`` png (and are lossy copies, not NIH's files).
    """
    if not data:
        return "empty file (0 bytes)"
    if not data.startswith(PNG_SIGNATURE):
        fmt = sniff_format(data[:16])
        return (
            f"wrong format: {fmt}, not PNG"
            if fmt != "unknown"
            else "not a PNG file (bad signature)"
        )
    if len(data) < 33:
        return f"truncated PNG: {len(data)} bytes, no complete IHDR header"
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        return "corrupt PNG: the first chunk is not a 13-byte IHDR"
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        return "corrupt PNG: bad CRC in the IHDR header"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if width == 0 or height == 0:
        return f"corrupt PNG: header claims {width}x{height} pixels"
    if width * height > MAX_PIXELS:
        return (
            f"decompression bomb: header claims {width}x{height} "
            f"({width * height:,} pixels), above the limit of {MAX_PIXELS:,}"
        )
    if depth not in (1, 2, 4, 8, 16) or colour not in (0, 2, 3, 4, 6):
        return f"corrupt PNG: bit depth {depth} / colour type {colour} in the header"
    return None


def check_png(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, str]:
    """Check and fully decode PNG bytes as training will; return (gray ``uint8``, layout).

    The signature and header checks (:func:`png_header_problem`) are what
    separate what ``tf.io.decode_png`` accepts; PIL then decodes every row
    (truncated or corrupt data fails), which is much cheaper than TensorFlow
    in a worker process. ``layout`` is e.g. ``"L 1024x1024"``.

    Raises:
        BadImage: the message names ``name`` and the reason; never another
            exception, whatever the bytes.
    """
    problem = png_header_problem(data)
    if problem:
        raise BadImage(f"{name}: {problem}")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            layout = f"{img.mode} {img.width}x{img.height}"
            img.load()  # decodes every row: truncated files fail here
            return to_grayscale_u8(img), layout
    except Exception as err:  # noqa: BLE001 -- PIL raises many types on hostile bytes
        raise BadImage(f"{name}: cannot decode image ({type(err).__name__}: {err})") from err


def read_png(path: str | Path) -> tuple[np.ndarray, str]:
    """:func:`check_png` on a file; a missing or unreadable file is a :class:`BadImage` too."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise BadImage(f"{path}: cannot read file ({err.strerror or err})") from err
    return check_png(data, name=str(path))

"""Decoding chest X-rays to one 8-bit channel, whatever the stored layout.

ChestX-ray14 is 8-bit grayscale, but a few of its PNGs are stored as RGB or
RGBA, and other sources give 16-bit grayscale. Everything in chexlib sees the
same thing: a ``uint8`` array of shape ``(height, width)``. The tf.data path
(``chexlib.pipeline``) decodes with ``tf.io.decode_png(channels=1)``, which
applies the same rules; tests pin that the two agree.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# PIL modes holding more than 8 bits per sample in one channel.
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


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
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three
        raise OSError(f"{path}: cannot decode image ({err})") from err


def decode_grayscale(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Like :func:`read_grayscale` for encoded bytes already in memory."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_grayscale_u8(img)
    except (OSError, ValueError, SyntaxError) as err:
        raise OSError(f"{name}: cannot decode image ({err})") from err


def describe_layout(path: str | Path) -> str:
    """A short name of how a file is stored, e.g. ``"L"`` or ``"RGBA"``."""
    with Image.open(path) as img:
        return img.mode

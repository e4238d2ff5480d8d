"""One TFRecord of ChestX-ray14: the schema, and its bytes written without TensorFlow.

Conversion workers write records without importing TensorFlow (3-6 s and
~450 MB per process): ``tf.train.Example`` is a fixed, small protobuf, encoded
here by hand (:func:`encode_example`), and the TFRecord framing
(:func:`frame_record`) needs only CRC-32C, taken from TensorFlow's own shared
library through ctypes when possible (a NumPy implementation is the
fallback). TensorFlow itself reads every record back in the tests and in
:func:`chexlib.records.read.verify_records`; the reading side, with the parser of
:data:`SCHEMA`, is :mod:`chexlib.records.read`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import struct
from pathlib import Path

import numpy as np

# Bump when the bytes written for the same settings change: old shards are then stale.
SCHEMA_VERSION = 1

SCHEMA: dict[str, str] = {
    "image/encoded": "bytes: the PNG file (png variant) or the resized image as raw uint8 rows or JPEG (compact)",
    "image/format": 'bytes: b"png", b"jpeg" or b"raw" (one value for a whole conversion)',
    "image/height": "int64: rows of the stored image",
    "image/width": "int64: columns of the stored image",
    "image/label": "int64 x 14: 0/1 per finding, in chexlib.data.metadata.LABELS order",
    "image/filename": "bytes: NIH image name, e.g. b'00000001_000.png'",
    "image/patient_id": "int64: NIH Patient ID",
}


# --- tf.train.Example by hand ------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _varint(value: int) -> bytes:
    value &= _MASK64  # negative int64 -> ten-byte two's complement, as protobuf does
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:
    return _field(1, _field(1, value))  # Feature.bytes_list(1) -> BytesList.value(1)


def _int64_feature(values) -> bytes:
    packed = b"".join(_varint(int(v)) for v in values)
    return _field(3, _field(1, packed))  # Feature.int64_list(3) -> packed Int64List.value(1)


def encode_example(
    encoded: bytes,
    image_format: str,
    height: int,
    width: int,
    labels,
    filename: str,
    patient_id: int,
) -> bytes:
    """Serialize one ``tf.train.Example`` of :data:`SCHEMA` (keys in sorted order)."""
    features = {
        "image/encoded": _bytes_feature(encoded),
        "image/filename": _bytes_feature(filename.encode()),
        "image/format": _bytes_feature(image_format.encode()),
        "image/height": _int64_feature([height]),
        "image/label": _int64_feature(labels),
        "image/patient_id": _int64_feature([patient_id]),
        "image/width": _int64_feature([width]),
    }
    # Example.features(1) -> Features.feature(1): map entries of key(1), value(2)
    entries = b"".join(
        _field(1, _field(1, key.encode()) + _field(2, value))
        for key, value in sorted(features.items())
    )
    return _field(1, entries)


# --- TFRecord framing: CRC-32C ------------------------------------------------------

# CRC-32C (Castagnoli), reflected polynomial, as used by the TFRecord framing.
_POLY = 0x82F63B78


def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_T8 = _crc_table()
_T8_LIST = _T8.tolist()


def _zero_bytes(regs: np.ndarray, n: int) -> np.ndarray:
    """Advance raw CRC registers over ``n`` zero bytes."""
    for _ in range(n):
        regs = _T8[regs & 0xFF] ^ (regs >> 8)
    return regs


# A 4-byte step on register c with word w is Z4(c ^ w), and Z4 is linear: split it in two halves.
_WORD_LO = _zero_bytes(np.arange(1 << 16, dtype=np.uint32), 4)
_WORD_HI = _zero_bytes(np.arange(1 << 16, dtype=np.uint32) << np.uint32(16), 4)


def _mulmod(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial (reflected bit order, as in zlib's crc32_combine)."""
    m, p = 1 << 31, 0
    while a:
        if a & m:
            p ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


_X2N = [1 << 30]  # x^(2^k) mod P
for _ in range(63):
    _X2N.append(_mulmod(_X2N[-1], _X2N[-1]))


def _shift(register: int, nbytes: int) -> int:
    """The raw register after ``nbytes`` zero bytes: register * x^(8 n) mod P."""
    k, p = 3, 1 << 31
    while nbytes:
        if nbytes & 1:
            p = _mulmod(_X2N[k], p)
        nbytes >>= 1
        k += 1
    return _mulmod(p, register)


@functools.cache
def _shift_tables(nbytes: int) -> np.ndarray:
    """Four byte tables applying :func:`_shift` by ``nbytes`` to a vector of registers."""
    basis = [_shift(1 << i, nbytes) for i in range(32)]
    idx = np.arange(256)
    tables = np.zeros((4, 256), np.uint32)
    for k in range(4):
        for bit in range(8):
            tables[k] ^= np.where((idx >> bit) & 1, basis[8 * k + bit], 0).astype(np.uint32)
    return tables


_LANE = 64  # bytes per lane of the vectorised CRC


def _crc32c_numpy(data: bytes) -> int:
    """CRC-32C in NumPy: many lanes in parallel, then combined pairwise.

    With a zero start register, leading zero bytes change nothing, so the data
    is zero-padded in front to whole lanes, each lane's raw CRC is computed at
    once, and lanes are merged as ``shift(left, len(right)) ^ right``.
    """
    n = len(data)
    if n < 1024:  # a plain loop is faster for record headers and small payloads
        reg = 0xFFFFFFFF
        for byte in data:
            reg = _T8_LIST[(reg ^ byte) & 0xFF] ^ (reg >> 8)
        return reg ^ 0xFFFFFFFF
    buf = np.zeros(n + (-n) % _LANE, np.uint8)
    buf[len(buf) - n :] = np.frombuffer(data, np.uint8)
    words = np.ascontiguousarray(buf.view("<u4").reshape(-1, _LANE // 4).T)
    regs = np.zeros(words.shape[1], np.uint32)
    for row in words:
        x = regs ^ row
        regs = _WORD_LO[x & 0xFFFF] ^ _WORD_HI[x >> 16]
    span = _LANE
    while len(regs) > 1:
        if len(regs) % 2:  # a zero lane in front is a no-op
            regs = np.concatenate((np.zeros(1, np.uint32), regs))
        t, left, right = _shift_tables(span), regs[0::2], regs[1::2]
        regs = (
            t[0][left & 0xFF]
            ^ t[1][(left >> 8) & 0xFF]
            ^ t[2][(left >> 16) & 0xFF]
            ^ t[3][left >> 24]
            ^ right
        )
        span *= 2
    return (_shift(0xFFFFFFFF, n) ^ int(regs[0])) ^ 0xFFFFFFFF


# The C++ symbol of tsl::crc32c::Extend(uint32, const char*, size_t) (TF >= 2.13), then the older name.
_TF_CRC_SYMBOLS = ("_ZN3tsl6crc32c6ExtendEjPKcm", "_ZN10tensorflow6crc32c6ExtendEjPKcm")


@functools.cache
def _tf_crc32c():
    """TensorFlow's accelerated CRC-32C through ctypes (no Python TF import), or None."""
    try:
        spec = importlib.util.find_spec("tensorflow")  # finds the package without importing it
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for name in ("libtensorflow_framework.so.2", "libtensorflow_framework.2.dylib"):
            if not (Path(folder) / name).is_file():
                continue
            try:
                lib = ctypes.CDLL(str(Path(folder) / name))
            except OSError:
                continue
            for symbol in _TF_CRC_SYMBOLS:
                fn = getattr(lib, symbol, None)
                if fn is None:
                    continue
                fn.restype = ctypes.c_uint32
                fn.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]
                if fn(0, b"123456789", 9) == 0xE3069283:  # the CRC-32C check value
                    return fn
    return None


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (TensorFlow's C++ routine when loadable, else NumPy)."""
    fn = _tf_crc32c()
    return int(fn(0, data, len(data))) if fn is not None else _crc32c_numpy(data)


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    header = struct.pack("<Q", len(data))
    return header + _masked_crc(header) + data + _masked_crc(data)

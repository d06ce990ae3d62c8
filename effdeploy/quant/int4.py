"""Signed 4-bit integers two to a byte, the first in the low nibble: the layout of both TFLite's
INT4 tensors and ONNX's INT4 raw data, so both emitters (and the readers that check them) share it."""

from __future__ import annotations

import numpy as np


def pack_int4(values: np.ndarray) -> bytes:
    """Values in [-8, 7], flattened, two a byte (low nibble first); an odd count pads with 0."""
    nib = (np.asarray(values).astype(np.int64).ravel() & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).tobytes()


def unpack_int4(data: bytes | np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` signed 4-bit values of ``pack_int4``'s bytes, as int64."""
    raw = np.frombuffer(bytes(data), np.uint8)
    nib = np.stack([raw & 0xF, raw >> 4], 1).reshape(-1).astype(np.int64)[:count]
    return np.where(nib > 7, nib - 16, nib)

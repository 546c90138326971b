"""Scoring kernels of the SQLite vector cache: int4/int8 dot products, bit Hamming distances.

numpy has no fast int8 matrix-vector product (it widens every element first), nothing
for 4-bit values at all and no fused popcount over rows, so a compact cache scored with
numpy alone would be slower than the float32 matrix it replaces. ``numkong`` (SIMD
kernels for x86 AVX2/AVX-512 and Arm NEON/SVE, wheels for x86_64 and aarch64) does all
three near memory speed; it is a regular dependency. Where it cannot be imported (an
exotic platform) the same results come from numpy, several times slower, and one warning
line says so. Every kernel returns exact integers (as float64), so both paths rank
identically.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
I8 = npt.NDArray[np.int8]
U8 = npt.NDArray[np.uint8]

#: Rows widened per numpy block in the fallback (bounds its temporary memory).
_FALLBACK_BLOCK = 8192

_nk: Any
try:
    import numkong as _nk_module

    _nk = _nk_module
    SIMD_BACKEND = f"numkong {getattr(_nk_module, '__version__', '')}".strip()
except ImportError:  # pragma: no cover - exercised only where numkong has no wheel
    _nk = None
    SIMD_BACKEND = "numpy (numkong not installed)"

_warned = False


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "numkong is not installed: the vector cache scores int8/binary codes with numpy,"
            " several times slower (pip install numkong)"
        )


def _out(n: int, out: F64 | None) -> F64:
    return np.empty(n, dtype=np.float64) if out is None else out


def int8_dots(codes: I8, query: I8, out: F64 | None = None) -> F64:
    """``codes @ query`` for int8 rows and an int8 query, as float64 (exact).

    ``out`` (1-D, contiguous, one element per row) receives the result when given: a
    search over many scopes writes them all into one array, one kernel call each.
    """
    n = codes.shape[0]
    out = _out(n, out)
    if n == 0:
        return out
    if _nk is not None:
        _nk.cdist(query[None, :], codes, metric="dot", out_dtype="float64", out=out[None, :])
        return out
    _warn_fallback()
    q = query.astype(np.float64)
    for start in range(0, n, _FALLBACK_BLOCK):
        block = codes[start : start + _FALLBACK_BLOCK]
        out[start : start + block.shape[0]] = block.astype(np.float64) @ q
    return out


def int4_dots(codes: U8, query: U8, out: F64 | None = None) -> F64:
    """``codes @ query`` for packed signed 4-bit rows (two per byte), as float64 (exact).

    Each byte holds two values in -8..7, two's complement: element ``2j`` in the low
    nibble, ``2j + 1`` in the high one (``pack_int4``). ``out`` as for ``int8_dots``.
    """
    n = codes.shape[0]
    out = _out(n, out)
    if n == 0:
        return out
    if _nk is not None:
        _nk.cdist(
            query[None, :],
            codes,
            metric="dot",
            dtype="int4",
            out_dtype="float64",
            out=out[None, :],
        )
        return out
    _warn_fallback()
    q = unpack_int4(query[None, :])[0].astype(np.float64)
    for start in range(0, n, _FALLBACK_BLOCK):
        block = unpack_int4(codes[start : start + _FALLBACK_BLOCK])
        out[start : start + block.shape[0]] = block.astype(np.float64) @ q
    return out


def pack_int4(values: I8) -> U8:
    """Rows of values in -8..7 as packed nibbles (an odd last column is padded with 0)."""
    if values.shape[1] % 2:
        values = np.concatenate([values, np.zeros((values.shape[0], 1), np.int8)], axis=1)
    nibbles = values.view(np.uint8) & 0x0F
    return np.asarray(nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), dtype=np.uint8)


def unpack_int4(packed: U8) -> I8:
    """The inverse of ``pack_int4`` (with the padding column, if any)."""
    signed = packed.view(np.int8)
    low = np.left_shift(signed, 4) >> 4  # sign-extends the low nibble
    high = signed >> 4
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int8)
    out[:, 0::2] = low
    out[:, 1::2] = high
    return out


def hamming_distances(bits: U8, query: U8, out: F64 | None = None) -> F64:
    """Hamming distance of each packed-bit row to the packed-bit query, as float64."""
    n = bits.shape[0]
    out = _out(n, out)
    if n == 0:
        return out
    if _nk is not None:
        _nk.cdist(
            query[None, :],
            bits,
            metric="hamming",
            dtype="uint1",
            out_dtype="float64",
            out=out[None, :],
        )
        return out
    _warn_fallback()
    for start in range(0, n, _FALLBACK_BLOCK):
        block = bits[start : start + _FALLBACK_BLOCK] ^ query
        counts = np.unpackbits(block, axis=1).sum(axis=1, dtype=np.int64)
        out[start : start + block.shape[0]] = counts
    return out

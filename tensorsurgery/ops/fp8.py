"""The kernel of FP8 block dequantization (DeepSeek-V3's ``inference/kernel.py::weight_dequant``):
``y[i, j] = dtype(f32(w[i, j]) * s[i // BR, j // BC])`` for an ``F8_E4M3`` weight ``w`` and its
float32 ``weight_scale_inv`` ``s``, on rows of one block-row (``BR`` rows) at a time.

Within one block-row, an output element depends only on its byte and its column's scale: the
kernel makes, for each block of columns, the 256 results of that block's scale (float32 products
rounded as a cast to the output dtype rounds them, :mod:`tensorsurgery.ops.transforms`), then looks
every element up in them: one lookup per element, as a 16-bit cast does, so the products and
roundings are those of torch's ``(w.float() * s).to(dtype)`` bit for bit, NaNs included (e4m3fn
has no infinity; 0x7F and 0xFF are NaN, widened to float32 as torch does, with their three
mantissa bits shifted into place).
"""
from __future__ import annotations

from functools import cache, lru_cache

import numpy as np

from tensorsurgery.ops.transforms import _cast_bits

#: Elements per lookup: np.take widens its indices to intp (8 bytes each), so bound that copy.
_TAKE_STEP = 1 << 16


@cache
def e4m3_f32_bits() -> np.ndarray:
    """float32 bits of each of the 256 ``float8_e4m3fn`` patterns (bias 7, 3 mantissa bits,
    subnormals at exponent 0, no infinity; 0x7F and 0xFF are NaN)."""
    v = np.arange(256, dtype=np.uint32)
    sign, exp, man = (v & 0x80) << 24, (v >> 3) & 0xF, v & 0x7
    normal = sign | ((exp + 120) << 23) | (man << 20)  # exponent rebiased 7 -> 127
    subnormal = (man.astype(np.float32) * np.float32(2.0 ** -9)).view(np.uint32) | sign
    bits = np.where(exp == 0, subnormal, normal)
    nan = (v & 0x7F) == 0x7F
    bits[nan] = sign[nan] | 0x7FF0_0000  # torch's widening: all-ones exponent, the mantissa bits kept
    return bits.astype(np.uint32)


def block_tables(scales: np.ndarray, dtype: str) -> np.ndarray:
    """For each block of columns (one float32 scale each), the output bits of its 256 possible
    weight bytes: ``dtype(f32(byte) * scale)``, shape ``[blocks * 256]`` (uint16 or uint32)."""
    values = e4m3_f32_bits().view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN, as torch's multiply makes them
        products = np.multiply(scales.astype(np.float32, copy=False)[:, None], values[None, :], dtype=np.float32)
    return _cast_bits(products.reshape(-1).view(np.uint32), "F32", dtype)


@lru_cache(maxsize=64)
def column_bases(cols: int, block_cols: int) -> np.ndarray:
    """Each column's offset into :func:`block_tables` (its block's index times 256): added to a
    weight byte, the index of its result. uint16 while the tables fit (up to 256 blocks)."""
    blocks = -(-cols // block_cols)
    kind = np.uint16 if blocks <= 256 else np.uint32
    bases = ((np.arange(cols, dtype=np.uint32) // block_cols) << 8).astype(kind)
    bases.flags.writeable = False  # shared by every call for this shape, on every thread
    return bases


def dequant_block_row(weight: np.ndarray, scales: np.ndarray, bases: np.ndarray, dtype: str,
                      out: np.ndarray, work: np.ndarray) -> np.ndarray:
    """Rows of one block-row (all of them, or a part): ``weight`` their raw bytes (uint8, rows x cols,
    flat), ``scales`` the block-row's float32 scale per block of columns, ``bases`` from :func:`column_bases`;
    writes the output bytes into ``out`` (uint8, at least the output's size) and returns them.
    ``work`` is a uint8 buffer of ``weight.size * bases.itemsize`` bytes for the lookup indices."""
    table = block_tables(scales, dtype)
    rows = weight.size // bases.size
    index = work[:weight.size * bases.itemsize].view(bases.dtype)
    np.add(weight.reshape(rows, bases.size), bases, out=index.reshape(rows, bases.size), dtype=bases.dtype)
    result = out[:index.size * table.itemsize].view(table.dtype)
    for i in range(0, index.size, _TAKE_STEP):
        np.take(table, index[i:i + _TAKE_STEP], out=result[i:i + _TAKE_STEP], mode="clip")
    return result.view(np.uint8)

"""The kernel of MXFP4 dequantization (GPT-OSS experts), as transformers'
``integrations/mxfp4.py::convert_moe_packed_tensors`` computes it: ``<P>_blocks`` (U8
``[E, R, G, 16]``, two FP4 e2m1 values a byte, low nibble first) and ``<P>_scales`` (U8
``[E, R, G]``, a power of two with bias 127) make ``<P>`` ``[E, G * 32, R]``: value
``FP4[nibble] * 2 ** (scale - 127)`` (exact, then rounded once to the output dtype, as torch's
``ldexp`` into a bfloat16 tensor makes it), transposed to transformers' ``[E, in, out]``.

Each (scale, byte) pair has one result, two output values: a table of 65,536 pairs per output
dtype, made once, and one lookup per packed byte.
"""
from __future__ import annotations

from functools import cache

import numpy as np

from tensorsurgery.ops.transforms import _cast_bits

#: The 16 FP4 (e2m1) values by nibble, as transformers' ``FP4_VALUES``.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_TAKE_STEP = 1 << 16
_TILE = 64


@cache
def pair_table(dtype: str) -> np.ndarray:
    """``table[scale << 8 | byte]``: the byte's two output values (low nibble first) under that
    scale, as raw bits of ``dtype``: ``[65536, 2]`` uint16 or uint32."""
    byte = np.arange(256)
    exponent = (np.arange(256) - 127)[:, None]
    values = np.array(FP4_VALUES, np.float64)
    # Exact in float64 (two significant bits, exponents -128..134); float32 then overflows to inf
    # past its range (6 * 2**128) exactly where torch's ldexp does, and keeps 0 * 2**128 zero.
    with np.errstate(over="ignore"):
        lo = np.ldexp(values[byte & 0xF][None, :], exponent).astype(np.float32)
        hi = np.ldexp(values[byte >> 4][None, :], exponent).astype(np.float32)
    pairs = np.stack([lo.reshape(-1), hi.reshape(-1)], axis=1)
    bits = _cast_bits(pairs.reshape(-1).view(np.uint32), "F32", dtype)
    out = bits.reshape(65536, 2)
    out.flags.writeable = False
    return out


def work_size(rows: int, groups: int, dtype: str) -> int:
    """Bytes of the ``work`` buffer :func:`dequant_groups` needs for ``groups`` groups of ``rows`` rows."""
    return rows * groups * 16 * (2 + (4 if dtype in ("BF16", "F16") else 8))


def dequant_groups(blocks: np.ndarray, scales: np.ndarray, dtype: str, out: np.ndarray, work: np.ndarray) -> np.ndarray:
    """Output rows of groups ``g0..g1`` of one expert: ``blocks`` its packed bytes of those groups
    (uint8 ``[R, k, 16]``, a view), ``scales`` theirs (uint8 ``[R, k]``); writes the ``[k * 32, R]``
    values into ``out`` (uint8, their size) and returns them. ``work``: a uint8 buffer of
    :func:`work_size` bytes, for the lookup indices and the looked-up pairs."""
    table = pair_table(dtype)
    rows, k, _ = blocks.shape
    pairs = table.reshape(-1).view(np.uint32 if table.itemsize == 2 else np.uint64)  # one lookup: both values
    n = rows * k * 16
    index = work[:2 * n].view(np.uint16).reshape(rows, k, 16)
    np.left_shift(scales[:, :, None], 8, out=index, dtype=np.uint16)
    index |= blocks
    flat = index.reshape(-1)
    made = work[2 * n:2 * n + n * pairs.itemsize].view(pairs.dtype)
    for i in range(0, n, _TAKE_STEP):
        np.take(pairs, flat[i:i + _TAKE_STEP], out=made[i:i + _TAKE_STEP], mode="clip")
    by_row = made.view(table.dtype).reshape(rows, k * 32)
    result = out[:made.nbytes].view(table.dtype).reshape(k * 32, rows)
    for r in range(0, rows, _TILE):  # transposed in tiles of rows: twice as fast as in one go
        result[:, r:r + _TILE] = by_row[r:r + _TILE].T
    return result.reshape(-1).view(np.uint8)

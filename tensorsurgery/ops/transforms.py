"""The kernels that operations (:mod:`tensorsurgery.ops`) and a recipe's last stage (a cast) apply
to bounded chunks while bytes stream, never to a whole tensor: dtype casts and the rotary row
permutation.

Every value that is not a NaN is cast bitwise equal to torch's CPU ``tensor.to(dtype)`` (2.x):
round to nearest even, subnormals, overflow to infinity, signed zeros. A NaN is cast to a NaN
whose bits follow one rule per pair, those torch's vectorized (AVX2) kernels give in the body of
a tensor:

* bfloat16 -> float32: the 16 bits become float32's top half (sign and payload kept, not quieted);
* float16 -> float32: sign kept, payload shifted into place, quiet bit set;
* float32 or bfloat16 -> float16: sign, the top 10 payload bits (of the float32 value), quiet bit;
* float32 -> bfloat16: 0xFFFF; float16 -> bfloat16: 0x7FC0.

Torch's own NaN bits are not one rule (its scalar tail, the last ``n % 8`` float16 -> float32
elements, gives 0x7FFFFFFF; under ``ATEN_CPU_CAPABILITY=default`` float32 -> bfloat16 gives
0x7FC0 and bfloat16 -> float16 drops the payload), so no rule could equal them all. Ours does not
depend on position, length or thread: NaNs are made from their bits with integer operations,
never by numpy's float conversion (whose SIMD and scalar paths may differ).
tests/test_transforms.py checks every 16-bit pattern against torch, tests/test_cast_nans.py the
rule at every position of arrays of 1 to 40 elements, under both CPU capabilities.
"""
from __future__ import annotations

from functools import cache

import numpy as np

from tensorsurgery.formats.dtypes import element_size


def _to_f32_bits(src: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return src.view(np.uint32)
    if dtype == "BF16":
        return src.view(np.uint16).astype(np.uint32) << 16
    half = src.view(np.uint16)
    bits = half.view(np.float16).astype(np.float32).view(np.uint32)
    nan = (half & 0x7FFF) > 0x7C00
    if nan.any():  # sign, payload shifted into place, quiet bit: from the bits, whatever numpy's path did
        wide = half.astype(np.uint32)
        bits = np.where(nan, ((wide & 0x8000) << 16) | 0x7FC0_0000 | ((wide & 0x03FF) << 13), bits)
    return bits.astype(np.uint32, copy=False)


def _isnan32(bits: np.ndarray) -> np.ndarray:
    return (bits & 0x7FFF_FFFF) > 0x7F80_0000


def _f32_to_f16(bits: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are handled bit-exactly below
        out = bits.view(np.float32).astype(np.float16).view(np.uint16)
    nan = _isnan32(bits)
    if nan.any():
        quiet = (((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x03FF)).astype(np.uint16)
        out = np.where(nan, quiet, out)
    return out


def _f32_to_bf16(bits: np.ndarray, nan_bits: int) -> np.ndarray:
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(_isnan32(bits), np.uint16(nan_bits), rounded)


_TAKE_STEP = 1 << 16


@cache
def _table(src_dtype: str, dst_dtype: str) -> np.ndarray:
    """Every 16-bit source pattern's result: a cast from a 16-bit dtype is then one lookup per
    element, as fast on inf, NaN and subnormals as on ordinary weights."""
    return _cast_bits(np.arange(1 << 16, dtype=np.uint16), src_dtype, dst_dtype)


def _cast_bits(raw: np.ndarray, src_dtype: str, dst_dtype: str) -> np.ndarray:
    bits = _to_f32_bits(raw, src_dtype)
    if dst_dtype == "F32":
        return bits
    if dst_dtype == "F16":
        return _f32_to_f16(bits)
    return _f32_to_bf16(bits, 0x7FC0 if src_dtype == "F16" else 0xFFFF)


def cast_chunk(src: bytes | memoryview | np.ndarray, src_dtype: str, dst_dtype: str,
               out: np.ndarray | None = None) -> np.ndarray:
    """Cast a chunk of raw little-endian ``src_dtype`` elements to ``dst_dtype``; returns a uint8
    array of the new bytes (a view of ``out`` when given: a uint8 buffer of at least the output
    size, reused to spare allocations). ``src`` must hold a whole number of elements.

    Example:
        >>> cast_chunk(np.array([1.5], np.float32).tobytes(), "F32", "BF16").tobytes()
        b'\\xc0?'
    """
    raw = np.frombuffer(src, dtype=np.uint8) if not isinstance(src, np.ndarray) else src.view(np.uint8)
    if src_dtype == dst_dtype:
        return raw
    if src_dtype == "BF16" and dst_dtype == "F32":  # the bits moved up: a shift, ~5x the table's speed
        index = raw.view(np.uint16)
        bits = out[:index.size * 4].view(np.uint32) if out is not None else np.empty(index.size, np.uint32)
        np.left_shift(index, 16, out=bits, dtype=np.uint32)
        return bits.view(np.uint8)
    if element_size(src_dtype) == 2:
        table = _table(src_dtype, dst_dtype)
        index = raw.view(np.uint16)
        result = (out[:index.size * table.itemsize].view(table.dtype) if out is not None
                  else np.empty(index.size, table.dtype))
        # np.take widens its indices to intp (8 bytes each): go in slices to bound that copy.
        for i in range(0, index.size, _TAKE_STEP):
            np.take(table, index[i:i + _TAKE_STEP], out=result[i:i + _TAKE_STEP], mode="clip")
    else:
        result = _cast_bits(raw, src_dtype, dst_dtype)
        if out is not None:
            out[:result.nbytes] = result.view(np.uint8)
            result = out[:result.nbytes]
    return np.ascontiguousarray(result).view(np.uint8)


def permute_head(head: np.ndarray, row_bytes: int) -> np.ndarray:
    """Reorder one head's rows (raw bytes, ``d`` rows of ``row_bytes``): even rows, then odd."""
    rows = head.view(np.uint8).reshape(-1, 2, row_bytes)
    return np.ascontiguousarray(rows.transpose(1, 0, 2)).reshape(-1)


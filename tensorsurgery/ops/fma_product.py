"""A float32 matrix product rounded as torch's CPU matmul (MKL) rounds it: each dot product
accumulated in rank order by fused multiply-adds, ``acc = fma(left[i, k], right[k, j], acc)`` for
k = 1, 2, ... from the first product (measured bit for bit on AVX2 and AVX512 machines,
tests/test_lora_blocks.py).

Made with numpy elementwise, not by BLAS: OpenBLAS's sgemm accumulates in an order that depends on
the kernel it picks for the CPU (rank order on AVX512 machines, not on AVX2 ones: measured), so a
product made by it would make the merged bytes depend on the machine.

One step is exact: the product of two float32 values is exact in float64, and the float64 sum
``p + acc`` rounded to float32 is the fused result except where that sum was itself rounded onto
a float32 midpoint (double rounding); those elements, found by their low bits, are moved one
float64 unit toward the exact sum (TwoSum's error) before the float32 rounding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

#: Rows of the left factor made at a time: float64 temporaries of a few hundred KiB (in cache).
ROWS = 16
#: The bits of a float64 below float32's precision, and their pattern at a float32 midpoint.
_LOW, _MIDPOINT = 0x1FFFFFFF, 0x10000000


def fma_product(left: np.ndarray, right: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``left @ right`` (float32 ``[n, r]`` and ``[r, m]``) into float32 ``out`` ``[n, m]``, each
    element the rank-order chain of fused multiply-adds; returns ``out``."""
    import numpy as np

    n, r = left.shape
    m = right.shape[1]
    if r == 0:
        out[...] = 0
        return out
    wide = right.astype(np.float64)
    # Buffers for every step: a fresh array (or np.nonzero) a step made the product 3x slower.
    g = min(ROWS, n)
    p, s = np.empty((g, m), np.float64), np.empty((g, m), np.float64)
    bits, at = np.empty((g, m), np.uint64), np.empty((g, m), np.bool_)
    for i in range(0, n, ROWS):
        g = min(ROWS, n - i)
        acc, rows = out[i:i + g], left[i:i + g].astype(np.float64)
        pg, sg, bg, ag = p[:g], s[:g], bits[:g], at[:g]
        # The chain starts at the first product, not at +0 + it: the sign of a zero product stays.
        np.multiply(rows[:, :1], wide[0], out=pg)
        acc[...] = pg
        for k in range(1, r):
            np.multiply(rows[:, k:k + 1], wide[k], out=pg)
            _add_rounded(pg, acc, sg, bg, ag)
    return out


def _add_rounded(p: np.ndarray, acc: np.ndarray, s: np.ndarray, bits: np.ndarray, at: np.ndarray) -> None:
    """One step of the chain: ``acc = float32(p + acc)`` rounded once (``p`` the float64 products,
    exact), through the float64 sum ``s``; ``bits`` and ``at`` are buffers of ``s``'s shape."""
    import numpy as np

    np.add(p, acc, out=s)
    np.bitwise_and(s.view(np.uint64), np.uint64(_LOW), out=bits)
    if np.equal(bits, np.uint64(_MIDPOINT), out=at).any():
        _off_midpoints(s, p, acc, np.nonzero(at))
    acc[...] = s  # the float32 rounding (to nearest even)


def _off_midpoints(s: np.ndarray, p: np.ndarray, acc: np.ndarray, at: tuple[np.ndarray, ...]) -> None:
    """Where ``s = p + acc`` (float64) sits on a float32 midpoint but the exact sum does not, move it
    one float64 unit toward the exact sum, so its float32 rounding is the exact sum's."""
    import numpy as np

    ss, pp, aa = s[at], p[at], acc[at].astype(np.float64)
    t = ss - pp
    err = (pp - (ss - t)) + (aa - t)  # TwoSum: ss + err == pp + aa exactly
    s[at] = np.where(err > 0, np.nextafter(ss, np.inf), np.where(err < 0, np.nextafter(ss, -np.inf), ss))


def fma_dots(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The rank-order chain of fused multiply-adds of each pair of rows (float32 ``[m, r]`` both):
    element ``i`` is the value :func:`fma_product` makes of ``left[i]`` and ``right[i]`` as a row
    and a column; returns float32 ``[m]``."""
    import numpy as np

    from tensorsurgery.io.scratch import scratch_array

    m, r = left.shape
    if r == 0:
        return np.zeros(m, np.float32)
    # rank-major: each step reads two contiguous rows (a column of [m, r] is strided: 8x slower);
    # every buffer this thread's scratch (a fresh MB-sized array a call costs page faults)
    lw, rw = (scratch_array(r * m, np.float64, slot, (r, m)) for slot in (28, 29))
    np.copyto(lw, left.T)
    np.copyto(rw, right.T)
    p, s = scratch_array(m, np.float64, 30), scratch_array(m, np.float64, 31)
    bits, at = scratch_array(m, np.uint64, 32), scratch_array(m, np.bool_, 33)
    acc = np.empty(m, np.float32)
    np.multiply(lw[0], rw[0], out=p)
    acc[...] = p
    for k in range(1, r):
        np.multiply(lw[k], rw[k], out=p)
        _add_rounded(p, acc, s, bits, at)
    return acc

"""A float32 matrix product made fast by BLAS, in whatever order it sums, with a bound on how far
each element can be from the rank-order chain of fused multiply-adds
(:mod:`tensorsurgery.ops.fma_product`) torch's matmul makes.

Any order of float32 sums of ``r`` products, fused or not, is within ``gamma_r * sum_k |l_k r_k|``
of the exact dot product (``gamma_r = r u / (1 - r u)``, ``u = 2^-24``; Higham, *Accuracy and
Stability of Numerical Algorithms*, 3.1), so the BLAS value and the chain's are within twice that
of each other; :func:`bracket` widens it further (the bound's own product is rounded, and a
product below float32's normal range adds an absolute error, up to its whole value where a BLAS
flushes subnormals to zero). A merge whose later steps are all monotonic (a
multiplication by one scale, an add, roundings) gives the chain's value the same result as both
ends of the bracket when it gives both ends the same result: only the elements where the ends
differ need the chain (:class:`~tensorsurgery.ops.lora.LoraMerge`). For a 16-bit merge that is
a few elements in a million; the bytes stay the chain's, whatever BLAS the machine has.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

#: Unit roundoff of float32.
_U = 2.0 ** -24


def estimate(left: np.ndarray, right: np.ndarray, out: np.ndarray, bound: np.ndarray) -> None:
    """``left @ right`` (float32) by BLAS into ``out``, and ``|left| @ |right|`` into ``bound``."""
    import numpy as np

    np.matmul(left, right, out=out)
    np.matmul(np.abs(left), np.abs(right), out=bound)


def bracket(x: np.ndarray, bound: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 ``(lo, hi)`` around each BLAS value ``x`` (flat) that hold the chain's value of a
    rank-``r`` product, ``bound`` being :func:`estimate`'s ``|left| @ |right|``: ``2 gamma_r`` of
    it doubled (the bound's own rounding, with room), plus ``r + 1`` times four times the
    smallest normal float32 per side, each end then rounded outward by one float32 step."""
    import numpy as np

    x64 = x.astype(np.float64)
    e = bound.astype(np.float64)
    e *= 4.0 * (r + 1) * _U
    e += (r + 1) * 2.0 ** -124  # a product below the normal range, even one flushed to zero
    lo = np.nextafter((x64 - e).astype(np.float32), np.float32(-np.inf))
    hi = np.nextafter((x64 + e).astype(np.float32), np.float32(np.inf))
    return lo, hi

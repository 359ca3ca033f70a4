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
    rank-``r`` product, ``bound`` being :func:`estimate`'s ``|left| @ |right|``. The half-width
    ``e`` is made in float32 with room to spare: ``2 gamma_r`` of the bound, doubled (the bound's
    own rounding), plus ``4 u |x|`` (``x - e`` rounds by at most ``u |x - e|``: this and the
    doubling cover it), plus ``r + 1`` times a few smallest normals (a product below the normal
    range, even one a BLAS flushes to zero)."""
    import numpy as np

    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN: unsettled, the caller checks
        e = bound * np.float32(8.0 * (r + 1) * _U)
        e += np.abs(x) * np.float32(4 * _U)
        e += np.float32((r + 1) * 2.0 ** -124)
        return x - e, x + e


def rounded_key(values: np.ndarray, dtype: str) -> np.ndarray:
    """A key of each float32 value's rounding to ``dtype`` (BF16 or F16, to nearest even): equal
    keys, equal rounded values (NaN aside). BF16's is its bits, made with integers (numpy has no
    bfloat16)."""
    import numpy as np

    if dtype == "F16":
        with np.errstate(over="ignore"):
            return values.astype(np.float16).view(np.uint16)
    bits = values.view(np.uint32)
    key = bits >> 16
    key &= 1
    key += bits
    key += np.uint32(0x7FFF)
    key >>= 16
    return key


def key_value(key: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 value of :func:`rounded_key`'s key (finite values)."""
    import numpy as np

    if dtype == "F16":
        return key.view(np.float16).astype(np.float32)
    return (key << 16).view(np.float32)

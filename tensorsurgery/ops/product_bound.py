"""A float32 matrix product made fast by BLAS, with a bound on how far each element can be from
the rank-order chain of fused multiply-adds (:mod:`tensorsurgery.ops.fma_product`) torch's matmul
makes.

The product is made in float64 (the float32 factors' products are exact there, and the float64
sums all but so), then rounded to float32. The float32 chain of ``r`` products is within
``gamma_r * sum_k |l_k r_k|`` of the exact dot product (``gamma_r = r u / (1 - r u)``,
``u = 2^-24``; Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1); :func:`bracket`
widens that (the bound's own float32 product is rounded, the float64 sums and the rounding to
float32 err a little, and a product below float32's normal range adds an absolute error, up to its
whole value where a BLAS flushes subnormals to zero). A merge whose later steps are all monotonic (a
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
    """``left @ right`` (float32 factors) made in float64 by BLAS and rounded into float32 ``out``,
    and ``|left| @ |right|`` (float32) into ``bound``."""
    import numpy as np

    from tensorsurgery.io.scratch import scratch_array

    (n, r), m = left.shape, right.shape[1]
    wide_left, wide_right = scratch_array(n * r, np.float64, 34, (n, r)), scratch_array(r * m, np.float64, 35, (r, m))
    np.copyto(wide_left, left)
    np.copyto(wide_right, right)
    wide = scratch_array(n * m, np.float64, 36, (n, m))
    np.matmul(wide_left, wide_right, out=wide)
    out[...] = wide
    abs_left, abs_right = scratch_array(n * r, np.float32, 37, (n, r)), scratch_array(r * m, np.float32, 38, (r, m))
    np.abs(left, out=abs_left)
    np.abs(right, out=abs_right)
    np.matmul(abs_left, abs_right, out=bound)


def bracket(x: np.ndarray, bound: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 ``(lo, hi)`` around each BLAS value ``x`` (flat) that hold the chain's value of a
    rank-``r`` product, ``bound`` being :func:`estimate`'s ``|left| @ |right|``. The half-width
    ``e`` is made in float32 with room to spare: ``gamma_r`` of the bound, doubled (the bound's
    own rounding, the float64 sums), plus ``4 u |x|`` (``x`` is the float64 value rounded, and
    ``x - e`` rounds by at most ``u |x - e|``: this and the doubling cover both), plus ``r + 1``
    times a few smallest normals (a product below the normal range, even one a BLAS flushes to
    zero)."""
    import numpy as np

    from tensorsurgery.io.scratch import scratch_array

    n = x.size  # every array in this thread's scratch: fresh 128 KiB arrays stay in malloc's arenas
    e, t, lo, hi = (scratch_array(n, np.float32, slot) for slot in (40, 41, 42, 43))
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN: unsettled, the caller checks
        np.multiply(bound, np.float32(4.0 * (r + 1) * _U), out=e)
        np.abs(x, out=t)
        t *= np.float32(4 * _U)
        e += t
        e += np.float32((r + 1) * 2.0 ** -124)
        np.subtract(x, e, out=lo)
        np.add(x, e, out=hi)
    return lo, hi


def rounded_key(values: np.ndarray, dtype: str, slot: int) -> np.ndarray:
    """A key of each float32 value's rounding to ``dtype`` (BF16 or F16, to nearest even): equal
    keys, equal rounded values (NaN aside). BF16's is its bits, made with integers (numpy has no
    bfloat16)."""
    import numpy as np

    if dtype == "F16":
        with np.errstate(over="ignore"):
            return values.astype(np.float16).view(np.uint16)
    from tensorsurgery.io.scratch import scratch_array

    bits = values.view(np.uint32)
    key = scratch_array(values.size, np.uint32, slot)  # this thread's scratch buffer ``slot``
    np.right_shift(bits, 16, out=key)
    key &= 1
    key += bits
    key += np.uint32(0x7FFF)
    key >>= 16
    return key


def key_value(key: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """The float32 value of :func:`rounded_key`'s key (finite values), in float32 ``out``."""
    import numpy as np

    if dtype == "F16":
        out[...] = key.view(np.float16)
        return out
    np.left_shift(key, 16, out=out.view(np.uint32))
    return out

"""``slerp``: spherical interpolation from a base model's tensor towards another model's, as
mergekit's ``slerp`` makes it: the angle between the two tensors (each flattened to one vector)
is a statistic of the whole tensors, so the operation is two-pass
(:class:`~tensorsurgery.ops.TwoPassOperation`); its values are then elementwise."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator, Sequence

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.base import register

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input

#: mergekit's: above this |cos theta| the tensors are taken as collinear and interpolated linearly;
#: norms at or below ``EPS`` are taken as 1.
DOT_THRESHOLD = 0.9995
EPS = 1e-8


@register
@dataclass(frozen=True, slots=True)
class Slerp:
    """``c_a * a + c_b * b`` of the base ``a`` (the first input) and the other model's ``b``, in
    float32, rounded to the merge ``dtype``. With ``cos theta`` the dot of the unit vectors:
    ``c = (1 - t, t)`` when ``|cos theta| > 0.9995``, else ``(sin((1 - t) theta) / sin theta,
    sin(t theta) / sin theta)``. mergekit reduces in float32 on torch's threads (its rounding
    depends on their count); here the sums are float64 over fixed blocks, so the coefficients are
    the same on every run and within a float32 unit or so of mergekit's (the linear branch, whose
    coefficients need no sum, is bitwise mergekit's)."""

    t: float
    dtype: str
    label: ClassVar[str] = "slerp"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    two_pass: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def prepare(self, inputs: Sequence[Input], readers: Sequence[Reader]) -> Mix:
        import numpy as np  # not imported by planning (see tensorsurgery.ops)

        from tensorsurgery.ops.arith import values
        from tensorsurgery.ops.blocks import input_blocks

        squares_a, squares_b, dots = [], [], []
        for _, (raw_a, raw_b) in input_blocks(inputs, readers):
            a = values(raw_a, inputs[0].dtype, self.dtype).astype(np.float64)
            b = values(raw_b, inputs[1].dtype, self.dtype).astype(np.float64)
            squares_a.append(float(np.sum(a * a)))  # numpy's pairwise sum: the same order every run
            squares_b.append(float(np.sum(b * b)))
            dots.append(float(np.sum(a * b)))
        return Mix(*coefficients(self.t, math.fsum(squares_a), math.fsum(squares_b), math.fsum(dots)), self.dtype)

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("slerp is two-pass: the interpreter applies what prepare returns")

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("slerp is two-pass")  # the interpreter never asks


def coefficients(t: float, squares_a: float, squares_b: float, dot: float) -> tuple[float, float]:
    """slerp's float32 coefficients ``(c_a, c_b)`` of the base and the other tensor, from the sums
    of their squares and of their products, as mergekit computes them from its norms and dot (a
    norm at or below :data:`EPS` taken as 1, the cosine clamped to [-1, 1]); float32 arithmetic
    on float32 values, ``acos`` and ``sin`` correctly rounded from float64."""
    import numpy as np

    f32 = np.float32
    norm_a, norm_b = math.sqrt(squares_a), math.sqrt(squares_b)
    norm_a, norm_b = (n if n > EPS else 1.0 for n in (norm_a, norm_b))
    cos = f32(min(max(dot / norm_a / norm_b, -1.0), 1.0))
    t32 = f32(t)
    one_minus_t = f32(1) - t32
    if abs(cos) > f32(DOT_THRESHOLD):
        return float(one_minus_t), float(t32)
    theta = f32(math.acos(float(cos)))
    sin_theta = f32(math.sin(float(theta)))
    c_a = f32(math.sin(float(one_minus_t * theta))) / sin_theta
    c_b = f32(math.sin(float(t32 * theta))) / sin_theta
    return float(c_a), float(c_b)


@dataclass(frozen=True, slots=True)
class Mix:
    """slerp's values once its coefficients are known: ``c_a * a + c_b * b``, each product and the
    sum rounded to float32 (torch's separate operations), the result rounded to ``dtype``."""

    c_a: float
    c_b: float
    dtype: str
    label: ClassVar[str] = "slerp"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np

        from tensorsurgery.ops.arith import blockwise, encoded, values

        md, c_a, c_b = self.dtype, np.float32(self.c_a), np.float32(self.c_b)

        def compute(block: list[np.ndarray]) -> np.ndarray:
            a = values(block[0], inputs[0].dtype, md) * c_a
            a += values(block[1], inputs[1].dtype, md) * c_b
            return encoded(a, md)

        with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN as torch makes them
            return blockwise(raws, [element_size(i.dtype) for i in inputs], element_size(md), compute)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("slerp's mix is elementwise")  # the interpreter never asks

"""``nearswap``: mergekit's NearSwap: the base moved towards the other model where the two are
near, ``w * x + (1 - w) * base`` with ``w = clamp(t / max(|base - x|, 1e-6), 0, 1)`` (elements
closer than ``t`` take the other model's value)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator, Sequence

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.base import register

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input


@register
@dataclass(frozen=True, slots=True)
class NearSwap:
    """The first input is the base, the second the other model; ``t`` the distance below which
    the other's value is taken. As torch computes mergekit's expression in the merge ``dtype``:
    ``t / d`` is ``d.reciprocal() * t`` (torch's ``__rtruediv__``), ``t`` a float32 scalar, every
    step rounded."""

    t: float
    dtype: str
    label: ClassVar[str] = "nearswap"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np

        from tensorsurgery.ops.arith import blockwise, encoded, rounded, values

        md, f32 = self.dtype, np.float32
        t = f32(self.t)
        floor = rounded(np.asarray([1e-6], np.float64).astype(f32), md)[0]

        def compute(block: list[np.ndarray]) -> np.ndarray:
            a = values(block[0], inputs[0].dtype, md)
            b = values(block[1], inputs[1].dtype, md)
            distance = np.abs(rounded(a - b, md))
            distance = np.where(distance < floor, floor, distance)  # clamp(min=1e-6); a NaN stays
            weight = np.clip(rounded(rounded(f32(1) / distance, md) * t, md), f32(0), f32(1))
            return encoded(rounded(rounded(weight * b, md) + rounded(rounded(f32(1) - weight, md) * a, md), md), md)

        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
            return blockwise(raws, [element_size(i.dtype) for i in inputs], element_size(md), compute)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("nearswap is elementwise")  # the interpreter never asks

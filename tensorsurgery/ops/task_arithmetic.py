"""``task_arithmetic``: a base plus the weighted sum of other models' differences from it, as
mergekit's ``task_arithmetic`` (its generalized task arithmetic with no sparsification and no
sign consensus) makes it."""
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
class TaskArithmetic:
    """``base + lam * sum(w_i * (x_i - base)) [/ sum(w_i)]``; the first input is the base, one
    weight per other input. As torch computes it in the merge ``dtype``: every operation rounded
    to it (the weights too, converted from Python floats), the sums over the models accumulated
    in float32 and rounded once, a divisor below 1e-8 in magnitude replaced by 1, ``lam`` a
    float32 scalar."""

    weights: tuple[float, ...]
    normalize: bool
    lam: float
    dtype: str
    label: ClassVar[str] = "task_arithmetic"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np  # not imported by planning (see tensorsurgery.ops)

        from tensorsurgery.ops.arith import blockwise, encoded, rounded, rounded_scalars, sequential_sum, values

        md = self.dtype
        weights = rounded_scalars(self.weights, md)
        divisor = rounded(np.asarray([sequential_sum(list(weights))], np.float32), md)[0]
        if abs(divisor) < 1e-8:
            divisor = np.float32(1)

        def compute(block: list[np.ndarray]) -> np.ndarray:
            base = values(block[0], inputs[0].dtype, md)
            deltas = [rounded(rounded(values(raw, i.dtype, md) - base, md) * w, md)
                      for raw, i, w in zip(block[1:], inputs[1:], weights)]
            mixed = rounded(np.asarray(sequential_sum(deltas)), md)
            if self.normalize:
                mixed = rounded(mixed / divisor, md)
            if self.lam != 1:
                mixed = rounded(mixed * np.float32(self.lam), md)
            return encoded(rounded(base + mixed, md), md)

        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
            return blockwise(raws, [element_size(i.dtype) for i in inputs], element_size(md), compute)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("task_arithmetic is elementwise")  # the interpreter never asks

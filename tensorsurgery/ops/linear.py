"""``linear``: a weighted average of several models' tensors, as mergekit's ``linear`` makes it."""
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
class Linear:
    """``sum(w_i * x_i)`` (divided by ``sum(w_i)`` when ``normalize``) of the inputs read as the
    merge ``dtype``, in float32: each term a fused multiply-add in input order (torch's
    ``addcmul_``), the weights float32 values, the result rounded once to the merge dtype."""

    weights: tuple[float, ...]
    normalize: bool
    dtype: str
    label: ClassVar[str] = "linear"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np  # not imported by planning (see tensorsurgery.ops)

        from tensorsurgery.ops.arith import blockwise, encoded, fma32, sequential_sum, values

        md = self.dtype
        weights = np.asarray(self.weights, dtype=np.float64).astype(np.float32)
        total = sequential_sum(list(weights))

        def compute(block: list[np.ndarray]) -> np.ndarray:
            # The first term onto zeros is a float32 product: fma(x, w, +0) rounds x * w once, and
            # adding +0 makes a -0 product +0, as it is in torch's zeros.
            acc = values(block[0], inputs[0].dtype, md) * weights[0]
            acc += np.float32(0)
            for raw, i, w in zip(block[1:], inputs[1:], weights[1:]):
                acc = fma32(values(raw, i.dtype, md), w, acc)
            if self.normalize:
                acc /= total
            return encoded(acc, md)

        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
            return blockwise(raws, [element_size(i.dtype) for i in inputs], element_size(md), compute)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("linear is elementwise")  # the interpreter never asks


"""``model_stock``: Model Stock as mergekit makes it: the fine-tunes' average pulled towards the
base by a ratio ``t`` that comes from the mean cosine between the fine-tunes' differences from
the base (each flattened to one vector): a statistic of the whole tensors, so the operation is
two-pass (:class:`~tensorsurgery.ops.TwoPassOperation`); its values are then elementwise."""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, ClassVar, Iterator, Sequence, cast

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.base import register

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input


@register
@dataclass(frozen=True, slots=True)
class ModelStock:
    """``t * mean(x_i) + (1 - t) * base`` (the first input is the base, at least two others), with
    ``t = k cos / (1 + (k - 1) cos)`` for ``k`` models and ``cos`` the mean over pairs of the cosine
    between their differences from the base (0 when the denominator is below 1e-6). mergekit
    computes all of it in the merge ``dtype``, each step rounded; so do we, but the sums over a
    tensor (norms, dot products) are float64 over fixed blocks, rounded once to float32 then to the
    merge dtype, where torch has its own reductions (for a large bfloat16 tensor they can be off by
    more than a unit of the dtype: then ``t`` is one unit apart from mergekit's)."""

    dtype: str
    label: ClassVar[str] = "model_stock"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    two_pass: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def prepare(self, inputs: Sequence[Input], readers: Sequence[Reader]) -> StockMix:
        import numpy as np

        from tensorsurgery.ops.arith import rounded, values
        from tensorsurgery.ops.blocks import input_blocks

        md, k = self.dtype, len(inputs) - 1
        pairs = list(combinations(range(k), 2))
        squares: list[list[float]] = [[] for _ in range(k)]
        dots: list[list[float]] = [[] for _ in pairs]
        for _, raws in input_blocks(inputs, readers):
            base = values(raws[0], inputs[0].dtype, md)
            offsets = [rounded(values(raw, i.dtype, md) - base, md) for raw, i in zip(raws[1:], inputs[1:])]
            for i, o in enumerate(offsets):
                o64 = o.astype(np.float64)
                squares[i].append(float(np.sum(o64 * o64)))
            for (a, b), acc in zip(pairs, dots):
                acc.append(float(np.sum(rounded(offsets[a] * offsets[b], md).astype(np.float64))))

        def scalar(x: float) -> np.float32:  # a float32 sum as torch returns it in the merge dtype
            with np.errstate(over="ignore"):
                return cast("np.float32", rounded(np.asarray([x], np.float64).astype(np.float32), md)[0])

        norms = [scalar(math.sqrt(math.fsum(s))) for s in squares]
        floor = scalar(1e-6)
        cosines = []
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for (a, b), acc in zip(pairs, dots):
                product = max(scalar(float(norms[a] * norms[b])), floor)
                cosines.append(min(max(scalar(float(scalar(math.fsum(acc)) / product)), np.float32(-1)), np.float32(1)))
            cos = scalar(math.fsum(float(c) for c in cosines) / len(cosines))
            denominator = scalar(float(np.float32(1) + scalar(float((k - 1) * cos))))
            t = np.float32(0) if abs(denominator) < 1e-6 else scalar(float(scalar(float(k * cos)) / denominator))
        return StockMix(float(t), k, md)

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("model_stock is two-pass: the interpreter applies what prepare returns")

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("model_stock is two-pass")  # the interpreter never asks


@dataclass(frozen=True, slots=True)
class StockMix:
    """model_stock's values once ``t`` is known (a merge-dtype value): the ``count`` models summed
    in order and divided by their count, then ``t * average + (1 - t) * base``, each step rounded
    to the merge ``dtype``."""

    t: float
    count: int
    dtype: str
    label: ClassVar[str] = "model_stock"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np

        from tensorsurgery.ops.arith import blockwise, encoded, rounded, values

        md, t = self.dtype, np.float32(self.t)
        one_minus_t = rounded(np.asarray([np.float32(1) - t]), md)[0]

        def compute(block: list[np.ndarray]) -> np.ndarray:
            base = values(block[0], inputs[0].dtype, md)
            total = values(block[1], inputs[1].dtype, md)
            for raw, i in zip(block[2:], inputs[2:]):
                total = rounded(total + values(raw, i.dtype, md), md)
            average = rounded(total / np.float32(self.count), md)
            return encoded(rounded(rounded(t * average, md) + rounded(one_minus_t * base, md), md), md)

        with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN as torch makes them
            return blockwise(raws, [element_size(i.dtype) for i in inputs], element_size(md), compute)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("model_stock's mix is elementwise")  # the interpreter never asks

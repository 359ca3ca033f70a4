"""``sce``: SCE merging (select, calculate, erase; arXiv 2408.07990) as mergekit 0.1.5's ``sce``
makes it. Each model's difference from the base is a task vector; with ``select_topk`` below 1
only the elements where the task vectors vary most across the models are kept (the
``int(nonzero * select_topk)`` largest per-element variances of the whole tensor); each model is
weighted by the mean square of its (kept) task vector over the whole tensor, normalized by the
weights' sum; the models vote on each element's sign (TIES's "sum" consensus of the unweighted
task vectors), the agreeing ones are averaged with those weights and added to the base.

The variance ranks and the weights are statistics of the whole tensor, so the operation is
two-pass (:class:`~tensorsurgery.ops.TwoPassOperation`): :meth:`Sce.prepare` finds the count of
nonzero variances, then the top-k threshold by histograms (:func:`.sparsify.find_ranks`, ties
broken by the lowest index, as a stable top-k keeps them), then each model's sum of squares in
torch's one-thread order (:class:`.torch_sums.CascadeSum`); :class:`SceMix` makes any element range
alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Sequence

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.base import register
from tensorsurgery.ops.sparsify import Rank

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input

#: Elements :func:`variances` makes at a time (its float64 temporaries, five of them).
_PIECE = 1 << 14
#: mergekit's ``sce_weight`` falls back to equal weights when the weights sum below this.
WEIGHT_FLOOR = 1e-6


@register
@dataclass(frozen=True, slots=True)
class Sce:
    """The first input is the base; ``select_topk`` the fraction of the nonzero variances kept (1
    or more: no selection; 0 or less: none kept); ``dtype`` the merge dtype, every step rounded to
    it as torch does."""

    select_topk: float
    dtype: str
    label: ClassVar[str] = "sce"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    two_pass: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def prepare(self, inputs: Sequence[Input], readers: Sequence[Reader]) -> SceMix:
        import numpy as np

        md, count = self.dtype, inputs[0].range.length // element_size(inputs[0].dtype)
        with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN as torch makes them
            keep = self._selection(inputs, readers) if self.select_topk < 1 else None
        return SceMix(_weights(inputs, readers, md, keep, count), keep, count, md)

    def _selection(self, inputs: Sequence[Input], readers: Sequence[Reader]) -> Rank:
        """The elements the top-k of the variances keeps: ``int(nonzero * select_topk)`` of them."""
        import numpy as np

        from tensorsurgery.ops.sparsify import find_ranks

        if self.select_topk <= 0:
            return Rank.none(True)
        nonzero: list[int] = []
        _scan_variances(inputs, readers, self.dtype, lambda _, __, keys: nonzero.append(int(np.count_nonzero(keys))))
        # torch: the int64 count times a Python float is a float32 product, truncated by int()
        k = int(np.float32(sum(nonzero)) * np.float32(self.select_topk))
        if k == 0:
            return Rank.none(True)
        return find_ranks(inputs, readers, self.dtype, [(0, True, k)], _scan_variances)[(0, True, k)]

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("sce is two-pass: the interpreter applies what prepare returns")

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("sce is two-pass")  # the interpreter never asks


def variances(tvs: Sequence[np.ndarray], md: str) -> np.ndarray:
    """``torch.var(stack(tvs), dim=0, unbiased=False)`` in the merge dtype: torch's Welford
    accumulation in float64 over the models in order, ``m2 / k`` made a float32 then rounded."""
    import numpy as np

    from tensorsurgery.ops.arith import rounded

    size = tvs[0].size
    out = np.empty(size, np.float32)
    piece = max(1, min(size, _PIECE))
    mean, m2, x, delta, step = (np.empty(piece, np.float64) for _ in range(5))
    for first in range(0, size, piece):  # elementwise: pieces make the same values, in small arrays
        m = min(piece, size - first)
        mean[:m] = 0
        m2[:m] = 0
        for n, tv in enumerate(tvs, 1):  # the same operations, in place
            x[:m] = tv[first:first + m]
            np.subtract(x[:m], mean[:m], out=delta[:m])
            mean[:m] += np.divide(delta[:m], np.float64(n), out=step[:m])
            x[:m] -= mean[:m]
            x[:m] *= delta[:m]  # delta * (x - mean)
            m2[:m] += x[:m]
        out[first:first + m] = np.divide(m2[:m], np.float64(len(tvs)), out=m2[:m])  # float32 as astype rounds
    return rounded(out, md)


def _scan_variances(inputs: Sequence[Input], readers: Sequence[Reader], md: str,
                    visit: Callable[[int, int, np.ndarray], None]) -> None:
    """``visit(0, start, keys)`` for each block of the variances' magnitude keys (one "model")."""
    from tensorsurgery.ops.blocks import input_blocks
    from tensorsurgery.ops.sparsify import deltas, magnitude_keys

    for start, raws in input_blocks(inputs, readers):
        visit(0, start, magnitude_keys(variances(deltas(raws, inputs, md)[1], md), md))


def selected(tvs: list[np.ndarray], keep: Rank | None, md: str, start: int) -> list[np.ndarray]:
    """The task vectors of elements ``start..`` times the selection mask (torch's ``tvs * mask``:
    -x * 0 is -0, inf * 0 NaN); all of them without a selection."""
    import numpy as np

    from tensorsurgery.ops.sparsify import magnitude_keys

    if keep is None:
        return tvs
    index = np.arange(start, start + tvs[0].size)
    mask = keep.taken(magnitude_keys(variances(tvs, md), md).astype(np.int64), index).astype(np.float32)
    return [tv * mask for tv in tvs]


def _weights(inputs: Sequence[Input], readers: Sequence[Reader], md: str, keep: Rank | None,
             count: int) -> tuple[float, ...]:
    """mergekit's ``sce_weight``: each model's mean square of its selected task vector (torch's
    ``mean``: a float32 sum in its one-thread order, divided by the count, rounded to the merge
    dtype), divided by their sum (a merge-dtype sum), or ``1 / k`` each when that sum is below
    1e-6 in magnitude. As merge-dtype values."""
    import numpy as np

    from tensorsurgery.ops.arith import rounded
    from tensorsurgery.ops.blocks import STAT_BLOCK, input_blocks
    from tensorsurgery.ops.sparsify import deltas
    from tensorsurgery.ops.torch_sums import CascadeSum, full_sum

    k = len(inputs) - 1
    sums = [CascadeSum(count, "F32") for _ in range(k)]  # torch sums a 16-bit tensor's mean as float32
    unit = sums[0].unit
    with np.errstate(over="ignore", invalid="ignore"):
        for start, raws in input_blocks(inputs, readers, max(unit, STAT_BLOCK // unit * unit)):
            for total, tv in zip(sums, selected(deltas(raws, inputs, md)[1], keep, md, start)):
                total.add(rounded(tv * tv, md))
        means = rounded(np.asarray([s.value() for s in sums], np.float32) / np.float32(count), md)
        total = rounded(np.asarray([full_sum(means, md)], np.float32), md)[0]
        if abs(float(total)) < WEIGHT_FLOOR:
            weights = rounded(np.full(k, np.float32(1) / np.float32(k)), md)
        else:
            weights = rounded(means / total, md)
    return tuple(float(w) for w in weights)


@dataclass(frozen=True, slots=True)
class SceMix:
    """sce's values once the selection (``keep``: None for all) and the models' ``weights``
    (merge-dtype values) are known, for a tensor of ``count`` elements: the selected task vectors'
    "sum" sign vote, ``sum(tv * w * agrees) / max(sum(w * agrees), 1e-6)`` added to the base, each
    step rounded to the merge ``dtype``, the sums over the models in torch's order."""

    weights: tuple[float, ...]
    keep: Rank | None
    count: int
    dtype: str
    label: ClassVar[str] = "sce"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np

        from tensorsurgery.ops.arith import BLOCK, blockwise_at, encoded, rounded
        from tensorsurgery.ops.sparsify import deltas
        from tensorsurgery.ops.torch_sums import model_sum

        md, n = self.dtype, self.count
        vector = 8 if md == "F32" else 16
        weights = np.asarray(self.weights, np.float32)
        floor = rounded(np.asarray([WEIGHT_FLOOR], np.float64).astype(np.float32), md)[0]

        def compute(block: list[np.ndarray], first: int) -> np.ndarray:
            base, tvs = deltas(block, inputs, md)
            tvs = selected(tvs, self.keep, md, first)
            majority = np.where(rounded(model_sum(tvs, first, n, vector), md) >= 0, np.float32(1), np.float32(-1))
            agree = [(np.sign(tv) == majority).astype(np.float32) for tv in tvs]
            erased = [w * a for w, a in zip(weights, agree)]  # w or 0: exact
            merged = rounded(model_sum([rounded(tv * e, md) for tv, e in zip(tvs, erased)], first, n, vector), md)
            divisor = rounded(model_sum(erased, first, n, vector), md)
            divisor = np.where(divisor < floor, floor, divisor)  # clamp(min=1e-6); a NaN stays
            return encoded(rounded(base + rounded(merged / divisor, md), md), md)

        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
            # a quarter block: per element, each model's task vector, mask, vote and terms, the
            # variances' int64 keys and index (measured: 68.6 MB peak RSS at 65,536 elements)
            return blockwise_at(raws, [element_size(i.dtype) for i in inputs], element_size(md), start, compute,
                                BLOCK // 4)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("sce's mix is elementwise")  # the interpreter never asks

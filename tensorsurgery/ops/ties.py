"""``ties``: TIES-merging as mergekit's ``ties`` makes it: each model's difference from the base
keeps only its ``density`` largest magnitudes, is weighted, and the models vote on each element's
sign; the differences that agree with the vote are summed (and divided by their weights).

Keeping the k largest magnitudes of a whole tensor is a statistic of the whole tensor, so the
operation is two-pass (:class:`~tensorsurgery.ops.TwoPassOperation`): :meth:`Ties.prepare` finds,
for each model, the magnitude threshold and the index where the elements at the threshold stop
being kept (ties go to the lowest index, as a stable sort orders them), from histograms of the
magnitudes' bit patterns, in bounded memory; :class:`TiesMix` then makes any element range alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Sequence

from ..dtypes import element_size
from . import register

if TYPE_CHECKING:
    import numpy as np

    from ..recipe import Input

#: A threshold above every magnitude key (nothing kept), and below every one (all kept).
NONE_KEPT, ALL_KEPT = 1 << 32, -1


def keep_count(density: float, count: int) -> int | None:
    """How many of ``count`` elements mergekit's magnitude sparsification keeps at ``density``
    (``max(1, int(density * count))``); None for all of them (density 1 or more: not sparsified)."""
    if density >= 1:
        return None
    if density <= 0 or count == 0:
        return 0
    return max(1, int(density * count))


@register
@dataclass(frozen=True, slots=True)
class Ties:
    """The first input is the base, one weight and one density per other input; ``normalize``
    divides by the sum of the agreeing models' weights, ``lam`` scales the result (a float32
    scalar). Arithmetic as torch does it in the merge ``dtype`` (see :mod:`.arith`)."""

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    normalize: bool
    lam: float
    dtype: str
    label: ClassVar[str] = "ties"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    two_pass: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def prepare(self, inputs: Sequence[Input], fds: Sequence[int]) -> TiesMix:
        count = inputs[0].range.length // element_size(inputs[0].dtype)
        ks = [keep_count(d, count) for d in self.densities]
        thresholds = [ALL_KEPT if k is None else NONE_KEPT if k == 0 else 0 for k in ks]
        cuts = [0] * len(ks)
        todo = {i: k for i, k in enumerate(ks) if k and k < count}
        if todo:
            _select(inputs, fds, self.dtype, todo, thresholds, cuts, count)
        for i, k in enumerate(ks):
            if k == count:  # every element kept
                thresholds[i] = ALL_KEPT
        return TiesMix(self.weights, tuple(thresholds), tuple(cuts), self.normalize, self.lam, self.dtype)

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("ties is two-pass: the interpreter applies what prepare returns")

    def chunks(self, inputs: Sequence[Input], fds: Sequence[int], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("ties is two-pass")  # the interpreter never asks


def _deltas(raws: Sequence[np.ndarray], inputs: Sequence[Input], md: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """The base's values and each other input's difference from it, rounded to the merge dtype."""
    from .arith import rounded, values

    base = values(raws[0], inputs[0].dtype, md)
    return base, [rounded(values(raw, i.dtype, md) - base, md) for raw, i in zip(raws[1:], inputs[1:])]


def magnitude_keys(delta: np.ndarray, md: str) -> np.ndarray:
    """Each value's magnitude as an integer that orders as the magnitudes do: the bit pattern of
    its absolute value in the merge dtype (15 bits for 16-bit dtypes, 31 for float32)."""
    import numpy as np

    from .arith import encoded

    if md == "F32":
        return delta.view(np.uint32) & np.uint32(0x7FFFFFFF)
    if md == "BF16":
        return (delta.view(np.uint32) >> 16) & np.uint32(0x7FFF)  # a bf16 value is a float32's top half
    return encoded(delta, md).view(np.uint16).astype(np.uint32) & np.uint32(0x7FFF)


def _scan(inputs: Sequence[Input], fds: Sequence[int], md: str, visit: Callable[[int, int, np.ndarray], None]) -> None:
    """``visit(model, start, keys)`` for each block of each non-base input's magnitude keys."""
    from .blocks import input_blocks

    for start, raws in input_blocks(inputs, fds):
        _, deltas = _deltas(raws, inputs, md)
        for m, delta in enumerate(deltas):
            visit(m, start, magnitude_keys(delta, md))


def _top(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The largest bin whose count from the top reaches ``k``, and how many lie above it."""
    import numpy as np

    above = np.cumsum(hist[::-1])[::-1]  # above[v]: elements in bins >= v
    b = int(np.nonzero(above >= k)[0][-1])
    return b, int(above[b] - hist[b])


def _select(inputs: Sequence[Input], fds: Sequence[int], md: str, ks: dict[int, int],
            thresholds: list[int], cuts: list[int], count: int) -> None:
    """For each model ``m`` of ``ks``: the magnitude key threshold (elements above it kept) and
    the cut (elements at it kept below that index) that keep its ``ks[m]`` largest magnitudes, the
    lowest indices first among equal ones. One pass of histograms of the keys (two for float32:
    high then low 16 bits), and one more when the threshold's elements are not all kept."""
    import numpy as np

    wide = md == "F32"
    high = {m: np.zeros(1 << 15, np.int64) for m in ks}

    def histogram(m: int, _: int, keys: np.ndarray) -> None:
        if m in high:
            high[m] += np.bincount(keys >> 16 if wide else keys, minlength=1 << 15)

    _scan(inputs, fds, md, histogram)
    above, need = {}, {}
    for m, k in ks.items():
        thresholds[m], above[m] = _top(high[m], k)
    if wide:  # the low 16 bits, among the keys of the chosen high bin
        low = {m: np.zeros(1 << 16, np.int64) for m in ks}

        def histogram_low(m: int, _: int, keys: np.ndarray) -> None:
            if m in low:
                chosen = keys[(keys >> 16) == thresholds[m]]
                low[m] += np.bincount(chosen & np.uint32(0xFFFF), minlength=1 << 16)

        _scan(inputs, fds, md, histogram_low)
        for m, k in ks.items():
            bin_low, more = _top(low[m], k - above[m])
            thresholds[m], above[m] = thresholds[m] << 16 | bin_low, above[m] + more
            high[m] = low[m]
    at = {m: int(high[m][thresholds[m] & 0xFFFF if wide else thresholds[m]]) for m in ks}
    for m, k in ks.items():
        need[m] = k - above[m]  # how many at the threshold are kept: 1..at[m]
        cuts[m] = count
    partial = {m for m in ks if need[m] < at[m]}
    if not partial:
        return
    seen = dict.fromkeys(partial, 0)

    def cut(m: int, start: int, keys: np.ndarray) -> None:
        if m in partial and seen[m] < need[m]:
            where = np.nonzero(keys == thresholds[m])[0]
            if seen[m] + where.size >= need[m]:
                cuts[m] = start + int(where[need[m] - seen[m] - 1]) + 1
            seen[m] += where.size

    _scan(inputs, fds, md, cut)


@dataclass(frozen=True, slots=True)
class TiesMix:
    """ties' values once each model's threshold and cut are known: a model's difference is kept
    where its magnitude key is above ``thresholds[m]``, or equal to it at an index below
    ``cuts[m]``; then weighted, voted on and summed as mergekit does."""

    weights: tuple[float, ...]
    thresholds: tuple[int, ...]
    cuts: tuple[int, ...]
    normalize: bool
    lam: float
    dtype: str
    label: ClassVar[str] = "ties"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np

        from .arith import blockwise_at, encoded, rounded, rounded_scalars, sequential_sum

        md = self.dtype
        weights = rounded_scalars(self.weights, md)
        f32 = np.float32

        def compute(block: list[np.ndarray], first: int) -> np.ndarray:
            base, deltas = _deltas(block, inputs, md)
            index = np.arange(first, first + base.size)
            for m, (threshold, cut) in enumerate(zip(self.thresholds, self.cuts)):
                if threshold == ALL_KEPT:
                    continue
                keys = magnitude_keys(deltas[m], md).astype(np.int64)
                kept = (keys > threshold) | ((keys == threshold) & (index < cut))
                deltas[m] = deltas[m] * kept.astype(f32)  # torch's tensor * mask: inf * 0 is NaN, -x * 0 is -0
            deltas = [rounded(d * w, md) for d, w in zip(deltas, weights)]
            majority = np.where(rounded(np.asarray(sequential_sum(deltas)), md) >= 0, f32(1), f32(-1))
            masks = [(np.sign(d) == majority).astype(f32) for d in deltas]
            mixed = rounded(np.asarray(sequential_sum([d * k for d, k in zip(deltas, masks)])), md)
            if self.normalize:
                divisor = rounded(np.asarray(sequential_sum([w * k for w, k in zip(weights, masks)])), md)
                divisor[divisor == 0] = 1
                mixed = rounded(mixed / divisor, md)
            if self.lam != 1:
                mixed = rounded(mixed * f32(self.lam), md)
            return encoded(rounded(base + mixed, md), md)

        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
            return blockwise_at(raws, [element_size(i.dtype) for i in inputs], element_size(md), start, compute)

    def chunks(self, inputs: Sequence[Input], fds: Sequence[int], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("ties' mix is elementwise")  # the interpreter never asks

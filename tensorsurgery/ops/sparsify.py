"""Sparsified task arithmetic, as mergekit's generalized task arithmetic makes it (``ties``,
``breadcrumbs``, ``breadcrumbs_ties``): each model's difference from the base keeps only some of
its elements, chosen by rank of magnitude over the whole tensor, is weighted, optionally voted on
by sign (the TIES consensus), summed and divided by the weights.

Ranks over a whole tensor are a statistic of it, so these operations are two-pass
(:class:`~tensorsurgery.ops.TwoPassOperation`): :func:`find_ranks` reads the inputs in fixed blocks
and, from histograms of the magnitudes' bit patterns, finds for each rank asked the threshold and
the index where the elements equal to it stop being taken (the lowest indices first, as a stable
sort orders equal values), in bounded memory; :class:`SparseMix` then makes any element range alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Sequence, cast

from tensorsurgery.formats.dtypes import element_size

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input

#: Above and below every magnitude key.
_ABOVE, _BELOW = 1 << 32, -1


@dataclass(frozen=True, slots=True)
class Rank:
    """The first elements of a stable sort of a tensor's magnitudes (``descending``: the largest
    first; else the smallest), equal ones in index order: those strictly past ``threshold`` (a
    magnitude key, :func:`magnitude_keys`), and those equal to it at an index below ``cut``."""

    descending: bool
    threshold: int
    cut: int = 0

    @classmethod
    def none(cls, descending: bool) -> Rank:
        return cls(descending, _ABOVE if descending else _BELOW)

    @classmethod
    def all(cls, descending: bool) -> Rank:
        return cls(descending, _BELOW if descending else _ABOVE)

    def taken(self, keys: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Which elements (their magnitude ``keys``, int64, at tensor ``index``) it takes."""
        past = keys > self.threshold if self.descending else keys < self.threshold
        return cast("np.ndarray", past | ((keys == self.threshold) & (index < self.cut)))


def magnitude_keys(delta: np.ndarray, md: str) -> np.ndarray:
    """Each value's magnitude as an integer that orders as the magnitudes do: the bit pattern of
    its absolute value in the merge dtype (15 bits for 16-bit dtypes, 31 for float32)."""
    import numpy as np

    from tensorsurgery.ops.arith import encoded

    if md == "F32":
        return delta.view(np.uint32) & np.uint32(0x7FFFFFFF)
    if md == "BF16":
        return (delta.view(np.uint32) >> 16) & np.uint32(0x7FFF)  # a bf16 value is a float32's top half
    return encoded(delta, md).view(np.uint16).astype(np.uint32) & np.uint32(0x7FFF)


def deltas(raws: Sequence[np.ndarray], inputs: Sequence[Input], md: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """The base's values and each other input's difference from it, rounded to the merge dtype."""
    from tensorsurgery.ops.arith import rounded, values

    base = values(raws[0], inputs[0].dtype, md)
    return base, [rounded(values(raw, i.dtype, md) - base, md) for raw, i in zip(raws[1:], inputs[1:])]


#: A rank asked of :func:`find_ranks`: (model, descending, how many elements).
Request = tuple[int, bool, int]


#: Reads the inputs once and calls ``visit(model, start, keys)`` for each block of each model's keys.
Scan = Callable[[Sequence["Input"], Sequence["Reader"], str, Callable[[int, int, "np.ndarray"], None]], None]


def find_ranks(inputs: Sequence[Input], readers: Sequence[Reader], md: str,
               requests: Sequence[Request], scan: Scan | None = None) -> dict[Request, Rank]:
    """The :class:`Rank` of each request ``(m, descending, r)``: the ``r`` largest (or smallest)
    magnitudes of model ``m``'s difference from the base (or of the keys ``scan`` gives, numbered
    as it numbers them). One pass of histograms of the keys (two for float32: high then low 16
    bits), one more when a threshold's equal elements are not all taken."""
    import numpy as np

    count = inputs[0].range.length // element_size(inputs[0].dtype)
    out = {q: Rank.none(q[1]) if q[2] <= 0 else Rank.all(q[1]) for q in requests if q[2] <= 0 or q[2] >= count}
    todo = [q for q in dict.fromkeys(requests) if q not in out]
    if not todo:
        return out
    read = scan or _scan_deltas
    wide = md == "F32"
    models = sorted({m for m, _, _ in todo})
    hist = {m: np.zeros(1 << 15, np.int64) for m in models}
    read(inputs, readers, md, lambda m, _, keys: _add(hist, m, keys >> 16 if wide else keys, 1 << 15))
    threshold, before = {}, {}
    for q in todo:
        threshold[q], before[q] = _bin(hist[q[0]], q[1], q[2])
    at = {q: int(hist[q[0]][threshold[q]]) for q in todo}
    if wide:  # the low 16 bits, among the keys of each request's high bin
        low = {q: np.zeros(1 << 16, np.int64) for q in todo}

        def histogram_low(m: int, _: int, keys: np.ndarray) -> None:
            for q in todo:
                if q[0] == m:
                    low[q] += np.bincount(keys[(keys >> 16) == threshold[q]] & np.uint32(0xFFFF), minlength=1 << 16)

        read(inputs, readers, md, histogram_low)
        for q in todo:
            bin_low, more = _bin(low[q], q[1], q[2] - before[q])
            threshold[q], before[q], at[q] = threshold[q] << 16 | bin_low, before[q] + more, int(low[q][bin_low])
    need = {q: q[2] - before[q] for q in todo}  # how many equal to the threshold are taken: 1..at
    cut = {q: count for q in todo}
    partial = [q for q in todo if need[q] < at[q]]
    seen = dict.fromkeys(partial, 0)

    def find_cut(m: int, start: int, keys: np.ndarray) -> None:
        for q in partial:
            if q[0] == m and seen[q] < need[q]:
                where = np.nonzero(keys == threshold[q])[0]
                if seen[q] + where.size >= need[q]:
                    cut[q] = start + int(where[need[q] - seen[q] - 1]) + 1
                seen[q] += where.size

    if partial:
        read(inputs, readers, md, find_cut)
    return {**out, **{q: Rank(q[1], threshold[q], cut[q]) for q in todo}}


def _add(hist: dict[int, np.ndarray], m: int, keys: np.ndarray, bins: int) -> None:
    import numpy as np

    if m in hist:
        hist[m] += np.bincount(keys, minlength=bins)


def _bin(hist: np.ndarray, descending: bool, r: int) -> tuple[int, int]:
    """The bin where the ``r``-th element counted from the top (``descending``) or the bottom
    lies, and how many elements come before that bin."""
    import numpy as np

    if descending:
        reached = np.cumsum(hist[::-1])[::-1]  # reached[v]: elements in bins >= v
        b = int(np.nonzero(reached >= r)[0][-1])
    else:
        reached = np.cumsum(hist)  # elements in bins <= v
        b = int(np.nonzero(reached >= r)[0][0])
    return b, int(reached[b] - hist[b])


def _scan_deltas(inputs: Sequence[Input], readers: Sequence[Reader], md: str,
                 visit: Callable[[int, int, np.ndarray], None]) -> None:
    """``visit(model, start, keys)`` for each block of each non-base input's magnitude keys."""
    from tensorsurgery.ops.blocks import input_blocks

    for start, raws in input_blocks(inputs, readers):
        for m, delta in enumerate(deltas(raws, inputs, md)[1]):
            visit(m, start, magnitude_keys(delta, md))


@dataclass(frozen=True, slots=True)
class Selection:
    """The elements of a model's difference kept: those ``keep`` takes (None: all), less those
    ``drop`` takes (None: none)."""

    keep: Rank | None
    drop: Rank | None = None

    @property
    def everything(self) -> bool:
        """All kept: the model is not sparsified (mergekit returns its difference as it is)."""
        return self.keep is None and self.drop is None

    def kept(self, delta: np.ndarray, md: str, index: np.ndarray) -> np.ndarray:
        """Which elements of ``delta`` (float32 values of the merge dtype at tensor ``index``) it keeps."""
        import numpy as np

        keys = magnitude_keys(delta, md).astype(np.int64)
        kept = self.keep.taken(keys, index) if self.keep is not None else np.ones(delta.size, bool)
        if self.drop is not None:
            kept &= ~self.drop.taken(keys, index)
        return kept


#: mergekit's ``rescaled_masked_tensor`` skips the rescale when a sum is below this.
RESCALE_EPS = 1e-7


def rescale_ratios(inputs: Sequence[Input], readers: Sequence[Reader], md: str,
                   selections: Sequence[Selection]) -> tuple[float | None, ...]:
    """mergekit's L1 rescale of each sparsified model (``rescale = true``): ``sum|delta| /
    sum|kept|`` in the merge dtype, both torch's one-thread whole-tensor sums
    (:mod:`.torch_sums`); None where the model is not sparsified or a sum is below 1e-7 (skipped).
    One more pass over the inputs in fixed blocks."""
    import numpy as np

    from tensorsurgery.ops.arith import rounded
    from tensorsurgery.ops.blocks import input_blocks
    from tensorsurgery.ops.torch_sums import ChunkedSum

    count = inputs[0].range.length // element_size(inputs[0].dtype)
    models = [m for m, s in enumerate(selections) if not s.everything]
    sums = {m: (ChunkedSum(count, md), ChunkedSum(count, md)) for m in models}
    with np.errstate(over="ignore", invalid="ignore"):
        for start, raws in (input_blocks(inputs, readers) if models else ()):
            ds = deltas(raws, inputs, md)[1]
            index = np.arange(start, start + ds[0].size)
            for m in models:
                size = np.abs(ds[m])
                sums[m][0].add(size)
                sums[m][1].add(size * selections[m].kept(ds[m], md, index))
        out: list[float | None] = [None] * len(selections)
        for m, (before, after) in sums.items():
            b, a = (rounded(np.asarray([s.value()], np.float32), md)[0] for s in (before, after))
            if not (b < RESCALE_EPS or a < RESCALE_EPS):
                out[m] = float(rounded(np.asarray([b / a], np.float32), md)[0])
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SparseMix:
    """The values once each model's :class:`Selection` is known: each model's difference kept
    where selected (torch's ``tensor * mask``: -x * 0 is -0, inf * 0 NaN), times its weight; with
    ``consensus`` mergekit's "sum" vote (``maj = +1`` where the weighted differences sum to >= 0),
    the agreeing ones summed and divided (``normalize``) by their weights' sum (0 -> 1); without, all
    summed and divided by all the weights' sum (below 1e-8 in magnitude -> 1); times ``lam``; added
    to the base. Each step rounded to the merge dtype as torch does (:mod:`.arith`)."""

    label: str
    weights: tuple[float, ...]
    selections: tuple[Selection, ...]
    consensus: bool
    normalize: bool
    lam: float
    dtype: str
    #: Each model's rescale factor (:func:`rescale_ratios`; None or empty: not rescaled).
    ratios: tuple[float | None, ...] = ()
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np

        from tensorsurgery.ops.arith import blockwise_at, encoded, rounded, rounded_scalars, sequential_sum

        md = self.dtype
        weights = rounded_scalars(self.weights, md)
        f32 = np.float32
        plain_divisor = rounded(np.asarray([sequential_sum(list(weights))], f32), md)[0]
        if abs(plain_divisor) < 1e-8:
            plain_divisor = f32(1)

        def compute(block: list[np.ndarray], first: int) -> np.ndarray:
            base, ds = deltas(block, inputs, md)
            index = np.arange(first, first + base.size)
            for m, s in enumerate(self.selections):
                if s.everything:
                    continue
                ds[m] = ds[m] * s.kept(ds[m], md, index).astype(f32)
                ratio = self.ratios[m] if self.ratios else None
                if ratio is not None:  # torch: masked * (before / after), a 0-dim tensor of the dtype
                    ds[m] = rounded(ds[m] * f32(ratio), md)
            ds = [rounded(d * w, md) for d, w in zip(ds, weights)]
            if self.consensus:
                majority = np.where(rounded(np.asarray(sequential_sum(ds)), md) >= 0, f32(1), f32(-1))
                masks = [(np.sign(d) == majority).astype(f32) for d in ds]
                mixed = rounded(np.asarray(sequential_sum([d * k for d, k in zip(ds, masks)])), md)
                divisor = rounded(np.asarray(sequential_sum([w * k for w, k in zip(weights, masks)])), md)
                divisor[divisor == 0] = 1
            else:
                mixed, divisor = rounded(np.asarray(sequential_sum(ds)), md), plain_divisor
            if self.normalize:
                mixed = rounded(mixed / divisor, md)
            if self.lam != 1:
                mixed = rounded(mixed * f32(self.lam), md)
            return encoded(rounded(base + mixed, md), md)

        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
            return blockwise_at(raws, [element_size(i.dtype) for i in inputs], element_size(md), start, compute)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("a sparsified mix is elementwise")  # the interpreter never asks

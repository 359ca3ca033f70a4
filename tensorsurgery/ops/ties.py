"""``ties``: TIES-merging as mergekit's ``ties`` makes it: each model's difference from the base
keeps its ``density`` largest magnitudes (:mod:`.sparsify`), is weighted, and the models vote on
each element's sign; the differences that agree are summed and divided by their weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator, Sequence

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.base import register
from tensorsurgery.ops.sparsify import Selection, SparseMix, find_ranks, rescale_ratios

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input


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
    #: mergekit's L1 rescale of the kept magnitudes (:func:`.sparsify.rescale_ratios`).
    rescale: bool = False
    label: ClassVar[str] = "ties"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    two_pass: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def prepare(self, inputs: Sequence[Input], readers: Sequence[Reader]) -> SparseMix:
        count = inputs[0].range.length // element_size(inputs[0].dtype)
        ks = [keep_count(d, count) for d in self.densities]
        requests = [(m, True, k) for m, k in enumerate(ks) if k is not None]
        ranks = find_ranks(inputs, readers, self.dtype, requests)
        selections = tuple(Selection(None if k is None else ranks[(m, True, k)]) for m, k in enumerate(ks))
        ratios = rescale_ratios(inputs, readers, self.dtype, selections) if self.rescale else ()
        return SparseMix(self.label, self.weights, selections, True, self.normalize, self.lam, self.dtype, ratios)

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("ties is two-pass: the interpreter applies what prepare returns")

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("ties is two-pass")  # the interpreter never asks

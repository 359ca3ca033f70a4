"""``breadcrumbs`` and ``breadcrumbs_ties``: Model Breadcrumbs as mergekit makes them: each
model's difference from the base drops its largest magnitudes (the ``gamma`` share: outliers)
and then its smallest, down to the ``density`` share (:mod:`.sparsify`); then weighted and summed
as task arithmetic does, or with the TIES sign vote (``consensus``: ``breadcrumbs_ties``)."""
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


def window(density: float, gamma: float, count: int) -> tuple[int, int] | None:
    """The ranks (from the smallest magnitude, ``[low, high)``) mergekit's magnitude_outliers
    keeps of ``count`` elements: ``int(density * count)`` of them, above the
    ``max(0, count - int(density * count) - int(gamma * count))`` smallest; None for all (density
    1 or more: not sparsified)."""
    if density >= 1:
        return None
    target = int(density * count)
    low = max(0, count - target - int(gamma * count))
    return low, low + target


@register
@dataclass(frozen=True, slots=True)
class Breadcrumbs:
    """The first input is the base; one weight, density and gamma per other input; ``consensus``
    for breadcrumbs_ties. Arithmetic as torch does it in the merge ``dtype`` (see :mod:`.arith`)."""

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    gammas: tuple[float, ...]
    consensus: bool
    normalize: bool
    lam: float
    dtype: str
    #: mergekit's L1 rescale of the kept magnitudes (:func:`.sparsify.rescale_ratios`).
    rescale: bool = False
    label: ClassVar[str] = "breadcrumbs"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    two_pass: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def prepare(self, inputs: Sequence[Input], readers: Sequence[Reader]) -> SparseMix:
        count = inputs[0].range.length // element_size(inputs[0].dtype)
        windows = [window(d, g, count) for d, g in zip(self.densities, self.gammas)]
        requests = [(m, False, r) for m, w in enumerate(windows) if w is not None for r in w]
        ranks = find_ranks(inputs, readers, self.dtype, requests)
        selections = tuple(Selection(None) if w is None else Selection(ranks[(m, False, w[1])], ranks[(m, False, w[0])])
                           for m, w in enumerate(windows))
        ratios = rescale_ratios(inputs, readers, self.dtype, selections) if self.rescale else ()
        return SparseMix(self.label, self.weights, selections, self.consensus, self.normalize, self.lam, self.dtype,
                         ratios)

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("breadcrumbs is two-pass: the interpreter applies what prepare returns")

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("breadcrumbs is two-pass")  # the interpreter never asks

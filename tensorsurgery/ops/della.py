"""``della``: mergekit's ``della`` and ``della_linear`` (generalized task arithmetic with
``della_magprune``, with or without TIES's sign consensus), as mergekit 0.1.5 computes them on the
CPU with one torch thread and its ``torch.argsort`` made stable.

For each model ``m`` (config order) whose density ``d`` lies in (0, 1), the delta ``x_m - base``
(rounded to the merge dtype) is ranked within each row by magnitude (a 1-D tensor is one row;
equal magnitudes in index order, as a stable sort ranks them), and element ``i`` is kept where
torch's ``bernoulli(p)`` draws 1, ``p = (d - e) + rank_norm * 2 * e``, ``rank_norm`` the rank
scaled to [0, 1] over its row: all in the *work dtype* (bfloat16 for bfloat16, float32 otherwise),
every step rounded as torch rounds it (:func:`probability_table`). One draw per element from
torch's CPU generator (:mod:`tensorsurgery.ops.mt_stream`), the models one after another, this
tensor's draws starting at ``offset``. Then as DARE (:mod:`tensorsurgery.ops.dare`): ``rescale``
times ``sum|delta| / sum|kept|``, the weights, the sum (``ties``: the sign consensus). A density of
1 keeps the delta and 0 (or below) zeroes it, neither drawing.

The draws must be taken in order, so this is not elementwise: :meth:`Della.chunks` reads its
inputs itself, whole rows at a time, twice when it rescales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator, Sequence

from tensorsurgery.ops.base import register

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input


@register
@dataclass(frozen=True, slots=True)
class Della:
    """``base + lam * mixed`` of the pruned deltas (see the module docstring): the first input is
    the base, one ``weights``, ``densities`` and ``epsilons`` entry per other input; ``ties`` the
    sign consensus; ``dtype`` the merge dtype; draws from torch's generator seeded ``seed`` from
    output number ``offset`` on."""

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    epsilons: tuple[float, ...]
    normalize: bool
    rescale: bool
    lam: float
    ties: bool
    dtype: str
    seed: int
    offset: int
    label: ClassVar[str] = "della"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], *args: object) -> np.ndarray:
        raise NotImplementedError("della draws in order: not elementwise")  # the interpreter never asks

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        from tensorsurgery.ops.della_kernel import della_chunks  # numpy: not imported by planning

        return della_chunks(self, inputs, readers, row_length(inputs[0].shape))


def row_length(shape: Sequence[int]) -> int:
    """The elements della ranks together: a row of a matrix, the whole of a vector (mergekit
    makes it a row)."""
    return shape[-1] if len(shape) == 2 else (shape[0] if shape else 1)

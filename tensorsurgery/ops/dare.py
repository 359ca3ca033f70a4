"""``dare``: mergekit's ``dare_linear`` and ``dare_ties`` (generalized task arithmetic with random
sparsification, optionally TIES's sign consensus), as mergekit 0.1.5 computes them on the CPU with
one torch thread.

For each model ``m`` (config order) whose density is below 1, the delta ``x_m - base`` (rounded
to the merge dtype) is kept where torch's ``bernoulli(density)`` draws 1: one draw per element from
torch's CPU generator (:mod:`tensorsurgery.ops.mt_stream`), the models one after another, this
tensor's draws starting at ``offset``. Then, with ``rescale``, the kept values times
``sum|delta| / sum|kept|`` (torch's one-thread sums, :mod:`tensorsurgery.ops.torch_sums`; skipped
when either sum is below 1e-7), in the *work dtype* (bfloat16 for bfloat16, float32 otherwise: torch
has no float16 bernoulli on the CPU, mergekit widens), and back to the merge dtype. The rest is
task arithmetic: times the weight, summed over the models (``dare_ties``: only the deltas whose sign
agrees with the sign of their sum, divided by the sum of those weights when ``normalize``).

The draws must be taken in order, so this is not elementwise: :meth:`Dare.chunks` reads its
inputs itself, twice when it rescales (a first pass for the sums, the same draws again for the
values).
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
class Dare:
    """``base + lam * mixed`` of the sparsified deltas (see the module docstring): the first input
    is the base, one ``weights`` and ``densities`` entry per other input; ``ties`` the sign
    consensus; ``dtype`` the merge dtype; draws from torch's generator seeded ``seed`` from output
    number ``offset`` on."""

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    normalize: bool
    rescale: bool
    lam: float
    ties: bool
    dtype: str
    seed: int
    offset: int
    label: ClassVar[str] = "dare"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], *args: object) -> np.ndarray:
        raise NotImplementedError("dare draws in order: not elementwise")  # the interpreter never asks

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        from tensorsurgery.ops.dare_kernel import dare_chunks  # numpy: not imported by planning

        return dare_chunks(self, inputs, readers)

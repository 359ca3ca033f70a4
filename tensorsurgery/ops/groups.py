"""Statistics per group of a tensor's elements (nuslerp's per-row and per-column norms and dots):
which group an element (by its row-major index) belongs to, and float64 sums per group built up a
block at a time."""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np


@dataclass(frozen=True, slots=True)
class Groups:
    """``count`` groups of a tensor's elements: element ``i`` is in group ``i // size`` (rows:
    ``size`` the last dimension), or ``i % size`` when ``columns`` (``size`` the elements of one
    index of the first dimension: the group is every index but the first). One group (``count``
    1) is the whole tensor."""

    columns: bool
    size: int
    count: int

    @staticmethod
    def of(shape: tuple[int, ...], flatten: bool, along_first: bool) -> Groups:
        """The groups of a tensor of ``shape``: one (``flatten``, or a vector); else a group per
        index of every dimension but the first (``along_first``: torch's reduction over dim 0) or
        but the last (over dim -1)."""
        numel = prod(shape)
        if flatten or len(shape) < 2 or numel == 0:
            return Groups(False, max(numel, 1), 1)
        if along_first:
            return Groups(True, numel // shape[0], numel // shape[0])
        return Groups(False, shape[-1], numel // shape[-1])

    def add(self, x: np.ndarray, start: int, acc: np.ndarray) -> None:
        """Add ``x`` (float64 values of elements ``start..``) into each one's group of ``acc``:
        a whole row or column at a time where the block holds it (the order is fixed by the
        blocks, so the sums are the same whoever reads them)."""
        if self.count == 1:
            acc[0] += x.sum()
            return
        k, n = self.size, x.size
        head = min(n, -start % k)  # up to the next row boundary
        body = (n - head) // k * k
        rows, tail = x[head:head + body].reshape(-1, k), x[head + body:]
        if self.columns:
            acc[start % k:start % k + head] += x[:head]
            if body:
                acc += rows.sum(axis=0)
            acc[:tail.size] += tail
            return
        if head:
            acc[start // k] += x[:head].sum()
        first = (start + head) // k
        if body:
            acc[first:first + body // k] += rows.sum(axis=1)
        if tail.size:
            acc[first + body // k] += tail.sum()

    def index(self, start: int, n: int) -> np.ndarray:
        """The group of each element ``start..start+n-1``."""
        i = np.arange(start, start + n, dtype=np.int64)
        return i % self.size if self.columns else i // self.size

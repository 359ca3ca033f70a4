"""Float sums rounded as torch 2.x sums on the CPU with one thread (``tensor.sum()`` and
``tensor.sum(dim=0)``), for the operations whose result depends on a reduction (DARE's rescale).

torch's ``cascade_sum`` (``aten/src/ATen/native/cpu/SumKernel.cpp``) adds in float32 (bfloat16 and
float16 are widened first) in a fixed order: whole-tensor sums run over vectors of 8 float lanes
(bfloat16: 16 elements, the two halves added first), four vectors a row, rows summed in levels of
``2**max(4, ceil(log2(rows)) // 4)`` so that only similar magnitudes meet, then the leftover
vectors, the four row lanes, the scalar tail and the 8 lanes in order. Measured: 8 lanes even where
torch reports AVX512 (its sum kernel runs 256-bit vectors), bitwise on 600 random sizes. With
several threads torch splits the sum per thread and the rounding moves; this is its one-thread
order, and ours on any number of threads.
"""
from __future__ import annotations

from typing import Any, Sequence, cast

import numpy as np

#: Float lanes of torch's sum vectors.
LANES = 8


def _ceil_log2(x: int) -> int:
    return 0 if x <= 1 else (x - 1).bit_length()


#: float32 arrays, or a float32 scalar where a sum has no term yet.
Values = Any


def _sequential(terms: Sequence[Values]) -> Values:
    """``((0 + t0) + t1) + ...`` in float32, as torch's accumulators start from zero."""
    total = np.float32(0) + terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _levels(rows: Sequence[Values]) -> Values:
    """torch's ``multi_row_sum`` of ``rows`` (arrays of one shape: each lane on its own): blocks of
    ``step`` rows summed in order, block sums gathered in two more levels of ``step``, then the
    last rows, and the levels added from the lowest."""
    size = len(rows)
    if size == 0:
        return np.zeros_like(rows[0]) if rows else np.float32(0)
    step = 1 << max(4, _ceil_log2(size) // 4)
    if size < step:
        return _sequential(rows)
    acc1: Values = np.float32(0)
    acc2: Values = np.float32(0)
    acc3: Values = np.float32(0)
    blocks = size // step
    for b in range(blocks):
        acc1 = acc1 + _sequential(rows[b * step:(b + 1) * step])
        done = b + 1
        if done % step == 0:
            acc2, acc1 = acc2 + acc1, np.float32(0)
            if done % (step * step) == 0:
                acc3, acc2 = acc3 + acc2, np.float32(0)
    acc0 = _sequential(rows[blocks * step:]) if blocks * step < size else np.float32(0)
    return ((acc0 + acc1) + acc2) + acc3


def _ilp(rows: Sequence[Values]) -> Values:
    """torch's ``row_sum``: four interleaved accumulators (rows ``k, k+4, ...``), the rows past the
    last four added to the first, then the four in order."""
    size = len(rows) // 4
    parts = [_levels(rows[k:4 * size:4]) if size else np.float32(0) for k in range(4)]
    for r in rows[4 * size:]:
        parts[0] = parts[0] + r
    return ((parts[0] + parts[1]) + parts[2]) + parts[3]


def model_sum(terms: Sequence[Values], start: int, n: int, vector: int) -> Values:
    """``torch.stack(terms).sum(dim=0)`` before its rounding to the tensor's dtype: float32 sums
    over the models (``terms``, float32 values of elements ``start..`` of a tensor of ``n``
    elements), in torch's order for each element; ``vector`` is torch's vector of the dtype
    (16 elements of a 16-bit float, 8 of a float32). Columns of torch's main loop (four vectors
    at a time) sum the models in order; the last columns go through ``row_sum`` (rows ``k, k+4,
    ...`` first), which is another order from four models on."""
    count = terms[0].size
    cut = n - n % (4 * LANES) if n >= vector else n - n % 4
    if len(terms) < 4 or start + count <= cut:
        return _levels(terms)
    out = np.empty(count, np.float32)
    head = max(0, min(count, cut - start))
    if head:
        out[:head] = _levels([t[:head] for t in terms])
    out[head:] = _ilp([t[head:] for t in terms])
    return out


def full_sum(values: np.ndarray, dtype: str) -> np.float32:
    """torch's ``tensor.sum()`` of a small tensor of ``dtype`` (its float32 ``values``), before
    its rounding to ``dtype``."""
    total = CascadeSum(values.size, dtype)
    total.add(np.asarray(values, np.float32))
    return total.value()


class CascadeSum:
    """torch's ``tensor.sum()`` of a tensor of ``n`` elements of ``dtype`` (BF16, F16 or F32) fed
    in order as float32 values, in chunks of whole :attr:`unit` elements (the last chunk may be
    shorter); :meth:`value` is the float32 sum before torch rounds it to the tensor's dtype."""

    def __init__(self, n: int, dtype: str):
        self.n, self.vector = n, (LANES if dtype == "F32" else 2 * LANES)
        self.dtype = dtype
        self.rows = n // self.vector // 4
        self.step = 1 << max(4, _ceil_log2(self.rows) // 4)
        #: Elements a chunk holds a whole number of: one block of ``step`` blocks of ``step`` rows.
        self.unit = self.step * self.step * 4 * self.vector
        self.done = 0
        self._acc = [np.zeros(4 * LANES, np.float32) for _ in range(4)]
        self._groups = 0
        self._tail: list[np.ndarray] = []

    def add(self, values: np.ndarray) -> None:
        """Elements ``done..done+len(values)-1`` (float32 values)."""
        if self.n < self.vector:
            self._tail.append(values.copy())
            self.done += values.size
            return
        row = 4 * self.vector
        rows_end = self.rows * row
        r = max(0, min(values.size, rows_end - self.done)) // row
        if r:
            self._add_rows(self._vectors(values[:r * row]).reshape(r, 4 * LANES))
        rest = values[r * row:]
        if rest.size:
            self._tail.append(rest.copy())  # at most 4 vectors' worth, at the end of the tensor
        self.done += values.size

    def _vectors(self, values: np.ndarray) -> np.ndarray:
        v = values.reshape(-1, self.vector)
        if self.dtype == "BF16":  # its own load: the two halves of 16 elements
            return cast("np.ndarray", v[:, :LANES] + v[:, LANES:])
        if self.dtype == "F16":  # the generic load: neighbours
            return cast("np.ndarray", (np.float32(0) + v[:, 0::2]) + v[:, 1::2])
        return v

    def _add_rows(self, rows: np.ndarray) -> None:
        step, acc = self.step, self._acc
        blocks = rows.shape[0] // step
        width = rows.shape[1]
        level0 = rows[:blocks * step].reshape(blocks, step, width)
        sums = level0[:, 0].copy()
        for j in range(1, step):
            sums += level0[:, j]
        groups = blocks // step
        if groups:
            g = sums[:groups * step].reshape(groups, step, width)
            firsts = g[:, 0].copy()
            for j in range(1, step):
                firsts += g[:, j]
            for s in firsts:
                acc[2] = acc[2] + s
                self._groups += 1
                if self._groups % step == 0:
                    acc[3], acc[2] = acc[3] + acc[2], np.zeros_like(acc[2])
        for s in sums[groups * step:]:  # the tensor's last blocks (a chunk is whole groups before)
            acc[1] = acc[1] + s
        for r in rows[blocks * step:]:
            acc[0] = acc[0] + r

    def value(self) -> np.float32:
        """The sum, once every element was added."""
        assert self.done == self.n, (self.done, self.n)
        tail = np.concatenate(self._tail) if self._tail else np.zeros(0, np.float32)
        if self.n < self.vector:
            return np.float32(np.float32(0) + _ilp(list(tail)))
        acc = self._acc
        lanes = (((acc[0] + acc[1]) + acc[2]) + acc[3]).reshape(4, LANES)
        whole = (tail.size // self.vector) * self.vector
        p0 = lanes[0]
        for v in self._vectors(tail[:whole]):
            p0 = p0 + v
        p0 = ((p0 + lanes[1]) + lanes[2]) + lanes[3]
        total = np.float32(0)
        for x in tail[whole:]:
            total = np.float32(total + x)
        for x in p0:
            total = np.float32(total + x)
        return total


class ChunkedSum:
    """A :class:`CascadeSum` fed chunks of any size (it takes whole units; the rest waits for the
    next chunk, at most a unit of it)."""

    def __init__(self, n: int, dtype: str):
        self.sum = CascadeSum(n, dtype)
        self._rest = np.zeros(0, np.float32)

    def add(self, values: np.ndarray) -> None:
        """The next elements (float32 values)."""
        values = np.concatenate((self._rest, values)) if self._rest.size else values
        whole = values.size // self.sum.unit * self.sum.unit
        if whole:
            self.sum.add(values[:whole])
        self._rest = values[whole:].copy()

    def value(self) -> np.float32:
        """The sum, once every element was added."""
        if self._rest.size:
            self.sum.add(self._rest)
            self._rest = self._rest[:0]
        return self.sum.value()

"""Whole-tensor norms and dot products rounded as torch 2 makes them on the CPU with one thread,
fed a block at a time (the tensor is never whole in memory), for the operations whose result
depends on them (karcher).

* :class:`VectorNorm`: ``torch.linalg.vector_norm`` of a float32 tensor: the order of
  :func:`tensorsurgery.ops.lora.row_norms` over one row (squares summed in 8 lanes in element
  order, the lanes in order, the tail's squares added one by one then by fused multiply-adds).
* :class:`HalfDot`: ``torch.dot`` of two bfloat16 or float16 vectors, torch's
  ``dot_with_fp32_arith``: 8 vector registers of 16 float32 lanes (its AVX512 kernel, the CPU
  capability torch picks here) accumulate 128 elements at a time by fused multiply-adds (the
  product of two 16-bit values is exact in float32, so a sum rounds as the fused one), reduced by
  halves (registers 4 apart, 2, 1, then the lanes 8, 4, 2, 1 apart); the last whole vectors of 32
  elements in one more register, the last elements one by one. Measured bitwise on 47 sizes in
  each dtype (tests/test_merge_karcher.py). On a CPU without AVX512 torch runs 8 lanes and rounds
  otherwise.
* :class:`ExactDot`: a float32 dot product as a float64 sum (fixed blocks, the blocks' sums added
  exactly) rounded once: torch's float32 ``dot`` is MKL's ``sdot``, whose order is MKL's own.
"""
from __future__ import annotations

import math

import numpy as np

from tensorsurgery.ops.lora import _fma_square

#: Lanes of torch's norm reduction.
NORM_LANES = 8
#: Float32 lanes of one vector register of torch's AVX512 dot kernel, and registers a step.
DOT_LANES, DOT_REGISTERS = 16, 8


def _halves(v: np.ndarray) -> np.float32:
    """The lanes of ``v`` added by halves (torch's ``vec_reduce_all`` of a vector register)."""
    while v.shape[0] > 1:
        half = v.shape[0] // 2
        v = v[:half] + v[half:]
    return np.float32(v[0])


class VectorNorm:
    """torch's ``linalg.vector_norm`` of ``n`` float32 values fed in order (:meth:`add`, chunks
    of a multiple of :data:`NORM_LANES` elements but the last)."""

    def __init__(self, n: int):
        self.n, self.main, self.done = n, n - n % NORM_LANES, 0
        self._lanes = np.zeros(NORM_LANES, np.float32)
        self._tail = np.zeros(0, np.float32)

    def add(self, x: np.ndarray) -> None:
        head = max(0, min(x.size, self.main - self.done))
        if head:
            squares = np.square(x[:head]).reshape(-1, NORM_LANES)
            # a reduction over the outer axis adds row by row: each lane in element order
            self._lanes = np.add.reduce(np.concatenate((self._lanes[None], squares)), axis=0)
        if head < x.size:
            self._tail = np.concatenate((self._tail, x[head:]))
        self.done += x.size

    def value(self) -> np.float32:
        assert self.done == self.n, (self.done, self.n)
        total = np.zeros(1, np.float32)
        for lane in self._lanes:
            total += lane
        tail = self._tail
        quad = 4 if tail.size >= 4 else 0
        for v in np.square(tail[:quad]):
            total += v
        for v in tail[quad:]:
            total = _fma_square(np.asarray([v], np.float32), total)
        return np.float32(np.sqrt(total)[0])


class HalfDot:
    """torch's ``dot`` of two vectors of ``n`` bfloat16 or float16 values fed in order as float32
    values (:meth:`add`, chunks of a multiple of 128 elements but the last), before its rounding
    to the dtype."""

    STEP = DOT_LANES * DOT_REGISTERS

    def __init__(self, n: int):
        self.n, self.main, self.done = n, n - n % self.STEP, 0
        self._acc = np.zeros((DOT_REGISTERS, DOT_LANES), np.float32)
        self._tail = np.zeros(0, np.float32)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        head = max(0, min(x.size, self.main - self.done))
        if head:
            products = (x[:head] * y[:head]).reshape(-1, DOT_REGISTERS, DOT_LANES)
            self._acc = np.add.reduce(np.concatenate((self._acc[None], products)), axis=0)
        if head < x.size:
            self._tail = np.concatenate((self._tail, x[head:] * y[head:]))
        self.done += x.size

    def value(self) -> np.float32:
        assert self.done == self.n, (self.done, self.n)
        acc = self._acc
        for offset in (4, 2, 1):
            acc = acc[:offset] + acc[offset:2 * offset]
        total = _halves(acc[0])
        tail = self._tail
        whole = tail.size - tail.size % (2 * DOT_LANES)  # the 16-bit vectors of 32 elements
        register = np.zeros(DOT_LANES, np.float32)
        for j in range(0, whole, DOT_LANES):
            register = register + tail[j:j + DOT_LANES]
        total = np.float32(total + _halves(register))
        for p in tail[whole:]:
            total = np.float32(total + p)
        return total


class ExactDot:
    """A float32 dot product as float64 (numpy's pairwise sum in each chunk, the chunks' sums
    added exactly) rounded once to float32; the same value whoever feeds it in the same chunks."""

    def __init__(self, n: int):
        self.n, self._parts = n, list[float]()

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self._parts.append(float(np.sum(x.astype(np.float64) * y.astype(np.float64))))

    def value(self) -> np.float32:
        return np.float32(math.fsum(self._parts))


def dot_sum(n: int, dtype: str) -> HalfDot | ExactDot:
    """The dot product of two vectors of ``n`` elements of the merge ``dtype``, as torch rounds it
    (16-bit dtypes), or exactly rounded (float32)."""
    return ExactDot(n) if dtype == "F32" else HalfDot(n)

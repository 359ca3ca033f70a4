"""Per-thread scratch buffers for the chunks that bytes go through on their way (casts, heads,
inputs of computed tensors)."""
from __future__ import annotations

import mmap
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np

_local = threading.local()
#: Buffers from this size on are mappings of their own (:func:`_buffer`).
MAPPED = 1 << 16


def scratch(n: int, slot: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """This thread's scratch buffers number ``slot``: ``n`` bytes for source bytes, ``2n`` for
    what is made of them. Reused across tensors: fresh multi-MB arrays per tensor make glibc raise
    its mmap threshold and keep the freed memory resident, which shows as creeping peak RSS.

    Each slot's buffers are valid until the next call for that slot on the same thread.
    """
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    have = buffers.get(slot)
    if have is None or have[0].size < n:
        have = buffers[slot] = (_buffer(n), _buffer(2 * n))
    return have[0][:n], have[1][:2 * n]


@contextmanager
def nested() -> Iterator[None]:
    """This thread's scratch buffers swapped for a second set while the block runs: a computation
    made inside another one's (a derived input, :mod:`tensorsurgery.ops.derived`, read by a merge
    whose inputs already sit in the first set) must not write over the outer one's buffers. The
    second set is kept for the next time, as the first is."""
    outer = getattr(_local, "buffers", None)
    inner = getattr(_local, "inner", None)
    if inner is None:
        inner = _local.inner = {}
    if outer is inner:
        raise RuntimeError("scratch buffers nested twice: a derived input read inside another")
    _local.buffers = inner
    try:
        yield
    finally:
        _local.buffers = outer


def scratch_array(count: int, dtype: type, slot: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``count`` elements of ``dtype`` (as ``shape``, when given) in this thread's scratch buffer
    ``slot`` (:func:`scratch`'s first one)."""
    values: np.ndarray = scratch(count * np.dtype(dtype).itemsize, slot=slot)[0].view(dtype)
    return values if shape is None else values.reshape(shape)


def fresh(n: int) -> np.ndarray:
    """``n`` new bytes, not a scratch slot (kept by their user, freed with it): a large one a
    mapping of its own, unmapped when the last view of it goes (:func:`_buffer`)."""
    return _buffer(n)


def _buffer(n: int) -> np.ndarray:
    """``n`` bytes that take memory only where they are written: a large one is an anonymous
    mapping of its own (not part of malloc's heap, whose pages, once touched by anything, stay
    resident: a slot whose second buffer is never used cost its size nonetheless), unmapped when
    the slot grows."""
    if n < MAPPED:
        return np.empty(n, np.uint8)
    return np.frombuffer(mmap.mmap(-1, n), np.uint8)

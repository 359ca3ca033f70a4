"""torch's CPU random stream, reproduced with numpy and taken up anywhere along it.

``torch.manual_seed(seed)`` (``transformers.set_seed``, mergekit's ``--random-seed``) seeds torch's
CPU generator, an mt19937 initialised from the seed's low 32 bits as ``init_genrand``; numpy's
``MT19937`` with its legacy seeding is the same generator, output for output. ``torch.bernoulli`` on
the CPU takes one 32-bit output per element, in order, and keeps the element when
``(r & 0xFFFFFF) * 2**-24 < p`` (measured, bfloat16 and float32 probabilities).

A tensor's draws start where the draws of every tensor before it in mergekit's order end (its
*offset*, planned: :mod:`tensorsurgery.planning.dare`), but the writer makes tensors in the output's
order. The generator's state at an offset is found by advancing from the nearest state known at or
before it; states are remembered every :data:`SPACING` outputs passed and wherever a tensor's draws
end, so writing every tensor costs about one extra run through the stream, not one per tensor.
Shared by the writer's threads, ``verify`` and ``--resume`` (a lock around the table; advancing
happens outside it).
"""
from __future__ import annotations

import bisect
import threading
from typing import Any

import numpy as np

#: Outputs between two remembered states while advancing (a state is 2.5 kB; 2**23 outputs take
#: about 30 ms to pass over).
SPACING = 1 << 23
#: States remembered per seed at most (about 10 MB); past that the table is halved, oldest first.
MAX_STATES = 4096

_lock = threading.Lock()
_states: dict[int, tuple[list[int], dict[int, Any]]] = {}


class Stream:
    """torch's CPU generator seeded with ``seed``, at output number ``offset``."""

    def __init__(self, seed: int, offset: int):
        self.seed = seed
        self._bits = np.random.MT19937(0)
        start, state = _nearest(seed, offset)
        if state is None:
            self._bits._legacy_seeding(seed & 0xFFFFFFFF)
        else:
            self._bits.state = state
        self.offset = start
        self._random = np.random.RandomState(self._bits)
        self.advance(offset - start)

    def copy(self) -> Stream:
        """Another stream at the same place (this one goes on on its own)."""
        other = Stream.__new__(Stream)
        other.seed, other.offset = self.seed, self.offset
        other._bits = np.random.MT19937(0)
        other._bits.state = self._bits.state
        other._random = np.random.RandomState(other._bits)
        return other

    def advance(self, count: int) -> None:
        """Pass over ``count`` outputs, remembering a state every :data:`SPACING`."""
        while count > 0:
            k = min(count, SPACING - self.offset % SPACING)
            self._bits.random_raw(k, output=False)
            self.offset += k
            count -= k
            if self.offset % SPACING == 0:
                self.remember()

    def low24(self, count: int) -> np.ndarray:
        """The next ``count`` outputs' low 24 bits (uint32): numpy's masked bounded integers take
        exactly one output each when the bound is a power of two."""
        out = self._random.randint(0, 1 << 24, size=count, dtype=np.uint32)
        self.offset += count
        return out

    def raw32(self, count: int) -> np.ndarray:
        """The next ``count`` outputs, whole (uint64 values below 2**32)."""
        out = self._bits.random_raw(count)
        self.offset += count
        return out

    def remember(self) -> None:
        """Keep the current state for later streams of this seed."""
        offset, state = self.offset, self._bits.state
        with _lock:
            offsets, table = _states.setdefault(self.seed, ([], {}))
            if offset in table:
                return
            if len(offsets) >= MAX_STATES:
                for old in offsets[::2]:
                    del table[old]
                offsets[:] = offsets[1::2]
            bisect.insort(offsets, offset)
            table[offset] = state


def _nearest(seed: int, offset: int) -> tuple[int, Any]:
    """The remembered state of ``seed`` nearest at or before ``offset`` (0 and None: the seed's)."""
    with _lock:
        offsets, table = _states.get(seed, ([], {}))
        i = bisect.bisect_right(offsets, offset)
        if i == 0:
            return 0, None
        return offsets[i - 1], table[offsets[i - 1]]


def keep_threshold(p: float) -> int:
    """The integer ``T`` with ``low24 < T`` exactly when ``low24 * 2**-24 < p`` (``p`` a float32
    value in [0, 1])."""
    import math
    return min(1 << 24, math.ceil(float(p) * (1 << 24)))

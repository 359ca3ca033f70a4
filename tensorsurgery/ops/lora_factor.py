"""The float32 ``A`` factor of the LoRA tensors being merged, read once per tensor and shared by the
threads that make its rows (:class:`~tensorsurgery.ops.lora.LoraMerge`).

Every 128-row window of a merged tensor needs all of ``A`` (``[r, cols]``: 2.75 MiB at r = 128 on
a 5632-column ``down_proj``); read per window into each thread's own buffer, that was a copy per
thread (three, with the reading thread's straddling rows) and one read of ``A`` per window. Here a
thread takes the factor from a small pool: a buffer that holds it already (another thread's, or
this thread's previous window's) is shared; otherwise an idle buffer (or a new one, up to a bound)
is filled, or the thread waits for one to become idle. Reused across tensors (fresh multi-MB
arrays make glibc keep freed memory resident, see :mod:`tensorsurgery.scratch`).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Hashable, Iterator

if TYPE_CHECKING:
    import numpy as np


class _Slot:
    __slots__ = ("buffer", "key", "users", "used")

    def __init__(self, nbytes: int) -> None:
        import numpy as np

        self.buffer = np.empty(nbytes, np.uint8)
        self.key: Hashable = None
        self.users = 0
        self.used = 0  # when it was last taken (the least recently used idle slot is refilled first)


class SharedFactors:
    """At most ``buffers`` buffers holding a factor each, by key, for the threads that use it at
    the same time; a thread that needs another factor while every buffer is in use waits for one
    (a holder only computes, it never waits for anything while holding)."""

    def __init__(self, buffers: int = 1) -> None:
        self._free = threading.Condition()
        self._slots: list[_Slot] = []
        self._most = buffers
        self._clock = 0

    @contextmanager
    def taken(self, key: Hashable, nbytes: int, fill: Callable[[np.ndarray], None]) -> Iterator[np.ndarray]:
        """The ``nbytes`` (uint8) that ``fill`` writes for ``key``, filled once while they stay in
        the pool; read-only to the caller, valid inside the ``with`` block. Filled under the pool's
        lock: another thread wanting the same key waits for it rather than reading it again."""
        with self._free:
            while (slot := self._slot(key, nbytes)) is None:
                self._free.wait()
            if slot.key != key:
                slot.key = None  # refilled: not the old key's any more, nor the new one's if fill raises
                if slot.buffer.size < nbytes:
                    slot.buffer = _Slot(nbytes).buffer
                fill(slot.buffer[:nbytes])
                slot.key = key
            self._clock += 1
            slot.users += 1
            slot.used = self._clock
        try:
            yield slot.buffer[:nbytes]
        finally:
            with self._free:
                slot.users -= 1
                if slot.users == 0:
                    self._free.notify_all()

    def _slot(self, key: Hashable, nbytes: int) -> _Slot | None:
        """The slot holding ``key``, else the least recently used idle one, else a new one while
        fewer than the most exist, else None (wait)."""
        held = next((s for s in self._slots if s.key == key), None)
        if held is not None:
            return held
        idle = [s for s in self._slots if s.users == 0]
        if idle:
            return min(idle, key=lambda s: s.used)
        if len(self._slots) < self._most:
            self._slots.append(_Slot(nbytes))
            return self._slots[-1]
        return None

    def slots(self) -> int:
        """How many buffers the pool holds (tests)."""
        return len(self._slots)


#: The process's pool: one buffer, so one factor in memory whatever the threads (a thread that starts
#: the next tensor waits for the others to finish their window of the previous one).
FACTORS = SharedFactors(1)

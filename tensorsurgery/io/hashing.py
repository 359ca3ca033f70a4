"""Hashing the output tensors from the pump's buffers on a pool of threads.

A tensor's bytes must be hashed in order, so each tensor belongs to one thread (by its number);
different tensors hash in parallel (hashlib releases the GIL on large updates), so a many-core
machine is not held to one core's sha256 speed. A block is hashed while it is being written (both
only read the buffer); its buffer goes back to the pump once the write and every thread that had
bytes in it are done with it.
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading
from typing import Callable, Hashable, Iterable

from tensorsurgery.errors import OptionError
from tensorsurgery.io.packing import Block

#: Threads that hash (and cast, and compare) tensors by default: one per core, up to 8.
DEFAULT_THREADS = max(1, min(8, os.cpu_count() or 1))
#: The most ``--threads`` may ask for: past any core count the work scales to (the pump starts
#: about twice this many threads), far below the thousands an OS refuses to start.
MAX_THREADS = 256


def check_threads(threads: int | None) -> int:
    """``threads`` (None: :data:`DEFAULT_THREADS`), checked before any thread is started.

    Raises:
        OptionError: not a whole number from 1 to :data:`MAX_THREADS`.
    """
    if threads is None:
        return DEFAULT_THREADS
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise OptionError(f"--threads {threads!r} is out of range: give a number from 1 to {MAX_THREADS} "
                          f"(default {DEFAULT_THREADS}: one per core, up to 8)")
    return threads

def first_of_each(recipes: Iterable[Hashable]) -> dict[int, int]:
    """For each position whose recipe (source bytes and transform) appeared at an earlier position,
    that earlier position: the same bytes hash the same, so they are hashed once (DUS repeats
    layers m..n-m-1)."""
    first: dict[Hashable, int] = {}
    same: dict[int, int] = {}
    for i, recipe in enumerate(recipes):
        j = first.setdefault(recipe, i)
        if j != i:
            same[i] = j
    return same


#: A hashing thread's work: a block and its segments ``(tensor id, start, end)`` in that thread's share.
_Work = tuple[Block, list[tuple[int, int, int]]]


class _Open:
    """A tensor being hashed: its hash object and the bytes still to come."""

    __slots__ = ("sha256", "left")

    def __init__(self, sha256: hashlib._Hash, left: int):
        self.sha256, self.left = sha256, left


_EMPTY = hashlib.sha256().hexdigest()


class HashPool:
    """sha256 of tensors (by number) from the segments of the blocks passed to :meth:`submit`.

    ``release`` gets each block back once it is hashed and :meth:`unhold` was called for it;
    ``threads`` >= 1.
    """

    def __init__(self, threads: int, release: Callable[[Block], None]):
        self._release = release
        # A tensor's hash object (~300 B) lives only while its bytes come: then its digest stays.
        self._open: dict[int, _Open] = {}
        self._digests: dict[int, str] = {}
        self._queues: list[queue.SimpleQueue[_Work | None]] = [queue.SimpleQueue() for _ in range(max(1, threads))]
        self._pending: dict[int, int] = {}
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, args=(q,), name=f"ts-hash-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for thread in self._threads:
            thread.start()

    def start(self, tid: int, nbytes: int) -> None:
        """Tensor ``tid``, of ``nbytes`` bytes, will be hashed (call before its first block is submitted)."""
        if nbytes:
            self._open[tid] = _Open(hashlib.sha256(), nbytes)
        else:
            self._digests[tid] = _EMPTY

    def submit(self, block: Block) -> None:
        """Hash the tensor bytes ``block`` holds. The caller holds the block (it is being
        written) until it calls :meth:`unhold`; it is released once that and the hashing are done."""
        parts: dict[int, list[tuple[int, int, int]]] = {}
        for seg in block.segments:
            parts.setdefault(seg[0] % len(self._queues), []).append(seg)
        with self._lock:
            self._pending[id(block)] = len(parts) + 1
        for worker, segments in parts.items():
            self._queues[worker].put((block, segments))

    def unhold(self, block: Block) -> None:
        """The caller is done with ``block`` (written, or given up)."""
        self._unref(block)

    def _unref(self, block: Block) -> None:
        with self._lock:
            self._pending[id(block)] -= 1
            done = self._pending[id(block)] == 0
            if done:
                del self._pending[id(block)]
        if done:
            self._release(block)

    def close(self) -> dict[int, str]:
        """Wait for every submitted block; returns tensor number -> sha256 hex digest.

        Raises:
            BaseException: what a hashing thread raised.
        """
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join()
        if self.error is not None:
            raise self.error
        # What is still open was not hashed whole (a stopped run): its digest of what came.
        self._digests.update((tid, h.sha256.hexdigest()) for tid, h in self._open.items())
        self._open.clear()
        return self._digests

    def _run(self, q: queue.SimpleQueue[_Work | None]) -> None:
        while (item := q.get()) is not None:
            block, segments = item
            try:
                if self.error is None:
                    with memoryview(block.buf) as view:
                        for tid, start, end in segments:
                            # A tensor's segments all go to one thread (by tid): no lock needed.
                            h = self._open[tid]
                            h.sha256.update(view[start:end])
                            h.left -= end - start
                            if not h.left:
                                self._digests[tid] = h.sha256.hexdigest()
                                del self._open[tid]
            except BaseException as e:  # noqa: BLE001 - handed to close()
                self.error = e
            self._unref(block)

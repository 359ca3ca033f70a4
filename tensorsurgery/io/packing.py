"""Packing bytes into the pump's fixed-size, page-aligned buffers: each full buffer becomes a
:class:`Block` that knows which file it belongs to, where, and which tensor bytes it holds (for
hashing). Verbatim source bytes are read straight into a buffer (no copy in between), and a
transform can fill a reserved range of a buffer from another thread (:meth:`Packer.fill`): the
block then carries the pending jobs, which its consumer waits for before using the bytes."""
from __future__ import annotations

import mmap
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from tensorsurgery.io.byte_source import Reader

ALIGN = 4096


@dataclass(slots=True)
class Block:
    """A filled buffer on its way to disk: which file, where, and which tensor bytes it holds."""

    buf: mmap.mmap
    file: int
    offset: int
    length: int = 0
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (tensor id, start, end)
    last: bool = False
    jobs: list[Future[object]] = field(default_factory=list)  # filling parts of the buffer: wait for them

    def wait(self, quiet: bool = False) -> None:
        """Wait until every job filling this block is done (``quiet``: whatever they raise).

        Raises:
            BaseException: what a job raised (unless ``quiet``).
        """
        for job in self.jobs:
            if quiet:
                try:
                    job.exception()
                except BaseException:  # noqa: BLE001 - cancelled
                    pass
            else:
                job.result()


class Packer:
    """Fills buffers taken with ``take`` and hands each full one (and each file's last) to ``emit``.

    ``tid`` arguments name the tensor the bytes belong to (None: bytes that are not hashed, such
    as a header, or a tensor whose hash is taken from an identical one).
    """

    def __init__(self, take: Callable[[], mmap.mmap], emit: Callable[[Block], None], size: int):
        if size % ALIGN:
            raise ValueError(f"buffer size must be a multiple of {ALIGN}")
        self._take, self._emit, self._size = take, emit, size
        self._block: Block | None = None

    def start_file(self, file: int) -> None:
        """Start packing the file numbered ``file`` at offset 0."""
        self._block = Block(self._take(), file, 0)

    def put(self, data: memoryview, tid: int | None) -> None:
        """Append ``data``."""
        data = data.cast("B")
        while len(data):
            b = self._current()
            n = min(self._size - b.length, len(data))
            b.buf[b.length:b.length + n] = data[:n]
            self._advance(n, tid)
            data = data[n:]

    def read_into(self, reader: Reader, offset: int, length: int, tid: int | None) -> None:
        """Append ``length`` bytes of ``reader`` from ``offset``, read straight into the buffers."""
        done = 0
        while done < length:
            b = self._current()
            n = min(self._size - b.length, length - done)
            with memoryview(b.buf) as whole:
                reader.read_into(whole[b.length:b.length + n], offset + done)
            self._advance(n, tid)
            done += n

    def position(self) -> tuple[int, int]:
        """(file, offset) of the next byte appended; every byte before the current buffer's start
        has been handed on."""
        b = self._current()
        return b.file, b.offset + b.length

    def handed_on(self) -> int:
        """Offset in the current file up to which every byte has been handed on (emitted)."""
        return self._current().offset

    def space(self) -> int:
        """Bytes left in the current buffer (always > 0 between calls)."""
        return self._size - self._current().length

    def fill(self, n: int, tid: int | None, start: Callable[[mmap.mmap, int], Future[object]]) -> None:
        """Append ``n`` bytes (at most :meth:`space`) that ``start(buffer, offset)`` writes into
        the buffer from another thread; the returned future goes with the block."""
        b = self._current()
        assert 0 < n <= self._size - b.length
        b.jobs.append(start(b.buf, b.length))
        self._advance(n, tid)

    def wait_current(self) -> None:
        """Wait for the jobs filling the block not yet handed on (after a failure)."""
        if self._block is not None:
            self._block.wait(quiet=True)

    def finish_file(self) -> None:
        """Hand on the file's last (partial) block."""
        b = self._current()
        b.last = True
        self._emit(b)
        self._block = None

    def _current(self) -> Block:
        assert self._block is not None, "start_file() first"
        return self._block

    def _advance(self, n: int, tid: int | None) -> None:
        b = self._current()
        if tid is not None:
            if b.segments and b.segments[-1][0] == tid and b.segments[-1][2] == b.length:
                b.segments[-1] = (tid, b.segments[-1][1], b.length + n)
            else:
                b.segments.append((tid, b.length, b.length + n))
        b.length += n
        if b.length == self._size:
            self._emit(b)
            self._block = Block(self._take(), b.file, b.offset + b.length)

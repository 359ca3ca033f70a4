"""The byte pump: streams a plan's shards through a few preallocated page-aligned buffers.

The calling thread reads source ranges (``preadv`` straight into the buffers, or through a
bounded scratch buffer when a cast or permutation applies); a writer thread writes full
buffers with ``O_DIRECT`` where the filesystem allows it (the last, unaligned tail of a file
goes through a normal descriptor) so reads and writes overlap and the page cache is spared; a
hasher thread computes each output tensor's sha256 from the same buffers. Memory is
``buffers * buffer_size`` plus one scratch chunk, whatever the model size.
"""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .errors import WriteError
from .plan import OutputTensor, Shard
from .chunks import expected_chunks, pread_exact

BUFFER_SIZE = 4 << 20
BUFFERS = 4
_ALIGN = 4096


@dataclass(slots=True)
class _Block:
    """A filled buffer on its way to disk: which file, where, and which tensor bytes it holds."""

    buf: mmap.mmap
    file: int
    offset: int
    length: int = 0
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (tensor id, start, end)
    last: bool = False


class _Failure(Exception):
    pass


class Pump:
    """Write shards to files; one instance per ``apply``. Use :meth:`run`.

    ``progress`` is called from the writer thread with the number of bytes just written.
    """

    def __init__(self, *, buffer_size: int = BUFFER_SIZE, buffers: int = BUFFERS,
                 progress: Callable[[int], None] | None = None, direct: bool = True):
        if buffer_size % _ALIGN:
            raise ValueError("buffer_size must be a multiple of 4096")
        self.buffer_size, self.progress, self.direct = buffer_size, progress, direct
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(buffers):
            self._free.put(mmap.mmap(-1, buffer_size))
        self._to_write: queue.Queue[_Block | None] = queue.Queue()
        self._to_hash: queue.Queue[_Block | None] = queue.Queue()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._hashes: dict[int, "hashlib._Hash"] = {}
        self._first_of: dict[tuple, int] = {}
        self._same_as: dict[int, int] = {}
        self._paths: list[Path] = []
        self._fds: dict[Path, int] = {}

    # -- public ---------------------------------------------------------------------------
    def run(self, jobs: Iterable[tuple[Shard, Path]]) -> dict[str, str]:
        """Write every ``(shard, path)``; returns output tensor name -> sha256 hex digest.

        Each shard is written as ``path`` + ``.partial`` and renamed to ``path`` once complete
        and fsynced, so a file under its final name is always whole (``--resume`` relies on it).

        Raises:
            WriteError: a read or write failed (disk full, file too large, source changed).
        """
        writer = threading.Thread(target=self._guard, args=(self._write_loop,), name="ts-writer", daemon=True)
        hasher = threading.Thread(target=self._guard, args=(self._hash_loop,), name="ts-hasher", daemon=True)
        writer.start()
        hasher.start()
        names: list[str] = []
        try:
            for shard, path in jobs:
                self._read_shard(shard, path, names)
        except _Failure:
            pass
        except BaseException:
            self._stop.set()  # Ctrl-C, SIGTERM or a read error: queued blocks are not written
            raise
        finally:
            self._to_write.put(None)
            writer.join()
            hasher.join()
            for fd in self._fds.values():
                os.close(fd)
        if self._error is not None:
            raise _as_write_error(self._error)
        return {name: self._hashes[self._same_as.get(i, i)].hexdigest() for i, name in enumerate(names)}

    # -- reading (calling thread) ----------------------------------------------------------
    def _read_shard(self, shard: Shard, path: Path, names: list[str]) -> None:
        file_id = len(self._paths)
        self._paths.append(path)
        self._block = _Block(self._take_buffer(), file_id, 0)
        self._put(memoryview(shard.header), None)
        for t in shard.tensors:
            tid = len(names)
            names.append(t.name)
            # A tensor made of the same source bytes the same way as an earlier one (DUS repeats
            # layers m..n-m-1) has the same hash: write its bytes, hash them once.
            recipe = (t.source, t.transform, t.dtype, t.permute_heads)
            first = self._first_of.setdefault(recipe, tid)
            if first != tid:
                self._same_as[tid] = first
            else:
                self._hashes[tid] = hashlib.sha256()
            self._put_tensor(t, None if first != tid else tid)
        self._block.last = True
        self._flush()

    def _put_tensor(self, t: OutputTensor, tid: int | None) -> None:
        fd = self._source_fd(t.source.path)
        if t.transform != "none":
            for chunk in expected_chunks(t, fd):
                self._put(chunk, tid)
        else:
            # Verbatim bytes are read straight into the output buffer: no copy in between.
            done = 0
            while done < t.source.length:
                room = self.buffer_size - self._block.length
                n = min(room, t.source.length - done)
                view = memoryview(self._block.buf)[self._block.length:self._block.length + n]
                pread_exact(fd, view, t.source.offset + done)
                self._advance(n, tid)
                done += n

    def _put(self, data: memoryview, tid: int | None) -> None:
        data = data.cast("B")
        while len(data):
            n = min(self.buffer_size - self._block.length, len(data))
            self._block.buf[self._block.length:self._block.length + n] = data[:n]
            self._advance(n, tid)
            data = data[n:]

    def _advance(self, n: int, tid: int | None) -> None:
        b = self._block
        if tid is not None:
            if b.segments and b.segments[-1][0] == tid and b.segments[-1][2] == b.length:
                b.segments[-1] = (tid, b.segments[-1][1], b.length + n)
            else:
                b.segments.append((tid, b.length, b.length + n))
        b.length += n
        if b.length == self.buffer_size:
            self._flush()
            self._block = _Block(self._take_buffer(), b.file, b.offset + b.length)

    def _flush(self) -> None:
        self._to_write.put(self._block)

    def _take_buffer(self) -> mmap.mmap:
        while True:
            if self._error is not None or self._stop.is_set():
                raise _Failure
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def _source_fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    # -- writing and hashing (threads) -----------------------------------------------------
    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            if self._error is None:
                self._error = e
            self._stop.set()
            self._to_hash.put(None)

    def _write_loop(self) -> None:
        files: dict[int, tuple[int, int | None]] = {}
        while (block := self._to_write.get()) is not None:
            if self._stop.is_set():
                break
            if block.file not in files:
                files[block.file] = _open_output(_partial(self._paths[block.file]), self.direct)
            fd, dfd = files[block.file]
            with memoryview(block.buf) as whole:
                view = whole[:block.length]
                try:
                    # Full buffers are aligned in memory, offset and length: O_DIRECT takes them.
                    if dfd is not None and not block.last:
                        try:
                            _pwrite_all(dfd, view, block.offset)
                        except OSError as e:
                            if e.errno != errno.EINVAL:
                                raise
                            os.close(dfd)  # the filesystem refuses direct I/O after all
                            files[block.file] = (fd, dfd := None)
                    if dfd is None or block.last:
                        _pwrite_all(fd, view, block.offset)
                except OSError as e:
                    raise OSError(e.errno, e.strerror, str(_partial(self._paths[block.file]))) from None
                finally:
                    view.release()
            if block.last:
                os.fsync(fd)
                os.close(fd)
                if dfd is not None:
                    os.close(dfd)
                del files[block.file]
                os.replace(_partial(self._paths[block.file]), self._paths[block.file])
            if self.progress:
                self.progress(block.length)
            self._to_hash.put(block)
        for fd, dfd in files.values():
            os.close(fd)
            if dfd is not None:
                os.close(dfd)
        self._to_hash.put(None)

    def _hash_loop(self) -> None:
        while (block := self._to_hash.get()) is not None:
            with memoryview(block.buf) as view:
                for tid, start, end in block.segments:
                    self._hashes[tid].update(view[start:end])
            self._free.put(block.buf)


PARTIAL_SUFFIX = ".partial"


def _partial(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def _open_output(path: Path, direct: bool) -> tuple[int, int | None]:
    """A normal descriptor, and an O_DIRECT one when the filesystem accepts it (not tmpfs)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    dfd = None
    if direct and hasattr(os, "O_DIRECT"):
        try:
            dfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError:
            dfd = None
    return fd, dfd


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _as_write_error(e: BaseException) -> BaseException:
    if isinstance(e, OSError):
        name = str(e.filename or "output").removesuffix(PARTIAL_SUFFIX)
        return WriteError(f"{name}: write failed: {e.strerror or e}; free disk space or raise the file "
                          f"size limit, then run the same command with --resume to keep the finished shards")
    return e

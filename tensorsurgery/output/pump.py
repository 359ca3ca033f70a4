"""The byte pump: streams a plan's shards through a few preallocated page-aligned buffers.

The calling thread lays out each shard in the buffers (:mod:`tensorsurgery.io.packing`): verbatim
source ranges are read with ``preadv`` straight into a buffer; an elementwise recipe (a cast, a
scale: :mod:`tensorsurgery.ops.recipe`) is cut into chunks of whole elements that a pool of threads
reads and makes straight into their place in the buffer (no scratch copy in between); other
operations (the rotary permutation, zeros) go through a bounded scratch buffer. A writer thread
writes each full buffer (:mod:`tensorsurgery.io.shardfile`) once the jobs filling it are done,
while a pool of hashing threads takes each output tensor's sha256 from the same buffer
(:mod:`tensorsurgery.io.hashing`); a buffer is reused once both are done. Reads, computations,
writes and hashes overlap, and the computations and hashes spread over ``threads`` threads each.
Memory is ``buffers * buffer_size`` plus a scratch chunk per cast thread, whatever the model size.
"""
from __future__ import annotations

import mmap
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, Hashable, Iterable, Iterator, cast

import numpy as np

from tensorsurgery.errors import WriteError
from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.io.byte_source import FileReader, Reader, Readers
from tensorsurgery.io.hashing import HashPool, first_of_each
from tensorsurgery.io.packing import ALIGN, Block, Packer
from tensorsurgery.io.shardfile import PARTIAL_SUFFIX, ShardFile
from tensorsurgery.ops import RowwiseOperation
from tensorsurgery.ops.interpreter import CAST_CHUNK, compute_elements, prepared, tensor_chunks
from tensorsurgery.ops.recipe import (
    Recipe,
    element_count,
    identity,
    is_elementwise,
    is_rowwise,
    is_two_pass,
    is_verbatim,
    row_count,
)
from tensorsurgery.planning.planner import Shard
from tensorsurgery.planning.table import OutputTensor

BUFFER_SIZE = 4 << 20
BUFFERS = 4


class _Stopped(Exception):
    """The writer or a hasher failed (or the run was interrupted): stop reading."""


class Pump:
    """Write shards to files; one instance per ``apply``. Use :meth:`run`.

    ``progress`` is called from the writer threads with the number of bytes just written;
    ``threads`` is the number of hashing threads, and of cast threads. With several output
    shards and enough threads, shards are written by ``lanes`` pipelines at once (default: one
    per two threads), each with its share of the same buffer memory: a tensor's sha256 is
    sequential, so tensors much larger than the buffers are hashed one per lane at a time.
    """

    def __init__(self, *, buffer_size: int = BUFFER_SIZE, buffers: int = BUFFERS,
                 progress: Callable[[int], None] | None = None, direct: bool = True, threads: int = 1,
                 lanes: int | None = None):
        self.buffer_size, self.buffers = buffer_size, buffers
        self.progress, self.direct, self.threads = progress, direct, max(1, threads)
        self.lanes = lanes

    def run(self, jobs: Iterable[tuple[Shard, Path]]) -> dict[str, str]:
        """Write every ``(shard, path)``; returns output tensor name -> sha256 hex digest.

        Raises:
            WriteError: a write failed (disk full, file too large).
            ReadError: a source ended early (it changed since planning).
        """
        jobs = list(jobs)
        computed = False  # some tensor is made on the cast threads

        def identities() -> Iterator[Hashable]:  # one pass: a plan's tensors are made as a loop asks
            nonlocal computed
            for shard, _ in jobs:
                for t in shard.tensors:
                    computed = computed or (
                        (is_elementwise(t) or is_rowwise(t) or is_two_pass(t)) and not is_verbatim(t))
                    yield identity(t)

        same = first_of_each(identities())
        first_tid, n = [], 0
        for shard, _ in jobs:
            first_tid.append(n)
            n += len(shard.tensors)
        lanes = max(1, min(self.lanes or self.threads // 2, len(jobs)))
        size = self.buffer_size if lanes == 1 else max(ALIGN, self.buffer_size // lanes // ALIGN * ALIGN)
        stop = threading.Event()
        casts = ThreadPoolExecutor(self.threads, thread_name_prefix="ts-cast") if computed else None
        todo = [(i, *job) for i, job in enumerate(jobs)][::-1]  # popped from the end by the lanes
        runs = [_Lane(self, size, max(1, self.threads // lanes), stop, casts, same, first_tid, todo)
                for _ in range(lanes)]
        # Even one lane runs off the main thread, which only waits: Ctrl-C and SIGTERM raise on
        # the main thread at any bytecode, and one raised inside a queue's or an executor's
        # ``with lock:`` leaves that lock held, so the writer blocked on it forever (seen as a
        # hung apply after SIGINT). A lane stops at the next buffer once ``stop`` is set.
        workers = [threading.Thread(target=lane.run_catching, name=f"ts-lane-{i}", daemon=True)
                   for i, lane in enumerate(runs)]
        try:
            for w in workers:
                w.start()
            for w in workers:
                while w.is_alive():
                    w.join(0.1)  # interruptible
        except BaseException:
            stop.set()
            for w in workers:
                w.join()  # the lanes stop within a buffer; nothing is written after this returns
            raise
        finally:
            if casts is not None:
                casts.shutdown(wait=True, cancel_futures=True)
        for lane in runs:
            if lane.raised is not None:
                raise lane.raised
        for lane in runs:
            if lane.job_error is not None:
                raise lane.job_error  # a cast job's read failed: as the same read on this thread would
        for lane in runs:
            if lane.error is not None:
                raise _as_write_error(lane.error)
        digests = {tid: d for lane in runs for tid, d in lane.digests.items()}
        names = (name for shard, _ in jobs for name in shard.tensors.names)
        return {name: digests[same.get(i, i)] for i, name in enumerate(names)}


class _Lane:
    """One pipeline: a reading thread (the caller of :meth:`run`), a writer thread, a hash pool
    and its own buffers; it takes shards from the shared ``todo`` list until none is left."""

    def __init__(self, pump: Pump, size: int, threads: int, stop: threading.Event,
                 casts: ThreadPoolExecutor | None, same: dict[int, int], first_tid: list[int],
                 todo: list[tuple[int, Shard, Path]]):
        self.pump, self.size, self.threads, self._stop, self._casts = pump, size, threads, stop, casts
        self.same, self.first_tid, self.todo = same, first_tid, todo
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(pump.buffers):
            self._free.put(mmap.mmap(-1, size))
        self._to_write: queue.Queue[Block | None] = queue.Queue()
        self.error: BaseException | None = None
        self.job_error: BaseException | None = None
        self.raised: BaseException | None = None
        self.digests: dict[int, str] = {}
        self._paths: list[Path] = []
        # A transformed tensor this lane wrote: tensor id -> (file, offset in it, length), so that
        # a repeat of it (DUS) is read back from the output (page cache) instead of cast again.
        self._placed: dict[int, tuple[int, int, int]] = {}
        self._written: dict[int, int] = {}  # file -> bytes written from its start, in order
        self._readback: dict[int, FileReader] = {}  # file -> its reader, when written through the page cache
        self._progress = threading.Condition()

    def run_catching(self) -> None:
        try:
            self.run()
        except BaseException as e:  # noqa: BLE001 - raised by Pump.run on its thread
            self.raised = e
            self._stop.set()

    def run(self) -> None:
        hashes = HashPool(self.threads, lambda block: self._free.put(block.buf))
        writer = threading.Thread(target=self._write_loop, args=(hashes,), name="ts-writer", daemon=True)
        writer.start()
        packer = Packer(self._take, self._to_write.put, self.size)
        sources = Readers()
        try:
            while not self._stop.is_set():
                try:
                    index, shard, path = self.todo.pop()  # list.pop is atomic under the GIL
                except IndexError:
                    break
                tid = self.first_tid[index]
                self._paths.append(path)
                packer.start_file(len(self._paths) - 1)
                packer.put(memoryview(shard.header), None)
                for t in shard.tensors:
                    repeat = tid in self.same  # its bytes are an earlier tensor's: hashed as that one
                    if not repeat:
                        # Its hash object is made as its bytes start (not for the whole shard at once:
                        # ~300 B a tensor, and a shard of tiny tensors holds hundreds of thousands).
                        hashes.start(tid, t.nbytes)
                    computed = not is_verbatim(t)
                    if not (computed and repeat and self._read_back(packer, tid, t.nbytes)):
                        if computed:
                            self._placed[tid] = (*packer.position(), t.nbytes)
                        self._pack_tensor(packer, sources, t, None if repeat else tid)
                    tid += 1
                packer.finish_file()
        except _Stopped:
            pass
        except BaseException:
            self._stop.set()  # Ctrl-C, SIGTERM or a read error: queued blocks are not written
            raise
        finally:
            self._to_write.put(None)
            writer.join()
            packer.wait_current()  # a job may still fill the block that was never handed on
            sources.close()
            for reader in self._readback.values():
                reader.close()
            self.digests = self._close(hashes)

    def _read_back(self, packer: Packer, tid: int, nbytes: int) -> bool:
        """Append the bytes of the repeated tensor ``tid`` by reading its first copy back from
        this lane's output, when that copy is in a file written through the page cache (tmpfs,
        or where O_DIRECT is refused: a read costs far less than a cast there) and already
        handed on; False when it cannot (then the tensor is made again)."""
        where = self._placed.get(self.same[tid])
        if where is None:
            return False
        file, offset, length = where
        current, _ = packer.position()
        if length != nbytes or (file == current and offset + length > packer.handed_on()):
            return False  # still in a buffer being filled: waiting for its write would never end
        with self._progress:
            while self._written.get(file, 0) < offset + length:
                if self._stop.is_set() or self.error is not None:
                    raise _Stopped
                self._progress.wait(0.1)
            reader = self._readback.get(file)
        if reader is None:
            return False
        packer.read_into(reader, offset, length, None)
        return True

    def _pack_tensor(self, packer: Packer, sources: Readers, t: OutputTensor, tid: int | None) -> None:
        if is_two_pass(t) and self._casts is not None:  # its statistic read here, its elements as any others'
            readers = [sources.open(i.range.file) for i in t.inputs]
            self._pack_elements(packer, readers, prepared(t, readers), tid)
        elif is_verbatim(t):
            source = t.inputs[0].range
            packer.read_into(sources.open(source.file), source.offset, source.length, tid)
        elif is_elementwise(t) and self._casts is not None:
            self._pack_elements(packer, [sources.open(i.range.file) for i in t.inputs], t, tid)
        elif is_rowwise(t) and self._casts is not None and t.nbytes:
            self._pack_rows(packer, [sources.open(i.range.file) for i in t.inputs], t, tid)
        else:
            for chunk in tensor_chunks(t, sources.open):
                packer.put(chunk, tid)

    def _pack_elements(self, packer: Packer, readers: list[Reader], t: Recipe, tid: int | None) -> None:
        """Lay out an elementwise tensor (a cast, a scale...) as jobs of whole elements, each making
        up to ``CAST_CHUNK`` source bytes' worth straight into its place in a buffer on a cast thread."""
        osz = element_size(t.dtype)
        chunk = max(CAST_CHUNK // sum(element_size(i.dtype) for i in t.inputs), 1)  # all inputs: CAST_CHUNK
        start, left = 0, element_count(t)
        while left:
            n = min(packer.space() // osz, left, chunk)
            if n == 0:  # an element straddles two buffers: make it here, copy it across
                packer.put(memoryview(_element_now(readers, t, start)), tid)
                start, left = start + 1, left - 1
                continue
            packer.fill(n * osz, tid, partial(self._start_elements, readers, t, start, n))
            start, left = start + n, left - n

    def _pack_rows(self, packer: Packer, readers: list[Reader], t: OutputTensor, tid: int | None) -> None:
        """Lay out a rowwise tensor (a dequantization) as jobs of whole rows, each making up to
        ``CAST_CHUNK`` source bytes' worth straight into its place in a buffer on a cast thread."""
        rows = row_count(t.shape)
        row_bytes = t.nbytes // rows
        chunk = max(CAST_CHUNK // max(t.inputs[0].range.length // rows, 1), getattr(t.op, "job_rows", 1))
        start, left = 0, rows
        while left:
            n = min(packer.space() // row_bytes, left, chunk)
            if n == 0:  # a row straddles two buffers: make it here, copy it across
                packer.put(_rows_into(readers, t, start, 1, np.empty(row_bytes, np.uint8)).data, tid)
                start, left = start + 1, left - 1
                continue
            packer.fill(n * row_bytes, tid, partial(self._start_rows, readers, t, start, n))
            start, left = start + n, left - n

    def _start_rows(self, readers: list[Reader], t: OutputTensor, start: int, n: int, buf: mmap.mmap,
                    at: int) -> Future[object]:
        assert self._casts is not None
        out = np.frombuffer(buf, np.uint8, count=n * (t.nbytes // row_count(t.shape)), offset=at)
        return self._casts.submit(_rows_into, readers, t, start, n, out)

    def _start_elements(self, readers: list[Reader], t: Recipe, start: int, n: int, buf: mmap.mmap,
                        at: int) -> Future[object]:
        assert self._casts is not None
        return self._casts.submit(_elements_into, readers, t, start, n, buf, at)

    def _take(self) -> mmap.mmap:
        while True:
            if self.error is not None or self._stop.is_set():
                raise _Stopped
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def _close(self, hashes: HashPool) -> dict[int, str]:
        try:
            return hashes.close()
        except BaseException as e:  # noqa: BLE001 - reported by run()
            self.error = self.error or e
            self._stop.set()
            return {}

    def _write_loop(self, hashes: HashPool) -> None:
        files: dict[int, ShardFile] = {}
        try:
            while (block := self._to_write.get()) is not None:
                if self._stop.is_set() or self.error is not None:
                    block.wait(quiet=True)  # drain (the reader may be waiting to queue more), jobs done
                    continue
                try:
                    block.wait()
                except BaseException as e:
                    self.job_error = e
                    raise
                out = files.get(block.file)
                if out is None:
                    out = files[block.file] = ShardFile(self._paths[block.file], direct=self.pump.direct)
                    if not out.direct:
                        self._readback[block.file] = FileReader(os.open(out.partial, os.O_RDONLY | os.O_CLOEXEC))
                hashes.submit(block)  # hashed while it is written
                try:
                    with memoryview(block.buf) as whole:
                        # Full buffers are aligned in memory, offset and length: O_DIRECT takes them.
                        out.write(whole[:block.length], block.offset, aligned=not block.last)
                finally:
                    hashes.unhold(block)
                with self._progress:  # the reader may be waiting for these bytes (_read_back)
                    self._written[block.file] = block.offset + block.length
                    self._progress.notify_all()
                if block.last:
                    files.pop(block.file).finish()
                if self.pump.progress:
                    self.pump.progress(block.length)
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            self.error = self.error or e
            self._stop.set()
            while (block := self._to_write.get()) is not None:
                block.wait(quiet=True)
        finally:
            for out in files.values():
                out.close()


def _element_now(readers: list[Reader], t: Recipe, index: int) -> bytes:
    """Element ``index`` of ``t``, made on this thread (one that straddles two buffers)."""
    return compute_elements(t, readers, index, 1, np.empty(element_size(t.dtype), np.uint8)).tobytes()


def _elements_into(readers: list[Reader], t: Recipe, start: int, n: int, buf: mmap.mmap, at: int) -> None:
    """On a cast thread: make elements ``start..start+n-1`` of ``t`` into ``buf`` from ``at``."""
    out = np.frombuffer(buf, np.uint8, count=n * element_size(t.dtype), offset=at)
    result = compute_elements(t, readers, start, n, out)
    if result.ctypes.data != out.ctypes.data:  # not made in place after all
        out[:] = result


def _rows_into(readers: list[Reader], t: OutputTensor, start: int, n: int, out: np.ndarray) -> np.ndarray:
    """Rows ``start..start+n-1`` of the rowwise ``t`` made into ``out`` (on a cast thread, or
    here for a row that straddles two buffers)."""
    op = cast(RowwiseOperation, t.op)  # is_rowwise(t) said so
    return op.rows_into(t.inputs, readers, start, n, out)


def _as_write_error(e: BaseException) -> BaseException:
    if isinstance(e, OSError):
        name = str(e.filename or "output").removesuffix(PARTIAL_SUFFIX)
        return WriteError(f"{name}: write failed: {e.strerror or e}; free disk space or raise the file size limit")
    return e

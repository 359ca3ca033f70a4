"""The byte pump: streams a plan's shards through a few preallocated page-aligned buffers.

The calling thread reads source ranges (``preadv`` straight into the buffers, or through a
bounded scratch buffer when a transform applies) and packs them (:mod:`tensorsurgery.packing`);
a writer thread writes full buffers (:mod:`tensorsurgery.shardfile`), so reads and writes
overlap; a pool of hashing threads takes each output tensor's sha256 from the same buffers
(:mod:`tensorsurgery.hashing`). Memory is ``buffers * buffer_size`` plus one scratch chunk,
whatever the model size.
"""
from __future__ import annotations

import mmap
import queue
import threading
from pathlib import Path
from typing import Callable, Iterable

from .errors import WriteError
from .expected import tensor_chunks
from .fsio import OpenFiles
from .hashing import HashPool, first_of_each
from .packing import Block, Packer
from .plan import OutputTensor, Shard
from .shardfile import PARTIAL_SUFFIX, ShardFile

BUFFER_SIZE = 4 << 20
BUFFERS = 4


class _Stopped(Exception):
    """The writer or a hasher failed (or the run was interrupted): stop reading."""


class Pump:
    """Write shards to files; one instance per ``apply``. Use :meth:`run`.

    ``progress`` is called from the writer thread with the number of bytes just written;
    ``threads`` is the number of hashing threads.
    """

    def __init__(self, *, buffer_size: int = BUFFER_SIZE, buffers: int = BUFFERS,
                 progress: Callable[[int], None] | None = None, direct: bool = True, threads: int = 1):
        self.buffer_size, self.progress, self.direct, self.threads = buffer_size, progress, direct, threads
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(buffers):
            self._free.put(mmap.mmap(-1, buffer_size))
        self._to_write: queue.Queue[Block | None] = queue.Queue()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._paths: list[Path] = []

    def run(self, jobs: Iterable[tuple[Shard, Path]]) -> dict[str, str]:
        """Write every ``(shard, path)``; returns output tensor name -> sha256 hex digest.

        Raises:
            WriteError: a write failed (disk full, file too large).
            ReadError: a source ended early (it changed since planning).
        """
        jobs = list(jobs)
        tensors = [t for shard, _ in jobs for t in shard.tensors]
        same = first_of_each((t.source, t.steps, t.dtype) for t in tensors)
        hashes = HashPool(self.threads, lambda block: self._free.put(block.buf))
        for tid in range(len(tensors)):
            if tid not in same:
                hashes.start(tid)
        writer = threading.Thread(target=self._write_loop, args=(hashes,), name="ts-writer", daemon=True)
        writer.start()
        packer = Packer(self._take, self._to_write.put, self.buffer_size)
        try:
            with OpenFiles() as sources:
                tid = 0
                for shard, path in jobs:
                    self._paths.append(path)
                    packer.start_file(len(self._paths) - 1)
                    packer.put(memoryview(shard.header), None)
                    for t in shard.tensors:
                        self._pack_tensor(packer, sources, t, None if tid in same else tid)
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
            digests = self._close(hashes)
        if self._error is not None:
            raise _as_write_error(self._error)
        return {t.name: digests[same.get(i, i)] for i, t in enumerate(tensors)}

    def _pack_tensor(self, packer: Packer, sources: OpenFiles, t: OutputTensor, tid: int | None) -> None:
        fd = sources.open(t.source.path) if t.source is not None else None
        if t.steps or fd is None or t.source is None:
            for chunk in tensor_chunks(t, fd):
                packer.put(chunk, tid)
        else:
            packer.read_into(fd, t.source.offset, t.source.length, tid)

    def _take(self) -> mmap.mmap:
        while True:
            if self._error is not None or self._stop.is_set():
                raise _Stopped
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def _close(self, hashes: HashPool) -> dict[int, str]:
        try:
            return hashes.close()
        except BaseException as e:  # noqa: BLE001 - reported by run()
            self._error = self._error or e
            return {}

    def _write_loop(self, hashes: HashPool) -> None:
        files: dict[int, ShardFile] = {}
        try:
            while (block := self._to_write.get()) is not None:
                if self._stop.is_set() or self._error is not None:
                    continue  # drain: the reader may be waiting to queue more
                out = files.get(block.file)
                if out is None:
                    out = files[block.file] = ShardFile(self._paths[block.file], direct=self.direct)
                with memoryview(block.buf) as whole:
                    # Full buffers are aligned in memory, offset and length: O_DIRECT takes them.
                    out.write(whole[:block.length], block.offset, aligned=not block.last)
                if block.last:
                    files.pop(block.file).finish()
                if self.progress:
                    self.progress(block.length)
                hashes.submit(block)
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            self._error = self._error or e
            self._stop.set()
        finally:
            for out in files.values():
                out.close()


def _as_write_error(e: BaseException) -> BaseException:
    if isinstance(e, OSError):
        name = str(e.filename or "output").removesuffix(PARTIAL_SUFFIX)
        return WriteError(f"{name}: write failed: {e.strerror or e}; free disk space or raise the file size limit")
    return e

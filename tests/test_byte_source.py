"""The byte-source seam (:mod:`tensorsurgery.io.byte_source`): every source byte the writer and
the comparisons read goes through a source's reader. Shown with a source that is no file at all
(bytes in memory, as a remote source would be one new class): the pump writes, and the
interpreter makes, the same bytes from it as from a local file holding them, along each of the
writer's paths (verbatim, an elementwise cast, a two-pass slerp, a permutation in chunks, zeros);
each source is opened once per user; a source that ends early is a ReadError naming it.
"""
from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
import pytest

from tensorsurgery.errors import ReadError
from tensorsurgery.formats.safetensors_output import SAFETENSORS
from tensorsurgery.io.byte_source import LocalFile, Readers
from tensorsurgery.ops import COPY, ZEROS, PermuteRotary, Slerp
from tensorsurgery.ops.base import ByteRange, Input
from tensorsurgery.ops.interpreter import tensor_chunks
from tensorsurgery.output.pump import Pump
from tensorsurgery.planning.planner import OutputTensor, Shard, output_tensor

OPENED: list[str] = []


class _MemoryReader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read_into(self, view: memoryview, offset: int) -> None:
        got = self.data[offset:offset + len(view)]
        if len(got) < len(view):
            raise ReadError(f"memory:{len(self.data)}: ends before byte {offset + len(got)}")
        view[:] = got

    def size(self) -> int:
        return len(self.data)

    def close(self) -> None:
        pass


class MemorySource(NamedTuple):
    """Bytes in memory: a byte source that is not a file (what a remote one would look like)."""

    label: str
    data: bytes

    @property
    def name(self) -> str:
        return self.label

    @property
    def location(self) -> str:
        return f"memory:{self.label}"

    def open(self) -> _MemoryReader:
        OPENED.append(self.label)
        return _MemoryReader(self.data)


def _values(n: int) -> bytes:
    return np.random.default_rng(7).standard_normal(n).astype(np.float32).astype(np.float16).tobytes()


def _tensors(source: object) -> list[OutputTensor]:
    """One tensor for each way the writer makes bytes, all reading ``source``."""
    def one(key: str, offset: int, count: int, shape: tuple[int, ...] | None = None) -> Input:
        return Input("s", key, "F16", shape or (count,), ByteRange(source, offset, count * 2))  # type: ignore[arg-type]

    a, b = one("a", 0, 4096), one("b", 8192, 4096)
    rows = one("q", 0, 32 * 64, (32, 64))
    return [output_tensor("copy", "F16", (4096,), 0, 8192, (a,), COPY),
            output_tensor("cast", "F32", (4096,), 0, 16384, (a,), COPY),
            output_tensor("slerp", "F16", (4096,), 0, 8192, (a, b), Slerp(0.3, "F16")),
            output_tensor("permute", "F16", (32, 64), 0, 4096, (rows,), PermuteRotary(4)),
            output_tensor("zeros", "F16", (7,), 0, 14, (), ZEROS)]


def _shard(tensors: list[OutputTensor]) -> Shard:
    placed, offset = [], 0
    for t in tensors:
        placed.append(t._replace(offset=offset))
        offset += t.nbytes
    header = SAFETENSORS.encode_header((t.name, t.dtype, t.shape, t.offset, t.offset + t.nbytes) for t in placed)
    return Shard("model.safetensors", header, tuple(placed))


def test_a_source_that_is_no_file_makes_the_bytes_a_file_does(tmp_path):
    data = _values(8192)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    by_file, in_memory = _shard(_tensors(LocalFile(path))), _shard(_tensors(MemorySource("m", data)))
    OPENED.clear()
    Pump(buffer_size=4096, direct=False, threads=2).run([(by_file, tmp_path / "a.safetensors"),
                                                          (in_memory, tmp_path / "b.safetensors")])
    assert OPENED == ["m"]  # once for the whole shard, shared by the cast threads
    written = (tmp_path / "b.safetensors").read_bytes()
    assert written == (tmp_path / "a.safetensors").read_bytes()
    with Readers() as readers:
        made = b"".join(bytes(c) for t in in_memory.tensors for c in tensor_chunks(t, readers.open))
    assert in_memory.header + made == written
    cast = written[len(in_memory.header) + 8192:][:16384]
    assert cast == np.frombuffer(data[:8192], np.float16).astype(np.float32).tobytes()


def test_readers_open_each_source_once_and_close_them(tmp_path):
    path = tmp_path / "src.bin"
    path.write_bytes(b"abcdefgh")
    source = LocalFile(path)
    with Readers() as readers:
        reader = readers.open(source)
        assert readers.open(LocalFile(path)) is reader  # equal sources are the same source
        assert reader.size() == 8
        view = memoryview(bytearray(3))
        reader.read_into(view, 2)
        assert bytes(view) == b"cde"
    with pytest.raises(OSError):
        reader.read_into(view, 0)  # closed with the pool


def test_a_source_that_ends_early_is_one_read_error(tmp_path):
    path = tmp_path / "src.bin"
    path.write_bytes(bytes(10))
    reader = LocalFile(path).open()
    try:
        with pytest.raises(ReadError, match=r"src\.bin: ends before byte 10"):
            reader.read_into(memoryview(bytearray(8)), 4)
    finally:
        reader.close()
    t = output_tensor("t", "F16", (4096,), 0, 8192, (Input("s", "k", "F16", (4096,),
                                                           ByteRange(MemorySource("m", bytes(100)), 0, 8192)),), COPY)
    with pytest.raises(ReadError, match="memory:100: ends before byte 100"):
        Pump(buffer_size=4096, direct=False).run([(_shard([t]), tmp_path / "x.safetensors")])


class _ThreadRecordingSource(MemorySource):
    """A memory source that notes the thread of every read."""

    threads: list[threading.Thread] = []

    def open(self) -> _MemoryReader:
        reader = super().open()
        plain = reader.read_into

        def read_into(view: memoryview, offset: int) -> None:
            self.threads.append(threading.current_thread())
            plain(view, offset)

        reader.read_into = read_into  # type: ignore[method-assign]
        return reader


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_the_pump_never_reads_or_waits_on_the_main_thread(tmp_path, threads):
    """Ctrl-C and SIGTERM raise on the main thread at any bytecode; one raised inside a queue's
    ``with lock:`` left the lock held and the writer blocked on it for ever (a hung apply after
    SIGINT, tests/test_faults.py, about 1 run in 100). So the main thread only waits for the lanes,
    with one lane too: no read of a source happens on it."""
    _ThreadRecordingSource.threads.clear()
    shard = _shard(_tensors(_ThreadRecordingSource("m", _values(8192))))
    Pump(buffer_size=4096, direct=False, threads=threads).run([(shard, tmp_path / "a.safetensors")])
    assert _ThreadRecordingSource.threads
    assert threading.main_thread() not in _ThreadRecordingSource.threads

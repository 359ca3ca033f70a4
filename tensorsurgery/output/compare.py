"""Compare a file of an output folder with what it must hold (:mod:`tensorsurgery.output.expected`),
streaming in bounded chunks and hashing as it reads. Used by both verify modes and by
``--resume``. Every check yields :class:`Difference` values, one line each; nothing raises for a
file that is merely wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Container, Iterator, Sequence

import numpy as np

from tensorsurgery.errors import SourceError
from tensorsurgery.formats.output_format import OutputFormat
from tensorsurgery.formats.safetensors_output import SAFETENSORS
from tensorsurgery.io.byte_source import LocalFile, Readers
from tensorsurgery.io.fsio import (
    JSON_DEPTH,
    STREAM_CHUNK,
    OpenFiles,
    describe_entry,
    describe_mode,
    json_depth,
    pread_exact,
    sha256_fd,
)
from tensorsurgery.ops.interpreter import CAST_CHUNK, tensor_chunks
from tensorsurgery.planning.planner import CopyFile, Shard
from tensorsurgery.planning.table import OutputTensor

Progress = Callable[[int], None] | None


@dataclass(frozen=True, slots=True)
class Difference:
    """One way the output is not what it should be: ``where`` is a file or tensor name."""

    where: str
    what: str


def open_output_file(path: Path, diffs: list[Difference]) -> int | None:
    """A descriptor of the output file ``path`` if it is a regular file (not a link, a folder, a
    FIFO or a device, which an output never holds); else None with the difference noted.

    tensorsurgery never writes a link into an output, so any link is a difference, wherever it
    leads: a loader would read whatever it points to, and a link out of the folder could make a
    pushed or archived output carry another file. Opened with ``O_NONBLOCK`` (a FIFO swapped in
    after the check cannot hang the open) and checked again with ``fstat``.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        diffs.append(Difference(path.name, "is missing"))
        return None
    if not stat.S_ISREG(mode):
        diffs.append(Difference(path.name, f"is {describe_entry(path, mode)}, expected a regular file"))
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        diffs.append(Difference(path.name, f"cannot be read ({e.strerror or e})"))
        return None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        diffs.append(Difference(path.name, f"is {describe_mode(mode)}, expected a regular file"))
        return None
    return fd


def compare_shard(shard: Shard, path: Path, *, threads: int = 2, progress: Progress = None,
                  stop_early: bool = False, unhashed: Container[str] = (), fmt: OutputFormat = SAFETENSORS
                  ) -> tuple[dict[str, str], list[Difference]]:
    """Compare the shard file ``path`` (of the container ``fmt``) with ``shard``: header bytes,
    size, every tensor's bytes against its source. Returns the sha256 of each tensor whose bytes
    are right, and the differences. ``stop_early`` (for ``--resume``) stops at the first one.
    Tensors named in ``unhashed`` are compared but not hashed (the caller knows an identical
    tensor's hash): when their bytes are right they map to ``""``."""
    diffs: list[Difference] = []
    fd = open_output_file(path, diffs)
    if fd is None:
        return {}, diffs
    try:
        size = os.fstat(fd).st_size
        header = fmt.read_raw_header(fd, size)
        if header != shard.header:
            diffs.append(Difference(shard.filename, fmt.header_difference(header, shard.header)))
            if stop_early or size != shard.nbytes:
                return {}, diffs
        elif size != shard.nbytes:
            return {}, [Difference(shard.filename, f"is {size} bytes, expected {shard.nbytes} (truncated or padded)")]
    finally:
        os.close(fd)
    hashes: dict[str, str] = {}
    def compare(t: OutputTensor) -> tuple[str, int | None]:
        return _compare_tensor(t, path, len(shard.header), progress, hashed=t.name not in unhashed)

    for t, (digest, first) in _map(threads, compare, shard.tensors, stop_early):
        if first is None:
            hashes[t.name] = digest
        else:
            where = f"{t.source_key!r} of {t.source.file.name}" if t.source else "zeros"
            diffs.append(Difference(t.name, f"bytes differ from {where} (transform: {t.transform}) from byte "
                                            f"{first} on"))
            if stop_early:
                break
    return hashes, diffs


def _map(threads: int, fn: Callable[[OutputTensor], tuple[str, int | None]], tensors: Sequence[OutputTensor],
         stop_early: bool) -> Iterator[tuple[OutputTensor, tuple[str, int | None]]]:
    """``fn`` over ``tensors`` in order; on ``threads`` threads (comparing and hashing release the
    GIL) unless stopping at the first difference, where sequential order wastes nothing."""
    if threads <= 1 or stop_early or len(tensors) < 2:
        yield from ((t, fn(t)) for t in tensors)
        return
    with ThreadPoolExecutor(threads) as pool:
        # Not pool.map: it submits every tensor at once, a Future of ~1.6 KB each (160 MB for 100k).
        window: deque[tuple[OutputTensor, Future[tuple[str, int | None]]]] = deque()
        for t in tensors:
            window.append((t, pool.submit(fn, t)))
            if len(window) > IN_FLIGHT:
                done, job = window.popleft()
                yield done, job.result()
        while window:
            done, job = window.popleft()
            yield done, job.result()


#: Tensor jobs queued or running at once on a verify's threads (enough to keep them all busy).
IN_FLIGHT = 4096


def _compare_tensor(t: OutputTensor, path: Path, data_start: int, progress: Progress,
                    hashed: bool = True) -> tuple[str, int | None]:
    """sha256 of the output bytes of ``t`` ("" unless ``hashed``), and the offset of the first
    byte that differs from the expected ones (None when all are equal)."""
    digest = hashlib.sha256()
    actual = thread_buffer("actual", CAST_CHUNK * 2)
    pos, first = 0, None
    with Readers() as readers:
        out = readers.open(LocalFile(path))
        for chunk in tensor_chunks(t, readers.open):
            if len(chunk) > len(actual):  # an operation's natural unit made more (a dequantized expert's rows)
                actual = thread_buffer("actual", len(chunk))
            view = memoryview(actual)[:len(chunk)]
            out.read_into(view, data_start + t.offset + pos)
            if hashed:
                digest.update(view)
            if first is None and (at := first_difference(view, chunk)) is not None:
                first = pos + at
            pos += len(chunk)
            if progress:
                progress(len(chunk))
    return (digest.hexdigest() if hashed else ""), first


def first_difference(got: memoryview | bytes, want: memoryview | bytes) -> int | None:
    """Offset of the first byte where two equally long buffers differ, or None (at memcmp
    speed: numpy compares eight bytes at a time; ``memoryview ==`` goes element by element)."""
    a, b = np.frombuffer(got, np.uint8), np.frombuffer(want, np.uint8)
    if len(a) != len(b):
        return min(len(a), len(b))
    n = len(a) - len(a) % 8
    if np.array_equal(a[:n].view(np.uint64), b[:n].view(np.uint64)) and np.array_equal(a[n:], b[n:]):
        return None
    return int(np.flatnonzero(a != b)[0])


_local = threading.local()


def thread_buffer(name: str, size: int = STREAM_CHUNK) -> bytearray:
    """A scratch buffer of this thread, reused from tensor to tensor."""
    buf = getattr(_local, name, None)
    if buf is None or len(buf) < size:
        buf = bytearray(size)
        setattr(_local, name, buf)
    return buf


def hash_output_range(path: Path, offset: int, length: int, progress: Progress = None) -> str:
    """sha256 of ``length`` bytes of the output file ``path`` from ``offset``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return hash_fd_range(fd, offset, length, progress)
    finally:
        os.close(fd)


def hash_fd_range(fd: int, offset: int, length: int, progress: Progress = None) -> str:
    """sha256 of ``length`` bytes of the open file ``fd`` from ``offset``, through this thread's buffer."""
    digest = hashlib.sha256()
    buf = thread_buffer("hash")
    for start in range(0, length, len(buf)):
        view = memoryview(buf)[:min(len(buf), length - start)]
        pread_exact(fd, view, offset + start)
        digest.update(view)
        if progress:
            progress(len(view))
    return digest.hexdigest()


def compare_data(name: str, path: Path, expected: bytes) -> tuple[str | None, list[Difference]]:
    """Compare the small file ``path`` (config.json, the index, the card) with its exact expected
    bytes; returns its sha256 when equal. A JSON file that differs is described key by key, with
    JSON types (48 is not 48.0, false is not 0)."""
    diffs: list[Difference] = []
    fd = open_output_file(path, diffs)
    if fd is None:
        return None, diffs
    try:
        found = os.read(fd, len(expected) + 1)
    finally:
        os.close(fd)
    if found == expected:
        return hashlib.sha256(found).hexdigest(), []
    if name.endswith(".json"):
        return None, list(_json_differences(name, found, expected))
    return None, [Difference(name, "differs from what tensorsurgery writes for this output")]


def _json_differences(name: str, found: bytes, expected: bytes) -> Iterator[Difference]:
    try:
        got = json.loads(found.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        yield Difference(name, f"is not valid JSON ({e})")
        return
    if json_depth(got) > JSON_DEPTH:
        yield Difference(name, f"nests deeper than {JSON_DEPTH} levels; not what tensorsurgery writes")
        return
    lines = list(json_diff(json.loads(expected), got))
    if not lines:
        yield Difference(name, "holds the expected values but not the bytes tensorsurgery writes (formatting "
                               "or key order)")
    for line in lines[:20]:
        yield Difference(name, line)
    if len(lines) > 20:
        yield Difference(name, f"... and {len(lines) - 20} more difference(s)")


def json_diff(expected: Any, found: Any, where: str = "") -> Iterator[str]:
    """Key-level differences between two JSON values, types included: ``48`` and ``48.0``,
    ``false`` and ``0`` differ (Python's ``==`` would call them equal)."""
    if isinstance(expected, dict) and isinstance(found, dict):
        for key in sorted(expected.keys() | found.keys()):
            at = f"{where}.{key}" if where else key
            if key not in found:
                yield f"{at} is missing, expected {_show(expected[key])}"
            elif key not in expected:
                yield f"{at} is unexpected ({_show(found[key])})"
            else:
                yield from json_diff(expected[key], found[key], at)
    elif isinstance(expected, list) and isinstance(found, list) and len(expected) == len(found):
        for i, (a, b) in enumerate(zip(expected, found)):
            yield from json_diff(a, b, f"{where}[{i}]")
    elif type(expected) is not type(found) or expected != found:
        yield f"{where or 'the value'} is {_show(found)}, expected {_show(expected)}"


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def compare_copy(copy: CopyFile, path: Path) -> tuple[str | None, list[Difference]]:
    """Compare the output file ``path`` with the source file it was copied from, streamed;
    returns its sha256 when equal."""
    diffs: list[Difference] = []
    fd = open_output_file(path, diffs)
    if fd is None:
        return None, diffs
    try:
        with OpenFiles() as files:
            try:
                source = files.open(copy.source, inside=copy.inside)
            except SourceError as e:
                return None, [Difference(copy.name, f"cannot be compared with its source: {e}")]
            return _compare_streams(copy.name, fd, source, copy.source)
    finally:
        os.close(fd)


def _compare_streams(name: str, fd: int, source: int, source_path: Path) -> tuple[str | None, list[Difference]]:
    size, source_size = os.fstat(fd).st_size, os.fstat(source).st_size
    if size != source_size:
        return None, [Difference(name, f"differs from its source file {source_path} ({size} bytes, the source "
                                       f"{source_size})")]
    digest = hashlib.sha256()
    a, b = bytearray(STREAM_CHUNK), bytearray(STREAM_CHUNK)
    offset = 0
    while n := os.preadv(fd, [a], offset):
        m = os.preadv(source, [b], offset)
        k = min(n, m)  # n == m unless a file changed while it was read
        got, want = np.frombuffer(a, np.uint8, k), np.frombuffer(b, np.uint8, k)
        first = None if np.array_equal(got, want) else offset + int(np.flatnonzero(got != want)[0])
        if first is None and n != m:
            first = offset + k
        if first is not None:
            return None, [Difference(name, f"differs from its source file {source_path} from byte {first} on")]
        digest.update(memoryview(a)[:n])
        offset += n
    return digest.hexdigest(), []


def compare_sha256(name: str, path: Path, expected: str, progress: Progress = None) -> list[Difference]:
    """Compare the output file ``path`` with the sha256 the record gives it, streamed."""
    diffs: list[Difference] = []
    fd = open_output_file(path, diffs)
    if fd is None:
        return diffs
    try:
        if sha256_fd(fd, progress=progress) != expected:
            return [Difference(name, "differs from what tensorsurgery wrote (sha256 in tensorsurgery.json)")]
        return []
    finally:
        os.close(fd)


#: What a download of a pushed output holds beside its files, which no loader reads: the
#: ``.gitattributes`` the Hub creates in every repo (a regular file) and the ``.cache`` folder
#: where ``hf download --local-dir`` keeps its download metadata (``.cache/huggingface``).
HUB_DOWNLOAD_ENTRIES = MappingProxyType({".gitattributes": stat.S_IFREG, ".cache": stat.S_IFDIR})


def unexpected_entries(output: Path, expected: set[str]) -> list[Difference]:
    """Every entry of the folder ``output`` that is not an expected file: transformers or peft
    would load a stray ``pytorch_model.bin`` or ``adapter_config.json``, so each one is a difference
    (but for :data:`HUB_DOWNLOAD_ENTRIES`, so that a pulled copy verifies)."""
    with os.scandir(output) as entries:
        found = sorted((e.name, e.stat(follow_symlinks=False).st_mode) for e in entries)
    return [Difference(name, f"unexpected {_ENTRY_KINDS.get(stat.S_IFMT(mode), 'file')} (not part of this "
                             f"output; remove it)")
            for name, mode in found if name not in expected and HUB_DOWNLOAD_ENTRIES.get(name) != stat.S_IFMT(mode)]


_ENTRY_KINDS = {stat.S_IFDIR: "folder", stat.S_IFLNK: "symbolic link", stat.S_IFIFO: "FIFO",
                stat.S_IFSOCK: "socket", stat.S_IFCHR: "device", stat.S_IFBLK: "device"}

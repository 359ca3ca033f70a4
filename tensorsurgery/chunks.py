"""The bytes of one planned output tensor, produced from its source in bounded chunks.

Shared by the writer (for transformed tensors) and by verify (for every tensor), so both derive
the expected bytes the same way: a cast goes ``CAST_CHUNK`` source bytes at a time, a rotary
permutation one head at a time; never a whole tensor in memory.
"""
from __future__ import annotations

import os
import threading
from typing import Iterator

import numpy as np

from .errors import WriteError
from .plan import OutputTensor
from .transforms import FLOAT_SIZES, cast_chunk, permute_head

#: Source bytes per step; small because a cast makes a few temporaries of this size.
CAST_CHUNK = 1 << 20


def pread_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``.

    Raises:
        WriteError: the file ends first (it changed or was truncated since planning).
    """
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise WriteError(f"{_fd_path(fd)}: ends before byte {offset}; the file changed or was "
                             f"truncated since it was planned")
        view, offset = view[n:], offset + n


def expected_chunks(t: OutputTensor, fd: int, chunk: int = CAST_CHUNK) -> Iterator[memoryview]:
    """Yield the output bytes of ``t`` read from the source open as ``fd``.

    Each yielded view is valid only until the next one is requested: buffers are reused, per
    thread, so a thread consumes one of these generators at a time.
    """
    if t.permute_heads:
        row_bytes = t.source.length // t.shape[0]
        head_bytes = row_bytes * (t.shape[0] // t.permute_heads)
        scratch, out = _scratch(head_bytes)
        for h in range(t.permute_heads):
            pread_exact(fd, memoryview(scratch), t.source.offset + h * head_bytes)
            rows = permute_head(scratch, row_bytes)
            yield memoryview(cast_chunk(rows, t.source_dtype, t.dtype, out=out))
        return
    size = FLOAT_SIZES.get(t.source_dtype, 1)
    step = max(chunk - chunk % size, size)
    scratch, out = _scratch(step)
    if t.source_dtype == t.dtype:
        out = None
    for start in range(0, t.source.length, step):
        n = min(step, t.source.length - start)
        pread_exact(fd, memoryview(scratch)[:n], t.source.offset + start)
        if out is None:
            yield memoryview(scratch)[:n]
        else:
            yield memoryview(cast_chunk(scratch[:n], t.source_dtype, t.dtype, out=out))


_local = threading.local()


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's scratch buffers: ``n`` bytes for source bytes, ``2n`` for cast output.
    Reused across tensors: fresh multi-MB arrays per tensor make glibc raise its mmap threshold
    and keep the freed memory resident, which shows as creeping peak RSS."""
    have = getattr(_local, "buffers", None)
    if have is None or have[0].size < n:
        _local.buffers = (np.empty(n, np.uint8), np.empty(2 * n, np.uint8))
    src, out = _local.buffers
    return src[:n], out[:2 * n]


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"

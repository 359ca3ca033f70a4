"""The bytes of one planned output tensor, produced from its source in bounded chunks.

Shared by the writer (for transformed tensors) and by verify (for every tensor), so both derive
the expected bytes the same way: a cast goes ``CAST_CHUNK`` source bytes at a time, a rotary
permutation one head at a time; never a whole tensor in memory.
"""
from __future__ import annotations

import os
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

    Each yielded view is valid only until the next one is requested (buffers are reused).
    """
    if t.permute_heads:
        row_bytes = t.source.length // t.shape[0]
        head_bytes = row_bytes * (t.shape[0] // t.permute_heads)
        scratch = np.empty(head_bytes, np.uint8)
        out = np.empty(2 * head_bytes, np.uint8)
        for h in range(t.permute_heads):
            pread_exact(fd, memoryview(scratch), t.source.offset + h * head_bytes)
            rows = permute_head(scratch, row_bytes)
            yield memoryview(cast_chunk(rows, t.source_dtype, t.dtype, out=out))
        return
    size = FLOAT_SIZES.get(t.source_dtype, 1)
    step = max(chunk - chunk % size, size)
    scratch = np.empty(step, np.uint8)
    out = np.empty(2 * step, np.uint8) if t.source_dtype != t.dtype else None
    for start in range(0, t.source.length, step):
        n = min(step, t.source.length - start)
        pread_exact(fd, memoryview(scratch)[:n], t.source.offset + start)
        if out is None:
            yield memoryview(scratch)[:n]
        else:
            yield memoryview(cast_chunk(scratch[:n], t.source_dtype, t.dtype, out=out))


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"

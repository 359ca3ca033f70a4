"""A tensor that an operation makes, read as if it were a source file: the byte source of a
merge's input that is itself made (an FP8 weight dequantized, a LoRA adapter merged into its
base), so a recipe stays one operation of byte-range inputs and a merge of made tensors needs
nothing new of the writer, ``--resume`` or ``verify``.

A :class:`Derived` source is plan data like a file (immutable, hashable, equal when it makes the
same bytes); its reader makes the bytes asked for from the derivation's own inputs, a block of
whole rows at a time (a rowwise operation, :func:`~tensorsurgery.ops.recipe.is_rowwise`) or the
elements asked for (an elementwise one), in scratch buffers of their own
(:func:`tensorsurgery.io.scratch.nested`): the merge that reads it holds its inputs in the
thread's first set. Each thread keeps the last block it made, so a merge reading a tensor in
blocks of 65,536 elements makes each row block once; memory stays one block per thread and
derived input.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, NamedTuple, cast

from tensorsurgery.errors import ReadError
from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.recipe import is_rowwise, row_count

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader, Readers
    from tensorsurgery.ops.base import Input, Operation, RowwiseOperation

#: Bytes a rowwise derivation makes at a time (whole rows, at least one; at most :data:`ROWS`).
BLOCK_BYTES = 1 << 21
#: Rows a rowwise derivation makes at a time at most: a LoRA product's window (fewer rows cost a
#: whole window each).
ROWS = 128


class Derived(NamedTuple):
    """The bytes of tensor ``key`` of source ``source`` as operation ``op`` makes them of
    ``inputs``: ``dtype``, ``shape``, ``nbytes`` (a :class:`~tensorsurgery.io.byte_source.ByteSource`)."""

    source: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    inputs: tuple[Input, ...]
    op: Operation

    @property
    def name(self) -> str:
        return f"{self.inputs[0].range.file.name} ({self.op.label})"

    @property
    def location(self) -> str:
        return f"{self.inputs[0].range.file.location} ({self.op.label} of {self.key!r})"

    def open(self) -> DerivedReader:
        return DerivedReader(self)


def derivable(op: Operation) -> bool:
    """Whether the bytes ``op`` makes can be read in any order (it is rowwise or elementwise), as
    a :class:`Derived` source is read."""
    return bool(getattr(op, "rowwise", False)) or op.elementwise


class DerivedReader:
    """Reads a :class:`Derived` source: makes the bytes asked for (see the module docstring).
    Shared by threads: each keeps its own last block."""

    def __init__(self, derived: Derived) -> None:
        from tensorsurgery.io.byte_source import Readers

        self.derived = derived
        self._readers: Readers = Readers()
        self._lock = threading.Lock()
        self._local = threading.local()

    def _opened(self) -> list[Reader]:
        with self._lock:  # Readers opens each source once; its readers may be shared by threads
            return [self._readers.open(i.range.file) for i in self.derived.inputs]

    def read_into(self, view: memoryview, offset: int) -> None:
        import numpy as np

        from tensorsurgery.io.scratch import nested

        d = self.derived
        if offset < 0 or offset + len(view) > d.nbytes:
            raise ReadError(f"{d.location}: bytes {offset}..{offset + len(view)} asked of a tensor of {d.nbytes}")
        out = np.frombuffer(view, np.uint8)
        with nested():
            readers = self._opened()
            if is_rowwise(d):
                self._rows(readers, out, offset)
            else:
                self._elements(readers, out, offset)

    def _rows(self, readers: list[Reader], out: np.ndarray, offset: int) -> None:
        """``out`` filled from byte ``offset`` by whole row blocks, the last one kept."""
        d = self.derived
        rows = row_count(d.shape)
        row_bytes = d.nbytes // rows if rows else 0
        block = max(1, min(ROWS, BLOCK_BYTES // max(row_bytes, 1)))
        op = cast("RowwiseOperation", d.op)
        done = 0
        while done < out.size:
            at = offset + done
            first = at // row_bytes // block * block
            have = getattr(self._local, "block", None)
            if have is None or have[0] != first:
                import numpy as np

                n = min(block, rows - first)
                buf = getattr(self._local, "buf", None)
                if buf is None or buf.size < block * row_bytes:
                    buf = self._local.buf = np.empty(block * row_bytes, np.uint8)
                made = op.rows_into(d.inputs, readers, first, n, buf[:n * row_bytes])
                have = self._local.block = (first, made)
            start = at - have[0] * row_bytes
            k = min(out.size - done, have[1].size - start)
            out[done:done + k] = have[1][start:start + k]
            done += k

    def _elements(self, readers: list[Reader], out: np.ndarray, offset: int) -> None:
        """``out`` filled from byte ``offset`` with the elements it covers."""
        from tensorsurgery.ops.interpreter import compute_elements

        d = self.derived
        size = element_size(d.dtype)
        if offset % size or out.size % size:
            raise ReadError(f"{d.location}: a read of whole elements only ({out.size} bytes at {offset})")
        made = compute_elements(d, readers, offset // size, out.size // size, out)
        if made.ctypes.data != out.ctypes.data:
            out[:] = made

    def size(self) -> int:
        return self.derived.nbytes

    def close(self) -> None:
        self._readers.close()

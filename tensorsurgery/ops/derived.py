"""A tensor that an operation makes, read as if it were a source file: the byte source of a
merge's input that is itself made (an FP8 weight dequantized, a LoRA adapter merged into its
base), so a recipe stays one operation of byte-range inputs and a merge of made tensors needs
nothing new of the writer, ``--resume`` or ``verify``.

A :class:`Derived` source is plan data like a file (immutable, hashable, equal when it makes the
same bytes); its reader makes the bytes asked for from the derivation's own inputs, opened in the
same :class:`~tensorsurgery.io.byte_source.Readers` as the reader itself (no file descriptor per
made tensor), a block of whole rows at a time (a rowwise operation,
:func:`~tensorsurgery.ops.recipe.is_rowwise`) or the elements asked for (an elementwise one), in
scratch buffers of their own (:func:`tensorsurgery.io.scratch.nested`): the merge that reads it
holds its inputs in the thread's first set. Each thread keeps the last :data:`KEPT` row blocks it
made, whichever tensors they are of, so a merge that reads its inputs in blocks of 65,536 elements
makes each row block once, and memory stays a few blocks per thread however many tensors are made.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, NamedTuple, cast

from tensorsurgery.errors import ReadError, SourceError
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
#: Row blocks each thread keeps (a merge reads one block of each of its inputs at a time).
KEPT = 8

_local = threading.local()


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
        raise SourceError(f"{self.location}: a made tensor is read through the Readers of its inputs")

    def open_in(self, readers: Readers) -> DerivedReader:
        """A reader of it whose inputs are opened in ``readers`` (which closes them)."""
        return DerivedReader(self, [readers.open(i.range.file) for i in self.inputs])


def derivable(op: Operation) -> bool:
    """Whether the bytes ``op`` makes can be read in any order (it is rowwise or elementwise), as
    a :class:`Derived` source is read."""
    return bool(getattr(op, "rowwise", False)) or op.elementwise


class DerivedReader:
    """Reads a :class:`Derived` source (see the module docstring). Shared by threads: it holds
    nothing but the readers of its inputs."""

    __slots__ = ("derived", "_readers")

    def __init__(self, derived: Derived, readers: list[Reader]) -> None:
        self.derived = derived
        self._readers = readers

    def read_into(self, view: memoryview, offset: int) -> None:
        import numpy as np

        from tensorsurgery.io.scratch import nested

        d = self.derived
        if offset < 0 or offset + len(view) > d.nbytes:
            raise ReadError(f"{d.location}: bytes {offset}..{offset + len(view)} asked of a tensor of {d.nbytes}")
        out = np.frombuffer(view, np.uint8)
        with nested():
            if is_rowwise(d):
                self._rows(out, offset)
            else:
                self._elements(out, offset)

    def _rows(self, out: np.ndarray, offset: int) -> None:
        """``out`` filled from byte ``offset`` by whole row blocks."""
        d = self.derived
        rows = row_count(d.shape)
        row_bytes = d.nbytes // rows
        block = max(1, min(ROWS, BLOCK_BYTES // max(row_bytes, 1)))
        done = 0
        while done < out.size:
            at = offset + done
            first = at // row_bytes // block * block
            made = self._block(first, min(block, rows - first), row_bytes)
            start = at - first * row_bytes
            k = min(out.size - done, made.size - start)
            out[done:done + k] = made[start:start + k]
            done += k

    def _block(self, first: int, n: int, row_bytes: int) -> np.ndarray:
        """Rows ``first..first+n-1``: kept by this thread, or made into the buffer of the block it
        has not read for longest."""
        import numpy as np

        kept: list[list[object]] | None = getattr(_local, "kept", None)
        if kept is None:
            kept = _local.kept = []
        for i, entry in enumerate(kept):
            if entry[0] is self.derived and entry[1] == first:
                kept.append(kept.pop(i))  # the most recently read last
                return cast("np.ndarray", entry[2])
        if len(kept) < KEPT:
            entry = [None, -1, np.empty(0, np.uint8)]
        else:
            entry = kept.pop(0)
        buf = cast("np.ndarray", entry[2])
        if buf.size < n * row_bytes:
            buf = np.empty(n * row_bytes, np.uint8)
        entry[0], entry[1] = None, -1  # not a valid block while it is made (an error leaves it so)
        op = cast("RowwiseOperation", self.derived.op)
        made = op.rows_into(self.derived.inputs, self._readers, first, n, buf[:n * row_bytes])
        entry[0], entry[1], entry[2] = self.derived, first, buf
        kept.append(entry)
        return made

    def _elements(self, out: np.ndarray, offset: int) -> None:
        """``out`` filled from byte ``offset`` with the elements it covers."""
        from tensorsurgery.ops.interpreter import compute_elements

        d = self.derived
        size = element_size(d.dtype)
        if offset % size or out.size % size:
            raise ReadError(f"{d.location}: a read of whole elements only ({out.size} bytes at {offset})")
        made = compute_elements(d, self._readers, offset // size, out.size // size, out)
        if made.ctypes.data != out.ctypes.data:
            out[:] = made

    def size(self) -> int:
        return self.derived.nbytes

    def close(self) -> None:
        """Nothing to release: its inputs' readers are the :class:`Readers`' that opened it."""

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
holds its inputs in the thread's first set. The last :data:`KEPT` row blocks made are kept and
shared by the threads (a thread that needs a block another is making waits for it), so a merge
whose threads read consecutive pieces of a tensor makes each row block once, and memory stays a
few blocks however many tensors are made.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, NamedTuple, cast

from tensorsurgery.errors import ReadError, SourceError
from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.recipe import is_rowwise, row_count

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader, Readers
    from tensorsurgery.ops.base import Input, Operation, RowwiseOperation

#: Bytes a rowwise derivation makes at a time (whole rows, at least one; at most :data:`ROWS`).
BLOCK_BYTES = 1 << 20
#: Rows a rowwise derivation makes at a time at most: a LoRA product's window (fewer rows cost a
#: whole window each).
ROWS = 128
#: Row blocks kept, shared by the threads (a merge reads a block of each of its inputs at a time,
#: its threads consecutive pieces of one tensor).
KEPT = 6

class _Block:
    """A row block of a made tensor, shared by the threads: ``data`` once made (``ready`` set
    then, also when making it failed, ``data`` then None)."""

    __slots__ = ("derived", "ready", "data")

    def __init__(self, derived: Derived) -> None:
        self.derived = derived  # held: the key is its id
        self.ready = threading.Event()
        self.data: np.ndarray | None = None


_lock = threading.Lock()
#: The row blocks made last, most recently read last, by (id of the made tensor, first row).
_kept: OrderedDict[tuple[int, int], _Block] = OrderedDict()


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
        """Rows ``first..first+n-1``: from the blocks kept, or made here (while another thread
        makes it, this one waits for it: each block is made once)."""
        key = (id(self.derived), first)
        with _lock:
            entry = _kept.get(key)
            mine = entry is None
            if entry is None:
                entry = _kept[key] = _Block(self.derived)
                while len(_kept) > KEPT:
                    _kept.popitem(last=False)  # a block being made stays its maker's and waiters'
            else:
                _kept.move_to_end(key)
        if not mine:
            entry.ready.wait()
            if entry.data is None:
                raise ReadError(f"{self.derived.location}: rows {first}..{first + n - 1} could not be made")
            return entry.data
        try:
            from tensorsurgery.io.scratch import fresh

            op = cast("RowwiseOperation", self.derived.op)
            entry.data = op.rows_into(self.derived.inputs, self._readers, first, n, fresh(n * row_bytes))
        except BaseException:
            with _lock:
                if _kept.get(key) is entry:
                    del _kept[key]
            raise
        finally:
            entry.ready.set()
        return entry.data

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

"""A plan's output tensors in columns: no Python object per tensor while a plan is held.

A plan may hold 1.7M tensors. As tuples (an :class:`OutputTensor`, its 1-tuple of inputs, the
:class:`~tensorsurgery.ops.base.Input` and its :class:`~tensorsurgery.ops.base.ByteRange`, four
ints) each costs ~450 bytes besides its name. A :class:`TensorTable` keeps a tensor as slots of
a few arrays (its offsets and sizes, 8 bytes each) and references to its name, its source key
(the name itself when equal) and one *kind*: the dtype, shape, operation, source and byte
source it shares with many other tensors. About 60 bytes a tensor and its names.

A recipe of one whole input (a copy, a cast, a rotary permutation: nearly every tensor of most
plans) is stored so; any other (several inputs, a row slice, zeros) keeps its input tuple as is.
Tensors are made when asked for, an :class:`OutputTensor` each time (equal, not identical): a
loop over a table makes one at a time and holds none.
"""
from __future__ import annotations

from array import array
from bisect import bisect_right
from typing import Iterable, Iterator, NamedTuple, Sequence, TypeVar, overload

from tensorsurgery.io.byte_source import ByteSource
from tensorsurgery.ops.base import ByteRange, Input, Operation
from tensorsurgery.ops.copy import COPY


class OutputTensor(NamedTuple):  # not a frozen dataclass: made per tensor (see recipe.ByteRange)
    """One output tensor: its recipe (its inputs and the operation that makes it of them, see
    :mod:`tensorsurgery.ops.recipe`). ``offset`` is its start in its shard's data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    inputs: tuple[Input, ...]
    op: Operation
    #: The recipe in one word per stage (:func:`~tensorsurgery.ops.recipe.label`), made when planned.
    transform: str

    @property
    def source(self) -> ByteRange | None:
        """The first input's byte range (None for a tensor of no input: zeros)."""
        return self.inputs[0].range if self.inputs else None

    @property
    def source_name(self) -> str:
        """The first input's source name ("" for none)."""
        return self.inputs[0].source if self.inputs else ""

    @property
    def source_key(self) -> str:
        """The first input's tensor name in its source ("" for none)."""
        return self.inputs[0].key if self.inputs else ""

    @property
    def source_dtype(self) -> str:
        """The first input's dtype (the output's for none)."""
        return self.inputs[0].dtype if self.inputs else self.dtype


class _Kind(NamedTuple):
    """What many tensors of a table share. ``file`` is None for a tensor whose inputs the table
    keeps whole (then ``source``, ``in_dtype`` and ``in_shape`` are None too)."""

    dtype: str
    shape: tuple[int, ...]
    op: Operation
    transform: str
    source: str | None
    in_dtype: str | None
    in_shape: tuple[int, ...] | None
    file: ByteSource | None


_T = TypeVar("_T")

#: A plain tuple's constructor, used for the NamedTuples made per tensor: theirs costs 3x.
_new = tuple.__new__


class _Columns:
    """The storage a table and its slices share."""

    __slots__ = ("names", "keys", "kinds", "offsets", "nbytes", "in_offsets", "in_lengths", "kind_list",
                 "kind_index", "whole")

    def __init__(self) -> None:
        self.names: list[str] = []
        self.keys: list[str | None] = []  # None: the inputs are in ``whole``
        self.kinds = array("I")
        self.offsets, self.nbytes, self.in_offsets, self.in_lengths = array("q"), array("q"), array("q"), array("q")
        self.kind_list: list[_Kind] = []
        self.kind_index: dict[_Kind, int] = {}
        self.whole: dict[int, tuple[Input, ...]] = {}  # row -> inputs, for recipes not of one whole input

    def kind(self, kind: _Kind) -> int:
        k = self.kind_index.get(kind)
        if k is None:
            k = self.kind_index[kind] = len(self.kind_list)
            self.kind_list.append(kind)
        return k

    def row(self, i: int) -> OutputTensor:
        kind = self.kind_list[self.kinds[i]]
        key = self.keys[i]
        if key is None:
            inputs = self.whole[i]
        else:
            whole = _new(ByteRange, (kind.file, self.in_offsets[i], self.in_lengths[i]))
            inputs = (_new(Input, (kind.source, key, kind.in_dtype, kind.in_shape, whole, None)),)
        return _new(OutputTensor, (self.names[i], kind.dtype, kind.shape, self.offsets[i], self.nbytes[i], inputs,
                                   kind.op, kind.transform))


def _position(index: int, n: int) -> int:
    """``index`` of a sequence of ``n`` as a position from 0 (negative: from the end)."""
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError("tensor index out of range")
    return index


def _equal(a: Sequence[OutputTensor], b: object) -> bool:
    """Whether ``b`` (a table, a plan's tensors, a tuple or a list) holds ``a``'s tensors, in order."""
    if isinstance(b, (TensorTable, PlanTensors, tuple, list)):
        return len(a) == len(b) and all(x == y for x, y in zip(a, b))
    return NotImplemented  # type: ignore[no-any-return]


class TableBuilder:
    """Rows added one by one (planning), then :meth:`build` once."""

    def __init__(self) -> None:
        self._c = _Columns()
        self._copies: dict[tuple[str, tuple[int, ...], str, int], tuple[ByteSource, int]] = {}

    def __len__(self) -> int:
        return len(self._c.names)

    def add(self, name: str, dtype: str, shape: tuple[int, ...], offset: int, nbytes: int,
            inputs: tuple[Input, ...], op: Operation, transform: str) -> None:
        """Add one output tensor (the fields of :class:`OutputTensor`)."""
        c = self._c
        first = inputs[0] if len(inputs) == 1 else None
        if first is not None and first.part is None:
            r = first.range
            key = first.key
            c.keys.append(name if key == name else key)  # the same string once
            c.kinds.append(c.kind(_new(_Kind, (dtype, shape, op, transform, first.source, first.dtype, first.shape,
                                                r.file))))
            c.in_offsets.append(r.offset)
            c.in_lengths.append(r.length)
        else:
            c.whole[len(c.names)] = inputs
            c.keys.append(None)
            c.kinds.append(c.kind(_new(_Kind, (dtype, shape, op, transform, None, None, None, None))))
            c.in_offsets.append(0)
            c.in_lengths.append(0)
        c.names.append(name)
        c.offsets.append(offset)
        c.nbytes.append(nbytes)

    def add_copy(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int, source: str, key: str,
                 file: ByteSource, offset: int) -> None:
        """Add a verbatim copy of ``nbytes`` bytes of ``file`` from ``offset`` (tensor ``key`` of
        ``source``), without making its recipe's tuples (most tensors of most plans are these)."""
        c = self._c
        c.keys.append(name if key == name else key)
        # A copy's kind found by what hashes in C: a byte source's and an operation's hash is
        # Python (a Path's), and this runs for every tensor of a 1.7M-tensor plan. The cached file
        # is held, so its id is not reused while the entry lives.
        copy = (dtype, shape, source, id(file))
        found = self._copies.get(copy)
        if found is not None and found[0] is file:
            k = found[1]
        else:
            k = c.kind(_new(_Kind, (dtype, shape, COPY, "none", source, dtype, shape, file)))
            self._copies[copy] = (file, k)
        c.kinds.append(k)
        c.in_offsets.append(offset)
        c.in_lengths.append(nbytes)
        c.names.append(name)
        c.offsets.append(0)
        c.nbytes.append(nbytes)

    def append(self, t: OutputTensor) -> None:
        """Add ``t``."""
        self.add(*t)

    def set_offset(self, row: int, offset: int) -> None:
        """Place row ``row`` at ``offset`` of its shard's data (sharding decides it last)."""
        self._c.offsets[row] = offset

    def build(self) -> TensorTable:
        """The table of every row added (the builder must not be used after)."""
        c, self._c = self._c, _Columns()
        c.kind_index, self._copies = {}, {}  # only adding needs them
        return TensorTable(c, 0, len(c.names))


class TensorTable(Sequence[OutputTensor]):
    """Output tensors stored in columns (see the module's docstring); rows ``start..stop-1`` of
    storage it may share with other tables (the shards cut from one table of a plan)."""

    __slots__ = ("_c", "_start", "_stop")

    def __init__(self, columns: _Columns, start: int, stop: int):
        self._c, self._start, self._stop = columns, start, stop

    @classmethod
    def of(cls, tensors: Iterable[OutputTensor]) -> TensorTable:
        """A table of ``tensors`` (plans made by hand: tests, tools)."""
        if isinstance(tensors, TensorTable):
            return tensors
        builder = TableBuilder()
        for t in tensors:
            builder.append(t)
        return builder.build()

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> OutputTensor: ...
    @overload
    def __getitem__(self, index: slice) -> TensorTable: ...

    def __getitem__(self, index: int | slice) -> OutputTensor | TensorTable:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return TensorTable.of([self[i] for i in range(start, stop, step)])
            return TensorTable(self._c, self._start + start, self._start + max(start, stop))
        return self._c.row(self._start + _position(index, len(self)))

    def __iter__(self) -> Iterator[OutputTensor]:
        row = self._c.row
        return map(row, range(self._start, self._stop))

    def __eq__(self, other: object) -> bool:
        return _equal(self, other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"TensorTable({len(self)} tensors)"

    def slice(self, start: int, stop: int) -> TensorTable:
        """Rows ``start..stop-1`` of this table, sharing its storage."""
        return self[start:stop]

    def with_offsets(self, offsets: array[int]) -> TensorTable:
        """This whole table with each tensor placed at ``offsets`` (sharding decides them last):
        a new table sharing every other column."""
        assert self._start == 0 and self._stop == len(self._c.names) == len(offsets)
        c = _Columns()
        for slot in _Columns.__slots__:
            setattr(c, slot, getattr(self._c, slot))
        c.offsets = offsets
        return TensorTable(c, 0, len(offsets))

    def _span(self, column: Sequence[_T]) -> Iterator[_T]:
        """This table's rows of ``column`` (a slice copies only a slice's references: itertools.islice
        would step over every row before it, quadratic over a plan's shards)."""
        if self._start == 0 and self._stop == len(column):
            return iter(column)
        return iter(column[self._start:self._stop])

    @property
    def shapes(self) -> Iterator[tuple[int, ...]]:
        """Each tensor's shape, in order."""
        kinds = self._c.kind_list
        return (kinds[k].shape for k in self._span(self._c.kinds))

    @property
    def names(self) -> Iterator[str]:
        """Each tensor's name, in order (without making the tensors)."""
        return self._span(self._c.names)

    @property
    def nbytes(self) -> Iterator[int]:
        """Each tensor's size in bytes, in order."""
        return self._span(self._c.nbytes)

    @property
    def offsets(self) -> Iterator[int]:
        """Each tensor's offset in its shard's data section, in order."""
        return self._span(self._c.offsets)

    @property
    def transforms(self) -> Iterator[str]:
        """Each tensor's transform label, in order."""
        kinds = self._c.kind_list
        return (kinds[k].transform for k in self._span(self._c.kinds))

    def signatures(self) -> Iterator[tuple[str, str, tuple[int, ...]]]:
        """``(name, dtype, shape)`` of each tensor, in order (what the consistency checks read)."""
        c, kinds = self._c, self._c.kind_list
        for i in range(self._start, self._stop):
            kind = kinds[c.kinds[i]]
            yield c.names[i], kind.dtype, kind.shape

    def header_items(self) -> Iterator[tuple[str, str, tuple[int, ...], int, int]]:
        """``(name, dtype, shape, start, end)`` of each tensor, as a safetensors header lists them."""
        c, kinds = self._c, self._c.kind_list
        for i in range(self._start, self._stop):
            kind, start = kinds[c.kinds[i]], c.offsets[i]
            yield c.names[i], kind.dtype, kind.shape, start, start + c.nbytes[i]


class PlanTensors(Sequence[OutputTensor]):
    """Every output tensor of a plan's shards, in order, made when asked for (see :class:`TensorTable`)."""

    __slots__ = ("_tables", "_starts")

    def __init__(self, tables: Sequence[TensorTable]):
        self._tables = tuple(tables)
        starts, n = [], 0
        for t in self._tables:
            starts.append(n)
            n += len(t)
        self._starts = (*starts, n)

    def __len__(self) -> int:
        return self._starts[-1]

    @overload
    def __getitem__(self, index: int) -> OutputTensor: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[OutputTensor, ...]: ...

    def __getitem__(self, index: int | slice) -> OutputTensor | tuple[OutputTensor, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        index = _position(index, len(self))
        k = bisect_right(self._starts, index) - 1
        return self._tables[k][index - self._starts[k]]

    def __iter__(self) -> Iterator[OutputTensor]:
        for table in self._tables:
            yield from table

    def __eq__(self, other: object) -> bool:
        return _equal(self, other)

    __hash__ = None  # type: ignore[assignment]

    @property
    def names(self) -> Iterator[str]:
        """Each tensor's name, in order."""
        for table in self._tables:
            yield from table.names

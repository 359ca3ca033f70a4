"""The one interpreter of recipes (:mod:`tensorsurgery.ops.recipe`): an output tensor's bytes, made on
bounded chunks. The writer (:mod:`tensorsurgery.output.pump`) and every comparison (``--resume``, both
``verify`` modes: :mod:`tensorsurgery.output.compare`) make bytes only here.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Sequence, cast

import numpy as np

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.io.byte_source import ByteSource, Reader
from tensorsurgery.io.scratch import scratch as _scratch
from tensorsurgery.ops.base import Input, Operation, TwoPassOperation
from tensorsurgery.ops.recipe import Recipe, element_count, is_elementwise, is_two_pass
from tensorsurgery.ops.transforms import cast_chunk
from tensorsurgery.ops.zeros import Zeros

#: Source bytes (of all its inputs) per chunk of a computed tensor; small because a cast makes a few
#: temporaries, and a merge reads several inputs.
CAST_CHUNK = 1 << 18

#: Opens a byte source for reading; the reader stays the opener's to close (a pool of readers,
#: :class:`tensorsurgery.io.byte_source.Readers`).
Opener = Callable[[ByteSource], Reader]


def tensor_chunks(t: Recipe, open_source: Opener, chunk: int = CAST_CHUNK) -> Iterator[memoryview]:
    """The output bytes of ``t``, in bounded chunks, its inputs opened with ``open_source``.

    Each yielded view is valid only until the next one is requested: buffers are reused, per
    thread, so a thread consumes one of these generators at a time.
    """
    inputs, op, dtype, nbytes = t.inputs, t.op, t.dtype, t.nbytes
    if isinstance(op, Zeros):
        zeros = _scratch(min(nbytes, chunk))[1].data
        zeros[:] = bytes(len(zeros))
        for start in range(0, nbytes, len(zeros) or 1):
            yield zeros[:min(len(zeros), nbytes - start)]
        return
    readers = [open_source(i.range.file) for i in inputs]
    t = prepared(t, readers)
    if is_elementwise(t):
        count = element_count(t)
        step = max(chunk // sum(element_size(i.dtype) for i in inputs), 1)  # all inputs together: ``chunk``
        out = _scratch(step * element_size(dtype), slot=-1)[1]
        for start in range(0, count, step):
            n = min(step, count - start)
            yield compute_elements(t, readers, start, n, out[:n * element_size(dtype)]).data
        return
    result = op.result_dtype(inputs)
    for values in op.chunks(inputs, readers, chunk):
        if result != dtype:
            values = cast_chunk(values, result, dtype, out=_scratch(values.size, slot=-1)[1])
        yield values.data


class Prepared(NamedTuple):
    """A two-pass recipe with its statistic read: the same inputs, an elementwise operation."""

    dtype: str
    nbytes: int
    inputs: tuple[Input, ...]
    op: Operation


def prepared(t: Recipe, readers: Sequence[Reader]) -> Recipe:
    """``t`` itself, or for a two-pass recipe (:func:`~tensorsurgery.ops.recipe.is_two_pass`) the
    elementwise recipe its operation's :meth:`~tensorsurgery.ops.TwoPassOperation.prepare`
    makes, having read the inputs (with ``readers``) once for its statistic."""
    if not is_two_pass(t):
        return t
    op = cast(TwoPassOperation, t.op).prepare(t.inputs, readers)
    return Prepared(t.dtype, t.nbytes, t.inputs, op)


def compute_elements(t: Recipe, readers: Sequence[Reader], start: int, n: int, out: np.ndarray) -> np.ndarray:
    """Output elements ``start..start+n-1`` of the elementwise recipe ``t`` (its inputs read by
    ``readers``), written into ``out`` (a uint8 buffer of their size) when it can be; returns the bytes
    (``out`` or a view of a scratch buffer)."""
    inputs, op, dtype = t.inputs, t.op, t.dtype
    raws = []
    for k, (i, reader) in enumerate(zip(inputs, readers)):
        size = element_size(i.dtype)
        raw = _scratch(n * size, slot=k)[0]
        reader.read_into(raw.data, i.range.offset + start * size)
        raws.append(raw)
    values = op.apply(raws, inputs, start)
    result = op.result_dtype(inputs)
    if result == dtype:
        return values
    return cast_chunk(values, result, dtype, out=out)

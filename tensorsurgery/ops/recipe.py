"""What an output tensor is made of (pure data): a recipe of inputs and one operation.

A recipe is an output tensor's :class:`Input` tuple (any number of source byte ranges, each with
its dtype and shape) and one :class:`~tensorsurgery.ops.Operation`; the output tensor's dtype is
the last stage, a cast (bitwise as torch's, :mod:`tensorsurgery.ops.transforms`) when the operation's
values are of another dtype. :mod:`tensorsurgery.ops.interpreter` makes the bytes; the writer,
``--resume``, both ``verify`` modes, the record and ``plan``'s report never look inside an
operation: what they may ask of one is in :class:`~tensorsurgery.ops.Operation`.
"""
from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from functools import lru_cache
from typing import Hashable, Protocol, Sequence

from tensorsurgery.formats.dtypes import element_size, is_castable
from tensorsurgery.ops.base import DequantizingOperation, Input, Operation


@lru_cache(maxsize=1024)
def label(inputs_sliced: bool, op: Operation, first_dtype: str | None, dtype: str) -> str:
    """A recipe in one word per stage, as ``plan`` and the record show it: ``none`` (a verbatim
    copy), ``cast``, ``permute``, ``permute+cast``, ``slice``, ``zeros``, ``scale``...

    ``cast`` appears when the output dtype is not the first input's (what the user asked for),
    not when an operation computes in another dtype and returns to the input's, nor when the
    input's dtype is none a cast converts (a dequantization makes floats of FP8 bytes itself).
    """
    parts = ["slice"] if inputs_sliced else []
    if op.label != "copy":
        parts.append(op.label)
    if first_dtype is not None and dtype != first_dtype and is_castable(first_dtype):
        parts.append("cast")
    return "+".join(parts) or "none"


def inputs_data(t: Recipe, *, with_offsets: bool = False) -> dict[str, object]:
    """A recipe of several inputs (a merge) as JSON-ready data, for the record and ``plan --json``:
    ``inputs`` (each one's source, file and key; its absolute offset ``with_offsets``) and its
    ``operation``'s parameters. Empty for a recipe of one input or none, whose first-input fields
    already say it all (and a 1.7M-tensor record stays small)."""
    if len(t.inputs) < 2:
        return {}
    inputs = [{"source": i.source, "source_file": i.range.file.location if with_offsets else i.range.file.name,
               "source_key": i.key, **({"source_offset": i.range.offset} if with_offsets else {})}
              for i in t.inputs]
    op = t.op
    params: dict[str, object] = {f.name: getattr(op, f.name) for f in fields(op)} if is_dataclass(op) else {}
    return {"inputs": inputs, "operation": {"name": op.label, **params}}


class Recipe(Protocol):
    """What the interpreter reads of an output tensor (a plan's ``OutputTensor``)."""

    @property
    def dtype(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def inputs(self) -> tuple[Input, ...]: ...
    @property
    def op(self) -> Operation: ...


def is_verbatim(t: Recipe) -> bool:
    """The output bytes are the one input's bytes: read them straight into place."""
    return t.op.verbatim and len(t.inputs) == 1 and t.inputs[0].dtype == t.dtype


def is_elementwise(t: Recipe) -> bool:
    """Output element ``i`` depends on element ``i`` of each input only: any element range can be
    made on its own (:func:`tensorsurgery.ops.interpreter.compute_elements`), so the writer spreads
    them over threads."""
    return t.op.elementwise and bool(t.inputs)


def is_rowwise(t: Recipe) -> bool:
    """Output row ``i`` is made of rows of the inputs alone: the operation says ``rowwise = True``
    and has ``rows_into(inputs, readers, start, n, out)`` (a dequantization: the weight's row and its
    block-row's scales). Any row range can be made on its own, so the writer spreads them over
    threads as it does element ranges. An operation that says nothing is not.
    A row is every dimension but the last (:func:`row_count`)."""
    return bool(getattr(t.op, "rowwise", False)) and bool(t.inputs)


def row_count(shape: Sequence[int]) -> int:
    """The rows of a rowwise tensor of ``shape``: the product of every dimension but the last (a
    3-D ``[experts, rows, cols]`` tensor has ``experts * rows``)."""
    return math.prod(shape[:-1])


def dequantized(t: Recipe) -> DequantizingOperation | None:
    """The operation when it dequantizes (it says ``dequantizes = True``), else None."""
    return t.op if getattr(t.op, "dequantizes", False) else None  # type: ignore[return-value]


def is_two_pass(t: Recipe) -> bool:
    """Output element ``i`` is made of element ``i`` of each input and a statistic of the whole
    inputs: the operation says ``two_pass = True`` and has ``prepare(inputs, readers)``, which reads
    the statistic and returns an elementwise operation
    (:func:`tensorsurgery.ops.interpreter.prepared`). An operation that says nothing is not."""
    return bool(getattr(t.op, "two_pass", False)) and bool(t.inputs)


def element_count(t: Recipe) -> int:
    """How many elements an elementwise recipe makes (as many as each input holds)."""
    return t.inputs[0].range.length // element_size(t.inputs[0].dtype)


def identity(t: Recipe) -> Hashable:
    """What makes a tensor's bytes: two tensors with equal identities have equal bytes and hashes
    (the layers DUS repeats are made, or compared, once and hashed once)."""
    return tuple(i.range for i in t.inputs), t.op, t.dtype

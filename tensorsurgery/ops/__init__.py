"""The operations a recipe (:mod:`tensorsurgery.ops.recipe`) may apply, one per output tensor, and
their registry. An operation is a frozen dataclass (hashable: equal operations on equal inputs
make equal bytes); adding one is a module here that defines it and registers it.

What the interpreter may ask of an operation, and all it may ask:

* ``label``: one word for ``plan``, the record and the model card;
* ``verbatim``: its output is its one input's bytes (copied with no computation at all);
* ``elementwise``: output element ``i`` depends on element ``i`` of each input only (and on
  ``i`` itself, which :meth:`Operation.apply` is told); then :meth:`Operation.apply` makes any
  element range on its own, and the writer spreads ranges over threads;
* :meth:`Operation.result_dtype`: the dtype of the values it makes (the interpreter casts them
  to the output's dtype);
* ``rowwise`` (optional, :class:`RowwiseOperation`): output row ``i`` is made of rows of the
  inputs alone; then :meth:`RowwiseOperation.rows_into` makes any row range on its own, and the
  writer spreads ranges over threads as it does element ranges (a dequantization);
* ``two_pass`` (optional, :class:`TwoPassOperation`): element ``i`` depends on element ``i`` of
  each input and on a statistic of the whole input tensors (slerp's norms and angle, ties' top-k
  threshold); :meth:`TwoPassOperation.prepare` reads the inputs once, in bounded blocks, for the
  statistic and returns the elementwise operation with it bound, which the writer then spreads
  over threads like any other;
* :meth:`Operation.chunks`: for an operation that is none of these, its values in bounded
  chunks, reading its inputs itself, in order (a random stream that must be consumed in order).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Protocol, Sequence, TypeVar

if TYPE_CHECKING:  # numpy is not imported by planning (``plan`` and ``inspect`` do without it)
    import numpy as np

    from tensorsurgery.ops.recipe import Input


class Operation(Protocol):
    """An output tensor's operation (see the module docstring for what each member promises)."""

    label: ClassVar[str]
    verbatim: ClassVar[bool]
    elementwise: ClassVar[bool]

    def __hash__(self) -> int:
        """Operations are frozen dataclasses: equal operations on equal inputs make equal bytes."""

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        """The safetensors dtype of the values it makes from ``inputs``."""

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        """Elementwise operations: the values (raw bytes, uint8, of :meth:`result_dtype`) made from
        the same element range of each input (``raws``, raw bytes of each input's dtype), the range
        that starts at element ``start``."""

    def chunks(self, inputs: Sequence[Input], fds: Sequence[int], chunk: int) -> Iterator[np.ndarray]:
        """Other operations: every value in order (raw bytes of :meth:`result_dtype`), reading the
        inputs (open as ``fds``) at most ``chunk`` bytes or one natural unit (a head) at a time."""


class RowwiseOperation(Operation, Protocol):
    """An operation that says ``rowwise = True`` (:func:`tensorsurgery.ops.recipe.is_rowwise`)."""

    rowwise: ClassVar[bool]

    def rows_into(self, inputs: Sequence[Input], fds: Sequence[int], start: int, n: int,
                  out: np.ndarray) -> np.ndarray:
        """Output rows ``start..start+n-1`` (raw bytes of :meth:`result_dtype`) made into ``out``
        (uint8, their size), reading the inputs (open as ``fds``); returns ``out``."""


class TwoPassOperation(Operation, Protocol):
    """An operation that says ``two_pass = True`` (:func:`tensorsurgery.ops.recipe.is_two_pass`)."""

    two_pass: ClassVar[bool]

    def prepare(self, inputs: Sequence[Input], fds: Sequence[int]) -> Operation:
        """Read the inputs (open as ``fds``) once, a bounded block at a time, for the statistic the
        values need, and return the elementwise operation that makes them with it bound. The
        blocks are the operation's own, not the caller's chunks: the statistic (a float sum) is
        the same bytes whoever asks (the writer, ``verify``, ``--resume``)."""


#: Every operation by its label.
OPERATIONS: dict[str, type[Any]] = {}

_T = TypeVar("_T")


def register(cls: type[_T]) -> type[_T]:
    """Class decorator: make an operation known by its label (for records and manifests)."""
    label: str = cls.__dict__["label"]
    if label in OPERATIONS:
        raise ValueError(f"two operations are labelled {label!r}")
    OPERATIONS[label] = cls
    return cls


from tensorsurgery.ops.breadcrumbs import Breadcrumbs  # noqa: E402 - the operations register themselves on import
from tensorsurgery.ops.copy import COPY, Copy  # noqa: E402
from tensorsurgery.ops.dare import Dare  # noqa: E402
from tensorsurgery.ops.della import Della  # noqa: E402
from tensorsurgery.ops.dequant_fp8 import DequantFP8  # noqa: E402
from tensorsurgery.ops.dequant_mxfp4 import DequantMXFP4  # noqa: E402
from tensorsurgery.ops.karcher import Karcher  # noqa: E402
from tensorsurgery.ops.linear import Linear  # noqa: E402
from tensorsurgery.ops.lora import LoraBias, LoraMerge  # noqa: E402
from tensorsurgery.ops.model_stock import ModelStock  # noqa: E402
from tensorsurgery.ops.multislerp import Multislerp  # noqa: E402
from tensorsurgery.ops.nearswap import NearSwap  # noqa: E402
from tensorsurgery.ops.nuslerp import Nuslerp  # noqa: E402
from tensorsurgery.ops.permute import PermuteRotary, rotary_row_order  # noqa: E402
from tensorsurgery.ops.ram import Ram, RamPlus  # noqa: E402
from tensorsurgery.ops.scale import Scale  # noqa: E402
from tensorsurgery.ops.sce import Sce  # noqa: E402
from tensorsurgery.ops.slerp import Slerp  # noqa: E402
from tensorsurgery.ops.task_arithmetic import TaskArithmetic  # noqa: E402
from tensorsurgery.ops.ties import Ties  # noqa: E402
from tensorsurgery.ops.zeros import ZEROS, Zeros  # noqa: E402

__all__ = ["COPY", "OPERATIONS", "ZEROS", "Breadcrumbs", "Copy", "Dare", "Della", "DequantFP8", "DequantMXFP4",
           "Karcher", "Linear", "LoraBias", "LoraMerge", "ModelStock", "Multislerp", "NearSwap", "Nuslerp",
           "Operation", "PermuteRotary", "Ram", "RamPlus", "RowwiseOperation", "Scale", "Sce", "Slerp",
           "TaskArithmetic", "Ties", "TwoPassOperation", "Zeros", "register", "rotary_row_order"]

"""What an operation is given and what it must be: a recipe's inputs (byte ranges of source
tensors), the :class:`Operation` protocols the interpreter relies on, and the registry. The
package docstring (:mod:`tensorsurgery.ops`) says what each member promises."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterator, NamedTuple, Protocol, Sequence, TypeVar

if TYPE_CHECKING:  # numpy is not imported by planning (``plan`` and ``inspect`` do without it)
    import numpy as np

    from tensorsurgery.io.byte_source import ByteSource, Reader


# ByteRange and Input are NamedTuples, not frozen dataclasses: as immutable and typed, but a plan
# makes one of each per tensor (1.7M in the largest headers) and a frozen dataclass's __init__
# costs ten times a tuple's.
class ByteRange(NamedTuple):
    """``length`` bytes of the byte source ``file`` (:mod:`tensorsurgery.io.byte_source`) from its
    absolute offset ``offset``."""

    file: ByteSource
    offset: int
    length: int


class RowSlice(NamedTuple):
    """Rows ``start..stop-1`` of a source tensor of ``rows`` rows (a fused tensor's part: Phi-3's
    ``qkv_proj``); the input's byte range is already narrowed to them, so it costs nothing."""

    start: int
    stop: int
    rows: int


class Input(NamedTuple):
    """One input of a recipe: tensor ``key`` of source ``source``, of ``dtype`` and ``shape``, read
    from ``range`` (rows ``part`` of it when the source tensor is a fused one)."""

    source: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    range: ByteRange
    part: RowSlice | None = None


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

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        """Other operations: every value in order (raw bytes of :meth:`result_dtype`), reading the
        inputs (read by ``readers``) at most ``chunk`` bytes or one natural unit (a head) at a time."""


class RowwiseOperation(Operation, Protocol):
    """An operation that says ``rowwise = True`` (:func:`tensorsurgery.ops.recipe.is_rowwise`)."""

    rowwise: ClassVar[bool]

    def rows_into(self, inputs: Sequence[Input], readers: Sequence[Reader], start: int, n: int,
                  out: np.ndarray) -> np.ndarray:
        """Output rows ``start..start+n-1`` (raw bytes of :meth:`result_dtype`) made into ``out``
        (uint8, their size), reading the inputs (read by ``readers``); returns ``out``."""


class TwoPassOperation(Operation, Protocol):
    """An operation that says ``two_pass = True`` (:func:`tensorsurgery.ops.recipe.is_two_pass`)."""

    two_pass: ClassVar[bool]

    def prepare(self, inputs: Sequence[Input], readers: Sequence[Reader]) -> Operation:
        """Read the inputs (read by ``readers``) once, a bounded block at a time, for the statistic the
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


class DequantizingOperation(Operation, Protocol):
    """An operation that says ``dequantizes = True`` (:func:`tensorsurgery.ops.recipe.dequantized`):
    it makes plain floats of a quantized weight and its scales (its second input), which leave the
    output."""

    dequantizes: ClassVar[bool]

    def quantization(self) -> str:
        """The source's quantization in a few words, for ``plan``: ``FP8 in 128x128 blocks``."""

"""``copy``: the one input's bytes (a cast when the output's dtype differs is the interpreter's)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator, Sequence

from tensorsurgery.ops.base import register

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input


@register
@dataclass(frozen=True, slots=True)
class Copy:
    """The input as it is: most tensors of most plans."""

    label: ClassVar[str] = "copy"
    verbatim: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return inputs[0].dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        return raws[0]

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("copy is elementwise")  # the interpreter never asks


#: The one instance: every copied tensor shares it.
COPY = Copy()

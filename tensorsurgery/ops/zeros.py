"""``zeros``: a tensor the source lacks (a bias the target architecture needs), all zero bytes."""
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
class Zeros:
    """No input: every byte of the tensor is zero (the interpreter makes them, of any dtype)."""

    label: ClassVar[str] = "zeros"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        raise NotImplementedError("zeros have the output's dtype")  # the interpreter never asks

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("zeros are not elementwise")

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("the interpreter makes zeros itself")


ZEROS = Zeros()

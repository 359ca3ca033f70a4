"""``scale``: a tensor times a constant, as mergekit's passthrough ``scale`` parameter makes it."""
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
class Scale:
    """Each element times ``factor``, computed in float32 (torch's arithmetic type for 16-bit
    floats and the factor alike) and rounded once to the output's dtype, as torch's
    ``tensor * factor`` on CPU."""

    factor: float
    label: ClassVar[str] = "scale"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return "F32"

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np  # not imported by planning (see tensorsurgery.ops)

        from tensorsurgery.ops.transforms import cast_chunk

        values = cast_chunk(raws[0], inputs[0].dtype, "F32").view(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN, as torch makes them
            return np.multiply(values, np.float32(self.factor), dtype=np.float32).view(np.uint8)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("scale is elementwise")  # the interpreter never asks

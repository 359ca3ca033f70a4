"""``permute``: the rotary row permutation of Mistral's and Meta's native format, one head at a time."""
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
class PermuteRotary:
    """Mistral/Meta interleaved rotary pairs to Hugging Face's half-split rows, per head of
    ``rows / heads`` rows (see :func:`rotary_row_order`)."""

    heads: int
    label: ClassVar[str] = "permute"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return inputs[0].dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("a permutation is not elementwise")  # the interpreter never asks

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        from tensorsurgery.io.scratch import scratch  # the kernels need numpy, which planning does not import
        from tensorsurgery.ops.transforms import permute_head

        source, reader = inputs[0], readers[0]
        length = source.range.length
        row_bytes = length // source.shape[0]
        step = row_bytes * (source.shape[0] // self.heads)  # one head
        buf = scratch(step)[0]
        for start in range(0, length, step):
            n = min(step, length - start)
            reader.read_into(buf.data[:n], source.range.offset + start)
            yield permute_head(buf[:n], row_bytes)


def rotary_row_order(rows: int, heads: int) -> tuple[int, ...]:
    """Source row of each output row when converting Mistral/Meta interleaved rotary pairs to
    Hugging Face's half-split layout (transformers' ``permute`` in its conversion scripts):
    within each head, even rows first, then odd rows.

    Raises:
        ValueError: rows do not split into ``heads`` heads of even size.
    """
    if heads <= 0 or rows % heads or (rows // heads) % 2:
        raise ValueError(f"{rows} rows do not split into {heads} heads of an even size")
    d = rows // heads
    return tuple(h * d + 2 * i + j for h in range(heads) for j in (0, 1) for i in range(d // 2))

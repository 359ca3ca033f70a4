"""``dequant``: an FP8 block-quantized weight and its scales made plain floats, as DeepSeek-V3's
``weight_dequant`` makes them (:mod:`tensorsurgery.ops.fp8`), whole block-rows at a time."""
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
class DequantFP8:
    """Inputs: an ``F8_E4M3`` weight ``[rows, cols]`` and its scale ``[ceil(rows / block_rows),
    ceil(cols / block_cols)]`` (float32, or a 16-bit float widened to it); values of ``dtype``
    (BF16, F16 or F32): each element times its block's scale in float32, rounded once to
    ``dtype``, partial blocks at the right and bottom edges."""

    block_rows: int
    block_cols: int
    dtype: str
    label: ClassVar[str] = "dequant"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    #: Output row ``i`` depends on weight row ``i`` and scale row ``i // block_rows`` only
    #: (:meth:`rows_into`): the writer makes row ranges on its threads.
    rowwise: ClassVar[bool] = True
    dequantizes: ClassVar[bool] = True

    def quantization(self) -> str:
        return f"FP8 in {self.block_rows}x{self.block_cols} blocks"

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype  # made in the output dtype directly: one rounding, no cast stage after

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("a dequantization is not elementwise")  # the interpreter never asks

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        from tensorsurgery.formats.dtypes import element_size
        from tensorsurgery.io.scratch import scratch

        rows, cols = inputs[0].shape
        step = max(chunk // max(cols, 1), 1)  # rows of at most ``chunk`` weight bytes (one at least)
        size = element_size(self.dtype)
        out = scratch(-(-step * cols * size // 2), slot=1)[1]
        for start in range(0, rows, step):
            n = min(step, rows - start)
            yield self.rows_into(inputs, readers, start, n, out[:n * cols * size])

    def rows_into(self, inputs: Sequence[Input], readers: Sequence[Reader], start: int, n: int,
                  out: np.ndarray) -> np.ndarray:
        """Output rows ``start..start+n-1`` made into ``out`` (uint8, their size), block-row by
        block-row (each part its block-row's scales); returns ``out``. Any row range can be made
        on its own, so the writer spreads them over its threads (``rowwise``)."""
        import numpy as np  # not imported by planning (see tensorsurgery.ops)

        from tensorsurgery.formats.dtypes import element_size
        from tensorsurgery.io.scratch import scratch
        from tensorsurgery.ops.fp8 import column_bases, dequant_block_row
        from tensorsurgery.ops.transforms import cast_chunk

        weight, scale = inputs
        cols = weight.shape[1]
        bases = column_bases(cols, self.block_cols)
        scale_row = scale.shape[1] * element_size(scale.dtype)
        out_row = cols * element_size(self.dtype)
        done = 0
        while done < n:
            row = start + done
            block = row // self.block_rows
            m = min(n - done, (block + 1) * self.block_rows - row)  # the rest of this block-row
            raw = scratch(m * cols, slot=0)[0]
            readers[0].read_into(raw.data, weight.range.offset + row * cols)
            scale_raw = scratch(scale_row, slot=2)[0]
            readers[1].read_into(scale_raw.data, scale.range.offset + block * scale_row)
            scales = cast_chunk(scale_raw, scale.dtype, "F32").view(np.float32)
            work = scratch(m * cols * bases.itemsize, slot=3)[0]
            dequant_block_row(raw, scales, bases, self.dtype, out[done * out_row:(done + m) * out_row], work)
            done += m
        return out

"""``dequant-mxfp4``: GPT-OSS's MXFP4 experts made plain floats, as transformers dequantizes them
(:mod:`tensorsurgery.ops.mxfp4`), one expert's groups at a time."""
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
class DequantMXFP4:
    """Inputs: ``<P>_blocks`` (U8 ``[E, R, G, 16]``) and ``<P>_scales`` (U8 ``[E, R, G]``);
    values of ``dtype`` (BF16, F16 or F32), ``[E, G * 32, R]``: the experts transposed to
    transformers' ``[E, in, out]``. Memory: one expert's packed bytes (GPT-OSS: 8.3 MB) and a
    chunk of output rows."""

    dtype: str
    label: ClassVar[str] = "dequant-mxfp4"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    dequantizes: ClassVar[bool] = True

    def quantization(self) -> str:
        return "MXFP4"

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype  # made in the output dtype directly: one rounding, no cast stage after

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("a dequantization is not elementwise")  # the interpreter never asks

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        from tensorsurgery.formats.dtypes import element_size
        from tensorsurgery.io.scratch import scratch
        from tensorsurgery.ops.mxfp4 import dequant_groups, work_size

        blocks, scales = inputs
        experts, rows, groups, _ = blocks.shape
        size = element_size(self.dtype)
        step = max(chunk // (rows * 32 * size), 1)  # groups per chunk: about ``chunk`` output bytes
        out = scratch(-(-step * 32 * rows * size // 2), slot=1)[1]
        work = scratch(work_size(rows, step, self.dtype), slot=3)[0]
        for e in range(experts):
            packed = scratch(rows * groups * 16, slot=0)[0]
            readers[0].read_into(packed.data, blocks.range.offset + e * packed.size)
            exps = scratch(rows * groups, slot=2)[0]
            readers[1].read_into(exps.data, scales.range.offset + e * exps.size)
            packed3, exps2 = packed.reshape(rows, groups, 16), exps.reshape(rows, groups)
            for g in range(0, groups, step):
                yield dequant_groups(packed3[:, g:g + step], exps2[:, g:g + step], self.dtype, out, work)

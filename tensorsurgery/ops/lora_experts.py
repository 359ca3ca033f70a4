"""``lora_experts``: a 3-D expert weight ``[experts, rows, cols]`` with a LoRA on the parameter
merged into it, as peft's ``ParamWrapper`` (``target_parameters``) merges it.

peft saves one pair of factors for all the experts, the rank of each expert side by side:
``A`` ``[experts * r, in]`` (expert ``e``'s rank ``k`` is row ``e * r + k``) and ``B``
``[out, r * experts]`` (the same rank is column ``k * experts + e``: peft reshapes the two
differently). Expert ``e``'s delta is ``B_e @ A_e`` (``[out, in]`` is ``[rows, cols]``) or, when
the model stores its experts ``[experts, in, out]`` (transformers' ``is_transposed``: GPT-OSS), its
transpose. Its arithmetic is :class:`~tensorsurgery.ops.lora.LoraMerge`'s with ``round_delta``
(peft's ``get_delta_weight`` casts the scaled product to the weight's dtype before the add),
each expert's product the same rank-order chain of fused multiply-adds as torch's ``einsum``
(measured bit for bit, tests/test_adapter_experts.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, ContextManager, Iterator, Sequence

from tensorsurgery.ops.base import register
from tensorsurgery.ops.lora import LoraMerge, _f32, _read, shared_factor

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input


@register
@dataclass(frozen=True, slots=True)
class LoraExperts(LoraMerge):
    """Inputs: the weight ``W``, ``lora_A``, ``lora_B`` of a parameter ``[experts, expert_rows,
    cols]``. Not ``transposed``: ``A`` ``[experts * r, cols]``, ``B`` ``[expert_rows, r * experts]``;
    ``transposed``: ``A`` ``[experts * r, expert_rows]``, ``B`` ``[cols, r * experts]``. ``W`` is
    that parameter (``[experts, expert_rows, cols]``, ``row0`` 0), or the rows of it from row
    ``row0`` on (its rows seen as ``experts * expert_rows``): one expert's piece, as checkpoints
    that store each expert apart hold it (``experts.3.up_proj.weight`` is expert 3's second half
    of ``gate_up_proj``). A block of output rows never straddles two experts."""

    experts: int = 1
    expert_rows: int = 1
    row0: int = 0
    label: ClassVar[str] = "lora_experts"

    def _rank(self, inputs: Sequence[Input]) -> int:
        return inputs[1].shape[0] // self.experts

    def _factor(self, inputs: Sequence[Input], readers: Sequence[Reader], start: int) -> ContextManager[np.ndarray]:
        """Not transposed: the expert's own ``A_e`` (``[r, cols]``, rows ``e * r..`` of ``A``:
        contiguous); transposed: the whole ``B`` (``[cols, r * experts]``: its expert's ranks are
        every ``experts``-th column), in float32."""
        if self.transposed:
            return LoraMerge._factor(self, inputs, readers, start)
        r, cols = self._rank(inputs), inputs[1].shape[1]
        e = (self.row0 + start) // self.expert_rows
        return shared_factor(inputs[1], readers[1], e * r * cols, (r, cols))

    def _expert(self, rows: int, row: int) -> tuple[int, int]:
        """The output rows ``a..b-1`` of the expert output row ``row`` is in."""
        v = self.row0 + row
        first = v - v % self.expert_rows - self.row0
        return max(0, first), min(rows, first + self.expert_rows)

    def _spans(self, rows: int, start: int, n: int) -> Iterator[tuple[int, int]]:
        for first, m in LoraMerge._spans(self, rows, start, n):
            while m:  # cut where an expert ends
                k = min(m, self._expert(rows, first)[1] - first)
                yield first, k
                first, m = first + k, m - k

    def _window(self, rows: int, start: int, n: int) -> tuple[int, int]:
        a, b = self._expert(rows, start)  # the window stays in the expert
        lo, hi = LoraMerge._window(self, b - a, start - a, n)
        return a + lo, a + hi

    def _operands(self, inputs: Sequence[Input], readers: Sequence[Reader], factor: np.ndarray, lo: int, hi: int,
                  c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`LoraMerge._operands`, of output rows ``lo..hi-1`` of one expert and that
        expert's factors: ``B_e[i0:i1] @ A_e[:, c0:c1]`` (``B_e``'s rank ``k`` is ``B``'s column
        ``k * experts + e``), transposed ``(B_e[c0:c1] @ A_e[:, i0:i1])^T``."""
        import numpy as np

        from tensorsurgery.io.scratch import scratch

        a, b = inputs[1], inputs[2]
        experts, r = self.experts, self._rank(inputs)
        e, i0 = divmod(self.row0 + lo, self.expert_rows)  # the expert and its rows i0..i1-1
        i1 = i0 + hi - lo
        if not self.transposed:
            rows_b = _f32(_read(readers[2], b, i0 * r * experts, (i1 - i0) * r * experts, slot=12), b.dtype, slot=19)
            return rows_b.reshape(i1 - i0, r, experts)[:, :, e], factor[:, c0:c1]
        fa = scratch(r * (i1 - i0) * 4, slot=21)[0].view(np.float32).reshape(r, i1 - i0)
        for k in range(r):
            fa[k] = _f32(_read(readers[1], a, (e * r + k) * a.shape[1] + i0, i1 - i0, slot=10), a.dtype, slot=11)
        return factor[c0:c1, e::experts], fa

"""``ram`` and ``ramplus_tl``: Reinforced Agent Merging (arXiv 2601.13572) as mergekit 0.1.5
makes it. Each model's difference from the base counts where its magnitude exceeds ``epsilon``;
an element changed by one model alone takes that model's difference, one changed by several the
mean of theirs. ``ramplus_tl`` scales the unique differences of each model by ``1 + r *
clamp(shared / unique, 0, alpha)``, ``shared`` and ``unique`` that model's counts of elements it
changes together with others or alone over the whole tensor: a statistic of the whole tensor, so
it is two-pass (:class:`~tensorsurgery.ops.TwoPassOperation`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator, Sequence

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.base import register

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input


def _changed(tvs: list[np.ndarray], epsilon: float, md: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Where each task vector's magnitude exceeds ``epsilon`` (torch compares in the merge dtype:
    ``epsilon`` rounded to it; a NaN is not changed), and how many models change each element."""
    import numpy as np

    from tensorsurgery.ops.arith import rounded_scalars

    floor = rounded_scalars([epsilon], md)[0]
    changed = [np.abs(tv) > floor for tv in tvs]
    counts = np.zeros(tvs[0].size, np.int64)
    for c in changed:
        counts += c
    return changed, counts


def _mix(raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int, epsilon: float, md: str, count: int,
         scales: tuple[float, ...] | None) -> np.ndarray:
    """RAM's values of the elements from ``start`` of a tensor of ``count``: without ``scales``
    (``ram``) every step rounded to the merge dtype; with them (``ramplus_tl``'s float32 factors)
    the unique terms are float32 products, and torch promotes the rest of the sum to float32."""
    import numpy as np

    from tensorsurgery.ops.arith import blockwise_at, encoded, rounded
    from tensorsurgery.ops.sparsify import deltas
    from tensorsurgery.ops.torch_sums import model_sum

    f32 = np.float32
    wide = "F32" if scales is not None else md  # the dtype of the terms summed

    def compute(block: list[np.ndarray], first: int) -> np.ndarray:
        base, tvs = deltas(block, inputs, md)
        changed, counts = _changed(tvs, epsilon, md)
        unique, overlap = (counts == 1).astype(f32), (counts > 1).astype(f32)
        divisor = np.maximum(counts, 1).astype(f32)
        terms = []
        for m, (tv, c) in enumerate(zip(tvs, changed)):
            z = tv * c.astype(f32)  # as torch multiplies by the mask: -x * 0 is -0, a NaN stays
            shared = rounded(rounded(z * overlap, md) / divisor, md)
            alone = z * unique if scales is None else (z * unique) * f32(scales[m])
            terms.append(rounded(alone + shared, wide))
        merged = rounded(model_sum(terms, first, count, 8 if wide == "F32" else 16), wide)
        return encoded(rounded(base + merged, wide), wide)

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
        return blockwise_at(raws, [element_size(i.dtype) for i in inputs], element_size(wide), start, compute)


@register
@dataclass(frozen=True, slots=True)
class Ram:
    """``base + sum(unique tv_i + shared tv_i / count)``; the first input is the base; an element
    of a model's task vector counts when its magnitude is above ``epsilon``; as torch computes it
    in the merge ``dtype``, the sum over the models in torch's order."""

    epsilon: float
    dtype: str
    label: ClassVar[str] = "ram"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        count = inputs[0].range.length // element_size(inputs[0].dtype)
        return _mix(raws, inputs, start, self.epsilon, self.dtype, count, None)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("ram is elementwise")  # the interpreter never asks


@register
@dataclass(frozen=True, slots=True)
class RamPlus:
    """``ramplus_tl``: :class:`Ram` with each model's unique differences scaled by ``1 + r *
    clamp(shared / max(unique, epsilon), 0, alpha)`` (float32, as torch promotes the counts), its
    counts over the whole tensor. The float32 factors promote the sum: the values are float32
    (mergekit writes them so unless ``out_dtype`` says otherwise)."""

    r: float
    alpha: float
    epsilon: float
    dtype: str
    label: ClassVar[str] = "ramplus_tl"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    two_pass: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return "F32"

    def prepare(self, inputs: Sequence[Input], readers: Sequence[Reader]) -> RamPlusMix:
        import numpy as np

        from tensorsurgery.ops.blocks import input_blocks
        from tensorsurgery.ops.sparsify import deltas

        k = len(inputs) - 1
        shared, unique = np.zeros(k, np.int64), np.zeros(k, np.int64)
        f32 = np.float32
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
            for _, raws in input_blocks(inputs, readers):
                changed, counts = _changed(deltas(raws, inputs, self.dtype)[1], self.epsilon, self.dtype)
                for m, c in enumerate(changed):
                    shared[m] += int(np.count_nonzero(c & (counts > 1)))
                    unique[m] += int(np.count_nonzero(c & (counts == 1)))
            # torch: int64 counts clamped by a Python float are float32 tensors
            rho = shared.astype(f32) / np.maximum(unique.astype(f32), f32(self.epsilon))
            scales = f32(1) + f32(self.r) * np.minimum(np.maximum(rho, f32(0)), f32(self.alpha))
        count = inputs[0].range.length // element_size(inputs[0].dtype)
        return RamPlusMix(tuple(float(s) for s in scales), self.epsilon, count, self.dtype)

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("ramplus_tl is two-pass: the interpreter applies what prepare returns")

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("ramplus_tl is two-pass")  # the interpreter never asks


@dataclass(frozen=True, slots=True)
class RamPlusMix:
    """ramplus_tl's values once each model's float32 ``scales`` are known, for a tensor of
    ``count`` elements."""

    scales: tuple[float, ...]
    epsilon: float
    count: int
    dtype: str
    label: ClassVar[str] = "ramplus_tl"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return "F32"

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        return _mix(raws, inputs, start, self.epsilon, self.dtype, self.count, self.scales)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("ramplus_tl's mix is elementwise")  # the interpreter never asks

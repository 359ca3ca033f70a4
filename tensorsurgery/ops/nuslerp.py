"""``nuslerp``: mergekit's spherical interpolation between two models (or their differences from a
base), at ``t`` from their weights, with the angle taken over the whole tensors (flattened, the
default) or per row or per column: statistics of whole groups of elements, so the operation is
two-pass (:class:`~tensorsurgery.ops.TwoPassOperation`); its values are then elementwise."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Iterator, Sequence

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.base import register

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input
    from tensorsurgery.ops.groups import Groups

#: mergekit's: a norm is clamped below to this before it divides (the unit vectors), and a pair is
#: colinear where ``1 - cos^2 <= COLINEAR`` (its ``eps ** 2``), both in the merge dtype.
NORM_FLOOR = 1e-7
COLINEAR = 1e-8 ** 2


@register
@dataclass(frozen=True, slots=True)
class Nuslerp:
    """``(sin((1 - t) theta) v0 + sin(t theta) v1) / sin theta`` of the two models' tensors ``v0``
    and ``v1`` (with a ``base``, the first input: their differences from it, and the base added
    back), ``cos theta`` the dot of their unit vectors; ``(1 - t) v0 + t v1`` where the two are
    colinear. The angle is one for the whole tensor (``flatten``), else one per row (a norm and
    dot over the last dimension) or, ``row_wise``, per column (over the first dimension), as
    mergekit's ``nuslerp`` takes them. Every step is rounded to the merge ``dtype`` as torch does;
    the sums over a group are float64 over fixed blocks (mergekit's: float32 on torch's threads),
    rounded once to float32 then to the merge dtype: two passes, as the dots are of the rounded
    unit vectors, which need the norms first."""

    t: float
    row_wise: bool
    flatten: bool
    base: bool
    dtype: str
    label: ClassVar[str] = "nuslerp"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    two_pass: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def prepare(self, inputs: Sequence[Input], readers: Sequence[Reader]) -> NuslerpMix:
        import numpy as np

        from tensorsurgery.ops.arith import rounded, rounded_scalars
        from tensorsurgery.ops.blocks import input_blocks
        from tensorsurgery.ops.groups import Groups

        md, groups = self.dtype, Groups.of(inputs[0].shape, self.flatten, self.row_wise)
        squares = np.zeros((2, groups.count))
        for start, raws in input_blocks(inputs, readers):
            for v, acc in zip(vectors(raws, inputs, self.base, md), squares):
                v64 = v.astype(np.float64)
                groups.add(v64 * v64, start, acc)
        with np.errstate(over="ignore", invalid="ignore"):
            norms = rounded(np.sqrt(squares).astype(np.float32).ravel(), md).reshape(2, -1)  # torch.norm
            norms = np.maximum(norms, rounded_scalars([NORM_FLOOR], md)[0])  # .clamp(min=eps)
        dots = np.zeros(groups.count)
        for start, raws in input_blocks(inputs, readers):
            g = groups.index(start, raws[0].size // element_size(inputs[0].dtype)) if groups.count > 1 else 0
            v0, v1 = vectors(raws, inputs, self.base, md)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                u0, u1 = rounded(v0 / norms[0][g], md), rounded(v1 / norms[1][g], md)
                groups.add(rounded(u0 * u1, md).astype(np.float64), start, dots)
        return NuslerpMix(*angles(self.t, dots, md), base=self.base, dtype=md, groups=groups)

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("nuslerp is two-pass: the interpreter applies what prepare returns")

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("nuslerp is two-pass")  # the interpreter never asks


def vectors(raws: Sequence[np.ndarray], inputs: Sequence[Input], base: bool, md: str) -> list[np.ndarray]:
    """The two vectors nuslerp interpolates, as merge-dtype values: the models' elements, or with a
    ``base`` (the first input) their differences from it (rounded, as torch subtracts)."""
    import numpy as np

    from tensorsurgery.ops.arith import rounded, values

    xs = [values(raw, i.dtype, md) for raw, i in zip(raws, inputs)]
    if not base:
        return xs
    with np.errstate(over="ignore", invalid="ignore"):
        return [rounded(x - xs[0], md) for x in xs[1:]]


def angles(t: float, dots: np.ndarray, md: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Per group, from the float64 sums of the unit vectors' products: ``(sin((1 - t) theta),
    sin(t theta), sin theta, colinear)``, and ``t``; each step in the merge dtype as mergekit's
    torch code (the scalars ``1 - t`` and ``t`` float32, as torch takes a Python number; ``acos``
    and ``sin`` correctly rounded to float32, then to the merge dtype)."""
    import numpy as np

    from tensorsurgery.ops.arith import rounded, rounded_scalars

    def fn(f: np.ufunc, x: np.ndarray) -> np.ndarray:
        return rounded(f(x.astype(np.float64)).astype(np.float32), md)

    with np.errstate(over="ignore", invalid="ignore"):
        cos = np.clip(rounded(dots.astype(np.float32), md), np.float32(-1), np.float32(1))
        colinear = rounded(np.float32(1) - rounded(cos * cos, md), md) <= rounded_scalars([COLINEAR], md)[0]
        theta = fn(np.arccos, np.where(colinear, np.float32(0), cos))
        one_minus_t, t32 = np.float32(1 - t), np.float32(t)
        return (fn(np.sin, rounded(one_minus_t * theta, md)), fn(np.sin, rounded(t32 * theta, md)),
                fn(np.sin, theta), colinear, t)


@dataclass(frozen=True, slots=True, eq=False)
class NuslerpMix:
    """nuslerp's values once each group's angle is known (``sin_a = sin((1 - t) theta)``, ``sin_b
    = sin(t theta)``, ``sin_theta``, ``colinear``: one value per group), each product, sum and
    quotient rounded to the merge ``dtype``."""

    sin_a: np.ndarray
    sin_b: np.ndarray
    sin_theta: np.ndarray
    colinear: np.ndarray
    t: float
    base: bool
    dtype: str
    groups: Groups = field(repr=False)
    label: ClassVar[str] = "nuslerp"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np

        from tensorsurgery.ops.arith import blockwise_at, encoded, rounded, values

        md = self.dtype
        one_minus_t, t = np.float32(1 - self.t), np.float32(self.t)

        def compute(block: list[np.ndarray], first: int) -> np.ndarray:
            v0, v1 = vectors(block, inputs, self.base, md)
            g = self.groups.index(first, v0.size) if self.groups.count > 1 else 0
            colinear = self.colinear[g]
            out = rounded(rounded(self.sin_a[g] * v0, md) + rounded(self.sin_b[g] * v1, md), md)
            out = rounded(out / self.sin_theta[g], md)
            if np.any(colinear):  # torch.where(colinear, lerp, slerp)
                lerp = rounded(rounded(one_minus_t * v0, md) + rounded(t * v1, md), md)
                out = np.where(colinear, lerp, out)
            if self.base:
                out = rounded(values(block[0], inputs[0].dtype, md) + out, md)
            return encoded(out, md)

        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
            return blockwise_at(raws, [element_size(i.dtype) for i in inputs], element_size(md), start, compute)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("nuslerp's mix is elementwise")  # the interpreter never asks

"""``multislerp``: mergekit's barycentric interpolation of any number of models (or of their
differences from a base) on the hypersphere. Each tensor, flattened to one vector, is divided by
its norm; the unit vectors' weighted mean, normalized, is where they are projected to the tangent
space, averaged there and mapped back, then scaled by the weighted mean of the norms. Each step
needs a sum over the whole tensors of what the previous one rounds to (the norms, the mean's norm,
the dots with the normalized mean, the tangent average's norm), so the operation is two-pass
(:class:`~tensorsurgery.ops.TwoPassOperation`): one statistics pass for the norms and the Gram
matrix of the vectors, one for the other three sums (the later ones made from what the Gram matrix
says the earlier ones round to, checked: a wrong guess costs a pass, never a byte), then the values."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Iterator, Sequence, cast

from tensorsurgery.errors import PlanError
from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.base import register

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input


@register
@dataclass(frozen=True, slots=True)
class Multislerp:
    """mergekit's ``multislerp`` of the models' tensors ``x_i`` (with a ``base``, the first input:
    their differences from it, and the base added back) with ``weights`` (divided by their sum when
    ``normalize``): ``u_i = x_i / (|x_i| + eps)``, ``m = sum w_i u_i``, ``n = m / |m|``, ``d_i =
    u_i . n``, ``g = sum w_i (u_i - d_i n)``, ``r = |g| + eps``, the result ``(n cos r + g sin r /
    r) * sum w_i |x_i|``; one model alone is itself, and two whose ``|m| < eps`` are interpolated
    linearly. Every step is rounded to the merge ``dtype`` as torch does; each sum over the tensor
    is float64 over fixed blocks of what the previous sums round to, rounded once to float32 then
    to the dtype (mergekit's are torch's reductions). The tangent average ``g`` is rounding noise
    (zero in exact arithmetic: the weighted tangent vectors at their own weighted mean cancel), and
    mergekit adds it in, so it is made element by element as mergekit makes it, not from the Gram
    matrix."""

    weights: tuple[float, ...]
    normalize: bool
    eps: float
    base: bool
    dtype: str
    label: ClassVar[str] = "multislerp"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    two_pass: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def prepare(self, inputs: Sequence[Input], readers: Sequence[Reader]) -> MultislerpMix:
        import numpy as np

        from tensorsurgery.ops.arith import rounded

        md, k = self.dtype, len(self.weights)
        mix = MultislerpMix(_weights(self.weights, self.normalize, md), self.base, md)
        if k == 1:
            return mix
        eps = np.float32(self.eps)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            gram = _gram(_sums(inputs, readers, lambda b: _products(mix.vectors(b, inputs))), k)
            norms = [_one(math.sqrt(gram[i, i]), md) for i in range(k)]
            mix = replace(mix, divisors=tuple(float(_one(n + eps, md)) for n in norms))
            found = self._statistics(mix, inputs, readers, gram)
            if isinstance(found, str):
                return replace(mix, linear=True)
            mix, tangent = found
            cos, sin = _one(math.cos(float(tangent)), md), _one(math.sin(float(tangent)), md)
            scale = _one(_sum32(rounded(np.asarray(norms, np.float32) * np.asarray(mix.w, np.float32), md)), md)
        return replace(mix, cos=float(cos), ratio=float(_one(sin / tangent, md)), scale=float(scale))

    def _statistics(self, mix: MultislerpMix, inputs: Sequence[Input], readers: Sequence[Reader],
                    gram: np.ndarray) -> tuple[MultislerpMix, np.float32] | str:
        """``mix`` with the mean's norm and the dots known, and the tangent average's norm (``r``),
        or ``"linear"`` (two models whose mean is zero). Each needs the one before it, so a pass
        that makes the mean's norm also makes the dots and the tangent norm from the values the
        Gram matrix of the vectors says they round to (16-bit dtypes: almost always the same):
        where a guess proves wrong, another pass makes what came after it from the right value.
        The bytes are the sequential passes' either way; only the number of passes changes."""
        import numpy as np

        from tensorsurgery.ops.arith import rounded_scalars

        md, k = self.dtype, len(self.weights)
        guess = md != "F32"  # float32 sums seldom round alike: a guess would only cost passes
        mean_norm: float | None = None
        dots: tuple[float, ...] | None = None
        while True:
            m_use = mean_norm if mean_norm is not None else _guess_mean_norm(mix, gram) if guess else None
            d_use = dots if dots is not None else \
                _guess_dots(mix, gram, m_use) if guess and m_use is not None else None
            trial = replace(mix, mean_norm=1.0 if m_use is None else m_use, dots=d_use or ())
            want_mean, want_dots, want_tangent = mean_norm is None, m_use is not None and dots is None, \
                d_use is not None
            sums = _sums(inputs, readers, _terms(trial, inputs, want_mean, want_dots, want_tangent))
            if want_mean:
                mean_norm = float(_one(math.sqrt(sums.pop(0)), md))
                if mean_norm < rounded_scalars([self.eps], md)[0]:  # mergekit: mean_norm < eps
                    if k == 2:
                        return "linear"
                    raise PlanError(f"tensor {inputs[0].key!r}: multislerp: the weighted sum of the models' unit "
                                    f"vectors is zero (antipodal models whose weights balance out); mergekit fails "
                                    f"here too: change the weights")
                if m_use != mean_norm:  # the rest of this pass assumed another mean norm
                    continue
            if want_dots:
                dots = tuple(float(_one(d, md)) for d in sums[:k])
                sums = sums[k:]
                if d_use != dots:
                    continue
            if want_tangent:
                assert mean_norm is not None and dots is not None
                return replace(mix, mean_norm=mean_norm, dots=dots), \
                    _one(_one(math.sqrt(sums[0]), md) + np.float32(self.eps), md)

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("multislerp is two-pass: the interpreter applies what prepare returns")

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("multislerp is two-pass")  # the interpreter never asks


def _weights(weights: tuple[float, ...], normalize: bool, md: str) -> tuple[float, ...]:
    """The weights as mergekit's tensor of them in the merge dtype, divided by their sum (a float32
    sum rounded to the dtype) when ``normalize``."""
    import numpy as np

    from tensorsurgery.ops.arith import rounded, rounded_scalars

    w = rounded_scalars(weights, md)
    if normalize:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            total = rounded(np.asarray([_sum32(w)]), md)[0]
            w = rounded(w / total, md)
    return tuple(float(x) for x in w)


def _terms(mix: MultislerpMix, inputs: Sequence[Input], mean: bool, dots: bool,
           tangent: bool) -> Callable[[list[np.ndarray]], Iterator[np.ndarray]]:
    """What a statistics pass sums, from a block's raw inputs: the squares of the mean (``mean``),
    each ``u_i * n`` (``dots``), the squares of the tangent average (``tangent``), one at a time."""
    def terms(raws: list[np.ndarray]) -> Iterator[np.ndarray]:
        units = mix.units(raws, inputs)
        m = mix.mean(units)
        if mean:
            yield _squares(m)
        if dots or tangent:
            n = mix.normalized(m)
            if dots:
                yield from mix.dot_terms(units, n)
            if tangent:
                yield _squares(mix.tangent(units, n))
    return terms


def _one(x: float | np.floating, md: str) -> np.float32:
    """A float32 scalar result (from a float64 value) rounded to the merge dtype."""
    import numpy as np

    from tensorsurgery.ops.arith import rounded

    return cast("np.float32", rounded(np.asarray([x], np.float64).astype(np.float32), md)[0])


def _products(xs: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    """Each ``x_i * x_j`` (``i <= j``, row by row) in float64: the terms of the Gram matrix, one
    at a time (``k (k + 1) / 2`` of them: made all at once, the largest part of a merge's memory)."""
    import numpy as np

    for i in range(len(xs)):
        for j in range(i, len(xs)):
            yield np.multiply(xs[i], xs[j], dtype=np.float64)  # widened on the way: no float64 copies


def _gram(sums: Sequence[float], k: int) -> np.ndarray:
    """The symmetric ``k x k`` matrix of :func:`_products`' sums."""
    import numpy as np

    gram = np.zeros((k, k))
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    for (i, j), s in zip(pairs, sums):
        gram[i, j] = gram[j, i] = s
    return gram


def _guess_mean_norm(mix: MultislerpMix, gram: np.ndarray) -> float:
    """What the mean's norm rounds to, from the Gram matrix: ``|sum w_i x_i / D_i|``."""
    import numpy as np

    p = gram / np.outer(mix.divisors, mix.divisors)
    w = np.asarray(mix.w)
    return float(_one(math.sqrt(max(float(w @ p @ w), 0.0)), mix.dtype))


def _guess_dots(mix: MultislerpMix, gram: np.ndarray, mean_norm: float) -> tuple[float, ...]:
    """What the dots with the normalized mean round to, from the Gram matrix."""
    import numpy as np

    p = gram / np.outer(mix.divisors, mix.divisors)
    return tuple(float(_one(d / mean_norm, mix.dtype)) for d in p @ np.asarray(mix.w))


def _squares(x: np.ndarray) -> np.ndarray:
    """``x * x`` in float64 (exact for float32 values), widened on the way (no float64 copy)."""
    import numpy as np

    return cast("np.ndarray", np.multiply(x, x, dtype=np.float64))


def _sum32(xs: np.ndarray) -> np.float32:
    """A float32 sum left to right (torch's of a few values)."""
    import numpy as np

    total = np.float32(0)
    for x in xs:
        total = np.float32(total + x)
    return total


def _sums(inputs: Sequence[Input], readers: Sequence[Reader],
          terms: Callable[[list[np.ndarray]], Iterable[np.ndarray]]) -> list[float]:
    """The sums over the whole tensors of each array ``terms`` makes of a block's raw inputs:
    float64, numpy's pairwise sum in each fixed block and an exact sum of the blocks' (the same
    order every run). Each array is summed and let go before the next is made."""
    import numpy as np

    from tensorsurgery.ops.blocks import input_blocks

    parts: list[list[float]] = []
    for _, raws in input_blocks(inputs, readers):
        for i, term in enumerate(terms(raws)):
            if i == len(parts):
                parts.append([])
            parts[i].append(float(np.sum(np.asarray(term, np.float64))))
    return [math.fsum(p) for p in parts]


@dataclass(frozen=True, slots=True)
class MultislerpMix:
    """multislerp's values once its statistics are known (each a merge-dtype value): ``w`` the
    weights, ``divisors`` each ``|x_i| + eps``, ``mean_norm``, ``dots`` each ``u_i . n``, then
    ``cos`` and ``ratio`` (``cos r`` and ``sin r / r``) and ``scale`` (``sum w_i |x_i|``); with
    one weight, the model itself; ``linear``: ``w_0 x_0 + w_1 x_1``. Each step is rounded to the
    merge ``dtype``; the sums over the models are float32, rounded once (torch's ``sum(0)``)."""

    w: tuple[float, ...]
    base: bool
    dtype: str
    divisors: tuple[float, ...] = ()
    mean_norm: float = 1.0
    dots: tuple[float, ...] = ()
    cos: float = 1.0
    ratio: float = 1.0
    scale: float = 1.0
    linear: bool = False
    label: ClassVar[str] = "multislerp"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def vectors(self, raws: Sequence[np.ndarray], inputs: Sequence[Input]) -> list[np.ndarray]:
        """The models' values, or their differences from the base (rounded), as float32."""
        from tensorsurgery.ops.arith import rounded, values

        xs = [values(raw, i.dtype, self.dtype) for raw, i in zip(raws, inputs)]
        return [rounded(x - xs[0], self.dtype) for x in xs[1:]] if self.base else xs

    def units(self, raws: Sequence[np.ndarray], inputs: Sequence[Input]) -> list[np.ndarray]:
        """``x_i / (|x_i| + eps)``."""
        import numpy as np

        from tensorsurgery.ops.arith import rounded

        return [rounded(x / np.float32(d), self.dtype) for x, d in zip(self.vectors(raws, inputs), self.divisors)]

    def _weighted_sum(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        import numpy as np

        from tensorsurgery.ops.arith import rounded

        total = rounded(xs[0] * np.float32(self.w[0]), self.dtype)
        for x, w in zip(xs[1:], self.w[1:]):
            total = total + rounded(x * np.float32(w), self.dtype)
        return rounded(total, self.dtype)

    def mean(self, units: Sequence[np.ndarray]) -> np.ndarray:
        """``m = sum w_i u_i``."""
        return self._weighted_sum(units)

    def normalized(self, mean: np.ndarray) -> np.ndarray:
        """``n = m / |m|``."""
        import numpy as np

        from tensorsurgery.ops.arith import rounded

        return rounded(mean / np.float32(self.mean_norm), self.dtype)

    def dot_terms(self, units: Sequence[np.ndarray], n: np.ndarray) -> list[np.ndarray]:
        """Each ``u_i * n``, whose sums are the dots."""
        from tensorsurgery.ops.arith import rounded

        return [rounded(u * n, self.dtype) for u in units]

    def tangent(self, units: Sequence[np.ndarray], n: np.ndarray) -> np.ndarray:
        """``g = sum w_i (u_i - d_i n)``."""
        import numpy as np

        from tensorsurgery.ops.arith import rounded

        md = self.dtype
        return self._weighted_sum([rounded(u - rounded(np.float32(d) * n, md), md) for u, d in zip(units, self.dots)])

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np

        from tensorsurgery.ops.arith import blockwise, encoded, rounded, values

        md = self.dtype
        cos, ratio, scale = np.float32(self.cos), np.float32(self.ratio), np.float32(self.scale)

        def compute(block: list[np.ndarray]) -> np.ndarray:
            if len(self.w) == 1:  # mergekit returns the one model's tensor (without the base)
                return encoded(values(block[-1], inputs[-1].dtype, md), md)
            if self.linear:
                out = self._weighted_sum(self.vectors(block, inputs))
            else:
                units = self.units(block, inputs)
                n = self.normalized(self.mean(units))
                out = rounded(rounded(n * cos, md) + rounded(self.tangent(units, n) * ratio, md), md)
                out = rounded(out * scale, md)
            if self.base:
                out = rounded(values(block[0], inputs[0].dtype, md) + out, md)
            return encoded(out, md)

        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
            return blockwise(raws, [element_size(i.dtype) for i in inputs], element_size(md), compute)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("multislerp's mix is elementwise")  # the interpreter never asks

"""``karcher``: mergekit's weighted Karcher (Riemannian) mean of the models on the unit
hypersphere. Each tensor, flattened to one vector, is divided by its norm; the unit vectors' mean,
normalized, is moved towards their Karcher mean by up to ``max_iter`` steps of a gradient descent
on the sphere, each step made of the dots of the mean with every unit vector, the tangent vector
they give and its norm, and the new mean's norm; the result is the last mean times the mean of the
norms.

Every step needs a sum over the whole tensors of what the step before made, so the operation
(:class:`~tensorsurgery.ops.TwoPassOperation`) makes as many statistics passes as the iteration
needs: the norms, the mean's norm, then three per step (the dots, the tangent's norm, the new
mean's norm; a step mergekit skips costs no pass). Each pass re-reads the inputs in fixed blocks;
the mean and the tangent go from one pass to the next in two temporary float32 files (4 bytes an
element each, in ``TMPDIR``), so memory stays bounded and no pass remakes the steps before it.
The values are then elementwise: the final mean remade from the inputs and the steps' scalars."""
from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence, cast

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.base import register

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input

_LIBM = ctypes.CDLL(ctypes.util.find_library("m"))


def _libm(name: str) -> Callable[[float], float]:
    """glibc's float32 function ``name`` (what torch calls on a one-element float tensor)."""
    f = getattr(_LIBM, name)
    f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    return cast(Callable[[float], float], f)


_ACOS, _SIN, _COS = _libm("acosf"), _libm("sinf"), _libm("cosf")


@register
@dataclass(frozen=True, slots=True)
class Karcher:
    """mergekit's ``karcher`` of the models' tensors (all weighted alike) in the merge ``dtype``,
    at most ``max_iter`` steps, ``tol`` the threshold of its norms and angles. Norms are float32
    (``torch.linalg.vector_norm`` of the values widened, in torch's order); the dots are torch's
    (16-bit dtypes: bitwise; float32: exactly rounded, where torch's is MKL's ``sdot``); the
    angle's arccos, sine and cosine glibc's float32 functions, as torch calls them; every
    elementwise step rounded to the dtype as torch rounds it."""

    max_iter: int
    tol: float
    dtype: str
    label: ClassVar[str] = "karcher"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    two_pass: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def prepare(self, inputs: Sequence[Input], readers: Sequence[Reader]) -> KarcherMean:
        import numpy as np

        from tensorsurgery.ops.torch_norms import VectorNorm

        md, k, tol = self.dtype, len(inputs), self.tol
        n = inputs[0].range.length // element_size(inputs[0].dtype)
        mix = KarcherMean(md)
        if k == 1:  # mergekit returns the one tensor
            return mix
        norms = tuple(float(x) for x in _stream(inputs, readers, md, [VectorNorm(n) for _ in inputs],
                                                 lambda _, xs: [(x,) for x in xs]))
        alphas = [1.0 / k] * k
        scale = np.float32(0)
        for a, nm in zip(alphas, norms):  # Python's sum of float32 scalars: from 0, left to right
            scale = np.float32(scale + np.float32(np.float32(a) * np.float32(nm)))
        valid = tuple(i for i, nm in enumerate(norms) if nm > tol)
        if not valid:  # mergekit: the sum of each tensor times 0
            return replace(mix, zero=True, models=k)
        total = sum(alphas[i] for i in valid)
        mix = replace(mix, models=k, norms=norms, valid=valid, alphas=tuple(alphas[i] / total for i in valid),
                      scale=float(scale))
        with _Kept(n) as kept:
            return self._iterate(mix, inputs, readers, kept, n)

    def _iterate(self, mix: KarcherMean, inputs: Sequence[Input], readers: Sequence[Reader], kept: _Kept,
                 n: int) -> KarcherMean:
        """The passes of the iteration, the mean and the tangent kept in ``kept`` from one pass
        to the next (each pass makes one step's part from them, the same values a pass that
        remade every step before would)."""
        import numpy as np

        from tensorsurgery.ops.arith import rounded
        from tensorsurgery.ops.torch_norms import VectorNorm, dot_sum

        md, tol = self.dtype, self.tol

        def norm(make: Callable[[int, list[np.ndarray]], np.ndarray]) -> float:
            return float(_stream(inputs, readers, md, [VectorNorm(n)], lambda start, xs: [(make(start, xs),)])[0])

        def weighted(start: int, xs: list[np.ndarray]) -> np.ndarray:
            return kept.write(0, start, mix.weighted(mix.units(xs)))

        mean_norm = norm(weighted)
        mix = replace(mix, first=mean_norm < tol, mean_norm=mean_norm)
        divisor: float | None = None if mix.first else mean_norm  # what the kept mean is still to be divided by

        def dot_terms(start: int, xs: list[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
            units = mix.units(xs)
            m = units[0] if mix.first and not mix.steps else kept.read(0, start, units[0].size)
            m = m if divisor is None else rounded(m / np.float32(divisor), md)
            kept.write(0, start, m)
            return [(m, u) for u in units]

        for _ in range(self.max_iter):
            dots = _stream(inputs, readers, md, [dot_sum(n, md) for _ in mix.valid], dot_terms)
            divisor = None
            step = _step(mix, dots, tol)
            if all(f is None for f in step.factors):  # no tangent at all: its norm is 0, below tol
                break
            tangent = norm(partial(_kept_tangent, mix, kept, step))
            if tangent < tol:
                break
            step = replace(step, tangent_norm=tangent, cos=float(mix.scalar(_COS(tangent))),
                           sin=float(mix.scalar(_SIN(tangent))))
            unit_norm = norm(partial(_kept_move, mix, kept, step))
            divisor = unit_norm if unit_norm > tol else None
            mix = replace(mix, steps=mix.steps + (replace(step, unit_norm=divisor),))
        return mix

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("karcher is two-pass: the interpreter applies what prepare returns")

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("karcher is two-pass")  # the interpreter never asks


class _Kept:
    """Two float32 vectors of ``n`` elements (the mean, the tangent) in temporary files, a block
    at a time: memory stays bounded, and no pass remakes the steps before it."""

    def __init__(self, n: int):
        self.n = n
        self._files: list[Any] = []

    def __enter__(self) -> _Kept:
        import tempfile

        self._files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
        return self

    def __exit__(self, *_: object) -> None:
        for f in self._files:
            f.close()

    def read(self, which: int, start: int, count: int) -> np.ndarray:
        import numpy as np

        from tensorsurgery.io.fsio import pread_exact

        out = np.empty(count, np.float32)
        pread_exact(self._files[which].fileno(), out.view(np.uint8).data, start * 4)
        return out

    def write(self, which: int, start: int, x: np.ndarray) -> np.ndarray:
        """``x`` (float32) kept at elements ``start..``; returns ``x``."""
        import os

        import numpy as np

        view = np.ascontiguousarray(x, np.float32).view(np.uint8).data
        reader, offset = self._files[which].fileno(), start * 4
        while len(view):
            done = os.pwrite(reader, view, offset)
            view, offset = view[done:], offset + done
        return x


def _kept_tangent(mix: KarcherMean, kept: _Kept, step: KarcherStep, start: int, xs: list[np.ndarray]) -> np.ndarray:
    """A block of ``step``'s tangent, from the kept mean, kept."""
    return kept.write(1, start, mix.tangent(mix.units(xs), kept.read(0, start, xs[0].size), step))


def _kept_move(mix: KarcherMean, kept: _Kept, step: KarcherStep, start: int, xs: list[np.ndarray]) -> np.ndarray:
    """A block of the mean ``step`` moves to (before its normalization), from the kept mean and
    tangent, kept in place of the mean."""
    return kept.write(0, start, mix.moved(kept.read(0, start, xs[0].size), kept.read(1, start, xs[0].size), step))


def _stream(inputs: Sequence[Input], readers: Sequence[Reader], md: str, sums: list[Any],
            terms: Callable[[int, list[np.ndarray]], list[tuple[np.ndarray, ...]]]) -> list[np.float32]:
    """One statistics pass: each of ``sums`` (:mod:`~tensorsurgery.ops.torch_norms`) fed what
    ``terms`` makes of each block (its first element, and the inputs' values in the merge dtype
    as float32)."""
    import numpy as np

    from tensorsurgery.ops.arith import values
    from tensorsurgery.ops.blocks import input_blocks

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for start, raws in input_blocks(inputs, readers):
            xs = [values(raw, i.dtype, md) for raw, i in zip(raws, inputs)]
            for acc, args in zip(sums, terms(start, xs)):
                acc.add(*args)
        return [acc.value() for acc in sums]


def _step(mix: KarcherMean, dots: Sequence[np.float32], tol: float) -> KarcherStep:
    """A step's dots as torch returns them (in the merge dtype, clamped to [-1, 1]) and each unit
    vector's factor ``alpha * theta / sin(theta)`` (None where ``theta < tol``: mergekit skips it)."""
    import numpy as np

    clamped = [min(max(mix.scalar(float(d)), np.float32(-1)), np.float32(1)) for d in dots]
    factors: list[float | None] = []
    for d, a in zip(clamped, mix.alphas):
        theta = mix.scalar(_ACOS(float(d)))
        if float(theta) < tol:
            factors.append(None)
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = mix.scalar(float(np.float32(theta) / mix.scalar(_SIN(float(theta)))))
        factors.append(float(mix.scalar(float(np.float32(a) * ratio))))
    return KarcherStep(tuple(float(d) for d in clamped), tuple(factors))


@dataclass(frozen=True, slots=True)
class KarcherStep:
    """One step of the iteration: the dots of the mean with each unit vector and each one's
    factor (None: skipped), the tangent's float32 norm with its cosine and sine in the merge dtype,
    and the new mean's float32 norm (None: at most ``tol``, mergekit does not divide by it)."""

    dots: tuple[float, ...]
    factors: tuple[float | None, ...]
    tangent_norm: float = 1.0
    cos: float = 1.0
    sin: float = 0.0
    unit_norm: float | None = None


@dataclass(frozen=True, slots=True)
class KarcherMean:
    """karcher's values once its statistics are known: ``norms`` each model's float32 norm,
    ``valid`` the models whose norm is above ``tol`` with their ``alphas`` (normalized Python
    floats), ``mean_norm`` the first mean's norm (``first``: below ``tol``, the first unit vector
    stands for it), ``steps`` the iteration, ``scale`` the mean of the norms (float32); ``models``
    alone is one model (mergekit returns it), ``zero`` no model above ``tol`` (zeros)."""

    dtype: str
    models: int = 1
    norms: tuple[float, ...] = ()
    valid: tuple[int, ...] = ()
    alphas: tuple[float, ...] = ()
    mean_norm: float = 1.0
    first: bool = False
    steps: tuple[KarcherStep, ...] = ()
    scale: float = 1.0
    zero: bool = False
    label: ClassVar[str] = "karcher"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype

    def scalar(self, x: float) -> np.float32:
        """A float32 scalar rounded to the merge dtype (a one-element tensor of it)."""
        import numpy as np

        from tensorsurgery.ops.arith import rounded

        return cast("np.float32", rounded(np.asarray([x], np.float32), self.dtype)[0])

    def units(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The valid models' ``x / |x|`` (the float32 norm itself divides: torch keeps a scalar
        operand's value)."""
        import numpy as np

        from tensorsurgery.ops.arith import rounded

        return [rounded(xs[i] / np.float32(self.norms[i]), self.dtype) for i in self.valid]

    def _sum(self, terms: Sequence[np.ndarray | None]) -> np.ndarray:
        """``zeros; t += x`` for each term (None: skipped), each sum rounded."""
        import numpy as np

        from tensorsurgery.ops.arith import rounded

        total: np.ndarray | None = None
        for t in terms:
            if t is not None:
                total = rounded((np.float32(0) if total is None else total) + t, self.dtype)
        assert total is not None
        return total

    def weighted(self, units: Sequence[np.ndarray]) -> np.ndarray:
        """``sum alpha_i u_i``, before its normalization."""
        import numpy as np

        from tensorsurgery.ops.arith import rounded

        return self._sum([rounded(u * np.float32(a), self.dtype) for u, a in zip(units, self.alphas)])

    def tangent(self, units: Sequence[np.ndarray], m: np.ndarray, step: KarcherStep) -> np.ndarray:
        """``sum f_i (u_i - d_i m)`` over the units not skipped (zeros if all are)."""
        import numpy as np

        from tensorsurgery.ops.arith import rounded

        md = self.dtype
        terms = [None if f is None else rounded(np.float32(f) * rounded(u - rounded(np.float32(d) * m, md), md), md)
                 for u, d, f in zip(units, step.dots, step.factors)]
        return self._sum(terms) if any(t is not None for t in terms) else np.zeros_like(m)

    def moved(self, m: np.ndarray, g: np.ndarray, step: KarcherStep) -> np.ndarray:
        """``cos(r) m + sin(r) g / r`` (``g`` the tangent, ``r`` its norm), before its
        normalization."""
        import numpy as np

        from tensorsurgery.ops.arith import rounded

        md = self.dtype
        g = rounded(g / np.float32(step.tangent_norm), md)
        return rounded(rounded(np.float32(step.cos) * m, md) + rounded(np.float32(step.sin) * g, md), md)

    def mean(self, xs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """The unit vectors and the mean after the steps known so far."""
        import numpy as np

        from tensorsurgery.ops.arith import rounded

        units = self.units(xs)
        m = units[0] if self.first else rounded(self.weighted(units) / np.float32(self.mean_norm), self.dtype)
        for step in self.steps:
            m = self.moved(m, self.tangent(units, m, step), step)
            if step.unit_norm is not None:
                m = rounded(m / np.float32(step.unit_norm), self.dtype)
        return units, m

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np

        from tensorsurgery.ops.arith import blockwise, encoded, rounded, values

        md = self.dtype

        def compute(block: list[np.ndarray]) -> np.ndarray:
            xs = [values(raw, i.dtype, md) for raw, i in zip(block, inputs)]
            if self.models == 1:
                return encoded(xs[0], md)
            if self.zero:  # Python's sum of each tensor times 0: 0 + t_0 * 0 + ...
                return encoded(self._sum([np.float32(0) + rounded(xs[0] * np.float32(0), md)] +
                                         [rounded(x * np.float32(0), md) for x in xs[1:]]), md)
            # the float32 scale is the first operand: torch rounds it to the dtype first
            return encoded(rounded(self.scalar(self.scale) * self.mean(xs)[1], md), md)

        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
            return blockwise(raws, [element_size(i.dtype) for i in inputs], element_size(md), compute)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("karcher's mean is elementwise")  # the interpreter never asks

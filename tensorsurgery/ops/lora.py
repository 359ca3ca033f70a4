"""``lora``: a base weight with a LoRA adapter merged into it, as peft's ``merge_and_unload`` makes
it: ``W + scaling * (B @ A)`` (transposed for ``fan_in_fan_out`` layers and embeddings), a block of
output rows at a time.

The arithmetic is peft's on CPU, measured bit for bit (tests/test_adapters.py): the factors widened
to float32, their float32 product, times ``float32(scaling)``, added to ``float32(W)`` and rounded
once to W's dtype (an embedding's product is rounded to W's dtype before the add, as peft's
``Embedding.merge`` does). torch's float32 matmul (MKL) accumulates each dot product in rank order
with fused multiply-adds; numpy's (OpenBLAS) does too for the blocked kernel it uses on a product of
at least :data:`MIN_ROWS` rows, but not for its small-matrix and single-row paths. So every product
here is made over a window of at least that many rows around the rows asked for (the rows
themselves when the tensor has fewer), whatever row range the writer asks for.

DoRA (``dora``, peft's ``use_dora`` on a linear layer): a fourth input, the magnitude vector ``m``
(one value per output row), and peft's ``DoraLinearVariant.merge``: ``S = f32(W) + delta`` (delta
the float32 scaled product above), ``n = ||S||`` over each row (torch's float32
``linalg.norm(dim=1)``, emulated by :func:`row_norms`), ``f32(m / n) * S`` rounded once to W's
dtype. The norm of a row needs that row alone, so the operation stays rowwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator, Sequence

from tensorsurgery.ops.base import register

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input

#: The fewest rows a product is made over (see the module docstring): OpenBLAS's blocked sgemm,
#: whose accumulation order is torch's, for ranks up to 128.
MIN_ROWS = 128
#: Elements made at a time after the product (the scaling, the add and the roundings).
_PIECE = 1 << 15
#: The float32 lanes of torch's vectorized row norm on CPU (AVX2 and AVX512 builds alike: measured).
LANES = 8


@register
@dataclass(frozen=True, slots=True)
class LoraMerge:
    """Inputs: the base weight ``W`` ``[rows, cols]``, ``lora_A`` and ``lora_B`` (any float dtype).
    Not ``transposed``: ``A`` is ``[r, cols]`` and ``B`` ``[rows, r]``, ``delta = B @ A``;
    ``transposed`` (a ``fan_in_fan_out`` layer, an embedding): ``A`` is ``[r, rows]``, ``B``
    ``[cols, r]``, ``delta = (B @ A)^T``. Values: ``merge_dtype(f32(W) + f32(delta) * f32(scaling))``
    (``delta`` first rounded to ``merge_dtype`` when ``round_delta``), then cast to ``dtype``.
    ``dora``: a fourth input, the magnitude ``m`` ``[rows]``, and the values
    ``merge_dtype(f32(m / ||S||) * S)`` with ``S = f32(W) + f32(delta) * f32(scaling)`` and the
    norm over each row (see the module docstring)."""

    scaling: float
    transposed: bool
    round_delta: bool
    merge_dtype: str
    dtype: str
    dora: bool = False
    label: ClassVar[str] = "lora"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    #: Output row ``i`` depends on row ``i`` of W and of the product only (:meth:`rows_into`).
    rowwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype  # the cast to the output dtype is made here (rowwise: no cast stage after)

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("a LoRA merge is not elementwise")  # the interpreter never asks

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        from tensorsurgery.formats.dtypes import element_size
        from tensorsurgery.io.scratch import scratch

        rows, cols = inputs[0].shape
        size = element_size(self.dtype)
        step = max(chunk // max(cols * 4, 1), 1)
        out = scratch(step * cols * size // 2 + 1, slot=1)[1]
        for start in range(0, rows, step):
            n = min(step, rows - start)
            yield self.rows_into(inputs, readers, start, n, out[:n * cols * size])

    def rows_into(self, inputs: Sequence[Input], readers: Sequence[Reader], start: int, n: int,
                  out: np.ndarray) -> np.ndarray:
        """Output rows ``start..start+n-1`` made into ``out`` (uint8, their size), :data:`MIN_ROWS`
        rows at a time (bounded memory whatever ``n``); returns ``out``."""
        from tensorsurgery.formats.dtypes import element_size

        w = inputs[0]
        rows, cols = w.shape
        row_bytes = cols * element_size(self.dtype)
        for first in range(start, start + n, MIN_ROWS):
            m = min(MIN_ROWS, start + n - first)
            self._block(inputs, readers, first, m, out[(first - start) * row_bytes:(first - start + m) * row_bytes])
        return out

    def _block(self, inputs: Sequence[Input], readers: Sequence[Reader], start: int, n: int, out: np.ndarray) -> None:
        """Rows ``start..start+n-1`` (``n <= MIN_ROWS``), their product made over a window of
        :data:`MIN_ROWS` rows around them (all rows when the tensor has fewer)."""
        import numpy as np  # not imported by planning (see tensorsurgery.ops)

        from tensorsurgery.formats.dtypes import element_size
        from tensorsurgery.io.scratch import scratch
        from tensorsurgery.ops.transforms import cast_chunk

        w, a, b = inputs[:3]
        rows, cols = w.shape
        lo = max(0, min(start, rows - MIN_ROWS))  # the window the product is made over
        hi = min(rows, lo + MIN_ROWS)
        product = self._product(a, b, readers[1], readers[2], lo, hi)[start - lo:start - lo + n].reshape(-1)
        size = element_size(self.dtype)
        scale = np.float32(self.scaling)
        if self.dora:
            self._dora(inputs, readers, start, n, product, out)
            return
        for i in range(0, n * cols, _PIECE):  # the rest elementwise, in small pieces: small temporaries
            m = min(_PIECE, n * cols - i)
            delta = product[i:i + m]
            delta *= scale
            if self.round_delta:
                rounded = cast_chunk(delta, "F32", self.merge_dtype, out=scratch(m * 4, slot=13)[0])
                delta = _f32(rounded, self.merge_dtype, slot=14)
            delta += _f32(_read(readers[0], w, start * cols + i, m, slot=15), w.dtype, slot=16)
            merged = cast_chunk(delta, "F32", self.merge_dtype, out=scratch(m * 4, slot=17)[0])
            out[i * size:(i + m) * size] = cast_chunk(merged, self.merge_dtype, self.dtype,
                                                      out=scratch(m * 4, slot=18)[0])

    def _dora(self, inputs: Sequence[Input], readers: Sequence[Reader], start: int, n: int, product: np.ndarray,
              out: np.ndarray) -> None:
        """DoRA's rows ``start..start+n-1`` from their float32 ``product`` rows (flat, changed in
        place): ``S = W + scaling * product``, each row times ``f32(m / ||S||)``, rounded once."""
        import numpy as np

        from tensorsurgery.formats.dtypes import element_size
        from tensorsurgery.io.scratch import scratch
        from tensorsurgery.ops.transforms import cast_chunk

        w, m = inputs[0], inputs[3]
        cols = w.shape[1]
        size = element_size(self.dtype)
        scale = np.float32(self.scaling)
        for i in range(0, n * cols, _PIECE):  # S, in place
            k = min(_PIECE, n * cols - i)
            s = product[i:i + k]
            s *= scale
            s += _f32(_read(readers[0], w, start * cols + i, k, slot=15), w.dtype, slot=16)
        rows = product.reshape(n, cols)
        magnitude = _f32(_read(readers[3], m, start, n, slot=22), m.dtype, slot=23)
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero row: inf or NaN, as torch makes it
            factor = magnitude / row_norms(rows)
        rows *= factor[:, None]
        for i in range(0, n * cols, _PIECE):
            k = min(_PIECE, n * cols - i)
            merged = cast_chunk(product[i:i + k], "F32", self.merge_dtype, out=scratch(k * 4, slot=17)[0])
            out[i * size:(i + k) * size] = cast_chunk(merged, self.merge_dtype, self.dtype,
                                                      out=scratch(k * 4, slot=18)[0])

    def _product(self, a: Input, b: Input, reader_a: Reader, reader_b: Reader, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo..hi-1`` of the float32 product (``B @ A``, or its transpose), shape ``[hi - lo, cols]``
        (a scratch buffer of this thread: valid until the next call)."""
        import numpy as np

        from tensorsurgery.io.scratch import scratch

        r = a.shape[0]
        if not self.transposed:  # B[lo:hi] @ A
            fa = _f32(_read(reader_a, a, 0, a.shape[0] * a.shape[1], slot=10), a.dtype, slot=11).reshape(a.shape)
            fb = _f32(_read(reader_b, b, lo * r, (hi - lo) * r, slot=12), b.dtype, slot=19).reshape(hi - lo, r)
            product = scratch((hi - lo) * fa.shape[1] * 4, slot=20)[0].view(np.float32).reshape(hi - lo, fa.shape[1])
            return np.matmul(fb, fa, out=product)
        # (B @ A[:, lo:hi])^T: the same dot products as peft's full B @ A, in the same order
        fa = scratch(r * (hi - lo) * 4, slot=21)[0].view(np.float32).reshape(r, hi - lo)
        for k in range(r):
            fa[k] = _f32(_read(reader_a, a, k * a.shape[1] + lo, hi - lo, slot=10), a.dtype, slot=11)
        fb = _f32(_read(reader_b, b, 0, b.shape[0] * r, slot=12), b.dtype, slot=19).reshape(b.shape)
        product = scratch((hi - lo) * b.shape[0] * 4, slot=20)[0].view(np.float32).reshape(hi - lo, b.shape[0])
        np.copyto(product, np.matmul(fb, fa).T)
        return product


@register
@dataclass(frozen=True, slots=True)
class LoraBias:
    """peft's ``lora_bias``: the base layer's bias ``b`` plus ``lora_B``'s own bias ``c``, as peft's
    ``Linear.merge`` makes it (``bias.data += lora_B.bias * scaling``, the factor held in float32):
    ``merge_dtype(f32(b) + f32(c) * f32(scaling))``, the product rounded to float32, then one
    rounding to the base's dtype. Inputs: ``b``, ``c`` (1-D, one value per output row)."""

    scaling: float
    merge_dtype: str
    label: ClassVar[str] = "lora_bias"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.merge_dtype  # peft's bias is in the base's dtype; a cast to the output's follows

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np

        from tensorsurgery.ops.transforms import cast_chunk

        bias, lora = (cast_chunk(r, i.dtype, "F32").view(np.float32) for r, i in zip(raws, inputs))
        with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN, as torch makes them
            merged = lora * np.float32(self.scaling) + bias
        return cast_chunk(merged, "F32", self.merge_dtype)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("lora_bias is elementwise")  # the interpreter never asks


def _read(reader: Reader, i: Input, first: int, count: int, slot: int) -> np.ndarray:
    """Elements ``first..first+count-1`` of input ``i``, raw (uint8, scratch buffer ``slot``)."""
    from tensorsurgery.formats.dtypes import element_size
    from tensorsurgery.io.scratch import scratch

    size = element_size(i.dtype)
    raw = scratch(count * size, slot=slot)[0]
    reader.read_into(raw.data, i.range.offset + first * size)
    return raw


def _f32(raw: np.ndarray, dtype: str, slot: int) -> np.ndarray:
    """Raw ``dtype`` bytes as float32 values (exact for every float dtype a LoRA is saved in), in
    scratch buffer ``slot`` (``raw`` itself when it is float32)."""
    import numpy as np

    from tensorsurgery.io.scratch import scratch
    from tensorsurgery.ops.transforms import cast_chunk

    return cast_chunk(raw, dtype, "F32", out=scratch(raw.size * 4 // 2 + 1, slot=slot)[1]).view(np.float32)


def row_norms(x: np.ndarray) -> np.ndarray:
    """The float32 Euclidean norm of each row of float32 ``x`` ``[n, cols]``, rounded as torch 2's
    ``linalg.norm(x, dim=1)`` on CPU makes it (measured bit for bit, tests/test_adapters.py): the
    squares (each rounded) summed into :data:`LANES` lanes in column order, the lanes added in
    order; of the last ``cols % LANES`` columns, four (when there are as many) squared and added
    one by one, the rest by fused multiply-adds; then the float32 square root. Rows a block of
    about :data:`_PIECE` elements at a time (small temporaries)."""
    import numpy as np

    n, cols = x.shape
    main = cols - cols % LANES
    quad = main + 4 if cols - main >= 4 else main
    out = np.empty(n, np.float32)
    step = max(1, _PIECE // max(cols, 1))
    for r in range(0, n, step):
        block = x[r:r + step]
        g = len(block)
        # each lane's sum in column order (a reduction over the middle axis adds lane by lane)
        lanes = np.add.reduce(np.square(block[:, :main]).reshape(g, main // LANES, LANES), axis=1)
        total = np.zeros(g, np.float32)
        for j in range(LANES):
            total += lanes[:, j]
        if quad > main:
            squares = np.square(block[:, main:quad])
            for j in range(4):
                total += squares[:, j]
        for d in range(quad, cols):
            total = _fma_square(block[:, d], total)
        out[r:r + g] = np.sqrt(total)
    return out


def _fma_square(v: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """``v * v + acc`` rounded once to float32 (a fused multiply-add): the square is exact in
    float64 and the float64 sum is made round-to-odd (its error found by TwoSum), which rounds to
    float32 as the exact sum does."""
    import numpy as np

    p = v.astype(np.float64) ** 2
    a = acc.astype(np.float64)
    s = p + a
    t = s - p
    e = (p - (s - t)) + (a - t)  # TwoSum: s + e == p + a exactly
    bits = s.view(np.int64).copy()
    inexact_even = (e != 0) & ((bits & 1) == 0)
    bits[inexact_even] += np.where(e[inexact_even] > 0, 1, -1)  # s >= 0: towards e
    return bits.view(np.float64).astype(np.float32)

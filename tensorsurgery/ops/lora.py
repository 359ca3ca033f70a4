"""``lora``: a base weight with a LoRA adapter merged into it, as peft's ``merge_and_unload`` makes
it: ``W + scaling * (B @ A)`` (transposed for ``fan_in_fan_out`` layers and embeddings), a block of
output rows at a time.

The arithmetic is peft's on CPU, measured bit for bit (tests/test_adapters.py): the factors widened
to float32, their float32 product, times ``float32(scaling)``, added to ``float32(W)`` and rounded
once to W's dtype (an embedding's product is rounded to W's dtype before the add, as peft's
``Embedding.merge`` does). torch's float32 matmul (MKL) accumulates each dot product in rank order
with fused multiply-adds, and the bytes here are that chain's (numpy's BLAS sums in an order that
depends on the kernel it picks for the CPU). A float32 merge makes the chain itself
(:func:`tensorsurgery.ops.fma_product.fma_product`, BLAS-free and slow); a 16-bit one takes BLAS's
product where its proven error bound gives one merged value, and makes the chain only for the few
elements where it does not (:mod:`tensorsurgery.ops.product_bound`). A product is made over a
window of :data:`MIN_ROWS` rows and a block of columns at a time (:func:`column_blocks`), which
bounds its memory.

DoRA (``dora``, peft's ``use_dora`` on a linear layer): a fourth input, the magnitude vector ``m``
(one value per output row), and peft's ``DoraLinearVariant.merge``: ``S = f32(W) + delta`` (delta
the float32 scaled product above), ``n = ||S||`` over each row (torch's float32
``linalg.norm(dim=1)``, emulated by :func:`row_norms`), ``f32(m / n) * S`` rounded once to W's
dtype. The norm of a row needs that row alone, so the operation stays rowwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, ContextManager, Iterator, Sequence

from tensorsurgery.ops.base import register

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input

#: The rows a product is made over at a time (see the module docstring).
MIN_ROWS = 128
#: Column blocks of a product are at least this wide (:func:`column_blocks`): 128 KiB of float32 per
#: thread for a 128-row window at r = 128 (512 KiB at r = 16, the product's own bound), where the
#: whole window of a 5632-column ``down_proj`` is 2.75 MiB.
MIN_BLOCK_COLS = 256
#: The fewest multiply-adds a block's product makes (:func:`column_blocks`): fewer, wider blocks
#: where a tensor is narrow (each block's product has a fixed cost per rank step).
BLAS_MIN_PRODUCT = 1 << 20
#: Pairs times rank a chain of unsettled elements (:meth:`LoraMerge._settle`) makes at a time.
_CHAIN_PAIRS = 1 << 17
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
    #: The writer's row ranges are at least a product window (fewer rows would cost a whole window).
    job_rows: ClassVar[int] = MIN_ROWS

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return self.dtype  # the cast to the output dtype is made here (rowwise: no cast stage after)

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("a LoRA merge is not elementwise")  # the interpreter never asks

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        from tensorsurgery.formats.dtypes import element_size
        from tensorsurgery.io.scratch import scratch

        rows, cols = grid(inputs[0].shape)
        size = element_size(self.dtype)
        step = max(chunk // max(cols * size, 1), MIN_ROWS)  # fewer rows would cost a whole window each
        out = scratch(step * cols * size // 2 + 1, slot=1)[1]
        for start in range(0, rows, step):
            n = min(step, rows - start)
            yield self.rows_into(inputs, readers, start, n, out[:n * cols * size])

    def rows_into(self, inputs: Sequence[Input], readers: Sequence[Reader], start: int, n: int,
                  out: np.ndarray) -> np.ndarray:
        """Output rows ``start..start+n-1`` made into ``out`` (uint8, their size), :data:`MIN_ROWS`
        rows at a time (bounded memory whatever ``n``); returns ``out``."""
        from tensorsurgery.formats.dtypes import element_size

        rows, cols = grid(inputs[0].shape)
        row_bytes = cols * element_size(self.dtype)
        for first, m in self._spans(rows, start, n):
            self._block(inputs, readers, first, m, out[(first - start) * row_bytes:(first - start + m) * row_bytes])
        return out

    def _spans(self, rows: int, start: int, n: int) -> Iterator[tuple[int, int]]:
        """The ``(first row, count)`` blocks rows ``start..start+n-1`` are made in: at most
        :data:`MIN_ROWS` rows each."""
        for first in range(start, start + n, MIN_ROWS):
            yield first, min(MIN_ROWS, start + n - first)

    def _window(self, rows: int, start: int, n: int) -> tuple[int, int]:
        """The rows ``lo..hi-1`` the product of rows ``start..start+n-1`` is made over:
        :data:`MIN_ROWS` rows around them (all rows when the tensor has fewer)."""
        lo = max(0, min(start, rows - MIN_ROWS))
        return lo, min(rows, lo + MIN_ROWS)

    def _block(self, inputs: Sequence[Input], readers: Sequence[Reader], start: int, n: int, out: np.ndarray) -> None:
        """Rows ``start..start+n-1`` (``n <= MIN_ROWS``) into ``out``, their product made over a
        window of :data:`MIN_ROWS` rows around them (all rows when the tensor has fewer), a block
        of columns at a time (:func:`column_blocks`). DoRA makes the blocks twice: their row norms,
        then the values (a product made again costs less than holding the window's)."""
        import numpy as np  # not imported by planning (see tensorsurgery.ops)

        from tensorsurgery.formats.dtypes import element_size
        from tensorsurgery.io.scratch import scratch
        from tensorsurgery.ops.transforms import cast_chunk

        w = inputs[0]
        cols = grid(w.shape)[1]
        wsize, size = element_size(w.dtype), element_size(self.dtype)
        rows_out = out.reshape(n, cols * size)  # the output rows, each block of columns written in place
        if wsize == size:  # W's rows read straight into the output bytes they become: no copy of them
            readers[0].read_into(out.data, w.range.offset + start * cols * wsize)
            weights = rows_out
        else:
            weights = _read(readers[0], w, start * cols, n * cols, slot=15).reshape(n, cols * wsize)
        with self._factor(inputs, readers, start) as factor:
            scale: np.ndarray | None = None
            if self.dora:
                norms = RowNorms(n, cols)
                for c0, _, i, g, s in self._sums(inputs, readers, factor, start, n, weights):
                    norms.add(s.reshape(g, -1), i, c0)
                m = inputs[3]
                magnitude = _f32(_read(readers[3], m, start, n, slot=22), m.dtype, slot=23)
                with np.errstate(divide="ignore", invalid="ignore"):  # a zero row: inf or NaN, as torch makes it
                    scale = magnitude / norms.value()
            for c0, c1, i, g, s in self._sums(inputs, readers, factor, start, n, weights):
                if scale is not None:
                    s.reshape(g, -1)[...] *= scale[i:i + g, None]
                merged = cast_chunk(s, "F32", self.merge_dtype, out=scratch(s.size * 4, slot=17)[0])
                made = cast_chunk(merged, self.merge_dtype, self.dtype, out=scratch(s.size * 4, slot=18)[0])
                rows_out[i:i + g, c0 * size:c1 * size] = made.reshape(g, (c1 - c0) * size)

    def _sums(self, inputs: Sequence[Input], readers: Sequence[Reader], factor: np.ndarray, start: int, n: int,
              weights: np.ndarray) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
        """``S = f32(W) + f32(delta) * f32(scaling)`` (``delta`` rounded to the merge dtype first
        when ``round_delta``) of rows ``start..start+n-1``, in pieces of about :data:`_PIECE`
        elements: ``(c0, c1, i, g, s)``, ``s`` the float32 values (flat, in this thread's scratch,
        valid until the next piece) of rows ``start+i..start+i+g-1`` and columns ``c0..c1-1``;
        ``weights`` is W's raw rows ``[n, cols * element size]``."""
        w = inputs[0]
        rows, cols = grid(w.shape)
        lo, hi = self._window(rows, start, n)
        r = self._rank(inputs)
        # A 16-bit merge: BLAS's product settles nearly every element. Not a float32 one (its rounding
        # is as fine as the bound), nor DoRA's (its row norms need every sum exact).
        fast = not self.dora and self.merge_dtype != "F32"
        for c0, c1 in column_blocks(cols, r):
            width = c1 - c0
            left, right = self._operands(inputs, readers, factor, lo, hi, c0, c1)
            if fast:
                product, bound = self._estimate(left, right, lo, hi, c0, c1)
                product = product[start - lo:start - lo + n]
                self._settle(product, bound[start - lo:start - lo + n], weights, w.dtype, c0, c1, left, right,
                             start - lo, r)
            else:
                product = self._product(left, right, lo, hi, c0, c1)[start - lo:start - lo + n]
            step = max(1, _PIECE // width)
            for i in range(0, n, step):  # elementwise, in small pieces: small temporaries
                g = min(step, n - i)
                base = self._base(weights, w.dtype, i, g, c0, c1)
                delta = product[i:i + g].reshape(-1)
                yield c0, c1, i, g, self._delta_plus(delta, base)

    def _settle(self, product: np.ndarray, bound: np.ndarray, weights: np.ndarray, wdtype: str, c0: int, c1: int,
                left: np.ndarray, right: np.ndarray, first: int, r: int) -> None:
        """Make the chain's value (:func:`~tensorsurgery.ops.fma_product.fma_dots`) wherever the
        bracket around BLAS's ``product`` (rows of the window from ``first`` on, columns
        ``c0..c1-1``; ``bound`` its ``|left| @ |right|``) does not settle the merged value: the
        block's such elements found first, then their chains made a few thousand at a time (a
        call per piece cost more than the chain itself at high ranks)."""
        import numpy as np

        from tensorsurgery.ops.fma_product import fma_dots
        from tensorsurgery.ops.product_bound import bracket

        n, width = product.shape
        step = max(1, _PIECE // width)
        unsure = []
        for i in range(0, n, step):
            g = min(step, n - i)
            delta = product[i:i + g].reshape(-1)
            base = self._base(weights, wdtype, i, g, c0, c1)
            ends = bracket(delta, bound[i:i + g].reshape(-1), r)
            lo_key, hi_key = (self._merged_key(end, base, slot) for end, slot in zip(ends, (44, 45)))
            unsure.append(np.flatnonzero((lo_key != hi_key) | ~np.isfinite(delta)) + i * width)
        every = np.concatenate(unsure)
        most = max(256, _CHAIN_PAIRS // r)  # the chain's float64 buffers: 2 MiB a thread at most
        for k in range(0, every.size, most):
            at = every[k:k + most]
            row, col = np.divmod(at, width)
            row += first  # rows of the window
            pair = (row, col) if not self.transposed else (col, row)
            product.reshape(-1)[at] = fma_dots(left[pair[0]], right[:, pair[1]].T)

    def _base(self, weights: np.ndarray, wdtype: str, i: int, g: int, c0: int, c1: int) -> np.ndarray:
        """``f32(W)`` of rows ``i..i+g-1`` (of ``weights``, W's raw rows) and columns ``c0..c1-1``,
        flat (this thread's scratch)."""
        import numpy as np

        from tensorsurgery.formats.dtypes import element_size
        from tensorsurgery.io.scratch import scratch

        size = element_size(wdtype)
        piece = scratch(g * (c1 - c0) * size, slot=24)[0]
        np.copyto(piece.reshape(g, (c1 - c0) * size), weights[i:i + g, c0 * size:c1 * size])
        return _f32(piece, wdtype, slot=16)

    def _delta_plus(self, delta: np.ndarray, base: np.ndarray) -> np.ndarray:
        """``f32(W) + f32(delta) * f32(scaling)`` (flat float32; ``delta`` rounded to the merge
        dtype first when ``round_delta``), made in ``delta``'s buffer."""
        import numpy as np

        from tensorsurgery.io.scratch import scratch
        from tensorsurgery.ops.transforms import cast_chunk

        delta *= np.float32(self.scaling)
        if self.round_delta:
            rounded = cast_chunk(delta, "F32", self.merge_dtype, out=scratch(delta.size * 4, slot=13)[0])
            delta[...] = _f32(rounded, self.merge_dtype, slot=14)
        delta += base
        return delta

    def _merged_key(self, end: np.ndarray, base: np.ndarray, slot: int) -> np.ndarray:
        """:func:`~tensorsurgery.ops.product_bound.rounded_key` of the merged value an end of a
        bracket (float32 products, overwritten) makes: the arithmetic of :meth:`_delta_plus`."""
        import numpy as np

        from tensorsurgery.ops.product_bound import key_value, rounded_key

        with np.errstate(over="ignore", invalid="ignore"):
            end *= np.float32(self.scaling)
            if self.round_delta:
                key_value(rounded_key(end, self.merge_dtype, slot), self.merge_dtype, out=end)
            end += base
        return rounded_key(end, self.merge_dtype, slot)

    def _rank(self, inputs: Sequence[Input]) -> int:
        return inputs[1].shape[0]  # A is [r, cols] (or [r, rows] transposed)

    def _factor(self, inputs: Sequence[Input], readers: Sequence[Reader], start: int) -> ContextManager[np.ndarray]:
        """The factor the windows of the block from row ``start`` multiply, in float32: the whole
        ``A`` ``[r, cols]`` (transposed: ``B`` ``[cols, r]``), shared by the threads."""
        i, reader = (inputs[2], readers[2]) if self.transposed else (inputs[1], readers[1])
        return shared_factor(i, reader, 0, i.shape)

    def _operands(self, inputs: Sequence[Input], readers: Sequence[Reader], factor: np.ndarray, lo: int, hi: int,
                  c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """``(left, right)``, float32: rows ``lo..hi-1``, columns ``c0..c1-1`` of the product are
        ``left @ right`` (``B[lo:hi] @ A[:, c0:c1]``), or, ``transposed``, its transpose
        (``(B[c0:c1] @ A[:, lo:hi])^T``: the same dot products as peft's whole ``B @ A``); each in
        a scratch buffer of this thread or ``factor`` (:meth:`_factor`'s)."""
        import numpy as np

        from tensorsurgery.io.scratch import scratch

        a, b = inputs[1], inputs[2]
        r = a.shape[0]
        if not self.transposed:
            return _f32(_read(readers[2], b, lo * r, (hi - lo) * r, slot=12), b.dtype, slot=19).reshape(hi - lo, r), \
                factor[:, c0:c1]
        fa = scratch(r * (hi - lo) * 4, slot=21)[0].view(np.float32).reshape(r, hi - lo)
        for k in range(r):
            fa[k] = _f32(_read(readers[1], a, k * a.shape[1] + lo, hi - lo, slot=10), a.dtype, slot=11)
        return factor[c0:c1], fa

    def _product(self, left: np.ndarray, right: np.ndarray, lo: int, hi: int, c0: int, c1: int) -> np.ndarray:
        """The product of :meth:`_operands`, ``[hi - lo, c1 - c0]``, each element the rank-order
        chain of fused multiply-adds (a scratch buffer of this thread: valid until the next call)."""
        import numpy as np

        from tensorsurgery.io.scratch import scratch
        from tensorsurgery.ops.fma_product import fma_product

        product = scratch((hi - lo) * (c1 - c0) * 4, slot=20)[0].view(np.float32).reshape(hi - lo, c1 - c0)
        if not self.transposed:
            return fma_product(left, right, product)
        made = scratch((c1 - c0) * (hi - lo) * 4, slot=25)[0].view(np.float32).reshape(c1 - c0, hi - lo)
        np.copyto(product, fma_product(left, right, made).T)
        return product

    def _estimate(self, left: np.ndarray, right: np.ndarray, lo: int, hi: int, c0: int,
                  c1: int) -> tuple[np.ndarray, np.ndarray]:
        """The product of :meth:`_operands` by BLAS and its bound ``|left| @ |right|``
        (:func:`~tensorsurgery.ops.product_bound.estimate`), both ``[hi - lo, c1 - c0]`` in
        scratch buffers of this thread."""
        import numpy as np

        from tensorsurgery.io.scratch import scratch
        from tensorsurgery.ops.product_bound import estimate

        shape = (hi - lo, c1 - c0) if not self.transposed else (c1 - c0, hi - lo)
        made, bound = (scratch(shape[0] * shape[1] * 4, slot=slot)[0].view(np.float32).reshape(shape)
                       for slot in (20, 25))
        estimate(left, right, made, bound)
        if not self.transposed:
            return made, bound
        return (np.ascontiguousarray(made.T), np.ascontiguousarray(bound.T))


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


def grid(shape: Sequence[int]) -> tuple[int, int]:
    """A weight's shape as the rows and columns a merge makes: its last dimension the columns,
    the others the rows (``[experts, rows, cols]`` is ``experts * rows`` rows)."""
    from tensorsurgery.ops.recipe import row_count

    return row_count(shape), shape[-1]


def column_blocks(cols: int, rank: int) -> list[tuple[int, int]]:
    """The column ranges a product of :data:`MIN_ROWS` rows is made in: all columns when fewer
    than two blocks of the width below fit, else blocks of that width, the last one up to twice
    as wide. The width makes each block's product at least :data:`BLAS_MIN_PRODUCT` multiply-adds
    (a BLAS call on a narrower block costs more per element than its work): the per-thread product
    buffer is a block, not the window. Every value is the chain's whatever the blocks."""
    width = max(MIN_BLOCK_COLS, -(-BLAS_MIN_PRODUCT // (MIN_ROWS * max(rank, 1))))
    width = -(-width // 64) * 64
    if cols < 2 * width:
        return [(0, cols)]
    starts = list(range(0, cols // width * width, width))
    return [(s, s + width) for s in starts[:-1]] + [(starts[-1], cols)]


def shared_factor(i: Input, reader: Reader, first: int, shape: tuple[int, ...]) -> ContextManager[np.ndarray]:
    """Elements ``first..`` of input ``i`` (as many as ``shape`` holds) in float32, of ``shape``,
    shared by the threads (:mod:`tensorsurgery.ops.lora_factor`)."""
    import numpy as np

    from tensorsurgery.formats.dtypes import element_size
    from tensorsurgery.ops.lora_factor import FACTORS

    count = math.prod(shape)

    def fill(buffer: np.ndarray) -> None:  # a piece at a time: no second whole copy on this thread
        values = buffer.view(np.float32)
        for at in range(0, count, _PIECE):
            k = min(_PIECE, count - at)
            values[at:at + k] = _f32(_read(reader, i, first + at, k, slot=10), i.dtype, slot=11)

    offset = i.range.offset + first * element_size(i.dtype)
    return _as_float32(FACTORS.taken((i.range.file, offset, count, i.dtype), count * 4, fill), shape)


def _as_float32(taken: ContextManager[np.ndarray], shape: tuple[int, ...]) -> ContextManager[np.ndarray]:
    """``taken``'s bytes seen as a float32 array of ``shape``."""
    from contextlib import contextmanager

    import numpy as np

    @contextmanager
    def view() -> Iterator[np.ndarray]:
        with taken as raw:
            yield raw.view(np.float32).reshape(shape)

    return view()


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
    ``linalg.norm(x, dim=1)`` on CPU makes it (measured bit for bit, tests/test_adapters.py), rows
    a block of about :data:`_PIECE` elements at a time (small temporaries); see :class:`RowNorms`."""
    n, cols = x.shape
    norms = RowNorms(n, cols)
    step = max(1, _PIECE // max(cols, 1))
    for r in range(0, n, step):
        norms.add(x[r:r + step], r, 0)
    return norms.value()


class RowNorms:
    """torch 2's CPU ``linalg.norm(dim=1)`` of ``n`` float32 rows of ``cols`` columns, given a
    block of rows and columns at a time (:meth:`add`: each row's blocks in column order, each
    starting at a multiple of :data:`LANES`): the squares (each rounded) summed into
    :data:`LANES` lanes in column order, the lanes added in order; of the last ``cols % LANES``
    columns, four (when there are as many) squared and added one by one, the rest by fused
    multiply-adds; then the float32 square root."""

    def __init__(self, n: int, cols: int) -> None:
        import numpy as np

        self.cols, self.main = cols, cols - cols % LANES
        self.lanes = np.zeros((n, LANES), np.float32)
        self.tail = np.zeros((n, cols - self.main), np.float32)

    def add(self, block: np.ndarray, row: int, c0: int) -> None:
        """The float32 values of rows ``row..`` and columns ``c0..`` (``block`` ``[g, width]``)."""
        import numpy as np

        g, width = block.shape
        end = min(c0 + width, self.main)
        if end > c0:
            # each lane's sum in column order (a reduction over the middle axis adds lane by lane),
            # from where the row's earlier blocks left it
            squares = np.square(block[:, :end - c0]).reshape(g, (end - c0) // LANES, LANES)
            if c0:
                squares[:, 0] += self.lanes[row:row + g]
            self.lanes[row:row + g] = np.add.reduce(squares, axis=1)
        if c0 + width > self.main:
            self.tail[row:row + g] = block[:, self.main - c0:]

    def value(self) -> np.ndarray:
        """Each row's norm (once every block was added)."""
        import numpy as np

        total = np.zeros(len(self.lanes), np.float32)
        for j in range(LANES):
            total += self.lanes[:, j]
        quad = 4 if self.cols - self.main >= 4 else 0
        if quad:
            squares = np.square(self.tail[:, :quad])
            for j in range(quad):
                total += squares[:, j]
        for d in range(quad, self.cols - self.main):
            total = _fma_square(self.tail[:, d], total)
        return np.sqrt(total)


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

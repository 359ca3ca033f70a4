"""The numpy kernel of :class:`~tensorsurgery.ops.dare.Dare`: both passes, chunk by chunk."""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence, cast

import numpy as np

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.io.scratch import scratch
from tensorsurgery.ops.arith import encoded, rounded, rounded_scalars, values
from tensorsurgery.ops.mt_stream import Stream, keep_threshold
from tensorsurgery.ops.torch_sums import CascadeSum, ChunkedSum, full_sum, model_sum

if TYPE_CHECKING:
    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input

#: Elements a chunk holds, about (rounded to the cascade sum's unit).
CHUNK_ELEMENTS = 1 << 16


class DareParameters(Protocol):
    """What the kernel reads of a :class:`~tensorsurgery.ops.dare.Dare` (a protocol: the op's
    module imports this one, lazily, so this one names no class of it)."""

    @property
    def weights(self) -> tuple[float, ...]: ...
    @property
    def densities(self) -> tuple[float, ...]: ...
    @property
    def normalize(self) -> bool: ...
    @property
    def rescale(self) -> bool: ...
    @property
    def lam(self) -> float: ...
    @property
    def ties(self) -> bool: ...
    @property
    def dtype(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def offset(self) -> int: ...

#: mergekit's ``rescaled_masked_tensor`` skips the rescale when a sum is below this.
EPS = 1e-7


#: Threads that make the models' terms side by side (numpy and the generator release the GIL); the
#: bytes do not depend on how many.
WORKERS = max(1, min(4, os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="ts-dare")
        return _pool


#: Model ``k``'s 0/1 kept-mask of a chunk of its deltas (their magnitudes, or the signed values: a
#: mask depends on magnitudes only), drawing from its stream.
Masker = Callable[[int, Stream, np.ndarray], np.ndarray]


def dare_chunks(op: DareParameters, inputs: Sequence[Input], readers: Sequence[Reader]) -> Iterator[np.ndarray]:
    """Every value of ``op`` on ``inputs`` (read by ``readers``), in chunks (raw bytes of the merge dtype)."""
    wd = "BF16" if op.dtype == "BF16" else "F32"  # torch's CPU bernoulli has no float16: mergekit widens
    n = inputs[0].range.length // element_size(inputs[0].dtype)
    sparse = [k for k, d in enumerate(op.densities) if d < 1]
    keep = {k: keep_threshold(rounded_scalars([op.densities[k]], wd)[0]) for k in sparse}

    def mask(k: int, stream: Stream, delta: np.ndarray) -> np.ndarray:
        return cast("np.ndarray", stream.low24(delta.size) < keep[k])

    unit = CascadeSum(n, wd).unit
    return sparsified_chunks(op, inputs, readers, n, max(unit, CHUNK_ELEMENTS // unit * unit), wd, sparse, mask,
                             CascadeSum, zero_dropped=False)


def sparsified_chunks(op: DareParameters, inputs: Sequence[Input], readers: Sequence[Reader], n: int, chunk: int,
                      wd: str, sparse: list[int], mask: Masker, sums: type[CascadeSum] | type[ChunkedSum], *,
                      zero_dropped: bool) -> Iterator[np.ndarray]:
    """Both passes of DARE and DELLA (generalized task arithmetic with random sparsification), in
    chunks of ``chunk`` elements: the models in ``sparse`` keep what ``mask`` draws (their rescale
    sums made by ``sums`` in the work dtype ``wd``); with ``zero_dropped``, a model of density 0
    adds +0 (DELLA's ``torch.zeros_like``), else its masked delta."""
    md = op.dtype
    pool = _workers()
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
        streams, ratios = _first_pass(op, inputs, readers, n, chunk, sparse, mask, wd, sums)
        weights = rounded_scalars(op.weights, md)
        divisor: Any = None
        if not op.ties:
            divisor = rounded(np.asarray([full_sum(weights, md)], np.float32), md)[0]
            if abs(divisor) < 1e-8:
                divisor = np.float32(1)
        vector = 8 if md == "F32" else 16

        def term(k: int, base: np.ndarray, start: int, count: int) -> np.ndarray:
            with np.errstate(over="ignore", invalid="ignore"):
                if zero_dropped and op.densities[k] <= 0:  # torch.zeros_like: +0 whatever the delta's sign
                    return rounded(np.zeros(count, np.float32) * weights[k], md)
                delta = rounded(read_values(inputs, readers, k + 1, start, count, md, slot=k + 1) - base, md)
                if k in streams:
                    delta *= mask(k, streams[k], delta)  # as torch multiplies by the 0/1 mask
                    ratio = ratios.get(k)
                    if ratio is not None:
                        delta = rounded(delta * ratio, wd)
                        if md != wd:
                            delta = rounded(delta, md)
                return rounded(delta * weights[k], md)

        def submit(start: int) -> tuple[np.ndarray, list[Future[np.ndarray]]]:
            """The base's chunk from ``start`` (two scratch slots in turn: the last one is still
            in use) and the models' terms of it, being made."""
            count = min(chunk, n - start)
            base = read_values(inputs, readers, 0, start, count, md, slot=-2 - (start // chunk) % 2)
            return base, [pool.submit(term, k, base, start, count) for k in range(len(weights))]

        # The next chunk's terms are made while this one's are combined (and written).
        pending = submit(0) if n else None
        for start in range(0, n, chunk):
            assert pending is not None
            base, futures = pending
            terms = [f.result() for f in futures]
            pending = submit(start + chunk) if start + chunk < n else None
            div: Any
            if op.ties:
                mixed, div = _consensus(terms, weights, start, n, vector, md)
            else:
                mixed, div = rounded(model_sum(terms, start, n, vector), md), divisor
            if op.normalize:
                mixed = rounded(mixed / div, md)
            if op.lam != 1:
                mixed = rounded(mixed * np.float32(op.lam), md)
            yield encoded(rounded(base + mixed, md), md)


def _first_pass(op: DareParameters, inputs: Sequence[Input], readers: Sequence[Reader], n: int, chunk: int,
                sparse: list[int], mask: Masker, wd: str, sums: type[CascadeSum] | type[ChunkedSum]
                ) -> tuple[dict[int, Stream], dict[int, np.float32 | None]]:
    """Each sparsified model's stream at its first draw, and with ``rescale`` its factor
    ``sum|delta| / sum|kept|`` in the work dtype (None: skipped, a sum below 1e-7); the draws
    for the sums are the same the values take again. The models side by side: each takes up
    the stream where its draws start."""
    if not sparse:
        return {}, {}
    first = Stream(op.seed, op.offset)
    first.remember()

    def one(position: int, k: int) -> tuple[Stream, np.float32 | None, Stream]:
        stream = first.copy() if position == 0 else Stream(op.seed, op.offset + position * n)
        start = stream.copy()
        if not op.rescale:
            stream.advance(n)
            return start, None, stream
        md = op.dtype
        before, after = sums(n, wd), sums(n, wd)
        with np.errstate(over="ignore", invalid="ignore"):
            for at in range(0, n, chunk):
                count = min(chunk, n - at)
                base = read_values(inputs, readers, 0, at, count, md, slot=0)
                size = np.abs(rounded(read_values(inputs, readers, k + 1, at, count, md, slot=1) - base, md))
                before.add(size)
                size *= mask(k, stream, size)
                after.add(size)
            b, a = (rounded(np.asarray([s.value()], np.float32), wd)[0] for s in (before, after))
            ratio = None if b < EPS or a < EPS else rounded(np.asarray([b / a], np.float32), wd)[0]
        return start, ratio, stream

    done = list(_workers().map(one, range(len(sparse)), sparse))
    done[-1][2].remember()  # where the next tensor's draws start
    return {k: d[0] for k, d in zip(sparse, done)}, {k: d[1] for k, d in zip(sparse, done)}


def _consensus(terms: list[np.ndarray], weights: np.ndarray, start: int, n: int, vector: int,
               md: str) -> tuple[np.ndarray, np.ndarray]:
    """TIES's "sum" consensus: the weighted deltas whose sign is that of their sum (0 and above:
    positive), summed, and the sum of their weights (0 replaced by 1)."""
    majority = np.where(rounded(model_sum(terms, start, n, vector), md) >= 0, np.float32(1), np.float32(-1))
    agree = [t * majority > 0 for t in terms]  # the sign of t is the majority's (0 agrees with neither)
    # torch multiplies by the boolean mask: x * 0 keeps x's sign, and a NaN stays one
    mixed = rounded(model_sum([t * a for a, t in zip(agree, terms)], start, n, vector), md)
    div = rounded(model_sum([w * a for a, w in zip(agree, weights)], start, n, vector), md)
    div[div == 0] = 1
    return mixed, div


def read_values(inputs: Sequence[Input], readers: Sequence[Reader], k: int, start: int, n: int, merge_dtype: str,
                slot: int) -> np.ndarray:
    """Elements ``start..start+n-1`` of input ``k`` as float32 values of the merge dtype."""
    i = inputs[k]
    size = element_size(i.dtype)
    raw = scratch(n * size, slot=slot)[0]
    readers[k].read_into(raw.data, i.range.offset + start * size)
    return values(raw, i.dtype, merge_dtype)

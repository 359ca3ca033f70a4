"""The numpy kernel of :class:`~tensorsurgery.ops.della.Della`: ranks, probabilities, both
passes, whole rows at a time."""
from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence, cast

import numpy as np

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.arith import encoded, rounded, rounded_scalars
from tensorsurgery.ops.dare_kernel import CHUNK_ELEMENTS, EPS, DareParameters, _consensus, _workers, read_values
from tensorsurgery.ops.mt_stream import Stream
from tensorsurgery.ops.torch_sums import ChunkedSum, full_sum, model_sum

if TYPE_CHECKING:
    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input


class DellaParameters(DareParameters, Protocol):
    """What the kernel reads of a :class:`~tensorsurgery.ops.della.Della`."""

    @property
    def epsilons(self) -> tuple[float, ...]: ...


def probability_table(columns: int, density: float, epsilon: float, wd: str) -> np.ndarray:
    """For each 0-based rank within a row of ``columns`` elements, the integer ``T`` with an
    element kept exactly when its draw's low 24 bits are below ``T`` (uint32).

    mergekit's ``della_magprune`` in the work dtype ``wd``: ``ranks = rank.to(wd) + 1``;
    ``rank_norm = ((ranks - min) / (max - min)).clamp(0, 1)``; ``p = (d - e) + rank_norm * 2 * e``,
    each operation rounded to ``wd``. Measured on torch 2.13: the multiplication takes ``e`` as a
    float32 scalar, the addition rounds ``d - e`` to ``wd`` first (tests check the table against
    torch). torch draws ``(r & 0xFFFFFF) * 2**-24 < p``; ``p * 2**24`` is exact in float32.
    """
    ranks = rounded(rounded(np.arange(columns).astype(np.float32), wd) + np.float32(1), wd)
    low, high = ranks.min(), ranks.max()
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.clip(rounded(rounded(ranks - low, wd) / rounded(np.asarray([high - low]), wd), wd), 0, 1)
    p = rounded(rounded(norm * np.float32(2), wd) * np.float32(epsilon), wd)
    p = rounded(p + rounded_scalars([density - epsilon], wd)[0], wd)
    return np.minimum(np.ceil(p * np.float32(1 << 24)), np.float32(1 << 24)).astype(np.uint32)


def row_ranks(delta: np.ndarray, columns: int, md: str) -> np.ndarray:
    """Each element's 0-based rank by magnitude within its row (``delta``: float32 values of the
    merge dtype, whole rows), equal magnitudes in index order (a stable sort's). The magnitudes'
    bit patterns sort as their values (NaN last); numpy sorts 16-bit keys by radix."""
    if md == "BF16":
        keys: np.ndarray = (delta.view(np.uint32) >> 16).astype(np.uint16) & np.uint16(0x7FFF)
    elif md == "F16":
        keys = delta.astype(np.float16).view(np.uint16) & np.uint16(0x7FFF)
    else:
        keys = delta.view(np.uint32) & np.uint32(0x7FFFFFFF)
    rows = delta.size // columns
    order = np.argsort(keys.reshape(rows, columns), axis=1, kind="stable")
    ranks = np.empty((rows, columns), np.int32)  # half the memory of the sort's own indices
    np.put_along_axis(ranks, order, np.arange(columns, dtype=np.int32)[None, :], axis=1)
    return ranks.reshape(-1)


#: Elements of a chunk (whole rows; a longer row is a chunk of its own): half DARE's, because each
#: model's term also makes the rank arrays of its rows (the sort's int64 indices, int32 ranks, the
#: keep thresholds), the models side by side. The bytes do not depend on it.
CHUNK = CHUNK_ELEMENTS // 2

#: Makes model ``k``'s kept-mask of the delta values of a chunk of whole rows, drawing from a stream.
Masker = Callable[[int, Stream, np.ndarray], np.ndarray]


def della_chunks(op: DellaParameters, inputs: Sequence[Input], readers: Sequence[Reader], columns: int
                 ) -> Iterator[np.ndarray]:
    """Every value of ``op`` on ``inputs`` (read by ``readers``), in chunks of whole rows (raw bytes of
    the merge dtype)."""
    md = op.dtype
    wd = "BF16" if md == "BF16" else "F32"  # mergekit's work dtype (float16 widened, as for bernoulli)
    n = inputs[0].range.length // element_size(inputs[0].dtype)
    sparse = [k for k, d in enumerate(op.densities) if 0 < d < 1]
    tables = {k: probability_table(columns, op.densities[k], op.epsilons[k], wd) for k in sparse}

    def mask(k: int, stream: Stream, delta: np.ndarray) -> np.ndarray:
        return cast("np.ndarray", stream.low24(delta.size) < tables[k][row_ranks(delta, columns, md)])

    chunk = max(1, CHUNK // columns) * columns
    pool = _workers()
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
        streams, ratios = _first_pass(op, inputs, readers, n, chunk, sparse, mask, wd)
        weights = rounded_scalars(op.weights, md)
        divisor: Any = None
        if not op.ties:
            divisor = rounded(np.asarray([full_sum(weights, md)], np.float32), md)[0]
            if abs(divisor) < 1e-8:
                divisor = np.float32(1)
        vector = 8 if md == "F32" else 16

        def term(k: int, base: np.ndarray, start: int, count: int) -> np.ndarray:
            with np.errstate(over="ignore", invalid="ignore"):
                if op.densities[k] <= 0:  # torch.zeros_like: +0 whatever the delta's sign
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
            """The base's chunk from ``start`` (two scratch slots in turn) and the models' terms."""
            count = min(chunk, n - start)
            base = read_values(inputs, readers, 0, start, count, md, slot=-2 - (start // chunk) % 2)
            return base, [pool.submit(term, k, base, start, count) for k in range(len(weights))]

        pending = submit(0) if n else None  # the next chunk's terms are made while this one's are combined
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


def _first_pass(op: DellaParameters, inputs: Sequence[Input], readers: Sequence[Reader], n: int, chunk: int,
                sparse: list[int], mask: Masker, wd: str) -> tuple[dict[int, Stream], dict[int, np.float32 | None]]:
    """Each pruned model's stream at its first draw, and with ``rescale`` its factor
    ``sum|delta| / sum|kept|`` in the work dtype (None: skipped, a sum below 1e-7); the draws for
    the sums are the same the values take again. The models side by side, each taking up the
    stream where its draws start."""
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
        before, after = ChunkedSum(n, wd), ChunkedSum(n, wd)
        with np.errstate(over="ignore", invalid="ignore"):
            for at in range(0, n, chunk):
                count = min(chunk, n - at)
                base = read_values(inputs, readers, 0, at, count, md, slot=0)
                delta = rounded(read_values(inputs, readers, k + 1, at, count, md, slot=1) - base, md)
                size = np.abs(delta)
                before.add(size)
                size *= mask(k, stream, delta)
                after.add(size)
            b, a = (rounded(np.asarray([s.value()], np.float32), wd)[0] for s in (before, after))
            ratio = None if b < EPS or a < EPS else rounded(np.asarray([b / a], np.float32), wd)[0]
        return start, ratio, stream

    done = list(_workers().map(one, range(len(sparse)), sparse))
    done[-1][2].remember()  # where the next tensor's draws start
    return {k: d[0] for k, d in zip(sparse, done)}, {k: d[1] for k, d in zip(sparse, done)}

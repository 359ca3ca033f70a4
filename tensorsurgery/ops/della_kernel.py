"""The numpy kernel of :class:`~tensorsurgery.ops.della.Della`: ranks, probabilities, both
passes, whole rows at a time."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol, Sequence, cast

import numpy as np

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.arith import rounded, rounded_scalars
from tensorsurgery.ops.dare_kernel import CHUNK_ELEMENTS, DareParameters, sparsified_chunks
from tensorsurgery.ops.mt_stream import Stream
from tensorsurgery.ops.torch_sums import ChunkedSum

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

    return sparsified_chunks(op, inputs, readers, n, max(1, CHUNK // columns) * columns, wd, sparse, mask,
                             ChunkedSum, zero_dropped=True)

"""``arcee_fusion``: mergekit's Arcee Fusion of a base and one other model. Each element's
importance is its difference's magnitude times its row's KL divergence between the softmaxes of
the model's and the base's rows (over the last dimension); the elements whose importance reaches
``median + 1.5 * (q3 - q1)`` of the importances over the whole tensor take the model's value, the
others keep the base's. The quartiles are order statistics of the whole tensor, so the operation
is two-pass (:class:`~tensorsurgery.ops.TwoPassOperation`): a first pass over blocks of whole rows
makes each row's divergence and collects the importances (at most :data:`SAMPLE` of them, 4 bytes
each); the values are then elementwise, the rows' divergences bound."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator, Sequence, cast

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops.base import register

if TYPE_CHECKING:
    import numpy as np

    from tensorsurgery.io.byte_source import Reader
    from tensorsurgery.ops.base import Input

#: mergekit's ``_QUANTILE_SAMPLE_SIZE``: a tensor of more elements has its quartiles taken from
#: this many importances drawn with replacement by ``torch.randint``.
SAMPLE = 1_000_000
#: mergekit's ``eps``, added to each softmax.
EPS = 1e-8


def _columns(inputs: Sequence[Input]) -> int:
    """The length of a row (the last dimension; a scalar is one row of one)."""
    return inputs[0].shape[-1] if inputs[0].shape else 1


@register
@dataclass(frozen=True, slots=True)
class ArceeFusion:
    """mergekit's ``arcee_fusion`` of the base (the first input) and one model in the merge
    ``dtype``, every step rounded to it as torch rounds it; the softmaxes as torch's kernel makes
    them (bfloat16: float32 exponentials summed in 8 lanes, times the sum's reciprocal), the
    rows' sums in torch's order (:mod:`~tensorsurgery.ops.torch_sums`). Its result is float32
    (torch promotes by the float32 mask). A tensor of more than :data:`SAMPLE` elements takes
    its quartiles from the importances at torch's ``randint`` draws: ``seed`` and the stream
    ``offset`` of its first draw (None: not sampled)."""

    dtype: str
    seed: int | None = None
    offset: int = 0
    label: ClassVar[str] = "arcee_fusion"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    two_pass: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return "F32"

    def prepare(self, inputs: Sequence[Input], readers: Sequence[Reader]) -> FusionMix:
        import numpy as np

        from tensorsurgery.ops.arith import values
        from tensorsurgery.ops.blocks import STAT_BLOCK, input_blocks

        md, cols = self.dtype, _columns(inputs)
        n = inputs[0].range.length // element_size(inputs[0].dtype)
        picks = self._draws(n)
        kl = np.empty(n // cols, np.float32)
        found: list[np.ndarray] = []
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            for start, raws in input_blocks(inputs, readers, max(1, STAT_BLOCK // cols) * cols):
                base, x = (values(raw, i.dtype, md) for raw, i in zip(raws, inputs))
                rows = _divergences(base.reshape(-1, cols), x.reshape(-1, cols), md)
                kl[start // cols:start // cols + rows.size] = rows
                importance = _importance(base, x, rows, cols, md)
                if picks is None:
                    found.append(importance)
                else:  # the drawn indices in this block, each as often as drawn
                    lo, hi = np.searchsorted(picks, [start, start + base.size])
                    found.append(importance[picks[lo:hi] - start])
            ordered = np.concatenate(found)
            del found
            ordered.sort()  # NaNs last, as torch.sort puts them
            # torch: the float32 tensor of quantiles times (numel - 1), truncated to integers
            at = (np.asarray([0.25, 0.5, 0.75], np.float32) * np.float32(ordered.size - 1)).astype(np.int64)
            q1, median, q3 = (np.float32(v) for v in ordered[at])
            threshold = _scalar(median + _scalar(np.float32(1.5) * _scalar(q3 - q1, md), md), md)
        return FusionMix(md, float(threshold), kl.tobytes(), cols)

    def _draws(self, n: int) -> np.ndarray | None:
        """The sampled indices, sorted (torch's ``randint(n)``: each a 32-bit output modulo
        ``n``), or None where the whole tensor is taken."""
        import numpy as np

        from tensorsurgery.ops.mt_stream import Stream

        if n <= SAMPLE:
            return None
        assert self.seed is not None, "planned with a seed"
        draws = Stream(self.seed, self.offset).raw32(SAMPLE)
        np.remainder(draws, np.uint64(n), out=draws)  # in place: 8 MB, not four copies of it
        draws.sort()
        return draws.view(np.int64)  # below 2**32: the same values

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        raise NotImplementedError("arcee_fusion is two-pass: the interpreter applies what prepare returns")

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("arcee_fusion is two-pass")  # the interpreter never asks


def _scalar(x: np.floating, md: str) -> np.float32:
    """A float32 scalar rounded to the merge dtype (a one-element tensor of it)."""
    import numpy as np

    from tensorsurgery.ops.arith import rounded

    return cast("np.float32", rounded(np.asarray([x], np.float32), md)[0])


def _importance(base: np.ndarray, x: np.ndarray, kl: np.ndarray, cols: int, md: str) -> np.ndarray:
    """``abs(x - base) * kl`` of each element (float32 values of the merge dtype), ``kl`` its
    row's divergence (of the rows from the first)."""
    import numpy as np

    from tensorsurgery.ops.arith import rounded

    diff = np.abs(rounded(x - base, md))
    return rounded((diff.reshape(-1, cols) * kl[:diff.size // cols, None]).reshape(-1), md)


def _divergences(base: np.ndarray, x: np.ndarray, md: str) -> np.ndarray:
    """Each row's ``sum(p * log(p / q))``, ``p`` and ``q`` the softmaxes of the model's and the
    base's rows plus :data:`EPS`, every step rounded to the merge dtype, the sum torch's."""
    import numpy as np

    from tensorsurgery.ops.torch_sums import full_sum

    eps = np.float32(EPS)
    p, q = (_rounded(_rounded(_softmax(v, md), md) + eps, md) for v in (x, base))
    ratio = _rounded(p / q, md)
    terms = _rounded(p * _rounded(np.log(ratio.astype(np.float64)).astype(np.float32), md), md)
    sums = np.asarray([full_sum(row, md) for row in terms], np.float32)
    return _rounded(sums, md)


def _rounded(x: np.ndarray, md: str) -> np.ndarray:
    """:func:`~tensorsurgery.ops.arith.rounded` of an array of any shape."""
    from tensorsurgery.ops.arith import rounded

    return rounded(x.reshape(-1), md).reshape(x.shape)


#: Float32 lanes of torch's softmax vectors: its AVX2 kernel, the one torch runs on every x86-64
#: CPU of this decade (an AVX512 machine runs 16 lanes unless ``ATEN_CPU_CAPABILITY=avx2``).
LANES = 8


def _softmax(x: np.ndarray, md: str) -> np.ndarray:
    """torch's ``softmax(dim=-1)`` of float32 rows ``x`` [rows, cols] (values of the merge dtype)
    before its rounding to that dtype: ``e = exp(x - max)`` (float32; ours from a float64
    exponential, torch's SLEEF's to 1 unit), the row's sum of ``e`` in :data:`LANES` lanes, each
    in element order, the lanes by halves, then ``e * (1 / sum)``. The 16-bit kernel starts its
    lanes from zero and adds the last ``cols % LANES`` one by one after the lanes; the float32
    one starts from the first vector and adds the last ones into the first lanes (fewer than
    :data:`LANES` columns: added in order)."""
    import numpy as np

    rows, cols = x.shape
    e = np.exp((x - x.max(axis=1, keepdims=True)).astype(np.float64)).astype(np.float32)
    main = cols - cols % LANES
    vectors = e[:, :main].reshape(rows, -1, LANES)
    if md != "F32" or not main:
        vectors = np.concatenate((np.zeros((rows, 1, LANES), np.float32), vectors), axis=1)
    lanes = np.add.reduce(vectors, axis=1)  # over the middle axis: each lane in element order
    if md == "F32" and main:
        lanes[:, :cols - main] += e[:, main:]
    elif md == "F32":
        lanes[:, 0] = 0
        for d in range(cols):
            lanes[:, 0] += e[:, d]
    if md != "F32" or main:
        while lanes.shape[1] > 1:
            half = lanes.shape[1] // 2
            lanes = lanes[:, :half] + lanes[:, half:]
    total = lanes[:, 0].copy()
    if md != "F32":
        for d in range(main, cols):
            total += e[:, d]
    return cast("np.ndarray", e * (np.float32(1) / total)[:, None])


@dataclass(frozen=True, slots=True)
class FusionMix:
    """arcee_fusion's values once its statistics are known: the merge-dtype ``threshold`` and
    each row's divergence (``kl``: float32 bytes), rows of ``cols``; the model's value where an
    element's importance reaches the threshold, the base's elsewhere, as float32 (``base + (x -
    base) * mask``)."""

    dtype: str
    threshold: float
    kl: bytes
    cols: int
    label: ClassVar[str] = "arcee_fusion"
    verbatim: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def result_dtype(self, inputs: Sequence[Input]) -> str:
        return "F32"

    def apply(self, raws: Sequence[np.ndarray], inputs: Sequence[Input], start: int) -> np.ndarray:
        import numpy as np

        from tensorsurgery.ops.arith import blockwise_at, rounded, values

        md, cols = self.dtype, self.cols
        kl = np.frombuffer(self.kl, np.float32)
        threshold = np.float32(self.threshold)

        def compute(block: list[np.ndarray], first: int) -> np.ndarray:
            base, x = (values(raw, i.dtype, md) for raw, i in zip(block, inputs))
            diff = rounded(x - base, md)
            rows = kl[(first + np.arange(base.size)) // cols]
            mask = (rounded(np.abs(diff) * rows, md) >= threshold).astype(np.float32)
            return (base + diff * mask).view(np.uint8)

        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch makes them
            return blockwise_at(raws, [element_size(i.dtype) for i in inputs], 4, start, compute)

    def chunks(self, inputs: Sequence[Input], readers: Sequence[Reader], chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError("arcee_fusion's values are elementwise")  # the interpreter never asks

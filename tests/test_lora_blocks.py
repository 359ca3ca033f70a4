"""The LoRA merge's bounded memory (issue 20: peak RSS <= 64 MB): its product made a block of
columns at a time (ops/lora.column_blocks), its factor shared by the threads
(ops/lora_factor.SharedFactors). Tensors wide enough to be split, against torch's arithmetic (peft's
merge: ``f32(W) + (B @ A) * scaling`` rounded once) and against the same merge made unsplit (the
path tests/test_adapters.py checks against peft end to end): LoRA, DoRA (whose norms then add up
over the blocks) and a transposed (embedding) LoRA, bitwise."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tensorsurgery.io.byte_source import LocalFile
from tensorsurgery.ops import lora
from tensorsurgery.ops.base import ByteRange, Input
from tensorsurgery.ops.lora import BLAS_MIN_PRODUCT, MIN_ROWS, LoraMerge, column_blocks
from tensorsurgery.ops.lora_factor import SharedFactors


def test_column_blocks_cover_the_columns_and_bound_the_product():
    """Blocks tile 0..cols in order; split only when two fit, each then at least
    BLAS_MIN_PRODUCT multiply-adds over MIN_ROWS rows and under twice the narrowest; from r = 16
    on, a block's float32 product is at most 1 MiB (the unsplit window of 40,000 columns: 20 MB)."""
    for rank in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for cols in (1, 7, 200, 1000, 2047, 2048, 4100, 5632, 11008, 40000):
            blocks = column_blocks(cols, rank)
            assert blocks[0][0] == 0 and blocks[-1][1] == cols
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            widths = [c1 - c0 for c0, c1 in blocks]
            if len(blocks) > 1:
                assert all(MIN_ROWS * w * rank >= BLAS_MIN_PRODUCT for w in widths)
                assert max(widths) < 2 * min(widths)
            if rank >= 16:
                assert MIN_ROWS * max(widths) * 4 <= 1 << 20 or len(blocks) == 1 and cols * rank * MIN_ROWS < (
                    2 * BLAS_MIN_PRODUCT)


def _tensors(tmp_path: Path, rows: int, cols: int, r: int, *, transposed: bool, dora: bool):
    """W (bf16), A, B (f32) and a DoRA magnitude in one file, and their inputs."""
    g = torch.Generator().manual_seed(rows + cols + r)
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    a = torch.randn(r, rows if transposed else cols, generator=g) * 0.05
    b = torch.randn(cols if transposed else rows, r, generator=g) * 0.05
    m = torch.rand(rows, generator=g) + 0.5
    parts = [("BF16", w.view(torch.int16).numpy().tobytes(), w.shape), ("F32", a.numpy().tobytes(), a.shape),
             ("F32", b.numpy().tobytes(), b.shape)] + ([("F32", m.numpy().tobytes(), m.shape)] if dora else [])
    path, inputs, at = tmp_path / "t.bin", [], 0
    path.write_bytes(b"".join(p[1] for p in parts))
    for dtype, data, shape in parts:
        inputs.append(Input("s", f"k{at}", dtype, tuple(shape), ByteRange(LocalFile(path), at, len(data))))
        at += len(data)
    return (w, a, b, m), tuple(inputs)


def _merged(op: LoraMerge, inputs: tuple[Input, ...], n_rows: int, cols: int, starts: list[int]) -> bytes:
    """The op's rows made in the row ranges ``starts`` (as the writer's jobs) on fresh readers."""
    readers = [i.range.file.open() for i in inputs]
    try:
        out = np.zeros(n_rows * cols * 2, np.uint8)
        for s, e in zip(starts, [*starts[1:], n_rows]):
            op.rows_into(inputs, readers, s, e - s, out[s * cols * 2:e * cols * 2])
        return out.tobytes()
    finally:
        for reader in readers:
            reader.close()


@pytest.mark.parametrize("case", ["lora", "dora", "transposed"])
def test_split_products_make_torchs_bytes(tmp_path, monkeypatch, case):
    """W [300, 4100], r = 16: 8 column blocks (transposed, as an embedding's: B's 4100 rows in 8
    blocks), made in row ranges of 128, 1, 100 and 71 (a straddling row, a partial window).
    Bitwise torch's merge on one thread, and the unsplit product's bytes."""
    torch.set_num_threads(1)
    transposed, dora = case == "transposed", case == "dora"
    rows, cols, r = 300, 4100, 16
    (w, a, b, m), inputs = _tensors(tmp_path, rows, cols, r, transposed=transposed, dora=dora)
    scaling = 0.75
    op = LoraMerge(scaling=scaling, transposed=transposed, round_delta=False, merge_dtype="BF16", dtype="BF16",
                   dora=dora)
    starts = [0, 128, 129, 229]
    delta = (b @ a).T if transposed else b @ a
    assert len(column_blocks(cols, r)) == 8
    s = w.float() + delta * torch.tensor(scaling, dtype=torch.float32)
    if dora:
        ours_norm = lora.row_norms(np.ascontiguousarray(s.numpy()))  # the norm kernel test_adapters checks
        s = torch.from_numpy(m.numpy() / ours_norm)[:, None] * s
    expected = s.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    got = _merged(op, inputs, rows, cols, starts)
    assert got == expected
    monkeypatch.setattr(lora, "column_blocks", lambda cols, rank: [(0, cols)])
    assert _merged(op, inputs, rows, cols, starts) == got


def test_shared_factors_fill_once_and_hold_one_buffer():
    """Threads taking the same key share one fill; another key waits for the buffer and refills it."""
    pool, fills, started = SharedFactors(1), [], threading.Event()

    def fill(tag: int):
        def write(buf: np.ndarray) -> None:
            fills.append(tag)
            buf[:] = tag
        return write

    with pool.taken("a", 8, fill(1)) as held:
        with pool.taken("a", 8, fill(2)) as again:  # the same key: shared, not filled again
            assert again.ctypes.data == held.ctypes.data and fills == [1]
        seen: list[int] = []

        def other() -> None:
            started.set()
            with pool.taken("b", 16, fill(3)) as buf:
                seen.append(int(buf[0]))

        t = threading.Thread(target=other)
        t.start()
        started.wait()
        t.join(0.2)
        assert t.is_alive() and fills == [1]  # waits: the one buffer is in use
    t.join(5)
    assert seen == [3] and fills == [1, 3] and pool.slots() == 1


@pytest.mark.parametrize("rank", [1, 3, 8, 16, 64, 128])
def test_the_product_is_torchs_on_any_cpu(rank):
    """ops/fma_product against torch's float32 matmul (one thread): random factors, and factors of
    few significant bits whose sums often fall on float32 midpoints (where a float64 sum rounded
    again to float32 goes wrong), bitwise. numpy's own ``@`` (OpenBLAS) differs on AVX2 machines:
    4,896 of 76,800 elements at r = 8, measured."""
    from tensorsurgery.ops.fma_product import fma_product

    rng = np.random.default_rng(rank)
    torch.set_num_threads(1)
    cases = [(rng.standard_normal((200, rank)) * 0.01, rng.standard_normal((rank, 300))),
             (rng.integers(-4096, 4096, (200, rank)) * 2.0 ** -3, rng.integers(-4096, 4096, (rank, 300)) * 1.0001)]
    for left, right in cases:
        left, right = left.astype(np.float32), right.astype(np.float32)
        reference = (torch.from_numpy(left) @ torch.from_numpy(right)).numpy()
        made = fma_product(left, right, np.empty((200, 300), np.float32))
        assert made.view(np.int32).tolist() == reference.view(np.int32).tolist()


def test_the_product_rounds_once_where_a_float64_sum_would_round_twice():
    """(1 + 2^-23) + 2^-24 (1 + 2^-15) (1 - 2^-15) = 1 + 3 * 2^-24 - 2^-54: its float64 sum is
    the float32 midpoint 1 + 3 * 2^-24, which ties to 1 + 2^-22; the fused multiply-add (torch's,
    on a product of a size MKL runs its kernel on) rounds the exact sum, below the midpoint, to
    1 + 2^-23. Without fma_product's correction every element came out 1 + 2^-22."""
    from tensorsurgery.ops.fma_product import fma_product

    torch.set_num_threads(1)
    left = np.tile(np.array([[1 + 2 ** -23, 2 ** -24 * (1 + 2 ** -15)]], np.float32), (256, 1))
    right = np.tile(np.array([[1.0], [1 - 2 ** -15]], np.float32), (1, 300))
    reference = (torch.from_numpy(left) @ torch.from_numpy(right)).numpy()
    assert (reference == np.float32(1 + 2 ** -23)).all()
    assert (fma_product(left, right, np.empty((256, 300), np.float32)) == reference).all()


@pytest.mark.parametrize("transposed, round_delta, dtype", [(False, False, "BF16"), (True, False, "BF16"),
                                                           (False, True, "BF16"), (False, False, "F16"),
                                                           (False, True, "F16")])
def test_the_blas_product_stands_only_where_its_error_bound_settles_the_bytes(tmp_path, monkeypatch, transposed,
                                                                              round_delta, dtype):
    """A 16-bit merge takes BLAS's product where its bracket (ops/product_bound.py) gives one
    merged value, the chain's elsewhere. Factors whose first two ranks cancel (``|B| @ |A|`` far
    above ``B @ A``) leave some elements unsettled: the bytes are torch's (one thread) all the same,
    with the chain made for some elements and not all."""
    from tensorsurgery.ops import fma_product

    torch.set_num_threads(1)
    rows, cols, r = 300, 700, 16
    (w, a, b, _), inputs = _tensors(tmp_path, rows, cols, r, transposed=transposed, dora=False)
    a[1] = -a[0] * (1 + 1e-3 * torch.rand(a.shape[1], generator=torch.Generator().manual_seed(9)))
    a[0] *= 20
    a[1] *= 20
    b[:, 1] = b[:, 0]
    half = {"BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    w = w.float().to(half)
    inputs = (inputs[0]._replace(dtype=dtype), *inputs[1:])
    data = bytearray(inputs[0].range.file.path.read_bytes())
    for i, t in ((0, w.view(torch.int16)), (1, a), (2, b)):
        data[inputs[i].range.offset:inputs[i].range.offset + inputs[i].range.length] = t.numpy().tobytes()
    inputs[0].range.file.path.write_bytes(bytes(data))
    made = []
    chain = fma_product.fma_dots
    monkeypatch.setattr(fma_product, "fma_dots", lambda left, right: made.append(len(left)) or chain(left, right))
    op = LoraMerge(scaling=0.75, transposed=transposed, round_delta=round_delta, merge_dtype=dtype, dtype=dtype)
    delta = ((b @ a).T if transposed else b @ a) * torch.tensor(0.75, dtype=torch.float32)
    if round_delta:
        delta = delta.to(half).float()
    expected = (w.float() + delta).to(half).view(torch.int16).numpy().tobytes()
    assert _merged(op, inputs, rows, cols, [0, 128, 129, 229]) == expected
    assert 0 < sum(made) < rows * cols / 2, sum(made)

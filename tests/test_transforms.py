"""Tests for tensorsurgery.ops.transforms: casts equal torch's ``.to(dtype)`` bit for bit (every
16-bit pattern; millions of random float32 patterns and the special values), and the rotary row
permutation equals transformers' ``permute``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops import rotary_row_order
from tensorsurgery.ops.transforms import cast_chunk, permute_head

TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
INT_VIEW = {"F16": torch.int16, "BF16": torch.int16, "F32": torch.int32}
NP_BITS = {2: np.uint16, 4: np.uint32}


def torch_cast_bits(raw: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Bytes of torch's ``tensor.to(dst)`` of the ``src`` elements in ``raw`` (uint8)."""
    t = torch.from_numpy(raw.copy()).view(TORCH[src])
    return t.to(TORCH[dst]).view(INT_VIEW[dst]).numpy().view(np.uint8)


def assert_bitwise_equal(got: np.ndarray, expected: np.ndarray, src: str, dst: str, raw: np.ndarray):
    assert got.dtype == np.uint8 and got.shape == expected.shape
    if not np.array_equal(got, expected):
        size_in, size_out = element_size(src), element_size(dst)
        a, b = got.view(NP_BITS[size_out]), expected.view(NP_BITS[size_out])
        bad = np.flatnonzero(a != b)
        inputs = raw.view(NP_BITS[size_in])[bad[:5]]
        pytest.fail(f"{src}->{dst}: {bad.size} elements differ; first inputs "
                    f"{[hex(x) for x in inputs]}: got {[hex(x) for x in a[bad[:5]]]}, "
                    f"torch {[hex(x) for x in b[bad[:5]]]}")


def check(raw: np.ndarray, src: str, dst: str) -> None:
    """cast_chunk of ``raw`` equals torch, from bytes, from an array and into ``out``."""
    expected = torch_cast_bits(raw, src, dst)
    assert_bitwise_equal(cast_chunk(raw.tobytes(), src, dst), expected, src, dst, raw)
    assert_bitwise_equal(cast_chunk(raw, src, dst), expected, src, dst, raw)
    out = np.full(expected.size + 64, 0xAB, np.uint8)
    got = cast_chunk(memoryview(raw.tobytes()), src, dst, out=out)
    assert_bitwise_equal(got, expected, src, dst, raw)
    assert np.shares_memory(got, out)
    assert (out[expected.size:] == 0xAB).all()  # nothing written past the result


ALL_16 = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)


@pytest.mark.parametrize("src, dst", [("F16", "BF16"), ("F16", "F32"), ("BF16", "F16"), ("BF16", "F32")])
def test_every_16_bit_pattern(src, dst):
    check(ALL_16, src, dst)


def f32_specials() -> np.ndarray:
    values = [
        0x00000000, 0x80000000,                          # +0, -0
        0x7F800000, 0xFF800000,                          # +inf, -inf
        0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001,  # quiet and signalling NaNs
        0x7FBFFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA00000, 0x7F802000, 0x7F801FFF, 0x7FC0FFFF,
        0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF,  # float32 subnormals
        0x00800000, 0x7F7FFFFF, 0xFF7FFFFF,              # smallest normal, largest finite
        0x477FE000, 0x477FF000, 0x477FEFFF, 0x47800000,  # around float16's max (65504) and overflow
        0x33800000, 0x33000000, 0x33000001, 0x337FFFFF,  # around float16's smallest subnormal
        0x38800000, 0x387FE000, 0x387FC000,              # float16 normal/subnormal boundary
        0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,  # bfloat16 ties to even, up and down
        0x3F801000, 0x3F801001, 0x3F800FFF, 0x3F803000,  # float16 ties
        0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000,              # bfloat16 rounds up to inf
        0x3F800000, 0xBF800000, 0x40490FDB,              # 1, -1, pi
    ]
    return np.array(values, dtype=np.uint32).view(np.uint8)


@pytest.mark.parametrize("dst", ["F16", "BF16"])
def test_float32_specials(dst):
    check(f32_specials(), "F32", dst)


@pytest.mark.parametrize("dst", ["F16", "BF16"])
def test_float32_random_patterns(dst):
    rng = np.random.default_rng(20231215)
    bits = rng.integers(0, 1 << 32, size=3_000_000, dtype=np.uint64).astype(np.uint32)
    check(bits.view(np.uint8), "F32", dst)


@pytest.mark.parametrize("dst", ["F16", "BF16"])
def test_float32_every_exponent_near_the_rounding_points(dst):
    # Every sign and exponent with mantissas at and around the float16 / bfloat16 halfway points.
    mantissas = np.array([0, 1, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001,
                          0x18000, 0x7FE000, 0x7FF000, 0x7FFFFF], dtype=np.uint32)
    exps = np.arange(256, dtype=np.uint32) << 23
    bits = (exps[:, None] | mantissas[None, :]).ravel()
    bits = np.concatenate([bits, bits | 0x80000000])
    check(bits.view(np.uint8), "F32", dst)


def test_realistic_weights_bf16_to_f16():
    t = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    raw = t.view(torch.int16).numpy().view(np.uint8)
    check(raw, "BF16", "F16")


def test_same_dtype_returns_the_bytes():
    raw = np.arange(16, dtype=np.uint8)
    for dtype in ("F16", "BF16", "F32"):
        assert cast_chunk(raw.tobytes(), dtype, dtype).tobytes() == raw.tobytes()


def test_cast_example_from_docstring():
    assert cast_chunk(np.array([1.5], np.float32).tobytes(), "F32", "BF16").tobytes() == b"\xc0?"


def test_empty_chunk():
    for src, dst in (("BF16", "F16"), ("F32", "F16"), ("F16", "F32")):
        assert cast_chunk(b"", src, dst).size == 0


# --- rotary permutation ---------------------------------------------------------------------------------

def transformers_permute(w: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
    """transformers' ``permute`` (convert_llama_weights_to_hf.py / convert_mistral_weights_to_hf.py)."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


@pytest.mark.parametrize("rows, heads", [(2, 1), (8, 1), (8, 2), (8, 4), (16, 2), (64, 8), (4096 // 8, 8),
                                         (128 * 32, 32)])
def test_rotary_row_order_matches_transformers(rows, heads):
    order = rotary_row_order(rows, heads)
    w = torch.arange(rows, dtype=torch.int64)[:, None].expand(rows, 3).contiguous()
    expected = transformers_permute(w, heads, rows, 3)[:, 0].tolist()
    assert list(order) == expected
    assert sorted(order) == list(range(rows))


def test_rotary_row_order_literal():
    assert rotary_row_order(8, 2) == (0, 2, 1, 3, 4, 6, 5, 7)
    assert rotary_row_order(8, 1) == (0, 2, 4, 6, 1, 3, 5, 7)


@pytest.mark.parametrize("rows, heads", [(8, 3), (6, 2), (8, 0), (8, -2), (2, 2), (7, 7)])
def test_rotary_row_order_rejects(rows, heads):
    with pytest.raises(ValueError) as excinfo:
        rotary_row_order(rows, heads)
    assert str(excinfo.value) == f"{rows} rows do not split into {heads} heads of an even size"


@pytest.mark.parametrize("rows, heads, cols, dtype", [(8, 2, 4, torch.bfloat16), (32, 4, 16, torch.float16),
                                                      (16, 1, 3, torch.float32), (64, 8, 5, torch.bfloat16)])
def test_permute_head_matches_transformers(rows, heads, cols, dtype):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)).to(dtype)
    expected = transformers_permute(w, heads, rows, cols)
    raw = w.view(torch.uint8).numpy().reshape(-1)
    row_bytes = cols * w.element_size()
    head_bytes = raw.size // heads
    got = np.concatenate([permute_head(raw[h * head_bytes:(h + 1) * head_bytes], row_bytes)
                          for h in range(heads)])
    assert got.dtype == np.uint8 and got.size == raw.size
    assert torch.equal(torch.from_numpy(got.copy()).view(dtype).view(rows, cols), expected)
    # and it agrees with rotary_row_order
    order = rotary_row_order(rows, heads)
    assert torch.equal(expected, w[list(order)])


def test_permute_head_literal():
    head = np.arange(8, dtype=np.uint8)  # 4 rows of 2 bytes: rows 0, 1, 2, 3
    assert permute_head(head, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]

"""Recipes of one new operation: ``scale`` (a tensor times a constant), written by the pump and
checked by verify's comparison through the one interpreter, bitwise against torch's own
arithmetic; and the registry that makes an operation known by its label."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.formats.safetensors import encode_header
from tensorsurgery.formats.safetensors_output import SAFETENSORS
from tensorsurgery.io.byte_source import LocalFile, Readers
from tensorsurgery.ops import COPY, OPERATIONS, Copy, PermuteRotary, Scale, Zeros, register, rotary_row_order
from tensorsurgery.ops.base import Input
from tensorsurgery.ops.interpreter import tensor_chunks
from tensorsurgery.output.compare import compare_shard
from tensorsurgery.output.pump import Pump
from tensorsurgery.planning.planner import ByteRange, OutputTensor, Shard, output_tensor

SHARD_METADATA = dict(SAFETENSORS.metadata)  # what a planned shard's header says
TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _source(path: Path) -> dict[str, tuple[torch.Tensor, Input]]:
    """A safetensors file of odd-sized tensors in each float dtype, with values that round
    differently in each (subnormals, halfway cases, large values that overflow float16)."""
    g = torch.Generator().manual_seed(0)
    values = {
        "a": torch.randn(4099, generator=g) * 3,
        "b": torch.cat([torch.randn(1000, generator=g) * 1e-6, torch.tensor([65504.0, -65504.0, 3e38, 1e-40])]),
        "c": torch.randn(37, 129, generator=g),
    }
    tensors = {f"{k}.{d}": v.to(TORCH[d]) for k, v in values.items() for d in TORCH}
    save_file(tensors, str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    file = LocalFile(path)
    out = {}
    for name, t in tensors.items():
        start, end = header[name]["data_offsets"]
        shape = tuple(header[name]["shape"])
        out[name] = (t, Input("s", name, header[name]["dtype"], shape, ByteRange(file, 8 + n + start, end - start)))
    return out


def _shard(tensors: list[OutputTensor]) -> Shard:
    placed, offset = [], 0
    for t in tensors:
        placed.append(t._replace(offset=offset))
        offset += t.nbytes
    header = encode_header(((t.name, t.dtype, t.shape, t.offset, t.offset + t.nbytes) for t in placed),
                           SHARD_METADATA)
    return Shard("model.safetensors", header, tuple(placed))


def _scaled(source: dict, factor: float, out_dtype: str | None) -> list[OutputTensor]:
    made = []
    for name, (_, i) in source.items():
        dtype = out_dtype or i.dtype
        nbytes = i.range.length // element_size(i.dtype) * element_size(dtype)
        made.append(output_tensor(f"{name}.x{factor}", dtype, i.shape, 0, nbytes, (i,), Scale(factor)))
    return made


@pytest.mark.parametrize("factor", [0.5, 1.0 / 3.0, -2.75, 1e4])
@pytest.mark.parametrize("threads", [1, 3])
def test_scale_is_torch_times_a_constant(tmp_path, factor, threads):
    source = _source(tmp_path / "src.safetensors")
    shard = _shard(_scaled(source, factor, None))
    out = tmp_path / "model.safetensors"
    # Small buffers: elements straddle buffers and jobs split tensors on the cast threads.
    Pump(buffer_size=4096, direct=False, threads=threads).run([(shard, out)])
    with safe_open(str(out), "pt") as f:
        for name, (t, _) in source.items():
            got, want = f.get_tensor(f"{name}.x{factor}"), t * factor
            assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
    hashes, diffs = compare_shard(shard, out)
    assert diffs == [] and len(hashes) == len(source)


def test_scale_to_another_dtype_rounds_once(tmp_path):
    """Scaled in float32 and rounded once to the output's dtype (not to the input's on the way)."""
    source = _source(tmp_path / "src.safetensors")
    tensors = _scaled({k: v for k, v in source.items() if not k.endswith(".F32")}, 0.1, "F32")
    tensors += _scaled({k: v for k, v in source.items() if k.endswith(".F32")}, 0.1, "BF16")
    shard = _shard(tensors)
    out = tmp_path / "model.safetensors"
    Pump(buffer_size=8192, direct=False, threads=2).run([(shard, out)])
    with safe_open(str(out), "pt") as f:
        for t in shard.tensors:
            original = source[t.inputs[0].key][0]
            want = (original.to(torch.float32) * 0.1).to(TORCH[t.dtype])
            assert torch.equal(f.get_tensor(t.name).view(torch.uint8), want.view(torch.uint8)), t.name
    assert {t.transform for t in shard.tensors} == {"scale+cast"}


def test_verify_finds_a_scaled_tensor_that_is_wrong(tmp_path):
    source = _source(tmp_path / "src.safetensors")
    shard = _shard(_scaled(source, 0.5, None))
    out = tmp_path / "model.safetensors"
    Pump(direct=False).run([(shard, out)])
    wrong = shard.tensors[3]
    data = bytearray(out.read_bytes())
    data[len(shard.header) + wrong.offset + 5] ^= 1
    out.write_bytes(bytes(data))
    _, diffs = compare_shard(shard, out)
    assert [d.where for d in diffs] == [wrong.name] and "(transform: scale)" in diffs[0].what


def test_the_interpreter_and_the_pump_agree_on_every_operation(tmp_path):
    """One interpreter (:func:`tensor_chunks`) for verify, and the pump's fast paths (verbatim,
    elementwise on threads, chunked): the same bytes for copy, cast, scale, permute and zeros."""
    source = _source(tmp_path / "src.safetensors")
    base, c = source["c.BF16"]
    rows = Input(c.source, c.key, c.dtype, (32, 129), c.range._replace(length=32 * 129 * 2))  # 4 heads of 8
    tensors = [
        output_tensor("copy", c.dtype, c.shape, 0, c.range.length, (c,), COPY),
        output_tensor("cast", "F32", c.shape, 0, c.range.length * 2, (c,), COPY),
        output_tensor("scale", c.dtype, c.shape, 0, c.range.length, (c,), Scale(3.0)),
        output_tensor("permute", "F16", rows.shape, 0, rows.range.length, (rows,), PermuteRotary(4)),
        output_tensor("zeros", "F16", (7,), 0, 14, (), Zeros()),
    ]
    shard = _shard(tensors)
    out = tmp_path / "model.safetensors"
    Pump(buffer_size=4096, direct=False, threads=2).run([(shard, out)])
    with Readers() as readers:
        want = b"".join(bytes(chunk) for t in shard.tensors for chunk in tensor_chunks(t, readers.open))
    assert out.read_bytes() == shard.header + want
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("copy"), base)
        assert torch.equal(f.get_tensor("cast"), base.to(torch.float32))
        assert torch.equal(f.get_tensor("zeros"), torch.zeros(7, dtype=torch.float16))
        order = torch.tensor(rotary_row_order(32, 4))
        assert torch.equal(f.get_tensor("permute"), base[:32][order].to(torch.float16))
    assert [t.transform for t in shard.tensors] == ["none", "cast", "scale", "permute+cast", "zeros"]


def test_every_operation_is_registered_by_its_label():
    assert {OPERATIONS[k] for k in ("copy", "permute", "scale", "zeros")} == {Copy, PermuteRotary, Scale, Zeros}
    with pytest.raises(ValueError, match="two operations are labelled 'scale'"):
        register(type("Other", (), {"label": "scale"}))

"""The byte pump writes exactly the bytes :mod:`tensorsurgery.output.expected` defines and their sha256,
whatever the buffer size, the number of threads, and how tensors and elements fall across
buffers (a cast element split between two buffers, odd offsets, repeated tensors, zeros); and
``apply --threads 1`` and ``--threads N`` write identical outputs and records."""
from __future__ import annotations

import filecmp
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tensorsurgery.cli import main
from tensorsurgery.errors import ReadError
from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.formats.safetensors import encode_header
from tensorsurgery.io.byte_source import LocalFile, Readers
from tensorsurgery.ops import COPY, ZEROS
from tensorsurgery.ops.base import Input, RowSlice
from tensorsurgery.ops.interpreter import tensor_chunks
from tensorsurgery.output import pump
from tensorsurgery.output.pump import Pump
from tensorsurgery.planning.planner import ByteRange, OutputTensor, Shard, output_tensor

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


def _tensor(name: str, src: Path, offset: int, count: int, src_dtype: str, dtype: str | None = None,
            zeros: bool = False, row_slice: bool = False) -> OutputTensor:
    dtype = dtype or src_dtype
    length = count * element_size(src_dtype)
    part = RowSlice(0, 1, 2) if row_slice else None
    inputs = () if zeros else (Input("s", name, src_dtype, (count,), ByteRange(LocalFile(src), offset, length), part),)
    return output_tensor(name, dtype, (count,), 0, count * element_size(dtype), inputs, ZEROS if zeros else COPY)


def _shard(filename: str, tensors: list[OutputTensor]) -> Shard:
    placed, offset = [], 0
    for t in tensors:
        placed.append(t._replace(offset=offset))
        offset += t.nbytes
    header = encode_header(((t.name, t.dtype, t.shape, t.offset, t.offset + t.nbytes) for t in placed),
                           {"format": "pt"})
    return Shard(filename=filename, header=header, tensors=tuple(placed))


def _expected(shard: Shard) -> tuple[bytes, dict[str, str]]:
    data, hashes = [shard.header], {}
    with Readers() as readers:
        for t in shard.tensors:
            b = b"".join(bytes(c) for c in tensor_chunks(t, readers.open))
            data.append(b)
            hashes[t.name] = hashlib.sha256(b).hexdigest()
    return b"".join(data), hashes


@pytest.fixture
def source(tmp_path) -> Path:
    rng = np.random.default_rng(7)
    values = rng.standard_normal(300_000).astype(np.float32)
    values[::997] = np.nan
    values[::1013] = np.inf
    path = tmp_path / "source.bin"
    path.write_bytes(b"\x01\x02\x03" + values.tobytes())  # odd offsets for everything after
    return path


def _shards(src: Path) -> list[Shard]:
    t = _tensor
    first = [
        t("odd", src, 0, 3, "U8"),  # 3 bytes: every later tensor starts at an odd output offset
        t("f32-to-bf16", src, 3, 20_001, "F32", "BF16"),
        t("bf16-to-f32", src, 5, 30_003, "BF16", "F32"),  # an odd source offset too
        t("same-bf16-to-f32", src, 5, 30_003, "BF16", "F32"),  # repeated recipe: hashed once
        t("f16-to-bf16", src, 11, 9_999, "F16", "BF16"),
        t("zeros", src, 0, 5_001, "F16", zeros=True),
        t("verbatim", src, 7, 12_345, "F32"),
        t("slice", src, 9, 4_321, "BF16", row_slice=True),
        t("slice-cast", src, 9, 4_321, "BF16", "F16", row_slice=True),
        t("empty", src, 0, 0, "F32", "F16"),
        t("f32-to-f16", src, 1_000, 70_000, "F32", "F16"),  # more than one cast chunk
    ]
    second = [t("again-f32-to-bf16", src, 3, 20_001, "F32", "BF16"), t("tail", src, 13, 5, "F16", "F32")]
    return [_shard("a.safetensors", first), _shard("b.safetensors", second)]


@pytest.mark.parametrize("buffer_size,threads,lanes", [
    (4096, 1, None), (4096, 3, None), (8192, 2, 1), (1 << 20, 2, None), (4 << 20, 1, None), (8192, 4, None),
    (16384, 2, 2), (4096, 8, 3)])
def test_pump_writes_the_expected_bytes_and_hashes(source, tmp_path, buffer_size, threads, lanes, monkeypatch):
    shards = _shards(source)
    out = tmp_path / "out"
    out.mkdir()
    straddled, read_back = [], []
    real = pump._element_now
    monkeypatch.setattr(pump, "_element_now", lambda *a: straddled.append(a) or real(*a))
    real_back = pump._Lane._read_back
    monkeypatch.setattr(pump._Lane, "_read_back", lambda *a: real_back(*a) and not read_back.append(a[2]))
    hashes = Pump(buffer_size=buffer_size, direct=False, threads=threads, lanes=lanes).run(
        (s, out / s.filename) for s in shards)
    want_hashes = {}
    for s in shards:
        data, h = _expected(s)
        assert (out / s.filename).read_bytes() == data, s.filename
        want_hashes.update(h)
    assert hashes == want_hashes
    if (lanes or max(1, threads // 2)) == 1:
        assert read_back, "the repeated cast in the second shard should be read back from the first"
    if buffer_size == 4096 and lanes is None and threads < 4:
        assert straddled, "some cast element should straddle two buffers"


def test_a_cast_source_that_ends_early_is_a_read_error(source, tmp_path):
    shards = _shards(source)
    out = tmp_path / "out"
    out.mkdir()
    with open(source, "r+b") as f:
        f.truncate(1_000)  # the source changed since planning
    with pytest.raises(ReadError):
        Pump(buffer_size=8192, direct=False, threads=2).run((s, out / s.filename) for s in shards)


@pytest.mark.parametrize("lanes", [1, 2])
def test_a_read_error_in_one_lane_stops_all(source, tmp_path, lanes):
    shards = _shards(source) * 3  # six shards (names repeat: each lane writes its own folder)
    jobs = [(s, tmp_path / f"o{i}" / s.filename) for i, s in enumerate(shards)]
    for _, path in jobs:
        path.parent.mkdir()
    with open(source, "r+b") as f:
        f.truncate(200_000)
    with pytest.raises(ReadError):
        Pump(buffer_size=8192, direct=False, threads=4, lanes=lanes).run(jobs)


@pytest.mark.parametrize("dtype", [None, "float16", "float32"])
def test_threads_1_and_n_write_identical_outputs_and_records(tiny_mistral, tmp_path, dtype):
    manifest = tmp_path / "m.toml"
    text = (MANIFESTS / "solar-dus.toml").read_text()
    if dtype:
        text = text.replace("[output]\n", f'[output]\ndtype = "{dtype}"\n')
        assert f'dtype = "{dtype}"' in text
    text = text.replace("[output]\n", '[output]\nmax_shard_size = "60KB"\n')
    manifest.write_text(text)
    outs = []
    for threads in (1, 4):
        out = tmp_path / f"t{threads}"
        assert main(["apply", str(manifest), "--source", str(tiny_mistral), "--output", str(out), "--no-progress",
                     "--threads", str(threads)]) == 0
        assert len(list(out.glob("*.safetensors"))) > 1  # so that --threads 4 writes two shards at once
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    _, mismatch, errors = filecmp.cmpfiles(outs[0], outs[1], names, shallow=False)
    # The records may differ only in where a source file's sha256 came from: the first run of the
    # session reads the file, the second finds it in the hash cache.
    assert not errors and set(mismatch) <= {"tensorsurgery.json"}
    records = [json.loads((out / "tensorsurgery.json").read_text()) for out in outs]
    for record in records:
        for source in record["sources"]:
            for f in source["files"]:
                assert f.pop("sha256_from") in ("read", "cache")
    assert records[0] == records[1]

"""The output container seam (:mod:`tensorsurgery.formats.output_format`): the safetensors one
names shards and its index as Hugging Face does, writes ``{"format": "pt"}`` in every header and
describes a header that differs; and another container is one object that the planner, the
writer, ``--resume`` and ``verify`` all follow (shown with a container that names its files
otherwise).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cli_helpers import write_manifest
from tensorsurgery import api
from tensorsurgery.formats.safetensors import parse_header
from tensorsurgery.formats.safetensors_output import SAFETENSORS, SafetensorsOutput
from tensorsurgery.output.expected import expected_files
from tensorsurgery.planning.planner import build_plan
from tensorsurgery.verification.verifier import verify_output


def test_shards_and_index_are_named_as_hugging_face_names_them():
    assert SAFETENSORS.shard_name(0, 1) == "model.safetensors"
    assert [SAFETENSORS.shard_name(i, 3) for i in range(3)] == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert SAFETENSORS.index_name == "model.safetensors.index.json"
    assert SAFETENSORS.is_shard_name("model-00002-of-00003.safetensors")
    assert not SAFETENSORS.is_shard_name("config.json")


def test_index_lists_every_tensor_and_none_for_one_shard():
    assert SAFETENSORS.index([("model.safetensors", 8, ["a"])]) is None
    index = SAFETENSORS.index([("s1", 8, iter(["a", "b"])), ("s2", 4, iter(["c"]))])
    assert index is not None
    assert index["metadata"]["total_size"] == 12
    assert index["weight_map"] == {"a": "s1", "b": "s1", "c": "s2"}


def test_header_carries_the_pt_metadata_and_reads_back(tmp_path):
    raw = SAFETENSORS.encode_header([("w", "BF16", (2, 2), 0, 8)])
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw + bytes(8))
    assert json.loads(raw[8:])["__metadata__"] == {"format": "pt"}
    fd = os.open(path, os.O_RDONLY)
    try:
        found = SAFETENSORS.read_raw_header(fd, len(raw) + 8)
    finally:
        os.close(fd)
    assert found == raw
    header = SAFETENSORS.parse_header(path, found, len(raw) + 8)
    assert [(e.name, e.dtype, e.shape, e.nbytes) for e in header.entries] == [("w", "BF16", (2, 2), 8)]
    assert SAFETENSORS.read_raw_header(fd, 7) is None  # too short for a length prefix: nothing is read


def test_header_difference_names_what_differs():
    entries = [("a", "F32", (1,), 0, 4), ("b", "F32", (1,), 4, 8)]
    want = SAFETENSORS.encode_header(entries)
    numpy_made = SafetensorsOutput(metadata=(("format", "np"),)).encode_header(entries)
    assert SAFETENSORS.header_difference(numpy_made, want) == \
        "header metadata is {'format': 'np'}, expected {'format': 'pt'}"
    assert SAFETENSORS.header_difference(SAFETENSORS.encode_header([("a", "F32", (1,), 0, 4)]), want) == \
        "header lacks tensor 'b'"
    assert "length prefix" in SAFETENSORS.header_difference(None, want)


@dataclass(frozen=True, slots=True)
class _Renamed(SafetensorsOutput):
    """Another container: the same headers, its own file names and index name."""

    index_name: str = "weights.index.json"

    def shard_name(self, i: int, n: int) -> str:
        return f"weights-{i + 1}-of-{n}.safetensors"


def test_another_container_is_followed_by_planner_writer_and_verify(tmp_path, tiny_mistral):
    """One object decides the names: the planned shards and index, the files written, the
    expected files verify compares (and a flipped byte is still found)."""
    manifest = write_manifest(tmp_path, tiny_mistral, tmp_path / "out")
    m = api.load(manifest)
    plan = build_plan(m, api.resolve(m), output_format=_Renamed())
    names = [s.filename for s in plan.shards]
    assert len(names) > 1 and names[0] == f"weights-1-of-{len(names)}.safetensors"
    assert "weights.index.json" in [f.name for f in expected_files(plan)]
    assert all(parse_header(Path(s.filename), s.header[8:], s.nbytes).metadata == {"format": "pt"}
               for s in plan.shards)
    api.execute(plan)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("weights-*")) == sorted(names)
    assert json.loads((out / "weights.index.json").read_text())["weight_map"] == {
        t.name: s.filename for s in plan.shards for t in s.tensors}
    assert verify_output(plan, out).ok
    shard = out / names[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    assert [d.where for d in verify_output(plan, out).differences] == [plan.shards[-1].tensors[-1].name]

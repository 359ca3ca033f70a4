"""The provenance record written and read a piece at a time (issue 18, compact plan).

The writer streams ``tensorsurgery.json`` (``expected.json_stream``): its bytes must be exactly what
``json_bytes`` of the whole record makes (what the writer wrote before), whatever the piece size.
``read_record`` reads the head alone or the tensors one entry at a time; it must give the whole
read's values, and a record laid out any other way (reformatted, edited) must still be read, whole,
with the whole read's results and messages. Both verify modes pass on a clean output and catch an
edited tensor entry in a streamed and in a reformatted record.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import run
from tensorsurgery.errors import VerifyError
from tensorsurgery.output import expected, record_stream
from tensorsurgery.output.expected import json_bytes, json_stream
from tensorsurgery.output.record import read_record

REPO = Path(__file__).resolve().parent.parent
RECORD = "tensorsurgery.json"
A = "model.layers.3.mlp.down_proj.weight"

HEADS = [{}, {"a": 1, "b": [1, 2.5, None], "c": {"x": "line\nbreak", "y": []}, "d": {}}]
ENTRIES = [
    [],
    [("n1", {"shard": "s", "shape": [1, 2], "inputs": [{"a": "é\n"}], "f": 1.5, "t": (1, 2), "e": [], "d": {}}),
     ('ü"x', {"shape": []}), ("n3", 7), ("n4", [1, [2, {}]])],
]


@pytest.mark.parametrize("piece", [1, 10, 1 << 20])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("entries", ENTRIES)
def test_json_stream_is_json_bytes(monkeypatch, head, entries, piece):
    monkeypatch.setattr(expected, "STREAM_PIECE", piece)
    pieces = list(json_stream(head, "tensors", entries))
    assert b"".join(pieces) == json_bytes({**head, "tensors": dict(entries)})
    if piece == 1 and entries:
        assert len(pieces) == len(entries) + 1  # handed on as made, not held to the end


@pytest.fixture(scope="module")
def output(tmp_path_factory, tiny_mistral) -> Path:
    """A clean SOLAR-DUS output of ``tiny_mistral`` (read-only: tests edit copies)."""
    out = tmp_path_factory.mktemp("record-stream") / "out"
    from tensorsurgery.cli import main
    code = main(["apply", str(REPO / "manifests" / "solar-dus.toml"), "--source", str(tiny_mistral),
                 "--output", str(out), "--no-progress"])
    assert code == 0
    return out


def test_written_record_is_json_bytes_of_itself(output):
    """The streamed record is byte for byte the old writer's: ``json_bytes`` of its own content."""
    raw = (output / RECORD).read_bytes()
    assert json_bytes(json.loads(raw)) == raw
    assert len(json.loads(raw)["tensors"]) > 400


@pytest.mark.parametrize("piece", [7, 1 << 20])
def test_streamed_parts_equal_the_whole_read(monkeypatch, output, piece):
    monkeypatch.setattr(record_stream, "_PIECE", piece)
    whole, typed, head = read_record(output), read_record(output, "typed"), read_record(output, "head")
    assert typed.tensors == whole.tensors and len(whole.tensors) > 400
    assert head.tensors == {} and typed.data["tensors"] == {}
    for part in (typed, head):
        assert {k: v for k, v in part.data.items() if k != "tensors"} == \
               {k: v for k, v in whole.data.items() if k != "tensors"}
        assert (part.shards, part.files, part.link) == (whole.shards, whole.files, whole.link)
    raw = (output / RECORD).read_bytes()
    assert head.tensors_offset is not None
    assert raw[:head.tensors_offset].endswith(b',\n  "tensors": {')
    assert whole.tensors_offset is None


def reformatted(tmp_path: Path, output: Path) -> Path:
    """A copy of ``output`` whose record is the same JSON on one line (not the writer's layout)."""
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    (copy / RECORD).write_text(json.dumps(json.loads((copy / RECORD).read_text())))
    return copy


def test_other_layouts_are_read_whole(tmp_path, output):
    copy = reformatted(tmp_path, output)
    typed, head = read_record(copy, "typed"), read_record(copy, "head")
    assert typed.tensors == read_record(output).tensors
    assert head.tensors_offset is None and head.tensors == typed.tensors  # read whole


@pytest.mark.parametrize("tail", [b"x", b'\n  "extra": 1\n}\n', b"}"])
def test_broken_tail_gives_the_whole_reads_error(tmp_path, output, tail):
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    with open(copy / RECORD, "ab") as f:
        f.write(tail)
    with pytest.raises(VerifyError) as whole:
        read_record(copy)
    with pytest.raises(VerifyError) as typed:
        read_record(copy, "typed")
    assert str(typed.value) == str(whole.value)


def test_duplicate_entry_read_as_json_loads_reads_it(tmp_path, output):
    """A tensor entry written twice (the later one wins in json.loads): the stream gives way."""
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    raw = (copy / RECORD).read_bytes()
    at = raw.index(b',\n  "tensors": {') + len(b',\n  "tensors": {')
    entry = json.loads(raw)["tensors"][A]
    dup = f'\n    "{A}": {json.dumps({**entry, "sha256": "0" * 64})},'.encode()
    (copy / RECORD).write_bytes(raw[:at] + dup + raw[at:])
    assert read_record(copy, "typed").tensors[A].sha256 == entry["sha256"]  # the later entry, as json.loads
    assert read_record(copy, "typed").tensors == read_record(copy).tensors


@pytest.mark.parametrize("layout", ["streamed", "reformatted"])
def test_both_modes_pass_and_catch_an_edited_entry(capsys, tmp_path, tiny_mistral, output, layout):
    copy = reformatted(tmp_path, output) if layout == "reformatted" else tmp_path / "out"
    if layout == "streamed":
        shutil.copytree(output, copy)
    manifest = REPO / "manifests" / "solar-dus.toml"
    for argv in (["verify", copy], ["verify", manifest, copy, "--source", tiny_mistral]):
        code, out, err = run(capsys, *argv, "--no-progress")
        assert code == 0, out + err
    data = json.loads((copy / RECORD).read_text())
    data["tensors"][A]["dtype"] = "F16"
    text = json.dumps(data, indent=2) if layout == "streamed" else json.dumps(data)
    (copy / RECORD).write_text(text)
    code, out, err = run(capsys, "verify", manifest, copy, "--source", tiny_mistral, "--no-progress")
    assert code == 1
    assert f'tensors.{A}.dtype is "F16", expected "BF16"' in out + err

"""Broken and hostile inputs through ``tensorsurgery apply``: each one is refused with its own
one-line error (``tensorsurgery: error: ...`` naming the file and the tensor or key), exit code 2,
no traceback, and nothing written (no output folder, no temporary folder beside it).

Every safetensors header rule (tested at the unit level in test_format.py) is tried here through
the command line on a real sharded checkpoint: a copy of the ``tiny_mistral`` fixture with one
shard broken. Then the checkpoint-level faults: index, weight_map paths, config.json, manifest,
output path, and sources that cannot be stacked.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest

from helpers import write_manifest
from synthetic import TINY, make_mistral
from tensorsurgery.cli import main
from tensorsurgery.errors import HeaderError
from tensorsurgery.formats.safetensors import MAX_HEADER_SIZE, encode_header, read_header
from tensorsurgery.sources.checkpoint import INDEX_NAME

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
#: A real layer-changing job: SOLAR depth up-scaling (48 layers out of 32).
MANIFEST = MANIFESTS / "solar-dus.toml"

#: The shard that the header tests break (not the first, so the first reads fine before it).
SHARD = "model-00002-of-00004.safetensors"
OTHER_SHARD = "model-00001-of-00004.safetensors"
PREFIX = "tensorsurgery: error: "


# --- building broken checkpoints ------------------------------------------------------------------

def read_shard(path: Path) -> tuple[dict, bytes]:
    """A shard's header JSON (in file order) and its data section."""
    content = path.read_bytes()
    (n,) = struct.unpack("<Q", content[:8])
    return json.loads(content[8:8 + n]), content[8 + n:]


def write_shard(path: Path, header: dict | str | bytes, data: bytes) -> None:
    """Write the length prefix, ``header`` (a dict is dumped as JSON, non-ASCII as escapes) and ``data``."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def data_order(header: dict) -> list[str]:
    """Tensor names of a header JSON in the order of their data."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


class Broken:
    """A copy of the fixture in ``tmp_path/src`` to break; remembers what the message should name."""

    def __init__(self, fixture: Path, tmp_path: Path):
        self.root = shutil.copytree(fixture, tmp_path / "src")
        self.shard = self.root / SHARD
        self.header, self.data = read_shard(self.shard)
        # The tensor the entry rules break: second in data order, so one precedes it.
        first, self.tensor = data_order(self.header)[:2]
        self.start, self.end = self.header[self.tensor]["data_offsets"]
        assert self.start == self.header[first]["data_offsets"][1] > 0
        self.index = json.loads((self.root / INDEX_NAME).read_text())

    def entry(self, **fields) -> dict:
        """The broken tensor's entry with ``fields`` replaced."""
        return {**self.header[self.tensor], **fields}

    def rewrite(self, header: dict | str | bytes | None = None, data: bytes | None = None) -> None:
        """Write the shard again with ``header`` and/or ``data`` replaced."""
        write_shard(self.shard, self.header if header is None else header, self.data if data is None else data)

    def set_entry(self, value) -> None:
        self.rewrite({**self.header, self.tensor: value})

    def write_index(self) -> None:
        (self.root / INDEX_NAME).write_text(json.dumps(self.index, indent=2))


def _raw_header(b: Broken) -> bytes:
    content = b.shard.read_bytes()
    (n,) = struct.unpack("<Q", content[:8])
    return content[8:8 + n]


# Each case breaks one rule in the copy and returns what the message must say after "<shard path>: "
# (tensor names and offsets taken from the copy being broken).

def short_file(b: Broken) -> str:
    b.shard.write_bytes(b"\x08\x00\x00\x00\x00")
    return "file is 5 bytes, too small to hold a safetensors header (needs at least 8); re-download it"


def header_over_max(b: Broken) -> str:
    # 100 MB + 1 of header announced, and a sparse file long enough to hold it: only the size
    # rule can refuse it, before any of those bytes is read.
    n = MAX_HEADER_SIZE + 1
    with open(b.shard, "wb") as f:
        f.write(struct.pack("<Q", n) + b'{"')
        f.truncate(8 + n + 16)
    return (f"header length {n} exceeds the maximum of {MAX_HEADER_SIZE} bytes; "
            f"this is not a valid safetensors file")


def header_over_max_tiny(b: Broken) -> str:
    n = MAX_HEADER_SIZE + 1
    b.shard.write_bytes(struct.pack("<Q", n) + b"{}")
    return f"header length {n} exceeds the maximum of {MAX_HEADER_SIZE} bytes"


def header_past_end(b: Broken) -> str:
    size = b.shard.stat().st_size
    with open(b.shard, "r+b") as f:
        f.write(struct.pack("<Q", size - 8 + 1))
    return (f"header length {size - 7} points past the end of the file ({size} bytes); "
            f"the file is truncated or not safetensors")


def not_utf8(b: Broken) -> str:
    raw = _raw_header(b)
    at = raw.index(b.tensor.encode()) + 1
    b.rewrite(raw[:at] + b"\xff" + raw[at + 1:])
    return f"header is not valid UTF-8 (byte {at})"


def not_json(b: Broken) -> str:
    raw = _raw_header(b)
    at = raw.rindex(b"}")
    b.rewrite(raw[:at] + b" " + raw[at + 1:])  # same length: the last brace is gone
    return "header is not valid JSON (Expecting ',' delimiter"


def not_an_object(b: Broken) -> str:
    raw = _raw_header(b)
    b.rewrite(b"[]".ljust(len(raw)))
    return "header is JSON list, expected an object"


def duplicate_key(b: Broken) -> str:
    text = json.dumps(b.header, separators=(",", ":"))
    again = json.dumps({b.tensor: b.header[b.tensor]}, separators=(",", ":"))[1:-1]
    b.rewrite(text[:-1] + "," + again + "}")
    return f"header has duplicate key {b.tensor!r}"


def metadata_not_str(b: Broken) -> str:
    b.rewrite({**b.header, "__metadata__": {"format": 1}})
    return "__metadata__ must map strings to strings, found {'format': 1}"


def metadata_lone_surrogate(b: Broken) -> str:
    b.rewrite({**b.header, "__metadata__": {"format": "\ud800"}})  # dumped as the escape \ud800
    return "__metadata__ holds a lone surrogate escape (not valid Unicode)"


def name_lone_surrogate(b: Broken) -> str:
    header = {(k + "\udc00" if k == b.tensor else k): v for k, v in b.header.items()}
    b.rewrite(header)
    return f"tensor {b.tensor + chr(0xdc00)!r}: name holds a lone surrogate escape (not valid Unicode)"


def entry_not_object(b: Broken) -> str:
    b.set_entry([b.start, b.end])
    return f"tensor {b.tensor!r}: expected an object with dtype, shape, data_offsets"


def unknown_field(b: Broken) -> str:
    b.set_entry(b.entry(offsets=[b.start, b.end]))
    return f"tensor {b.tensor!r}: unknown field 'offsets'"


def missing_field(b: Broken) -> str:
    entry = b.entry()
    del entry["dtype"]
    b.set_entry(entry)
    return f"tensor {b.tensor!r}: unknown dtype None; known: BOOL, F4,"


def unknown_dtype(b: Broken) -> str:
    b.set_entry(b.entry(dtype="bfloat16"))
    return f"tensor {b.tensor!r}: unknown dtype 'bfloat16'; known: BOOL, F4,"


def negative_shape(b: Broken) -> str:
    b.set_entry(b.entry(shape=[-1, 16]))
    return f"tensor {b.tensor!r}: shape must be a list of non-negative integers, found [-1, 16]"


def float_shape(b: Broken) -> str:
    b.set_entry(b.entry(shape=[16.0]))
    return f"tensor {b.tensor!r}: shape must be a list of non-negative integers, found [16.0]"


def offsets_reversed(b: Broken) -> str:
    b.set_entry(b.entry(data_offsets=[b.end, b.start]))
    return (f"tensor {b.tensor!r}: data_offsets must be [start, end] with 0 <= start <= end, "
            f"found [{b.end}, {b.start}]")


def offsets_not_a_pair(b: Broken) -> str:
    b.set_entry(b.entry(data_offsets=[b.start]))
    return f"tensor {b.tensor!r}: data_offsets must be [start, end] with 0 <= start <= end"


def offsets_past_u64(b: Broken) -> str:
    b.set_entry(b.entry(data_offsets=[b.start, 2**64]))
    return f"tensor {b.tensor!r}: data_offsets must be [start, end] with 0 <= start <= end"


def first_offset_not_zero(b: Broken) -> str:
    header = {k: (v if k == "__metadata__" else {**v, "data_offsets": [o + 2 for o in v["data_offsets"]]})
              for k, v in b.header.items()}
    b.rewrite(header)
    first = data_order(b.header)[0]
    return f"tensor {first!r}: data starts at offset 2, expected 0 (tensors must be contiguous, starting at 0)"


def gap(b: Broken) -> str:
    b.set_entry(b.entry(data_offsets=[b.start + 2, b.end + 2]))
    return f"tensor {b.tensor!r}: data starts at offset {b.start + 2}, expected {b.start} (tensors must be contiguous"


def overlap(b: Broken) -> str:
    b.set_entry(b.entry(data_offsets=[b.start - 2, b.end]))
    return f"tensor {b.tensor!r}: data starts at offset {b.start - 2}, expected {b.start} (tensors must be contiguous"


def size_mismatch(b: Broken) -> str:
    shape = [*b.header[b.tensor]["shape"]]
    shape[-1] += 1
    b.set_entry(b.entry(shape=shape))
    n = b.end - b.start
    needs = n // (shape[-1] - 1) * shape[-1]
    return f"tensor {b.tensor!r}: data_offsets span {n} bytes but shape {shape} of BF16 needs {needs}"


def shape_overflows(b: Broken) -> str:
    b.set_entry(b.entry(shape=[2**32, 2**32, 2**32]))
    return f"tensor {b.tensor!r}: shape [4294967296, 4294967296, 4294967296] overflows a 64-bit byte count"


def sub_byte(b: Broken) -> str:
    b.set_entry(b.entry(dtype="F4", shape=[3]))
    return f"tensor {b.tensor!r}: 3 elements of F4 do not end on a byte boundary"


def trailing_bytes(b: Broken) -> str:
    b.rewrite(data=b.data + b"\0" * 8)
    return (f"tensors cover {len(b.data)} bytes of data but the file holds {len(b.data) + 8} after the "
            f"header (truncated or trailing bytes); re-download it")


def truncated_shard(b: Broken) -> str:
    with open(b.shard, "r+b") as f:
        f.truncate(b.shard.stat().st_size - 1000)
    return (f"tensors cover {len(b.data)} bytes of data but the file holds {len(b.data) - 1000} after "
            f"the header (truncated or trailing bytes); re-download it")


def truncated_header(b: Broken) -> str:
    raw = _raw_header(b)
    with open(b.shard, "r+b") as f:
        f.truncate(8 + len(raw) // 2)
    return f"header length {len(raw)} points past the end of the file ({8 + len(raw) // 2} bytes)"


HEADER_CASES: list[Callable[[Broken], str]] = [
    short_file, header_over_max, header_over_max_tiny, header_past_end, truncated_header, not_utf8,
    not_json, not_an_object, duplicate_key, metadata_not_str, metadata_lone_surrogate,
    name_lone_surrogate, entry_not_object, unknown_field, missing_field, unknown_dtype,
    negative_shape, float_shape, offsets_reversed, offsets_not_a_pair, offsets_past_u64,
    first_offset_not_zero, gap, overlap, size_mismatch, shape_overflows, sub_byte, trailing_bytes,
    truncated_shard,
]


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under ``folder``: relative path -> (sha256, size, mtime in ns), read in chunks."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            digest = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            st = p.stat()
            out[str(p.relative_to(folder))] = (digest.hexdigest(), st.st_size, st.st_mtime_ns)
    return out


# --- running apply ---------------------------------------------------------------------------------

def apply_refused(capsys, tmp_path: Path, manifest: Path, *, source: Path | None = None,
                  output: Path | None = None) -> str:
    """Run ``apply``; check exit 2, one error line, no traceback, nothing written. Returns the
    message after the prefix."""
    output = tmp_path / "out" if output is None else output
    existed = output.exists()
    before = sorted(os.listdir(tmp_path))
    watched = snapshot(tmp_path)
    argv = ["apply", str(manifest), "--output", str(output), "--no-progress"]
    if source is not None:
        argv += ["--source", str(source)]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    assert err.startswith(PREFIX) and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert output.exists() == existed
    assert not (output.parent / f".{output.name}.tensorsurgery-tmp").exists()
    assert sorted(os.listdir(tmp_path)) == before  # nothing beside it either
    assert snapshot(tmp_path) == watched  # and no file changed (the sources among them)
    return err[len(PREFIX):-1]


@pytest.mark.parametrize("case", HEADER_CASES, ids=lambda c: c.__name__)
def test_header_rule_through_apply(case, tiny_mistral, tmp_path, capsys):
    b = Broken(tiny_mistral, tmp_path)
    phrase = case(b)
    message = apply_refused(capsys, tmp_path, MANIFEST, source=b.root)
    assert message.startswith(f"{b.shard}: {phrase}"), message


def _bytes_read() -> int:
    return int(re.search(r"^rchar: (\d+)$", Path("/proc/self/io").read_text(), re.M).group(1))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_header_over_max_is_refused_without_reading_it(tiny_mistral, tmp_path):
    """The 100 MB + 1 header is refused from its 8-byte length prefix, not after reading it."""
    b = Broken(tiny_mistral, tmp_path)
    header_over_max(b)
    before = _bytes_read()
    with pytest.raises(HeaderError, match="exceeds the maximum"):
        read_header(b.shard)
    assert _bytes_read() - before < 1 << 20


# --- index, weight_map, shards ---------------------------------------------------------------------

def missing_shard(b: Broken) -> tuple[Path, str]:
    (b.root / "model-00003-of-00004.safetensors").unlink()
    return (b.root / INDEX_NAME,
            "names shard 'model-00003-of-00004.safetensors', which is missing; re-download it")


def _remap(b: Broken, shard: str) -> str:
    b.index["weight_map"][b.tensor] = shard
    b.write_index()
    return (f"tensor {b.tensor!r} maps to {shard!r}; shard names must be plain *.safetensors file "
            f"names inside the folder")


def dotdot_path(b: Broken) -> tuple[Path, str]:
    # A real file outside the folder, so only the path rule can stop it.
    outside = b.root.parent / SHARD
    shutil.copyfile(b.shard, outside)
    return b.root / INDEX_NAME, _remap(b, f"../{SHARD}")


def dotdot_inside(b: Broken) -> tuple[Path, str]:
    return b.root / INDEX_NAME, _remap(b, f"sub/../{SHARD}")


def absolute_path(b: Broken) -> tuple[Path, str]:
    return b.root / INDEX_NAME, _remap(b, str(b.shard))  # exists, but absolute


def absolute_system_path(b: Broken) -> tuple[Path, str]:
    return b.root / INDEX_NAME, _remap(b, "/etc/passwd")


def not_safetensors_name(b: Broken) -> tuple[Path, str]:
    return b.root / INDEX_NAME, _remap(b, "config.json")


def listed_but_absent(b: Broken) -> tuple[Path, str]:
    b.index["weight_map"][b.tensor] = OTHER_SHARD
    b.write_index()
    return (b.root / INDEX_NAME,
            f"tensor {b.tensor!r} is listed in {OTHER_SHARD} but that shard does not hold it; "
            f"the index and shards are from different versions")


def in_two_shards(b: Broken) -> tuple[Path, str]:
    # Append a tensor of the first shard, bytes and all, to the second: both shards are valid.
    other = b.root / OTHER_SHARD
    header, data = read_shard(other)
    name = data_order(header)[-1]
    start, end = header[name]["data_offsets"]
    entries = [(k, v["dtype"], v["shape"], *v["data_offsets"]) for k, v in
               sorted(((k, b.header[k]) for k in data_order(b.header)), key=lambda kv: kv[1]["data_offsets"])]
    entries.append((name, header[name]["dtype"], header[name]["shape"], len(b.data), len(b.data) + end - start))
    b.shard.write_bytes(encode_header(entries, {"format": "pt"}) + b.data + data[start:end])
    read_header(b.shard)  # valid on its own
    return b.root, f"tensor {name!r} is in two shards ({OTHER_SHARD} and {SHARD}); the checkpoint is inconsistent"


def not_in_weight_map(b: Broken) -> tuple[Path, str]:
    del b.index["weight_map"][b.tensor]
    b.write_index()
    return b.root / INDEX_NAME, f"tensor {b.tensor!r} in {SHARD} is missing from the weight_map"


def index_not_json(b: Broken) -> tuple[Path, str]:
    path = b.root / INDEX_NAME
    path.write_text(path.read_text()[:-20])
    return path, "not valid JSON ("


def index_without_weight_map(b: Broken) -> tuple[Path, str]:
    del b.index["weight_map"]
    b.write_index()
    return b.root / INDEX_NAME, "no weight_map; re-download the index"


def config_not_json(b: Broken) -> tuple[Path, str]:
    path = b.root / "config.json"
    path.write_text("{'num_hidden_layers': 32}")
    return path, "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"


def config_not_object(b: Broken) -> tuple[Path, str]:
    path = b.root / "config.json"
    path.write_text("[32]")
    return path, "expected a JSON object, found list"


def config_missing(b: Broken) -> tuple[Path, str]:
    (b.root / "config.json").unlink()
    return b.root, "has hf weights but no config.json; a checkpoint needs it next to its weights"


def config_layers_disagree(b: Broken) -> tuple[Path, str]:
    path = b.root / "config.json"
    config = json.loads(path.read_text())
    config["num_hidden_layers"] = 30
    path.write_text(json.dumps(config))
    return path, ("num_hidden_layers = 30 but the tensors hold 32 layers; the config and weights do "
                  "not belong together (use the config.json that came with these weights)")


def layer_missing(b: Broken) -> tuple[Path, str]:
    # Every tensor of layer 5 gone from the shards and the index: each file is valid on its own.
    gone = "model.layers.5."
    for shard in sorted(b.root.glob("*.safetensors")):
        header, data = read_shard(shard)
        kept = [k for k in data_order(header) if not k.startswith(gone)]
        entries, out, at = [], bytearray(), 0
        for k in kept:
            start, end = header[k]["data_offsets"]
            entries.append((k, header[k]["dtype"], header[k]["shape"], at, at + end - start))
            out += data[start:end]
            at += end - start
        shard.write_bytes(encode_header(entries, {"format": "pt"}) + bytes(out))
    b.index["weight_map"] = {k: v for k, v in b.index["weight_map"].items() if not k.startswith(gone)}
    b.write_index()
    return b.root, ("the tensors hold layers 0 to 31 but none of layer 5; the checkpoint is incomplete (a shard "
                    "or its tensors are missing): re-download it")


CHECKPOINT_CASES = [
    missing_shard, dotdot_path, dotdot_inside, absolute_path, absolute_system_path,
    not_safetensors_name, listed_but_absent, in_two_shards, not_in_weight_map, index_not_json,
    index_without_weight_map, config_not_json, config_not_object, config_missing,
    config_layers_disagree, layer_missing,
]


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=lambda c: c.__name__)
def test_broken_checkpoint_through_apply(case, tiny_mistral, tmp_path, capsys):
    b = Broken(tiny_mistral, tmp_path)
    where, phrase = case(b)
    message = apply_refused(capsys, tmp_path, MANIFEST, source=b.root)
    assert message.startswith(f"{where}: {phrase}"), message


# --- manifest, output path, sources -----------------------------------------------------------------

def test_manifest_not_toml(tiny_mistral, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "bad.toml", MANIFEST.read_text().replace('plan = "dus"', "plan = dus"))
    message = apply_refused(capsys, tmp_path, manifest, source=tiny_mistral)
    assert message.startswith(f"{manifest}: not valid TOML: "), message
    assert "line " in message  # says where


def test_manifest_not_utf8(tiny_mistral, tmp_path, capsys):
    manifest = tmp_path / "bad.toml"
    manifest.write_bytes(b'[source]\nmodel = "\xff"\n')
    message = apply_refused(capsys, tmp_path, manifest, source=tiny_mistral)
    assert message.startswith(f"{manifest}: cannot read the manifest: "), message


@pytest.mark.parametrize("where", ["equal", "inside", "deep-inside", "containing"])
def test_output_overlapping_the_source(where, tiny_mistral, tmp_path, capsys):
    src = shutil.copytree(tiny_mistral, tmp_path / "src")
    output = {"equal": src, "inside": src / "out", "deep-inside": src / "a" / "b",
              "containing": tmp_path}[where]
    message = apply_refused(capsys, tmp_path, MANIFEST, source=src, output=output)
    assert message == (f"{output.resolve()}: the output overlaps the source 'source' ({src.resolve()}); "
                       f"choose an output folder outside the source")
    assert not (src / "out").exists() and not (src / "a").exists()


def test_output_overlapping_the_source_through_a_symlink(tiny_mistral, tmp_path, capsys):
    src = shutil.copytree(tiny_mistral, tmp_path / "src")
    (tmp_path / "link").symlink_to(src)
    message = apply_refused(capsys, tmp_path, MANIFEST, source=src, output=tmp_path / "link" / "out")
    assert message.startswith(f"{tmp_path / 'link' / 'out'}: the output overlaps the source 'source' ({src})"), message
    assert not (src / "out").exists()


def test_sources_whose_layer_shapes_differ(tiny_mistral, tmp_path, capsys):
    # Same names and depth as the fixture, a wider MLP (intermediate 48 instead of 32).
    wide = make_mistral(tmp_path / "wide", replace(TINY, intermediate=48))
    manifest = write_manifest(tmp_path / "frankenmerge.toml", f"""
[sources.base]
model = "{tiny_mistral}"

[sources.wide]
model = "{wide}"

[rename]
preset = "mistral-to-llama"

[layers]
plan = "explicit"
arrangement = [{{ source = "base", layers = [0, 24] }}, {{ source = "wide", layers = [8, 32] }}]

[output]
path = "unused"
""")
    message = apply_refused(capsys, tmp_path, manifest)
    assert message == (f"{manifest}: layers: output layer 24 (source 'wide') cannot stack on output layer 0: "
                       f"'model.layers.0.mlp.down_proj.weight' has shape (16, 48) vs (16, 32); "
                       f"use sources of the same architecture")


def test_intact_copy_applies(tiny_mistral, tmp_path, capsys):
    """Control: the unbroken copy that every case above starts from goes through."""
    b = Broken(tiny_mistral, tmp_path)
    code = main(["apply", str(MANIFEST), "--source", str(b.root), "--output", str(tmp_path / "out"),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file()

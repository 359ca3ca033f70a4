"""``tensorsurgery verify``, driven through the command line (``tensorsurgery.cli.main``).

A clean output verifies (exit 0) for each seed manifest, in manifest mode and in record mode
(``verify OUTPUT``, with and without the sources at hand). Each kind of damage (a flipped byte,
two layers' bytes swapped under valid headers, a deleted or truncated shard, an edited
config.json, a tensor dropped from the index, an edited provenance hash) is caught with exit 1
and a line that names the tensor or the file. A missing output folder is one error line, exit 2.

Outputs are written under ``tmp_path`` with ``--output``; the shipped manifests are copied with a
small ``max_shard_size`` so the output has several shards.
"""
from __future__ import annotations

import json
import shutil
import struct
import tomllib
from pathlib import Path

import pytest

from cli_helpers import run
from tensorsurgery.cli import main

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
SEED_MANIFESTS = ["llama2-init-mistral", "solar-dus", "idus-1layer", "idus-8layer"]
INDEX = "model.safetensors.index.json"
RECORD = "tensorsurgery.json"
#: The tiny SOLAR output (48 layers, bf16) is ~230 kB of tensors: this gives 3 shards.
SHARD_SIZE = "100KB"

A = "model.layers.3.mlp.down_proj.weight"
B = "model.layers.4.mlp.down_proj.weight"


# --------------------------------------------------------------------------- helpers


def manifest_copy(folder: Path, name: str, **output: str) -> Path:
    """``manifests/{name}.toml`` copied into ``folder`` with extra ``[output]`` keys (the
    ``[output]`` table is the last one of every seed manifest, so they are appended)."""
    text = (MANIFESTS / f"{name}.toml").read_text(encoding="utf-8")
    text += "".join(f'\n{k} = "{v}"' for k, v in output.items()) + "\n"
    parsed = tomllib.loads(text)
    assert all(parsed["output"][k] == v for k, v in output.items())
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path




def apply(capsys, manifest: Path, source: Path, output: Path) -> Path:
    code, out, err = run(capsys, "apply", manifest, "--source", source, "--output", output, "--no-progress")
    assert code == 0, err
    return output


def shards(output: Path) -> list[Path]:
    return sorted(output.glob("model-*-of-*.safetensors"))


def tensor_range(output: Path, name: str) -> tuple[Path, int, int]:
    """(shard, absolute start, end) of ``name``'s bytes, read from the index and the raw header
    (independently of tensorsurgery's own reader)."""
    shard = output / json.loads((output / INDEX).read_text())["weight_map"][name]
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    start, end = header[name]["data_offsets"]
    return shard, 8 + n + start, 8 + n + end


def read_bytes(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def write_bytes(path: Path, start: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(data)


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


# --------------------------------------------------------------------------- damage


def flip_byte(output: Path) -> str:
    shard, start, end = tensor_range(output, A)
    pos = start + (end - start) // 2
    write_bytes(shard, pos, bytes([read_bytes(shard, pos, pos + 1)[0] ^ 0x01]))
    return A


def swap_layers(output: Path) -> str:
    """Swap the bytes of layer 3's and layer 4's down_proj (same shape): every header stays valid."""
    (sa, a0, a1), (sb, b0, b1) = tensor_range(output, A), tensor_range(output, B)
    assert a1 - a0 == b1 - b0
    da, db = read_bytes(sa, a0, a1), read_bytes(sb, b0, b1)
    assert da != db
    write_bytes(sa, a0, db)
    write_bytes(sb, b0, da)
    return A


def delete_shard(output: Path) -> str:
    shard = shards(output)[1]
    shard.unlink()
    return shard.name


def truncate_shard(output: Path) -> str:
    shard = shards(output)[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    return shard.name


def edit_config(output: Path) -> str:
    edit_json(output / "config.json", lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] - 1))
    return "config.json"


def drop_from_index(output: Path) -> str:
    edit_json(output / INDEX, lambda i: i["weight_map"].pop(A))
    return INDEX


def edit_record_hash(output: Path) -> str:
    def edit(record):
        entry = record["tensors"][A]
        entry["sha256"] = ("0" if entry["sha256"][0] != "0" else "1") + entry["sha256"][1:]
    edit_json(output / RECORD, edit)
    return RECORD


def edit_record_source(output: Path) -> str:
    """The record claims layer 3's down_proj came from source layer 5 (the bytes are untouched)."""
    def edit(record):
        record["tensors"][A]["source_key"] = "model.layers.5.mlp.down_proj.weight"
        record["layers"][3]["layer"] = 5
    edit_json(output / RECORD, edit)
    return RECORD


DAMAGE = {f.__name__: f for f in (flip_byte, swap_layers, delete_shard, truncate_shard, edit_config,
                                  drop_from_index, edit_record_hash, edit_record_source)}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def solar_manifest(tmp_path_factory) -> Path:
    return manifest_copy(tmp_path_factory.mktemp("manifest"), "solar-dus", max_shard_size=SHARD_SIZE)


@pytest.fixture(scope="module")
def orphan(tmp_path_factory, tiny_mistral, solar_manifest) -> Path:
    """A clean multi-shard SOLAR-DUS output whose recorded source is gone: applied from a copy of
    ``tiny_mistral`` that is then deleted. Manifest-mode tests verify it against ``tiny_mistral``
    itself (same files, same bytes); ``verify OUTPUT`` finds no source and checks the record only.
    Read-only: tests damage copies (:func:`damaged`)."""
    base = tmp_path_factory.mktemp("orphan")
    source = base / "source-copy"
    shutil.copytree(tiny_mistral, source)
    output = base / "solar-dus"
    code = main(["apply", str(solar_manifest), "--source", str(source), "--output", str(output), "--no-progress"])
    assert code == 0
    shutil.rmtree(source)
    assert len(shards(output)) >= 3
    return output


@pytest.fixture
def damaged(tmp_path, orphan):
    """A fresh copy of the clean output; call it with a damage name to apply that damage."""
    output = tmp_path / "out"
    shutil.copytree(orphan, output)

    def do(name: str) -> tuple[Path, str]:
        return output, DAMAGE[name](output)
    return do


# --------------------------------------------------------------------------- clean outputs


@pytest.mark.parametrize("name", SEED_MANIFESTS)
def test_clean_output_verifies(capsys, tmp_path, tiny_mistral, name):
    manifest = manifest_copy(tmp_path, name, max_shard_size=SHARD_SIZE)
    output = apply(capsys, manifest, tiny_mistral, tmp_path / "out")
    assert len(shards(output)) >= 2

    code, out, err = run(capsys, "verify", manifest, output, "--source", tiny_mistral)
    assert (code, err) == (0, "")
    assert out.startswith(f"verified {output}: ")
    assert "every byte matches the manifest applied to the sources" in out

    # Record mode, the recorded sources still present: re-derived and compared byte for byte.
    code, out, err = run(capsys, "verify", output)
    assert (code, err) == (0, "")
    assert "every byte matches the recorded manifest applied to the sources" in out


def test_clean_output_verifies_from_its_record_alone(capsys, orphan):
    code, out, err = run(capsys, "verify", orphan)
    assert (code, err) == (0, "")
    assert out.startswith(f"verified {orphan}: 11 files, 435 tensors (")
    assert "sources not found" in out


def test_clean_output_json(capsys, solar_manifest, tiny_mistral, orphan):
    code, out, _ = run(capsys, "verify", solar_manifest, orphan, "--source", tiny_mistral, "--json")
    report = json.loads(out)
    assert code == 0
    assert report["ok"] is True and report["differences"] == []
    assert report["mode"] == "manifest" and report["tensors"] == 435


# --------------------------------------------------------------------------- damage caught

#: damage -> the line manifest mode must print (``{x}`` is what the damage returned).
MANIFEST_LINES = {
    "flip_byte": f"{A}: bytes differ from {A!r} of ",
    "swap_layers": f"{A}: bytes differ from {A!r} of ",
    "delete_shard": "{x}: is missing",
    "truncate_shard": "{x}: is ",
    "edit_config": "config.json: num_hidden_layers is 47, expected 48",
    "drop_from_index": f"{INDEX}: weight_map.{A} is missing, expected \"model-",
    "edit_record_hash": f"{RECORD}: tensors.{A}.sha256 is ",
    "edit_record_source": f"{RECORD}: tensors.{A}.source_key is \"model.layers.5.mlp.down_proj.weight\", "
                          f"expected \"{A}\"",
}

#: The same in record mode (sources absent). Without the sources a record's claim about where a
#: tensor came from cannot be checked, so that edit is seen only in manifest mode. An edited hash
#: and edited bytes look alike without the sources: both are reported on the tensor.
RECORD_LINES = {
    "edit_config": "config.json: differs from what tensorsurgery wrote (sha256 in tensorsurgery.json)",
    "flip_byte": f"{A}: sha256 ",
    "swap_layers": f"{A}: sha256 ",
    "delete_shard": "{x}: is missing",
    "truncate_shard": "{x}: is ",
    "drop_from_index": f"{INDEX}: differs from what tensorsurgery wrote (sha256 in tensorsurgery.json)",
    "edit_record_hash": f"{A}: sha256 ",
}


def _assert_line(out: str, expected: str) -> str:
    lines = out.splitlines()
    match = [line for line in lines if line.startswith(expected)]
    assert match, f"no line starting with {expected!r} in:\n{out}"
    assert "difference(s); the output is NOT what" in lines[-1]
    return match[0]


@pytest.mark.parametrize("damage", list(MANIFEST_LINES))
def test_damage_caught_in_manifest_mode(capsys, damaged, solar_manifest, tiny_mistral, damage):
    output, x = damaged(damage)
    code, out, err = run(capsys, "verify", solar_manifest, output, "--source", tiny_mistral)
    assert (code, err) == (1, "")
    line = _assert_line(out, MANIFEST_LINES[damage].format(x=x))
    assert out.splitlines()[-1].endswith("the manifest says")
    if damage == "swap_layers":
        # Both moved tensors are named, each against its own source tensor.
        _assert_line(out, f"{B}: bytes differ from {B!r} of ")
        assert len(out.splitlines()) == 3
    elif damage == "truncate_shard":
        assert line.endswith("(truncated or padded)")
    elif damage == "edit_record_source":
        _assert_line(out, f"{RECORD}: layers[3].layer is 5, expected 3")
        assert len(out.splitlines()) == 3, out
    elif damage == "edit_config":
        # The value, and what it breaks: config.json no longer describes the tensors.
        _assert_line(out, "config.json: num_hidden_layers = 47 but the tensors hold 48 layers (model.layers.0-47)")
        assert len(out.splitlines()) == 3, out
    elif damage in ("flip_byte", "drop_from_index", "edit_record_hash"):
        assert len(out.splitlines()) == 2, out  # exactly one difference


@pytest.mark.parametrize("damage", list(RECORD_LINES))
def test_damage_caught_in_record_mode(capsys, damaged, damage):
    output, x = damaged(damage)
    code, out, err = run(capsys, "verify", output)
    assert (code, err) == (1, "")
    line = _assert_line(out, RECORD_LINES[damage].format(x=x))
    assert out.splitlines()[-1].endswith("its record says")
    if damage in ("flip_byte", "swap_layers", "edit_record_hash"):
        assert "differs from the record's" in line
    if damage == "swap_layers":
        _assert_line(out, f"{B}: sha256 ")


def test_damage_also_caught_with_recorded_sources(capsys, tmp_path, tiny_mistral, solar_manifest):
    """``verify OUTPUT`` when the recorded source is present compares bytes, not only hashes."""
    output = apply(capsys, solar_manifest, tiny_mistral, tmp_path / "out")
    swap_layers(output)
    code, out, _ = run(capsys, "verify", output)
    assert code == 1
    _assert_line(out, f"{A}: bytes differ from {A!r} of ")
    _assert_line(out, f"{B}: bytes differ from {B!r} of ")


def test_json_report_lists_differences(capsys, damaged, solar_manifest, tiny_mistral):
    output, _ = damaged("swap_layers")
    edit_config(output)
    code, out, err = run(capsys, "verify", solar_manifest, output, "--source", tiny_mistral, "--json")
    assert (code, err) == (1, "")
    report = json.loads(out)
    assert report["ok"] is False and report["mode"] == "manifest"
    assert report["output"] == str(output)
    assert {d["where"] for d in report["differences"]} == {A, B, "config.json"}
    assert all(set(d) == {"where", "what"} and d["what"] for d in report["differences"])

    code, out, _ = run(capsys, "verify", output, "--json")
    report = json.loads(out)
    assert code == 1 and report["mode"] == "record" and report["ok"] is False
    # config.json against its recorded sha256
    assert {d["where"] for d in report["differences"]} == {A, B, "config.json"}


# --------------------------------------------------------------------------- missing output


def test_missing_output_folder(capsys, tmp_path, solar_manifest, tiny_mistral):
    missing = tmp_path / "nope"
    code, out, err = run(capsys, "verify", solar_manifest, missing, "--source", tiny_mistral)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith(f"tensorsurgery: error: {missing}: output folder not found")

    # `verify OUTPUT` with no such folder: read as a manifest path; still one line, exit 2.
    code, out, err = run(capsys, "verify", missing)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and str(missing) in err

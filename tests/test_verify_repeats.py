"""verify and the layers DUS repeats: a repeated tensor (same recipe in manifest mode, same
recorded sha256 in record mode) is not hashed a second time but compared, so damage to either
copy must still be caught, named once, and reported with the damaged bytes' real sha256; and the
report is the same on one thread as on several."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from tensorsurgery import api
from tensorsurgery.cli import main

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
# DUS with overlap 8 on 32 layers: output layers 24..39 are source layers 8..23 again.
FIRST = "model.layers.10.mlp.down_proj.weight"
REPEAT = "model.layers.26.mlp.down_proj.weight"


@pytest.fixture
def dus(tiny_mistral, tmp_path) -> tuple[Path, Path]:
    source = tmp_path / "src"
    shutil.copytree(tiny_mistral, source)
    manifest = tmp_path / "dus.toml"
    manifest.write_text((MANIFESTS / "solar-dus.toml").read_text().replace(
        'model = "mistralai/Mistral-7B-v0.1"', f'model = "{source}"').replace(
        'path = "out/solar-10.7b-dus"', f'path = "{tmp_path / "out"}"\nmax_shard_size = "100KB"'))
    assert main(["apply", str(manifest), "--no-progress"]) == 0
    record = json.loads((tmp_path / "out" / "tensorsurgery.json").read_text())
    assert record["tensors"][FIRST]["sha256"] == record["tensors"][REPEAT]["sha256"]
    assert record["tensors"][FIRST]["shard"] != record["tensors"][REPEAT]["shard"]
    return manifest, tmp_path / "out"


def _range(output: Path, name: str) -> tuple[Path, int, int]:
    shard = output / json.loads((output / "model.safetensors.index.json").read_text())["weight_map"][name]
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        start, end = json.loads(f.read(n))[name]["data_offsets"]
    return shard, 8 + n + start, 8 + n + end


def _damage(output: Path, name: str) -> str:
    """Flip a byte of ``name``; returns the sha256 of its damaged bytes."""
    shard, start, end = _range(output, name)
    with open(shard, "r+b") as f:
        f.seek(start + 5)
        b = f.read(1)
        f.seek(start + 5)
        f.write(bytes([b[0] ^ 0x40]))
        f.seek(start)
        return hashlib.sha256(f.read(end - start)).hexdigest()


def _report(target: Path, output: Path | None, threads: int) -> list[tuple[str, str]]:
    report = api.verify(target, output, threads=threads)
    return [(d.where, d.what) for d in report.differences]


def _record_mode(manifest: Path, output: Path, threads: int) -> list[tuple[str, str]]:
    source = manifest.parent / "src"
    source.rename(source.with_name("src.hidden"))  # the record alone
    try:
        report = api.verify(output, threads=threads)
        assert report.mode == "record"
        return [(d.where, d.what) for d in report.differences]
    finally:
        source.with_name("src.hidden").rename(source)


def test_clean_dus_verifies_in_both_modes_on_any_thread_count(dus):
    manifest, output = dus
    for threads in (1, 3):
        assert _report(manifest, None, threads) == []
        assert _record_mode(manifest, output, threads) == []


@pytest.mark.parametrize("which", [FIRST, REPEAT])
def test_damage_to_either_copy_is_caught_once(dus, which):
    manifest, output = dus
    damaged = _damage(output, which)
    for threads in (1, 3):
        diffs = _report(manifest, None, threads)
        assert [where for where, _ in diffs] == [which], diffs
        assert "bytes differ" in diffs[0][1]
        diffs = _record_mode(manifest, output, threads)
        assert [where for where, _ in diffs] == [which], diffs
        assert damaged in diffs[0][1]


def test_damage_to_both_copies_is_caught_for_both(dus):
    manifest, output = dus
    first, repeat = _damage(output, FIRST), _damage(output, REPEAT)
    assert first == repeat  # the same flip in the same bytes
    for threads in (1, 3):
        assert sorted(w for w, _ in _report(manifest, None, threads)) == sorted([FIRST, REPEAT])
        diffs = _record_mode(manifest, output, threads)
        assert sorted(w for w, _ in diffs) == sorted([FIRST, REPEAT])
        assert all(first in what for _, what in diffs)


def test_a_record_hash_edited_for_the_repeat_only_is_caught(dus):
    manifest, output = dus
    path = output / "tensorsurgery.json"
    record = json.loads(path.read_text())
    record["tensors"][REPEAT]["sha256"] = "0" * 64
    path.write_text(json.dumps(record, indent=2))
    assert any(REPEAT in what for _, what in _report(manifest, None, 2))
    diffs = _record_mode(manifest, output, 2)
    assert [where for where, _ in diffs] == [REPEAT]

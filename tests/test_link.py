"""`apply --link`: output shards byte-identical to a source shard share its bytes (reflink or
hard link) instead of being written, and the result is still exactly what the manifest asks."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from tensorsurgery.cli import main
from tensorsurgery.families.layers import GENERIC_LAYERS
from tensorsurgery.formats.safetensors import read_header

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


def _apply(tmp_path: Path, source: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    assert main(["apply", str(MANIFESTS / "solar-dus.toml"), "--source", str(source), "--output", str(out),
                 "--no-progress", *extra]) == 0
    return out


def _tensors(folder: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).view(-1).view(torch.uint8).numpy().tobytes()
    return out


def test_link_shares_identical_source_shards_and_still_verifies(tiny_mistral, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(tiny_mistral, source)  # a copy: hard links must not touch the session fixture
    plain = _apply(tmp_path, source, "plain")
    linked = _apply(tmp_path, source, "linked", "--link")
    capsys.readouterr()

    # DUS keeps layers 0..23 as they are: the first source shard (embeddings and the first
    # layers) is identical, so it is shared rather than written.
    # DUS keeps layers 0..23 where they are: a source shard holding only those (and the
    # embeddings) is identical in the output, so it is shared; the others hold layers that move
    # or are used twice and are written. A hard link shares the inode; a reflink (btrfs, XFS)
    # has its own inode but the same bytes.
    def keeps_place(name: str) -> bool:
        index = GENERIC_LAYERS.index(name)
        return name == "model.embed_tokens.weight" or (index is not None and index < 24)

    expected = sorted(p.name for p in source.glob("*.safetensors")
                      if all(keeps_place(n) for n in read_header(p).tensors))
    assert expected, "the fixture should have a source shard that DUS leaves in place"
    shared = {}
    for out in linked.glob("*.safetensors"):
        for src in source.glob("*.safetensors"):
            if out.stat().st_ino == src.stat().st_ino or out.read_bytes() == src.read_bytes():
                shared[src.name] = out.name
    assert sorted(shared) == expected
    assert len(list(linked.glob("*.safetensors"))) == len(expected) + 1  # the rest, written
    assert len(list(plain.glob("*.safetensors"))) == 1  # without --link: one model.safetensors

    assert _tensors(linked) == _tensors(plain)
    assert main(["verify", str(MANIFESTS / "solar-dus.toml"), "--source", str(source), str(linked)]) == 0
    assert main(["verify", str(linked)]) == 0
    assert "every byte matches" in capsys.readouterr().out

    record = json.loads((linked / "tensorsurgery.json").read_text())
    assert record["link"] is True
    for out_name in shared.values():
        header = read_header(linked / out_name)
        data = (linked / out_name).read_bytes()
        for name, entry in header.tensors.items():
            want = hashlib.sha256(data[header.data_start + entry.start:header.data_start + entry.end]).hexdigest()
            assert record["tensors"][name]["sha256"] == want, name


def test_without_link_nothing_is_shared(tiny_mistral, tmp_path, capsys):
    out = _apply(tmp_path, tiny_mistral, "plain")
    capsys.readouterr()
    inodes = {p.stat().st_ino for p in tiny_mistral.glob("*.safetensors")}
    assert not inodes & {p.stat().st_ino for p in out.glob("*.safetensors")}
    assert json.loads((out / "tensorsurgery.json").read_text())["link"] is False

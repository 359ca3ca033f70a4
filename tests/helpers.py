"""Shared test helpers: synthetic checkpoints built from hand-made headers (no files), manifests
parsed from TOML text, and folder snapshots.

A synthetic :class:`~tensorsurgery.sources.checkpoint.Checkpoint` holds real
:class:`~tensorsurgery.formats.safetensors.Header` values: ``data_start`` is the length of the header
:func:`~tensorsurgery.formats.safetensors.encode_header` would write for those tensors, and offsets
are contiguous from 0, as in a file on disk.
"""
from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

from tensorsurgery.formats.safetensors import Header, TensorEntry, encode_header, tensor_nbytes
from tensorsurgery.manifest.toml import Manifest, parse_manifest
from tensorsurgery.sources.checkpoint import Checkpoint

#: (name, safetensors dtype, shape)
Spec = tuple[str, str, tuple[int, ...]]

#: Per-layer tensors of the synthetic decoder (suffixes after ``model.layers.N.``), in the
#: order they are written to the source shards (deliberately not alphabetical).
LAYER_TENSORS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("self_attn.q_proj.weight", (4, 4)),   # 32 bytes in BF16
    ("mlp.up_proj.weight", (8, 4)),        # 64 bytes
    ("input_layernorm.weight", (4,)),      # 8 bytes
)
#: Non-layer tensors of the synthetic decoder.
OUTER_TENSORS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("model.embed_tokens.weight", (10, 4)),  # 80 bytes
    ("model.norm.weight", (4,)),             # 8 bytes
    ("lm_head.weight", (10, 4)),             # 80 bytes
)


def layer_specs(layer: int, dtype: str = "BF16", prefix: str = "model.layers") -> list[Spec]:
    """The synthetic decoder's tensors of ``layer``."""
    return [(f"{prefix}.{layer}.{suffix}", dtype, shape) for suffix, shape in LAYER_TENSORS]


def decoder_specs(n_layers: int, dtype: str = "BF16") -> list[Spec]:
    """Every tensor of an ``n_layers`` synthetic decoder: embeddings, the layers, norm, lm_head."""
    outer = [(name, dtype, shape) for name, shape in OUTER_TENSORS]
    return outer[:1] + [s for i in range(n_layers) for s in layer_specs(i, dtype)] + outer[1:]


def make_header(path: Path, specs: Sequence[Spec]) -> Header:
    """A header for ``specs`` stored contiguously in this order, as a file at ``path`` would hold."""
    entries, offset = [], 0
    for name, dtype, shape in specs:
        n = tensor_nbytes(dtype, shape)
        entries.append(TensorEntry(name, dtype, tuple(shape), offset, offset + n))
        offset += n
    data_start = len(encode_header(((e.name, e.dtype, e.shape, e.start, e.end) for e in entries),
                                   {"format": "pt"}))
    return Header(path=path, data_start=data_start, entries=tuple(entries),
                  metadata=MappingProxyType({"format": "pt"}),
                  tensors=MappingProxyType({e.name: e for e in entries}))


def make_checkpoint(root: str | Path, shards: Mapping[str, Sequence[Spec]], config: Mapping[str, Any],
                    *, layout: str = "hf", extra_files: Iterable[str] = ()) -> Checkpoint:
    """A Checkpoint whose shard ``name`` holds ``shards[name]`` in that order; no file is touched."""
    root = Path(root)
    headers = {name: make_header(root / name, specs) for name, specs in shards.items()}
    weight_map = {spec[0]: name for name, specs in shards.items() for spec in specs}
    return Checkpoint(root=root, layout=layout, headers=MappingProxyType(headers),
                      weight_map=MappingProxyType(weight_map), config=MappingProxyType(dict(config)),
                      extra_files=tuple(extra_files))


def split_in_two(specs: Sequence[Spec], first: str = "model-00001-of-00002.safetensors",
                 second: str = "model-00002-of-00002.safetensors") -> dict[str, list[Spec]]:
    """``specs`` cut in two source shards (first half, second half)."""
    half = len(specs) // 2
    return {first: list(specs[:half]), second: list(specs[half:])}


def decoder_config(n_layers: int, **extra: Any) -> dict[str, Any]:
    """A small Mistral-like config.json for the synthetic decoder."""
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4,
            "intermediate_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
            "num_hidden_layers": n_layers, "vocab_size": 10, "sliding_window": 16,
            "max_position_embeddings": 64, "torch_dtype": "bfloat16", **extra}


def manifest_from_text(text: str, path: str | Path = "m.toml") -> Manifest:
    """Parse manifest TOML ``text`` as if read from ``path`` (no file is read)."""
    return parse_manifest(Path(path), text, tomllib.loads(text))


def write_manifest(path: Path, text: str) -> Path:
    """Write manifest ``text`` to ``path``; returns ``path``."""
    path.write_text(text, encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under ``folder``: relative path -> (sha256, size, mtime in ns)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size,
                                               st.st_mtime_ns)
    return out

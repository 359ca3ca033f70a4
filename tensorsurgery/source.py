"""Resolve a source (local folder; Hugging Face repo id in :mod:`tensorsurgery.hub`) into a
:class:`Checkpoint`: validated shard headers, weight map and config, no tensor data read.

Two layouts are understood: Hugging Face's (``model.safetensors`` or shards plus
``model.safetensors.index.json``, ``config.json``) and Mistral's native one
(``consolidated.safetensors`` or ``consolidated.NN.safetensors``, ``params.json``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Mapping

from .errors import SourceError
from .format import Header, read_header
from .layers import layer_index

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_NATIVE_SHARD = re.compile(r"consolidated(\.\d+)?\.safetensors")
#: Files copied from a source into the output (the weights, index and config are rewritten).
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|gguf|h5|msgpack|ckpt)|model\.safetensors\.index\.json"
                         r"|pytorch_model\.bin\.index\.json|config\.json|params\.json|README\.md|"
                         r"tensorsurgery\.json|\..*")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A source model as planning sees it.

    ``headers`` maps shard file name (relative to ``root``) to its header; ``weight_map`` maps
    tensor name to shard file name; ``config`` is config.json (for the native layout, built
    from params.json); ``extra_files`` are the small files to copy (tokenizer, generation config).
    ``revision`` is the resolved commit for hub sources.
    """

    root: Path
    layout: str
    headers: Mapping[str, Header]
    weight_map: Mapping[str, str]
    config: Mapping[str, Any]
    extra_files: tuple[str, ...]
    revision: str | None = None
    repo_id: str | None = None

    @property
    def num_layers(self) -> int:
        """Layers found in the tensor names (max index + 1)."""
        found = [i for i in map(layer_index, self.weight_map) if i is not None]
        return max(found) + 1 if found else 0


def load_checkpoint(root: str | os.PathLike[str], *, revision: str | None = None,
                    repo_id: str | None = None) -> Checkpoint:
    """Read the checkpoint folder ``root``: headers only, cross-checked with index and config.

    Raises:
        SourceError: missing folder or files, an index that disagrees with its shards, an unsafe
            shard path, a config that is not JSON or disagrees with the tensors.
        HeaderError: a shard breaks the safetensors rules.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: source folder not found; give a local folder or a Hugging Face repo id")
    # Absolute, so the provenance record still finds the source from another directory.
    root = root.resolve()
    files = sorted(p.name for p in root.iterdir())
    if INDEX_NAME in files or SINGLE_NAME in files:
        layout, config = "hf", _read_json(root / "config.json")
        headers, weight_map = _load_hf_weights(root, files)
    elif any(_NATIVE_SHARD.fullmatch(f) for f in files):
        from .native import config_from_params
        layout = "mistral"
        params = _read_json(root / "params.json")
        headers, weight_map = _load_unindexed(root, [f for f in files if _NATIVE_SHARD.fullmatch(f)])
        config = config_from_params(params, root / "params.json",
                                    {name: headers[shard].tensors[name] for name, shard in weight_map.items()})
    else:
        raise SourceError(f"{root}: no {SINGLE_NAME}, {INDEX_NAME} or consolidated.safetensors; "
                          f"only safetensors checkpoints are supported")
    ckpt = Checkpoint(root=root, layout=layout, headers=MappingProxyType(headers),
                      weight_map=MappingProxyType(weight_map), config=MappingProxyType(config),
                      extra_files=tuple(f for f in files if not _NOT_COPIED.fullmatch(f)
                                        and (root / f).is_file()),
                      revision=revision, repo_id=repo_id)
    _check_layer_count(ckpt)
    return ckpt


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: missing; a checkpoint needs it next to its weights") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SourceError(f"{path}: not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _load_hf_weights(root: Path, files: list[str]) -> tuple[dict[str, Header], dict[str, str]]:
    if INDEX_NAME not in files:
        return _load_unindexed(root, [SINGLE_NAME])
    index_path = root / INDEX_NAME
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index_path}: no weight_map; re-download the index")
    for name, shard in weight_map.items():
        _check_shard_name(index_path, name, shard)
    headers = {}
    for shard in sorted(set(weight_map.values())):
        if not (root / shard).is_file():
            raise SourceError(f"{index_path}: names shard {shard!r}, which is missing; re-download it")
        headers[shard] = read_header(root / shard)
    for name, shard in weight_map.items():
        if name not in headers[shard].tensors:
            raise SourceError(f"{index_path}: tensor {name!r} is listed in {shard} but that shard "
                              f"does not hold it; the index and shards are from different versions")
    owners = _owners(headers)
    for name, shards in owners.items():
        if len(shards) > 1:
            raise SourceError(f"{root}: tensor {name!r} is in two shards ({shards[0]} and {shards[1]}); "
                              f"the checkpoint is inconsistent")
        if name not in weight_map:
            raise SourceError(f"{index_path}: tensor {name!r} in {shards[0]} is missing from the weight_map")
    return headers, dict(weight_map)


def _check_shard_name(index_path: Path, name: str, shard: object) -> None:
    p = PurePosixPath(shard) if isinstance(shard, str) else None
    if (p is None or p.is_absolute() or ".." in p.parts or len(p.parts) != 1 or "\\" in shard
            or re.match(r"^[A-Za-z]:", shard) or p.suffix != ".safetensors"):
        raise SourceError(f"{index_path}: tensor {name!r} maps to {shard!r}; shard names must be "
                          f"plain *.safetensors file names inside the folder")


def _owners(headers: Mapping[str, Header]) -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    for shard, header in headers.items():
        for name in header.tensors:
            owners.setdefault(name, []).append(shard)
    return owners


def _load_unindexed(root: Path, shards: list[str]) -> tuple[dict[str, Header], dict[str, str]]:
    headers = {s: read_header(root / s) for s in shards}
    weight_map = {}
    for name, owners in _owners(headers).items():
        if len(owners) > 1:
            raise SourceError(f"{root}: tensor {name!r} is in two shards ({owners[0]} and {owners[1]})")
        weight_map[name] = owners[0]
    return headers, weight_map


def _check_layer_count(ckpt: Checkpoint) -> None:
    declared = ckpt.config.get("num_hidden_layers")
    if declared is not None and declared != ckpt.num_layers:
        where, key = ((ckpt.root / "config.json", "num_hidden_layers") if ckpt.layout == "hf"
                      else (ckpt.root / "params.json", "n_layers"))
        raise SourceError(f"{where}: {key} = {declared} but the tensors hold {ckpt.num_layers} layers; "
                          f"the config and weights do not belong together (use the {where.name} that "
                          f"came with these weights)")


def resolve_source(model: str, revision: str | None = None, *, name: str = "source",
                   download: bool = True) -> Checkpoint:
    """The checkpoint for a manifest source: a local folder if ``model`` is one, else a Hugging
    Face repo id resolved through :mod:`tensorsurgery.hub` (``download=False``: weights that are
    not cached are not downloaded, their headers are read remotely; for ``plan`` and ``--dry-run``).

    Raises:
        SourceError: neither a folder nor a resolvable repo id.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return load_checkpoint(path, revision=revision)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith((".", "/")):
        from .hub import resolve_hub_source
        return resolve_hub_source(model, revision, download=download)
    raise SourceError(f"source {name!r}: {model!r} is not a folder nor a Hugging Face repo id; "
                      f"pass --source PATH to a local copy")

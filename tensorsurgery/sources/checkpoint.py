"""One assembly of a source checkpoint, whatever read it (a local folder, the Hugging Face cache,
headers fetched over HTTP): which files make the checkpoint, the checks between its index, shards
and config, and which small files are copied into an output. No I/O here: readers
(:mod:`tensorsurgery.sources.local`, :mod:`tensorsurgery.sources.hub`) read what :func:`select_files` names and hand
it to :func:`assemble`.

Two layouts are understood: Hugging Face's (``model.safetensors`` or shards plus
``model.safetensors.index.json``, ``config.json``) and Mistral's native one
(``consolidated.safetensors`` or ``consolidated.NN.safetensors``, ``params.json``).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from tensorsurgery.errors import SourceError
from tensorsurgery.families.layers import GENERIC_LAYERS, LayerScheme
from tensorsurgery.families.registry import Family, family_of
from tensorsurgery.formats.safetensors import Header
from tensorsurgery.io.gcpause import paused_gc
from tensorsurgery.sources.native import config_from_params

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PARAMS_NAME = "params.json"
CARD_NAME = "README.md"
#: The provenance record every output holds (and a folder --force may replace).
RECORD_NAME = "tensorsurgery.json"
NATIVE_SHARD = re.compile(r"consolidated(\.\d+)?\.safetensors")
#: The small files an output takes from its base source, the same for every reader: tokenizers
#: (Hugging Face, sentencepiece, tiktoken, Mistral's tekken), chat templates, generation settings,
#: processors of multimodal models, licence texts, and the code of ``trust_remote_code`` models.
#: An allow-list, so weights of other formats (``pytorch_model.bin``), adapters
#: (``adapter_config.json``) and anything else a loader might pick up are never carried over.
COPIED_FILES = re.compile(
    r"tokenizer[\w.-]*|special_tokens_map\.json|added_tokens\.json"
    r"|generation_config\.json|vocab\.(json|txt)|merges\.txt|chat_template\.(json|jinja)|tekken\.json"
    r"|[^/]*\.tiktoken|(preprocessor|processor|video_preprocessor)_config\.json"
    r"|LICEN[CS]E(\.(md|txt))?|NOTICE(\.(md|txt))?|USE_POLICY\.md"
    r"|(configuration|modeling|tokenization|processing|image_processing)_\w+\.py")
#: Front matter keys of the source's card carried into the output's (``license: other`` needs all three).
LICENSE_KEYS = ("license", "license_name", "license_link")


@dataclass(frozen=True, slots=True)
class SourceFiles:
    """The files of a checkpoint folder that make the checkpoint, in one weight format.

    ``weights`` is empty when an index names the shards (read it, then :func:`index_weight_map`).
    """

    layout: str
    config: str
    index: str | None
    weights: tuple[str, ...]
    copied: tuple[str, ...]
    card: str | None

    @property
    def small(self) -> tuple[str, ...]:
        """The files read (or downloaded) before any weight: config, index, copied files, card."""
        return tuple(f for f in (self.config, self.index, *self.copied, self.card) if f)


@dataclass(frozen=True)  # not slots: the layer grouping is computed once, on first use
class Checkpoint:
    """A source model as planning sees it.

    ``headers`` maps shard file name (relative to ``root``) to its header; ``weight_map`` maps
    tensor name to shard file name; ``config`` is config.json (for the native layout, built from
    params.json); ``extra_files`` are the small files copied into an output (:data:`COPIED_FILES`);
    ``card_meta`` the licence keys of the source's model card. ``revision`` and ``repo_id`` are set
    for Hub sources; ``trust_root`` is the folder the files' real locations must stay in (the
    repo's cache folder for a Hub snapshot, whose files link into ``blobs/``).
    """

    root: Path
    layout: str
    headers: Mapping[str, Header]
    weight_map: Mapping[str, str]
    config: Mapping[str, Any]
    extra_files: tuple[str, ...] = ()
    revision: str | None = None
    repo_id: str | None = None
    card_meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    trust_root: Path | None = None

    @property
    def inside(self) -> Path:
        """The folder every file of this checkpoint must really be in."""
        return self.trust_root or self.root

    @cached_property
    def family(self) -> Family:
        """The model family config.json names (:data:`tensorsurgery.families.registry.GENERIC` if unknown)."""
        return family_of(self.config)

    @cached_property
    def layers(self) -> LayerScheme:
        """Where the decoder layers are in this checkpoint's own tensor names: the family's places
        in Hugging Face's layout, ``layers.N`` in Mistral's native one."""
        return GENERIC_LAYERS if self.layout == "mistral" else self.family.layers

    @cached_property
    def by_layer(self) -> Mapping[int | None, tuple[str, ...]]:
        """Tensor names by decoder layer index (None: outside the layers), in weight-map order."""
        return self._layer_split[0]

    @cached_property
    def layer_parts(self) -> Mapping[int, tuple[tuple[str, ...], tuple[str, ...]]]:
        """``(heads, tails)`` of the names of ``by_layer[i]`` (same order): name ``j`` is
        ``f"{heads[j]}{i}{tails[j]}"``. Planning renumbers every layer tensor, so names are split
        once here; two tuples of shared (interned) strings cost 16 bytes a name."""
        return self._layer_split[1]

    @cached_property
    def _layer_split(self) -> tuple[Mapping[int | None, tuple[str, ...]],
                                    Mapping[int, tuple[tuple[str, ...], tuple[str, ...]]]]:
        groups: dict[int | None, list[str]] = {}
        heads: dict[int, list[str]] = {}
        tails: dict[int, list[str]] = {}
        split, intern = self.layers.split, sys.intern
        with paused_gc():  # a list entry per tensor, no cycles: see gcpause
            for name in self.weight_map:
                found = split(name)
                if found is None:
                    groups.setdefault(None, []).append(name)
                    continue
                head, index, tail = found
                groups.setdefault(index, []).append(name)
                # Interned: the same few heads and tails repeat in every layer.
                heads.setdefault(index, []).append(intern(head))
                tails.setdefault(index, []).append(intern(tail))
            return (MappingProxyType({k: tuple(v) for k, v in groups.items()}),
                    MappingProxyType({k: (tuple(heads[k]), tuple(tails[k])) for k in heads}))

    @property
    def found_layers(self) -> int:
        """Layers found in the tensor names (max index + 1), extra layers included."""
        return max((i for i in self.by_layer if i is not None), default=-1) + 1

    @property
    def num_layers(self) -> int:
        """Decoder layers: those found in the tensor names, less the extra layers saved after them
        (DeepSeek-V3's multi-token prediction) when the checkpoint holds them."""
        found, declared = self.found_layers, self.family.declared_layers(self.config)
        extra = self.family.extra_layers(self.config)
        return declared if extra and isinstance(declared, int) and found == declared + extra else found


def select_files(names: Iterable[str], where: str) -> SourceFiles:
    """Pick the files that make a checkpoint from the top-level file ``names`` of a folder (pure).

    Hugging Face shards win over ``consolidated*.safetensors``: they need no key renaming and no
    rotary permutation. Only one weight format is ever read.

    Raises:
        SourceError: no safetensors weights, or the config of the chosen format is missing.
    """
    names = set(names)
    copied = tuple(sorted(n for n in names if COPIED_FILES.fullmatch(n)))
    card = CARD_NAME if CARD_NAME in names else None
    if INDEX_NAME in names or SINGLE_NAME in names:
        index = INDEX_NAME if INDEX_NAME in names else None
        files = SourceFiles("hf", CONFIG_NAME, index, () if index else (SINGLE_NAME,), copied, card)
    elif native := sorted(n for n in names if NATIVE_SHARD.fullmatch(n)):
        files = SourceFiles("mistral", PARAMS_NAME, None, tuple(native), copied, card)
    else:
        raise SourceError(f"{where}: no {SINGLE_NAME}, {INDEX_NAME} or consolidated.safetensors; only "
                          f"safetensors checkpoints are supported")
    if files.config not in names:
        raise SourceError(f"{where}: has {files.layout} weights but no {files.config}; a checkpoint needs it "
                          f"next to its weights")
    return files


def index_weight_map(index: Any, where: str) -> dict[str, str]:
    """The validated ``weight_map`` of a parsed ``model.safetensors.index.json`` (pure).

    Raises:
        SourceError: not an object, no weight_map, ``metadata`` not an object, or a shard name that
            is not a plain ``*.safetensors`` file name in the folder (it becomes a path).
    """
    if not isinstance(index, dict):
        raise SourceError(f"{where}: expected a JSON object, found {type(index).__name__}; re-download the index")
    if not isinstance(index.get("metadata", {}), (dict, type(None))):
        raise SourceError(f"{where}: metadata is {type(index['metadata']).__name__}, expected an object; "
                          f"re-download the index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{where}: no weight_map; re-download the index")
    seen: set[object] = set()
    for name, shard in weight_map.items():
        if shard not in seen:  # a few hundred shards for ~100k tensors: check each name once
            _check_shard_name(where, name, shard)
            seen.add(shard)
    return dict(weight_map)


def _check_shard_name(where: str, name: str, shard: object) -> None:
    p = PurePosixPath(shard) if isinstance(shard, str) else None
    if (p is None or p.is_absolute() or ".." in p.parts or len(p.parts) != 1 or "\\" in str(shard)
            or re.match(r"^[A-Za-z]:", str(shard)) or p.suffix != ".safetensors"):
        raise SourceError(f"{where}: tensor {name!r} maps to {shard!r}; shard names must be plain "
                          f"*.safetensors file names inside the folder")


@dataclass(frozen=True, slots=True)
class IndexSummary:
    """What an index says, kept small while the shards' headers are read: its shards, its tensor
    count and a digest of its (name, shard) pairs (the ~100k names of a large model need not stay
    in memory beside the headers that hold the same names). On a mismatch the reader reads the
    index again for the message (:func:`index_difference`)."""

    shards: tuple[str, ...]
    count: int
    digest: int


def summarize_index(weight_map: Mapping[str, str]) -> IndexSummary:
    """The :class:`IndexSummary` of a validated weight map."""
    return IndexSummary(tuple(sorted(set(weight_map.values()))), len(weight_map), _digest(weight_map))


def _digest(weight_map: Mapping[str, str]) -> int:
    # Order-free: a sum of the pairs' hashes (Python's str hash is fixed within a process).
    return sum(hash(pair) for pair in weight_map.items()) & 0xFFFF_FFFF_FFFF_FFFF


class IndexMismatch(SourceError):
    """The index and the shards disagree; :func:`index_difference` says how."""


def assemble(root: Path, files: SourceFiles, headers: Mapping[str, Header], config: Any, *,
             index: IndexSummary | None = None, card_meta: Mapping[str, Any] | None = None,
             revision: str | None = None, repo_id: str | None = None,
             trust_root: Path | None = None) -> Checkpoint:
    """Check what a reader read and make it a :class:`Checkpoint` (pure).

    Args:
        root: the checkpoint folder (for a Hub source, the cache snapshot).
        files: from :func:`select_files`.
        headers: every weight file's header, by file name.
        config: the parsed config.json (Hugging Face) or params.json (native).
        index: the summary of the index's validated weight map, when the layout has an index.
        card_meta: what the output's card takes from the source's (:func:`card_licence`).

    Raises:
        IndexMismatch: the index disagrees with its shards (the reader says where).
        SourceError: a tensor in two shards, a config that is not an object or disagrees with the
            tensors.
    """
    where = root / (files.index or files.config)
    # Built from the headers (so it keeps their name strings: the index's copies of ~100k names
    # need not stay in memory), then compared with the index as one dict.
    owned: dict[str, str] = {}
    for shard in sorted(headers):
        names = headers[shard].tensors
        if not owned.keys().isdisjoint(names):  # set operations in C: 1.7M names in the largest headers
            name = next(n for n in names if n in owned)
            raise SourceError(f"{root}: tensor {name!r} is in two shards ({owned[name]} and {shard}); "
                              f"the checkpoint is inconsistent")
        owned.update(dict.fromkeys(names, shard))
    if index is not None and (index.count, index.digest) != (len(owned), _digest(owned)):
        raise IndexMismatch(f"{where}: the weight_map and the shards disagree; the index and shards are from "
                            f"different versions")
    if not isinstance(config, dict):
        raise SourceError(f"{root / files.config}: expected a JSON object, found {type(config).__name__}")
    weight_map = owned
    if files.layout == "mistral":
        config = config_from_params(config, root / files.config,
                                    {n: headers[s].tensors[n] for n, s in weight_map.items()})
    ckpt = Checkpoint(root=root, layout=files.layout, headers=MappingProxyType(dict(headers)),
                      weight_map=MappingProxyType(dict(weight_map)), config=MappingProxyType(config),
                      extra_files=files.copied, revision=revision, repo_id=repo_id,
                      card_meta=MappingProxyType(dict(card_meta or {})), trust_root=trust_root)
    _check_layer_count(ckpt, root / files.config)
    return ckpt


def _check_layer_count(ckpt: Checkpoint, config_path: Path) -> None:
    missing = next((i for i in range(ckpt.found_layers) if i not in ckpt.by_layer), None)
    if missing is not None:
        raise SourceError(f"{ckpt.root}: the tensors hold layers 0 to {ckpt.found_layers - 1} but none of layer "
                          f"{missing}; the checkpoint is incomplete (a shard or its tensors are missing): "
                          f"re-download it")
    declared = ckpt.family.declared_layers(ckpt.config)
    if declared is not None and declared != ckpt.num_layers:
        key = "n_layers" if ckpt.layout == "mistral" else ckpt.family.count_name(ckpt.config)
        extra = ckpt.family.extra_layers(ckpt.config)
        also = f" (+{extra} {ckpt.family.extra_layers_key})" if extra else ""
        raise SourceError(f"{config_path}: {key} = {declared!r}{also} but the tensors hold {ckpt.found_layers} "
                          f"layers; the config and weights do not belong together (use the {config_path.name} "
                          f"that came with these weights)")


def card_licence(readme: str | None) -> dict[str, Any]:
    """The licence keys of a model card's front matter (what the output's card carries over)."""
    meta = front_matter(readme)
    return {k: meta[k] for k in LICENSE_KEYS if isinstance(meta.get(k), (str, list))}


def front_matter(readme: str | None) -> dict[str, Any]:
    """The YAML front matter of a model card, or {} when there is none or it is not valid YAML (a
    broken source card must not stop a run: the output's card only loses the licence)."""
    import yaml
    m = _FRONT_MATTER.match(readme or "")
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.DOTALL)


def index_difference(where: Path, weight_map: Mapping[str, str], headers: Mapping[str, Header]) -> SourceError:
    """The first way an index's weight map disagrees with what the shards hold, as an error."""
    owned = {name: shard for shard in sorted(headers) for name in headers[shard].tensors}
    for name, shard in weight_map.items():
        if name not in headers[shard].tensors:
            return SourceError(f"{where}: tensor {name!r} is listed in {shard} but that shard does not hold "
                               f"it; the index and shards are from different versions")
    for name, shard in owned.items():
        if name not in weight_map:
            return SourceError(f"{where}: tensor {name!r} in {shard} is missing from the weight_map")
    return SourceError(f"{where}: the weight_map and the shards disagree; the index and shards are from "
                       f"different versions")

"""The pure planning step: (Manifest, Checkpoints) -> Plan. No disk or network.

Every output tensor is a byte range of a source shard plus typed transform steps
(:mod:`tensorsurgery.transforms`). Shard files, config.json, the index and the model card are all
decided here, so ``plan`` and ``--dry-run`` show exactly what ``apply`` will write and ``verify``
knows exactly what to expect.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from ._version import __version__
from .checkpoint import Checkpoint
from .config import build_config
from .dtypes import CAST_DTYPES, element_size, is_castable
from .errors import ManifestError, PlanError
from .format import Header, encode_header
from .layers import LayerRef, dus, interlock, keep, seams
from .manifest import Manifest
from .rules import Renamed, Renamer, compile_renamer, get_preset
from .transforms import Cast, PermuteRotary, Step, describe, rotary_row_order

SHARD_METADATA = MappingProxyType({"format": "pt"})
SINGLE_SHARD = "model.safetensors"


@dataclass(frozen=True, slots=True)
class ByteRange:
    """``length`` bytes of ``path`` starting at absolute file offset ``offset``."""

    path: Path
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """One output tensor: where its bytes come from and the steps that change them on the way.

    ``offset`` is its start in its shard's data section; ``source`` is None only for a tensor
    made of zeros.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    source_name: str
    source_key: str
    source_dtype: str
    source: ByteRange | None
    steps: tuple[Step, ...] = ()

    @property
    def transform(self) -> str:
        """The steps in one word: ``none``, ``cast``, ``permute``, ``permute+cast``, ``slice``, ``zeros``..."""
        return describe(self.steps)


@dataclass(frozen=True, slots=True)
class Shard:
    """An output file: its encoded header and its tensors in data order. ``link`` names a source
    file that is byte-identical to this shard (planned with ``link=True``): it may be hard-linked
    or reflinked instead of written."""

    filename: str
    header: bytes
    tensors: tuple[OutputTensor, ...]
    link: Path | None = None

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return len(self.header) + self.data_size


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """A source as the plan records it (for provenance and display). ``inside`` is the folder its
    files must really be in; ``files`` its weight files."""

    name: str
    model: str
    root: Path
    layout: str
    revision: str | None
    files: tuple[str, ...]
    repo_id: str | None = None
    inside: Path | None = None


@dataclass(frozen=True, slots=True)
class CopyFile:
    """A small file copied byte for byte from a source folder into the output."""

    source: Path
    name: str
    inside: Path


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything ``apply`` will write, computed from headers alone. ``card`` is the model card's
    text (README.md); ``card_meta`` the front matter it carries over from the base source's card."""

    output: Path
    sources: tuple[SourceInfo, ...]
    layers: tuple[LayerRef, ...]
    seams: tuple[tuple[int, int], ...]
    shards: tuple[Shard, ...]
    index: Mapping[str, Any] | None
    config: Mapping[str, Any]
    copy_files: tuple[CopyFile, ...]
    manifest_text: str
    manifest_name: str = "manifest.toml"
    card: str | None = None
    card_meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    family: str = "generic"

    @property
    def total_size(self) -> int:
        """Tensor bytes (``metadata.total_size`` of the index)."""
        return sum(s.data_size for s in self.shards)

    @property
    def nbytes(self) -> int:
        """Bytes of all shard files, headers included."""
        return sum(s.nbytes for s in self.shards)

    @property
    def written_nbytes(self) -> int:
        """Bytes of the shard files ``apply`` writes (linked shards excluded)."""
        return sum(s.nbytes for s in self.shards if s.link is None)

    @property
    def tensors(self) -> tuple[OutputTensor, ...]:
        return tuple(t for s in self.shards for t in s.tensors)


def build_plan(manifest: Manifest, checkpoints: Mapping[str, Checkpoint], *, link: bool = False) -> Plan:
    """Plan the output of ``manifest`` applied to ``checkpoints`` (keyed by source name).

    With ``link``, every shard of the first source whose tensors all pass through unchanged
    (same names, dtypes and bytes) becomes an output shard of its own, byte-identical to that
    source file (its header reused), whatever ``max_shard_size`` says; the writer can then link
    it instead of copying. The other tensors are sharded as usual.

    Raises:
        PlanError: a layer out of range (naming the arrangement position), two tensors renamed
            to one name, a renamed layer tensor without its layer index, layers whose shapes
            cannot stack, a permutation that does not fit the head count, an output with no
            tensors or a layer with none.
        ManifestError: an unknown preset, a name no preset rule maps, an invalid replacement.

    Example:
        >>> plan = build_plan(load_manifest("manifests/solar-dus.toml"), {"source": ckpt})  # doctest: +SKIP
        >>> len(plan.layers)                                                              # doctest: +SKIP
        48
    """
    base = manifest.sources[0].name
    arrangement = _arrangement(manifest, checkpoints)
    picks = _pick_tensors(manifest, checkpoints, arrangement)
    _check_stackable(manifest, checkpoints, picks)
    dtype = CAST_DTYPES[manifest.output.dtype] if manifest.output.dtype else None
    tensors = sorted((_output_tensor(p, checkpoints, dtype) for p in picks.values()),
                     key=lambda t: (_natural_key(t.name), t.name))
    linked = _identical_source_shards(tensors, checkpoints[base]) if link else []
    taken = {t.name for _, group in linked for t in group}
    groups = [(None, group) for group in _cut([t for t in tensors if t.name not in taken],
                                               manifest.output.max_shard_size)]
    shards = _name_shards(linked + groups)
    preset = get_preset(manifest.rename.preset) if manifest.rename.preset else None
    config = build_config({n: c.config for n, c in checkpoints.items()}, base, arrangement,
                          preset=preset, dtype=dtype, overrides=manifest.config)
    base_ckpt = checkpoints[base]
    plan = Plan(
        output=Path(manifest.output.path),
        sources=tuple(_source_info(s.name, s.model, checkpoints[s.name]) for s in manifest.sources),
        layers=arrangement, seams=seams(arrangement), shards=shards, index=_index(shards),
        config=MappingProxyType(config),
        copy_files=tuple(CopyFile(base_ckpt.root / f, f, base_ckpt.inside) for f in base_ckpt.extra_files),
        manifest_text=manifest.text, manifest_name=manifest.path.name,
        card_meta=base_ckpt.card_meta, family=base_ckpt.family.name,
    )
    from .card import model_card  # the card describes the plan: it is made from it
    return replace(plan, card=model_card(plan))


def _source_info(name: str, model: str, ckpt: Checkpoint) -> SourceInfo:
    return SourceInfo(name, model, ckpt.root, ckpt.layout, ckpt.revision, tuple(sorted(ckpt.headers)),
                      repo_id=ckpt.repo_id, inside=ckpt.inside)


def _arrangement(manifest: Manifest, checkpoints: Mapping[str, Checkpoint]) -> tuple[LayerRef, ...]:
    spec, base = manifest.layers, manifest.sources[0].name
    n = checkpoints[base].num_layers
    where = f"{manifest.path}: layers"
    if spec.plan == "explicit":
        refs = []
        for i, seg in enumerate(spec.arrangement):
            src = seg.source or base
            have = checkpoints[src].num_layers
            if seg.stop > have:
                raise PlanError(f"{where}.arrangement[{i}]: layers {seg.start}..{seg.stop - 1} of source "
                                f"{src!r}, which has {have} layers (0..{have - 1})")
            refs += [LayerRef(src, layer) for layer in range(seg.start, seg.stop)]
        return tuple(refs)
    if spec.plan == "keep":
        layers = keep(n)
    else:
        assert spec.overlap is not None  # the manifest parser requires it for dus and idus
        if spec.overlap >= n:
            raise PlanError(f"{where}.overlap: {spec.overlap} must be smaller than the source's {n} layers")
        layers = dus(n, spec.overlap) if spec.plan == "dus" else interlock(n, spec.overlap, spec.group or 1)
    return tuple(LayerRef(base, layer) for layer in layers)


@dataclass(frozen=True, slots=True)
class _Pick:
    out: str
    source: str
    key: str
    permute: str | None
    position: int | None


def _pick_tensors(manifest: Manifest, checkpoints: Mapping[str, Checkpoint],
                  arrangement: tuple[LayerRef, ...]) -> dict[str, _Pick]:
    base = manifest.sources[0].name
    by_layer: dict[str, dict[int | None, list[str]]] = {}
    renamers = {}
    for name, ckpt in checkpoints.items():
        try:
            renamers[name] = compile_renamer(manifest.rename, ckpt.layout)
        except ManifestError as e:
            raise ManifestError(f"{manifest.path}: {e}") from None
        by_layer[name] = {}
        index = ckpt.family.layers.index
        for key in ckpt.weight_map:
            by_layer[name].setdefault(index(key), []).append(key)
    # Non-layer tensors come from the base, or from the source manifest.tensor_sources names.
    owners = manifest.tensor_sources
    wanted: list[tuple[str, str, int | None]] = [
        (src, key, None) for src in dict.fromkeys((base, *owners.values())) for key in by_layer[src].get(None, [])]
    for pos, ref in enumerate(arrangement):
        wanted += [(ref.source, key, pos) for key in by_layer[ref.source].get(ref.layer, [])]
    picks: dict[str, _Pick] = {}
    replaced: set[str] = set()
    for src, key, pos in wanted:
        renamed = _rename(manifest, renamers[src], key)
        if renamed is None:
            continue
        out = renamed.name
        if pos is None and owners.get(out, base) != src:
            if src == base:  # the base's own, replaced by another source's
                replaced.add(out)
            continue
        if pos is not None:
            scheme = checkpoints[src].family.layers
            if scheme.index(out) is None:
                raise PlanError(f"{manifest.path}: rename: layer tensor {key!r} became {out!r}, which "
                                f"has no layer index; keep it in the rename rules")
            out = scheme.with_index(out, pos)
        if out in picks:
            raise PlanError(f"{manifest.path}: rename: {picks[out].key!r} and {key!r} both become {out!r}; "
                            f"fix the rename rules or drop one")
        picks[out] = _Pick(out, src, key, renamed.permute, pos)
    missing = sorted(replaced - picks.keys())
    if missing:
        raise PlanError(f"{manifest.path}: {missing[0]!r} is to come from source {owners[missing[0]]!r}, which "
                        f"has no such tensor; use sources of the same architecture")
    _check_not_empty(manifest, arrangement, picks)
    return picks


def _check_not_empty(manifest: Manifest, arrangement: tuple[LayerRef, ...], picks: dict[str, _Pick]) -> None:
    """An output with no tensors, or a layer config.json counts but no tensor holds, is no model."""
    if not picks:
        raise PlanError(f"{manifest.path}: rename: no tensor is left (rename.drop removes every one); "
                        f"an output needs weights, so narrow the drop patterns")
    filled = {p.position for p in picks.values()}
    for pos, ref in enumerate(arrangement):
        if pos not in filled:
            raise PlanError(f"{manifest.path}: output layer {pos} (layer {ref.layer} of source {ref.source!r}) has "
                            f"no tensors left after rename.drop, yet config.json would count it; remove the layer "
                            f"from [layers] instead of dropping its tensors")


def _rename(manifest: Manifest, renamer: Renamer, key: str) -> Renamed | None:
    try:
        return renamer.rename(key)
    except ManifestError as e:
        raise ManifestError(f"{manifest.path}: rename: {e}") from None


def _check_stackable(manifest: Manifest, checkpoints: Mapping[str, Checkpoint],
                     picks: dict[str, _Pick]) -> None:
    """Every output layer must hold the same tensor names and shapes as output layer 0."""
    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    sources: dict[int, str] = {}
    for p in picks.values():
        if p.position is not None:
            ckpt = checkpoints[p.source]
            shape = ckpt.headers[ckpt.weight_map[p.key]].tensors[p.key].shape
            layers.setdefault(p.position, {})[ckpt.family.layers.with_index(p.out, 0)] = shape
            sources[p.position] = p.source
    if not layers:
        return
    first_pos = min(layers)
    first = layers[first_pos]
    for pos, tensors in sorted(layers.items()):
        if tensors == first:
            continue
        name = sorted(k for k in first.keys() | tensors.keys() if first.get(k) != tensors.get(k))[0]
        raise PlanError(f"{manifest.path}: layers: output layer {pos} (source {sources[pos]!r}) cannot "
                        f"stack on output layer {first_pos}: {name!r} has shape {tensors.get(name, 'none')} "
                        f"vs {first.get(name, 'none')}; use sources of the same architecture")


def _output_tensor(p: _Pick, checkpoints: Mapping[str, Checkpoint], dtype: str | None) -> OutputTensor:
    ckpt = checkpoints[p.source]
    shard = ckpt.weight_map[p.key]
    header = ckpt.headers[shard]
    entry = header.tensors[p.key]
    steps: list[Step] = []
    if p.permute:
        heads = ckpt.config.get(p.permute)
        try:
            rotary_row_order(entry.shape[0] if entry.shape else 0, heads if isinstance(heads, int) else 0)
        except ValueError as e:
            raise PlanError(f"{ckpt.root / shard}: tensor {p.key!r}: cannot permute for rotary: {e} "
                            f"({p.permute} = {heads!r})") from None
        assert isinstance(heads, int)
        steps.append(PermuteRotary(heads))
    out_dtype, nbytes = entry.dtype, entry.nbytes
    if dtype and dtype != entry.dtype and is_castable(entry.dtype):
        steps.append(Cast(entry.dtype, dtype))
        out_dtype, nbytes = dtype, entry.nbytes // element_size(entry.dtype) * element_size(dtype)
    return OutputTensor(
        name=p.out, dtype=out_dtype, shape=entry.shape, offset=0, nbytes=nbytes,
        source_name=p.source, source_key=p.key, source_dtype=entry.dtype,
        source=ByteRange(header.path, header.data_start + entry.start, entry.nbytes), steps=tuple(steps))


def _natural_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _identical_source_shards(tensors: list[OutputTensor], ckpt: Checkpoint) -> list[tuple[Header, list[OutputTensor]]]:
    """Source shards whose every tensor is an output tensor of the same name, taken verbatim."""
    by_name = {t.name: t for t in tensors}
    found = []
    for _, header in sorted(ckpt.headers.items()):
        group = []
        for e in header.entries:
            t = by_name.get(e.name)
            if (t is None or t.steps or t.source is None or t.source_key != e.name
                    or t.source.path != header.path):
                break
            group.append(replace(t, offset=e.start))
        else:
            if group and header.raw:
                found.append((header, group))
    return found


def _cut(tensors: list[OutputTensor], max_size: int) -> list[list[OutputTensor]]:
    """Greedy in-order sharding: a new shard starts when the next tensor would pass
    ``max_size``. Not optimal (no bin packing, so order stays natural); a tensor larger than
    ``max_size`` gets a shard of its own, as Hugging Face does."""
    groups: list[list[OutputTensor]] = []
    size = 0
    for t in tensors:
        if not groups or (groups[-1] and size + t.nbytes > max_size):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def _name_shards(groups: list[tuple[Header | None, list[OutputTensor]]]) -> tuple[Shard, ...]:
    """Name shards as Hugging Face does and lay out each one's header and offsets; a group
    with a source header is that source file, reproduced as is."""
    n = len(groups)
    shards = []
    for i, (source, group) in enumerate(groups):
        name = SINGLE_SHARD if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if source is not None:
            shards.append(Shard(name, source.raw, tuple(group), link=source.path))
            continue
        placed, offset = [], 0
        for t in group:
            placed.append(replace(t, offset=offset))
            offset += t.nbytes
        header = encode_header(((t.name, t.dtype, t.shape, t.offset, t.offset + t.nbytes) for t in placed),
                               SHARD_METADATA)
        shards.append(Shard(name, header, tuple(placed)))
    return tuple(shards)


def _index(shards: tuple[Shard, ...]) -> Mapping[str, Any] | None:
    """``model.safetensors.index.json`` content; None for a single ``model.safetensors``,
    as Hugging Face writes no index then."""
    if len(shards) == 1:
        return None
    return MappingProxyType({
        "metadata": {"total_size": sum(s.data_size for s in shards), "tensorsurgery_version": __version__},
        "weight_map": {t.name: s.filename for s in shards for t in s.tensors},
    })

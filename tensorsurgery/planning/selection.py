"""Which source tensors become which output tensors (pure, part of planning).

The arrangement says which source layer each output layer is; every output layer is that source
layer, with its own tensors and its own kind (dense or MoE, sliding or full attention...), so layers
that differ in kind inside one model are planned like any other. Tensors outside the decoder
layers (embeddings, final norm, a vision tower, a projector) are copied as they are; layers saved
after the counted ones (DeepSeek-V3's multi-token prediction) stay after the new last layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, NamedTuple

from tensorsurgery.errors import ManifestError, PlanError
from tensorsurgery.families.layers import LayerRef, dus, interlock, keep
from tensorsurgery.families.registry import Family, is_moe_layer, layer_lists
from tensorsurgery.families.rules import AddZeros, Renamed, Renamer, RowPart, check_source, compile_renamer, get_preset
from tensorsurgery.manifest.toml import Manifest
from tensorsurgery.planning.moves import check_generic_moves
from tensorsurgery.sources.checkpoint import Checkpoint

#: A natural sort key: a name's text and digit runs, the runs as numbers.
NaturalKey = tuple[int | str, ...]


class Pick(NamedTuple):  # not a frozen dataclass: one per output tensor, 1.7M in the largest plans
    """An output tensor chosen from a source tensor ``key`` of source ``source``.

    ``position`` is its output layer (None outside the layers; extra layers count on after the
    last arranged one); ``zeros`` means it is not the source tensor's bytes but zeros shaped like
    its rows (a tensor the target needs that the source lacks); ``order`` is the natural sort key of
    ``out`` (``layers.2`` before ``layers.10``), the order of the output."""

    out: str
    source: str
    key: str
    permute: str | None = None
    rows: RowPart | None = None
    position: int | None = None
    zeros: bool = False
    order: NaturalKey = ()


@dataclass(frozen=True, slots=True)
class Selection:
    """The arrangement, every output tensor's pick, and each output layer's kind: ``moe`` (a
    mixture-of-experts layer) and ``kinds`` (a label for display: its per-layer config values)."""

    arrangement: tuple[LayerRef, ...]
    picks: tuple[Pick, ...]
    moe: tuple[bool, ...]
    kinds: tuple[str, ...]


def arrange(manifest: Manifest, checkpoints: Mapping[str, Checkpoint]) -> tuple[LayerRef, ...]:
    """The source layer of every output layer.

    Raises:
        PlanError: a layer out of range (naming the arrangement position), an overlap too large.
    """
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


def select(manifest: Manifest, checkpoints: Mapping[str, Checkpoint]) -> Selection:
    """Choose every output tensor of ``manifest`` applied to ``checkpoints``.

    Raises:
        PlanError: see :func:`arrange`; two tensors renamed to one name; a renamed layer tensor
            without its layer index; a layer of another source unlike any of the base's; a
            preset given a source it does not convert; an output with no tensors or a layer with none.
        ManifestError: a name no preset rule maps, an invalid replacement, a reserved name.
    """
    base = manifest.sources[0].name
    arrangement = arrange(manifest, checkpoints)
    preset = get_preset(manifest.rename.preset) if manifest.rename.preset else None
    for s in manifest.sources:
        ckpt = checkpoints[s.name]
        if preset is not None:
            check_source(preset, ckpt.family.name, ckpt.config, f"{manifest.path}: source {s.name!r}")
        _check_movable(manifest, ckpt, arrangement, s.name)
    check_generic_moves(checkpoints, arrangement, base, checkpoints[base].family.text_config(manifest.config))
    groups = {name: ckpt.by_layer for name, ckpt in checkpoints.items()}
    renamers = {name: _renamer(manifest, ckpt) for name, ckpt in checkpoints.items()}
    # What to pick, a block of tensors at a time: (source, source layer or None, output layer or None).
    wanted: list[tuple[str, int | None, int | None]] = []
    owners = manifest.tensor_sources
    wanted += [(src, None, None) for src in dict.fromkeys((base, *owners.values()))]
    wanted += [(ref.source, ref.layer, pos) for pos, ref in enumerate(arrangement)]
    n_base = checkpoints[base].num_layers
    wanted += [(base, index, len(arrangement) + index - n_base)
               for index in sorted(i for i in groups[base] if i is not None and i >= n_base)]
    picks = _pick(manifest, checkpoints, renamers, wanted)
    if preset is not None:
        picks = _add_zeros(picks, preset.adds)
    _check_not_empty(manifest, arrangement, picks)
    moe, signatures = _layer_kinds(checkpoints, arrangement, picks)
    _check_stackable(manifest, arrangement, signatures, base)
    return Selection(arrangement, tuple(picks.values()), tuple(moe),
                     _labels(checkpoints, arrangement, moe))


def _renamer(manifest: Manifest, ckpt: Checkpoint) -> Renamer:
    try:
        return compile_renamer(manifest.rename, ckpt.layout)
    except ManifestError as e:
        raise ManifestError(f"{manifest.path}: {e}") from None


def _check_movable(manifest: Manifest, ckpt: Checkpoint, arrangement: tuple[LayerRef, ...], name: str) -> None:
    """A family whose config (GPT-2's ``scale_attn_by_inverse_layer_idx``) or code (DiffLlama) ties a
    layer's computation to its index cannot have its layers moved, nor one whose code ties it to the
    layer count (MiniCPM3) change the count."""
    text = ckpt.family.text_config(ckpt.config)
    overrides = ckpt.family.text_config(manifest.config)  # [config] wins: the user may turn the flag off
    moved = [i for i, ref in enumerate(arrangement) if ref.source == name and ref.layer != i]
    if ckpt.family.depth_bound and len(arrangement) != ckpt.num_layers:
        raise PlanError(f"{manifest.path}: source {name!r} is a {ckpt.family.name} model: {ckpt.family.depth_bound}, "
                        f"so its layers compute differently in a model of {len(arrangement)} layers instead of "
                        f"{ckpt.num_layers}; keep the layer count")
    if ckpt.family.positional and moved:
        raise PlanError(f"{manifest.path}: source {name!r} is a {ckpt.family.name} model: {ckpt.family.positional}, "
                        f"so output layer {moved[0]} (its layer {arrangement[moved[0]].layer}) would compute "
                        f"differently there; keep its layers in place")
    for flag in ckpt.family.position_bound:
        if overrides.get(flag, text.get(flag)) and moved:
            raise PlanError(f"{manifest.path}: source {name!r} sets {flag}, which ties each layer's computation to "
                            f"its index, and output layer {moved[0]} is its layer {arrangement[moved[0]].layer}; keep "
                            f"its layers in place, or set {flag} = false in [config] if that is what you want")


def _pick(manifest: Manifest, checkpoints: Mapping[str, Checkpoint], renamers: Mapping[str, Renamer],
          wanted: list[tuple[str, int | None, int | None]]) -> dict[str, Pick]:
    base = manifest.sources[0].name
    owners = manifest.tensor_sources
    picks: dict[str, Pick] = {}
    replaced: set[str] = set()
    natural, new = _natural, tuple.__new__  # a plain tuple's constructor: a NamedTuple's costs 3x
    in_order: dict[tuple[tuple[str, ...], tuple[str, ...]], list[int]] = {}
    for src, layer, pos in wanted:
        ckpt, renamer = checkpoints[src], renamers[src]
        keys = ckpt.by_layer.get(layer, ())
        if pos is not None and renamer.trivial:
            # The common case, made cheap (it runs for every tensor of a 1.7M-tensor plan): the
            # name is kept, only its layer index changes (a layer kept in place keeps its name).
            # Picked in natural order of the names' tails (worked out once per set of tails: the
            # layers of a kind share theirs), so that the plan's sort of the output order finds
            # long runs already in order.
            parts = ckpt.layer_parts.get(layer)  # type: ignore[arg-type]
            if parts is None:  # no tensors (assemble refuses such a checkpoint; a Checkpoint made by hand)
                continue
            heads, tails = parts
            perm = in_order.get(parts)
            if perm is None:
                perm = in_order[parts] = sorted(range(len(tails)), key=lambda i: (natural(tails[i]), tails[i]))
            for i in perm:
                key, head, tail = keys[i], heads[i], tails[i]
                out = key if layer == pos else f"{head}{pos}{tail}"
                if out in picks:
                    raise _clash(manifest, picks[out].key, key, out)
                picks[out] = new(Pick, (out, src, key, None, None, pos, False, (*natural(head), pos, *natural(tail))))
            continue
        for key in keys:
            for renamed_one in _rename(manifest, renamer, key):
                out, renamed, order = _placed(manifest, ckpt.family, key, renamed_one, pos)
                if pos is None and owners.get(out, base) != src:
                    if src == base:  # the base's own, replaced by another source's
                        replaced.add(out)
                    continue
                if out in picks:
                    raise _clash(manifest, picks[out].key, key, out)
                picks[out] = Pick(out, src, key, renamed.permute, renamed.rows, pos, order=order)
    missing = sorted(replaced - picks.keys())
    if missing:
        raise PlanError(f"{manifest.path}: {missing[0]!r} is to come from source {owners[missing[0]]!r}, which "
                        f"has no such tensor; use sources of the same architecture")
    return picks


def _clash(manifest: Manifest, first: str, second: str, out: str) -> PlanError:
    return PlanError(f"{manifest.path}: rename: {first!r} and {second!r} both become {out!r}; fix the rename "
                     f"rules or drop one")


def _placed(manifest: Manifest, family: Family, key: str, renamed: Renamed,
            pos: int | None) -> tuple[str, Renamed, NaturalKey]:
    """``(output name, renamed, order)`` of a renamed tensor: a layer tensor gets output layer ``pos``."""
    if pos is None:
        return renamed.name, renamed, _natural(renamed.name)
    parts = family.layers.split(renamed.name)
    if parts is None:
        raise PlanError(f"{manifest.path}: rename: layer tensor {key!r} became {renamed.name!r}, which has no "
                        f"layer index; keep it in the rename rules")
    head, _, tail = parts
    return f"{head}{pos}{tail}", renamed, (*_natural(head), pos, *_natural(tail))


#: What a kept name was renamed to: itself, no permutation, no row part.
_KEPT = Renamed("")
_DIGITS = re.compile(r"(\d+)")


@lru_cache(maxsize=1 << 16)
def _natural(text: str) -> NaturalKey:
    """The natural sort key of ``text``: digit runs compare as numbers. A layer tensor's key is its
    head's, its index, its tail's: the same few hundred tails repeat in every layer, so each is
    split once (and the result equals the whole name's key)."""
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(text))


def natural_order(name: str) -> NaturalKey:
    """The output order's key of ``name`` (as :attr:`Pick.order`): digit runs compare as numbers."""
    return _natural(name)


def _rename(manifest: Manifest, renamer: Renamer, key: str) -> tuple[Renamed, ...]:
    try:
        return renamer.rename(key)
    except ManifestError as e:
        raise ManifestError(f"{manifest.path}: rename: {e}") from None


def _add_zeros(picks: dict[str, Pick], adds: tuple[AddZeros, ...]) -> dict[str, Pick]:
    """The preset's zero tensors, one per output tensor they are modelled on (unless the source
    has that tensor already)."""
    out = dict(picks)
    for add in adds:
        like = re.compile(add.like)
        for p in picks.values():
            if like.fullmatch(p.out):
                name = like.sub(add.template, p.out)
                out.setdefault(name, Pick(name, p.source, p.key, position=p.position, zeros=True,
                                          order=_natural(name)))
    return out


def _check_not_empty(manifest: Manifest, arrangement: tuple[LayerRef, ...], picks: Mapping[str, Pick]) -> None:
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


Signature = frozenset[tuple[str, tuple[int, ...]]]


def _layer_kinds(checkpoints: Mapping[str, Checkpoint], arrangement: tuple[LayerRef, ...],
                 picks: Mapping[str, Pick]) -> tuple[list[bool], dict[int, Signature]]:
    """Each output layer's MoE flag (from its source layer's tensors, looked at once per source
    layer) and, when layers of several sources meet, its signature (names with shapes)."""
    moe_of: dict[tuple[str, int], bool] = {}
    for ref in set(arrangement):
        ckpt = checkpoints[ref.source]
        _, tails = ckpt.layer_parts.get(ref.layer, ((), ()))  # ".mlp.experts.0.up_proj.weight"...
        moe_of[(ref.source, ref.layer)] = is_moe_layer(tail[1:] for tail in tails)
    moe = [moe_of[(ref.source, ref.layer)] for ref in arrangement]
    signatures: dict[int, set[tuple[str, tuple[int, ...]]]] = {}
    if len({ref.source for ref in arrangement}) > 1:  # signatures only matter when sources meet
        for p in picks.values():
            if p.position is None or p.position >= len(arrangement) or p.zeros:
                continue
            ckpt = checkpoints[p.source]
            shape = ckpt.headers[ckpt.weight_map[p.key]].tensors[p.key].shape
            signatures.setdefault(p.position, set()).add((ckpt.family.layers.with_index(p.out, 0), shape))
    return moe, {pos: frozenset(sig) for pos, sig in signatures.items()}


def _check_stackable(manifest: Manifest, arrangement: tuple[LayerRef, ...], signatures: Mapping[int, Signature],
                     base: str) -> None:
    """A layer from another source must be like one of the base source's layers (same tensor
    names and shapes): config.json, which comes from the base, must be able to describe it."""
    base_layers = {pos: sig for pos, sig in signatures.items() if arrangement[pos].source == base}
    known = set(base_layers.values())
    for pos, sig in sorted(signatures.items()):
        ref = arrangement[pos]
        if ref.source == base or sig in known:
            continue
        other_pos = min(base_layers) if base_layers else None
        other = dict(base_layers[other_pos]) if other_pos is not None else {}
        mine = dict(sig)
        name = sorted(k for k in other.keys() | mine.keys() if other.get(k) != mine.get(k))[0] if other else "?"
        raise PlanError(f"{manifest.path}: layers: output layer {pos} (source {ref.source!r}) cannot stack on output "
                        f"layer {other_pos}: {name!r} has shape {mine.get(name, 'none')} vs {other.get(name, 'none')}; "
                        f"use sources of the same architecture")


def _labels(checkpoints: Mapping[str, Checkpoint], arrangement: tuple[LayerRef, ...],
            moe: list[bool]) -> tuple[str, ...]:
    """A short label of each output layer's kind: its per-layer config values, and dense or MoE
    when the model has both."""
    lists = {name: layer_lists(c.family, c.family.text_config(c.config), c.num_layers)
             for name, c in checkpoints.items()}
    mixed = len(set(moe)) > 1
    labels = []
    for pos, ref in enumerate(arrangement):
        parts = [_show(key, values[ref.layer]) for key, values in lists[ref.source].items()]
        if mixed:
            parts.append("moe" if moe[pos] else "dense")
        labels.append("/".join(p for p in parts if p))
    return tuple(labels)


def _show(key: str, value: object) -> str:
    if key == "no_rope_layers":
        return "" if value else "no-rope"
    return str(value).removesuffix("_attention")

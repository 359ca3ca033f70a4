"""Pure rewrite of config.json for a plan: the preset's relabel, then every field that describes
layers one by one rewritten so that each output layer is described as the source layer it came
from (the family's rules, :mod:`tensorsurgery.families.registry`), the layer count, the dtype, then the
manifest's ``[config]`` overrides (which win)."""
from __future__ import annotations

import copy
from typing import Any, Mapping

from tensorsurgery.errors import PlanError
from tensorsurgery.families.kind_fields import (
    KindIndices,
    PatternString,
    PeriodOffset,
    SpanInterval,
    Unexpressible,
    kind_name,
)
from tensorsurgery.families.layers import LayerRef
from tensorsurgery.families.registry import (
    NOT_PER_LAYER,
    Family,
    LayerIndices,
    LeadingCount,
    PerLayer,
    field_keys,
    layer_lists,
)
from tensorsurgery.families.rules import FIXUPS, Preset
from tensorsurgery.formats.dtypes import TORCH_NAMES
from tensorsurgery.manifest.path_free import is_local_path


def build_config(configs: Mapping[str, Mapping[str, Any]], base: str, arrangement: tuple[LayerRef, ...], *,
                 family: Family, moe: tuple[bool, ...] = (), preset: Preset | None = None, dtype: str | None = None,
                 overrides: Mapping[str, Any] | None = None, where: str = "layers",
                 extra_layers: int | None = None) -> dict[str, Any]:
    """config.json of the output.

    Args:
        configs: each source's config by source name; ``base`` is the one the output starts from.
        arrangement: the source layer of every output layer.
        family: the base's family, whose rules say which fields describe layers.
        moe: whether each output layer is a mixture-of-experts layer (from its tensors).
        preset: the rename preset whose config relabel applies, if any.
        dtype: the output safetensors dtype when casting (``"F16"``), else None.
        overrides: the manifest's ``[config]`` table.
        where: the manifest location named in messages.
        extra_layers: how many of the layers saved after the counted ones (MTP) the output keeps,
            when known; ``rename.drop`` may drop them, and the family's count of them follows.

    Raises:
        PlanError: the base config has no layer count to rewrite, a source lacks a per-layer value,
            or the family's config cannot describe the arrangement (a dense layer after a MoE layer
            where only a count of leading dense layers can be said).
    """
    cfg = copy.deepcopy(dict(configs[base]))
    text = _text(cfg, family)
    counted = family.count_key in text
    if not counted and arrangement and family.layer_count(text) is None:
        raise PlanError(_no_count(cfg, family))
    sources = {name: _text(copy.deepcopy(dict(c)), family) for name, c in configs.items()}
    overrides = overrides or {}
    _family_fields(text, sources, base, family, arrangement, moe, where, skip=set(overrides))
    _other_lists(text, sources, family, arrangement, skip=set(overrides))
    if counted:
        text[family.count_key] = len(arrangement)
    # else no decoder layer was found in the tensors (GPT-J's transformer.h.N, counted by n_layer):
    # every tensor is kept in place as a non-layer tensor, and the config's own count stays true.
    key = family.extra_layers_key
    if key is not None and extra_layers is not None and family.extra_layers(cfg) != extra_layers:
        text[key] = extra_layers  # the MTP layers rename.drop removed are no longer counted
    if text is not cfg:
        _top_level_copies(cfg, sources[base], text)
    if preset is not None:
        _relabel(cfg, preset)
    if dtype is not None:
        _set_dtype(cfg, TORCH_NAMES[dtype])
    _drop_load_paths(cfg)
    cfg.update(overrides)
    _check_overrides(cfg, family, len(arrangement), overrides, where)
    return cfg


def _no_count(cfg: Mapping[str, Any], family: Family) -> str:
    """Why the base config's layer count cannot be rewritten. When a sub-config counts layers
    (Qwen3-VL's ``text_config``, a vision tower's), adding a top-level count would be followed and
    the sub-config's left as it is, so that is not suggested."""
    nested = sorted(k for k, v in cfg.items() if isinstance(v, dict) and family.count_key in v)
    if nested:
        return (f"config.json of the base source has no {family.count_path}; the layers are counted in "
                f"{nested[0]}.{family.count_key}, which tensorsurgery does not rewrite for this family "
                f"(model_type {cfg.get('model_type')!r}): it cannot plan this model")
    return (f"config.json of the base source has no {family.count_path}; the layer count cannot be "
            f"rewritten (add it to the source's config.json)")


def _drop_load_paths(cfg: dict[str, Any]) -> None:
    """No ``_name_or_path`` naming a local folder: it says where a source was loaded from when it
    was saved (older transformers wrote it; ``/home/alice/secret-project/base``), not this output,
    and it would be published. The top-level key is removed, as transformers' own save does; a
    sub-config's (transformers writes ``""`` there) is emptied when it is a local path. Without
    recursion: a config can nest deep."""
    cfg.pop("_name_or_path", None)
    stack: list[Any] = list(cfg.values())
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("_name_or_path"), str) and is_local_path(item["_name_or_path"]):
                item["_name_or_path"] = ""
            stack += item.values()
        elif isinstance(item, list):
            stack += item


def _check_overrides(cfg: Mapping[str, Any], family: Family, n: int, overrides: Mapping[str, Any], where: str) -> None:
    """``[config]`` wins, but may not make config.json describe other layers than the output holds:
    a layer count or a per-layer list of another length would load a model unlike its weights."""
    text = family.text_config(cfg)
    manifest = where.split(": ")[0]
    if family.count_from and family.count_key not in text and family.layer_count(text) != n:
        raise PlanError(f"{manifest}: config.{family.count_from[0]} has {family.layer_count(text)} entries but the "
                        f"arrangement has {n} layers; remove it from [config] (tensorsurgery sets it)")
    if (family.count_key in text or (n and not family.count_from)) and text.get(family.count_key) != n:
        raise PlanError(f"{manifest}: config.{family.count_path} = {text.get(family.count_key)!r} but the arrangement "
                        f"has {n} layers; remove it from [config] (tensorsurgery sets it)")
    for f in family.fields:
        value = text.get(f.key)
        if isinstance(f, PerLayer) and f.key in overrides and isinstance(value, list) and len(value) != n:
            raise PlanError(f"{manifest}: config.{f.key} has {len(value)} entries but the arrangement has {n} layers; "
                            f"give one per output layer, or remove it from [config]")


def _text(config: dict[str, Any], family: Family) -> dict[str, Any]:
    """The (mutable) part of ``config`` that describes the decoder."""
    if family.flat_config and not family.nested(config):
        return config
    for key in family.config_path:
        if not isinstance(config.get(key), dict):
            config[key] = {}
        config = config[key]
    return config


def _top_level_copies(cfg: dict[str, Any], before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    """Some configs of nested families keep top-level copies of the decoder's fields (Qwen2.5-VL as
    saved by transformers 4.5x: ``num_hidden_layers``, ``layer_types``... beside ``text_config``).
    transformers reads ``text_config``; other readers may read the copies, so a copy of a field the
    rewrite changed follows it (or goes, with a field the rewrite dropped)."""
    for key in [k for k in cfg if k in before and cfg[k] == before[k] and after.get(k) != before[k]]:
        if key in after:
            cfg[key] = copy.deepcopy(after[key])
        else:
            del cfg[key]


def _relabel(cfg: dict[str, Any], preset: Preset) -> None:
    for dst, src in preset.config_copy.items():
        if cfg.get(src) is not None:
            cfg[dst] = cfg[src]
    for key in preset.config_drop:
        cfg.pop(key, None)
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in preset.config_set.items()})
    for name in preset.fixups:
        FIXUPS[name](cfg)


def _set_dtype(cfg: dict[str, Any], name: str) -> None:
    """Every dtype key, at the top and in sub-configs (``text_config``...), says the cast dtype."""
    found = False
    for d in (cfg, *(v for v in cfg.values() if isinstance(v, dict))):
        for key in ("torch_dtype", "dtype"):
            if key in d:
                d[key], found = name, True
    if not found:
        cfg["torch_dtype"] = name


def _other_lists(text: dict[str, Any], sources: Mapping[str, Mapping[str, Any]], family: Family,
                 arrangement: tuple[LayerRef, ...], skip: set[str]) -> None:
    """Today's generic rule, for families the registry does not know and for lists it does not
    name: every list with one entry per source layer follows the arrangement (unless ``[config]``
    sets it: the override wins and nothing is looked up)."""
    n = text.get(family.count_key)
    named = {k for f in family.fields for k in field_keys(f)} | skip
    for key, value in list(text.items()):
        if isinstance(value, list) and len(value) == n and key not in NOT_PER_LAYER and key not in named:
            text[key] = [_layer_value(sources, key, ref) for ref in arrangement]


def _layer_value(sources: Mapping[str, Mapping[str, Any]], key: str, ref: LayerRef,
                 lists: Mapping[str, Mapping[str, list[Any]]] | None = None) -> Any:
    """``key``'s value for source layer ``ref``; a source whose config lacks the list (or that
    entry) is a PlanError, not a KeyError."""
    values = (lists or {}).get(ref.source, {}).get(key, sources[ref.source].get(key))
    if not isinstance(values, list) or not 0 <= ref.layer < len(values):
        raise PlanError(f"config.json of source {ref.source!r} has no {key}[{ref.layer}] for the per-layer "
                        f"list {key!r}; set {key} in the manifest's [config] table")
    return values[ref.layer]


def _family_fields(text: dict[str, Any], sources: Mapping[str, Mapping[str, Any]], base: str, family: Family,
                   arrangement: tuple[LayerRef, ...], moe: tuple[bool, ...], where: str, skip: set[str]) -> None:
    n_out = len(arrangement)
    # Per-layer lists as written, or derived as transformers derives them; then written out.
    lists = {name: layer_lists(family, src, _declared(src, family)) for name, src in sources.items()}
    for f in family.fields:
        if f.key in skip:
            continue
        if isinstance(f, PerLayer):
            if f.key in lists[base]:
                text[f.key] = [_layer_value(sources, f.key, ref, lists) for ref in arrangement]
        elif isinstance(f, LayerIndices):
            if f.key in text or any(k in text for k, _ in f.also):
                text[f.key] = [i for i in range(n_out) if _is_kind(f.kind, moe, i)]
                text.update(dict(f.also))
        elif isinstance(f, LeadingCount) and f.key in text:
            text[f.key] = _leading_count(f, moe, arrangement, family, where)
        elif isinstance(f, _KIND_FIELDS) and f.present(text) and not skip.intersection(field_keys(f)):
            text.update(_kind_field(f, text, sources, family, arrangement, where))
    _patterns(text, family, n_out)


_KIND_FIELDS = (PeriodOffset, KindIndices, PatternString, SpanInterval)


def _kind_field(f: PeriodOffset | KindIndices | PatternString | SpanInterval, text: Mapping[str, Any],
                sources: Mapping[str, Mapping[str, Any]], family: Family, arrangement: tuple[LayerRef, ...],
                where: str) -> dict[str, Any]:
    """The values of a rule field (:mod:`tensorsurgery.families.kind_fields`) that say each output layer's
    kind as its source layer's, read from each source's own config."""
    decoded = {name: f.decode(src, _declared(src, family)) for name, src in sources.items()}
    kinds = []
    for ref in arrangement:
        values = decoded[ref.source]
        if values is None or ref.layer >= len(values):
            shown = ", ".join(f"{k} = {sources[ref.source].get(k)!r}" for k in field_keys(f))
            raise PlanError(f"config.json of source {ref.source!r}: {shown} does not say what layer {ref.layer} "
                            f"is; fix the source's config.json")
        kinds.append(values[ref.layer])
    try:
        return f.encode(text, kinds, arrangement)
    except Unexpressible as e:
        ref = arrangement[e.layer]
        said = "" if e.said is None else f", which makes it {kind_name(f, e.said)}"
        raise PlanError(f"{where}: output layer {e.layer} (layer {ref.layer} of source {ref.source!r}) is "
                        f"{kind_name(f, kinds[e.layer])}, but {family.name}'s config can only say that {e.rule}"
                        f"{said}, and {e.why}; choose an arrangement it can describe, or keep the layers in "
                        f"order") from None


def _declared(config: Mapping[str, Any], family: Family) -> int:
    n = family.layer_count(config)
    return n if isinstance(n, int) else 0


def _is_kind(kind: str, moe: tuple[bool, ...], i: int) -> bool:
    return (kind == "dense") != (i < len(moe) and moe[i])


def _leading_count(f: LeadingCount, moe: tuple[bool, ...], arrangement: tuple[LayerRef, ...], family: Family,
                   where: str) -> int:
    kinds = [_is_kind(f.kind, moe, i) for i in range(len(arrangement))]
    k = next((i for i, of_kind in enumerate(kinds) if not of_kind), len(kinds))
    late = [i for i in range(k, len(kinds)) if kinds[i]]
    if late:
        i = late[0]
        whose = "this model's" if family.generic else f"{family.name}'s"
        raise PlanError(f"{where}: output layer {i} (layer {arrangement[i].layer} of source {arrangement[i].source!r}) "
                        f"is {f.kind} but follows a layer that is not (output layer {k}); {whose} config can "
                        f"only say that the first {f.key} layers are {f.kind}: arrange the {f.kind} layers first, "
                        f"or relabel the model as a family with a per-layer list")
    return k


def _patterns(text: dict[str, Any], family: Family, n: int) -> None:
    """Pattern fields that a derivation reads (``sliding_window_pattern``, ``max_window_layers``):
    kept when they still derive the written list, else set to a value that does, else dropped;
    private mirrors follow their field."""
    known: dict[str, list[Any]] = {}
    for f in family.fields:
        if not isinstance(f, PerLayer) or f.derive is None or f.key not in text:
            if isinstance(f, PerLayer) and f.key in text:
                known[f.key] = text[f.key]
            continue
        key = f.derive.key
        if key is not None and key in text and not isinstance(text[key], str):  # EXAONE 4's "LLLG": its own field
            for value in (text[key], *range(0, n + 2)):
                if f.derive.derive({**text, key: value}, n, known) == text[f.key]:
                    text[key] = value
                    break
            else:
                del text[key]
        known[f.key] = text[f.key]
    for mirror, original in family.mirrors:
        if mirror in text:
            if original in text:
                text[mirror] = text[original]
            else:
                del text[mirror]

"""Moving the layers of a model family the registry does not know (pure, part of planning).

The generic rules (:data:`tensorsurgery.families.registry.GENERIC`) rewrite only what they can read: the layer
count, lists with one entry per layer, and the dense/MoE fields several families share by name. A
config field they cannot read may still say which layer is which (a period and an offset, a list
of layer indices, a leading count, a pattern string), and copied unchanged it would describe the
source's layers, not the output's: transformers would build another model from the same bytes. So
an arrangement that moves layers (DUS, iDUS, a drop, any reorder) of such a family is planned only
when

* no config field the rules cannot interpret looks like it describes layers one by one
  (:func:`layer_describing_fields`), and no tensor outside the layers holds a block per layer
  (Gemma 3n's ``embed_tokens_per_layer``: a moved layer cannot take its columns along);
* layers that hold different tensors (names relative to the layer, shapes) are told apart by
  what the rules rewrite (a per-layer list, the MoE fields): then every output position, which the
  rewritten config describes as its source layer, is built as the kind of its source layer.

``keep`` (every layer in place) is always allowed: nothing the config says changes meaning.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable, Mapping

from tensorsurgery.errors import NotMovableError
from tensorsurgery.families.layers import LayerRef
from tensorsurgery.families.registry import NOT_PER_LAYER, Family, field_keys, is_moe_layer
from tensorsurgery.sources.checkpoint import Checkpoint

#: Field names that say "which layers": periods, offsets, intervals, steps, frequencies, index and
#: id lists, start/end indices, patterns, counts of layers of a kind (``num_dense_layers``,
#: ``max_window_layers``), "every n layers".
_LAYER_NAME = re.compile(r"(?:_period|_offset|_interval|_step|_indices|_ids|_idxs|layer_idx|_index|_layers)$"
                         r"|freq|pattern|every_n")
#: A string made of per-layer letters (Nemotron-H's ``"M-M*-M-"``): no lowercase word, not a version number.
_PATTERN_STRING = re.compile(r"^(?=.*[A-Z*\-])[A-Z0-9*+\-=|_.]+$")
#: What the generic rules recompute when a config has it (so it describes the output's layers).
_MOE_FIELD_KEYS = ("mlp_only_layers", "decoder_sparse_step", "moe_layers", "interleave_moe_layer_step",
                   "first_k_dense_replace")

Signature = frozenset[tuple[str, tuple[int, ...]]]


def moves_layers(arrangement: tuple[LayerRef, ...], base: str, n_base: int) -> bool:
    """True unless ``arrangement`` is every layer of ``base`` once, in place."""
    return len(arrangement) != n_base or any(ref != LayerRef(base, i) for i, ref in enumerate(arrangement))


def check_generic_moves(checkpoints: Mapping[str, Checkpoint], arrangement: tuple[LayerRef, ...], base: str,
                        overrides: Mapping[str, Any]) -> None:
    """Refuse a moving ``arrangement`` of a base whose family the registry does not know, when the
    generic rules cannot show that every output layer is built as the kind of its source layer.

    ``overrides`` is the manifest's ``[config]`` table: a field it sets is the user's to say, and is
    not looked at.

    Raises:
        NotMovableError: one line naming the config field, the tensor or the two layers.
    """
    ckpt = checkpoints[base]
    family = ckpt.family
    if not family.generic or not moves_layers(arrangement, base, ckpt.num_layers):
        return
    model_type = ckpt.config.get("model_type")
    what = f"family {model_type!r}" if isinstance(model_type, str) else "a config.json without model_type"
    advice = "keep the layers in order, or ask for this family to be added"
    for name in dict.fromkeys((base, *(ref.source for ref in arrangement))):
        src = checkpoints[name]
        where = "config.json" if len(checkpoints) == 1 else f"config.json of source {name!r}"
        text = family.text_config(src.config)
        for key, value in layer_describing_fields(text, family, src.num_layers, skip=overrides):
            raise NotMovableError(f"{where}: {key} = {_show(value)} looks like it describes layers one by one, "
                                  f"and tensorsurgery does not know how to rewrite it for {what}; {advice}")
        for key, value in _sub_counts(text, family):
            raise NotMovableError(f"{where}: {key} = {_show(value)} counts the layers of a sub-model, which "
                                  f"tensorsurgery does not know how to rewrite for {what}; {advice}")
        tensor = next((t for t in src.by_layer.get(None, ()) if "per_layer" in t), None)
        if tensor is not None:
            raise NotMovableError(f"{src.root}: tensor {tensor!r} holds a block for each layer, which a moved "
                                  f"layer cannot take along (it is not a byte range of the layer) for {what}; "
                                  f"{advice}")
        _check_kinds_told_apart(src, text, what, advice)


def layer_describing_fields(text: Mapping[str, Any], family: Family, n: int,
                            skip: Iterable[str] = ()) -> list[tuple[str, Any]]:
    """The fields of ``text`` (a decoder's config, ``n`` layers) that look like they describe
    layers one by one and that the rules of ``family`` do not rewrite, in config order.

    Looked at: names (periods, offsets, intervals, steps, frequencies, index and id lists, end and
    start indices, patterns, counts such as ``num_dense_layers``), lists of ints that are all layer
    indices (one per layer only if they are 0/1 flags, or named ``*per_layer*``), dicts keyed by
    layer numbers, and pattern strings (as long as the layer count, or named so). Not looked at:
    token ids, fields whose value says nothing (None, false, empty, a count of 0), lists with one
    entry per layer (the generic rule rewrites them), and the fields in ``skip``.
    """
    known = {family.count_key, *skip, *NOT_PER_LAYER}
    for f in family.fields:
        known.update(field_keys(f))
    found = []
    for key, value in text.items():
        if key in known or "token" in key or value is None or value is False or value in ([], {}, ""):
            continue
        if _describes_layers(key, value, n):
            found.append((key, value))
    return found


def _describes_layers(key: str, value: Any, n: int) -> bool:
    if isinstance(value, list) and len(value) == n:
        # One entry per layer: the generic rule rewrites it, unless its entries are layer indices
        # (not 0/1 flags, and not named as one value per layer).
        return "per_layer" not in key and _index_list(value, n) and not set(value) <= {0, 1}
    if _LAYER_NAME.search(key):
        return not (key.endswith("_layers") and value == 0)  # no layer of that kind says nothing
    if isinstance(value, list):
        return _index_list(value, n)
    if isinstance(value, dict):
        return bool(value) and all(isinstance(k, str) and k.isdecimal() for k in value)
    if isinstance(value, str):
        return len(value) == n and bool(_PATTERN_STRING.match(value))
    return False


def _index_list(value: list[Any], n: int) -> bool:
    return bool(value) and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n for v in value)


def _sub_counts(text: Mapping[str, Any], family: Family) -> list[tuple[str, Any]]:
    """Sub-configs (``text_config``...) that count layers: the generic rules rewrite the top level only."""
    return [(f"{key}.{family.count_key}", sub[family.count_key]) for key, sub in text.items()
            if isinstance(sub, dict) and family.count_key in sub]


def _check_kinds_told_apart(src: Checkpoint, text: Mapping[str, Any], what: str, advice: str) -> None:
    """Layers with other tensors must differ in what the rewritten config says of them."""
    n = src.num_layers
    lists = {k: v for k, v in text.items() if isinstance(v, list) and len(v) == n and k not in NOT_PER_LAYER}
    moe_fields = any(k in text for k in _MOE_FIELD_KEYS)
    seen: dict[tuple[Any, ...], tuple[int, Signature]] = {}
    for layer in range(n):
        tails = src.layer_parts.get(layer, ((), ()))[1]
        signature = _signature(src, layer)
        said: tuple[Any, ...] = tuple(json.dumps(v[layer], sort_keys=True) for v in lists.values())
        if moe_fields:
            said += (is_moe_layer(t[1:] for t in tails),)
        first = seen.setdefault(said, (layer, signature))
        if first[1] != signature:
            other = dict(first[1])
            mine = dict(signature)
            diff = sorted(k for k in other.keys() | mine.keys() if other.get(k) != mine.get(k))[0]
            holds = (f"{diff!r} is {other[diff]} in one and {mine[diff]} in the other" if diff in other and diff in mine
                     else f"{diff!r} in layer {first[0] if diff in other else layer} only")
            raise NotMovableError(f"{src.root}: layers {first[0]} and {layer} hold different tensors ({holds}), "
                                  f"and nothing in config.json that tensorsurgery can rewrite tells them apart "
                                  f"for {what}; {advice}")


def _signature(src: Checkpoint, layer: int) -> Signature:
    heads_tails = src.layer_parts.get(layer, ((), ()))
    keys = src.by_layer.get(layer, ())
    out = []
    for key, tail in zip(keys, heads_tails[1]):
        entry = src.headers[src.weight_map[key]].tensors[key]
        out.append((tail[1:], tuple(entry.shape)))
    return frozenset(out)


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."

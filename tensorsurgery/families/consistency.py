"""Pure check that a config.json and a set of tensors describe the same model: what transformers
builds from the config must be what the tensors fill, with no key missing, none left over and
no shape that differs.

:func:`check_consistency` compares a config with tensor signatures (name -> dtype and shape):
the layer count, the hidden size (embedding columns, final norm), the vocabulary (embedding and
lm_head rows), tied embeddings against the presence of ``lm_head.weight``, heads x head_dim and
kv heads against the attention projections, the intermediate sizes against the MLP projections,
the expert count against the experts of each layer, the JSON types of the counts and flags (an
int stays an int: ``48.0`` is not a layer count) and the length of every per-layer list.

A check runs only where the family's tensors can be found by name (``model.layers.N.self_attn.
q_proj.weight``...); where they cannot (fused projections, other naming), it says nothing rather
than guess. A check that also fails on a source (a family whose names mean something else, such
as Qwen3-Next's gated ``q_proj`` of twice the rows) is a check that does not apply to it: callers
pass its id in ``skip`` (:func:`failing_checks` of the source).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, TypeGuard

from tensorsurgery.families.layers import LayerRef
from tensorsurgery.families.registry import Family, LayerIndices, PerLayer, family_of

#: A tensor as the check reads it: a record whose first three fields are name, safetensors dtype
#: and shape (:class:`~tensorsurgery.formats.safetensors.TensorEntry`, a plan's ``OutputTensor``, a plain tuple).
Tensor = tuple[Any, ...]

#: Config fields that transformers reads as integers (a float or a bool there is refused by its
#: config validation, or builds something else).
INT_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "moe_intermediate_size", "vocab_size",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "sliding_window")
#: Config fields that transformers reads as booleans.
BOOL_KEYS = ("tie_word_embeddings", "use_cache", "attention_bias", "mlp_bias", "use_sliding_window")
#: The keys that count the experts of a MoE layer, by family.
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
#: Shapes are only compared for tensors stored as plain floats (a packed quantized dtype has others).
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_EXPERT = re.compile(r"^(?P<at>.*?\bexperts\.)(?P<n>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True, slots=True)
class Finding:
    """One disagreement: ``check`` names the check (``"vocab.embed"``, ``"type:num_hidden_layers"``),
    ``message`` says what disagrees, with both values, in one line."""

    check: str
    message: str

    def __str__(self) -> str:
        return self.message


def check_consistency(config: Mapping[str, Any], tensors: Iterable[Tensor], family: Family, *,
                      skip: Iterable[str] = ()) -> list[Finding]:
    """Every way ``config`` (a config.json) and ``tensors`` (records whose first three fields are
    name, dtype and shape: a header's entries, a plan's tensors) disagree, for a model of
    ``family``; checks named in ``skip`` are not run."""
    skipped = frozenset(skip)
    text = family.text_config(config)
    where = "".join(f"{k}." for k in family.config_path) if text is not config else ""
    found = _types(config, "") + (_types(text, where) if text is not config else [])
    found += _lengths(text, where, family)
    seen = _collect(tensors, family)
    found += _layer_count(config, text, where, family, seen.counts)
    head = next(iter(seen.counts), None)
    found += _embeddings(config, text, where, seen.outer, head)
    if head is not None and len(seen.counts) == 1:
        found += _attention(text, where, head, seen.layers.get(head, {}))
        found += _mlp(text, where, head, seen.layers.get(head, {}), seen.experts.get(head, {}))
    return [f for f in found if f.check not in skipped]


def output_findings(config: Mapping[str, Any], tensors: Iterable[Tensor], base_config: Mapping[str, Any],
                    base_tensors: Iterable[Tensor], base_family: Family) -> list[Finding]:
    """The disagreements of a planned output (``config``, ``tensors``) that its base source does
    not have: a check the base fails as it is does not describe its family (the base is only
    read when the output fails a check). The output is checked as the family its own config
    names (a preset may relabel it); types are also compared with the base's config
    (:func:`changed_types`)."""
    found = check_consistency(config, tensors, family_of(config))
    flagged = {f.check for f in found}
    found += [f for f in changed_types(base_config, config) if f.check not in flagged]
    if not found:
        return []
    skip = failing_checks(base_config, base_tensors, base_family)
    return [f for f in found if f.check not in skip]


def failing_checks(config: Mapping[str, Any], tensors: Iterable[Tensor], family: Family) -> frozenset[str]:
    """The ids of the checks that fail on a model as it is (a source, or an output as planned):
    they do not describe this family."""
    return frozenset(f.check for f in check_consistency(config, tensors, family))


def changed_types(before: Mapping[str, Any], after: Mapping[str, Any], where: str = "") -> list[Finding]:
    """Fields whose JSON type ``after`` changed from ``before`` (a ``[config]`` override): an int
    made a float, a bool made anything else, a number made a bool; nested tables compared key by key."""
    found = []
    for key, old in before.items():
        if key not in after:
            continue
        new = after[key]
        if isinstance(old, dict) and isinstance(new, dict):
            found += changed_types(old, new, f"{where}{key}.")
            continue
        kind = _kind(old)
        if kind and kind != _kind(new) and not (kind == "a number" and _kind(new) == "an integer"):
            found.append(Finding(f"type:{where}{key}", f"config.json {where}{key} = {_show(new)} but the source's "
                                                       f"is {_show(old)}: keep it {kind}"))
    return found


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    return "a number" if isinstance(value, float) else None


#: Config fields that change what a layer computes, given the same tensor shapes: heads and their
#: width, the activation, the norm epsilon, rope, the sliding window, biases, soft-capping, routing.
COMPUTE_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "hidden_activation",
                "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "rope_theta", "rope_scaling",
                "rope_parameters", "partial_rotary_factor", "sliding_window", "use_sliding_window",
                "attention_bias", "mlp_bias", "attn_logit_softcapping", "query_pre_attn_scalar", "use_qk_norm",
                "qk_layernorm", "num_experts_per_tok", "norm_topk_prob", "routed_scaling_factor",
                "attention_multiplier", "residual_multiplier")


def differing_sources(texts: Mapping[str, Mapping[str, Any]], base: str, arrangement: tuple[LayerRef, ...],
                      family: Family) -> list[Finding]:
    """For every source other than ``base`` whose layers the arrangement uses: the fields of
    :data:`COMPUTE_KEYS` its (text) config gives another value than the base's. The output has
    one config, the base's, so those layers would compute with the base's values. A field the
    family says per layer is not one value for all layers and is left to the family's rules;
    a field one of the two configs leaves out is not compared (its default is not known here)."""
    per_layer = {f.key for f in family.fields if isinstance(f, PerLayer)}
    found = []
    for name in dict.fromkeys(ref.source for ref in arrangement):
        if name == base:
            continue
        a, b = _compute_fields(texts[base]), _compute_fields(texts[name])
        diffs = [f"{key} ({name}: {_show(b[key])}, {base}: {_show(a[key])})" for key in COMPUTE_KEYS
                 if key in a and key in b and key not in per_layer and a[key] != b[key]]
        if diffs:
            at = _ranges([i for i, ref in enumerate(arrangement) if ref.source == name])
            found.append(Finding("sources", f"output layers {at} come from source {name!r}, whose config differs "
                                            f"from {base!r}'s in {', '.join(diffs)}; tensorsurgery writes one config "
                                            f"(the first source's), so these layers would compute wrongly"))
    return found


def _compute_fields(text: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`COMPUTE_KEYS` of ``text``, rope_theta read from ``rope_parameters`` when only
    there (transformers 5 moved it), and ``head_dim`` filled in as transformers does."""
    fields = {k: text[k] for k in COMPUTE_KEYS if k in text}
    rope = text.get("rope_parameters")
    if "rope_theta" not in fields and isinstance(rope, dict) and "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    if isinstance(rope, dict):
        fields["rope_parameters"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    if fields.get("head_dim") is None and _is_int(heads) and _is_int(hidden) and heads > 0:
        fields["head_dim"] = hidden // heads
    return fields


def _ranges(positions: list[int]) -> str:
    """``[3, 5, 6, 7]`` -> ``"3, 5-7"``."""
    runs: list[list[int]] = []
    for i in positions:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _types(config: Mapping[str, Any], where: str) -> list[Finding]:
    found = []
    for key in INT_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            found.append(Finding(f"type:{where}{key}",
                                 f"config.json {where}{key} = {_show(value)} is not an integer"))
    for key in BOOL_KEYS:
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            found.append(Finding(f"type:{where}{key}", f"config.json {where}{key} = {_show(value)} is not a "
                                                       f"boolean (true or false)"))
    return found


def _lengths(text: Mapping[str, Any], where: str, family: Family) -> list[Finding]:
    """Per-layer lists hold one entry per layer; index lists hold indices of layers."""
    n = text.get(family.count_key)
    if not isinstance(n, int) or isinstance(n, bool):
        return []
    found = []
    per_layer = {f.key for f in family.fields if isinstance(f, PerLayer)} | {"layer_types"}
    for key in sorted(per_layer):
        value = text.get(key)
        if isinstance(value, list) and value and len(value) != n:
            found.append(Finding(f"length:{key}", f"config.json {where}{key} has {len(value)} entries but "
                                                  f"{where}{family.count_key} = {n}"))
    for f in family.fields:
        value = text.get(f.key)
        if isinstance(f, LayerIndices) and isinstance(value, list):
            bad = [i for i in value if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n]
            if bad:
                found.append(Finding(f"length:{f.key}", f"config.json {where}{f.key} names layer {_show(bad[0])} "
                                                        f"but {where}{family.count_key} = {n}"))
    return found


#: The layer tensors the checks look at (names after ``model.layers.N.``).
_LAYER_TAILS = frozenset({"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                          "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                          "mlp.down_proj.weight"})
_EXPERT_TAILS = frozenset({"gate_proj.weight", "up_proj.weight", "down_proj.weight"})
Signature = tuple[str, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the checks need of a model's tensors, gathered in one pass: the tensors outside the
    layers; per list of layers (its prefix, ``model.layers.``) the highest index + 1, the checked
    tensors of each layer, and each layer's experts (index -> projection -> signature; ``""``
    for expert tensors of other naming, which are counted only)."""

    outer: dict[str, Signature]
    counts: dict[str, int]
    layers: dict[str, dict[int, dict[str, Signature]]]
    experts: dict[str, dict[int, dict[int, dict[str, Signature]]]]


def _collect(tensors: Iterable[Tensor], family: Family) -> _Seen:
    seen = _Seen({}, {}, {}, {})
    split = family.layers.split
    kinds: dict[str, tuple[int, str] | bool] = {}  # per tail (a few distinct ones repeat in every layer)
    for t in tensors:
        name, signature = t[0], (t[1], t[2])
        parts = split(name)
        if parts is None:
            seen.outer[name] = signature
            continue
        head, index, tail = parts
        if seen.counts.get(head, 0) <= index:
            seen.counts[head] = index + 1
        kind = kinds.get(tail)
        if kind is None:
            kind = kinds[tail] = _tail_kind(tail[1:])
        if kind is True:
            seen.layers.setdefault(head, {}).setdefault(index, {})[tail[1:]] = signature
        elif kind is not False:
            n, rest = kind
            seen.experts.setdefault(head, {}).setdefault(index, {}).setdefault(n, {})[rest] = signature
    return seen


def _tail_kind(tail: str) -> tuple[int, str] | bool:
    """True: a checked layer tensor; (expert index, projection): an expert's tensor; False: neither."""
    if tail in _LAYER_TAILS:
        return True
    m = _EXPERT.match(tail) if "experts." in tail else None
    if m is None:
        return False
    rest = m["rest"] if m["at"] == "mlp.experts." and m["rest"] in _EXPERT_TAILS else ""
    return int(m["n"]), rest


def _layer_count(config: Mapping[str, Any], text: Mapping[str, Any], where: str, family: Family,
                 counts: Mapping[str, int]) -> list[Finding]:
    declared = text.get(family.count_key)
    if len(counts) != 1 or not isinstance(declared, int) or isinstance(declared, bool):
        return []  # no decoder layers found, or several lists of layers: nothing to count reliably
    head, held = next(iter(counts.items()))
    expected = declared + family.extra_layers(config)
    if held == expected:
        return []
    extra = f" + {expected - declared} extra" if expected != declared else ""
    return [Finding("layers", f"config.json {where}{family.count_key} = {declared}{extra} but the tensors hold "
                              f"{held} layers ({head}0-{held - 1})")]


def _embeddings(config: Mapping[str, Any], text: Mapping[str, Any], where: str, tensors: Mapping[str, Signature],
                head: str | None) -> list[Finding]:
    base = head[:-len("layers.")] if head and head.endswith("layers.") else "model."
    embed, norm = base + "embed_tokens.weight", base + "norm.weight"
    heads = [n for n in tensors if n == "lm_head.weight" or n.endswith(".lm_head.weight")]
    found = []
    vocab, hidden = text.get("vocab_size"), text.get("hidden_size")
    if embed in tensors:
        found += _dim("vocab.embed", where, "vocab_size", vocab, embed, tensors[embed], 0, "rows")
        found += _dim("hidden.embed", where, "hidden_size", hidden, embed, tensors[embed], 1, "columns")
        tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
        if tie is False and not heads:
            found.append(Finding("tie", f"config.json tie_word_embeddings = false but there is no lm_head.weight "
                                        f"beside {embed} (transformers would leave the output layer random)"))
    if norm in tensors and len(tensors[norm][1]) == 1:
        found += _dim("hidden.norm", where, "hidden_size", hidden, norm, tensors[norm], 0, "entries")
    if len(heads) == 1:
        found += _dim("vocab.lm_head", where, "vocab_size", vocab, heads[0], tensors[heads[0]], 0, "rows")
    return found


def _dim(check: str, where: str, key: str, value: Any, name: str, signature: tuple[str, tuple[int, ...]],
         axis: int, unit: str) -> list[Finding]:
    dtype, shape = signature
    if not _is_int(value) or dtype not in _FLOAT_DTYPES or len(shape) <= axis or shape[axis] == value:
        return []
    return [Finding(check, f"config.json {where}{key} = {value} but {name} has {shape[axis]} {unit}")]


def _attention(text: Mapping[str, Any], where: str, head: str,
               by_index: Mapping[int, Mapping[str, Any]]) -> list[Finding]:
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    if not _is_int(heads) or heads <= 0:
        return []
    kv = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or (hidden // heads if _is_int(hidden) else None)
    if not _is_int(head_dim) or not _is_int(kv):
        return []
    q, k = heads * head_dim, kv * head_dim
    what_q = f"num_attention_heads x head_dim = {heads} x {head_dim} = {q}"
    what_k = f"num_key_value_heads x head_dim = {kv} x {head_dim} = {k}"
    return (_per_layer("attention.q", where, what_q, q, head, by_index, ("self_attn.q_proj.weight",), 0, "rows")
            + _per_layer("attention.kv", where, what_k, k, head, by_index,
                         ("self_attn.k_proj.weight", "self_attn.v_proj.weight"), 0, "rows")
            + _per_layer("attention.o", where, what_q, q, head, by_index, ("self_attn.o_proj.weight",), 1, "columns"))


def _mlp(text: Mapping[str, Any], where: str, head: str, by_index: Mapping[int, Mapping[str, Signature]],
         experts: Mapping[int, Mapping[int, Mapping[str, Signature]]]) -> list[Finding]:
    found = []
    size = text.get("intermediate_size")
    if _is_int(size):
        what = f"intermediate_size = {size}"
        found += _per_layer("mlp.intermediate", where, what, size, head, by_index,
                            ("mlp.gate_proj.weight", "mlp.up_proj.weight"), 0, "rows")
        found += _per_layer("mlp.intermediate", where, what, size, head, by_index,
                            ("mlp.down_proj.weight",), 1, "columns")
    moe_size = text.get("moe_intermediate_size")
    if _is_int(moe_size):
        what = f"moe_intermediate_size = {moe_size}"
        for i, by_expert in sorted(experts.items()):
            at = f"{head}{i}.mlp.experts."
            found += (_per_layer("mlp.moe_intermediate", where, what, moe_size, at, by_expert,
                                 ("gate_proj.weight", "up_proj.weight"), 0, "rows")
                      + _per_layer("mlp.moe_intermediate", where, what, moe_size, at, by_expert,
                                   ("down_proj.weight",), 1, "columns"))
            if found and found[-1].check == "mlp.moe_intermediate":
                break
    key = next((k for k in EXPERT_KEYS if _is_int(text.get(k))), None)
    for i, by_expert in sorted(experts.items()):
        held = max(by_expert) + 1
        if key is not None and held != text[key]:
            found.append(Finding("experts", f"config.json {where}{key} = {text[key]} but layer {i} "
                                            f"({head}{i}) holds {held} experts"))
            break
    return found


def _per_layer(check: str, where: str, what: str, value: int, head: str, by_index: Mapping[int, Mapping[str, Any]],
               tails: tuple[str, ...], axis: int, unit: str) -> list[Finding]:
    """The first layer whose tensor ``tails`` disagree with ``value`` on ``axis`` (one line, not one per layer)."""
    for i in sorted(by_index):
        for tail in tails:
            signature = by_index[i].get(tail)
            if signature is None or signature[0] not in _FLOAT_DTYPES or len(signature[1]) <= axis:
                continue
            if signature[1][axis] != value:
                return [Finding(check, f"config.json {where}{what} but {head}{i}.{tail} has "
                                       f"{signature[1][axis]} {unit}")]
    return []


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)

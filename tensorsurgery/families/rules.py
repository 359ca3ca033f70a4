"""Tensor renaming: built-in presets as data tables, then the manifest's own rules.

A preset is plain data (like llama.cpp's ``tensor_mapping.py``): the source families it accepts,
key rules per source layout (a rule may take a row range of a fused tensor, or permute rows for
the rotary convention), tensors the target needs that the source lacks (written as zeros), and a
config relabel. Nothing here mutates a shared table; :func:`compile_renamer` builds a new
:class:`Renamer` each time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from tensorsurgery.errors import ManifestError, PlanError


@dataclass(frozen=True, slots=True)
class RenameRule:
    """Replace regex ``match`` with ``replace`` (``re.sub`` template) in tensor names."""

    match: str
    replace: str


@dataclass(frozen=True, slots=True)
class RenameSpec:
    """Key renaming: an optional built-in preset, then ``rules`` in order; ``drop`` removes tensors."""

    preset: str | None = None
    rules: tuple[RenameRule, ...] = ()
    drop: tuple[str, ...] = ()


#: The header key the safetensors format keeps for metadata: no tensor may have this name.
RESERVED_NAME = "__metadata__"


def _head_dim(c: Mapping[str, Any]) -> int:
    return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])


#: Config-derived row counts a :class:`RowPart` may name.
ROW_COUNTS: Mapping[str, Callable[[Mapping[str, Any]], int]] = MappingProxyType({
    "q_rows": lambda c: c["num_attention_heads"] * _head_dim(c),
    "kv_rows": lambda c: c.get("num_key_value_heads", c["num_attention_heads"]) * _head_dim(c),
    "intermediate": lambda c: c["intermediate_size"],
})


@dataclass(frozen=True, slots=True)
class RowPart:
    """Part ``index`` of a tensor fused from consecutive row blocks sized ``sizes`` (names of
    :data:`ROW_COUNTS`): Phi-3's ``qkv_proj`` is q, k, v rows one after the other."""

    sizes: tuple[str, ...]
    index: int

    def rows(self, config: Mapping[str, Any]) -> tuple[int, int, int]:
        """``(start, stop, total)`` rows of this part for ``config``."""
        counts = [ROW_COUNTS[s](config) for s in self.sizes]
        start = sum(counts[:self.index])
        return start, start + counts[self.index], sum(counts)


@dataclass(frozen=True, slots=True)
class KeyRule:
    """``pattern`` (anchored regex on the full name) -> ``template``. ``permute`` names the config
    field holding the head count when the rows must be reordered for the rotary convention;
    ``rows`` takes a row range of a fused tensor. Several rules may match one source tensor (one
    per part of a fused tensor)."""

    pattern: str
    template: str
    permute: str | None = None
    rows: RowPart | None = None


@dataclass(frozen=True, slots=True)
class AddZeros:
    """A tensor the target needs and the source lacks: for every output tensor matching ``like``,
    ``template`` (a replacement for that match), a vector of zeros as long as its rows."""

    like: str
    template: str


def _sliding_layers(c: Mapping[str, Any]) -> str | None:
    types = c.get("layer_types")
    if c.get("use_sliding_window") and c.get("sliding_window") is not None and (
            not isinstance(types, list) or "sliding_attention" in types):
        return "its layers use a sliding window, which Llama has none of"
    return None


def _partial_rotary(c: Mapping[str, Any]) -> str | None:
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    factor = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) if isinstance(rope, dict) \
        else c.get("partial_rotary_factor", 1.0)
    if factor not in (None, 1, 1.0):
        return f"partial_rotary_factor is {factor}: it rotates part of each head, Llama rotates all of it"
    return None


#: Reasons a preset refuses a source it otherwise accepts (None: fine), by name.
CHECKS: Mapping[str, Callable[[Mapping[str, Any]], str | None]] = MappingProxyType({
    "no_sliding_layers": _sliding_layers,
    "full_rotary": _partial_rotary,
})


def _longrope(c: dict[str, Any]) -> None:
    # Early Phi-3-128k configs say "su" or "yarn" where Phi3Config (and Llama) read "longrope".
    for key in ("rope_parameters", "rope_scaling"):
        rope = c.get(key)
        if isinstance(rope, dict):
            rope = dict(rope)
            rope.pop("partial_rotary_factor", None)
            for type_key in ("type", "rope_type"):
                if rope.get(type_key) in ("su", "yarn"):
                    rope[type_key] = "longrope"
            c[key] = rope


def _head_dim_explicit(c: dict[str, Any]) -> None:
    # Llama's default head_dim is hidden / heads too, but the source's config may rely on another
    # default; write it out so the relabelled config cannot mean anything else.
    if c.get("head_dim") is None and "hidden_size" in c and "num_attention_heads" in c:
        c["head_dim"] = c["hidden_size"] // c["num_attention_heads"]


#: Config rewrites a preset may apply after setting and dropping keys, by name.
FIXUPS: Mapping[str, Callable[[dict[str, Any]], None]] = MappingProxyType({
    "longrope": _longrope,
    "head_dim": _head_dim_explicit,
})


@dataclass(frozen=True, slots=True)
class Preset:
    """A built-in conversion: the source families it accepts, key rules per source layout, zero
    tensors to add, and how config.json is relabelled.

    ``config_set`` keys are written; ``config_drop`` keys removed; ``config_copy`` maps a
    destination key to the source key whose value it takes when that value is not null;
    ``fixups`` and ``checks`` name entries of :data:`FIXUPS` and :data:`CHECKS`.
    """

    name: str
    sources: tuple[str, ...]
    key_rules: Mapping[str, tuple[KeyRule, ...]]
    config_set: Mapping[str, Any]
    config_drop: tuple[str, ...] = ()
    config_copy: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    adds: tuple[AddZeros, ...] = ()
    fixups: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()


# Mistral's native checkpoint (consolidated.safetensors + params.json) -> Hugging Face names
# (Mistral's and Llama's are the same), as transformers' convert_mistral_weights_to_hf.py maps
# them. q and k rows are permuted from Mistral's interleaved rotary pairs to Hugging Face's
# half-split convention, per head of head_dim rows: the head count is the config field named in
# ``permute`` (k uses the KV heads), see tensorsurgery.sources.native. Also applied without a preset.
_MISTRAL_NATIVE = (
    KeyRule(r"tok_embeddings\.weight", "model.embed_tokens.weight"),
    KeyRule(r"norm\.weight", "model.norm.weight"),
    KeyRule(r"output\.weight", "lm_head.weight"),
    KeyRule(r"layers\.(\d+)\.attention\.wq\.weight", r"model.layers.\1.self_attn.q_proj.weight",
            permute="num_attention_heads"),
    KeyRule(r"layers\.(\d+)\.attention\.wk\.weight", r"model.layers.\1.self_attn.k_proj.weight",
            permute="num_key_value_heads"),
    KeyRule(r"layers\.(\d+)\.attention\.wv\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    KeyRule(r"layers\.(\d+)\.attention\.wo\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    KeyRule(r"layers\.(\d+)\.feed_forward\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    KeyRule(r"layers\.(\d+)\.feed_forward\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    KeyRule(r"layers\.(\d+)\.feed_forward\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    KeyRule(r"layers\.(\d+)\.attention_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    KeyRule(r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
)

# Phi-3 fuses q, k, v into qkv_proj and gate, up into gate_up_proj (Phi3Attention slices q, k, v
# rows in that order; Phi3MLP's ``gate, up = chunk(2)``): each part is a row range, so a byte range.
_QKV = ("q_rows", "kv_rows", "kv_rows")
_PHI3 = (
    KeyRule(r"(.*\.self_attn\.)qkv_proj\.weight", r"\1q_proj.weight", rows=RowPart(_QKV, 0)),
    KeyRule(r"(.*\.self_attn\.)qkv_proj\.weight", r"\1k_proj.weight", rows=RowPart(_QKV, 1)),
    KeyRule(r"(.*\.self_attn\.)qkv_proj\.weight", r"\1v_proj.weight", rows=RowPart(_QKV, 2)),
    KeyRule(r"(.*\.mlp\.)gate_up_proj\.weight", r"\1gate_proj.weight", rows=RowPart(("intermediate",) * 2, 0)),
    KeyRule(r"(.*\.mlp\.)gate_up_proj\.weight", r"\1up_proj.weight", rows=RowPart(("intermediate",) * 2, 1)),
    KeyRule(r"(.*)", r"\1"),
)
_LLAMA = MappingProxyType({"model_type": "llama", "architectures": ("LlamaForCausalLM",), "mlp_bias": False})

PRESETS: Mapping[str, Preset] = MappingProxyType({
    "mistral-to-llama": Preset(
        name="mistral-to-llama", sources=("mistral",),
        # Hugging Face's Mistral already uses Llama's tensor names: only config.json changes.
        key_rules=MappingProxyType({"hf": (), "mistral": _MISTRAL_NATIVE}),
        config_set=MappingProxyType({**_LLAMA, "attention_bias": False}),
        config_drop=("sliding_window", "use_sliding_window", "max_window_layers"),
        # Llama has no sliding window: beyond Mistral's window the two models differ, so the
        # usable context is the window (SOLAR ships 4096 for Mistral-7B-v0.1).
        config_copy=MappingProxyType({"max_position_embeddings": "sliding_window"}),
    ),
    "qwen2-to-llama": Preset(
        name="qwen2-to-llama", sources=("qwen2",),
        # Same tensor names. Llama's attention_bias puts a bias on q, k, v AND o_proj; Qwen2 has
        # none on o_proj, so it is added as zeros.
        key_rules=MappingProxyType({"hf": ()}),
        config_set=MappingProxyType({**_LLAMA, "attention_bias": True}),
        config_drop=("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
        adds=(AddZeros(r"(.*\.self_attn\.)o_proj\.weight", r"\1o_proj.bias"),),
        fixups=("head_dim",), checks=("no_sliding_layers",),
    ),
    "phi3-to-llama": Preset(
        name="phi3-to-llama", sources=("phi3",),
        key_rules=MappingProxyType({"hf": _PHI3}),
        config_set=MappingProxyType({**_LLAMA, "attention_bias": False}),
        # Llama has no sliding window: the logits agree only within Phi-3's window.
        config_drop=("auto_map", "sliding_window", "resid_pdrop", "embd_pdrop", "partial_rotary_factor"),
        fixups=("head_dim", "longrope"), checks=("full_rotary",),
    ),
})


@dataclass(frozen=True, slots=True)
class Renamed:
    """An output tensor made from a source tensor: its name, the config key of its head count if
    its rows permute, and the part of a fused tensor it takes."""

    name: str
    permute: str | None = None
    rows: RowPart | None = None


@dataclass(frozen=True, slots=True)
class Renamer:
    """Compiled rename rules for one source layout. Use :meth:`rename`."""

    drop: tuple[re.Pattern[str], ...]
    preset_rules: tuple[tuple[re.Pattern[str], KeyRule], ...]
    rules: tuple[tuple[re.Pattern[str], str], ...]
    strict: bool

    @property
    def trivial(self) -> bool:
        """True when every name maps to itself (no drop, no preset rule, no rule)."""
        return not (self.drop or self.preset_rules or self.rules)

    def rename(self, name: str) -> tuple[Renamed, ...]:
        """The output tensors made from source tensor ``name`` (none when a ``drop`` pattern
        matches; several when a preset splits a fused tensor).

        Raises:
            ManifestError: under a preset with key rules, a name that no rule maps; an invalid
                replacement; an output name the format reserves.
        """
        if self.trivial:
            return (Renamed(self.apply_rules(name)),) if name == RESERVED_NAME else (Renamed(name),)
        if any(p.search(name) for p in self.drop):
            return ()
        outs = [Renamed(pattern.sub(rule.template, name), rule.permute, rule.rows)
                for pattern, rule in self.preset_rules if pattern.fullmatch(name)]
        # A rule without a row part maps one name to one name: the first match wins. Rules with
        # row parts split a fused tensor: every part that matches is an output.
        if outs:
            outs = outs[:1] if outs[0].rows is None else [o for o in outs if o.rows is not None]
        if not outs:
            if self.strict:
                raise ManifestError(f"tensor {name!r} matches no rule of the preset; add a "
                                    f"[rename] rule for it or drop it")
            outs = [Renamed(name)]
        return tuple(Renamed(self.apply_rules(o.name), o.permute, o.rows) for o in outs)

    def apply_rules(self, name: str) -> str:
        """``name`` after the manifest's own rules.

        Raises:
            ManifestError: an invalid replacement, or a name the format reserves.
        """
        for pattern, template in self.rules:
            try:
                name = pattern.sub(template, name)
            except (re.error, IndexError) as e:
                # A template is checked against a match, so a bad group or escape shows only here.
                raise ManifestError(f"rule {{ match = {pattern.pattern!r}, replace = {template!r} }}: the "
                                    f"replacement is invalid ({e}); use \\1 or \\g<name> for groups the match "
                                    f"defines and \\\\ for a backslash") from None
        if name == RESERVED_NAME:
            raise ManifestError(f"tensor {name!r} is a name the safetensors format reserves for metadata; "
                                f"change the rename rules so no tensor is called that")
        return name


def compile_renamer(spec: RenameSpec, layout: str) -> Renamer:
    """Compile ``spec`` for a source of ``layout`` (``"hf"`` or ``"mistral"``).

    Raises:
        ManifestError: unknown preset, or a preset that does not handle this layout.
    """
    preset_rules: tuple[KeyRule, ...] = ()
    if spec.preset is not None:
        preset = get_preset(spec.preset)
        if layout not in preset.key_rules:
            raise ManifestError(f"rename.preset {spec.preset!r} does not handle {layout!r} checkpoints")
        preset_rules = preset.key_rules[layout]
    elif layout == "mistral":
        # Without a preset a native checkpoint still gets Hugging Face names: it is read as the
        # MistralForCausalLM its params.json describes, as transformers' conversion script does.
        preset_rules = _MISTRAL_NATIVE
    return Renamer(
        drop=tuple(re.compile(p) for p in spec.drop),
        preset_rules=tuple((re.compile(r.pattern), r) for r in preset_rules),
        rules=tuple((re.compile(r.match), r.replace) for r in spec.rules),
        strict=bool(preset_rules),
    )


def get_preset(name: str) -> Preset:
    """The built-in preset called ``name``.

    Raises:
        ManifestError: no such preset.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ManifestError(f"rename.preset: unknown preset {name!r}; built-in presets: "
                            f"{', '.join(PRESETS)}") from None


def check_source(preset: Preset, family: str, config: Mapping[str, Any], where: str) -> None:
    """Refuse a source ``preset`` does not convert: another family, or a model of that family the
    target cannot express.

    Raises:
        PlanError: one line naming the source, what it is and what to do.
    """
    if family not in preset.sources:
        others = [p.name for p in PRESETS.values() if family in p.sources]
        arch = config.get("architectures")
        what = f"{config.get('model_type', 'an unknown model_type')}" + (f" ({arch[0]})" if isinstance(arch, list)
                                                                          and arch else "")
        hint = f"use preset {others[0]!r}" if others else "remove the preset (no built-in preset converts it)"
        raise PlanError(f"{where}: rename.preset {preset.name!r} converts {', '.join(preset.sources)} checkpoints, "
                        f"but this source is {what}; {hint}")
    for check in preset.checks:
        reason = CHECKS[check](config)
        if reason:
            raise PlanError(f"{where}: rename.preset {preset.name!r} cannot convert this {family} model: {reason}")

"""Tensor renaming: built-in presets as data tables, then the manifest's own rules.

A preset is plain data (like llama.cpp's ``tensor_mapping.py``): key rules per source layout
and a config relabel. Nothing here mutates a shared table; :func:`compile_renamer` builds a new
:class:`Renamer` each time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from .errors import ManifestError
from .manifest import RenameSpec

#: The header key the safetensors format keeps for metadata: no tensor may have this name.
RESERVED_NAME = "__metadata__"


@dataclass(frozen=True, slots=True)
class KeyRule:
    """``pattern`` (anchored regex on the full name) -> ``template``; ``permute`` names the config
    field holding the head count when the rows must be reordered for the rotary convention."""

    pattern: str
    template: str
    permute: str | None = None


@dataclass(frozen=True, slots=True)
class Preset:
    """A built-in conversion: key rules per source layout, and how config.json is relabelled.

    ``config_set`` keys are written; ``config_drop`` keys removed; ``config_copy`` maps a
    destination key to the source key whose value it takes when that value is not null.
    """

    name: str
    key_rules: Mapping[str, tuple[KeyRule, ...]]
    config_set: Mapping[str, Any]
    config_drop: tuple[str, ...]
    config_copy: Mapping[str, str]


# Mistral's native checkpoint (consolidated.safetensors + params.json) -> Hugging Face names
# (Mistral's and Llama's are the same), as transformers' convert_mistral_weights_to_hf.py maps
# them. q and k rows are permuted from Mistral's interleaved rotary pairs to Hugging Face's
# half-split convention, per head of head_dim rows: the head count is the config field named in
# ``permute`` (k uses the KV heads), see tensorsurgery.native. Also applied without a preset.
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

PRESETS: Mapping[str, Preset] = MappingProxyType({
    "mistral-to-llama": Preset(
        name="mistral-to-llama",
        # Hugging Face's Mistral already uses Llama's tensor names: only config.json changes.
        key_rules=MappingProxyType({"hf": (), "mistral": _MISTRAL_NATIVE}),
        config_set=MappingProxyType({
            "model_type": "llama", "architectures": ("LlamaForCausalLM",),
            "attention_bias": False, "mlp_bias": False,
        }),
        config_drop=("sliding_window", "use_sliding_window", "max_window_layers"),
        # Llama has no sliding window: beyond Mistral's window the two models differ, so the
        # usable context is the window (SOLAR ships 4096 for Mistral-7B-v0.1).
        config_copy=MappingProxyType({"max_position_embeddings": "sliding_window"}),
    ),
})


@dataclass(frozen=True, slots=True)
class Renamed:
    """A source tensor's output name, and the config key of its head count if its rows permute."""

    name: str
    permute: str | None = None


@dataclass(frozen=True, slots=True)
class Renamer:
    """Compiled rename rules for one source layout. Use :meth:`rename`."""

    drop: tuple[re.Pattern[str], ...]
    preset_rules: tuple[tuple[re.Pattern[str], KeyRule], ...]
    rules: tuple[tuple[re.Pattern[str], str], ...]
    strict: bool

    def rename(self, name: str) -> Renamed | None:
        """The output name of source tensor ``name``, or None when a ``drop`` pattern matches.

        Raises:
            ManifestError: under a preset with key rules, a name that no rule maps.
        """
        if any(p.search(name) for p in self.drop):
            return None
        permute = None
        for pattern, rule in self.preset_rules:
            if pattern.fullmatch(name):
                name, permute = pattern.sub(rule.template, name), rule.permute
                break
        else:
            if self.strict:
                raise ManifestError(f"tensor {name!r} matches no rule of the preset; add a "
                                    f"[rename] rule for it or drop it")
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
        return Renamed(name, permute)


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

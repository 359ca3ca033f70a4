"""Model-family knowledge as data: where a family's decoder layers live, which config key counts
them, which config fields describe the layers one by one (and how transformers fills them in when a
config.json leaves them out), and which layers come after the counted ones.

One :class:`Family` per family, looked up from config.json's ``model_type`` (never by if/elif). A
model no entry knows uses :data:`GENERIC`: today's rules for Llama-like decoders (a ``layers.N``
segment anywhere in a name; any config list with one entry per layer follows the arrangement; the
dense/MoE fields that several families share by name are recomputed).
Adding a family is one entry here plus a test in ``tests/test_families_e2e.py``.

What each field kind means for an arrangement (output layer ``i`` is source layer ``src(i)``):

* :class:`PerLayer`: a list with one value per layer (``layer_types``, ``no_rope_layers``): the output
  list is ``[value[src(i)] for i]``; when the source config lacks it, it is first derived the way
  transformers does (:class:`Periodic`, :class:`WindowFrom`, :class:`NoRopeSliding`, :class:`RopeChunked`;
  :class:`OrEmpty` when transformers also derives it in place of an empty list), then written out.
* :class:`LayerIndices`: the indices of the layers of one kind (``mlp_only_layers``: the dense
  layers of a MoE model; Llama 4's ``moe_layers``: kind ``"moe"``): recomputed from each output layer's kind.
* :class:`LeadingCount`: the first k layers are of one kind (``first_k_dense_replace``): recomputed,
  and an arrangement it cannot describe (a dense layer after a MoE one) is refused.
* pattern fields (the period or threshold a derivation reads, such as ``sliding_window_pattern`` or
  ``max_window_layers``) are kept when they still derive the written list, else set to a value that
  does, else dropped: the explicit list is what transformers reads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Protocol, Union

from tensorsurgery.families.kind_fields import KindField, KindIndices, PatternString, PeriodOffset, SpanInterval
from tensorsurgery.families.layers import GENERIC_LAYERS, LayerScheme


class Derivation(Protocol):
    """How transformers fills in a per-layer list from other config fields."""

    @property
    def key(self) -> str | None:
        """The config field the derivation reads (a pattern field), if any."""

    def derive(self, config: Mapping[str, Any], n: int, lists: Mapping[str, list[Any]]) -> list[Any]:
        """The list for ``n`` layers of ``config``; ``lists`` holds lists already known."""


@dataclass(frozen=True, slots=True)
class Periodic:
    """Layer ``i`` is ``on`` when ``(i + 1) % period == 0``, else ``off``; ``period`` is config
    ``key`` (``default`` when absent; ``key`` None: always ``default``)."""

    key: str | None
    default: int
    on: Any
    off: Any

    def derive(self, config: Mapping[str, Any], n: int, lists: Mapping[str, list[Any]]) -> list[Any]:
        period = config.get(self.key, self.default) if self.key else self.default
        if not isinstance(period, int) or isinstance(period, bool) or period <= 0:
            return []  # transformers cannot derive from it either
        return [self.off if (i + 1) % period else self.on for i in range(n)]


@dataclass(frozen=True, slots=True)
class WindowFrom:
    """Qwen2/Qwen3: layers from config ``key`` (``max_window_layers``) on use the sliding window, when
    ``use_sliding_window`` is on and ``sliding_window`` is set."""

    key: str = "max_window_layers"
    default: int = 28

    def derive(self, config: Mapping[str, Any], n: int, lists: Mapping[str, list[Any]]) -> list[Any]:
        on = bool(config.get("use_sliding_window")) and config.get("sliding_window") is not None
        start = config.get(self.key, self.default)
        return ["sliding_attention" if on and i >= start else "full_attention" for i in range(n)]


@dataclass(frozen=True, slots=True)
class NoRopeSliding:
    """SmolLM3: a layer slides when the window is on and the layer has no rope (``no_rope_layers``
    holds 1 where rope IS used)."""

    key: None = None

    def derive(self, config: Mapping[str, Any], n: int, lists: Mapping[str, list[Any]]) -> list[Any]:
        on = bool(config.get("use_sliding_window")) and config.get("sliding_window") is not None
        rope = lists.get("no_rope_layers") or [1] * n
        return ["sliding_attention" if on and not rope[i] else "full_attention" for i in range(n)]


@dataclass(frozen=True, slots=True)
class RopeChunked:
    """Llama 4: a layer that uses rope (``no_rope_layers`` holds 1) attends within chunks of
    ``attention_chunk_size`` tokens (8192 when the key is absent; ``null`` turns chunking off); the
    NoPE layers attend to everything."""

    key: None = None

    def derive(self, config: Mapping[str, Any], n: int, lists: Mapping[str, list[Any]]) -> list[Any]:
        on = config.get("attention_chunk_size", 8192) is not None
        rope = lists.get("no_rope_layers")
        if rope is None:
            return []  # the rope list does not describe these layers: nothing to derive from
        return ["chunked_attention" if on and rope[i] else "full_attention" for i in range(n)]


@dataclass(frozen=True, slots=True)
class OrEmpty:
    """``inner``, which transformers also applies when config.json holds an empty list (Llama 4:
    ``no_rope_layers if no_rope_layers else <derived>``; Meta's Hub configs say ``"no_rope_layers": []``)."""

    inner: Periodic

    @property
    def key(self) -> str | None:
        return self.inner.key

    def derive(self, config: Mapping[str, Any], n: int, lists: Mapping[str, list[Any]]) -> list[Any]:
        return self.inner.derive(config, n, lists)


@dataclass(frozen=True, slots=True)
class PerLayer:
    """A config list with one value per layer; ``derive`` says how transformers fills it in."""

    key: str
    derive: Derivation | None = None


@dataclass(frozen=True, slots=True)
class LayerIndices:
    """A config list of the indices of the layers of ``kind`` (``"dense"``); ``also`` are fields
    set beside it so that the list alone decides (``decoder_sparse_step = 1``)."""

    key: str
    kind: str
    also: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class LeadingCount:
    """A config count: the first k layers are of ``kind`` (``"dense"``), the rest are not."""

    key: str
    kind: str


@dataclass(frozen=True, slots=True)
class FromIndices:
    """LFM2: layer ``i`` is ``on`` when it is in config ``key`` (``full_attn_idxs``; every layer
    when absent), else ``off``."""

    key: str
    on: Any
    off: Any

    def derive(self, config: Mapping[str, Any], n: int, lists: Mapping[str, list[Any]]) -> list[Any]:
        at = config.get(self.key)
        at = list(range(n)) if at is None else at
        return [self.on if i in at else self.off for i in range(n)] if isinstance(at, list) else []


LayerField = Union[PerLayer, LayerIndices, LeadingCount, KindField]


def field_keys(f: LayerField) -> tuple[str, ...]:
    """Every config key a field rewrites."""
    if isinstance(f, LayerIndices):
        return (f.key, *(k for k, _ in f.also))
    return getattr(f, "keys", (f.key,))

#: Lists that are never per-layer even when their length happens to equal the layer count.
NOT_PER_LAYER = frozenset({"architectures", "bos_token_id", "eos_token_id", "pad_token_id"})

#: A layer holding one of these (relative to the layer) is a mixture-of-experts layer.
MOE_TENSORS = re.compile(r"(?:^|\.)(?:experts|block_sparse_moe|router|shared_experts?)\.|^mlp\.gate\.weight$")


@dataclass(frozen=True, slots=True)
class Family:
    """What planning needs to know of one model family.

    ``layers`` finds decoder layers in tensor names; ``config_path`` is where the decoder's config
    sits in config.json (``()`` top level, ``("text_config",)`` for multimodal models) and
    ``count_key`` the key there that counts its layers. ``extra_layers_key`` counts layers saved
    after the counted ones (DeepSeek-V3's multi-token prediction), which stay after the new last
    layer. ``mirrors`` pairs a private copy of a field with the field (Gemma 3's
    ``_sliding_window_pattern``). ``position_bound`` names boolean config fields that tie a layer's
    computation to its index, so that moving layers changes the model; ``positional`` says how the
    family's own code always does (no config field turns it off), and moving layers is refused;
    ``depth_bound`` says how its code scales every layer by the layer count, and another count is
    refused. ``flat_config``: configs of the family written before it had a ``text_config`` (Qwen's
    own Qwen2.5-VL configs) keep the decoder's fields at the top level; transformers reads them
    there, and so does this. ``count_from``: fields whose length counts the layers when config.json
    has no ``count_key`` (Nemotron-H: transformers counts ``layers_block_type``).
    """

    name: str
    model_types: tuple[str, ...] = ()
    layers: LayerScheme = GENERIC_LAYERS
    config_path: tuple[str, ...] = ()
    count_key: str = "num_hidden_layers"
    fields: tuple[LayerField, ...] = ()
    extra_layers_key: str | None = None
    mirrors: tuple[tuple[str, str], ...] = ()
    position_bound: tuple[str, ...] = ()
    positional: str = ""
    depth_bound: str = ""
    flat_config: bool = False
    count_from: tuple[str, ...] = ()

    def text_config(self, config: Mapping[str, Any]) -> Mapping[str, Any]:
        """The part of ``config`` that describes the decoder (``{}`` when it is missing; the top
        level for a ``flat_config`` family whose config.json has no ``config_path``)."""
        if self.flat_config and not self.nested(config):
            return config
        for key in self.config_path:
            sub = config.get(key)
            config = sub if isinstance(sub, dict) else {}
        return config

    def nested(self, config: Mapping[str, Any]) -> bool:
        """True when ``config`` holds the decoder's config at ``config_path``."""
        for key in self.config_path:
            sub = config.get(key)
            if not isinstance(sub, dict):
                return False
            config = sub
        return True

    def declared_layers(self, config: Mapping[str, Any]) -> Any:
        """The layer count config.json declares (None when absent; not checked to be an int)."""
        return self.layer_count(self.text_config(config))

    def layer_count(self, text: Mapping[str, Any]) -> Any:
        """The layer count a decoder's config ``text`` declares: ``count_key``, or else the length
        of the first ``count_from`` field it has (None when neither)."""
        if self.count_key in text or not self.count_from:
            return text.get(self.count_key)
        value = next((text[k] for k in self.count_from if isinstance(text.get(k), (list, str))), None)
        return None if value is None else len(value)

    def extra_layers(self, config: Mapping[str, Any]) -> int:
        """How many layers are saved after the counted ones (0 when the family has none)."""
        value = self.text_config(config).get(self.extra_layers_key) if self.extra_layers_key else 0
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    def count_name(self, config: Mapping[str, Any]) -> str:
        """What counts the layers of ``config``, for messages: the count's path, or the length of
        the ``count_from`` field that does (``len(layers_block_type)``)."""
        text = self.text_config(config)
        if self.count_key in text or not self.count_from:
            return self.count_path
        return next((f"len({k})" for k in self.count_from if isinstance(text.get(k), (list, str))), self.count_path)

    @property
    def count_path(self) -> str:
        """The dotted config.json path of the layer count, for messages."""
        return ".".join((*self.config_path, self.count_key))

    @property
    def generic(self) -> bool:
        return self is GENERIC


_DECODER = LayerScheme(("model.layers",))
_SLIDING_ALTERNATE = PerLayer("layer_types", Periodic(None, 2, "full_attention", "sliding_attention"))
_GEMMA3_LAYERS = (PerLayer("layer_types",
                            Periodic("sliding_window_pattern", 6, "full_attention", "sliding_attention")),)
_DENSE_INDICES = LayerIndices("mlp_only_layers", "dense", (("decoder_sparse_step", 1),))
_LINEAR_FULL = PerLayer("layer_types", Periodic("full_attention_interval", 4, "full_attention", "linear_attention"))
_MOE_INDICES = LayerIndices("moe_layers", "moe", (("interleave_moe_layer_step", 1),))
_LEADING_DENSE = LeadingCount("first_k_dense_replace", "dense")

#: The rules for a model_type no entry knows. Its per-layer lists follow the arrangement (the
#: generic rule in :mod:`tensorsurgery.planning.config`); the fields that say which layers are dense or MoE
#: are named the same across the families that have them (Qwen-MoE's ``mlp_only_layers``, Llama 4's
#: ``moe_layers``, DeepSeek/GLM/Kimi's ``first_k_dense_replace``), so they are recomputed where a
#: config has them, rather than left describing the source's layers.
GENERIC = Family("generic", fields=(_DENSE_INDICES, _MOE_INDICES, _LEADING_DENSE))

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), _DECODER),
    Family("mistral", ("mistral",), _DECODER),
    Family("qwen2", ("qwen2",), _DECODER, fields=(PerLayer("layer_types", WindowFrom()),)),
    Family("qwen3", ("qwen3",), _DECODER, fields=(PerLayer("layer_types", WindowFrom()),)),
    Family("qwen2_moe", ("qwen2_moe",), _DECODER, fields=(_DENSE_INDICES,)),
    Family("qwen3_moe", ("qwen3_moe",), _DECODER, fields=(_DENSE_INDICES,)),
    Family("qwen3_next", ("qwen3_next",), _DECODER, fields=(_LINEAR_FULL, _DENSE_INDICES)),
    # Qwen3.5 and Qwen3.5-MoE, as published (vision tower included): the decoder in text_config,
    # saved as model.language_model.layers (mtp.* and model.visual.blocks.N copied as they are);
    # the text-only classes' configs are flat and their decoder is model.layers.
    Family("qwen3_5", ("qwen3_5", "qwen3_5_moe"), LayerScheme(("model.language_model.layers",)),
           config_path=("text_config",), fields=(_LINEAR_FULL,)),
    Family("qwen3_5_text", ("qwen3_5_text", "qwen3_5_moe_text"), _DECODER, fields=(_LINEAR_FULL,)),
    Family("deepseek_v3", ("deepseek_v3",), _DECODER, fields=(_LEADING_DENSE,),
           extra_layers_key="num_nextn_predict_layers"),
    Family("mixtral", ("mixtral",), _DECODER),
    Family("gpt_oss", ("gpt_oss",), _DECODER, fields=(_SLIDING_ALTERNATE,)),
    Family("gemma2", ("gemma2",), _DECODER, fields=(_SLIDING_ALTERNATE,)),
    Family("gemma3_text", ("gemma3_text",), _DECODER, fields=_GEMMA3_LAYERS,
           mirrors=(("_sliding_window_pattern", "sliding_window_pattern"),)),
    # Gemma 3 with its vision tower: transformers saves the decoder as language_model.model.layers
    # (Hub checkpoints too) or model.language_model.layers; the tower's own layers.N are not decoder layers.
    Family("gemma3", ("gemma3",), LayerScheme(("language_model.model.layers", "model.language_model.layers")),
           config_path=("text_config",), fields=_GEMMA3_LAYERS,
           mirrors=(("_sliding_window_pattern", "sliding_window_pattern"),)),
    Family("phi3", ("phi3",), _DECODER),
    Family("olmo2", ("olmo2",), _DECODER),
    Family("smollm3", ("smollm3",), _DECODER, fields=(
        PerLayer("no_rope_layers", Periodic("no_rope_layer_interval", 4, 0, 1)),
        PerLayer("layer_types", NoRopeSliding()))),
    # Mistral Small 3.1/3.2, Ministral 3 (Pixtral vision tower + a mistral / ministral3 text_config):
    # saved (5.24 and the Hub) as language_model.model.layers; checkpoints written by transformers
    # 4.52-4.57 use model.language_model.layers, which 5.24 loads too. The tower's transformer.layers.N
    # are not decoder layers. No per-layer config lists.
    Family("mistral3", ("mistral3",), LayerScheme(("language_model.model.layers", "model.language_model.layers")),
           config_path=("text_config",)),
    # Qwen2.5-VL: saved (5.24 and Qwen's Hub checkpoints) as model.layers, fine-tunes written by
    # transformers 4.52-4.57 as model.language_model.layers (5.24 loads both); vision blocks are
    # visual.blocks.N. 5.24 writes the decoder's fields into text_config (layer_types derived as for
    # Qwen2, but max_window_layers defaults to 80). Qwen's own Hub configs, written by 4.x, keep them
    # at the top level with no text_config: read and rewritten there (flat_config).
    Family("qwen2_5_vl", ("qwen2_5_vl",), LayerScheme(("model.layers", "model.language_model.layers")),
           config_path=("text_config",), fields=(PerLayer("layer_types", WindowFrom(default=80)),),
           flat_config=True),
    # Llama 4 Scout / Maverick: language_model.model.layers (5.24 and the Hub; the vision tower's are
    # vision_model.model.layers). Rope on layers with no_rope_layers 1 (Meta's configs: [], derived
    # from no_rope_layer_interval 4), those layers chunked (layer_types), MoE layers listed in
    # moe_layers (Hub configs: absent, derived from interleave_moe_layer_step); a written moe_layers
    # decides alone, so interleave_moe_layer_step is set to 1 beside it (as decoder_sparse_step).
    Family("llama4", ("llama4",), LayerScheme(("language_model.model.layers",)), config_path=("text_config",),
           fields=(PerLayer("no_rope_layers", OrEmpty(Periodic("no_rope_layer_interval", 4, 0, 1))),
                   PerLayer("layer_types", RopeChunked()),
                   _MOE_INDICES)),
    # GLM-4.5/4.6/4.7 (glm4_moe): DeepSeek-V3's layout, its MTP layer saved after the counted ones.
    Family("glm4_moe", ("glm4_moe",), _DECODER, fields=(_LEADING_DENSE,),
           extra_layers_key="num_nextn_predict_layers"),
    # Command R7B (cohere2): the Hub's config.json says sliding_window_pattern 4 (every 4th layer full
    # attention) and no layer_types, which transformers derives from it.
    Family("cohere2", ("cohere2",), _DECODER, fields=(
        PerLayer("layer_types", Periodic("sliding_window_pattern", 4, "full_attention", "sliding_attention")),)),
    # Falcon (FalconForCausalLM saves transformer.h.N) and DBRX (transformer.blocks.N, counted by n_layers).
    Family("falcon", ("falcon",), LayerScheme(("transformer.h",))),
    Family("dbrx", ("dbrx",), LayerScheme(("transformer.blocks",)), count_key="n_layers"),
    # GPT-2: GPT2LMHeadModel saves transformer.h.N; GPT2Model checkpoints (openai-community/gpt2) bare h.N.
    Family("gpt2", ("gpt2",), LayerScheme(("transformer.h", "h")), count_key="n_layer",
           position_bound=("scale_attn_by_inverse_layer_idx",)),
    # Found by the family sweep: layers whose modeling code takes a constant from the layer's index.
    Family("diffllama", ("diffllama",), _DECODER,
           positional="DiffLlama's attention takes its lambda_init from the layer's index"),
    Family("beam", ("beam",), _DECODER,
           positional="Beam scales each layer's residual add by the layer's depth (attn_residual_add_idx)"),
    Family("minicpm3", ("minicpm3",), _DECODER,
           depth_bound="MiniCPM3 scales each residual branch by scale_depth / sqrt(num_hidden_layers)"),
    # Hybrids of issue 17, whose configs say which layer is which by a rule (kind_fields.py).
    # Jamba: attention where i % attn_layer_period == attn_layer_offset, experts where
    # i % expert_layer_period == expert_layer_offset (transformers' defaults 8/4 and 2/1 when absent).
    Family("jamba", ("jamba",), _DECODER, fields=(
        PeriodOffset("attn_layer_period", "attn_layer_offset", "attention", "mamba", 8, 4),
        PeriodOffset("expert_layer_period", "expert_layer_offset", "MoE", "dense", 2, 1))),
    # Bamba (and its Mamba-2 hybrids' layout): attention in attn_layer_indices, Mamba-2 elsewhere.
    Family("bamba", ("bamba",), _DECODER, fields=(KindIndices("attn_layer_indices", "attention"),)),
    # Zamba2: layers_block_type per layer; transformers derives hybrid_layer_ids from it but a
    # hybrid_layer_ids in config.json overrides that, so it is rewritten too. The hybrid layers
    # share num_mem_blocks transformer blocks, saved in the first hybrid layers, whose adapters
    # (..._adapter_list.K) are numbered by hybrid layer: those layers may not repeat or reorder.
    Family("zamba2", ("zamba2",), _DECODER, fields=(
        PerLayer("layers_block_type"),
        KindIndices("hybrid_layer_ids", "hybrid", of=("layers_block_type", "hybrid"), in_order=True,
                    why="they share transformer blocks that hold one adapter per hybrid layer, numbered in "
                        "order, which a moved hybrid layer cannot take along"))),
    # Nemotron-H: transformers 5 saves layers_block_type and counts the layers by it (no
    # num_hidden_layers); the Hub's configs say hybrid_override_pattern ("M-M*-...", one letter per
    # layer) and num_hidden_layers.
    Family("nemotron_h", ("nemotron_h",), LayerScheme(("backbone.layers",)),
           count_from=("layers_block_type", "hybrid_override_pattern"),
           fields=(PerLayer("layers_block_type"), PatternString("hybrid_override_pattern"))),
    # LFM2: layer_types ("conv" / "full_attention"), derived from full_attn_idxs when absent; the
    # transformers 4.54 reads LiquidAI's full_attn_idxs alone. LFM2-MoE: the first num_dense_layers layers dense.
    Family("lfm2", ("lfm2",), _DECODER, fields=(
        PerLayer("layer_types", FromIndices("full_attn_idxs", "full_attention", "conv")),
        KindIndices("full_attn_idxs", "full attention", of=("layer_types", "full_attention")))),
    Family("lfm2_moe", ("lfm2_moe",), _DECODER, fields=(
        PerLayer("layer_types"), LeadingCount("num_dense_layers", "dense"))),
    # ERNIE 4.5 MoE: MoE where moe_layer_start_index <= i <= moe_layer_end_index (-1: the last) and
    # (i + 1) % moe_layer_interval == 0.
    Family("ernie4_5_moe", ("ernie4_5_moe",), _DECODER, fields=(
        SpanInterval("moe_layer_interval", "moe_layer_start_index", "moe_layer_end_index", "MoE", "dense",
                     (1, -1, 1)),)),
    # EXAONE 4: layer_types, derived from an integer sliding_window_pattern (every p-th layer full);
    # the Hub's 32B config says "LLLG" (repeated over the layers, as vLLM reads it) beside layer_types.
    Family("exaone4", ("exaone4",), _DECODER, fields=(
        PerLayer("layer_types", Periodic("sliding_window_pattern", 4, "full_attention", "sliding_attention")),
        PatternString("sliding_window_pattern", repeats=True))),
)

_BY_MODEL_TYPE: Mapping[str, Family] = MappingProxyType({t: f for f in FAMILIES for t in f.model_types})


def family_of(config: Mapping[str, Any]) -> Family:
    """The family ``config`` (a config.json) belongs to; :data:`GENERIC` when no entry knows it."""
    model_type = config.get("model_type")
    return _BY_MODEL_TYPE.get(model_type, GENERIC) if isinstance(model_type, str) else GENERIC


def get_family(name: str) -> Family:
    """The family called ``name`` (as presets name the families they accept).

    Raises:
        KeyError: no such family.
    """
    for family in (*FAMILIES, GENERIC):
        if family.name == name:
            return family
    raise KeyError(name)


def is_moe_layer(suffixes: Iterable[str]) -> bool:
    """True when a layer holding tensors with these names (relative to the layer) is a mixture of
    experts (experts, a router), as opposed to a dense MLP layer."""
    return any(MOE_TENSORS.search(s) for s in suffixes)


def layer_lists(family: Family, config: Mapping[str, Any], n: int) -> dict[str, list[Any]]:
    """The family's per-layer lists for a model of ``n`` layers whose (text) config is ``config``:
    as written, or derived the way transformers derives them when absent. A list of the wrong
    length is left out (the config does not describe these weights; the caller says so)."""
    lists: dict[str, list[Any]] = {}
    for f in family.fields:
        if not isinstance(f, PerLayer):
            continue
        value = config.get(f.key)
        if f.derive is not None and (value is None or (value == [] and isinstance(f.derive, OrEmpty))):
            value = f.derive.derive(config, n, lists)
        if isinstance(value, list) and len(value) == n:
            lists[f.key] = value
    return lists

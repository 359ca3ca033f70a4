"""Tiny random models of every decoder-only causal-LM family the pinned transformers ships, built
from each config class's own defaults shrunk to a few layers and a small width, and the same layer
surgery done in memory on the loaded model (the reference the sweep compares tensorsurgery with).

Deliberately independent of ``tensorsurgery`` (nothing is imported from it).

* :func:`sweep_families`: ``{model_type: class name}`` of the families swept, from
  ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, less :data:`NOT_DECODER_ONLY` and duplicates of a class.
* :func:`tiny_config`: the family's config class, defaults shrunk (:data:`SIZES`, then the family's
  :data:`OVERRIDES`), per-layer lists of the default depth left for the class to derive again.
* :func:`build_tiny`: the checkpoint (bf16, two or more shards) written by ``save_pretrained``.
* :func:`in_memory_surgery`: the source loaded by transformers, its decoder layer modules rebuilt in
  the new order (deep copies: each output layer is its source layer, with the kind it was built
  with), the config's layer count and per-layer lists following, optionally every stored tensor
  rounded through float16; its logits on fixed inputs.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

LAYERS = 6
VOCAB = 128
SEQ_LEN = 20

#: Families in the causal-LM mapping that are not decoder-only models: the causal-LM heads of
#: encoder models and the decoders of encoder-decoder models (they are not checkpoints whose layers
#: a depth up-scale stacks).
NOT_DECODER_ONLY: dict[str, str] = {
    **{t: "encoder model with a causal-LM head" for t in (
        "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
        "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl",
        "xmod", "xlm", "xlnet", "reformer")},
    **{t: "the decoder of an encoder-decoder model" for t in (
        "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus",
        "plbart", "prophetnet", "trocr", "whisper", "musicgen", "musicgen_melody", "moss_transcribe_diarize")},
}

#: Small sizes, set wherever a config (or one of its sub-configs) has the key.
SIZES: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "n_embd": 32, "d_model": 32, "dim": 32, "embed_dim": 32,
    "intermediate_size": 64, "n_inner": 64, "ffn_dim": 64, "d_ff": 64, "ffn_hidden_size": 64,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128, "n_positions": 128,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "n_layers": LAYERS, "num_layers": LAYERS,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "expert_intermediate_size": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "sliding_window": 8, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
    "v_head_dim": 8, "qk_head_dim": 8, "rotary_dim": 4,
    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_head_dim": 16,
    "mamba_d_conv": 4, "n_groups": 1, "mamba_n_groups": 1, "time_step_rank": 8, "mamba_dt_rank": 8,
    "attention_chunk_size": 8, "global_attn_every_n_layers": 2, "pad_token_id": None,
    "num_expert_group": 1, "num_experts_per_token": 2, "num_shared_experts": 1,
}
#: Keys of :data:`SIZES` set even where the class's default is None (the class would derive a
#: full-size value from it, or fail): real checkpoints of those families write them.
SET_WHEN_NONE = frozenset({"pad_token_id", "head_dim", "num_key_value_heads", "n_routed_experts", "num_experts_per_tok",
                           "n_shared_experts", "moe_intermediate_size"})

#: Per family: config kwargs after :data:`SIZES` (sub-config dicts merged), to keep the shape of the
#: real models at this size (both kinds of a hybrid, dense layers before MoE ones, windows).
_MLA = {"num_key_value_heads": 4, "head_dim": 4}  # multi-head latent attention: kv heads = heads, head_dim = rope dim
OVERRIDES: dict[str, dict[str, Any]] = {
    **{t: _MLA for t in ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "axk1",
                         "axk2", "youtu", "minicpm3", "kimi_linear", "bailing_hybrid")},
    "emu3": {"pad_token_id": 0},
    "modernbert-decoder": {"pad_token_id": 0},
    # Nemotron-H counts its layers by layers_block_type (num_hidden_layers is ignored): six, of every kind.
    "nemotron_h": {"layers_block_type": ["linear_attention", "moe", "linear_attention", "full_attention", "mlp",
                                         "linear_attention"]},
    "lfm2_moe": {"num_dense_layers": 2,
                 "layer_types": ["conv", "conv", "full_attention", "conv", "conv", "full_attention"]},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
                       "indexer_compress_ratio": 2},
}


def sweep_families() -> dict[str, str]:
    """``{model_type: class name}``: every decoder-only family of the causal-LM mapping, one per class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    by_class: dict[str, list[str]] = {}
    for model_type, cls in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        if model_type not in NOT_DECODER_ONLY:
            by_class.setdefault(cls, []).append(model_type)
    out: dict[str, str] = {}
    for cls, types in by_class.items():
        # The model_type the class's own config says (llama for LlamaForCausalLM, not exaone).
        own = getattr(model_class(cls).config_class, "model_type", None)
        out[own if own in types else types[0]] = cls
    return dict(sorted(out.items()))


def model_class(name: str):
    import transformers

    return getattr(transformers, name)


def _shrink(d: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    out = dict(d)
    n_default = next((d[k] for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
                      if isinstance(d.get(k), int)), None)
    for key, value in d.items():
        if key in SIZES and (value is None or isinstance(value, (int, float))) and not isinstance(value, bool):
            if value is not None or key in SET_WHEN_NONE:
                out[key] = SIZES[key]
        elif isinstance(value, dict) and n_default and value and all(_is_index(k) for k in value):
            out[key] = {k: v for k, v in value.items() if int(k) < LAYERS}  # keyed by layer (Gemma 4)
        elif isinstance(value, dict) and key.endswith("_config") and depth < 2:
            out[key] = _shrink(value, depth + 1)
        elif isinstance(value, list) and n_default and len(value) == n_default and n_default != LAYERS:
            out[key] = None  # a per-layer list of the default depth: derived again for LAYERS
        elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
                and n_default and max(value) < n_default and key.endswith(("layers", "indices", "ids", "idxs")):
            out[key] = [v for v in value if v < LAYERS]  # layer indices: those of the first LAYERS layers
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(out.get(key), int) and out[key] >= VOCAB:
            out[key] = VOCAB - 1
    return out


def _is_index(key: Any) -> bool:
    return isinstance(key, int) and not isinstance(key, bool) or isinstance(key, str) and key.isdigit()


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key.endswith("_config"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def tiny_config(model_type: str, class_name: str):
    """The config object of a tiny ``model_type`` model for class ``class_name``."""
    config_class = model_class(class_name).config_class
    d = config_class().to_dict()
    for key in ("transformers_version", "architectures", "model_type", "dtype", "torch_dtype"):
        d.pop(key, None)
    kwargs = _merge(_shrink(d), OVERRIDES.get(model_type, {}))
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in d and d[k] is None or k == "pad_token_id"}
    return config_class(**kwargs)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and persistent floating buffer seeded, in sorted-name order (independent of
    the family's init code, so every tensor of every layer differs)."""
    gen = torch.Generator().manual_seed(seed)
    persistent = set(model.state_dict().keys())
    tensors = dict(model.named_parameters())
    tensors.update({k: b for k, b in model.named_buffers() if k in persistent and b.is_floating_point()})
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            if "norm" in name and t.dim() == 1 and name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            elif t.dim() <= 1:
                value = 0.1 * noise
            else:
                value = noise / math.sqrt(t.shape[-1])
            t.copy_(value.to(t.dtype))


def build_tiny(model_type: str, class_name: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of the family into ``folder`` (bf16, several shards)."""
    config = tiny_config(model_type, class_name)
    cls = model_class(class_name)
    model = cls._from_config(config, dtype=torch.bfloat16)
    randomize_(model, seed)
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=max(max(sizes), sum(sizes) // 3))
    return folder


def inputs_for(config) -> dict[str, torch.Tensor]:
    vocab = config.get_text_config(decoder=True).vocab_size
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, min(vocab, VOCAB), (1, SEQ_LEN), generator=gen)
    return {"input_ids": ids}


def load(folder: Path, class_name: str):
    """``(model, loading info)`` of ``folder`` loaded in float32 with eager attention, eval mode."""
    model, info = model_class(class_name).from_pretrained(folder, dtype=torch.float32,
                                                          attn_implementation="eager", output_loading_info=True)
    return model.eval(), info


def logits_of(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def decoder_lists(model, n: int) -> list[tuple[torch.nn.Module, str]]:
    """``(parent, attribute)`` of every ModuleList of ``n`` modules outside vision/audio towers: the
    decoder's layers (and lists indexed like them)."""
    found = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            full = f"{name}.{attr}" if name else attr
            if isinstance(child, torch.nn.ModuleList) and len(child) == n and not any(
                    w in full for w in ("vision", "visual", "audio", "encoder")):
                found.append((module, attr))
    return found


_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_number", "layer_index")


def in_memory_surgery(source_model, arrangement: list[int], *, float16: bool = False):
    """A copy of ``source_model`` whose decoder layer ``i`` is a deep copy of source layer
    ``arrangement[i]`` (its index attributes set to ``i``, as a model built for that depth has),
    with the config's layer count and per-layer lists following, every stored tensor rounded
    through float16 when ``float16``."""
    model = copy.deepcopy(source_model)
    text = model.config.get_text_config(decoder=True)
    n = text.num_hidden_layers
    lists = decoder_lists(model, n)
    if not lists:
        raise LookupError(f"no ModuleList of {n} layers in {type(model).__name__}")
    for parent, attr in lists:
        old = getattr(parent, attr)
        new = torch.nn.ModuleList(copy.deepcopy(old[s]) for s in arrangement)
        for i, layer in enumerate(new):
            for sub in layer.modules():
                for a in _INDEX_ATTRS:
                    if isinstance(getattr(sub, a, None), int) and not isinstance(getattr(sub, a), bool):
                        setattr(sub, a, i)
        setattr(parent, attr, new)
    for cfg in {id(c): c for c in (model.config, text)}.values():
        for key, value in list(vars(cfg).items()):
            if isinstance(value, list) and len(value) == n and key not in ("architectures", "eos_token_id"):
                setattr(cfg, key, [value[s] for s in arrangement])
        if getattr(cfg, "num_hidden_layers", None) == n:
            cfg.num_hidden_layers = len(arrangement)
    if float16:
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.to(torch.float16).to(t.dtype))
    return model.eval()

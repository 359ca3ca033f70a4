"""Tiny random checkpoints of many model families, and an in-memory reference layer surgery.

Deliberately independent of ``tensorsurgery`` (nothing is imported from it): tests build a source
checkpoint here, run the tool on it, and compare the tool's output with what :func:`reference_surgery`
builds the way a careful human would with safetensors and transformers.

Build (offline, CPU, a second or so each)::

    from family_models import FAMILIES, build
    src = build("qwen3_moe", tmp_path / "src", num_layers=6)        # bf16, >= 2 shards + index

Reference surgery and the tool-output check::

    ref = reference_surgery(src, [0, 1, 2, 3, 2, 3, 4, 5])            # DUS n=6, m=2
    ref.config        # the config.json dict the output should have
    ref.state_dict    # the tensors, in checkpoint (save_pretrained) naming, bit-exact copies of the source
    ref.logits        # float32 logits of the rebuilt model on model_inputs(ref.config)
    got = load_output(out_folder)                                     # what transformers makes of the tool output
    assert not got.missing_keys and got.unexpected_keys == ref.unexpected_on_load()
    assert torch.equal(got.logits, ref.logits)

Relabel references (another architecture, same logits): :func:`relabel_qwen2_to_llama`,
:func:`relabel_phi3_to_llama`, :func:`relabel_deepseek_v3_to_glm4_moe_lite`.

Every family is described twice, on purpose: :data:`FAMILIES` says how to *build* a realistic tiny
checkpoint (config kwargs shaped like the real Hub configs, the class, where the decoder layers live);
the reference surgery then works from the saved files (config.json and the tensors) plus that layout
data, and lets transformers itself derive per-layer lists (``layer_types`` and friends) from the
source config, so a wrong guess here shows up as a logits mismatch in ``test_family_models.py``.

Arrangement helpers: :func:`dus` (n layers, overlap m: ``0..n-m-1`` then ``m..n-1``) and :func:`idus`
(both copies interleaved in groups of g).
"""
from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# ----------------------------------------------------------------------------------------------------
# Arrangements
# ----------------------------------------------------------------------------------------------------


def keep(n: int) -> list[int]:
    """Every layer once, in order."""
    return list(range(n))


def dus(n: int, m: int) -> list[int]:
    """Depth up-scaling: copy A = layers ``0..n-m-1``, then copy B = layers ``m..n-1``."""
    if not 0 < m < n:
        raise ValueError(f"overlap m={m} must be in 1..{n - 1}")
    return list(range(0, n - m)) + list(range(m, n))


def idus(n: int, m: int, g: int) -> list[int]:
    """Interlocked DUS: copies A (``0..n-m-1``) and B (``m..n-1``) cut in groups of ``g``: A1 B1 A2 B2 ..."""
    a, b = list(range(0, n - m)), list(range(m, n))
    out: list[int] = []
    for start in range(0, n - m, g):
        out += a[start:start + g] + b[start:start + g]
    return out


assert dus(32, 8) == list(range(24)) + list(range(8, 32))
assert idus(32, 8, 1)[:4] == [0, 8, 1, 9] and idus(32, 8, 24) == dus(32, 8)

# ----------------------------------------------------------------------------------------------------
# Families: how to build a tiny one, and where its layers live
# ----------------------------------------------------------------------------------------------------

VOCAB = 128


@dataclass(frozen=True)
class Family:
    """One model family, as saved by ``save_pretrained`` in transformers 5.x."""

    name: str
    model_type: str  #: top-level ``model_type`` in config.json
    architecture: str  #: ``architectures[0]`` in config.json; also the transformers class built
    layers_prefix: str  #: state-dict prefix of the (text) decoder layers: ``{layers_prefix}.{i}.``
    num_layers_key: str  #: config key counting the decoder layers (in ``text_config`` when set)
    config: Callable[[int], dict[str, Any]]  #: kwargs of the config class for n layers
    default_layers: int = 4
    text_config: str | None = None  #: sub-config holding the decoder's fields (Gemma 3 multimodal)
    #: extra layers saved *after* the decoder layers, numbered on from ``num_hidden_layers``
    #: (DeepSeek-V3's multi-token-prediction layer): config key counting them.
    extra_layers_key: str | None = None
    #: tensors that are neither layers nor ``model.*``/``lm_head`` basics (documentation only)
    notes: str = ""


def _rope(theta: float, **extra: Any) -> dict[str, Any]:
    return {"rope_type": extra.pop("rope_type", "default"), "rope_theta": theta, **extra}


def _llama3(n: int) -> dict[str, Any]:
    # Llama-3.2-1B/3B shape: GQA, tied embeddings, llama3 rope scaling, eos list.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=131072,
        rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False, mlp_bias=False,
        rope_parameters=_rope(500000.0, rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=8192),
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=[2, 3],
    )


def _mistral(n: int) -> dict[str, Any]:
    # Mistral-7B-v0.3 shape: GQA, untied, no sliding window (v0.1's 4096 window covers every layer
    # alike, so an arrangement does not touch it).
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        rms_norm_eps=1e-5, hidden_act="silu", rope_parameters=_rope(1000000.0), sliding_window=None,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def _qwen2(n: int) -> dict[str, Any]:
    # Qwen2.5-0.5B shape: q/k/v biases (always on in Qwen2), tied, sliding window configured but off.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_parameters=_rope(1000000.0),
        use_sliding_window=False, sliding_window=128, max_window_layers=max(1, n - 1),
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )


def _qwen3(n: int) -> dict[str, Any]:
    # Qwen3-0.6B shape: head_dim * heads > hidden, q_norm/k_norm, tied.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_parameters=_rope(1000000.0), attention_bias=False,
        use_sliding_window=False, sliding_window=None, max_window_layers=n,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )


def _qwen3_moe(n: int) -> dict[str, Any]:
    # Qwen3-30B-A3B shape plus dense layers (mlp_only_layers), not tied. ``head_dim`` and
    # ``max_window_layers`` are not fields of Qwen3MoeConfig but are in the Hub config and kept.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_parameters=_rope(1000000.0), attention_bias=False,
        use_sliding_window=False, sliding_window=None, max_window_layers=n,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[0, n // 2],
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def _qwen2_moe(n: int) -> dict[str, Any]:
    # Qwen1.5-MoE-A2.7B / Qwen2-57B-A14B shape: experts plus a gated shared expert, q/k/v biases, and
    # here dense layers too (mlp_only_layers, which Qwen2MoeConfig reads as Qwen3-MoE's does).
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_parameters=_rope(1000000.0),
        use_sliding_window=False, sliding_window=None, max_window_layers=n,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1, n - 1],
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def _qwen3_next(n: int) -> dict[str, Any]:
    # Qwen3-Next-80B-A3B shape: 3 gated-delta-net (linear attention) layers then 1 full attention,
    # every layer MoE with a shared expert, partial rotary 0.25.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_parameters=_rope(10000000.0, partial_rotary_factor=0.25),
        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], full_attention_interval=4,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def _deepseek_v3(n: int) -> dict[str, Any]:
    # DeepSeek-V3 shape: MLA with q/kv LoRA, first_k_dense_replace dense layers then MoE with
    # grouped sigmoid routing, shared expert, yarn rope, one MTP layer (num_nextn_predict_layers).
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=n, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=4, routed_scaling_factor=2.5,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
        n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=True,
        max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters=_rope(10000.0, rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0,
                              mscale=1.0, mscale_all_dim=1.0, original_max_position_embeddings=64),
        rope_interleave=True, num_nextn_predict_layers=1,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )


def _mixtral(n: int) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_parameters=_rope(1000000.0), sliding_window=None,
        num_local_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def _gpt_oss(n: int) -> dict[str, Any]:
    # gpt-oss-20b shape: alternating sliding/full attention, attention sinks, biased MoE with
    # clamped SwiGLU, yarn rope.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=131072,
        sliding_window=8, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
        rope_parameters=_rope(150000.0, rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                              truncate=False, original_max_position_embeddings=4096),
        attention_bias=True, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )


def _gemma2(n: int) -> dict[str, Any]:
    # gemma-2-2b shape: sliding/full alternation, attention + final logit soft-capping, tied.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        max_position_embeddings=128, sliding_window=8, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", rope_parameters=_rope(10000.0),
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


def _gemma3_text(n: int) -> dict[str, Any]:
    # gemma-3-1b shape: 5 sliding : 1 full (sliding_window_pattern 6 as on the Hub), local/global
    # rope theta, tied.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        max_position_embeddings=128, sliding_window=8, sliding_window_pattern=6, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", rope_theta=1000000.0, rope_local_base_freq=10000.0,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


def _gemma3_mm(n: int) -> dict[str, Any]:
    # gemma-3-4b-it shape: text_config + a SigLIP vision tower with its own layers, linear rope
    # scaling on the global layers, image tokens inside the vocabulary.
    text = _gemma3_text(n)
    text["rope_scaling"] = {"rope_type": "linear", "factor": 8.0}
    return dict(
        text_config=text,
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7,
            layer_norm_eps=1e-6, vision_use_head=False,
        ),
        mm_tokens_per_image=4, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
        image_token_index=VOCAB - 1, tie_word_embeddings=True,
    )


def _phi3(n: int) -> dict[str, Any]:
    # Phi-3.5-mini shape: fused qkv_proj and gate_up_proj, longrope with short/long factors,
    # original_max_position_embeddings, a sliding window larger than max positions. GQA (as in
    # Phi-3-medium) so that the qkv split is not three equal thirds.
    half_rotary = 8 // 2
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        original_max_position_embeddings=64, rms_norm_eps=1e-5, sliding_window=256,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                             short_factor=[1.0, 1.05, 1.1, 1.2][:half_rotary],
                             long_factor=[1.0, 1.5, 3.0, 6.0][:half_rotary]),
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _olmo2(n: int) -> dict[str, Any]:
    # OLMo-2-1124-7B shape: post-norms (post_attention / post_feedforward), q_norm/k_norm over
    # the whole projection, MHA.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_parameters=_rope(500000.0), attention_bias=False,
        tie_word_embeddings=False, pad_token_id=1, eos_token_id=2, bos_token_id=None,
    )


def _smollm3(n: int) -> dict[str, Any]:
    # SmolLM3-3B shape: every 4th layer without rope (no_rope_layers: 1 = rope, 0 = no rope), tied.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_parameters=_rope(5000000.0), no_rope_layer_interval=4,
        use_sliding_window=False, sliding_window=None,
        tie_word_embeddings=True, pad_token_id=4, bos_token_id=1, eos_token_id=2,
    )


def _mistral3(n: int) -> dict[str, Any]:
    # Mistral-Small-3.1-24B-Instruct-2503 shape: a Mistral text_config (GQA, head_dim set, rope theta
    # 1e9, no sliding window, untied lm_head), a Pixtral vision tower (2D rope, gated MLP) with layers
    # of its own, RMS norm + 2x2 patch merger + 2-layer projector. The Hub's image token is id 10;
    # here the last id, outside the ordinary tokens model_inputs draws.
    return dict(
        text_config=dict(
            model_type="mistral", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
            rms_norm_eps=1e-5, hidden_act="silu", rope_parameters=_rope(1000000000.0), sliding_window=None,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        ),
        vision_config=dict(
            model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            head_dim=8, image_size=28, patch_size=7, num_channels=3, hidden_act="gelu",
            rope_parameters=_rope(10000.0, rope_type="axial"),
        ),
        image_token_index=VOCAB - 1, spatial_merge_size=2, vision_feature_layer=-1, projector_hidden_act="gelu",
        multimodal_projector_bias=False, tie_word_embeddings=False,
    )


#: ``build("mistral3", ..., **MINISTRAL3)``: Mistral 3 with a Ministral 3 text tower (Ministral-3-*-2512:
#: text_config model_type ministral3, yarn rope with llama_4_scaling_beta, which scales queries past
#: original_max_position_embeddings - 16 here, so within 24 tokens), and tied embeddings, to cover a
#: Mistral 3 checkpoint without lm_head.weight.
MINISTRAL3: dict[str, Any] = dict(
    text_config=dict(
        model_type="ministral3", tie_word_embeddings=True,
        rope_parameters=_rope(1000000.0, rope_type="yarn", factor=16.0, original_max_position_embeddings=16,
                              beta_fast=32.0, beta_slow=1.0, mscale_all_dim=1.0, mscale=1.0,
                              llama_4_scaling_beta=0.1),
    ),
    tie_word_embeddings=True,
)


def _qwen2_5_vl(n: int) -> dict[str, Any]:
    # Qwen2.5-VL-7B-Instruct shape: a Qwen2 decoder (q/k/v biases, GQA, untied) with multimodal rope
    # (mrope_section splits each head's rotary half into time/height/width: 16/24/24 of 64 on the
    # Hub, 2/3/3 of 8 here), the sliding window configured but off (max_window_layers = all layers);
    # a vision tower of window-attention blocks (full attention in fullatt_block_indexes), SwiGLU
    # MLPs, a 2x2 patch merger into the text width.
    return dict(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=128, rms_norm_eps=1e-6, hidden_act="silu",
            rope_parameters=_rope(1000000.0, mrope_section=[2, 3, 3]),
            use_sliding_window=False, sliding_window=32, max_window_layers=n,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        ),
        vision_config=dict(
            depth=2, hidden_size=16, intermediate_size=24, num_heads=2, in_channels=3, patch_size=2,
            spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=8, out_hidden_size=32,
            fullatt_block_indexes=[1], hidden_act="silu",
        ),
        image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
        vision_end_token_id=VOCAB - 4, tie_word_embeddings=False,
    )


def _qwen3_5(n: int) -> dict[str, Any]:
    # Qwen3.5 shape (as on the Hub: Qwen3_5ForConditionalGeneration): a Qwen3-Next-style hybrid decoder
    # (3 gated-delta-net layers then 1 full attention, partial rotary 0.25, interleaved multimodal
    # rope) in text_config, a ViT tower with learned position embeddings and a 2x2 patch merger.
    return dict(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
            rms_norm_eps=1e-6, rope_parameters=_rope(10000000.0, partial_rotary_factor=0.25, mrope_section=[1, 1, 0],
                                                     mrope_interleaved=True),
            linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_num_key_heads=2, linear_num_value_heads=4, full_attention_interval=4,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        ),
        vision_config=dict(
            depth=2, hidden_size=16, intermediate_size=24, num_heads=2, in_channels=3, patch_size=2,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64,
        ),
        image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
        vision_end_token_id=VOCAB - 4, tie_word_embeddings=False,
    )


def _qwen3_5_text(n: int) -> dict[str, Any]:
    # The same decoder as a text-only model (Qwen3_5ForCausalLM: flat config, model.layers.N).
    text = _qwen3_5(n)["text_config"]
    text["rope_parameters"] = _rope(10000000.0, partial_rotary_factor=0.25)
    return text


def _qwen3_5_moe(n: int) -> dict[str, Any]:
    # Qwen3.5-MoE: the same hybrid, every layer a mixture of experts with a gated shared expert.
    cfg = _qwen3_5(n)
    cfg["text_config"].update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                              shared_expert_intermediate_size=16)
    return cfg


def _llama4(n: int) -> dict[str, Any]:
    # Llama-4-Maverick shape (dense and MoE layers alternate: interleave_moe_layer_step 2; dense
    # layers of intermediate_size_mlp, MoE layers of a sigmoid top-1 router over fused experts plus a
    # shared expert) with Scout's qk L2 norm and llama3 rope scaling. Every 4th layer has no rope
    # (no_rope_layers 0); the rope layers attend in chunks (attention_chunk_size: 8 < 24 tokens here),
    # the NoPE layers scale queries by position (attention temperature tuning; floor_scale 8 so that
    # it acts within 24 tokens). A vision tower with layers of its own, pixel shuffle, adapter MLP.
    return dict(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=16, intermediate_size_mlp=64, num_hidden_layers=n,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
            rms_norm_eps=1e-5, hidden_act="silu", num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=2, no_rope_layer_interval=4, attention_chunk_size=8,
            attn_temperature_tuning=True, floor_scale=8, attn_scale=0.1, use_qk_norm=True,
            rope_parameters=_rope(500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=64),
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
            patch_size=7, vision_output_dim=32, pixel_shuffle_ratio=0.5, projector_input_dim=32,
            projector_output_dim=32, norm_eps=1e-5, rope_parameters=_rope(10000.0),
        ),
        boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2, image_token_index=VOCAB - 1,
        tie_word_embeddings=False,
    )


def _gpt2(n: int) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=n, n_head=4,
        activation_function="gelu_new", layer_norm_epsilon=1e-5,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, tie_word_embeddings=True,
    )


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama3", "llama", "LlamaForCausalLM", "model.layers", "num_hidden_layers", _llama3),
    Family("mistral", "mistral", "MistralForCausalLM", "model.layers", "num_hidden_layers", _mistral),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", "model.layers", "num_hidden_layers", _qwen2),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", "model.layers", "num_hidden_layers", _qwen3),
    Family("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", "model.layers", "num_hidden_layers",
           _qwen3_moe, default_layers=6),
    Family("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", "model.layers", "num_hidden_layers",
           _qwen2_moe, default_layers=6),
    Family("qwen3_next", "qwen3_next", "Qwen3NextForCausalLM", "model.layers", "num_hidden_layers",
           _qwen3_next, notes="mtp.* tensors (after the layers, not numbered with them)"),
    Family("deepseek_v3", "deepseek_v3", "DeepseekV3ForCausalLM", "model.layers", "num_hidden_layers",
           _deepseek_v3, extra_layers_key="num_nextn_predict_layers",
           notes="MTP layer saved as model.layers.{num_hidden_layers}.*"),
    Family("mixtral", "mixtral", "MixtralForCausalLM", "model.layers", "num_hidden_layers", _mixtral),
    Family("gpt_oss", "gpt_oss", "GptOssForCausalLM", "model.layers", "num_hidden_layers", _gpt_oss),
    Family("gemma2", "gemma2", "Gemma2ForCausalLM", "model.layers", "num_hidden_layers", _gemma2),
    Family("gemma3_text", "gemma3_text", "Gemma3ForCausalLM", "model.layers", "num_hidden_layers",
           _gemma3_text, default_layers=8),
    Family("gemma3", "gemma3", "Gemma3ForConditionalGeneration", "model.language_model.layers",
           "num_hidden_layers", _gemma3_mm, default_layers=8, text_config="text_config",
           notes="vision tower layers model.vision_tower.vision_model.encoder.layers.N are not decoder layers"),
    Family("phi3", "phi3", "Phi3ForCausalLM", "model.layers", "num_hidden_layers", _phi3),
    Family("olmo2", "olmo2", "Olmo2ForCausalLM", "model.layers", "num_hidden_layers", _olmo2),
    Family("smollm3", "smollm3", "SmolLM3ForCausalLM", "model.layers", "num_hidden_layers", _smollm3,
           default_layers=8),
    Family("gpt2", "gpt2", "GPT2LMHeadModel", "transformer.h", "n_layer", _gpt2),
    # Multimodal decoders up-scaled today. Odd layer counts, so that DUS with overlap n // 2 repeats layers.
    Family("mistral3", "mistral3", "Mistral3ForConditionalGeneration", "language_model.model.layers",
           "num_hidden_layers", _mistral3, default_layers=5, text_config="text_config",
           notes="Pixtral tower layers vision_tower.transformer.layers.N are not decoder layers"),
    Family("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "model.layers", "num_hidden_layers",
           _qwen2_5_vl, default_layers=5, text_config="text_config",
           notes="vision blocks visual.blocks.N; Hub configs (transformers 4.x) have no text_config"),
    Family("qwen3_5", "qwen3_5", "Qwen3_5ForConditionalGeneration", "model.language_model.layers",
           "num_hidden_layers", _qwen3_5, default_layers=5, text_config="text_config",
           notes="vision blocks model.visual.blocks.N; layer_types written out by transformers"),
    Family("qwen3_5_moe", "qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "model.language_model.layers",
           "num_hidden_layers", _qwen3_5_moe, default_layers=5, text_config="text_config"),
    Family("qwen3_5_text", "qwen3_5_text", "Qwen3_5ForCausalLM", "model.layers", "num_hidden_layers",
           _qwen3_5_text, default_layers=5),
    Family("llama4", "llama4", "Llama4ForConditionalGeneration", "language_model.model.layers",
           "num_hidden_layers", _llama4, default_layers=5, text_config="text_config",
           notes="vision tower layers vision_model.model.layers.N are not decoder layers"),
]}




def _falcon(n: int) -> dict[str, Any]:
    # Falcon-40B / 180B shape (new_decoder_architecture: grouped kv heads, parallel attention with two
    # layer norms, fused query_key_value), rotary, tied; saved as transformer.h.N.
    return dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False, layer_norm_epsilon=1e-5,
        max_position_embeddings=128, rope_parameters=_rope(10000.0), tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )


def _dbrx(n: int) -> dict[str, Any]:
    # DBRX shape: transformer.blocks.N, fused Wqkv with clip_qkv, fused experts (w1, v1, w2), untied.
    return dict(
        vocab_size=VOCAB, d_model=32, n_layers=n, n_heads=4, max_seq_len=128,
        attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=500000.0),
        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2, ffn_act_fn={"name": "silu"}),
        tie_word_embeddings=False,
    )


def _glm4_moe(n: int) -> dict[str, Any]:
    # GLM-4.5-Air shape: partial rotary 0.5, q/k/v biases, one dense layer then MoE with a shared
    # expert and sigmoid routing, one MTP layer saved after the decoder layers (num_nextn_predict_layers).
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=True, use_qk_norm=False,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
        topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True, num_nextn_predict_layers=1,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_parameters=_rope(1000000.0, partial_rotary_factor=0.5),
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def _cohere2(n: int) -> dict[str, Any]:
    # Command R7B shape: 3 sliding-window layers then 1 full (sliding_window_pattern 4 on the Hub),
    # parallel attention + MLP after one layer norm, logit scale, tied.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=8, sliding_window_pattern=4,
        layer_norm_eps=1e-5, logit_scale=0.25, rope_parameters=_rope(50000.0), tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _jamba(n: int) -> dict[str, Any]:
    # Jamba-v0.1 / 1.5 shape, scaled: attention every 4th layer from 2 (the Hub: every 8th from 4),
    # experts on every other layer from 1 (as the Hub), 4 experts top-2, Mamba elsewhere.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1,
        num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
        use_mamba_kernels=False, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _bamba(n: int) -> dict[str, Any]:
    # Bamba-9B shape (attn_layer_indices [9, 18, 27] of 32), scaled: attention at 1 and 4, Mamba-2 elsewhere.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[1, 4], mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_parameters=_rope(10000.0), tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _zamba2(n: int) -> dict[str, Any]:
    # Zamba2-2.7B shape, scaled: Mamba-2 layers with a hybrid layer (shared transformer block + Mamba-2)
    # every third from 2, two shared blocks used in turn, LoRA adapters on attention and MLP, tied.
    types = ["hybrid" if i % 3 == 2 else "mamba" for i in range(n)]
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n, layers_block_type=types,
        num_attention_heads=4, num_key_value_heads=4, num_mem_blocks=2, use_shared_attention_adapter=True,
        adapter_rank=4, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=1, n_mamba_heads=4,
        chunk_size=8, use_mem_rope=True, use_mamba_kernels=False, max_position_embeddings=128, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


#: Nemotron-H's letters for its block kinds (hybrid_override_pattern on the Hub).
NEMOTRON_H_LETTERS = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}


def _nemotron_h(n: int) -> dict[str, Any]:
    # Nemotron-H / Nemotron 3 Nano shape, scaled: Mamba-2 blocks, MLP or MoE blocks between them, an
    # attention block now and then; saved on layers_block_type (no num_hidden_layers) by transformers 5.
    kinds = ["linear_attention", "moe", "linear_attention", "full_attention", "mlp", "linear_attention", "moe"]
    return dict(
        vocab_size=VOCAB, hidden_size=32, layers_block_type=(kinds * n)[:n], num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=16,
        ssm_state_size=8, n_groups=1, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, max_position_embeddings=128,
        layer_norm_epsilon=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _lfm2(n: int) -> dict[str, Any]:
    # LFM2-1.2B shape (16 layers, attention at 2, 5, 8, 10, 12, 14), scaled: attention at 2 and 5,
    # short convolutions elsewhere, tied.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
        num_key_value_heads=2, full_attn_idxs=[i for i in (2, 5) if i < n], block_auto_adjust_ff_dim=False,
        conv_L_cache=3, max_position_embeddings=128, norm_eps=1e-5, rope_parameters=_rope(1000000.0),
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _lfm2_moe(n: int) -> dict[str, Any]:
    # LFM2-8B-A1B shape (24 layers, the first 2 dense), scaled: 2 dense layers then MoE, attention
    # at 2 and 5.
    types = ["full_attention" if i in (2, 5) else "conv" for i in range(n)]
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=n,
        num_dense_layers=2, layer_types=types, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, conv_L_cache=3, max_position_embeddings=128, norm_eps=1e-5,
        rope_parameters=_rope(1000000.0), tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _ernie4_5_moe(n: int) -> dict[str, Any]:
    # ERNIE-4.5-300B-A47B shape (the first layers dense, MoE from moe_layer_start_index to the last,
    # shared experts), scaled: dense 0-1, MoE from 2.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_k=2, moe_num_experts=4,
        moe_num_shared_experts=1, moe_layer_start_index=2, moe_layer_end_index=-1, moe_layer_interval=1,
        use_bias=False, max_position_embeddings=128, rms_norm_eps=1e-5, rope_parameters=_rope(500000.0),
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _exaone4(n: int) -> dict[str, Any]:
    # EXAONE-4.0-32B shape: three sliding-window layers then a global one ("LLLG"), QK norms, untied.
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=8, sliding_window_pattern=4,
        max_position_embeddings=128, rms_norm_eps=1e-5, rope_parameters=_rope(1000000.0),
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


#: Families added to the registry for issue 17 (tested in ``test_families_e2e.py`` through the tool
#: only: kept out of :data:`FAMILIES`, whose every family ``test_family_models.py`` checks in depth).
REGISTRY_FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("falcon", "falcon", "FalconForCausalLM", "transformer.h", "num_hidden_layers", _falcon),
    Family("dbrx", "dbrx", "DbrxForCausalLM", "transformer.blocks", "n_layers", _dbrx),
    Family("glm4_moe", "glm4_moe", "Glm4MoeForCausalLM", "model.layers", "num_hidden_layers", _glm4_moe,
           extra_layers_key="num_nextn_predict_layers", notes="MTP layer saved as model.layers.{n}.*"),
    Family("cohere2", "cohere2", "Cohere2ForCausalLM", "model.layers", "num_hidden_layers", _cohere2,
           default_layers=6),
    Family("jamba", "jamba", "JambaForCausalLM", "model.layers", "num_hidden_layers", _jamba, default_layers=7),
    Family("bamba", "bamba", "BambaForCausalLM", "model.layers", "num_hidden_layers", _bamba, default_layers=7),
    Family("zamba2", "zamba2", "Zamba2ForCausalLM", "model.layers", "num_hidden_layers", _zamba2,
           default_layers=7, notes="shared blocks in the first hybrid layers"),
    Family("nemotron_h", "nemotron_h", "NemotronHForCausalLM", "backbone.layers", "num_hidden_layers", _nemotron_h,
           default_layers=7, notes="no num_hidden_layers: counted by layers_block_type"),
    Family("lfm2", "lfm2", "Lfm2ForCausalLM", "model.layers", "num_hidden_layers", _lfm2, default_layers=7),
    Family("lfm2_moe", "lfm2_moe", "Lfm2MoeForCausalLM", "model.layers", "num_hidden_layers", _lfm2_moe,
           default_layers=7),
    Family("ernie4_5_moe", "ernie4_5_moe", "Ernie4_5_MoeForCausalLM", "model.layers", "num_hidden_layers",
           _ernie4_5_moe, default_layers=7),
    Family("exaone4", "exaone4", "Exaone4ForCausalLM", "model.layers", "num_hidden_layers", _exaone4,
           default_layers=7),
]}
ALL_FAMILIES: dict[str, Family] = {**FAMILIES, **REGISTRY_FAMILIES}

# ----------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``overrides``; dict values (``text_config``, ...) merged one level deep."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key.endswith("_config"):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def model_class(name_or_architecture: str):
    """The transformers class of a family name or an ``architectures`` entry."""
    import transformers

    arch = (ALL_FAMILIES[name_or_architecture].architecture if name_or_architecture in ALL_FAMILIES
            else name_or_architecture)
    return getattr(transformers, arch)


def make_config(name: str, num_layers: int | None = None, **overrides: Any):
    """The transformers config object of a tiny ``name`` model with ``num_layers`` decoder layers."""
    fam = ALL_FAMILIES[name]
    n = fam.default_layers if num_layers is None else num_layers
    return model_class(name).config_class(**_merge(fam.config(n), overrides))


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter and persistent floating buffer with seeded values, in sorted-name order.

    Independent of transformers' init code. Norm weights (names containing ``norm``) are
    ``1 + N(0, 0.1)`` (Gemma-style ``1 + w`` norms then scale by ~2, fine), biases and small vectors
    ``N(0, 0.1)``, embeddings ``N(0, 1)``, other matrices ``N(0, 1/fan_in)`` with fan_in the last
    dimension. Every tensor of every layer differs, so any mix-up changes the logits.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    persistent = set(model.state_dict().keys())
    tensors = dict(model.named_parameters())
    tensors.update({k: b for k, b in model.named_buffers() if k in persistent and b.is_floating_point()})
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and t.dim() == 1 and leaf == "weight":
                value = 1.0 + 0.1 * noise
            elif t.dim() <= 1 or leaf == "bias":
                value = 0.1 * noise
            elif "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
                value = noise
            else:
                value = noise / math.sqrt(t.shape[-1])
            t.copy_(value.to(t.dtype))


def _shard_size(model: torch.nn.Module, parts: int = 3) -> int:
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    return max(max(sizes), sum(sizes) // parts)


def build(
    name: str,
    folder: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    seed: int = 0,
    num_layers: int | None = None,
    max_shard_size: int | str | None = None,
    mtp: bool = True,
    hub_config: bool = False,
    **overrides: Any,
) -> Path:
    """Write a tiny random ``name`` checkpoint into ``folder`` (created) and return it as a Path.

    ``save_pretrained`` of transformers writes the tensors (in ``dtype``, except what the model
    keeps in float32, e.g. DeepSeek-V3's router) into >= 2 shards with ``model.safetensors.index.json``
    (``max_shard_size``: default about a third of the weights), ``config.json`` and
    ``generation_config.json``. ``overrides`` update the family's config kwargs (``text_config``
    merged one level deep), e.g. ``use_sliding_window=True, max_window_layers=2`` for qwen2.

    With ``mtp`` (default) the families whose real checkpoints carry multi-token-prediction
    weights get them too, as on the Hub: DeepSeek-V3 one extra layer ``model.layers.{n}.*`` (a MoE
    decoder layer plus ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``, ``shared_head.head``,
    ``embed_tokens``), Qwen3-Next ``mtp.*`` (``mtp_num_hidden_layers: 1`` in config.json). Both go
    into one extra last shard. transformers ignores them when loading the main model (Qwen3-Next
    silently; DeepSeek-V3 reports them as unexpected unless the layer is number 61).

    ``hub_config`` rewrites config.json the way the Hub's (transformers 4.x) files spell it: see
    :func:`hub_style_config`.
    """
    from transformers import GenerationConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = make_config(name, num_layers, **overrides)
    torch_dtype = _dtype(dtype)
    cls = model_class(name)
    model = cls._from_config(config, dtype=torch_dtype)  # fp32-strict modules (routers) stay fp32
    randomize_(model, seed)
    model.eval()
    text = config.get_text_config(decoder=True)
    model.generation_config = GenerationConfig(
        bos_token_id=getattr(text, "bos_token_id", None), eos_token_id=getattr(text, "eos_token_id", None),
        pad_token_id=getattr(text, "pad_token_id", None),
    )
    model.save_pretrained(folder, max_shard_size=max_shard_size or _shard_size(model))
    if mtp and name in ("deepseek_v3", "glm4_moe"):
        _add_deepseek_mtp(folder, config, torch_dtype, seed, name)
    elif mtp and name == "qwen3_next":
        _add_qwen3_next_mtp(folder, config, torch_dtype, seed)
    if hub_config:
        path = folder / "config.json"
        path.write_text(json.dumps(hub_style_config(name, json.loads(path.read_text())), indent=2,
                                   sort_keys=True) + "\n")
    return folder


def _hub_rope(d: dict[str, Any]) -> None:
    """transformers 5 ``rope_parameters`` -> the Hub's ``rope_theta`` + ``rope_scaling`` (in place)."""
    rope = d.pop("rope_parameters", None)
    if rope is None:
        return
    if "full_attention" in rope:  # Gemma 3: per attention type
        full, local = dict(rope["full_attention"]), rope["sliding_attention"]
        d["rope_theta"] = full.pop("rope_theta")
        d["rope_local_base_freq"] = local["rope_theta"]
        d["rope_scaling"] = full if full.get("rope_type", "default") != "default" else None
        return
    rope = dict(rope)
    d["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope and d.get("model_type") != "phi3":
        d["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    rope.pop("partial_rotary_factor", None)
    if rope.get("rope_type", "default") in ("default", "axial"):  # axial: 5.x's name for vision towers' 2D rope
        d["rope_scaling"] = None
        return
    if rope["rope_type"] == "longrope":  # Phi-3.5: {"long_factor", "short_factor", "type": "longrope"}
        rope.pop("original_max_position_embeddings", None)  # top level only
        rope["type"] = rope.pop("rope_type")
    d["rope_scaling"] = rope


def hub_style_config(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """A transformers-5 config.json rewritten the way the family's Hub checkpoints spell it (files
    written by transformers 4.x): ``torch_dtype``, ``rope_theta`` + ``rope_scaling``, and no
    per-layer lists that transformers derives at load time (``layer_types`` of Qwen2/Qwen3, Gemma 2,
    Gemma 3, Qwen3-Next - the latter with ``full_attention_interval`` instead; no
    ``_sliding_window_pattern``), Qwen3-MoE's ``num_experts``; Qwen2.5-VL flat (no text_config, see
    :func:`_hub_qwen2_5_vl`); Llama 4 with ``"no_rope_layers": []`` and no ``moe_layers``. transformers 5
    loads both spellings into the same model (``test_family_models.py`` checks the logits)."""
    out = copy.deepcopy(cfg)
    if name == "qwen2_5_vl":
        _hub_qwen2_5_vl(out)
    subs = [out] + [v for v in out.values() if isinstance(v, dict) and "model_type" in v]
    for d in subs:
        if "dtype" in d:
            d["torch_dtype"] = d.pop("dtype")
        _hub_rope(d)
        d.pop("_sliding_window_pattern", None)
    text = out.get("text_config", out)
    if name in ("qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "qwen3_next", "cohere2"):
        text.pop("layer_types", None)
    if name == "cohere2":  # Command R7B's config.json: the pattern integer, no layer_types
        text["sliding_window_pattern"] = 4
    if name == "qwen3_next":
        text["full_attention_interval"] = 4
    if name == "nemotron_h":  # nvidia's configs: the pattern string and a layer count, no layers_block_type
        kinds = text.pop("layers_block_type")
        text["hybrid_override_pattern"] = "".join(NEMOTRON_H_LETTERS[k] for k in kinds)
        text["num_hidden_layers"] = len(kinds)
    if name == "lfm2":  # LiquidAI's LFM2 configs as transformers 4.54 read them: full_attn_idxs, no layer_types
        text.pop("layer_types", None)
    if name == "ernie4_5_moe":  # Baidu's configs: -1, the last layer (transformers 5 saves its number)
        text["moe_layer_end_index"] = -1
    if name == "exaone4":  # EXAONE-4.0-32B's config.json: the letters, beside layer_types
        text["sliding_window_pattern"] = "LLLG"
    if name in ("qwen2", "qwen3") and text.get("sliding_window") is None:
        text["sliding_window"] = text["max_position_embeddings"]  # set but unused (use_sliding_window false)
    if name == "qwen3_moe" and "num_local_experts" in text:
        text["num_experts"] = text.pop("num_local_experts")
    if name in ("mistral3", "llama4"):  # the Hub's text and vision configs say rope_theta only
        for d in (text, out["vision_config"]):
            if d.get("rope_scaling", 0) is None:
                del d["rope_scaling"]
    if name == "llama4":
        # Meta's configs (transformers 4.51): "no_rope_layers": [] (derived from the default interval 4),
        # no moe_layers (derived from interleave_moe_layer_step), no layer_types. (Some say
        # "attn_temperature_tuning": 4, which 5.24's strict config refuses: kept a bool here.)
        text["no_rope_layers"] = []
        for key in ("moe_layers", "layer_types"):
            text.pop(key, None)
        if text.get("no_rope_layer_interval") == 4:
            del text["no_rope_layer_interval"]
    return out


def _hub_qwen2_5_vl(cfg: dict[str, Any]) -> None:
    """Qwen's Qwen2.5-VL configs (transformers 4.49): the decoder's fields at the top level (no
    text_config; 5.x builds one from them), mrope in ``rope_scaling`` as ``{"type": "mrope",
    "mrope_section"}``, the sliding window set but off, a vision_config without model_type or rope."""
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    for key in ("model_type", "dtype", "layer_types"):
        text.pop(key, None)
    if text.get("sliding_window") is None:
        text["sliding_window"] = text["max_position_embeddings"]
    cfg.update(text)
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    vision = cfg["vision_config"]
    for key in ("model_type", "dtype", "rope_parameters"):
        vision.pop(key, None)
    vision["in_chans"] = vision.pop("in_channels")
    vision["spatial_patch_size"] = vision["patch_size"]


def read_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``folder`` (the index's files, or ``model.safetensors``)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(folder / file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not dicts
                if key in out:
                    raise ValueError(f"{key!r} is in more than one file of {folder}")
                out[key] = f.get_tensor(key)
    return out


def _append_shard(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add ``tensors`` as a new last shard ``model-0000N+1-of-0000N+1`` (existing shards renamed)."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:  # one file: make it shard 1 of 2
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        with safe_open(folder / "model-00001-of-00001.safetensors", framework="pt") as f:
            keys = list(f.keys())
            size = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
        index = {"metadata": {"total_size": size},
                 "weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}
    old = sorted(set(index["weight_map"].values()))
    n = len(old) + 1
    renames = {name: f"model-{i:05d}-of-{n:05d}.safetensors" for i, name in enumerate(old, start=1)}
    for name, new in renames.items():
        (folder / name).rename(folder / new)
    last = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / last, metadata={"format": "pt"})
    weight_map = {k: renames[v] for k, v in index["weight_map"].items()}
    weight_map.update({k: last for k in tensors})
    index["weight_map"] = dict(sorted(weight_map.items()))
    index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in tensors.values())
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _saved_layer(name: str, config, layer: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Tensors of decoder layer ``layer`` (suffixes after ``model.layers.{layer}.``) of a random model
    of ``config``'s family with ``layer + 1`` layers, in the names save_pretrained writes."""
    import tempfile

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = layer + 1
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * (layer + 1)
    cls = model_class(name)
    model = cls._from_config(cfg, dtype=dtype)
    randomize_(model, seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors = read_tensors(tmp)
    prefix = f"model.layers.{layer}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _add_deepseek_mtp(folder: Path, config, dtype: torch.dtype, seed: int, name: str = "deepseek_v3") -> None:
    n, h = config.num_hidden_layers, config.hidden_size
    count = config.num_nextn_predict_layers
    main = read_tensors(folder)
    gen = torch.Generator().manual_seed(seed + 7919)
    extra: dict[str, torch.Tensor] = {}
    for k in range(count):
        # A MoE decoder layer (layer index >= first_k_dense_replace), numbered after the main layers.
        layer = _saved_layer(name, config, n + k, dtype, seed + 1 + k)
        p = f"model.layers.{n + k}."
        extra.update({p + s: t for s, t in layer.items()})
        for norm in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
            extra[p + norm] = (1 + 0.1 * torch.randn(h, generator=gen)).to(dtype)
        extra[p + "eh_proj.weight"] = (torch.randn(h, 2 * h, generator=gen) / math.sqrt(2 * h)).to(dtype)
        # Shared with the main model in DeepSeek's design, stored again in the checkpoint.
        extra[p + "embed_tokens.weight"] = main["model.embed_tokens.weight"].clone()
        extra[p + "shared_head.head.weight"] = main["lm_head.weight"].clone()
    _append_shard(folder, extra)


def _add_qwen3_next_mtp(folder: Path, config, dtype: torch.dtype, seed: int) -> None:
    h = config.hidden_size
    gen = torch.Generator().manual_seed(seed + 7919)
    # The MTP block is a full-attention MoE layer.
    layer = _saved_layer("qwen3_next", config, 0, dtype, seed + 1)
    extra = {f"mtp.layers.0.{s}": t for s, t in layer.items()}
    for norm in ("mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight"):
        extra[norm] = (0.1 * torch.randn(h, generator=gen)).to(dtype)  # zero-centred (1 + w) norms
    extra["mtp.fc.weight"] = (torch.randn(h, 2 * h, generator=gen) / math.sqrt(2 * h)).to(dtype)
    _append_shard(folder, extra)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["mtp_num_hidden_layers"] = 1
    cfg["mtp_use_dedicated_embeddings"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------
# Inputs and loading
# ----------------------------------------------------------------------------------------------------

SEQ_LEN = 24  #: longer than the tiny sliding windows (8), shorter than Phi-3's original 64 positions


def _config_dict(folder_or_config: str | Path | dict) -> dict[str, Any]:
    if isinstance(folder_or_config, dict):
        return folder_or_config
    return json.loads((Path(folder_or_config) / "config.json").read_text())


def model_inputs(folder_or_config: str | Path | dict, seq_len: int = SEQ_LEN,
                 batch: int = 2) -> dict[str, torch.Tensor]:
    """Fixed model inputs for a checkpoint (its folder or config.json dict).

    Token ids are drawn from a fixed generator in ``[4, vocab - 4)`` (no special or image tokens).
    Multimodal (``vision_config`` present): each row also holds one image from position 2 on, as the
    family's processor lays it out (:data:`IMAGE_INPUTS`), with fixed pixels, so that the vision
    tower takes part in the logits.
    """
    cfg = _config_dict(folder_or_config)
    text = cfg.get("text_config", cfg)
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(4, text["vocab_size"] - 4, (batch, seq_len), generator=gen)
    inputs = {"input_ids": ids}
    if "vision_config" in cfg:
        inputs.update(IMAGE_INPUTS[cfg["model_type"]](cfg, ids, gen))
    return inputs


def _gemma3_image(cfg: dict[str, Any], ids: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # boi, mm_tokens_per_image image tokens, eoi; token_type_ids mark the image tokens.
    k = cfg["mm_tokens_per_image"]
    ids[:, 2] = cfg["boi_token_index"]
    ids[:, 3:3 + k] = cfg["image_token_index"]
    ids[:, 3 + k] = cfg["eoi_token_index"]
    v = cfg["vision_config"]
    return {"token_type_ids": (ids == cfg["image_token_index"]).long(),
            "pixel_values": torch.randn(ids.shape[0], v.get("num_channels", 3), v["image_size"], v["image_size"],
                                        generator=gen)}


def _mistral3_image(cfg: dict[str, Any], ids: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # One image token per merged patch (Pixtral's [IMG_BREAK] / [IMG_END] tokens are ordinary text to
    # the model); image_sizes in pixels.
    v = cfg["vision_config"]
    side = v["image_size"] // v["patch_size"] // cfg.get("spatial_merge_size", 2)
    ids[:, 2:2 + side * side] = cfg["image_token_index"]
    return {"pixel_values": torch.randn(ids.shape[0], v.get("num_channels", 3), v["image_size"], v["image_size"],
                                        generator=gen),
            "image_sizes": torch.tensor([[v["image_size"], v["image_size"]]] * ids.shape[0])}


def _qwen2_5_vl_image(cfg: dict[str, Any], ids: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # <|vision_start|>, one image token per merged 2x2 patch group, <|vision_end|>; pixel_values are
    # the flattened patches (t x h x w rows of channels x temporal x patch x patch), image_grid_thw
    # the grid. An 8 x 8 patch grid: 16 image tokens in 4 attention windows of the tower.
    v = cfg["vision_config"]
    grid, merge = 8, v["spatial_merge_size"]
    k = (grid // merge) ** 2
    ids[:, 2] = cfg["vision_start_token_id"]
    ids[:, 3:3 + k] = cfg["image_token_id"]
    ids[:, 3 + k] = cfg["vision_end_token_id"]
    channels = v.get("in_channels", v.get("in_chans", 3))
    width = channels * v["temporal_patch_size"] * v["patch_size"] ** 2
    return {"pixel_values": torch.randn(ids.shape[0] * grid * grid, width, generator=gen),
            "image_grid_thw": torch.tensor([[1, grid, grid]] * ids.shape[0])}


def _qwen3_5_image(cfg: dict[str, Any], ids: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # Qwen2.5-VL's layout (vision start, merged patches, vision end), plus the processor's
    # mm_token_type_ids (1 at image tokens), from which the model places its multimodal rope.
    inputs = _qwen2_5_vl_image(cfg, ids, gen)
    inputs["mm_token_type_ids"] = (ids == cfg["image_token_id"]).long()
    return inputs


def _llama4_image(cfg: dict[str, Any], ids: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # <|image_start|>, one image token per patch left after the pixel shuffle, <|image_end|>.
    v = cfg["vision_config"]
    k = int((v["image_size"] // v["patch_size"]) ** 2 * v["pixel_shuffle_ratio"] ** 2)
    ids[:, 2] = cfg["boi_token_index"]
    ids[:, 3:3 + k] = cfg["image_token_index"]
    ids[:, 3 + k] = cfg["eoi_token_index"]
    return {"pixel_values": torch.randn(ids.shape[0], v.get("num_channels", 3), v["image_size"], v["image_size"],
                                        generator=gen)}


#: The image part of :func:`model_inputs`, by top-level ``model_type``: ``f(config, input_ids, generator)``
#: writes the image's tokens into ``input_ids`` and returns the other model inputs.
IMAGE_INPUTS: dict[str, Callable[[dict[str, Any], torch.Tensor, torch.Generator], dict[str, torch.Tensor]]] = {
    "gemma3": _gemma3_image,
    "mistral3": _mistral3_image,
    "qwen2_5_vl": _qwen2_5_vl_image,
    "qwen3_5": _qwen3_5_image,
    "qwen3_5_moe": _qwen3_5_image,
    "llama4": _llama4_image,
}


def logits_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``model`` (eval mode, no grad) on ``inputs``; floating inputs cast to the model's dtype."""
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        if type(model).__name__ == "Llama4ForConditionalGeneration":
            return _llama4_logits(model.eval(), inputs)
        return model.eval()(**inputs, use_cache=False).logits


def _llama4_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Llama4ForConditionalGeneration.forward of transformers 5.24, up to its last line: that line
    reads ``image_outputs`` from the language model's output, which has none (AttributeError on every
    call). The same modules in the same order: image features, projector, scatter into the token
    embeddings, the language model."""
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    if "pixel_values" in inputs:
        features = model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).last_hidden_state
        flat = model.multi_modal_projector(features.view(-1, features.size(-1))).to(embeds.device, embeds.dtype)
        mask = model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=flat)
        embeds = embeds.masked_scatter(mask, flat)
    return model.language_model(inputs_embeds=embeds, use_cache=False).logits


@dataclass
class Loaded:
    """A checkpoint loaded with transformers' ``from_pretrained`` (see :func:`load_output`)."""

    model: torch.nn.Module
    missing_keys: set[str]
    unexpected_keys: set[str]
    mismatched_keys: set[Any]
    logits: torch.Tensor


def load_output(folder: str | Path, *, dtype: torch.dtype = torch.float32,
                attn_implementation: str = "eager", inputs: dict[str, torch.Tensor] | None = None) -> Loaded:
    """Load ``folder`` with the class named in its config.json (``architectures[0]``), in ``dtype``,
    and compute logits on :func:`model_inputs` (or ``inputs``). Reports missing / unexpected /
    mismatched keys as transformers does (after its own ignore lists, e.g. Qwen3-Next's ``mtp.*``;
    DeepSeek-V3's MTP layer of a checkpoint with other than 61 layers IS reported as unexpected)."""
    folder = Path(folder)
    cfg = _config_dict(folder)
    cls = model_class(cfg["architectures"][0])
    model, info = cls.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                      output_loading_info=True)
    logits = logits_of(model, inputs if inputs is not None else model_inputs(cfg))
    return Loaded(model, set(info["missing_keys"]), set(info["unexpected_keys"]),
                  set(map(str, info.get("mismatched_keys", []))), logits)


# ----------------------------------------------------------------------------------------------------
# Reference surgery
# ----------------------------------------------------------------------------------------------------

#: Where the decoder layers may live in a checkpoint of each family: the names transformers 5.x
#: writes first, then other spellings found on the Hub that transformers also loads.
LAYER_PREFIXES: dict[str, tuple[str, ...]] = {
    **{name: ("model.layers",) for name in FAMILIES},
    "falcon": ("transformer.h",),
    "dbrx": ("transformer.blocks",),
    "glm4_moe": ("model.layers",),
    "cohere2": ("model.layers",),
    **{name: ("model.layers",) for name in ("jamba", "bamba", "zamba2", "lfm2", "lfm2_moe", "ernie4_5_moe",
                                            "exaone4")},
    "nemotron_h": ("backbone.layers",),
    # Gemma 3 multimodal: save_pretrained of a fresh model (and google/gemma-3-4b-it) use
    # language_model.model.layers; a model loaded from model.language_model.* names is saved so.
    "gemma3": ("language_model.model.layers", "model.language_model.layers"),
    # GPT-2: GPT2LMHeadModel saves transformer.h; openai-community/gpt2 has bare h.N (GPT2Model).
    "gpt2": ("transformer.h", "h"),
    # Mistral 3 and Qwen2.5-VL: save_pretrained (5.x) and the original Hub checkpoints use the first;
    # checkpoints saved by transformers 4.52-4.57 the second (model.visual.* for Qwen's tower).
    "mistral3": ("language_model.model.layers", "model.language_model.layers"),
    "qwen2_5_vl": ("model.layers", "model.language_model.layers"),
    "llama4": ("language_model.model.layers",),
    "qwen3_5": ("model.language_model.layers",),  # save_pretrained (5.x) and the Hub checkpoints alike
    "qwen3_5_moe": ("model.language_model.layers",),
}

#: Config fields holding one value per decoder layer (follow the arrangement).
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")
#: Config fields that are a *pattern* from which transformers derives a per-layer list when the
#: list is absent: (field, derived list). Kept when re-deriving gives the arranged list, else set to
#: a value that does, else dropped (see :func:`rewrite_config`). Not here because transformers 5.24
#: never reads it: DeepSeek-V3's ``moe_layer_freq`` (1 on the Hub; other engines may read it).
PATTERN_FIELDS = (
    ("max_window_layers", "layer_types"),
    ("sliding_window_pattern", "layer_types"),
    ("_sliding_window_pattern", "layer_types"),
    ("full_attention_interval", "layer_types"),
    ("no_rope_layer_interval", "no_rope_layers"),
)


class NotExpressible(ValueError):
    """The arrangement gives a model that the family's config.json cannot describe."""


def family_of(folder_or_config: str | Path | dict) -> str:
    """The :data:`FAMILIES` name of a checkpoint, from config.json's ``architectures[0]``."""
    arch = _config_dict(folder_or_config)["architectures"][0]
    for fam in ALL_FAMILIES.values():
        if fam.architecture == arch:
            return fam.name
    raise KeyError(f"no family with architecture {arch!r}")


def layer_prefix(family: str, keys) -> str:
    """The prefix of ``family``'s decoder layers among tensor names ``keys``."""
    keys = list(keys)
    found = [p for p in LAYER_PREFIXES[family] if any(re.match(re.escape(p) + r"\.\d+\.", k) for k in keys)]
    if len(found) != 1:
        raise ValueError(f"{family}: expected decoder layers under one of {LAYER_PREFIXES[family]}, found {found}")
    return found[0]


def split_layers(tensors: dict[str, torch.Tensor], prefix: str):
    """``(layers, rest)``: ``layers[i][suffix]`` for every ``{prefix}.{i}.{suffix}``, the other tensors."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)$")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = pattern.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            rest[key] = t
    return layers, rest


def is_sparse_layer(layer: dict[str, torch.Tensor]) -> bool:
    """A MoE layer (experts / router tensors), as opposed to a dense MLP layer."""
    return any(s.startswith(("mlp.experts.", "mlp.gate.", "block_sparse_moe.", "mlp.router.",
                             "feed_forward.experts.", "feed_forward.router."))  # Llama 4
               for s in layer)


def _text(cfg: dict[str, Any], family: Family) -> dict[str, Any]:
    """The decoder's part of a config.json: ``text_config``, or the top level when the file has none
    (Qwen2.5-VL's Hub configs, written by transformers 4.x, from which 5.x builds the text_config)."""
    return cfg[family.text_config] if family.text_config and family.text_config in cfg else cfg


def _n_layers(text: dict[str, Any], family: Family) -> int:
    """The layer count of a decoder config (Nemotron-H as saved by transformers 5 has no
    num_hidden_layers: transformers counts layers_block_type, or the Hub's hybrid_override_pattern)."""
    if family.num_layers_key in text:
        return text[family.num_layers_key]
    return len(text.get("layers_block_type") or text["hybrid_override_pattern"])


def _text_config_class(family: Family):
    cfg_cls = model_class(family.name).config_class
    if family.text_config:
        return cfg_cls.sub_configs_defaults[family.text_config].config_class
    return cfg_cls


def _derived(family: Family, text: dict[str, Any], drop: str, field_name: str):
    """``field_name`` as transformers derives it from ``text`` without ``drop`` (None if it cannot)."""
    kwargs = copy.deepcopy({k: v for k, v in text.items() if k not in (drop, "model_type", "transformers_version")})
    if field_name != drop:
        kwargs.pop(field_name, None)
    try:
        return getattr(_text_config_class(family)(**kwargs), field_name, None)
    except Exception:  # noqa: BLE001 - a config transformers rejects derives nothing
        return None


def _as_read(family: Family, text: dict[str, Any], field_name: str):
    """``field_name`` of the config transformers builds from ``text`` as it is (None if it cannot)."""
    kwargs = copy.deepcopy({k: v for k, v in text.items() if k not in ("model_type", "transformers_version")})
    try:
        return getattr(_text_config_class(family)(**kwargs), field_name, None)
    except Exception:  # noqa: BLE001
        return None


def rewrite_config(cfg: dict[str, Any], family: str, arrangement: list[int],
                   sparse: list[bool] | None = None, dtype: str | None = None) -> dict[str, Any]:
    """config.json of the arranged model: output layer ``i`` described as source layer ``arrangement[i]``.

    * the layer count (``num_hidden_layers`` / ``n_layer``, in ``text_config`` for Gemma 3) = ``len(arrangement)``;
    * per-layer lists (:data:`PER_LAYER_FIELDS`) follow the arrangement; when config.json lacks them
      (Hub configs written before transformers derived them) they are first derived by transformers'
      own config class from the source config, then written out explicitly;
    * ``mlp_only_layers`` (list of dense layer indices, Qwen3-MoE / Qwen3-Next) = the output layers
      whose source layer is dense (``sparse[s]`` False), with ``decoder_sparse_step`` = 1;
    * ``moe_layers`` (Llama 4: list of MoE layer indices; Hub configs leave it to
      ``interleave_moe_layer_step``) = the output layers whose source layer is MoE, with
      ``interleave_moe_layer_step`` = 1 (the explicit list decides alone, as ``decoder_sparse_step``);
    * ``first_k_dense_replace`` (DeepSeek-V3: the first k layers dense) = the number of leading dense
      output layers; :class:`NotExpressible` if a dense layer follows a MoE layer;
    * pattern fields (:data:`PATTERN_FIELDS`: ``max_window_layers``, ``sliding_window_pattern``, ...):
      kept when transformers re-derives the arranged list from them; else set to the first value
      that re-derives it (e.g. ``max_window_layers`` = the number of leading full-attention layers);
      else dropped (the explicit list is what transformers reads);
    * ``dtype`` / ``torch_dtype`` (top level and in sub-configs) = ``dtype`` when casting.
    """
    fam = ALL_FAMILIES[family]
    out = copy.deepcopy(cfg)
    text = _text(out, fam)
    n_src = _n_layers(text, fam)
    if any(not 0 <= s < n_src for s in arrangement):
        raise ValueError(f"arrangement {arrangement} indexes outside the source's {n_src} layers")
    if text.get("scale_attn_by_inverse_layer_idx") and list(arrangement) != list(range(n_src)):
        # GPT-2 option: attention scaled by 1 / (layer index + 1), so a moved layer computes differently.
        raise NotExpressible("scale_attn_by_inverse_layer_idx ties each layer's attention scale to its index")
    n = len(arrangement)

    # Per-layer lists, derived by transformers when the file does not spell them out.
    src_text = _text(cfg, fam)
    for name in PER_LAYER_FIELDS:
        values = src_text.get(name)
        if values is None and family in RULE_FAMILIES:
            continue  # their layer_types is a property transformers computes from the rule fields: never saved
        if values is None or values == []:
            # Absent: derived. Empty: Llama 4 derives it too (Meta's configs say "no_rope_layers": []);
            # other families keep it (and cannot load it), so it is left alone.
            values = _derived(fam, src_text, name, name) if values is None else _as_read(fam, src_text, name)
            if not isinstance(values, list) or len(values) != n_src:
                continue  # not a field of this family
        if len(values) != n_src:
            raise ValueError(f"{name} has {len(values)} entries for {n_src} layers")
        text[name] = [values[s] for s in arrangement]
    if fam.num_layers_key in text or family not in RULE_FAMILIES:
        text[fam.num_layers_key] = n
    if family in RULE_FAMILIES:
        conf_cls = _text_config_class(fam)
        RULE_FAMILIES[family](conf_cls(**conf_cls._decode_special_floats(_kwargs(src_text))), src_text, text,
                              arrangement)

    if "mlp_only_layers" in text or "decoder_sparse_step" in text:
        if sparse is None:
            raise ValueError("mlp_only_layers needs the sparse/dense flag of each source layer")
        text["mlp_only_layers"] = [i for i, s in enumerate(arrangement) if not sparse[s]]
        text["decoder_sparse_step"] = 1
    if "moe_layers" in text or "interleave_moe_layer_step" in text:
        if sparse is None:
            raise ValueError("moe_layers needs the sparse/dense flag of each source layer")
        text["moe_layers"] = [i for i, s in enumerate(arrangement) if sparse[s]]
        text["interleave_moe_layer_step"] = 1
    if "first_k_dense_replace" in text:
        if sparse is None:
            raise ValueError("first_k_dense_replace needs the sparse/dense flag of each source layer")
        dense = [not sparse[s] for s in arrangement]
        k = next((i for i, d in enumerate(dense) if not d), n)
        late = [i for i in range(k, n) if dense[i]]
        if late:
            raise NotExpressible(
                f"output layers {late} are dense (source layers {[arrangement[i] for i in late]}) but follow "
                f"MoE layer {k}: first_k_dense_replace can only describe a leading block of dense layers")
        text["first_k_dense_replace"] = k

    for name, derived_list in PATTERN_FIELDS:
        if name not in text or derived_list not in text or name == "_sliding_window_pattern":
            continue
        if isinstance(text[name], str):
            continue  # EXAONE 4's letters: its rule (RULE_FAMILIES) rewrote them
        # Keep the value if transformers re-derives the arranged list from it, else the first
        # value that does (e.g. max_window_layers = number of leading full-attention layers),
        # else drop the field (the explicit list is what transformers reads).
        for value in [text[name], *range(0, n + 2)]:
            if _derived(fam, {**text, name: value}, derived_list, derived_list) == text[derived_list]:
                text[name] = value
                break
        else:
            del text[name]
    if "_sliding_window_pattern" in text:  # Gemma 3's private copy of sliding_window_pattern
        if "sliding_window_pattern" in text:
            text["_sliding_window_pattern"] = text["sliding_window_pattern"]
        else:
            del text["_sliding_window_pattern"]

    if dtype is not None:
        for d in [out, *(v for v in out.values() if isinstance(v, dict) and "model_type" in v)]:
            for key in ("dtype", "torch_dtype"):
                if key in d:
                    d[key] = dtype
        if "dtype" not in out and "torch_dtype" not in out:
            out["dtype"] = dtype
    return out


def _kwargs(text: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy({k: v for k, v in text.items() if k not in ("model_type", "transformers_version")})


def _period_offset(want: list[bool], period: int, offset: int, what: str) -> tuple[int, int]:
    """The source's period and offset if layer ``i`` is ``want[i]`` exactly when ``i % period ==
    offset``, else the first pair (smallest period, then offset < period) that says so."""
    n = len(want)
    for p, o in [(period, offset), *((q, r) for q in range(1, n + 2) for r in range(q))]:
        if [i % p == o for i in range(n)] == want:
            return p, o
    raise NotExpressible(f"no period and offset make {[i for i, w in enumerate(want) if w]} the {what} layers")


def _jamba_rules(conf, src: dict[str, Any], text: dict[str, Any], arrangement: list[int]) -> None:
    """Jamba: attention where ``i % attn_layer_period == attn_layer_offset``, experts where
    ``i % expert_layer_period == expert_layer_offset`` (read by JambaConfig's own properties)."""
    attn = [t == "attention" for t in conf.layers_block_type]
    moe = [e > 1 for e in conf.layers_num_experts]
    for prefix, flags in (("attn", attn), ("expert", moe)):
        keys = (f"{prefix}_layer_period", f"{prefix}_layer_offset")
        p, o = _period_offset([flags[s] for s in arrangement], getattr(conf, keys[0]), getattr(conf, keys[1]), prefix)
        if (p, o) != (getattr(conf, keys[0]), getattr(conf, keys[1])) or keys[0] in src:
            text[keys[0]], text[keys[1]] = p, o


def _bamba_rules(conf, src: dict[str, Any], text: dict[str, Any], arrangement: list[int]) -> None:
    """Bamba: attention in ``attn_layer_indices``, Mamba-2 elsewhere."""
    attn = [t == "full_attention" for t in conf.layers_block_type]
    if src.get("attn_layer_indices") is not None:
        text["attn_layer_indices"] = [i for i, s in enumerate(arrangement) if attn[s]]


def _zamba2_rules(conf, src: dict[str, Any], text: dict[str, Any], arrangement: list[int]) -> None:
    """Zamba2: ``layers_block_type`` follows; the hybrid layers' shared blocks hold one adapter per
    hybrid layer in order, so hybrid layers may move but not repeat or reorder."""
    hybrid = [s for s in arrangement if conf.layers_block_type[s] == "hybrid"]
    if hybrid != sorted(set(hybrid)):
        raise NotExpressible(f"hybrid layers {hybrid} repeat or change order: their adapters are numbered in order")
    text["layers_block_type"] = [src["layers_block_type"][s] for s in arrangement]
    if "hybrid_layer_ids" in src:
        text["hybrid_layer_ids"] = [i for i, s in enumerate(arrangement) if conf.layers_block_type[s] == "hybrid"]


def _nemotron_h_rules(conf, src: dict[str, Any], text: dict[str, Any], arrangement: list[int]) -> None:
    """Nemotron-H: ``layers_block_type`` and the Hub's ``hybrid_override_pattern`` follow (one entry,
    one letter per layer)."""
    for key in ("layers_block_type", "hybrid_override_pattern"):
        if key in src:
            values = [src[key][s] for s in arrangement]
            text[key] = values if isinstance(src[key], list) else "".join(values)


def _lfm2_rules(conf, src: dict[str, Any], text: dict[str, Any], arrangement: list[int]) -> None:
    """LFM2: ``layer_types`` (as Lfm2Config derives it from ``full_attn_idxs`` when absent) follows;
    ``full_attn_idxs``, where the file has a list, names the output's attention layers."""
    types = [conf.layer_types[s] for s in arrangement]
    text["layer_types"] = types
    if isinstance(src.get("full_attn_idxs"), list):
        text["full_attn_idxs"] = [i for i, t in enumerate(types) if t == "full_attention"]


def _lfm2_moe_rules(conf, src: dict[str, Any], text: dict[str, Any], arrangement: list[int]) -> None:
    """LFM2-MoE: ``layer_types`` follows; the first ``num_dense_layers`` layers are dense, so a
    dense layer after a MoE one cannot be said."""
    text["layer_types"] = [src["layer_types"][s] for s in arrangement]
    dense = [s < conf.num_dense_layers for s in arrangement]
    k = next((i for i, d in enumerate(dense) if not d), len(dense))
    if any(dense[k:]):
        raise NotExpressible(f"a dense layer after MoE layer {k}: num_dense_layers counts leading dense layers")
    text["num_dense_layers"] = k


def _ernie4_5_moe_rules(conf, src: dict[str, Any], text: dict[str, Any], arrangement: list[int]) -> None:
    """ERNIE 4.5 MoE: layer ``i`` is MoE when ``start <= i <= end`` (``-1``: the last layer) and
    ``(i + 1) % interval == 0``. Kept when they still say the output's MoE layers, else of every
    (start, end, interval) that does: the end spelled as the source spells it (-1 or a number), the
    largest start, the smallest end and the largest interval."""
    n_src = conf.num_hidden_layers
    moe = [conf.moe_layer_start_index <= i <= conf.moe_layer_end_index and (i + 1) % conf.moe_layer_interval == 0
           for i in range(n_src)]
    want = [moe[s] for s in arrangement]
    n = len(want)

    def says(start: int, end: int, interval: int) -> bool:
        end = n - 1 if end == -1 else end
        return [start <= i <= end and (i + 1) % interval == 0 for i in range(n)] == want

    keys = ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval")
    kept = tuple(src.get(k, d) for k, d in zip(keys, (1, -1, 1)))
    if says(*kept):
        return
    found = [(st, en, iv) for st in range(n + 1) for en in range(-1, n + 1) for iv in range(1, n + 2)
             if says(st, en, iv)]
    if not found:
        raise NotExpressible(f"no start, end and interval make {[i for i, w in enumerate(want) if w]} the MoE layers")
    # -1 where the source says -1, a number where it says a number
    best = max(found, key=lambda v: ((v[1] == -1) == (kept[1] == -1), v[0], -(n - 1 if v[1] == -1 else v[1]), v[2]))
    text.update(zip(keys, best))


def _exaone4_rules(conf, src: dict[str, Any], text: dict[str, Any], arrangement: list[int]) -> None:
    """EXAONE 4: ``layer_types`` follows (the per-layer loop); ``sliding_window_pattern`` as letters
    ("LLLG", repeated over the layers as vLLM reads it) kept when it still says each output layer's
    kind, else one letter per output layer. (An integer pattern is handled with the other pattern fields.)"""
    pattern = src.get("sliding_window_pattern")
    if isinstance(pattern, str):
        letters = "".join("G" if conf.layer_types[s] == "full_attention" else "L" for s in arrangement)
        repeated = (pattern * len(letters))[:len(letters)]
        text["sliding_window_pattern"] = pattern if repeated == letters else letters


#: Families whose configs say which layer is which by a rule (not a per-layer list): how the
#: reference rewrites the rule for an arrangement, from the source config as transformers reads it.
RULE_FAMILIES: dict[str, Callable[[Any, dict[str, Any], dict[str, Any], list[int]], None]] = {
    "jamba": _jamba_rules,
    "bamba": _bamba_rules,
    "zamba2": _zamba2_rules,
    "nemotron_h": _nemotron_h_rules,
    "lfm2": _lfm2_rules,
    "lfm2_moe": _lfm2_moe_rules,
    "ernie4_5_moe": _ernie4_5_moe_rules,
    "exaone4": _exaone4_rules,
}


# --- checkpoint names -> module names, per family (what transformers' conversion mapping does) -------

def _merge_experts(tensors: dict[str, torch.Tensor], gate: str, up: str, down: str) -> dict[str, torch.Tensor]:
    """``X.experts.{e}.{gate,up,down}.weight`` -> ``X.experts.gate_up_proj`` [E, 2I, H] (gate rows
    first) and ``X.experts.down_proj`` [E, H, I]."""
    pattern = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = pattern.match(key)
        if m and m.group(3) in (gate, up, down):
            groups.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
        else:
            out[key] = t
    for base, parts in groups.items():
        e = sorted(parts[gate])
        assert e == list(range(len(e))) == sorted(parts[up]) == sorted(parts[down]), base
        out[base + ".gate_up_proj"] = torch.stack([torch.cat([parts[gate][i], parts[up][i]], dim=0) for i in e])
        out[base + ".down_proj"] = torch.stack([parts[down][i] for i in e])
    return out


def _merge_up_down_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``X.experts.{e}.{up,down}_proj.weight`` -> ``X.experts.up_proj`` [E, I, H], ``X.experts.down_proj`` [E, H, I]."""
    pattern = re.compile(r"^(.*\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
    groups: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = pattern.match(key)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
        else:
            out[key] = t
    for (base, proj), parts in groups.items():
        out[f"{base}.{proj}"] = torch.stack([parts[i] for i in sorted(parts)])
    return out


def to_module_names(family: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors renamed / fused into the parameter names of the family's transformers class."""
    if family == "ernie4_5_moe":  # saved mlp.moe_statics, the model's mlp.gate.moe_statics
        tensors = {k.replace(".mlp.moe_statics.", ".mlp.gate.moe_statics."): v for k, v in tensors.items()}
    if family in ("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "deepseek_v3", "glm4_moe", "jamba",
                  "ernie4_5_moe"):
        return _merge_experts(tensors, "gate_proj", "up_proj", "down_proj")
    if family == "lfm2_moe":
        return _merge_experts(tensors, "w1", "w3", "w2")
    if family == "nemotron_h":  # relu^2 experts (up and down only); saved as backbone.*, the model's model.*
        return {("model." + k[len("backbone."):] if k.startswith("backbone.") else k): v
                for k, v in _merge_up_down_experts(tensors).items()}
    if family == "mixtral":
        renamed = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in tensors.items()}
        return _merge_experts(renamed, "w1", "w3", "w2")
    if family in ("gemma3", "mistral3"):  # transformers' "llava" key mapping
        out = {}
        for k, v in tensors.items():
            for old, new in (("language_model.model.", "model.language_model."),
                             ("vision_tower.vision_model.", "model.vision_tower."),
                             ("vision_tower.", "model.vision_tower."),
                             ("multi_modal_projector.", "model.multi_modal_projector."),
                             ("language_model.lm_head.", "lm_head.")):
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            out[k] = v
        return out
    if family == "qwen2_5_vl":  # Qwen2VLForConditionalGeneration's mapping; 4.52-4.57 names pass unchanged
        out = {}
        for k, v in tensors.items():
            if k.startswith("visual."):
                k = "model." + k
            elif k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")):
                k = "model.language_model." + k[len("model."):]
            out[k] = v
        return out
    if family == "gpt2":
        return {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v
                for k, v in tensors.items()}
    return dict(tensors)


@dataclass
class Reference:
    """What :func:`reference_surgery` expects the output checkpoint to be."""

    family: str
    arrangement: list[int]
    config: dict[str, Any]  #: the output config.json
    state_dict: dict[str, torch.Tensor]  #: every output tensor, in the source's checkpoint names
    extra_keys: set[str]  #: tensors of the output that the model does not load (MTP)
    model: torch.nn.Module | None = None  #: the rebuilt model (float32, eager attention, eval)
    logits: torch.Tensor | None = None  #: its logits on :func:`model_inputs` of the output config
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def unexpected_on_load(self) -> set[str]:
        """The keys transformers' ``from_pretrained`` reports as unexpected for this output: the extra
        (MTP) tensors in module names, less the class's ``_keys_to_ignore_on_load_unexpected``
        (DeepSeek-V3: ``model.layers.61.*`` only, so a tiny or rearranged model's MTP layer IS
        reported; Qwen3-Next: ``^mtp.*``, never reported)."""
        cls = model_class(self.config["architectures"][0])
        ignore = [re.compile(p) for p in (cls._keys_to_ignore_on_load_unexpected or [])]
        names = to_module_names(self.family, {k: self.state_dict[k] for k in self.extra_keys})
        return {k for k in names if not any(p.search(k) for p in ignore)}


def reference_surgery(
    src: str | Path,
    arrangement: list[int],
    *,
    dtype: str | None = None,
    keep_dtype: str | None = None,
    mtp: str = "keep",
    build_model: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> Reference:
    """The output checkpoint of moving ``src``'s decoder layers into ``arrangement``, built by hand.

    Output layer ``i`` = source layer ``arrangement[i]`` (text decoder only: vision tower layers are
    copied untouched), tensor names renumbered under the same prefix, every other tensor copied as
    is. ``dtype`` ("float16", ...) casts floating tensors, except those whose name matches the regex
    ``keep_dtype`` (e.g. ``r"mlp\\.gate\\."`` to keep DeepSeek-V3's float32 router as transformers
    does). Extra layers past the source's last decoder layer (DeepSeek-V3 MTP,
    ``{prefix}.{n_src + k}``) are renumbered to ``{prefix}.{len(arrangement) + k}`` (``mtp="keep"``)
    or left out (``mtp="drop"``); non-layer extras (Qwen3-Next ``mtp.*``) are copied, or left out
    with ``mtp="drop"``.

    With ``build_model``: the config from :func:`rewrite_config` builds the family's class
    (``compute_dtype``, ``attn_implementation``), the tensors are converted to module names
    (:func:`to_module_names`) and loaded strictly (only tied weights may be missing, only MTP
    tensors may be left over), and the logits on :func:`model_inputs` are computed.
    """
    src = Path(src)
    cfg = _config_dict(src)
    family = family_of(cfg)
    fam = ALL_FAMILIES[family]
    tensors = read_tensors(src)
    prefix = layer_prefix(family, tensors)
    layers, rest = split_layers(tensors, prefix)
    n_src = _n_layers(_text(cfg, fam), fam)
    n_extra = len(layers) - n_src
    expected_extra = cfg.get(fam.extra_layers_key, 0) if fam.extra_layers_key else 0
    if sorted(layers) != list(range(len(layers))) or n_extra not in (0, expected_extra):
        raise ValueError(f"{src}: layers {sorted(layers)} for num layers {n_src} (+{expected_extra} extra)")
    sparse = [is_sparse_layer(layers[s]) for s in range(n_src)]
    out_cfg = rewrite_config(cfg, family, arrangement, sparse, dtype)

    n = len(arrangement)
    state: dict[str, torch.Tensor] = {}
    extra_keys: set[str] = set()
    for key, t in rest.items():
        if key.startswith("mtp."):
            if mtp == "drop":
                continue
            extra_keys.add(key)
        state[key] = t.clone()
    for i, s in enumerate(arrangement):
        for suffix, t in layers[s].items():
            state[f"{prefix}.{i}.{suffix}"] = t.clone()
    for k in range(n_extra):
        if mtp == "drop":
            break
        for suffix, t in layers[n_src + k].items():
            state[f"{prefix}.{n + k}.{suffix}"] = t.clone()
            extra_keys.add(f"{prefix}.{n + k}.{suffix}")
    if dtype is not None:
        target = _dtype(dtype)
        keep = re.compile(keep_dtype) if keep_dtype else None
        state = {k: v.to(target) if v.is_floating_point() and not (keep and keep.search(k)) else v
                 for k, v in state.items()}

    ref = Reference(family, list(arrangement), out_cfg, state, extra_keys)
    if build_model:
        ref.model = rebuild_model(family, out_cfg, {k: v for k, v in state.items() if k not in extra_keys},
                                  compute_dtype=compute_dtype, attn_implementation=attn_implementation)
        ref.inputs = model_inputs(out_cfg)
        ref.logits = logits_of(ref.model, ref.inputs)
    return ref


def rebuild_model(family: str, config: dict[str, Any], state: dict[str, torch.Tensor], *,
                  compute_dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """The family's model built from a config.json dict, ``state`` (checkpoint names) loaded strictly."""
    cls = model_class(config["architectures"][0])
    # A copy: config classes edit nested dicts in place (rope_scaling gains rope_theta), and ``config``
    # is the reference's config.json.
    conf = cls.config_class.from_dict(cls.config_class._decode_special_floats(  # Bamba's time_step_limit: inf
        copy.deepcopy({k: v for k, v in config.items() if k != "transformers_version"})))
    model = cls._from_config(conf, dtype=compute_dtype, attn_implementation=attn_implementation)
    wanted = model.state_dict()
    converted = to_module_names(family, state)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = set(wanted) - set(converted)
    unexpected = set(converted) - set(wanted)
    # Checkpoint-only tensors the class declares it does not load (e.g. GPT-2's old ``attn.bias``
    # causal-mask buffers), as transformers' from_pretrained skips them; they stay in the checkpoint.
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    skipped = {k for k in unexpected if any(p.search(k) for p in ignore)}
    unexpected -= skipped
    converted = {k: v for k, v in converted.items() if k not in skipped}
    if missing - tied or unexpected:
        raise ValueError(f"{family}: missing {sorted(missing - tied)}, unexpected {sorted(unexpected)}")
    for key, t in converted.items():
        if wanted[key].shape != t.shape:
            raise ValueError(f"{family}: {key} has shape {tuple(t.shape)}, the model wants {tuple(wanted[key].shape)}")
    result = model.load_state_dict(converted, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= tied, result
    if tied:
        model.tie_weights()
        for key in tied:  # a tied weight equals its source after loading
            source = model.all_tied_weights_keys[key]
            assert torch.equal(model.get_parameter(key), model.get_parameter(source)), key
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Relabel references: another architecture computing the same function
# ----------------------------------------------------------------------------------------------------

def _llama_base(cfg: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    out["model_type"] = "llama"
    out["architectures"] = ["LlamaForCausalLM"]
    out.setdefault("head_dim", out["hidden_size"] // out["num_attention_heads"])
    out["mlp_bias"] = False
    out["pretraining_tp"] = 1
    return out


def relabel_qwen2_to_llama(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """``(config, tensors)`` of a Qwen2 checkpoint as a ``LlamaForCausalLM`` computing the same logits.

    Qwen2 has biases on q/k/v but not on o_proj; Llama's single ``attention_bias`` puts a bias on
    q, k, v *and* o_proj, so ``o_proj.bias`` is added as zeros (source dtype). The sliding-window
    fields go (Llama has none): refused when any layer actually slides.
    """
    if cfg.get("use_sliding_window") and "sliding_attention" in (cfg.get("layer_types") or ["sliding_attention"]):
        raise NotExpressible("a Qwen2 model with sliding-window layers has no Llama equivalent")
    out = _llama_base(cfg)
    out["attention_bias"] = True
    for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
        out.pop(key, None)
    new = dict(tensors)
    for key, t in tensors.items():
        m = re.match(r"^(model\.layers\.\d+\.self_attn\.)o_proj\.weight$", key)
        if m:
            new[m.group(1) + "o_proj.bias"] = torch.zeros(t.shape[0], dtype=t.dtype)
    return out, dict(sorted(new.items()))


def relabel_phi3_to_llama(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """``(config, tensors)`` of a Phi-3 checkpoint as a ``LlamaForCausalLM`` computing the same logits.

    ``qkv_proj.weight`` rows split into q ``[0, q)``, k ``[q, q + kv)``, v ``[q + kv, q + 2 kv)`` with
    ``q = heads * head_dim``, ``kv = kv_heads * head_dim`` (Phi3Attention slices its output so);
    ``gate_up_proj.weight`` rows split into gate ``[0, I)`` then up ``[I, 2I)`` (Phi3MLP:
    ``gate, up = chunk(2)``; ``up * act(gate)`` is Llama's ``act(gate) * up``). rope_parameters (longrope
    with short/long factors and original_max_position_embeddings inside) carry over; a partial rotary
    factor below 1 has no Llama equivalent (Llama rotates the whole head). ``sliding_window`` goes
    (like the mistral-to-llama preset) - equal logits only for sequences inside the window.
    """
    rope_key = "rope_parameters" if cfg.get("rope_parameters") is not None else "rope_scaling"
    rope = dict(cfg.get(rope_key) or {})
    if float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise NotExpressible("Phi-3 with partial_rotary_factor < 1 rotates part of each head; Llama cannot")
    rope.pop("partial_rotary_factor", None)
    for type_key in ("type", "rope_type"):  # Phi3Config reads early Phi-3-128k's "su" / "yarn" as longrope
        if rope.get(type_key) in ("su", "yarn"):
            rope[type_key] = "longrope"
    out = _llama_base(cfg)
    if cfg.get(rope_key) is not None:
        out[rope_key] = rope
    out.pop("auto_map", None)  # Hub Phi-3 configs point at their remote code
    out["attention_bias"] = False
    for key in ("sliding_window", "resid_pdrop", "embd_pdrop", "partial_rotary_factor"):
        out.pop(key, None)
    hd = out["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    inter = cfg["intermediate_size"]
    new: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(".self_attn.qkv_proj.weight"):
            base = key[: -len("qkv_proj.weight")]
            assert t.shape[0] == q + 2 * kv, (key, t.shape)
            new[base + "q_proj.weight"] = t[:q].clone()
            new[base + "k_proj.weight"] = t[q:q + kv].clone()
            new[base + "v_proj.weight"] = t[q + kv:].clone()
        elif key.endswith(".mlp.gate_up_proj.weight"):
            base = key[: -len("gate_up_proj.weight")]
            assert t.shape[0] == 2 * inter, (key, t.shape)
            new[base + "gate_proj.weight"] = t[:inter].clone()
            new[base + "up_proj.weight"] = t[inter:].clone()
        else:
            new[key] = t
    return out, dict(sorted(new.items()))


def write_checkpoint(folder: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                     max_shard_size: int = 40_000) -> Path:
    """Write ``config`` and ``tensors`` as a safetensors checkpoint (shards of at most ``max_shard_size``
    bytes of tensor data, or one ``model.safetensors``), the way the tool's output looks."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key].contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def relabel_deepseek_v3_to_glm4_moe_lite(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """``(config, tensors)`` of a DeepSeek-V3 checkpoint as ``Glm4MoeLiteForCausalLM`` (transformers 5.x).

    Glm4MoeLite is DeepSeek-V3's MLA attention and MoE code (same classes up to renaming in 5.24) but
    says which layers are MoE with a per-layer ``mlp_layer_types`` list ("dense"/"sparse") instead of
    ``first_k_dense_replace``: the way to express a dense layer after a MoE layer (e.g. DUS of
    DeepSeek-V3 with m < first_k_dense_replace). Tensor names are unchanged. Its MTP ignore pattern is
    ``model.layers.47.*``, so MTP layers at other indices are reported unexpected, as for DeepSeek-V3.
    """
    layers, _ = split_layers(tensors, "model.layers")
    n = cfg["num_hidden_layers"]
    out = copy.deepcopy(cfg)
    out["model_type"] = "glm4_moe_lite"
    out["architectures"] = ["Glm4MoeLiteForCausalLM"]
    out.pop("first_k_dense_replace", None)
    out["mlp_layer_types"] = ["sparse" if is_sparse_layer(layers[i]) else "dense" for i in range(n)]
    return out, dict(tensors)

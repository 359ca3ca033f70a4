"""The family registry and presets, pure (synthetic headers, no files, no torch): derivations equal
transformers' own formulas, config rewrites per field kind, extra (MTP) layers, layer kinds in the
plan, presets that check their source, fused-tensor row slices and zero tensors as byte ranges.
End to end against transformers: tests/test_families_e2e.py."""
from __future__ import annotations

from dataclasses import replace

import pytest

from helpers import make_checkpoint, manifest_from_text
from tensorsurgery.errors import PlanError, SourceError
from tensorsurgery.families.layers import LayerRef
from tensorsurgery.families.registry import (
    GENERIC,
    NoRopeSliding,
    Periodic,
    WindowFrom,
    family_of,
    get_family,
    is_moe_layer,
    layer_lists,
)
from tensorsurgery.ops import ZEROS
from tensorsurgery.ops.base import RowSlice
from tensorsurgery.planning.config import build_config
from tensorsurgery.planning.planner import build_plan
from tensorsurgery.report import format_plan
from tensorsurgery.sources.checkpoint import SourceFiles, assemble

ROOT = "/models/src"


def refs(layers, source="source"):
    return tuple(LayerRef(source, i) for i in layers)


def manifest(layers: str, rename: str = "", extra: str = ""):
    return manifest_from_text(f'[source]\nmodel = "{ROOT}"\n[rename]\n{rename}\n[layers]\n{layers}\n'
                              f'[output]\npath = "/out/x"\n{extra}')


# --- lookup and derivations --------------------------------------------------------------------

def test_families_are_found_by_model_type():
    assert family_of({"model_type": "qwen3_moe"}).name == "qwen3_moe"
    assert family_of({"model_type": "qwen3_5_moe"}).name == "qwen3_5"  # one entry, two model types
    assert family_of({"model_type": "qwen3_5_moe_text"}).name == "qwen3_5_text"
    assert family_of({"model_type": "gemma3"}).config_path == ("text_config",)
    assert family_of({"model_type": "somebody_new"}) is GENERIC
    assert family_of({}) is GENERIC and family_of({"model_type": 3}) is GENERIC
    assert get_family("gpt2").count_key == "n_layer"


def test_derivations_are_transformers_formulas():
    # Gemma 2 / GPT-OSS: layer 0 slides, every 2nd is full.
    assert Periodic(None, 2, "full", "sliding").derive({}, 4, {}) == ["sliding", "full", "sliding", "full"]
    # Gemma 3: (i + 1) % sliding_window_pattern == 0 is full (default 6).
    gemma3 = Periodic("sliding_window_pattern", 6, "F", "S")
    assert gemma3.derive({}, 7, {}) == ["S"] * 5 + ["F", "S"]
    assert gemma3.derive({"sliding_window_pattern": 2}, 4, {}) == ["S", "F", "S", "F"]
    assert gemma3.derive({"sliding_window_pattern": 0}, 4, {}) == []  # transformers would divide by zero
    # Qwen2: layers from max_window_layers on slide, only when the window is on.
    window = WindowFrom()
    assert window.derive({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}, 4, {}) == \
        ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert window.derive({"use_sliding_window": False, "sliding_window": 8, "max_window_layers": 2}, 4, {}) == \
        ["full_attention"] * 4
    # SmolLM3: a layer without rope slides when the window is on (no_rope_layers: 1 = rope).
    assert NoRopeSliding().derive({"use_sliding_window": True, "sliding_window": 4}, 4,
                                  {"no_rope_layers": [1, 1, 1, 0]}) == ["full_attention"] * 3 + ["sliding_attention"]


def test_layer_lists_derive_what_a_hub_config_leaves_out():
    gemma3 = get_family("gemma3_text")
    assert layer_lists(gemma3, {"num_hidden_layers": 6}, 6) == {"layer_types": ["sliding_attention"] * 5
                                                                + ["full_attention"]}
    smol = get_family("smollm3")
    lists = layer_lists(smol, {"no_rope_layer_interval": 2}, 4)
    assert lists == {"no_rope_layers": [1, 0, 1, 0], "layer_types": ["full_attention"] * 4}
    assert layer_lists(gemma3, {"layer_types": ["x"] * 3}, 6) == {}  # wrong length: not these weights


def test_moe_layers_are_told_by_their_tensors():
    assert is_moe_layer(["mlp.gate.weight", "mlp.experts.0.up_proj.weight"])
    assert is_moe_layer(["block_sparse_moe.gate.weight"])
    assert is_moe_layer(["mlp.router.weight"])
    assert not is_moe_layer(["mlp.gate_proj.weight", "mlp.up_proj.weight", "self_attn.q_proj.weight"])


# --- config rewrites ----------------------------------------------------------------------------

def test_leading_count_follows_or_is_refused():
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": 4, "first_k_dense_replace": 1}
    fam = family_of(cfg)
    out = build_config({"source": cfg}, "source", refs([0, 1, 2, 1, 2, 3]), family=fam,
                       moe=(False, True, True, True, True, True))
    assert (out["first_k_dense_replace"], out["num_hidden_layers"]) == (1, 6)
    with pytest.raises(PlanError) as e:
        build_config({"source": cfg}, "source", refs([0, 1, 0, 1]), family=fam, moe=(False, True, False, True),
                     where="m.toml: layers")
    assert str(e.value) == ("m.toml: layers: output layer 2 (layer 0 of source 'source') is dense but follows a "
                            "layer that is not (output layer 1); deepseek_v3's config can only say that the first "
                            "first_k_dense_replace layers are dense: arrange the dense layers first, or relabel the "
                            "model as a family with a per-layer list")


def test_index_lists_are_recomputed_from_each_layers_kind():
    cfg = {"model_type": "qwen3_moe", "num_hidden_layers": 4, "mlp_only_layers": [0, 2], "decoder_sparse_step": 2}
    out = build_config({"source": cfg}, "source", refs([0, 1, 2, 3, 2]), family=family_of(cfg),
                       moe=(False, True, False, True, False))
    assert (out["mlp_only_layers"], out["decoder_sparse_step"]) == ([0, 2, 4], 1)


def test_nested_text_config_and_patterns():
    cfg = {"model_type": "gemma3", "text_config": {"num_hidden_layers": 6, "sliding_window_pattern": 6,
                                                   "_sliding_window_pattern": 6},
           "vision_config": {"num_hidden_layers": 2}}
    out = build_config({"source": cfg}, "source", refs([0, 1, 2, 3, 4, 5, 2, 3, 4, 5]), family=family_of(cfg))
    text = out["text_config"]
    assert text["num_hidden_layers"] == 10 and out["vision_config"] == {"num_hidden_layers": 2}
    assert text["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 3 + \
        ["full_attention"]
    # No period derives that list (full at 5 and 9): the pattern and its private copy go.
    assert "sliding_window_pattern" not in text and "_sliding_window_pattern" not in text
    kept = build_config({"source": cfg}, "source", refs(range(6)), family=family_of(cfg))["text_config"]
    assert (kept["sliding_window_pattern"], kept["_sliding_window_pattern"]) == (6, 6)


def test_max_window_layers_is_set_to_a_value_that_still_derives_the_list():
    cfg = {"model_type": "qwen2", "num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 8,
           "max_window_layers": 2}
    out = build_config({"source": cfg}, "source", refs([0, 1, 0, 1, 2, 3]), family=family_of(cfg))
    assert out["layer_types"] == ["full_attention"] * 4 + ["sliding_attention"] * 2
    assert out["max_window_layers"] == 4


# --- plans ------------------------------------------------------------------------------------------

def _deepseek(n=3, mtp=True):
    specs = [("model.embed_tokens.weight", "BF16", (8, 4))]
    for i in range(n + (1 if mtp else 0)):
        p = f"model.layers.{i}."
        specs.append((p + "input_layernorm.weight", "BF16", (4,)))
        specs += ([(p + "mlp.gate_proj.weight", "BF16", (8, 4))] if i == 0 else
                  [(p + "mlp.gate.weight", "F32", (2, 4)), (p + "mlp.experts.0.up_proj.weight", "BF16", (8, 4))])
        if i == n:
            specs.append((p + "eh_proj.weight", "BF16", (4, 8)))
    specs.append(("model.norm.weight", "BF16", (4,)))
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": n, "first_k_dense_replace": 1,
           "num_nextn_predict_layers": 1}
    return make_checkpoint(ROOT, {"model.safetensors": specs}, cfg)


def test_the_mtp_layer_stays_after_the_new_last_layer():
    ckpt = _deepseek()
    assert (ckpt.num_layers, ckpt.found_layers) == (3, 4)
    plan = build_plan(manifest('plan = "dus"\noverlap = 1'), {"source": ckpt})
    assert [r.layer for r in plan.layers] == [0, 1, 1, 2]
    names = {t.name: t.source_key for t in plan.tensors}
    assert names["model.layers.4.eh_proj.weight"] == "model.layers.3.eh_proj.weight"
    assert names["model.layers.4.mlp.gate.weight"] == "model.layers.3.mlp.gate.weight"
    assert plan.config["num_hidden_layers"] == 4 and plan.config["num_nextn_predict_layers"] == 1
    assert plan.kinds == ("dense", "moe", "moe", "moe")
    text = format_plan(plan)
    assert "family: deepseek_v3 (registry entry)" in text
    assert "layer kinds: dense x1, moe x3  (dense@0 moe@1..3)" in text


def test_a_dropped_mtp_layer_is_no_longer_counted():
    """rename.drop of the MTP layer: the output holds the decoder layers only, and its config says so
    (num_nextn_predict_layers 0), instead of a refusal that the tensors hold one layer less."""
    plan = build_plan(manifest('plan = "dus"\noverlap = 1', rename='drop = ["^model\\\\.layers\\\\.3\\\\."]'),
                      {"source": _deepseek()})
    assert plan.config["num_hidden_layers"] == 4 and plan.config["num_nextn_predict_layers"] == 0
    assert not any(t.source_key.startswith("model.layers.3.") for t in plan.tensors)
    kept = build_plan(manifest('plan = "dus"\noverlap = 1'), {"source": _deepseek()})
    assert kept.config["num_nextn_predict_layers"] == 1


def test_a_seam_between_kinds_is_marked():
    ckpt = _deepseek(mtp=False)
    with pytest.raises(PlanError):  # dense after MoE: DeepSeek's config cannot say it
        build_plan(manifest('plan = "explicit"\narrangement = [[0, 2], [0, 2]]'), {"source": ckpt})
    plan = build_plan(manifest('plan = "explicit"\narrangement = [0, [1, 3], 1]'), {"source": ckpt})
    assert "  out         3  <-  source 1   <- seam: jump -2" in format_plan(plan)  # both moe: kinds alike
    # A family the registry does not know, whose config says which layers are dense in a field the
    # generic rules rewrite (mlp_only_layers): planned, and plan marks the seam.
    config = {k: v for k, v in ckpt.config.items() if k not in ("first_k_dense_replace", "num_nextn_predict_layers")}
    unknown = replace(ckpt, config=dict(config, model_type="not_in_the_registry", mlp_only_layers=[0]))
    plan = build_plan(manifest('plan = "explicit"\narrangement = [[1, 3], 0]'), {"source": unknown})
    assert plan.family == "generic"
    assert plan.config["mlp_only_layers"] == [2]
    assert "  out         2  <-  source 0   <- seam: jump -3; kinds differ: moe | dense" in format_plan(plan)


def test_a_checkpoint_whose_config_misses_its_mtp_layer_is_refused():
    ckpt = _deepseek()
    files = SourceFiles("hf", "config.json", None, ("model.safetensors",), (), None)
    assert assemble(ckpt.root, files, ckpt.headers, dict(ckpt.config)).num_layers == 3
    with pytest.raises(SourceError) as e:
        assemble(ckpt.root, files, ckpt.headers, dict(ckpt.config, num_nextn_predict_layers=0))
    assert str(e.value) == (f"{ckpt.root / 'config.json'}: num_hidden_layers = 3 but the tensors hold 4 layers; the "
                            f"config and weights do not belong together (use the config.json that came with these "
                            f"weights)")


def test_gpt2_layers_tied_to_their_index_do_not_move():
    specs = [("transformer.wte.weight", "F32", (8, 4))] + [(f"transformer.h.{i}.ln_1.weight", "F32", (4,))
                                                           for i in range(3)]
    ckpt = make_checkpoint(ROOT, {"model.safetensors": specs},
                           {"model_type": "gpt2", "n_layer": 3, "scale_attn_by_inverse_layer_idx": True})
    assert build_plan(manifest('plan = "keep"'), {"source": ckpt}).config["n_layer"] == 3
    with pytest.raises(PlanError) as e:
        build_plan(manifest('plan = "dus"\noverlap = 1'), {"source": ckpt})
    assert str(e.value) == ("m.toml: source 'source' sets scale_attn_by_inverse_layer_idx, which ties each layer's "
                            "computation to its index, and output layer 2 is its layer 1; keep its layers in place, "
                            "or set scale_attn_by_inverse_layer_idx = false in [config] if that is what you want")
    # What the message suggests works: the override turns the flag off, and the output says so.
    turned_off = manifest('plan = "dus"\noverlap = 1', extra="[config]\nscale_attn_by_inverse_layer_idx = false\n")
    plan = build_plan(turned_off, {"source": ckpt})
    assert plan.config["n_layer"] == 4 and plan.config["scale_attn_by_inverse_layer_idx"] is False


# --- presets ----------------------------------------------------------------------------------------

def _phi3():
    specs = [("model.embed_tokens.weight", "BF16", (8, 4))]
    for i in range(2):
        p = f"model.layers.{i}."
        specs += [(p + "self_attn.qkv_proj.weight", "BF16", (4 + 2 + 2, 4)),
                  (p + "self_attn.o_proj.weight", "BF16", (4, 4)),
                  (p + "mlp.gate_up_proj.weight", "BF16", (12, 4)), (p + "mlp.down_proj.weight", "BF16", (4, 6))]
    cfg = {"model_type": "phi3", "num_hidden_layers": 2, "hidden_size": 4, "num_attention_heads": 2,
           "num_key_value_heads": 1, "intermediate_size": 6, "sliding_window": 64, "auto_map": {"x": "y"}}
    return make_checkpoint(ROOT, {"model.safetensors": specs}, cfg)


def test_phi3_to_llama_splits_fused_tensors_into_byte_ranges():
    ckpt = _phi3()
    plan = build_plan(manifest('plan = "keep"', rename='preset = "phi3-to-llama"'), {"source": ckpt})
    t = {x.name: x for x in plan.tensors}
    header = ckpt.headers["model.safetensors"]
    qkv = header.tensors["model.layers.1.self_attn.qkv_proj.weight"]
    base = header.data_start + qkv.start
    row = 4 * 2  # 4 columns of bf16
    for name, (start, stop) in (("q_proj", (0, 4)), ("k_proj", (4, 6)), ("v_proj", (6, 8))):
        out = t[f"model.layers.1.self_attn.{name}.weight"]
        assert (out.shape, out.inputs[0].part, out.transform) == ((stop - start, 4), RowSlice(start, stop, 8), "slice")
        assert (out.source.offset, out.source.length) == (base + start * row, (stop - start) * row)
    assert t["model.layers.0.mlp.up_proj.weight"].inputs[0].part == RowSlice(6, 12, 12)
    assert "model.layers.0.self_attn.qkv_proj.weight" not in t
    assert plan.config["model_type"] == "llama" and plan.config["head_dim"] == 2
    assert "sliding_window" not in plan.config and "auto_map" not in plan.config


def test_qwen2_to_llama_adds_zero_o_proj_biases():
    specs = [("model.embed_tokens.weight", "BF16", (8, 4))]
    for i in range(2):
        p = f"model.layers.{i}.self_attn."
        specs += [(p + "q_proj.weight", "BF16", (4, 4)), (p + "q_proj.bias", "BF16", (4,)),
                  (p + "o_proj.weight", "BF16", (4, 4))]
    cfg = {"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 4, "num_attention_heads": 2,
           "use_sliding_window": False, "sliding_window": None, "max_window_layers": 2}
    ckpt = make_checkpoint(ROOT, {"model.safetensors": specs}, cfg)
    plan = build_plan(manifest('plan = "keep"', rename='preset = "qwen2-to-llama"', extra='dtype = "float16"'),
                      {"source": ckpt})
    bias = {t.name: t for t in plan.tensors}["model.layers.1.self_attn.o_proj.bias"]
    assert (bias.shape, bias.dtype, bias.nbytes, bias.inputs, bias.op) == ((4,), "F16", 8, (), ZEROS)
    assert bias.transform == "zeros"
    assert plan.config["attention_bias"] is True and "layer_types" not in plan.config
    sliding = make_checkpoint(ROOT, {"model.safetensors": specs}, dict(cfg, use_sliding_window=True, sliding_window=8,
                                                                      max_window_layers=1))
    with pytest.raises(PlanError) as e:
        build_plan(manifest('plan = "keep"', rename='preset = "qwen2-to-llama"'), {"source": sliding})
    assert str(e.value) == ("m.toml: source 'source': rename.preset 'qwen2-to-llama' cannot convert this qwen2 model: "
                            "its layers use a sliding window, which Llama has none of")


def test_a_preset_refuses_another_family():
    with pytest.raises(PlanError) as e:
        build_plan(manifest('plan = "keep"', rename='preset = "qwen2-to-llama"'), {"source": _phi3()})
    assert str(e.value) == ("m.toml: source 'source': rename.preset 'qwen2-to-llama' converts qwen2 checkpoints, but "
                            "this source is phi3; use preset 'phi3-to-llama'")


def test_config_overrides_cannot_miscount_the_layers():
    ckpt = _deepseek(mtp=False)
    with pytest.raises(PlanError) as e:
        build_plan(manifest('plan = "dus"\noverlap = 1', extra="[config]\nnum_hidden_layers = 3\n"), {"source": ckpt})
    assert str(e.value) == ("m.toml: config.num_hidden_layers = 3 but the arrangement has 4 layers; remove it from "
                            "[config] (tensorsurgery sets it)")
    gemma = make_checkpoint(ROOT, {"model.safetensors": [(f"model.layers.{i}.input_layernorm.weight", "BF16", (4,))
                                                        for i in range(2)]},
                            {"model_type": "gemma2", "num_hidden_layers": 2})
    with pytest.raises(PlanError) as e:
        build_plan(manifest('plan = "dus"\noverlap = 1', extra='[config]\nlayer_types = ["full_attention"]\n'),
                   {"source": gemma})
    assert str(e.value) == ("m.toml: config.layer_types has 1 entries but the arrangement has 2 layers; give one per "
                            "output layer, or remove it from [config]")


@pytest.mark.parametrize("model_type", ["qwen2_moe", "some_future_moe"])
def test_dense_layer_lists_follow_the_arrangement_in_families_the_registry_may_not_know(model_type):
    """mlp_only_layers (Qwen-MoE), moe_layers (Llama 4) and first_k_dense_replace (DeepSeek, GLM-4.5,
    Kimi) are named alike across families: the generic rules recompute them too, rather than
    leave them describing the source's layers."""
    specs = [("model.embed_tokens.weight", "F32", (8, 4))]
    for i in range(4):
        mlp = ["mlp.down_proj.weight"] if i in (0, 3) else [f"mlp.experts.{j}.down_proj.weight" for j in range(2)]
        specs += [(f"model.layers.{i}.{t}", "F32", (4, 4)) for t in ["self_attn.q_proj.weight", *mlp]]
    cfg = {"model_type": model_type, "num_hidden_layers": 4, "mlp_only_layers": [0, 3], "decoder_sparse_step": 2}
    if model_type != "qwen2_moe":
        cfg |= {"moe_layers": [1, 2], "interleave_moe_layer_step": 2}
    ckpt = make_checkpoint(ROOT, {"model.safetensors": specs}, cfg)
    plan = build_plan(manifest('plan = "dus"\noverlap = 1'), {"source": ckpt})
    arrangement = [ref.layer for ref in plan.layers]
    assert arrangement == [0, 1, 2, 1, 2, 3]
    assert plan.config["mlp_only_layers"] == [0, 5] and plan.config["decoder_sparse_step"] == 1
    if model_type != "qwen2_moe":
        assert plan.config["moe_layers"] == [1, 2, 3, 4] and plan.config["interleave_moe_layer_step"] == 1
    assert plan.family == ("qwen2_moe" if model_type == "qwen2_moe" else "generic")


def test_a_leading_dense_count_is_recomputed_or_refused_by_the_generic_rules():
    specs = [("model.embed_tokens.weight", "F32", (8, 4))]
    for i in range(4):
        mlp = ["mlp.down_proj.weight"] if i == 0 else [f"mlp.experts.{j}.down_proj.weight" for j in range(2)]
        specs += [(f"model.layers.{i}.{t}", "F32", (4, 4)) for t in ["self_attn.q_proj.weight", *mlp]]
    ckpt = make_checkpoint(ROOT, {"model.safetensors": specs},
                           {"model_type": "kimi_linear", "num_hidden_layers": 4, "first_k_dense_replace": 1})
    kept = build_plan(manifest('plan = "keep"'), {"source": ckpt})
    assert kept.family == "generic" and kept.config["first_k_dense_replace"] == 1
    with pytest.raises(PlanError) as e:
        build_plan(manifest('plan = "dus"\noverlap = 0'), {"source": ckpt})  # 0 1 2 3 0 1 2 3: dense after MoE
    assert str(e.value) == (
        "m.toml: layers: output layer 4 (layer 0 of source 'source') is dense but follows a layer that is not "
        "(output layer 1); this model's config can only say that the first first_k_dense_replace layers are dense: "
        "arrange the dense layers first, or relabel the model as a family with a per-layer list")


def test_top_level_copies_of_the_decoder_fields_follow_the_rewrite():
    """Qwen2.5-VL configs saved by transformers 4.5x hold the decoder's fields twice: in text_config
    (what transformers reads) and at the top level. The copies follow, so no reader sees 4 layers
    in a 6-layer model; top-level fields that are not copies stay as they are."""
    specs = [("model.embed_tokens.weight", "F32", (8, 4)), ("visual.blocks.0.attn.qkv.weight", "F32", (4, 4))]
    specs += [(f"model.layers.{i}.mlp.down_proj.weight", "F32", (4, 4)) for i in range(4)]
    types = ["full_attention"] * 2 + ["sliding_attention"] * 2
    text = {"model_type": "qwen2_5_vl_text", "num_hidden_layers": 4, "layer_types": types, "max_window_layers": 2,
            "use_sliding_window": True, "sliding_window": 8}
    cfg = {"model_type": "qwen2_5_vl", **{k: v for k, v in text.items() if k != "model_type"},
           "vision_start_token_id": 4, "text_config": text}
    ckpt = make_checkpoint(ROOT, {"model.safetensors": specs}, cfg)
    plan = build_plan(manifest('plan = "dus"\noverlap = 1'), {"source": ckpt})  # layers 0 1 2 1 2 3
    nested = plan.config["text_config"]
    assert nested["num_hidden_layers"] == 6 and nested["layer_types"] == [types[i] for i in (0, 1, 2, 1, 2, 3)]
    for key in ("num_hidden_layers", "layer_types"):
        assert plan.config[key] == nested[key]
    assert plan.config.get("max_window_layers") == nested.get("max_window_layers")  # kept, reset or dropped alike
    assert plan.config["vision_start_token_id"] == 4 and plan.config["sliding_window"] == 8

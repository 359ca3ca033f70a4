"""Moving the layers of a family the registry does not know (tensorsurgery.planning.moves), pure: hand-made
configs and headers, no files, no torch. A config field the generic rules cannot rewrite that says
which layer is which, a tensor with a block per layer, or layers of different tensors that nothing
rewritable tells apart make a moving arrangement a one-line refusal; keep is always planned."""
from __future__ import annotations

import pytest

from helpers import decoder_config, decoder_specs, make_checkpoint, manifest_from_text
from tensorsurgery.errors import NotMovableError
from tensorsurgery.families.registry import GENERIC
from tensorsurgery.planning.moves import layer_describing_fields
from tensorsurgery.planning.planner import build_plan

ROOT = "/models/src"
N = 4
ADVICE = "keep the layers in order, or ask for this family to be added"


def manifest(layers: str, extra: str = ""):
    return manifest_from_text(f'[source]\nmodel = "{ROOT}"\n[layers]\n{layers}\n[output]\npath = "/out/x"\n{extra}')


DUS = 'plan = "dus"\noverlap = 1'
KEEP = 'plan = "keep"'


def unknown(specs=None, **fields):
    """A 4-layer checkpoint of a model_type the registry does not know, with ``fields`` in config.json."""
    cfg = decoder_config(N, **{"model_type": "somebody_new", "architectures": ["SomebodyNewForCausalLM"], **fields})
    return make_checkpoint(ROOT, {"model.safetensors": specs or decoder_specs(N)}, cfg)


def refused(ckpt, layers=DUS, extra=""):
    with pytest.raises(NotMovableError) as e:
        build_plan(manifest(layers, extra), {"source": ckpt})
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_period_refuses_a_move_naming_the_field_and_keep_is_planned():
    ckpt = unknown(attn_layer_period=8, attn_layer_offset=4)  # Jamba's fields, in a family the registry lacks
    assert refused(ckpt) == ("config.json: attn_layer_period = 8 looks like it describes layers one by one, and "
                             "tensorsurgery does not know how to rewrite it for family 'somebody_new'; " + ADVICE)
    plan = build_plan(manifest(KEEP), {"source": ckpt})
    assert plan.config["attn_layer_period"] == 8 and plan.config["num_hidden_layers"] == N


@pytest.mark.parametrize("layers", [DUS, 'plan = "idus"\noverlap = 1\ngroup = 1',
                                    'plan = "explicit"\narrangement = [[0, 3]]',  # a drop
                                    'plan = "explicit"\narrangement = [1, 0, 2, 3]'])  # a swap
def test_every_moving_arrangement_is_refused(layers):
    assert "attn_layer_offset = 1 looks like" in refused(unknown(attn_layer_offset=1), layers)


@pytest.mark.parametrize("key, value", [
    ("attn_layer_offset", 0),                  # Jamba: 0 is an offset too
    ("expert_layer_period", 2),
    ("attn_layer_indices", [1, 3]),            # Bamba
    ("hybrid_layer_ids", [2]),                 # Zamba2
    ("moe_layer_end_index", 3),                # ERNIE 4.5 MoE
    ("moe_layer_start_index", 1),
    ("moe_layer_interval", 1),
    ("num_dense_layers", 2),                   # LFM2-MoE: a leading count
    ("num_kv_shared_layers", 2),               # Gemma 3n
    ("max_window_layers", 2),                  # Qwen2's threshold, outside the registry
    ("hybrid_override_pattern", "M*M-"),       # Nemotron-H
    ("block_pattern", "MMMA"),
    ("sliding_window_pattern", 4),             # Cohere2 / Command R7B as on the Hub
    ("global_attn_every_n_layers", 2),
    ("moe_layer_freq", 1),
    ("sparse_step", 2),
    ("cross_attention_layers", [1]),           # Mllama
    ("full_attn_idxs", [0, 1, 2, 3]),          # LFM2: indices, one per layer by chance
    ("kv_source_layers", [0, 1, 1, 3]),        # layer indices, one per layer
    ("special_layers", [3]),
    ("odd_list", [1, 2]),                      # ints all below the layer count
    ("per_layer_config", {"02": {"head_dim": 8}}),  # Gemma 4 / dots3: keyed by layer number
    ("layout", "AAMA"),                        # a pattern string as long as the layer count
    ("scale_attn_by_inverse_layer_idx", True),
])
def test_fields_that_describe_layers_one_by_one_are_named(key, value):
    message = refused(unknown(**{key: value}))
    assert message.startswith(f"config.json: {key} = ")
    assert message.endswith(f"for family 'somebody_new'; {ADVICE}")
    assert build_plan(manifest(KEEP), {"source": unknown(**{key: value})}).config[key] == value


@pytest.mark.parametrize("key, value", [
    ("layer_types", ["full_attention", "sliding_attention"] * 2),   # one per layer: rewritten
    ("no_rope_layers", [1, 0, 1, 1]),                                # per-layer flags
    ("num_attention_heads_per_layer", [2, 2, 1, 2]),                 # named per layer
    ("layers_block_type", ["mamba", "attention", "mamba", "mamba"]),
    ("num_nextn_predict_layers", 0), ("attn_layer_indices", None), ("ple_layer_ids", []),
    ("scale_attn_by_inverse_layer_idx", False),
    ("eos_token_id", [1, 2]), ("image_token_index", 3), ("hidden_act", "silu"),  # 4 letters, not a pattern
    ("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}),
    ("mlp_only_layers", [1]), ("decoder_sparse_step", 1), ("first_k_dense_replace", 0),  # rewritten by the rules
])
def test_fields_the_rules_rewrite_or_that_say_nothing_are_not_refused(key, value):
    assert layer_describing_fields({key: value, "num_hidden_layers": N}, GENERIC, N) == []
    plan = build_plan(manifest(DUS), {"source": unknown(**{key: value})})
    assert len(plan.layers) == 6


def test_a_per_layer_list_follows_the_arrangement():
    plan = build_plan(manifest(DUS), {"source": unknown(layers_block_type=["a", "b", "c", "d"])})
    assert plan.config["layers_block_type"] == ["a", "b", "c", "b", "c", "d"]


def test_a_field_the_manifest_sets_is_the_users_to_say():
    ckpt = unknown(attn_layer_indices=[1, 3])
    plan = build_plan(manifest(DUS, "[config]\nattn_layer_indices = [1, 2, 4]\n"), {"source": ckpt})
    assert plan.config["attn_layer_indices"] == [1, 2, 4]


def test_a_tensor_with_a_block_per_layer_refuses_a_move():
    specs = decoder_specs(N) + [("model.embed_tokens_per_layer.weight", "BF16", (10, 4 * N))]
    ckpt = unknown(specs, model_type="gemma3n_text")
    assert refused(ckpt) == (f"{ROOT}: tensor 'model.embed_tokens_per_layer.weight' holds a block for each layer, "
                             f"which a moved layer cannot take along (it is not a byte range of the layer) for "
                             f"family 'gemma3n_text'; " + ADVICE)
    assert build_plan(manifest(KEEP), {"source": ckpt}).config["num_hidden_layers"] == N


def test_a_sub_config_that_counts_layers_refuses_a_move():
    ckpt = unknown(model_type="qwen3_vl", text_config={"num_hidden_layers": N, "hidden_size": 4})
    assert refused(ckpt) == ("config.json: text_config.num_hidden_layers = 4 counts the layers of a sub-model, which "
                             "tensorsurgery does not know how to rewrite for family 'qwen3_vl'; " + ADVICE)


def _hybrid():
    """Layers 0 and 2 attention, 1 and 3 mamba (other tensors)."""
    specs = [("model.embed_tokens.weight", "BF16", (10, 4))]
    for i in range(N):
        p = f"model.layers.{i}."
        specs += [(p + "norm.weight", "BF16", (4,))]
        specs += [(p + "mamba.in_proj.weight", "BF16", (8, 4))] if i % 2 else [(p + "self_attn.q_proj.weight",
                                                                                 "BF16", (4, 4))]
    return specs + [("model.norm.weight", "BF16", (4,)), ("lm_head.weight", "BF16", (10, 4))]


def test_layers_of_other_tensors_that_nothing_tells_apart_refuse_a_move():
    ckpt = unknown(_hybrid())
    assert refused(ckpt) == (f"{ROOT}: layers 0 and 1 hold different tensors ('mamba.in_proj.weight' in layer 1 "
                             f"only), and nothing in config.json that tensorsurgery can rewrite tells them apart for "
                             f"family 'somebody_new'; " + ADVICE)
    assert build_plan(manifest(KEEP), {"source": ckpt}).config["num_hidden_layers"] == N


def test_layers_of_other_shapes_that_nothing_tells_apart_refuse_a_move():
    specs = [s if s[0] != "model.layers.2.mlp.up_proj.weight" else (s[0], s[1], (6, 4)) for s in decoder_specs(N)]
    assert "('mlp.up_proj.weight' is (8, 4) in one and (6, 4) in the other)" in refused(unknown(specs))
    # One intermediate size per layer in a list the rules rewrite: told apart.
    plan = build_plan(manifest(DUS), {"source": unknown(specs, intermediate_sizes=[8, 8, 6, 8])})
    assert plan.config["intermediate_sizes"] == [8, 8, 6, 8, 6, 8]


def test_layers_told_apart_by_a_per_layer_list_move():
    ckpt = unknown(_hybrid(), layers_block_type=["attention", "mamba"] * 2)
    plan = build_plan(manifest('plan = "idus"\noverlap = 1\ngroup = 1'), {"source": ckpt})
    assert [r.layer for r in plan.layers] == [0, 1, 1, 2, 2, 3]
    assert plan.config["layers_block_type"] == ["attention", "mamba", "mamba", "attention", "attention", "mamba"]


def test_registry_families_are_not_concerned():
    # Qwen2's max_window_layers is a pattern field its registry entry rewrites.
    cfg = decoder_config(N, model_type="qwen2", max_window_layers=2, use_sliding_window=False)
    plan = build_plan(manifest(DUS), {"source": make_checkpoint(ROOT, {"model.safetensors": decoder_specs(N)}, cfg)})
    assert plan.family == "qwen2" and len(plan.layers) == 6

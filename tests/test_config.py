"""Tests for tensorsurgery.planning.config.build_config: the mistral-to-llama relabel, the layer count,
per-layer lists, the dtype key, overrides; both config.json generations (transformers 4's
``torch_dtype`` + ``rope_theta`` and transformers 5's ``dtype`` + ``rope_parameters``)."""
from __future__ import annotations

import copy

import pytest

from helpers import decoder_config, decoder_specs, make_checkpoint, manifest_from_text
from tensorsurgery.errors import PlanError
from tensorsurgery.families.layers import LayerRef, dus
from tensorsurgery.families.registry import family_of
from tensorsurgery.families.rules import get_preset
from tensorsurgery.planning.config import build_config
from tensorsurgery.planning.planner import build_plan

PRESET = get_preset("mistral-to-llama")

#: Mistral-7B-v0.1's config.json as transformers 4 wrote it.
MISTRAL_V4 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}

#: The same model as transformers 5 writes it.
MISTRAL_V5 = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "dtype": "bfloat16",
    "eos_token_id": 2, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pad_token_id": None,
    "rms_norm_eps": 1e-05, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "sliding_window": 4096, "tie_word_embeddings": False, "transformers_version": "5.0.0", "use_cache": True,
    "vocab_size": 32000,
}

LLAMA_RELABEL = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "attention_bias": False,
                 "mlp_bias": False}


def refs(layers, source="source"):
    return tuple(LayerRef(source, i) for i in layers)


def build(config, arrangement=refs(range(32)), *, preset=PRESET, dtype=None, overrides=None, configs=None):
    return build_config(configs or {"source": config}, "source", arrangement, family=family_of(config or MISTRAL_V4),
                        preset=preset, dtype=dtype, overrides=overrides or {})


def without(d, *keys):
    return {k: v for k, v in d.items() if k not in keys}


# --- relabel -----------------------------------------------------------------------------------------

def test_mistral_to_llama_transformers_4():
    src = copy.deepcopy(MISTRAL_V4)
    cfg = build(src)
    assert cfg == {**without(MISTRAL_V4, "sliding_window"), **LLAMA_RELABEL, "max_position_embeddings": 4096}
    assert src == MISTRAL_V4  # the source config is not mutated


def test_mistral_to_llama_transformers_5():
    src = copy.deepcopy(MISTRAL_V5)
    cfg = build(src)
    assert cfg == {**without(MISTRAL_V5, "sliding_window"), **LLAMA_RELABEL, "max_position_embeddings": 4096}
    assert cfg["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    assert "rope_theta" not in cfg and "torch_dtype" not in cfg
    assert src == MISTRAL_V5


@pytest.mark.parametrize("base", [MISTRAL_V4, MISTRAL_V5])
def test_null_sliding_window_keeps_max_position_embeddings(base):
    cfg = build({**base, "sliding_window": None})
    assert cfg["max_position_embeddings"] == 32768
    assert "sliding_window" not in cfg


@pytest.mark.parametrize("base", [MISTRAL_V4, MISTRAL_V5])
def test_dims_untouched(base):
    cfg = build(base)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == base[key]
    assert cfg["intermediate_size"] == 14336 and cfg["num_key_value_heads"] == 8


def test_qwen_style_window_keys_are_dropped():
    cfg = build({**MISTRAL_V5, "use_sliding_window": False, "max_window_layers": 28})
    assert not {"sliding_window", "use_sliding_window", "max_window_layers"} & cfg.keys()


def test_no_preset_keeps_the_architecture():
    cfg = build(MISTRAL_V5, refs(dus(32, 8)), preset=None)
    assert cfg == {**MISTRAL_V5, "num_hidden_layers": 48}


# --- layers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arrangement, n", [(refs(dus(32, 8)), 48), (refs(range(32)), 32), (refs([3]), 1)])
def test_num_hidden_layers_follows_the_arrangement(arrangement, n):
    assert build(MISTRAL_V4, arrangement)["num_hidden_layers"] == n


def test_per_layer_lists_follow_the_arrangement():
    types = [f"t{i}" for i in range(32)]
    src = {**MISTRAL_V5, "layer_types": types, "window_sizes": list(range(100, 132)),
           "eos_token_id": list(range(32))}
    cfg = build(src, refs(dus(32, 8)))
    assert cfg["layer_types"] == [f"t{i}" for i in [*range(24), *range(8, 32)]]
    assert cfg["window_sizes"] == [100 + i for i in [*range(24), *range(8, 32)]]
    assert cfg["eos_token_id"] == list(range(32))  # never per-layer
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert src["layer_types"] == types


def test_lists_of_other_lengths_are_not_per_layer():
    cfg = build({**MISTRAL_V5, "some_list": [1, 2, 3]}, refs(dus(32, 8)))
    assert cfg["some_list"] == [1, 2, 3]


def test_per_layer_lists_from_several_sources():
    a = {"num_hidden_layers": 3, "layer_types": ["a0", "a1", "a2"], "model_type": "mistral"}
    b = {"num_hidden_layers": 3, "layer_types": ["b0", "b1", "b2"], "model_type": "mistral"}
    arrangement = (LayerRef("a", 2), LayerRef("b", 0), LayerRef("b", 2), LayerRef("a", 0))
    cfg = build_config({"a": a, "b": b}, "a", arrangement, family=family_of(a), preset=None, dtype=None, overrides={})
    assert cfg == {"num_hidden_layers": 4, "layer_types": ["a2", "b0", "b2", "a0"], "model_type": "mistral"}


def test_per_layer_list_missing_from_a_source():
    a = {"num_hidden_layers": 3, "layer_types": ["a0", "a1", "a2"]}
    b = {"num_hidden_layers": 3}
    arrangement = (LayerRef("a", 2), LayerRef("b", 1))
    with pytest.raises(PlanError) as excinfo:
        build_config({"a": a, "b": b}, "a", arrangement, family=family_of(a), preset=None, dtype=None, overrides={})
    assert str(excinfo.value) == ("config.json of source 'b' has no layer_types[1] for the per-layer list "
                                  "'layer_types'; set layer_types in the manifest's [config] table")
    # The suggested fix works: the override wins and nothing is looked up.
    cfg = build_config({"a": a, "b": b}, "a", arrangement, family=family_of(a), preset=None, dtype=None,
                       overrides={"layer_types": ["x", "y"]})
    assert cfg["layer_types"] == ["x", "y"]


def test_missing_layer_count():
    with pytest.raises(PlanError):
        build(without(MISTRAL_V4, "num_hidden_layers"))


# --- dtype ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, name", [("F16", "float16"), ("BF16", "bfloat16"), ("F32", "float32")])
def test_dtype_key_transformers_4(dtype, name):
    cfg = build(MISTRAL_V4, dtype=dtype)
    assert cfg["torch_dtype"] == name and "dtype" not in cfg


@pytest.mark.parametrize("dtype, name", [("F16", "float16"), ("F32", "float32")])
def test_dtype_key_transformers_5(dtype, name):
    cfg = build(MISTRAL_V5, dtype=dtype)
    assert cfg["dtype"] == name and "torch_dtype" not in cfg


def test_dtype_both_keys():
    cfg = build({**MISTRAL_V5, "torch_dtype": "bfloat16"}, dtype="F16")
    assert cfg["dtype"] == cfg["torch_dtype"] == "float16"


def test_dtype_key_added_when_absent():
    cfg = build(without(MISTRAL_V4, "torch_dtype"), dtype="F16")
    assert cfg["torch_dtype"] == "float16"


def test_no_cast_keeps_the_dtype():
    assert build(MISTRAL_V5)["dtype"] == "bfloat16"
    assert build(MISTRAL_V4)["torch_dtype"] == "bfloat16"


# --- overrides ----------------------------------------------------------------------------------------

def test_overrides_win():
    overrides = {"max_position_embeddings": 8192, "model_type": "custom", "dtype": "float32",
                 "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "new_key": [1, 2]}
    cfg = build(MISTRAL_V5, refs(dus(32, 8)), dtype="F16", overrides=overrides)
    assert cfg == {**without(MISTRAL_V5, "sliding_window"), **LLAMA_RELABEL, "num_hidden_layers": 48,
                   **overrides}


# --- through build_plan -----------------------------------------------------------------------------------

def test_plan_config_from_manifest():
    ckpt = make_checkpoint("/src", {"model.safetensors": decoder_specs(4)},
                           decoder_config(4, layer_types=["s", "f", "s", "f"]))
    m = manifest_from_text('[source]\nmodel = "/src"\n[rename]\npreset = "mistral-to-llama"\n'
                           '[layers]\nplan = "dus"\noverlap = 1\n[config]\nrope_theta = 500000.0\n'
                           '[output]\npath = "/o"\ndtype = "float16"\n')
    plan = build_plan(m, {"source": ckpt})
    assert dict(plan.config) == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4, "intermediate_size": 8,
        "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 6, "vocab_size": 10,
        "max_position_embeddings": 16, "torch_dtype": "float16", "attention_bias": False, "mlp_bias": False,
        "layer_types": ["s", "f", "s", "f", "s", "f"], "rope_theta": 500000.0,
    }

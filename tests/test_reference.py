"""The reference surgery (tests/reference.py) is itself sound."""
from __future__ import annotations

import json

import pytest
import torch

from reference import ARRANGEMENTS, load_source_state_dict, reference_model, reference_state_dict


def _input_ids(vocab_size: int, seq_len: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, vocab_size, (2, seq_len), generator=gen)


@pytest.mark.parametrize("fixture", ["tiny_mistral", "tiny_mistral_single"])
def test_identity_relabel_keeps_logits_exactly(fixture, request):
    from transformers import MistralForCausalLM

    src = request.getfixturevalue(fixture)
    config = json.loads((src / "config.json").read_text())
    seq_len = config["sliding_window"] - 4  # inside the window: Mistral's attention = Llama's
    ids = _input_ids(config["vocab_size"], seq_len)

    mistral = MistralForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    llama = reference_model(src, ARRANGEMENTS["llama2-init-mistral"], dtype=torch.float32)
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert llama.config.model_type == "llama"
    assert llama.config.max_position_embeddings == config["sliding_window"]
    assert not hasattr(llama.config, "sliding_window") or llama.config.sliding_window is None
    assert next(llama.parameters()).dtype == torch.float32

    with torch.no_grad():
        expected = mistral(ids).logits
        got = llama(ids).logits
    assert expected.dtype == got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_identity_arrangement_is_the_source_state_dict(tiny_mistral):
    source = load_source_state_dict(tiny_mistral)
    out = reference_state_dict(tiny_mistral, ARRANGEMENTS["llama2-init-mistral"])
    assert out.keys() == source.keys()
    assert all(torch.equal(out[k], source[k]) and out[k].dtype == torch.bfloat16 for k in out)


def test_solar_dus_state_dict(tiny_mistral):
    source = load_source_state_dict(tiny_mistral)
    out = reference_state_dict(tiny_mistral, ARRANGEMENTS["solar-dus"])
    layers = {int(k.split(".")[2]) for k in out if k.startswith("model.layers.")}
    assert layers == set(range(48))
    per_layer = sorted(k.removeprefix("model.layers.8.") for k in source if k.startswith("model.layers.8."))
    assert len(per_layer) == 9  # 4 attention + 3 MLP projections + 2 norms
    for suffix in per_layer:
        assert torch.equal(out[f"model.layers.24.{suffix}"], source[f"model.layers.8.{suffix}"])
        assert torch.equal(out[f"model.layers.23.{suffix}"], source[f"model.layers.23.{suffix}"])
        assert torch.equal(out[f"model.layers.47.{suffix}"], source[f"model.layers.31.{suffix}"])
        # Layers 8 and 24 are the same values but distinct tensors.
        assert out[f"model.layers.24.{suffix}"].data_ptr() != out[f"model.layers.8.{suffix}"].data_ptr()
    # Different source layers really differ (norms too), so the checks above mean something.
    assert not torch.equal(source["model.layers.8.input_layernorm.weight"],
                           source["model.layers.9.input_layernorm.weight"])
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(out[key], source[key])

    model = reference_model(tiny_mistral, ARRANGEMENTS["solar-dus"])
    assert model.config.num_hidden_layers == 48 and len(model.model.layers) == 48
    assert next(model.parameters()).dtype == torch.bfloat16


def test_dtype_cast(tiny_mistral_single):
    out = reference_state_dict(tiny_mistral_single, ARRANGEMENTS["idus-8layer"], dtype=torch.float16)
    assert {v.dtype for v in out.values()} == {torch.float16}


def test_arrangements_are_as_published():
    a = ARRANGEMENTS
    assert a["llama2-init-mistral"] == list(range(32))
    assert a["solar-dus"][:24] == list(range(24)) and a["solar-dus"][24:] == list(range(8, 32))
    assert a["idus-1layer"][0::2] == list(range(24)) and a["idus-1layer"][1::2] == list(range(8, 32))
    assert a["idus-8layer"] == [*range(16), *range(8, 24), *range(16, 32)]
    for name in ("solar-dus", "idus-1layer", "idus-8layer"):
        assert sorted(a[name]) == sorted(a["solar-dus"])  # same multiset of layers, other order


@pytest.mark.parametrize("fixture", ["tiny_mistral", "tiny_mistral_single"])
def test_fixture_checkpoints_load(fixture, request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = request.getfixturevalue(fixture)
    model, info = AutoModelForCausalLM.from_pretrained(src, output_loading_info=True)
    assert type(model).__name__ == "MistralForCausalLM" and model.dtype == torch.bfloat16
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.num_hidden_layers == 32
    tokenizer = AutoTokenizer.from_pretrained(src)
    assert tokenizer("the tiny model").input_ids[0] == tokenizer.bos_token_id == 1


def test_bad_arrangement_is_rejected(tiny_mistral_single):
    with pytest.raises(ValueError, match="arrangement"):
        reference_state_dict(tiny_mistral_single, [0, 32])

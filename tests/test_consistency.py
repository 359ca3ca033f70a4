"""The config/tensor consistency check (tensorsurgery.families.consistency): alone on signatures, in apply
(a [config] override or a second source that breaks it is refused: one line, exit 2, nothing
written) and in verify (a hand-edited config.json of an output is a difference, exit 1)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from cli_helpers import differences, error_line, run, write_manifest
from synthetic import TINY, Dims, make_mistral, mistral_config, mistral_tensors, write_checkpoint
from tensorsurgery.families.consistency import check_consistency, differing_sources
from tensorsurgery.families.layers import LayerRef
from tensorsurgery.families.registry import family_of, get_family

SMALL = replace(TINY, layers=4)


def signatures(dims: Dims) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: ("BF16", shape) for name, shape in mistral_tensors(dims)}


def records(tensors: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) records, as a header's entries start."""
    return [(name, dtype, shape) for name, (dtype, shape) in tensors.items()]


def messages(config: dict, tensors: dict) -> list[str]:
    return [f.message for f in check_consistency(config, records(tensors), family_of(config))]


def test_a_consistent_model_has_no_finding():
    assert messages(mistral_config(SMALL), signatures(SMALL)) == []


@pytest.mark.parametrize("override, expected", [
    ({"vocab_size": 320}, "config.json vocab_size = 320 but model.embed_tokens.weight has 96 rows"),
    ({"hidden_size": 32}, "config.json hidden_size = 32 but model.embed_tokens.weight has 16 columns"),
    ({"num_hidden_layers": 6}, "config.json num_hidden_layers = 6 but the tensors hold 4 layers (model.layers.0-3)"),
    ({"num_hidden_layers": 4.0}, "config.json num_hidden_layers = 4.0 is not an integer"),
    ({"tie_word_embeddings": "no"}, "config.json tie_word_embeddings = 'no' is not a boolean (true or false)"),
    ({"layer_types": ["full_attention"] * 3}, "config.json layer_types has 3 entries but num_hidden_layers = 4"),
    ({"num_key_value_heads": 2},
     "config.json num_key_value_heads x head_dim = 2 x 8 = 16 but model.layers.0.self_attn.k_proj.weight has 8 rows"),
    ({"head_dim": 4},
     "config.json num_attention_heads x head_dim = 2 x 4 = 8 but model.layers.0.self_attn.q_proj.weight has 16 rows"),
    ({"intermediate_size": 64},
     "config.json intermediate_size = 64 but model.layers.0.mlp.gate_proj.weight has 32 rows"),
])
def test_each_disagreement_is_one_line_with_both_values(override, expected):
    found = messages(mistral_config(SMALL, **override), signatures(SMALL))
    assert found[0] == expected  # the first of the tensors that disagree (vocab: lm_head.weight too)
    assert len(found) <= 3 and all("\n" not in line for line in found)


def test_untied_config_without_lm_head():
    tensors = signatures(SMALL)
    del tensors["lm_head.weight"]
    assert messages(mistral_config(SMALL, tie_word_embeddings=True), tensors) == []
    assert messages(mistral_config(SMALL, tie_word_embeddings=False), tensors) == [
        "config.json tie_word_embeddings = false but there is no lm_head.weight beside model.embed_tokens.weight "
        "(transformers would leave the output layer random)"]


def test_vocab_checked_against_lm_head_rows_too():
    tensors = signatures(SMALL)
    tensors["lm_head.weight"] = ("BF16", (128, 16))
    assert messages(mistral_config(SMALL), tensors) == [
        "config.json vocab_size = 96 but lm_head.weight has 128 rows"]


def moe_signatures(experts: int, moe_size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    tensors = {n: s for n, s in signatures(SMALL).items() if ".mlp." not in n}
    for layer in range(SMALL.layers):
        for e in range(experts):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            tensors |= {p + "gate_proj.weight": ("BF16", (moe_size, 16)),
                        p + "up_proj.weight": ("BF16", (moe_size, 16)),
                        p + "down_proj.weight": ("BF16", (16, moe_size))}
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = ("BF16", (experts, 16))
    return tensors


def test_expert_count_and_moe_intermediate_size():
    config = mistral_config(SMALL, model_type="qwen3_moe", num_experts=4, moe_intermediate_size=8)
    assert messages(config, moe_signatures(4, 8)) == []
    assert messages(config, moe_signatures(3, 8)) == ["config.json num_experts = 4 but layer 0 (model.layers.0) "
                                                      "holds 3 experts"]
    assert messages(config, moe_signatures(4, 12))[0] == (
        "config.json moe_intermediate_size = 8 but model.layers.0.mlp.experts.0.gate_proj.weight has 12 rows")


def test_nested_text_config_is_checked_where_the_family_reads_it():
    text = mistral_config(SMALL, model_type="gemma3_text")
    names = {n.replace("model.", "language_model.model.", 1).replace("lm_head", "language_model.lm_head"): s
             for n, s in signatures(SMALL).items()}
    config = {"model_type": "gemma3", "text_config": text}
    assert check_consistency(config, records(names), get_family("gemma3")) == []
    config["text_config"] = {**text, "num_hidden_layers": 5}
    assert [f.message for f in check_consistency(config, records(names), get_family("gemma3"))] == [
        "config.json text_config.num_hidden_layers = 5 but the tensors hold 4 layers (language_model.model.layers.0-3)"]


def test_a_check_is_skipped_where_names_cannot_be_mapped():
    # Fused projections (Phi-3's qkv_proj, gate_up_proj): no head or MLP check, and nothing guessed.
    tensors = {n.replace("q_proj", "qkv_proj").replace("gate_proj", "gate_up_proj"): s
               for n, s in signatures(SMALL).items() if not n.endswith(("k_proj.weight", "v_proj.weight",
                                                                        "mlp.up_proj.weight"))}
    assert messages(mistral_config(SMALL, num_key_value_heads=7), tensors) == []


def test_second_source_with_other_computation_is_named_field_by_field():
    a, b = mistral_config(SMALL), mistral_config(SMALL, num_key_value_heads=2, rms_norm_eps=1e-6, hidden_act="gelu")
    arrangement = tuple(LayerRef("a", i) for i in range(2)) + tuple(LayerRef("b", i) for i in range(2, 4))
    found = differing_sources({"a": a, "b": b}, "a", arrangement, family_of(a))
    assert [f.message for f in found] == [
        "output layers 2-3 come from source 'b', whose config differs from 'a''s in num_key_value_heads (b: 2, a: 1), "
        "hidden_act (b: 'gelu', a: 'silu'), rms_norm_eps (b: 1e-06, a: 1e-05); tensorsurgery writes one config "
        "(the first source's), so these layers would compute wrongly"]
    assert differing_sources({"a": a, "b": dict(a)}, "a", arrangement, family_of(a)) == []
    # A source whose layers are not used does not matter.
    assert differing_sources({"a": a, "b": b}, "a", arrangement[:2], family_of(a)) == []


# Through the command line: refused by apply, caught by verify.

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_mistral(tmp_path_factory.mktemp("tiny") / "src", SMALL, seed=3)


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    """A tied model: no lm_head.weight, tie_word_embeddings true."""
    specs = [s for s in mistral_tensors(SMALL) if s[0] != "lm_head.weight"]
    return write_checkpoint(tmp_path_factory.mktemp("tied") / "src", specs,
                            mistral_config(SMALL, tie_word_embeddings=True), seed=4)


KEEP = 'plan = "keep"'


@pytest.mark.parametrize("source, config, expected", [
    ("tied", "tie_word_embeddings = false", "config.json tie_word_embeddings = false but there is no lm_head.weight"),
    ("tiny", "vocab_size = 320", "config.json vocab_size = 320 but model.embed_tokens.weight has 96 rows"),
    ("tiny", "num_hidden_layers = 4.0", "config.json num_hidden_layers = 4.0 is not an integer"),
    ("tiny", 'layer_types = ["full_attention", "sliding_attention"]',
     "config.json layer_types has 2 entries but num_hidden_layers = 4"),
    ("tiny", "use_cache = 1", "config.json use_cache = 1 is not a boolean (true or false)"),
    ("tiny", "rms_norm_eps = true", "config.json rms_norm_eps = true but the source's is 1e-05: keep it a number"),
])
def test_apply_refuses_an_override_that_breaks_the_model(request, tmp_path, capsys, source, config, expected):
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, request.getfixturevalue(source), out, layers=KEEP,
                              extra=f"[config]\n{config}\n")
    line = error_line(*run(capsys, "apply", manifest))
    assert "the output's config.json and tensors would disagree: " + expected in line
    assert "change [config]" in line
    assert not out.exists()


def test_apply_refuses_layers_from_a_source_that_computes_otherwise(tmp_path, capsys):
    # Same shapes (heads x head_dim = 16, kv heads x head_dim = 8), other heads, eps and activation.
    a = make_mistral(tmp_path / "a", SMALL, seed=1)
    b = make_mistral(tmp_path / "b", replace(SMALL, heads=4, kv_heads=2, head_dim=4), seed=2, rms_norm_eps=1e-6,
                     hidden_act="gelu")
    out = tmp_path / "out"
    text = (f'[sources.a]\nmodel = "{a}"\n\n[sources.b]\nmodel = "{b}"\n\n'
            f'[layers]\nplan = "explicit"\n'
            f'arrangement = [{{source = "a", layers = [0, 2]}}, {{source = "b", layers = [0, 4]}}]\n\n'
            f'[output]\npath = "{out}"\n')
    (tmp_path / "m.toml").write_text(text, encoding="utf-8")
    line = error_line(*run(capsys, "apply", tmp_path / "m.toml"))
    assert ("output layers 2-5 come from source 'b', whose config differs from 'a''s in num_attention_heads "
            "(b: 4, a: 2), num_key_value_heads (b: 2, a: 1), head_dim (b: 4, a: 8), hidden_act (b: 'gelu', a: 'silu'), "
            "rms_norm_eps (b: 1e-06, a: 1e-05)") in line
    assert not out.exists()
    # The same arrangement from two sources that agree is planned.
    c = make_mistral(tmp_path / "c", SMALL, seed=2)
    (tmp_path / "m.toml").write_text(text.replace(str(b), str(c)), encoding="utf-8")
    assert run(capsys, "apply", tmp_path / "m.toml")[0] == 0


@pytest.mark.parametrize("mode", ["manifest", "record+sources", "record"])
def test_verify_names_a_hand_edited_config(tiny, tmp_path, capsys, mode):
    out = tmp_path / "out"
    source = shutil.copytree(tiny, tmp_path / "src")
    manifest = write_manifest(tmp_path, source, out, layers='plan = "dus"\noverlap = 2')
    assert run(capsys, "apply", manifest)[0] == 0
    assert run(capsys, "verify", manifest)[0] == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "vocab_size": 320}, indent=2), encoding="utf-8")
    args = (manifest,) if mode == "manifest" else (out,)
    if mode == "record":
        shutil.rmtree(source)  # the record alone is checked
    code, out_text, err = run(capsys, "verify", *args)
    assert code == 1
    found = differences(code, out_text, err)
    assert "config.json: vocab_size = 320 but model.embed_tokens.weight has 96 rows" in found, found


def test_a_check_the_source_fails_does_not_apply_to_its_family(tmp_path, capsys):
    # Projections twice as wide as heads x head_dim say (as Qwen3-Next's gated q_proj is): the check
    # misreads this family, so it is skipped for its outputs; the other checks still run.
    source = make_mistral(tmp_path / "src", SMALL, seed=5, head_dim=4)
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, source, out, layers='plan = "dus"\noverlap = 2')
    assert run(capsys, "apply", manifest)[0] == 0
    assert run(capsys, "verify", manifest)[0] == 0
    # A hand edit is named for what it breaks, not for what the family never matched.
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}), encoding="utf-8")
    assert differences(*run(capsys, "verify", manifest)) == ["config.json: rms_norm_eps is 1e-06, expected 1e-05"]
    refused = write_manifest(tmp_path, source, tmp_path / "out2", name="r.toml", layers='plan = "keep"',
                             extra="[config]\nvocab_size = 320\n")
    assert "config.json vocab_size = 320" in error_line(*run(capsys, "apply", refused))

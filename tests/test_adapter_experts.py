"""LoRA adapters on MoE expert parameters (peft's ``target_parameters``): tiny transformers
Mixtral (experts stored ``[experts, out, in]``) and GPT-OSS (``[experts, in, out]``: transformers'
``is_transposed``), adapters made by peft 0.21.2 itself; our output bitwise equal to peft's
``merge_and_unload`` then ``save_pretrained``."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from merge_checks import same_bytes_on_threads
from safetensors.torch import load_file
from test_adapters import (
    DTYPES,
    assert_verify_finds_a_flipped_byte,
    make_adapter,
    manifest,
    merged_as_peft,
    peft_merged,
)
from torch_helpers import bitwise, state
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen3MoeConfig

from cli_helpers import error_line, run
from tensorsurgery.planning.adapter_params import TRANSPOSED_EXPERTS

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
#: Where a fused parameter is on disk: transformers saves Mixtral one expert at a time (its
#: ``w1``/``w3`` halves of ``gate_up_proj``, ``w2``), Qwen3-MoE too (``gate_proj``/``up_proj``,
#: ``down_proj``), GPT-OSS fused.
ON_DISK = {"mixtral": {"gate_up_proj": r"block_sparse_moe\.experts\.\d+\.w[13]\.weight$",
                       "down_proj": r"block_sparse_moe\.experts\.\d+\.w2\.weight$"},
           "qwen3_moe": {"gate_up_proj": r"mlp\.experts\.\d+\.(gate|up)_proj\.weight$",
                         "down_proj": r"mlp\.experts\.\d+\.down_proj\.weight$"},
           "gpt_oss": {"gate_up_proj": r"mlp\.experts\.gate_up_proj$", "down_proj": r"mlp\.experts\.down_proj$"}}


def tiny_moe(folder: Path, family: str, dtype: str) -> Path:
    """A tiny Mixtral, Qwen3-MoE or GPT-OSS (2 layers, 4 experts) in ``dtype``. Mixtral's experts have more
    rows than a product window (2 * 152 = 304 > 128) so a window must stop at an expert's end;
    GPT-OSS's ``down_proj`` is square (hidden = intermediate, as in the real model), so only the
    model type tells its layout."""
    torch.manual_seed(0)
    if family == "mixtral":
        config = MixtralConfig(vocab_size=160, hidden_size=96, intermediate_size=152, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    elif family == "qwen3_moe":
        config = Qwen3MoeConfig(vocab_size=160, hidden_size=96, moe_intermediate_size=152, intermediate_size=200,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                tie_word_embeddings=False)
    else:
        config = GptOssConfig(vocab_size=160, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=64, sliding_window=8,
                              tie_word_embeddings=False, layer_types=["sliding_attention", "full_attention"])
    AutoModelForCausalLM.from_config(config).to(DTYPES[dtype]).save_pretrained(folder)
    return folder


MOES = [("mixtral", "F32"), ("mixtral", "BF16"), ("qwen3_moe", "BF16"), ("gpt_oss", "BF16")]


@pytest.fixture(scope="module", params=MOES, ids=lambda p: "-".join(p))
def moe(request, tmp_path_factory) -> Path:
    family, dtype = request.param
    return tiny_moe(tmp_path_factory.mktemp("experts") / f"{family}-{dtype}", family, dtype)


CASES = {
    "r4": dict(r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS),
    "rslora-patterns": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=[], target_parameters=EXPERTS,
                            rank_pattern={"layers.1.mlp.experts.down_proj": 3}, alpha_pattern={"gate_up_proj": 5}),
    "down-only+q_proj": dict(r=6, lora_alpha=12, target_modules=["q_proj"], target_parameters=["down_proj"]),
}


@pytest.mark.parametrize("save", ["F32", "BF16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_an_expert_lora_is_peft_merge_and_unload_bitwise(tmp_path, capsys, moe, case, save):
    adapter = make_adapter(tmp_path / "adapter", moe, DTYPES[save], **CASES[case])
    got = merged_as_peft(capsys, tmp_path, moe, adapter, manifest(tmp_path, moe, adapter))
    base = load_file(str(moe / "model.safetensors"))
    changed = {k for k in got if not bitwise(got[k], base[k])}
    on_disk = [re.compile(ON_DISK[moe.name.split("-")[0]][p.rpartition(".")[2]])
               for p in CASES[case]["target_parameters"]]
    expected = {k for k in base if any(p.search(k) for p in on_disk)}
    assert expected and {k for k in changed if "experts" in k} == expected
    assert ("q_proj" in str(CASES[case]["target_modules"])) == any("q_proj" in k for k in changed)
    record = json.loads((tmp_path / "out" / "tensorsurgery.json").read_text())
    for key in expected:
        assert record["tensors"][key]["operation"]["name"] == "lora_experts"
        assert record["tensors"][key]["operation"]["experts"] == 4
    if case == "rslora-patterns":
        (entry,) = record["adapters"]
        assert entry["scalings"]["model.layers.1.mlp.experts.down_proj"] == 16 / 3 ** 0.5
        assert entry["scalings"]["model.layers.0.mlp.experts.gate_up_proj"] == 5 / 8 ** 0.5


def test_the_merged_moe_computes_what_peft_computes_and_verify_proves_it(tmp_path, capsys, moe):
    adapter = make_adapter(tmp_path / "adapter", moe, torch.float32, **CASES["rslora-patterns"])
    m = manifest(tmp_path, moe, adapter)
    out = same_bytes_on_threads(capsys, tmp_path, m)  # row ranges spread over threads: the same bytes
    ids = torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert all(not keys for keys in info.values()), info  # nothing missing, unexpected or mismatched
        ours = model.eval()(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(peft_merged(moe, adapter, tmp_path / "ref")).eval()(ids).logits
    assert torch.equal(ours, theirs)
    assert run(capsys, "verify", m, out, "--no-progress")[0] == 0
    gate_up = re.compile(ON_DISK[moe.name.split("-")[0]]["gate_up_proj"])
    key = max(k for k in state(out) if "layers.1." in k and gate_up.search(k))  # Mixtral: the last expert's w3
    assert_verify_finds_a_flipped_byte(capsys, m, out, key, 301)


def test_an_expert_lora_and_dus_in_one_manifest(tmp_path, capsys):
    """DUS with no overlap, layers 0, 1, 0, 1, with the adapter merged: each copy is its source layer's merge."""
    moe = tiny_moe(tmp_path / "base", "mixtral", "BF16")
    adapter = make_adapter(tmp_path / "adapter", moe, torch.bfloat16, **CASES["r4"])
    reference = state(peft_merged(moe, adapter, tmp_path / "ref"))
    m = manifest(tmp_path, moe, adapter, layers='plan = "dus"\noverlap = 0')
    assert run(capsys, "apply", m, "--no-progress")[0] == 0
    got = state(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4
    for key, t in got.items():
        source = re.sub(r"layers\.(\d+)\.", lambda g: f"layers.{int(g[1]) % 2}.", key)
        assert bitwise(t, reference[source]), key
    assert run(capsys, "verify", m, tmp_path / "out", "--no-progress")[0] == 0


def test_factors_that_fit_no_parameter_are_one_line_and_nothing_is_written(tmp_path, capsys):
    """An expert adapter trained on a model with other sizes, or on one with another layout."""
    mixtral = tiny_moe(tmp_path / "mixtral", "mixtral", "F32")
    other = tiny_moe(tmp_path / "gpt", "gpt_oss", "F32")
    adapter = make_adapter(tmp_path / "adapter", other, torch.float32, **CASES["r4"])
    code, out, err = run(capsys, "apply", manifest(tmp_path, mixtral, adapter), "--no-progress")
    message = error_line(code, out, err)
    assert "mlp.experts" in message and "fit" in message and "another model" in message
    assert not (tmp_path / "out").exists()


def test_the_transposed_layouts_are_transformers_own():
    """:data:`TRANSPOSED_EXPERTS` is every model type whose experts transformers declares
    ``is_transposed=True``: a model added upstream fails here rather than merging wrong."""
    models = Path(transformers.__file__).parent / "models"
    declared = set()
    for modeling in models.glob("*/modeling_*.py"):
        if re.search(r"@use_experts_implementation\([^)]*is_transposed=True", modeling.read_text()):
            for configuration in modeling.parent.glob("configuration_*.py"):
                declared |= set(re.findall(r'^\s+model_type = "(\w+)"', configuration.read_text(), re.M))
    assert declared == TRANSPOSED_EXPERTS

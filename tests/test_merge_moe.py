"""Merges of MoE models (issue 19). transformers 5 saves a Mixtral one expert at a time; mergekit
0.1.5 reads it through transformers' conversion mapping, which fuses the experts into one tensor
per layer, and writes them fused. Where a method is elementwise (linear, task_arithmetic,
nearswap, ram) the values do not depend on the layout: ours (one tensor per expert, as the
sources store them) loaded by transformers are bitwise mergekit's loaded by transformers, and the
logits are equal. A method with a statistic over a tensor or random draws would take it over
each expert where mergekit takes it over the fused experts: refused in one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_merges import mergekit
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from cli_helpers import error_line, run


@pytest.fixture(scope="module")
def moes(tmp_path_factory) -> dict[str, Path]:
    """A tiny bf16 Mixtral (4 experts, 2 layers) and two fine-tunes of it (its weights plus noise)."""
    root = tmp_path_factory.mktemp("moe")
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    torch.manual_seed(0)
    base = MixtralForCausalLM(config).to(torch.bfloat16)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for i, name in enumerate(("ft0", "ft1")):
        torch.manual_seed(i + 1)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        paths[name] = root / name
        base.save_pretrained(paths[name])
    return paths


def _loaded(folder: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The state dict transformers makes of ``folder`` (experts fused, whichever layout is stored)
    and the logits of a fixed prompt."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 33, 20, 2]])).logits
    return model.state_dict(), logits


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_elementwise_merges_of_moe_models_are_mergekits_values(capsys, tmp_path, moes, method):
    config = {"merge_method": method, "models": [{"model": str(moes[n]), "parameters": {"weight": w}}
                                                 for n, w in (("ft0", 0.7), ("ft1", 0.4))]}
    if method == "task_arithmetic":
        config["base_model"] = str(moes["base"])
    theirs = mergekit(config, tmp_path / "theirs")
    manifest = tmp_path / "m.yml"
    manifest.write_text(yaml.safe_dump(config))
    ours = tmp_path / "ours"
    code, out, err = run(capsys, "apply", manifest, "--output", ours, "--no-progress")
    assert code == 0, out + err
    (a, logits_a), (b, logits_b) = _loaded(theirs), _loaded(ours)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))] == []
    assert torch.equal(logits_a, logits_b)
    assert any("experts.gate_up_proj" in k for k in a)  # transformers fused both


@pytest.mark.parametrize("method, parameters", [
    ("ties", {"weight": 0.5, "density": 0.5}),
    ("dare_linear", {"weight": 0.5, "density": 0.5}),
    ("slerp", None),
])
def test_statistics_over_experts_stored_apart_are_refused(capsys, tmp_path, moes, method, parameters):
    if method == "slerp":
        config = {"merge_method": "slerp", "base_model": str(moes["base"]),
                  "models": [{"model": str(moes["base"])}, {"model": str(moes["ft0"])}], "parameters": {"t": 0.5}}
    else:
        config = {"merge_method": method, "base_model": str(moes["base"]),
                  "models": [{"model": str(moes[n]), "parameters": parameters} for n in ("ft0", "ft1")]}
    manifest = tmp_path / "m.yml"
    manifest.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    line = error_line(*run(capsys, "apply", manifest, "--output", out, "--random-seed", "1"))
    assert ("tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight' is one expert of a MoE layer stored "
            "one expert at a time; mergekit 0.1.5 merges the experts fused (transformers' conversion mapping)"
            ) in line, line
    assert not out.exists()

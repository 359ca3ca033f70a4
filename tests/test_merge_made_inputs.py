"""Merges of made tensors (issues 19 and 20): a model with a LoRA adapter among the merged models
(mergekit's ``model: BASE+ADAPTER``, which mergekit merges with peft's ``merge_and_unload`` first)
bitwise equal to mergekit 0.1.5's merge, through both doors; an FP8 model merged as the merge of
its dequantization (the two steps done in one manifest give the bytes of the two runs); verify
re-derives both and finds a flipped byte; the record names the made inputs; transformers loads
the merge with nothing missing, computing mergekit's logits."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from merge_checks import flipped_byte_found, same_bytes_on_threads
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from test_dequant import QUANT, quantize
from test_merges import _family, _ulps, assert_bitwise_equal, mergekit, read_all
from torch_helpers import state
from transformers import AutoModelForCausalLM

from cli_helpers import run


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama family of the merge tests (bf16) and a LoRA of ``ft0`` (random A and B, r 4,
    on the attention and MLP projections, an ``lm_head`` in modules_to_save)."""
    root = tmp_path_factory.mktemp("made")
    paths = _family(root, ("ft0", "ft1"))
    torch.manual_seed(7)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(paths["ft0"]), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"],
        modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(root / "lora")
    paths["lora"] = root / "lora"
    return paths


def _lora_config(paths: dict[str, Path], method: str) -> dict[str, Any]:
    models = [{"model": f"{paths['ft0']}+{paths['lora']}", "parameters": {"weight": 0.6}},
              {"model": str(paths["ft1"]), "parameters": {"weight": 0.4}}]
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(paths["ft1"]),
                "models": [{"model": str(paths["ft1"])}, {"model": f"{paths['ft0']}+{paths['lora']}"}],
                "parameters": {"t": 0.3}}
    config: dict[str, Any] = {"merge_method": method, "models": models}
    if method == "task_arithmetic":
        config["base_model"] = str(paths["base"])
    return config


def _toml(paths: dict[str, Path], method: str, out: Path) -> str:
    """The TOML door's manifest of :func:`_lora_config`'s merge."""
    sources = {"base": f'model = "{paths["base"]}"',
               "tuned": f'model = "{paths["ft0"]}"\nadapter = "{paths["lora"]}"',
               "ft1": f'model = "{paths["ft1"]}"'}
    if method == "slerp":
        order, merge = ("ft1", "tuned"), '[merge]\nmethod = "slerp"\nbase = "ft1"\n[merge.parameters]\nt = 0.3\n' \
                                          '[merge.models.tuned]\n'
    else:
        order = ("base", "tuned", "ft1") if method == "task_arithmetic" else ("tuned", "ft1")
        merge = f'[merge]\nmethod = "{method}"\n' + ('base = "base"\n' if method == "task_arithmetic" else "") + \
            '[merge.models.tuned]\nweight = 0.6\n[merge.models.ft1]\nweight = 0.4\n'
    return "".join(f"[sources.{n}]\n{sources[n]}\n" for n in order) + merge + f'[output]\npath = "{out}"\n'


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "slerp"])
@pytest.mark.parametrize("door", ["yaml", "toml"])
def test_a_model_with_an_adapter_merges_as_mergekit_merges_it(capsys, tmp_path, models, method, door):
    config = _lora_config(models, method)
    theirs = mergekit(config, tmp_path / "theirs", lora_merge_cache=str(tmp_path / "lora-cache"))
    ours = tmp_path / "ours"
    manifest = tmp_path / f"m.{'yml' if door == 'yaml' else 'toml'}"
    manifest.write_text(yaml.safe_dump(config, sort_keys=False) if door == "yaml" else _toml(models, method, ours))
    code, out, err = run(capsys, "apply", manifest, "--output", ours, "--no-progress")
    assert code == 0, out + err
    merged, reference = read_all(ours), read_all(theirs)
    if method == "slerp":  # slerp's rule (tests/test_merges.py): mergekit's float32 norms move a unit
        assert merged.keys() == reference.keys()
        ulps = {k: _ulps(reference[k], merged[k]) for k in merged}
        assert max(int(u.max()) for u in ulps.values()) <= 1
        assert sum(int((u != 0).sum()) for u in ulps.values()) <= sum(v.numel() for v in merged.values()) / 1000
    else:
        assert_bitwise_equal(reference, merged)
    # the adapter changed the merge: without it the bytes differ
    plain = yaml.safe_load(yaml.safe_dump(config).replace(f"+{models['lora']}", ""))
    without = mergekit(plain, tmp_path / "plain")
    changed = [k for k, v in read_all(without).items() if not torch.equal(v.view(torch.uint8),
                                                                         merged[k].view(torch.uint8))]
    assert "lm_head.weight" in changed and any("q_proj" in k for k in changed), changed
    record = json.loads((ours / "tensorsurgery.json").read_text())
    (entry,) = record["adapters"]
    assert len(entry["files"]) == 2
    inputs = record["tensors"]["model.layers.1.self_attn.q_proj.weight"]["inputs"]
    assert "(lora)" in " ".join(i["source_file"] for i in inputs), inputs
    code, out, _ = run(capsys, "verify", manifest, ours, "--no-progress")
    assert code == 0 and "every byte matches" in out, out
    if method == "linear":  # a model transformers loads whole, computing what mergekit's computes
        model, info = AutoModelForCausalLM.from_pretrained(ours, output_loading_info=True)
        assert not any(info.values()), info
        ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
        reference = AutoModelForCausalLM.from_pretrained(theirs).eval()
        with torch.no_grad():
            assert torch.equal(model.eval()(ids).logits, reference(ids).logits)
    if method == "slerp" and door == "yaml":
        flipped_byte_found(capsys, manifest, ours, "slerp")


@pytest.fixture(scope="module")
def fp8(models, tmp_path_factory) -> Path:
    """``ft1`` quantized to FP8 blocks (128x128, every projection), as DeepSeek-V3 saves it."""
    folder = tmp_path_factory.mktemp("fp8") / "ft1-fp8"
    folder.mkdir()
    tensors = state(models["ft1"])
    for key in [k for k in tensors if k.endswith("_proj.weight")]:
        tensors[key], tensors[key + "_scale_inv"] = quantize(tensors[key])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((models["ft1"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": QUANT}))
    return folder


def test_an_fp8_model_merges_as_its_dequantization_would(capsys, tmp_path, models, fp8):
    """One manifest (a linear merge of a bf16 model and an FP8 one, output bf16) gives the bytes of
    two runs: the FP8 model dequantized alone, then merged with mergekit."""
    step = tmp_path / "dequant.toml"
    step.write_text(f'[source]\nmodel = "{fp8}"\n[layers]\nplan = "keep"\n[output]\npath = "{tmp_path / "deq"}"\n'
                    f'dtype = "bfloat16"\n')
    assert run(capsys, "apply", step, "--no-progress")[0] == 0
    theirs = mergekit({"merge_method": "linear", "models": [
        {"model": str(models["ft0"]), "parameters": {"weight": 0.5}},
        {"model": str(tmp_path / "deq"), "parameters": {"weight": 0.5}}]}, tmp_path / "theirs")
    ours = tmp_path / "ours"
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'[sources.a]\nmodel = "{models["ft0"]}"\n[sources.q]\nmodel = "{fp8}"\n[merge]\n'
                        f'method = "linear"\n[merge.models.a]\nweight = 0.5\n[merge.models.q]\nweight = 0.5\n'
                        f'[output]\npath = "{ours}"\ndtype = "bfloat16"\n')
    code, out, err = run(capsys, "apply", manifest, "--no-progress")
    assert code == 0, out + err
    merged = read_all(ours)
    assert not any(k.endswith("_scale_inv") for k in merged)
    assert_bitwise_equal(read_all(theirs), merged)
    code, out, _ = run(capsys, "verify", manifest, ours, "--no-progress")
    assert code == 0 and "every byte matches" in out, out
    flipped_byte_found(capsys, manifest, ours, "linear")


def test_made_inputs_are_the_same_bytes_on_any_thread_count(capsys, tmp_path, models, fp8):
    """A two-pass merge (slerp: norms, then values) of an FP8 model and an adapted one, and a
    DARE merge (random draws) of them: the same bytes on 1 and 3 threads, verified."""
    for method, extra in (("slerp", '[merge.parameters]\nt = 0.4\n[merge.models.tuned]\n'),
                          ("dare_ties", 'seed = 3\n[merge.models.tuned]\nweight = 0.5\ndensity = 0.5\n')):
        folder = tmp_path / method
        folder.mkdir()
        manifest = folder / "m.toml"
        manifest.write_text(f'[sources.q]\nmodel = "{fp8}"\n[sources.tuned]\nmodel = "{models["ft0"]}"\n'
                            f'adapter = "{models["lora"]}"\n[merge]\nmethod = "{method}"\nbase = "q"\n{extra}'
                            f'[output]\npath = "{folder / "out"}"\ndtype = "bfloat16"\n')
        out = same_bytes_on_threads(capsys, folder, manifest)
        code, text, _ = run(capsys, "verify", manifest, out, "--no-progress")
        assert code == 0 and "every byte matches" in text, text


def test_a_model_with_an_adapter_in_a_merge_of_slices_is_mergekits(capsys, tmp_path, models):
    """slices: a linear merge of layers 0-1 of ft0+LoRA and ft1, then layers 2-3 of the same: each
    layer's adapted tensors are made from that layer's own base tensors; bitwise mergekit's."""
    adapted = f"{models['ft0']}+{models['lora']}"
    config = {"merge_method": "linear", "slices": [
        {"sources": [{"model": adapted, "layer_range": [a, b], "parameters": {"weight": 0.6}},
                     {"model": str(models["ft1"]), "layer_range": [a, b], "parameters": {"weight": 0.4}}]}
        for a, b in ((0, 2), (2, 4))]}
    theirs = mergekit(config, tmp_path / "theirs", lora_merge_cache=str(tmp_path / "lora-cache"))
    manifest = tmp_path / "m.yml"
    manifest.write_text(yaml.safe_dump(config, sort_keys=False))
    ours = tmp_path / "ours"
    code, out, err = run(capsys, "apply", manifest, "--output", ours, "--no-progress")
    assert code == 0, out + err
    assert_bitwise_equal(read_all(theirs), read_all(ours))
    code, out, _ = run(capsys, "verify", manifest, ours, "--no-progress")
    assert code == 0 and "every byte matches" in out, out

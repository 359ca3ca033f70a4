"""LoRA adapters merged into their source (issue 20): a tiny transformers Llama and adapters made
with peft's ``get_peft_model`` (``init_lora_weights=False``: B is not zero), saved in float32 and
bfloat16; every output tensor bitwise equal to peft's ``merge_and_unload()`` then
``save_pretrained``, at r = 8 and 64, rsLoRA, rank_pattern / alpha_pattern, an embedding LoRA,
modules_to_save; the logits equal when loaded; an adapter + DUS in one manifest; verify finds a
flipped byte; the refusals (one line, exit 2, nothing written)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch_helpers import bitwise, state
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from cli_helpers import error_line, run

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", params=["F32", "BF16"])
def base(request, tmp_path_factory) -> Path:
    """A tiny Llama (3 layers, hidden 200, intermediate 136, 4 heads, 2 KV heads, vocab 320) in F32 or BF16."""
    folder = tmp_path_factory.mktemp("lora") / f"base-{request.param}"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=200, intermediate_size=136, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(DTYPES[request.param]).save_pretrained(folder)
    return folder


def make_adapter(folder: Path, base: Path, save_dtype: torch.dtype, **lora) -> Path:
    """A peft LoRA of ``base`` with random A and B, saved in ``save_dtype``."""
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(init_lora_weights=False, **lora))
    model.to(save_dtype).save_pretrained(folder)
    return folder


def peft_merged(base: Path, adapter: Path, out: Path) -> Path:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    model.save_pretrained(out)
    return out


def manifest(tmp_path: Path, base: Path, adapter: Path, *, layers: str = 'plan = "keep"', name: str = "m.toml") -> Path:
    path = tmp_path / name
    path.write_text(f'[sources.base]\nmodel = "{base}"\nadapter = "{adapter}"\n[layers]\n{layers}\n'
                    f'[output]\npath = "{tmp_path / "out"}"\nmax_shard_size = "300KB"\n')
    return path


CASES = {
    "r8": dict(r=8, lora_alpha=16, target_modules=ALL),
    "r64-rslora": dict(r=64, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterns": dict(r=8, lora_alpha=16, target_modules=ALL, alpha_pattern={"down_proj": 7},
                     rank_pattern={"layers.1.self_attn.q_proj": 4, "up_proj": 12}),
    "embedding+modules_to_save": dict(r=8, lora_alpha=8, target_modules=["embed_tokens", "o_proj"],
                                      modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("save", ["F32", "BF16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_merge_is_peft_merge_and_unload_bitwise(tmp_path, capsys, base, case, save):
    adapter = make_adapter(tmp_path / "adapter", base, DTYPES[save], **CASES[case])
    reference = state(peft_merged(base, adapter, tmp_path / "ref"))
    code, _, err = run(capsys, "apply", manifest(tmp_path, base, adapter), "--no-progress")
    assert code == 0, err
    got = state(tmp_path / "out")
    assert set(got) == set(reference)
    differing = [k for k in got if not bitwise(got[k], reference[k])]
    assert differing == []
    changed = [k for k in got if not bitwise(got[k], load_file(str(base / "model.safetensors"))[k])]
    assert changed  # the adapter did something
    record = json.loads((tmp_path / "out" / "tensorsurgery.json").read_text())
    (entry,) = record["adapters"]
    assert [f["name"] for f in entry["files"]] == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(len(f["sha256"]) == 64 for f in entry["files"])
    if case == "patterns":
        assert entry["scalings"]["model.layers.1.self_attn.q_proj"] == 4.0
        assert entry["scalings"]["model.layers.0.mlp.up_proj"] == 16 / 12
        assert entry["scalings"]["model.layers.2.mlp.down_proj"] == 7 / 8
        assert record["tensors"]["model.layers.2.mlp.down_proj.weight"]["operation"]["scaling"] == 7 / 8


def test_the_merged_model_computes_what_peft_computes(tmp_path, capsys, base):
    adapter = make_adapter(tmp_path / "adapter", base, torch.float32, **CASES["r8"])
    ref = peft_merged(base, adapter, tmp_path / "ref")
    code, _, err = run(capsys, "apply", manifest(tmp_path, base, adapter), "--no-progress")
    assert code == 0, err
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(ref)(ids).logits
    assert torch.equal(ours, theirs)
    code, _, err = run(capsys, "verify", manifest(tmp_path, base, adapter), tmp_path / "out", "--no-progress")
    assert code == 0, err


def test_an_adapter_and_dus_in_one_manifest_and_verify_finds_a_flipped_byte(tmp_path, capsys, base):
    adapter = make_adapter(tmp_path / "adapter", base, torch.bfloat16, **CASES["r8"])
    reference = state(peft_merged(base, adapter, tmp_path / "ref"))
    m = manifest(tmp_path, base, adapter, layers='plan = "dus"\noverlap = 1')
    code, _, err = run(capsys, "apply", m, "--no-progress")
    assert code == 0, err
    out = tmp_path / "out"
    got = state(out)
    arrangement = [0, 1] + [1, 2]  # n = 3, m = 1
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == len(arrangement)
    for key, t in got.items():
        parts = key.split(".")
        if key.startswith("model.layers."):
            parts[2] = str(arrangement[int(parts[2])])
        assert bitwise(t, reference[".".join(parts)]), key
    code, _, err = run(capsys, "verify", m, out, "--no-progress")
    assert code == 0, err
    key = "model.layers.2.self_attn.q_proj.weight"
    shard = next(p for p in sorted(out.glob("*.safetensors")) if key in safe_open(str(p), framework="pt").keys())
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start, _ = json.loads(raw[8:8 + n])[key]["data_offsets"]
    raw[8 + n + start + 51] ^= 0x10
    shard.write_bytes(bytes(raw))
    code, text, _ = run(capsys, "verify", m, out, "--no-progress")
    assert code == 1 and key in text
    code, text, _ = run(capsys, "verify", out, "--no-progress")
    assert code == 1 and key in text


def test_mergekit_base_plus_adapter(tmp_path, capsys, base):
    adapter = make_adapter(tmp_path / "adapter", base, torch.float32, **CASES["r8"])
    reference = state(peft_merged(base, adapter, tmp_path / "ref"))
    yaml = tmp_path / "m.yaml"
    yaml.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {base}+{adapter}\n"
                    f"        layer_range: [0, 3]\n")
    code, _, err = run(capsys, "apply", yaml, "--output", tmp_path / "out", "--no-progress")
    assert code == 0, err
    got = state(tmp_path / "out")
    assert set(got) == set(reference) and all(bitwise(got[k], reference[k]) for k in got)


def _edit_adapter(adapter: Path, *, config=None, tensors=None) -> Path:
    if config is not None:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(config(cfg)))
    if tensors is not None:
        t = load_file(str(adapter / "adapter_model.safetensors"))
        save_file(tensors(t), str(adapter / "adapter_model.safetensors"))
    return adapter


Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("case, message", [
    ("not lora", "peft_type is 'IA3'; only LoRA adapters (peft_type LORA) can be merged"),
    ("dora", "a DoRA adapter (use_dora); only plain LoRA is merged"),
    ("no base tensor", "module 'model.layers.0.self_attn.nope' has no base tensor"),
    ("shape", "module 'model.layers.0.self_attn.q_proj': A [8, 100] and B [200, 8] (rank 8) do not fit its base "
              "tensor [200, 200]"),
    ("no folder", "not a peft adapter folder (it needs adapter_config.json and adapter_model.safetensors)"),
])
def test_what_cannot_be_merged_is_one_line_and_nothing_is_written(tmp_path, capsys, base, case, message):
    adapter = make_adapter(tmp_path / "adapter", base, torch.float32, **CASES["r8"])
    if case == "not lora":
        _edit_adapter(adapter, config=lambda c: {**c, "peft_type": "IA3"})
    elif case == "dora":
        _edit_adapter(adapter, config=lambda c: {**c, "use_dora": True})
    elif case == "no base tensor":
        nope = Q.replace("q_proj", "nope")
        _edit_adapter(adapter, tensors=lambda t: {**t, nope + ".lora_A.weight": t[Q + ".lora_A.weight"].clone(),
                                                  nope + ".lora_B.weight": t[Q + ".lora_B.weight"].clone()})
    elif case == "shape":
        _edit_adapter(adapter, tensors=lambda t: {**t, Q + ".lora_A.weight": t[Q + ".lora_A.weight"][:, :100].clone()})
    else:
        adapter = tmp_path / "missing"
    text = error_line(*run(capsys, "apply", manifest(tmp_path, base, adapter), "--no-progress"))
    assert message in text, text
    assert not (tmp_path / "out").exists()


def test_base_plus_adapter_is_a_source_with_an_adapter(tmp_path):
    from tensorsurgery.loading import manifest_from_text
    m = manifest_from_text("merge_method: passthrough\nslices:\n  - sources:\n      - model: org/base@v1+./my-lora\n"
                           "        layer_range: [0, 2]\n  - sources:\n      - model: org/base@v1\n"
                           "        layer_range: [1, 2]\n", tmp_path / "m.yaml")
    assert [(s.model, s.revision, s.adapter) for s in m.sources] == [("org/base", "v1", "./my-lora"),
                                                                     ("org/base", "v1", None)]
    t = manifest_from_text('[sources.a]\nmodel = "m"\nadapter = "lora"\n[layers]\nplan = "keep"\n'
                           '[output]\npath = "out/x"\n', tmp_path / "m.toml")
    assert t.sources[0].adapter == "lora"

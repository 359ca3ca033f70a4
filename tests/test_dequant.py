"""FP8 block and MXFP4 dequantization (issue 20): a tiny Llama built by transformers, quantized here to
``F8_E4M3`` with a float32 ``weight_scale_inv`` per block (hidden 200 and intermediate 136: no
dimension a multiple of 128, so every edge block is partial), applied with ``dtype`` set; every
output weight bitwise equal to DeepSeek-V3's ``weight_dequant`` written in torch (float32
multiply, then ``.to(bfloat16)``), the other tensors untouched, the output loaded and run by
transformers; dequantize + DUS in one manifest; verify finds a flipped byte; the refusals. MXFP4:
a tiny GPT-OSS with packed experts, every output tensor bitwise equal to transformers' own
dequantization (``Mxfp4Config(dequantize=True)``), the same logits."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch_helpers import bitwise, state
from transformers import (
    AutoModelForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Mxfp4Config,
)
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from cli_helpers import error_line, run
from tensorsurgery.formats.safetensors import encode_header
from tensorsurgery.formats.safetensors_output import SAFETENSORS
from tensorsurgery.io.byte_source import LocalFile, Readers
from tensorsurgery.ops import OPERATIONS, DequantFP8, DequantMXFP4
from tensorsurgery.ops.base import ByteRange, Input
from tensorsurgery.ops.interpreter import tensor_chunks
from tensorsurgery.output.compare import compare_shard
from tensorsurgery.output.pump import Pump
from tensorsurgery.planning.planner import Shard, output_tensor

SHARD_METADATA = dict(SAFETENSORS.metadata)  # what a planned shard's header says
BLOCK = (128, 128)
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def weight_dequant(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int] = BLOCK,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """DeepSeek-V3's ``inference/kernel.py::weight_dequant`` in torch: each element times its
    block's scale in float32, then rounded to ``dtype``; partial blocks at the edges."""
    rows, cols = w.shape
    full = s.to(torch.float32).repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (w.to(torch.float32) * full).to(dtype)


def quantize(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` as DeepSeek-V3 ships it: e4m3fn values and a float32 scale per block (amax / 448)."""
    rows, cols = w.shape
    br, bc = -(-rows // block[0]), -(-cols // block[1])
    padded = torch.zeros(br * block[0], bc * block[1])
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(br, block[0], bc, block[1])
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).reshape(br * block[0], bc * block[1])[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.to(torch.float32)


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory) -> Path:
    """A tiny Llama (4 layers, hidden 200, intermediate 136, 4 heads, 2 KV heads) whose linear
    layer weights are FP8 blocks, saved as DeepSeek-V3 saves them (config quantization_config)."""
    folder = tmp_path_factory.mktemp("fp8") / "src"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=200, intermediate_size=136, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tensors = state(folder)
    for key in [k for k in tensors if k.endswith("_proj.weight")]:
        tensors[key], tensors[key + "_scale_inv"] = quantize(tensors[key])
    for path in folder.glob("*.safetensors"):
        path.unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": QUANT}, indent=2))
    return folder


def manifest(tmp_path: Path, source: Path, *, layers: str = 'plan = "keep"', dtype: str | None = "bfloat16",
             name: str = "m.toml") -> Path:
    path = tmp_path / name
    line = f'dtype = "{dtype}"\n' if dtype else ""
    path.write_text(f'[source]\nmodel = "{source}"\n[layers]\n{layers}\n[output]\npath = "{tmp_path / "out"}"\n'
                    f'max_shard_size = "200KB"\n{line}')
    return path


def expected(source: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The output tensor ``name`` of a keep plan: the dequantized weight, or the tensor as it is."""
    scale = source.get(name + "_scale_inv")
    return weight_dequant(source[name], scale) if scale is not None else source[name]


def test_dequantized_weights_are_weight_dequant_bitwise_and_the_model_runs(tmp_path, capsys, fp8_model):
    m = manifest(tmp_path, fp8_model)
    code, out, err = run(capsys, "plan", m)
    assert code == 0, err
    assert "tensors: 28 dequant, 11 none" in out  # 4 layers x 7 projections; 9 norms, embeddings, head copied
    assert "dequantized: 28 FP8 in 128x128 blocks -> BF16; 28 scale tensors left out" in out
    code, _, err = run(capsys, "apply", m, "--no-progress")
    assert code == 0, err
    source, got = state(fp8_model), state(tmp_path / "out")
    assert set(got) == {k for k in source if not k.endswith("_scale_inv")}
    quantized = [k for k in got if k + "_scale_inv" in source]
    assert len(quantized) == 28
    for key, t in got.items():
        assert bitwise(t, expected(source, key)), key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    record = json.loads((tmp_path / "out" / "tensorsurgery.json").read_text())
    entry = record["tensors"]["model.layers.1.mlp.down_proj.weight"]
    assert entry["transform"] == "dequant"
    assert [i["source_key"] for i in entry["inputs"]] == ["model.layers.1.mlp.down_proj.weight",
                                                        "model.layers.1.mlp.down_proj.weight_scale_inv"]
    assert entry["operation"] == {"name": "dequant", "block_rows": 128, "block_cols": 128, "dtype": "BF16"}
    # transformers loads the output as a plain bf16 Llama and computes what the dequantized weights compute.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    reference = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    reference.load_state_dict({k: expected(source, k).float() for k in got}, strict=True)
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference.to(torch.float32)(ids).logits)
    code, _, err = run(capsys, "verify", m, tmp_path / "out", "--no-progress")
    assert code == 0, err


def test_dequantize_and_dus_in_one_manifest_and_verify_finds_a_flipped_byte(tmp_path, capsys, fp8_model):
    m = manifest(tmp_path, fp8_model, layers='plan = "dus"\noverlap = 1')
    code, _, err = run(capsys, "apply", m, "--no-progress")
    assert code == 0, err
    source, out = state(fp8_model), tmp_path / "out"
    got = state(out)
    arrangement = [0, 1, 2] + [1, 2, 3]  # n = 4, m = 1: layers 0..2, then 1..3
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == len(arrangement)
    for key, t in got.items():
        parts = key.split(".")
        if key.startswith("model.layers."):
            parts[2] = str(arrangement[int(parts[2])])
        assert bitwise(t, expected(source, ".".join(parts))), key
    assert not any(k.endswith("_scale_inv") for k in got)
    code, _, err = run(capsys, "verify", m, out, "--no-progress")
    assert code == 0, err
    # One byte of a dequantized tensor flipped: both verify modes see it.
    shard = next(p for p in sorted(out.glob("*.safetensors")) if "model.layers.1.self_attn.q_proj.weight" in
                 safe_open(str(p), framework="pt").keys())
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start, _ = json.loads(raw[8:8 + n])["model.layers.1.self_attn.q_proj.weight"]["data_offsets"]
    raw[8 + n + start + 101] ^= 0x10
    shard.write_bytes(bytes(raw))
    code, out_text, _ = run(capsys, "verify", m, out, "--no-progress")
    assert code == 1 and "model.layers.1.self_attn.q_proj.weight" in out_text and "dequant" in out_text
    code, out_text, _ = run(capsys, "verify", out, "--no-progress")
    assert code == 1 and "model.layers.1.self_attn.q_proj.weight" in out_text


def test_without_a_dtype_the_fp8_model_is_kept_as_it_is(tmp_path, capsys, fp8_model):
    m = manifest(tmp_path, fp8_model, layers='plan = "dus"\noverlap = 2', dtype=None)
    code, _, err = run(capsys, "apply", m, "--no-progress")
    assert code == 0, err
    got = state(tmp_path / "out")
    assert got["model.layers.3.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.3.self_attn.q_proj.weight_scale_inv" in got
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == QUANT


def _broken(tmp_path: Path, fp8_model: Path, *, tensors=None, quant=None) -> Path:
    """A copy of ``fp8_model`` with its tensors or its quantization_config changed."""
    folder = tmp_path / "broken"
    folder.mkdir()
    src = state(fp8_model)
    save_file(tensors(src) if tensors else src, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((fp8_model / "config.json").read_text())
    if quant is not None:
        cfg["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


KEY = "model.layers.2.mlp.gate_proj.weight"


@pytest.mark.parametrize("case, message", [
    ("missing scale", f"tensor {KEY!r} is F8_E4M3 but the source has no '{KEY}_scale_inv' (its per-block scale)"),
    ("scale shape", f"tensor {KEY!r} [136, 200] in blocks of 128x128 needs a float scale of shape [2, 2], but "
                    f"'{KEY}_scale_inv' is F32 [1, 2]"),
    ("no block size", "quantization_config is fp8 but its weight_block_size is None, not [rows, cols]"),
    ("e5m2", f"tensor {KEY!r} is F8_E5M2; tensorsurgery dequantizes F8_E4M3 (e4m3fn) weights only"),
])
def test_what_cannot_be_dequantized_is_one_line_and_nothing_is_written(tmp_path, capsys, fp8_model, case, message):
    if case == "missing scale":
        source = _broken(tmp_path, fp8_model, tensors=lambda s: {k: v for k, v in s.items() if k != KEY + "_scale_inv"})
    elif case == "e5m2":
        source = _broken(tmp_path, fp8_model, tensors=lambda s: {**s, KEY: s[KEY].float().to(torch.float8_e5m2)})
    elif case == "scale shape":
        source = _broken(tmp_path, fp8_model, tensors=lambda s: {**s, KEY + "_scale_inv": s[KEY + "_scale_inv"][:1]})
    else:
        source = _broken(tmp_path, fp8_model, quant={k: v for k, v in QUANT.items() if k != "weight_block_size"})
    m = manifest(tmp_path, source)
    for command in ("plan", "apply"):
        line = error_line(*run(capsys, command, m))
        assert message in line, line
    assert not (tmp_path / "out").exists()


def test_an_adapter_on_an_fp8_model_says_to_dequantize_it_first(tmp_path, capsys, fp8_model):
    """A LoRA computes with floats and a recipe is one operation: an adapter on an FP8 model is
    refused in one line that says to dequantize it first, and nothing is written. (A merge of FP8
    models dequantizes them first: tests/test_merge_made_inputs.py.)"""
    out = tmp_path / "out"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{q}.lora_A.weight": torch.ones(4, 200), f"{q}.lora_B.weight": torch.ones(200, 4)},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    m = tmp_path / "m.toml"
    m.write_text(f'[sources.base]\nmodel = "{fp8_model}"\nadapter = "{adapter}"\n[layers]\nplan = "keep"\n'
                 f'[output]\npath = "{out}"\ndtype = "bfloat16"\n')
    expected = ("module 'model.layers.0.self_attn.q_proj': its tensors are F8_E4M3, F32, F32; LoRA merges float "
                "tensors only (F8_E4M3: a quantized model); dequantize the model first")
    for command in ("plan", "apply"):
        line = error_line(*run(capsys, command, m))
        assert expected in line and 'with [output] dtype = "bfloat16"' in line, line
    assert not out.exists()


def _fp8_file(path: Path, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[Input, Input]]:
    """A safetensors file of FP8 weights and their scales; each weight's two inputs."""
    flat = {k: v for name, (w, s) in tensors.items() for k, v in ((name, w), (name + "_scale_inv", s))}
    save_file(flat, str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    file = LocalFile(path)

    def one(key: str) -> Input:
        start, end = header[key]["data_offsets"]
        return Input("s", key, header[key]["dtype"], tuple(header[key]["shape"]), ByteRange(file, 8 + n + start,
                                                                                           end - start))
    return {name: (one(name), one(name + "_scale_inv")) for name in tensors}


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_the_kernel_is_torch_for_every_byte_nans_and_odd_blocks_included(tmp_path, dtype):
    """Every e4m3fn pattern (NaNs 0x7F and 0xFF too), scales that overflow float16 and make
    subnormals, non-square blocks, a scale in bfloat16, a tensor wider than 256 blocks, block-rows
    that straddle the pump's buffers; the pump and the interpreter agree."""
    g = torch.Generator().manual_seed(3)
    every = torch.arange(256, dtype=torch.uint8).repeat(40)[torch.randperm(10240, generator=g)]
    cases = {
        "a": (every[:300 * 30].reshape(300, 30), (128, 128), torch.float32, lambda s: s.float()),
        "b": (every[:130 * 77].reshape(130, 77), (64, 32), torch.float32, lambda s: s.float() * 1e5),
        "c": (every.reshape(40, 256), (7, 16), torch.bfloat16, lambda s: s.float() * 1e-30),
        "d": (torch.randint(0, 256, (3, 40000), generator=g, dtype=torch.uint8), (2, 128), torch.float32,
              lambda s: s.float()),
    }
    made, blocks = {}, {}
    for name, (bytes_, block, sdtype, scaled) in cases.items():
        w = bytes_.clone().view(torch.float8_e4m3fn)
        shape = (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
        made[name] = (w, scaled(torch.rand(shape, generator=g) + 0.01).to(sdtype))
        blocks[name] = block
    inputs = _fp8_file(tmp_path / "src.safetensors", made)
    tensors, offset = [], 0
    for name, (w_in, s_in) in inputs.items():
        nbytes = w_in.range.length * torch.finfo(TORCH[dtype]).bits // 8
        tensors.append(output_tensor(name, dtype, w_in.shape, offset, nbytes, (w_in, s_in),
                                     DequantFP8(*blocks[name], dtype)))
        offset += nbytes
    assert {t.transform for t in tensors} == {"dequant"}
    header = encode_header(((t.name, t.dtype, t.shape, t.offset, t.offset + t.nbytes) for t in tensors),
                           SHARD_METADATA)
    shard = Shard("model.safetensors", header, tuple(tensors))
    out = tmp_path / "model.safetensors"
    Pump(buffer_size=4096, direct=False, threads=2).run([(shard, out)])
    with safe_open(str(out), framework="pt") as f:
        for name, (w, s) in made.items():
            want = weight_dequant(w, s, blocks[name], TORCH[dtype])
            got = f.get_tensor(name)
            nan = torch.isnan(want)
            assert nan.any() and torch.equal(torch.isnan(got), nan), name
            assert bitwise(got, want), name  # NaNs too: the bits of torch's vectorized cast
    with Readers() as readers:
        again = b"".join(bytes(c) for t in tensors for c in tensor_chunks(t, readers.open))
    assert out.read_bytes() == header + again
    assert OPERATIONS["dequant"] is DequantFP8


# -- MXFP4 (GPT-OSS) -------------------------------------------------------------------------

MXFP4_QUANT = {"quant_method": "mxfp4",
               "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                          "lm_head"]}


@pytest.fixture(scope="module")
def mxfp4_model(tmp_path_factory) -> Path:
    """A tiny GPT-OSS (2 layers, 4 experts, hidden 64, intermediate 96) saved as GPT-OSS ships:
    each expert tensor ``P`` as ``P_blocks`` (random FP4 nibbles) and ``P_scales`` (exponents
    around 127), config quantization_config mxfp4."""
    folder = tmp_path_factory.mktemp("mxfp4") / "src"
    torch.manual_seed(0)
    config = GptOssConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_local_experts=4,
                          num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          vocab_size=128, max_position_embeddings=64, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention"])
    GptOssForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tensors = state(folder)
    g = torch.Generator().manual_seed(1)
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inner, outer = tensors.pop(key).shape
        tensors[key + "_blocks"] = torch.randint(0, 256, (experts, outer, inner // 32, 16), generator=g,
                                                 dtype=torch.uint8)
        tensors[key + "_scales"] = torch.randint(118, 128, (experts, outer, inner // 32), generator=g,
                                                 dtype=torch.uint8)
    for path in folder.glob("*.safetensors"):
        path.unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": MXFP4_QUANT}, indent=2))
    return folder


def test_mxfp4_experts_are_transformers_dequantization_bitwise(tmp_path, capsys, mxfp4_model):
    """Every tensor of the output equals transformers' own dequantization of the source
    (``Mxfp4Config(dequantize=True)`` on CPU) bit for bit, and the two models compute the same logits."""
    m = manifest(tmp_path, mxfp4_model)
    code, out, err = run(capsys, "plan", m)
    assert code == 0, err
    assert "dequantized: 4 MXFP4 -> BF16; 4 scale tensors left out" in out
    code, _, err = run(capsys, "apply", m, "--no-progress")
    assert code == 0, err
    got, source = state(tmp_path / "out"), state(mxfp4_model)
    for key in [k for k in source if k.endswith("_blocks")]:
        p = key[:-len("_blocks")]
        assert bitwise(got[p], convert_moe_packed_tensors(source[key], source[p + "_scales"])), p
    theirs = AutoModelForCausalLM.from_pretrained(mxfp4_model, quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.bfloat16)
    expected_state = theirs.state_dict()
    assert set(got) == set(expected_state)
    for key, t in expected_state.items():
        assert bitwise(got[key], t), key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    code, _, err = run(capsys, "verify", m, tmp_path / "out", "--no-progress")
    assert code == 0, err


def test_mxfp4_and_dus_and_what_cannot_be_dequantized(tmp_path, capsys, mxfp4_model):
    m = manifest(tmp_path, mxfp4_model, layers='plan = "explicit"\narrangement = [0, 1, 1]')
    code, _, err = run(capsys, "apply", m, "--no-progress")
    assert code == 0, err
    got, source = state(tmp_path / "out"), state(mxfp4_model)
    p = "model.layers.{}.mlp.experts.down_proj"
    for out_layer, layer in enumerate([0, 1, 1]):
        assert bitwise(got[p.format(out_layer)], convert_moe_packed_tensors(source[p.format(layer) + "_blocks"],
                                                                          source[p.format(layer) + "_scales"]))
    code, _, err = run(capsys, "verify", m, tmp_path / "out", "--no-progress")
    assert code == 0, err
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file({k: v for k, v in source.items() if k != p.format(1) + "_scales"}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    (broken / "config.json").write_text((mxfp4_model / "config.json").read_text())
    line = error_line(*run(capsys, "plan", manifest(tmp_path, broken, name="b.toml")))
    assert f"tensor '{p.format(1)}_blocks' is MXFP4 blocks but the source has no '{p.format(1)}_scales'" in line
    # a merge reads FP8 weights dequantized, not MXFP4 experts yet: one line, what to do
    merge = tmp_path / "merge.toml"
    merge.write_text(f'[sources.a]\nmodel = "{mxfp4_model}"\n[sources.b]\nmodel = "{mxfp4_model}"\n[merge]\n'
                     f'method = "linear"\n[merge.models.a]\nweight = 1\n[merge.models.b]\nweight = 1\n'
                     f'[output]\npath = "{tmp_path / "merged"}"\ndtype = "bfloat16"\n')
    line = error_line(*run(capsys, "plan", merge))
    assert "U8 is not a float dtype a merge computes with (F16, BF16, F32); dequantize the model first" in line, line


def test_verify_compares_dequantized_chunks_larger_than_its_buffer(tmp_path):
    """A dequantization's chunks (rows of 40,000 FP8 columns made float32; an MXFP4 expert's
    groups) are larger than the 2 MiB verify reads at once by default: compare_shard still
    compares them whole, and finds one flipped byte past the first 2 MiB."""
    g = torch.Generator().manual_seed(5)
    w = torch.randint(0, 126, (64, 40000), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    inputs = _fp8_file(tmp_path / "fp8.safetensors", {"w": (w, torch.rand(1, 313, generator=g))})["w"]
    blocks = torch.randint(0, 256, (1, 2880, 90, 16), generator=g, dtype=torch.uint8)
    save_file({"p_blocks": blocks, "p_scales": torch.full((1, 2880, 90), 127, dtype=torch.uint8)},
              str(tmp_path / "mx.safetensors"))
    raw = (tmp_path / "mx.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])

    def one(key: str) -> Input:
        start, end = header[key]["data_offsets"]
        return Input("s", key, "U8", tuple(header[key]["shape"]), ByteRange(LocalFile(tmp_path / "mx.safetensors"),
                                                                            8 + n + start, end - start))
    tensors = [output_tensor("w", "F32", w.shape, 0, w.numel() * 4, inputs, DequantFP8(128, 128, "F32")),
               output_tensor("p", "BF16", (1, 2880, 2880), w.numel() * 4, 2880 * 2880 * 2,
                             (one("p_blocks"), one("p_scales")), DequantMXFP4("BF16"))]
    shard = Shard("model.safetensors", encode_header(((t.name, t.dtype, t.shape, t.offset, t.offset + t.nbytes)
                                                      for t in tensors), SHARD_METADATA), tuple(tensors))
    out = tmp_path / "model.safetensors"
    Pump(direct=False, threads=2).run([(shard, out)])
    assert compare_shard(shard, out)[1] == []
    with safe_open(str(out), framework="pt") as f:
        assert bitwise(f.get_tensor("p"), convert_moe_packed_tensors(blocks, torch.full((1, 2880, 90), 127,
                                                                                        dtype=torch.uint8)))
    data = bytearray(out.read_bytes())
    data[len(shard.header) + tensors[1].offset + 3_000_001] ^= 1
    out.write_bytes(bytes(data))
    assert [d.where for d in compare_shard(shard, out)[1]] == ["p"]

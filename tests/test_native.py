"""Mistral's native layout (consolidated*.safetensors + params.json) -> Hugging Face names.

The native checkpoints are made here from the tiny Hugging Face Mistral fixtures, the inverse of
transformers' conversion script (keys renamed, q/k rows put back into Mistral's interleaved rotary
order), and written with the official safetensors writer. Converting them back must give the
Hugging Face tensors bit for bit; and an independent reference forward pass that uses Mistral's
own rotary convention (pairs of adjacent q/k values as complex numbers) on the native weights must
give the logits transformers' LlamaForCausalLM computes from our converted weights.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from reference import ARRANGEMENTS, load_source_state_dict, reference_state_dict
from synthetic import Dims, make_mistral
from tensorsurgery.cli import main
from tensorsurgery.errors import SourceError
from tensorsurgery.manifest.loading import manifest_from_text
from tensorsurgery.ops import PermuteRotary
from tensorsurgery.output.pump import Pump
from tensorsurgery.planning.planner import build_plan
from tensorsurgery.sources.local import load_checkpoint
from tensorsurgery.sources.native import config_from_params

# Hugging Face name -> native name, written out independently of tensorsurgery.families.rules.
_TO_NATIVE = (
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"layers.\1.attention.w\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
)


def _native_name(name: str) -> str:
    for pattern, template in _TO_NATIVE:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, template, name)
    raise AssertionError(f"no native name for {name}")


def _to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's half-split rotary rows -> Mistral's interleaved pairs (the inverse of
    ``permute_for_rope`` in transformers' conversion script)."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def make_native(hf_dir: Path, out: Path, shards: tuple[str, ...] = ("consolidated.safetensors",)) -> Path:
    """A native copy of the Hugging Face checkpoint ``hf_dir``: tensors split over ``shards``
    (layers dealt out in order), and params.json."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    native = {}
    for name, tensor in load_source_state_dict(hf_dir).items():
        if name.endswith("q_proj.weight"):
            tensor = _to_interleaved(tensor, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            tensor = _to_interleaved(tensor, cfg["num_key_value_heads"])
        native[_native_name(name)] = tensor
    out.mkdir(parents=True)
    n = cfg["num_hidden_layers"]
    for i, shard in enumerate(shards):
        part = {k: v for k, v in native.items()
                if (int(k.split(".")[1]) * len(shards) // n if k.startswith("layers.") else len(shards) - 1) == i}
        save_file(part, out / shard, metadata={"format": "pt"})
    params = {"dim": cfg["hidden_size"], "n_layers": n, "head_dim": cfg["head_dim"],
              "hidden_dim": cfg["intermediate_size"], "n_heads": cfg["num_attention_heads"],
              "n_kv_heads": cfg["num_key_value_heads"], "norm_eps": cfg["rms_norm_eps"],
              "sliding_window": cfg["sliding_window"], "vocab_size": cfg["vocab_size"],
              "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    (out / "params.json").write_text(json.dumps(params, indent=2))
    return out


@pytest.fixture(scope="session")
def tiny_native(tmp_path_factory, tiny_mistral) -> Path:
    """:func:`tiny_mistral` (32 layers, 2 heads, 1 KV head, head_dim 8) in the native layout."""
    return make_native(tiny_mistral, tmp_path_factory.mktemp("native") / "tiny")


@pytest.fixture(scope="session")
def odd_heads(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-layer Hugging Face Mistral whose head_dim is not dim / n_heads (4 x 6 = 24 q rows for a
    hidden size of 16), with 2 KV heads and rope_theta 1e6, and its native copy."""
    root = tmp_path_factory.mktemp("odd-heads")
    dims = Dims(vocab=96, hidden=16, intermediate=32, heads=4, kv_heads=2, head_dim=6, layers=4)
    hf = make_mistral(root / "hf", dims, seed=77, max_shard_size=10**9, tokenizer=False, rope_theta=1e6)
    return hf, make_native(hf, root / "native")


def apply(tmp_path: Path, source: Path, layers: str = 'plan = "keep"', preset: str | None = "mistral-to-llama",
          extra: str = "") -> Path:
    rename = f'[rename]\npreset = "{preset}"\n' if preset else ""
    manifest = tmp_path / "m.toml"
    manifest.write_text(f"[source]\nmodel = '{source}'\n{rename}[layers]\n{layers}\n"
                        f"[output]\npath = '{tmp_path / 'out'}'\n{extra}")
    assert main(["apply", str(manifest), "--no-progress"]) == 0
    assert main(["verify", str(manifest)]) == 0
    return tmp_path / "out"


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


# --- round trips ----------------------------------------------------------------------------------------------

def test_native_round_trips_bit_for_bit(tmp_path, tiny_native, tiny_mistral):
    out = apply(tmp_path, tiny_native)
    assert_same_tensors(load_source_state_dict(out), load_source_state_dict(tiny_mistral))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "rope_theta",
                                "max_position_embeddings", "tie_word_embeddings", "torch_dtype")} == {
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 32, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 8, "rms_norm_eps": 1e-5, "vocab_size": 96, "rope_theta": 10000.0,
        "max_position_embeddings": 32, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    assert "sliding_window" not in cfg


def test_native_without_preset_is_hf_mistral(tmp_path, odd_heads):
    """No preset: the native checkpoint becomes the MistralForCausalLM transformers' script writes."""
    hf, native = odd_heads
    out = apply(tmp_path, native, preset=None)
    assert_same_tensors(load_source_state_dict(out), load_source_state_dict(hf))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg["sliding_window"] == 32 and cfg["head_dim"] == 6
    from transformers import MistralForCausalLM
    tokens = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])
    with torch.no_grad():
        want = MistralForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(tokens).logits
        got = MistralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(tokens).logits
    assert torch.equal(got, want)


def test_sharded_native(tmp_path, tiny_mistral):
    native = make_native(tiny_mistral, tmp_path / "native",
                         shards=("consolidated.00.safetensors", "consolidated.01.safetensors"))
    assert sorted(load_checkpoint(native).headers) == ["consolidated.00.safetensors", "consolidated.01.safetensors"]
    out = apply(tmp_path, native)
    assert_same_tensors(load_source_state_dict(out), load_source_state_dict(tiny_mistral))


def test_dus_on_native_source(tmp_path, tiny_native, tiny_mistral):
    """Layers renamed, permuted, cast and stacked SOLAR-style in one pass."""
    out = apply(tmp_path, tiny_native, 'plan = "dus"\noverlap = 8', extra='dtype = "float16"\n')
    assert_same_tensors(load_source_state_dict(out),
                        reference_state_dict(tiny_mistral, ARRANGEMENTS["solar-dus"], torch.float16))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 48


# --- the independent reference: Mistral's own rotary convention -------------------------------------------------

def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotary(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Mistral/Meta reference rotary: adjacent pairs of a head are one complex number."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * cis[:, None, :]).flatten(-2)


def native_forward(w: dict[str, torch.Tensor], params: dict, tokens: list[int]) -> torch.Tensor:
    """Logits of a native Mistral checkpoint, computed the way mistral-inference does (no sliding
    window: the sequence is shorter than it)."""
    n, heads, kv, hd = len(tokens), params["n_heads"], params["n_kv_heads"], params["head_dim"]
    eps = params["norm_eps"]
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    angles = torch.outer(torch.arange(n).float(), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)
    mask = torch.full((n, n), float("-inf")).triu(1)
    h = w["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = _rms_norm(h, w[p + "attention_norm.weight"], eps)
        q = _rotary((x @ w[p + "attention.wq.weight"].T).view(n, heads, hd), cis)
        k = _rotary((x @ w[p + "attention.wk.weight"].T).view(n, kv, hd), cis)
        v = (x @ w[p + "attention.wv.weight"].T).view(n, kv, hd)
        k, v = k.repeat_interleave(heads // kv, dim=1), v.repeat_interleave(heads // kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, heads * hd)
        h = h + attn @ w[p + "attention.wo.weight"].T
        x = _rms_norm(h, w[p + "ffn_norm.weight"], eps)
        gate, up = x @ w[p + "feed_forward.w1.weight"].T, x @ w[p + "feed_forward.w3.weight"].T
        h = h + (F.silu(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    return _rms_norm(h, w["norm.weight"], eps) @ w["output.weight"].T


@pytest.mark.parametrize("fixture", ["odd_heads", "tiny_native"])
def test_llama_on_converted_weights_matches_native_reference(tmp_path, request, fixture):
    """transformers' LlamaForCausalLM on our output == Mistral's complex-number rotary on the input,
    including head_dim != dim / n_heads, grouped KV heads and a non-default rope_theta."""
    from transformers import LlamaForCausalLM
    native = request.getfixturevalue(fixture)
    native = native[1] if isinstance(native, tuple) else native
    params = json.loads((native / "params.json").read_text())
    with safe_open(native / "consolidated.safetensors", framework="pt") as f:
        weights = {k: f.get_tensor(k).float() for k in f.keys()}
    out = apply(tmp_path, native)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = [1, 17, 4, 60, 8, 33, 2, 91, 5, 12]
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0]
        want = native_forward(weights, params, tokens)
    assert got.abs().max() > 1  # not a degenerate model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the permutation matters: without it the logits differ
    weights["layers.0.attention.wq.weight"] = _to_interleaved(weights["layers.0.attention.wq.weight"],
                                                              params["n_heads"])
    assert not torch.allclose(native_forward(weights, params, tokens), want, atol=1e-3)


# --- streaming: one head at a time through small buffers ----------------------------------------------------------

def _synthetic_native(root: Path, dim=128, heads=4, kv=2, head_dim=48, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    shapes = {"tok_embeddings.weight": (50, dim), "norm.weight": (dim,), "output.weight": (50, dim),
              "layers.0.attention.wq.weight": (heads * head_dim, dim),
              "layers.0.attention.wk.weight": (kv * head_dim, dim),
              "layers.0.attention.wv.weight": (kv * head_dim, dim),
              "layers.0.attention.wo.weight": (dim, heads * head_dim),
              "layers.0.feed_forward.w1.weight": (64, dim), "layers.0.feed_forward.w2.weight": (dim, 64),
              "layers.0.feed_forward.w3.weight": (64, dim),
              "layers.0.attention_norm.weight": (dim,), "layers.0.ffn_norm.weight": (dim,)}
    tensors = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    root.mkdir()
    save_numpy(tensors, root / "consolidated.safetensors", metadata={"format": "pt"})
    (root / "params.json").write_text(json.dumps({
        "dim": dim, "n_layers": 1, "hidden_dim": 64, "n_heads": heads, "n_kv_heads": kv, "head_dim": head_dim,
        "vocab_size": 50, "norm_eps": 1e-5}))
    return tensors


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_permutation_streams_one_head_at_a_time(tmp_path, monkeypatch, dtype):
    tensors = _synthetic_native(tmp_path / "src")
    text = (f"[source]\nmodel = '{tmp_path / 'src'}'\n[rename]\npreset = 'mistral-to-llama'\n"
            f"[output]\npath = '{tmp_path / 'out'}'\n" + (f"dtype = '{dtype}'\n" if dtype else ""))
    plan = build_plan(manifest_from_text(text, tmp_path / "m.toml"), {"source": load_checkpoint(tmp_path / "src")})
    reads = []
    real_preadv = os.preadv

    def preadv(fd, buffers, offset):
        reads.append((offset, sum(len(memoryview(b)) for b in buffers)))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    (tmp_path / "out").mkdir()
    Pump(buffer_size=4096, direct=False).run((s, tmp_path / "out" / s.filename) for s in plan.shards)
    monkeypatch.undo()
    for t in plan.tensors:
        permute = t.op if isinstance(t.op, PermuteRotary) else None
        if permute:  # read one head at a time, never the whole tensor
            head = t.source.length // permute.heads
            sizes = [n for offset, n in reads if t.source.offset <= offset < t.source.offset + t.source.length]
            assert t.source.length > 4096 and sizes == [head] * permute.heads, t.name
    with safe_open(tmp_path / "out" / "model.safetensors", framework="np") as f:
        for name, heads in (("q", 4), ("k", 2)):
            native = tensors[f"layers.0.attention.w{name}.weight"]
            rows, cols = native.shape
            want = native.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)
            got = f.get_tensor(f"model.layers.0.self_attn.{name}_proj.weight")
            if dtype:
                want = torch.from_numpy(want).to(torch.float16).numpy()
            assert got.dtype == want.dtype and np.array_equal(got, want)


# --- params.json -> config.json -------------------------------------------------------------------------------

MISTRAL_7B_V01 = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
                  "n_kv_heads": 8, "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000}


def test_config_of_mistral_7b_params():
    """Mistral-7B-v0.1's params.json gives the fields of its Hugging Face config.json."""
    cfg = config_from_params(MISTRAL_7B_V01, Path("params.json"))
    assert cfg == {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "sliding_window": 4096, "max_position_embeddings": 32768, "vocab_size": 32000,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True}


def test_config_fields_as_transformers_script_reads_them():
    params = dict(MISTRAL_7B_V01, sliding_window="4096", max_seq_len=131072, rope_theta=1e6, head_dim=160)
    del params["n_kv_heads"]
    cfg = config_from_params(params, Path("params.json"))
    assert (cfg["sliding_window"], cfg["max_position_embeddings"], cfg["rope_theta"], cfg["head_dim"],
            cfg["num_key_value_heads"]) == (4096, 131072, 1e6, 160, 32)
    assert config_from_params(dict(MISTRAL_7B_V01, sliding_window=None), Path("p"))["sliding_window"] is None


@pytest.mark.parametrize("params, message", [
    ({"dim": 8}, "params.json: missing n_layers, hidden_dim, n_heads, vocab_size; a native Mistral checkpoint "
                 "needs them"),
    (dict(MISTRAL_7B_V01, n_heads=0), "params.json: n_heads must be a positive integer, found 0"),
    (dict(MISTRAL_7B_V01, dim="4096"), "params.json: dim must be a positive integer, found '4096'"),
    (dict(MISTRAL_7B_V01, sliding_window="wide"), "params.json: sliding_window must be an integer, found 'wide'"),
    (dict(MISTRAL_7B_V01, moe={"num_experts": 8}), "params.json: has 'moe': this is a mixture of experts "
                                                   "(Mixtral); only dense Mistral decoders are supported"),
])
def test_config_errors(params, message):
    with pytest.raises(SourceError) as excinfo:
        config_from_params(params, Path("params.json"))
    assert str(excinfo.value) == message


def test_config_follows_the_tensors(tmp_path):
    """vocab_size from the embedding when params.json lacks it; tied embeddings when there is no
    output.weight; torch_dtype from the weights."""
    tensors = _synthetic_native(tmp_path / "src", dtype=np.float16)
    params = json.loads((tmp_path / "src" / "params.json").read_text())
    del params["vocab_size"]
    (tmp_path / "src" / "params.json").write_text(json.dumps(params))
    del tensors["output.weight"]
    (tmp_path / "src" / "consolidated.safetensors").unlink()
    save_numpy(tensors, tmp_path / "src" / "consolidated.safetensors")
    ckpt = load_checkpoint(tmp_path / "src")
    assert ckpt.layout == "mistral"
    assert (ckpt.config["vocab_size"], ckpt.config["tie_word_embeddings"], ckpt.config["torch_dtype"]) == (
        50, True, "float16")


def test_head_dim_must_match_the_weights(tmp_path):
    _synthetic_native(tmp_path / "src")
    params = json.loads((tmp_path / "src" / "params.json").read_text())
    del params["head_dim"]  # 128 / 4 = 32, but the weights have heads of 48 rows
    (tmp_path / "src" / "params.json").write_text(json.dumps(params))
    with pytest.raises(SourceError) as excinfo:
        load_checkpoint(tmp_path / "src")
    assert str(excinfo.value) == (
        f"{tmp_path / 'src' / 'params.json'}: layers.0.attention.wk.weight has shape [96, 128] but n_kv_heads * "
        f"head_dim x dim is [64, 128] (n_kv_heads = 2, head_dim = 32); params.json does not describe these "
        f"weights (set head_dim if it differs from dim / n_heads)")


def test_native_checkpoint_needs_params_json(tmp_path, tiny_native):
    shutil.copytree(tiny_native, tmp_path / "src")
    (tmp_path / "src" / "params.json").unlink()
    with pytest.raises(SourceError) as excinfo:
        load_checkpoint(tmp_path / "src")
    assert str(excinfo.value) == (f"{tmp_path / 'src'}: has mistral weights but no params.json; a checkpoint "
                                  f"needs it next to its weights")

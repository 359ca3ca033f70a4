"""LoRA adapters merged into their source (issue 20): a tiny transformers Llama and adapters made
with peft's ``get_peft_model`` (``init_lora_weights=False``: B is not zero), saved in float32 and
bfloat16; every output tensor bitwise equal to peft's ``merge_and_unload()`` then
``save_pretrained``, at r = 8 and 64, rsLoRA, rank_pattern / alpha_pattern, an embedding LoRA,
modules_to_save, DoRA (r = 8, rsLoRA r = 16; its row norm's kernel against torch's), lora_bias,
fan_in_fan_out (GPT-2's Conv1D layers); the logits equal when loaded; an adapter + DUS in one
manifest; verify finds a flipped byte; 1 and 3 threads; the refusals (one line, exit 2, nothing
written)."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch_helpers import bitwise, state
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cli_helpers import error_line, run
from tensorsurgery.errors import ManifestError

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(folder: Path, dtype: str, **extra) -> Path:
    """A tiny Llama (3 layers, hidden 200, intermediate 136, 4 heads, 2 KV heads, vocab 320) in ``dtype``."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=200, intermediate_size=136, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, max_position_embeddings=64, tie_word_embeddings=False,
                         **extra)
    LlamaForCausalLM(config).to(DTYPES[dtype]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["F32", "BF16"])
def base(request, tmp_path_factory) -> Path:
    """The tiny Llama in F32 or BF16 (no biases)."""
    return tiny_llama(tmp_path_factory.mktemp("lora") / f"base-{request.param}", request.param)


@pytest.fixture(scope="module", params=["F32", "BF16"])
def biased_base(request, tmp_path_factory) -> Path:
    """The tiny Llama in F32 or BF16 with biases on every attention and MLP projection (random, not zero)."""
    folder = tiny_llama(tmp_path_factory.mktemp("lora") / f"biased-{request.param}", request.param,
                        attention_bias=True, mlp_bias=True)
    weights = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    for k, v in weights.items():
        if k.endswith(".bias"):
            weights[k] = torch.randn(v.shape, generator=g).to(v.dtype)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def make_adapter(folder: Path, base: Path, save_dtype: torch.dtype, **lora) -> Path:
    """A peft LoRA of ``base`` with random A and B, saved in ``save_dtype``; a DoRA's magnitudes
    (peft starts them at the rows' norms, a factor of 1) moved by up to 20%, as training does; a
    ``lora_bias``'s biases (peft starts them at 0) random."""
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * (torch.rand(p.shape) - 0.5))
            if "lora_B" in name and name.endswith(".bias"):
                p.copy_(torch.randn(p.shape))
    model.to(save_dtype).save_pretrained(folder)
    return folder


def peft_merged(base: Path, adapter: Path, out: Path) -> Path:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    model.save_pretrained(out)
    return out


def merged_as_peft(capsys, tmp_path: Path, base: Path, adapter: Path, m: Path) -> dict[str, torch.Tensor]:
    """Manifest ``m`` (output ``tmp_path/out``) applied: every output tensor bitwise what peft's
    ``merge_and_unload`` then ``save_pretrained`` make of ``adapter`` on ``base``; returns them."""
    reference = state(peft_merged(base, adapter, tmp_path / "ref"))
    code, _, err = run(capsys, "apply", m, "--no-progress")
    assert code == 0, err
    got = state(tmp_path / "out")
    assert set(got) == set(reference)
    assert [k for k in got if not bitwise(got[k], reference[k])] == []
    return got


def manifest(tmp_path: Path, base: Path, adapter: Path | str, *, layers: str = 'plan = "keep"',
             name: str = "m.toml") -> Path:
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
    "dora-r8": dict(r=8, lora_alpha=16, target_modules=ALL, use_dora=True),
    "dora-r16-rslora": dict(r=16, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                            use_dora=True, rank_pattern={"v_proj": 4}),
}


@pytest.mark.parametrize("save", ["F32", "BF16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_merge_is_peft_merge_and_unload_bitwise(tmp_path, capsys, base, case, save):
    adapter = make_adapter(tmp_path / "adapter", base, DTYPES[save], **CASES[case])
    got = merged_as_peft(capsys, tmp_path, base, adapter, manifest(tmp_path, base, adapter))
    changed = [k for k in got if not bitwise(got[k], load_file(str(base / "model.safetensors"))[k])]
    assert changed  # the adapter did something
    record = json.loads((tmp_path / "out" / "tensorsurgery.json").read_text())
    (entry,) = record["adapters"]
    assert [f["name"] for f in entry["files"]] == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(len(f["sha256"]) == 64 for f in entry["files"])
    if case.startswith("dora"):  # the magnitude is the fourth input, and the record says so
        t = record["tensors"]["model.layers.1.self_attn.q_proj.weight"]
        assert [i["source_key"] for i in t["inputs"]][1:] == [
            "base_model.model.model.layers.1.self_attn.q_proj." + k
            for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")]
        assert t["operation"]["dora"] is True
    if case == "patterns":
        assert entry["scalings"]["model.layers.1.self_attn.q_proj"] == 4.0
        assert entry["scalings"]["model.layers.0.mlp.up_proj"] == 16 / 12
        assert entry["scalings"]["model.layers.2.mlp.down_proj"] == 7 / 8
        assert record["tensors"]["model.layers.2.mlp.down_proj.weight"]["operation"]["scaling"] == 7 / 8


@pytest.mark.parametrize("case", ["r8", "dora-r8"])
def test_the_merged_model_computes_what_peft_computes(tmp_path, capsys, base, case):
    adapter = make_adapter(tmp_path / "adapter", base, torch.float32, **CASES[case])
    ref = peft_merged(base, adapter, tmp_path / "ref")
    code, _, err = run(capsys, "apply", manifest(tmp_path, base, adapter), "--no-progress")
    assert code == 0, err
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
        assert all(not keys for keys in info.values()), info  # nothing missing, unexpected or mismatched
        ours = model(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(ref)(ids).logits
    assert torch.equal(ours, theirs)
    code, _, err = run(capsys, "verify", manifest(tmp_path, base, adapter), tmp_path / "out", "--no-progress")
    assert code == 0, err


@pytest.mark.parametrize("case", ["r8", "dora-r8"])
def test_an_adapter_and_dus_in_one_manifest_and_verify_finds_a_flipped_byte(tmp_path, capsys, base, case):
    adapter = make_adapter(tmp_path / "adapter", base, torch.bfloat16, **CASES[case])
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
    assert_verify_finds_a_flipped_byte(capsys, m, out, "model.layers.2.self_attn.q_proj.weight", 51)


def assert_verify_finds_a_flipped_byte(capsys, m: Path, out: Path, key: str, at: int) -> None:
    """Flip one bit of byte ``at`` of tensor ``key`` in ``out``: verify, with the manifest and from
    the record alone, names the tensor and exits 1."""
    shard = next(p for p in sorted(out.glob("*.safetensors")) if key in safe_open(str(p), framework="pt").keys())
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start, _ = json.loads(raw[8:8 + n])[key]["data_offsets"]
    raw[8 + n + start + at] ^= 0x10
    shard.write_bytes(bytes(raw))
    code, text, _ = run(capsys, "verify", m, out, "--no-progress")
    assert code == 1 and key in text
    code, text, _ = run(capsys, "verify", out, "--no-progress")
    assert code == 1 and key in text


BIAS = dict(r=8, lora_alpha=16, lora_bias=True, target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 4})


@pytest.mark.parametrize("save", ["F32", "BF16"])
def test_lora_bias_is_peft_merge_and_unload_bitwise(tmp_path, capsys, biased_base, save):
    """lora_bias: lora_B's bias times the scaling added to the base layer's bias (and the weights
    merged as ever); every tensor bitwise peft's; the record holds the bias's two inputs; verify
    passes and finds a flipped byte of a merged bias."""
    adapter = make_adapter(tmp_path / "adapter", biased_base, DTYPES[save], **BIAS)
    assert any(k.endswith("lora_B.bias") for k in load_file(str(adapter / "adapter_model.safetensors")))
    m = manifest(tmp_path, biased_base, adapter)
    got = merged_as_peft(capsys, tmp_path, biased_base, adapter, m)
    out = tmp_path / "out"
    original = load_file(str(biased_base / "model.safetensors"))
    changed = {k for k in got if k.endswith(".bias") and not bitwise(got[k], original[k])}
    assert changed == {f"model.layers.{n}.{p}.bias" for n in range(3)
                       for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    record = json.loads((out / "tensorsurgery.json").read_text())
    t = record["tensors"]["model.layers.1.self_attn.v_proj.bias"]
    assert [i["source_key"] for i in t["inputs"]] == ["model.layers.1.self_attn.v_proj.bias",
                                                      "base_model.model.model.layers.1.self_attn.v_proj.lora_B.bias"]
    assert t["operation"]["scaling"] == 16 / 4
    assert run(capsys, "verify", m, out, "--no-progress")[0] == 0
    assert_verify_finds_a_flipped_byte(capsys, m, out, "model.layers.1.self_attn.v_proj.bias", 3)


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
    ("dora embedding", "module 'model.embed_tokens': DoRA on an embedding (its norm runs over the stored "
                       "tensor's columns) is not merged by tensorsurgery; merge it with peft's merge_and_unload"),
    ("dora fan_in_fan_out", "module 'model.layers.0.self_attn.o_proj': DoRA on a fan_in_fan_out layer (its norm"),
    ("dora no magnitude", "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has no "
                          "'lora_magnitude_vector'; the DoRA adapter file (use_dora) is incomplete"),
    ("dora magnitude shape", "module 'model.layers.0.self_attn.q_proj': its lora_magnitude_vector is F32 [100]; "
                             "DoRA needs one float per output row (200)"),
    ("magnitude without dora", "lora_magnitude_vector' is not merged by tensorsurgery"),
    ("no base tensor", "module 'model.layers.0.self_attn.nope' has no base tensor"),
    ("shape", "module 'model.layers.0.self_attn.q_proj': A [8, 100] and B [200, 8] (rank 8) do not fit its base "
              "tensor [200, 200]"),
    ("lora_bias, no base bias", "module 'model.layers.0.mlp.down_proj': the adapter has a lora_B bias "
                                "(lora_bias) but its base layer has no bias 'model.layers.0.mlp.down_proj.bias'; "
                                "peft cannot merge it either"),
    ("no folder", "not a peft adapter folder (it needs adapter_config.json and adapter_model.safetensors)"),
])
def test_what_cannot_be_merged_is_one_line_and_nothing_is_written(tmp_path, capsys, base, case, message):
    lora = dict(CASES["r8"])
    if case.startswith("dora") or case == "magnitude without dora":
        lora = dict(r=8, lora_alpha=16, use_dora=True,
                    target_modules=["embed_tokens", "q_proj"] if case == "dora embedding" else ["q_proj", "o_proj"])
    if case == "lora_bias, no base bias":
        lora = dict(BIAS)
    adapter = make_adapter(tmp_path / "adapter", base, torch.float32, **lora)
    m = Q + ".lora_magnitude_vector"
    if case == "not lora":
        _edit_adapter(adapter, config=lambda c: {**c, "peft_type": "IA3"})
    elif case == "dora fan_in_fan_out":  # q_proj and o_proj are square: only the DoRA is refused
        _edit_adapter(adapter, config=lambda c: {**c, "fan_in_fan_out": True})
    elif case == "dora no magnitude":
        _edit_adapter(adapter, tensors=lambda t: {k: v for k, v in t.items() if k != m})
    elif case == "dora magnitude shape":
        _edit_adapter(adapter, tensors=lambda t: {**t, m: t[m][:100].clone()})
    elif case == "magnitude without dora":
        _edit_adapter(adapter, config=lambda c: {**c, "use_dora": False})
    elif case == "dora embedding":
        pass
    elif case == "no base tensor":
        nope = Q.replace("q_proj", "nope")
        _edit_adapter(adapter, tensors=lambda t: {**t, nope + ".lora_A.weight": t[Q + ".lora_A.weight"].clone(),
                                                  nope + ".lora_B.weight": t[Q + ".lora_B.weight"].clone()})
    elif case == "shape":
        _edit_adapter(adapter, tensors=lambda t: {**t, Q + ".lora_A.weight": t[Q + ".lora_A.weight"][:, :100].clone()})
    elif case == "no folder":
        adapter = tmp_path / "missing"
    text = error_line(*run(capsys, "apply", manifest(tmp_path, base, adapter), "--no-progress"))
    assert message in text, text
    assert not (tmp_path / "out").exists()


def _with_revision(m: Path, revision: str) -> Path:
    """Manifest ``m`` with ``adapter_revision = REVISION`` after its adapter."""
    m.write_text(re.sub(r'(adapter = "[^"]*"\n)', rf'\1adapter_revision = "{revision}"\n', m.read_text()))
    return m


def test_base_plus_adapter_is_a_source_with_an_adapter(tmp_path):
    from tensorsurgery.manifest.loading import manifest_from_text
    m = manifest_from_text("merge_method: passthrough\nslices:\n  - sources:\n      - model: org/base@v1+./my-lora\n"
                           "        layer_range: [0, 2]\n  - sources:\n      - model: org/base@v1\n"
                           "        layer_range: [1, 2]\n", tmp_path / "m.yaml")
    assert [(s.model, s.revision, s.adapter) for s in m.sources] == [("org/base", "v1", "./my-lora"),
                                                                     ("org/base", "v1", None)]
    t = manifest_from_text('[sources.a]\nmodel = "m"\nadapter = "lora"\n[layers]\nplan = "keep"\n'
                           '[output]\npath = "out/x"\n', tmp_path / "m.toml")
    assert t.sources[0].adapter == "lora"
    # an adapter's Hub revision: ADAPTER@REVISION after the +, as mergekit reads it; adapter_revision in TOML
    m = manifest_from_text("merge_method: passthrough\nslices:\n  - sources:\n      - model: org/base+org/lora@v2\n"
                           "        layer_range: [0, 2]\n", tmp_path / "m.yaml")
    assert [(s.model, s.revision, s.adapter, s.adapter_revision) for s in m.sources] == [
        ("org/base", None, "org/lora", "v2")]
    t = manifest_from_text('[sources.a]\nmodel = "m"\nadapter = "org/lora"\nadapter_revision = "v2"\n'
                           '[layers]\nplan = "keep"\n[output]\npath = "out/x"\n', tmp_path / "m.toml")
    assert (t.sources[0].adapter, t.sources[0].adapter_revision) == ("org/lora", "v2")
    with pytest.raises(ManifestError, match="adapter_revision: is set without an adapter"):
        manifest_from_text('[sources.a]\nmodel = "m"\nadapter_revision = "v2"\n[layers]\nplan = "keep"\n'
                           '[output]\npath = "out/x"\n', tmp_path / "m.toml")


def test_dora_row_norms_are_torchs_bit_for_bit():
    """The kernel of DoRA's norm against torch.linalg.norm(dim=1) on float32 rows of every
    length up to 40 (every tail of the 8 lanes), and of 136 .. 40,000 columns, over magnitudes
    from 1e-4 to 1e4: 0 rows differ (one torch thread, as peft's merge is run in the tests)."""
    import numpy as np

    from tensorsurgery.ops.lora import row_norms

    g = torch.Generator().manual_seed(5)
    for cols in [*range(1, 41), 136, 200, 203, 1031, 4096, 4099, 11008, 40000]:
        x = torch.randn(1000 if cols < 2000 else 40, cols, generator=g)
        x *= torch.exp(torch.randn(x.shape[0], 1, generator=g) * 3)
        ours = row_norms(np.ascontiguousarray(x.numpy()))
        assert np.array_equal(ours.view(np.int32), torch.linalg.norm(x, dim=1).numpy().view(np.int32)), cols


def test_a_dora_merge_is_the_same_bytes_on_1_and_3_threads(tmp_path, capsys, base):
    """The writer spreads a DoRA tensor's row ranges over its threads; each row's norm and each
    product's 128-row window are the same whoever makes it."""
    adapter = make_adapter(tmp_path / "adapter", base, torch.bfloat16, **CASES["dora-r8"])
    outs = []
    for threads in ("1", "3"):
        out = tmp_path / f"out{threads}"
        m = manifest(tmp_path, base, adapter, name=f"m{threads}.toml")
        assert run(capsys, "apply", m, "--output", out, "--threads", threads, "--no-progress")[0] == 0
        outs.append(state(out))
    assert set(outs[0]) == set(outs[1]) and all(bitwise(outs[0][k], outs[1][k]) for k in outs[0])


def test_an_adapter_from_the_hub_cache_is_the_local_folders_merge(tmp_path, capsys, monkeypatch, base):
    """``adapter = "org/name"`` (no such local folder): the peft files from the Hugging Face cache,
    offline; the bytes those of the same adapter given as a folder, the record naming the repo and
    its commit, verify passing. A repo id the cache lacks: one line, exit 2, nothing written."""
    import json

    from huggingface_hub import constants
    from test_hub import add_to_cache

    from tensorsurgery.sources.checkpoint import RECORD_NAME

    adapter = make_adapter(tmp_path / "adapter", base, torch.float32, **CASES["r8"])
    (tmp_path / "local").mkdir()
    assert run(capsys, "apply", manifest(tmp_path / "local", base, adapter), "--no-progress")[0] == 0
    hub_cache = tmp_path / "hf_home" / "hub"
    hub_cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = "c" * 40
    add_to_cache(hub_cache, "someone/tiny-lora", commit,
                 {name: (adapter / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")})
    monkeypatch.chdir(tmp_path)  # "someone/tiny-lora" is no folder here
    code, _, err = run(capsys, "apply", manifest(tmp_path, base, "someone/tiny-lora"), "--no-progress")
    assert code == 0, err
    assert state(tmp_path / "out").keys() == state(tmp_path / "local" / "out").keys()
    assert all(bitwise(v, state(tmp_path / "local" / "out")[k]) for k, v in state(tmp_path / "out").items())
    record = json.loads((tmp_path / "out" / RECORD_NAME).read_text())
    [entry] = record["adapters"]
    assert (entry["repo_id"], entry["revision"]) == ("someone/tiny-lora", commit)
    code, out, err = run(capsys, "verify", tmp_path / "out", "--no-progress")
    assert code == 0, out + err

    text = error_line(*run(capsys, "apply", manifest(tmp_path, base, "someone/absent", name="absent.toml"),
                           "--output", tmp_path / "absent", "--no-progress"))
    assert "sources.base: adapter someone/absent@main: not in the Hugging Face cache" in text, text
    assert not (tmp_path / "absent").exists()

    # another adapter at the tag v2 of the same repo: adapter_revision picks it, main stays the first
    other = make_adapter(tmp_path / "other", base, torch.bfloat16, **CASES["r64-rslora"])
    add_to_cache(hub_cache, "someone/tiny-lora", "d" * 40,
                 {name: (other / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")},
                 ref="v2")
    reference = state(peft_merged(base, other, tmp_path / "ref-v2"))
    m = _with_revision(manifest(tmp_path, base, "someone/tiny-lora", name="v2.toml"), "v2")
    code, _, err = run(capsys, "apply", m, "--output", tmp_path / "v2", "--no-progress")
    assert code == 0, err
    got = state(tmp_path / "v2")
    assert got.keys() == reference.keys() and all(bitwise(v, reference[k]) for k, v in got.items())
    [entry] = json.loads((tmp_path / "v2" / RECORD_NAME).read_text())["adapters"]
    assert (entry["repo_id"], entry["revision"]) == ("someone/tiny-lora", "d" * 40)
    assert run(capsys, "verify", m, tmp_path / "v2", "--no-progress")[0] == 0
    text = error_line(*run(capsys, "apply", _with_revision(manifest(tmp_path, base, adapter, name="rev.toml"), "v2"),
                           "--output", tmp_path / "local-rev", "--no-progress"))
    assert "is a local folder, and adapter_revision 'v2' is for a Hub repo id" in text, text


@pytest.mark.parametrize("save", ["F32", "BF16"])
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_fan_in_fan_out_is_peft_merge_and_unload_bitwise(tmp_path, capsys, dtype, save):
    """fan_in_fan_out: GPT-2's Conv1D layers store W as [in, out], so the delta is ``(B @ A).T``;
    every tensor of a tiny GPT-2 (tied embeddings) bitwise peft's merge, and exactly the adapted
    layers change."""
    torch.manual_seed(0)
    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32)) \
        .to(DTYPES[dtype]).save_pretrained(base)
    adapter = make_adapter(tmp_path / "adapter", base, DTYPES[save], r=8, lora_alpha=16, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_proj", "c_fc"])
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    got = merged_as_peft(capsys, tmp_path, base, adapter, manifest(tmp_path, base, adapter))
    original = load_file(str(base / "model.safetensors"))
    changed = {k for k in got if not bitwise(got[k], original[k])}
    assert changed == {f"transformer.h.{n}.{p}.weight" for n in range(2)
                       for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}

"""tests/family_models.py is sound, checked without tensorsurgery: the tiny checkpoints look like the
real ones, and the reference surgery computes what transformers computes (keep = the original model
exactly; DUS / iDUS = a model assembled module by module from the loaded source)."""
from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from family_models import (  # noqa: E402 - after the importorskips
    FAMILIES,
    NotExpressible,
    build,
    dus,
    family_of,
    hub_style_config,
    idus,
    keep,
    layer_prefix,
    load_output,
    logits_of,
    model_class,
    model_inputs,
    read_tensors,
    rebuild_model,
    reference_surgery,
    relabel_deepseek_v3_to_glm4_moe_lite,
    relabel_phi3_to_llama,
    relabel_qwen2_to_llama,
    rewrite_config,
    split_layers,
    write_checkpoint,
)

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("quiet_transformers")]

NAMES = list(FAMILIES)




@pytest.fixture(scope="session")
def family_src(tmp_path_factory):
    """``family_src(name, **build_kwargs)``: the tiny checkpoint (built once per session per kwargs;
    the seed depends on the name only, so build options that do not change the weights keep them)."""
    cache: dict[tuple, Path] = {}

    def get(name: str, **kwargs) -> Path:
        key = (name, json.dumps(kwargs, sort_keys=True))
        if key not in cache:
            folder = tmp_path_factory.mktemp(name) / "src"
            cache[key] = build(name, folder, seed=zlib.crc32(name.encode()) % 1000, **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def original(family_src):
    """``original(name)``: the source loaded by transformers' from_pretrained (float32, eager)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_output(family_src(name))
        return cache[name]

    return get


def _n(name: str) -> int:
    return FAMILIES[name].default_layers


def _arrangements(name: str) -> dict[str, list[int]]:
    n = _n(name)
    m = 1 if n == 4 else 2
    return {"dus": dus(n, m), "idus1": idus(n, m, 1)}


# --- the builder ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_build_layout(name, family_src):
    fam = FAMILIES[name]
    src = family_src(name)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == fam.model_type and cfg["architectures"] == [fam.architecture]
    assert family_of(src) == name
    text = cfg[fam.text_config] if fam.text_config else cfg
    assert text[fam.num_layers_key] == fam.default_layers
    assert (src / "generation_config.json").exists()

    index = json.loads((src / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2
    assert files == sorted(p.name for p in src.glob("*.safetensors"))
    tensors = read_tensors(src)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())

    prefix = layer_prefix(name, tensors)
    layers, rest = split_layers(tensors, prefix)
    extra = cfg.get(fam.extra_layers_key, 0) if fam.extra_layers_key else 0
    assert sorted(layers) == list(range(fam.default_layers + extra))
    dtypes = {str(t.dtype) for t in tensors.values()}
    if name == "deepseek_v3":  # router weight and bias kept in float32 (_keep_in_fp32_modules_strict)
        assert dtypes == {"torch.bfloat16", "torch.float32"}
        assert {k for k, t in tensors.items() if t.dtype == torch.float32} == {
            k for k in tensors if re.search(r"\.mlp\.gate\.(weight|e_score_correction_bias)$", k)}
    else:
        assert dtypes == {"torch.bfloat16"}
    lm_head = any(k == "lm_head.weight" or k.endswith(".lm_head.weight") for k in tensors)
    assert lm_head == (not text.get("tie_word_embeddings", cfg.get("tie_word_embeddings")))
    if name == "qwen3_next":
        assert any(k.startswith("mtp.layers.0.") for k in rest) and cfg["mtp_num_hidden_layers"] == 1
    if name in VISION_LAYERS:  # the vision tower has layers of its own, not decoder layers
        assert any(re.match(VISION_LAYERS[name] + r"\.1\.", k) for k in rest)


#: Where each multimodal family's vision tower keeps its own layers (as saved by transformers 5.24).
VISION_LAYERS = {"gemma3": r"vision_tower\.encoder\.layers", "mistral3": r"vision_tower\.transformer\.layers",
                 "qwen2_5_vl": r"visual\.blocks", "llama4": r"vision_model\.model\.layers"}


def test_build_is_deterministic(tmp_path):
    a = build("qwen3_moe", tmp_path / "a", seed=5)
    b = build("qwen3_moe", tmp_path / "b", seed=5)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = read_tensors(build("qwen3_moe", tmp_path / "c", seed=6))
    assert not torch.equal(c["model.embed_tokens.weight"], read_tensors(a)["model.embed_tokens.weight"])


# --- keep: the reference is the original model -----------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_keep_reference_equals_the_original(name, family_src, original):
    src = family_src(name)
    ref = reference_surgery(src, keep(_n(name)))
    expected = json.loads((src / "config.json").read_text())
    if name == "llama4":  # the written moe_layers decides alone (Maverick's interleave_moe_layer_step 2 goes)
        expected["text_config"]["interleave_moe_layer_step"] = 1
    assert ref.config == expected
    source = read_tensors(src)
    assert ref.state_dict.keys() == source.keys()
    assert all(torch.equal(ref.state_dict[k], source[k]) and ref.state_dict[k].dtype == source[k].dtype
               for k in source)
    got = original(name)
    assert not got.missing_keys and not got.mismatched_keys
    assert got.unexpected_keys == ref.unexpected_on_load()
    assert torch.equal(ref.logits, got.logits)


# --- DUS / iDUS: the reference equals a model assembled module by module ----------------------------------

def _decoder_layers(model):
    """(in-memory prefix, ModuleList) of the text decoder layers of a loaded model."""
    dec = model.get_decoder()
    if not hasattr(dec, "layers") and hasattr(dec, "model"):  # Llama 4 (5.24): the ForCausalLM wrapper
        dec = dec.model
    layers = getattr(dec, "layers", None)
    if layers is None:
        layers = dec.h
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return prefix, layers


def _hand_built(loaded_model, config: dict, arrangement: list[int]):
    """A model of ``config`` whose layer i is a copy of ``loaded_model``'s layer ``arrangement[i]``,
    copied through module state dicts (in-memory names: no checkpoint naming involved)."""
    cls = model_class(config["architectures"][0])
    conf = cls.config_class.from_dict(config)
    model = cls._from_config(conf, dtype=torch.float32, attn_implementation="eager")
    prefix, _ = _decoder_layers(loaded_model)
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)$")
    src_state = loaded_model.state_dict()
    state = {}
    for key, t in src_state.items():
        if not pattern.match(key):
            state[key] = t
    for i, s in enumerate(arrangement):
        for key, t in src_state.items():
            m = pattern.match(key)
            if m and int(m.group(1)) == s:
                state[f"{prefix}.{i}.{m.group(2)}"] = t
    model.load_state_dict(state, strict=True)
    return model.eval()


#: Families whose layers differ from each other (per-layer config lists, dense/MoE, linear/full):
#: also checked with iDUS (one layer of each copy in turn).
PER_LAYER = ["qwen3_moe", "qwen3_next", "deepseek_v3", "gpt_oss", "gemma2", "gemma3_text", "gemma3", "smollm3",
             "llama4"]
CASES = [(name, "dus") for name in NAMES] + [(name, "idus1") for name in PER_LAYER]


@pytest.mark.parametrize("name, kind", CASES)
def test_arranged_reference_equals_the_hand_built_model(name, kind, family_src, original, tmp_path):
    src = family_src(name)
    arrangement = _arrangements(name)[kind]
    ref = reference_surgery(src, arrangement)
    fam = FAMILIES[name]
    text = ref.config[fam.text_config] if fam.text_config else ref.config
    assert text[fam.num_layers_key] == len(arrangement)

    hand = _hand_built(original(name).model, ref.config, arrangement)
    assert torch.equal(logits_of(hand, ref.inputs), ref.logits)
    assert not torch.equal(ref.logits, original(name).logits)  # the arrangement changes the function

    # The reference's tensors, written as a checkpoint, load in transformers to the same logits.
    out = write_checkpoint(tmp_path / "out", ref.config, ref.state_dict)
    got = load_output(out)
    assert not got.missing_keys and not got.mismatched_keys
    assert got.unexpected_keys == ref.unexpected_on_load()
    assert torch.equal(got.logits, ref.logits)


@pytest.mark.parametrize("name", list(VISION_LAYERS))
def test_vision_tower_is_not_rearranged(family_src, name):
    src = family_src(name)
    ref = reference_surgery(src, _arrangements(name)["dus"], build_model=False)
    source = read_tensors(src)
    prefix = layer_prefix(name, source)
    vision = {k for k in source if re.match(VISION_LAYERS[name], k)}
    assert vision and all(torch.equal(ref.state_dict[k], source[k]) for k in vision)
    assert {k for k in ref.state_dict if not k.startswith(prefix + ".")} == {k for k in source
                                                                          if not k.startswith(prefix + ".")}
    assert ref.config["vision_config"] == json.loads((src / "config.json").read_text())["vision_config"]


# --- config rewriting, spelled out ------------------------------------------------------------------------

F, S, L = "full_attention", "sliding_attention", "linear_attention"


def test_gemma3_sliding_pattern_follows_the_layers(family_src):
    src = family_src("gemma3_text")
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["layer_types"] == [S, S, S, S, S, F, S, S] and cfg["sliding_window_pattern"] == 6
    out = rewrite_config(cfg, "gemma3_text", dus(8, 2))
    assert out["layer_types"] == [S, S, S, S, S, F, S, S, S, F, S, S]
    assert "sliding_window_pattern" not in out and "_sliding_window_pattern" not in out  # no longer true
    mm = json.loads((family_src("gemma3") / "config.json").read_text())
    out = rewrite_config(mm, "gemma3", dus(8, 2))
    assert out["text_config"]["num_hidden_layers"] == 12 and "num_hidden_layers" not in out
    assert out["text_config"]["layer_types"] == [S, S, S, S, S, F, S, S, S, F, S, S]
    assert out["vision_config"]["num_hidden_layers"] == 2


def test_qwen2_sliding_layers_and_max_window_layers(family_src):
    src = family_src("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["layer_types"] == [F, F, S, S]
    out = rewrite_config(cfg, "qwen2", idus(4, 1, 1))  # 0 1 1 2 2 3
    assert out["layer_types"] == [F, F, F, S, S, S] and out["max_window_layers"] == 3  # still a prefix
    out = rewrite_config(cfg, "qwen2", [0, 2, 1, 3])
    assert out["layer_types"] == [F, S, F, S] and "max_window_layers" not in out  # not a prefix any more
    ref = reference_surgery(src, [0, 2, 1, 3])  # transformers honours the explicit list
    got = load_output(write_checkpoint(src.parent / "out", ref.config, ref.state_dict))
    assert torch.equal(got.logits, ref.logits)
    assert [layer.self_attn.sliding_window for layer in got.model.model.layers] == [None, 8, None, 8]


def test_qwen3_moe_dense_layers(family_src):
    cfg = json.loads((family_src("qwen3_moe") / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [0, 3] and cfg["decoder_sparse_step"] == 1
    sparse = [i not in (0, 3) for i in range(6)]
    out = rewrite_config(cfg, "qwen3_moe", dus(6, 2), sparse)  # 0 1 2 3 2 3 4 5
    assert out["mlp_only_layers"] == [0, 3, 5] and out["decoder_sparse_step"] == 1
    src = family_src("qwen3_moe", decoder_sparse_step=2, mlp_only_layers=[])  # MoE on odd layers 1, 3, 5
    ref = reference_surgery(src, [1, 0, 3, 2])
    assert ref.config["mlp_only_layers"] == [1, 3] and ref.config["decoder_sparse_step"] == 1


def test_deepseek_dense_after_moe_is_not_expressible(family_src):
    src = family_src("deepseek_v3", first_k_dense_replace=2)
    cfg = json.loads((src / "config.json").read_text())
    sparse = [False, False, True, True]
    assert rewrite_config(cfg, "deepseek_v3", idus(4, 1, 1), sparse)["first_k_dense_replace"] == 3  # 0 1 1 2..
    with pytest.raises(NotExpressible, match="first_k_dense_replace"):
        rewrite_config(cfg, "deepseek_v3", dus(4, 1), sparse)  # 0 1 2 1 2 3: dense layer 1 after MoE layer 2
    # Glm4MoeLite (same code, per-layer mlp_layer_types) expresses it.
    ref = reference_surgery(src, keep(4), mtp="drop")
    tensors = read_tensors(src)
    layers, rest = split_layers(tensors, "model.layers")
    arranged = {k: v for k, v in rest.items()}
    arr = dus(4, 1)
    for i, s in enumerate(arr):
        arranged.update({f"model.layers.{i}.{suffix}": t for suffix, t in layers[s].items()})
    cfg_arr = dict(cfg, num_hidden_layers=len(arr), first_k_dense_replace=0)
    glm_cfg, glm_tensors = relabel_deepseek_v3_to_glm4_moe_lite(cfg_arr, arranged)
    assert glm_cfg["mlp_layer_types"] == ["dense", "dense", "sparse", "dense", "sparse", "sparse"]
    model = rebuild_model("deepseek_v3", glm_cfg, glm_tensors)
    assert type(model).__name__ == "Glm4MoeLiteForCausalLM"
    # At keep, the relabelled model computes exactly DeepSeek-V3's logits.
    keep_cfg, keep_tensors = relabel_deepseek_v3_to_glm4_moe_lite(
        cfg, {k: v for k, v in tensors.items() if not k.startswith("model.layers.4.")})
    assert torch.equal(logits_of(rebuild_model("deepseek_v3", keep_cfg, keep_tensors), ref.inputs), ref.logits)


def test_smollm3_no_rope_layers_follow(family_src):
    cfg = json.loads((family_src("smollm3") / "config.json").read_text())
    assert cfg["no_rope_layers"] == [1, 1, 1, 0, 1, 1, 1, 0] and cfg["no_rope_layer_interval"] == 4
    out = rewrite_config(cfg, "smollm3", dus(8, 2))  # 0..5, 2..7
    assert out["no_rope_layers"] == [1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0]
    assert out["no_rope_layer_interval"] == 4  # the pattern still holds
    out = rewrite_config(cfg, "smollm3", dus(8, 1))  # 0..6, 1..7
    assert out["no_rope_layers"] == [1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0]
    assert "no_rope_layer_interval" not in out


def test_gpt2_layer_index_scaled_attention_is_not_expressible(family_src):
    cfg = json.loads((family_src("gpt2") / "config.json").read_text())
    cfg["scale_attn_by_inverse_layer_idx"] = True
    assert rewrite_config(cfg, "gpt2", keep(4))["n_layer"] == 4
    with pytest.raises(NotExpressible):
        rewrite_config(cfg, "gpt2", dus(4, 1))


def test_dtype_cast(family_src, tmp_path):
    src = family_src("deepseek_v3")
    ref = reference_surgery(src, dus(4, 1), dtype="float16", keep_dtype=r"\.mlp\.gate\.")
    assert ref.config["dtype"] == "float16"
    assert {k for k, t in ref.state_dict.items() if t.dtype == torch.float32} == {
        k for k in ref.state_dict if ".mlp.gate." in k}
    assert {t.dtype for k, t in ref.state_dict.items() if ".mlp.gate." not in k} == {torch.float16}
    got = load_output(write_checkpoint(tmp_path / "out", ref.config, ref.state_dict))
    assert torch.equal(got.logits, ref.logits)
    mm = reference_surgery(family_src("gemma3"), keep(8), dtype="float16", build_model=False)
    assert mm.config["dtype"] == mm.config["text_config"]["dtype"] == mm.config["vision_config"]["dtype"] == "float16"


# --- Hub spellings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_hub_style_config_is_the_same_model(name, family_src, original):
    src = family_src(name, hub_config=True)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg == hub_style_config(name, json.loads((family_src(name) / "config.json").read_text()))
    got = load_output(src)
    assert torch.equal(got.logits, original(name).logits)
    arrangement = _arrangements(name)["dus"]
    hub_ref = reference_surgery(src, arrangement)
    assert torch.equal(hub_ref.logits, reference_surgery(family_src(name), arrangement).logits)


def test_sparse_gemma3_text_config_uses_class_defaults(family_src):
    """google/gemma-3-4b-it's text_config lists only a few fields (no layer_types, no
    sliding_window_pattern): the per-layer list comes from Gemma3TextConfig's default pattern 6."""
    src = family_src("gemma3", hub_config=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"].pop("sliding_window_pattern")
    assert "layer_types" not in cfg["text_config"]
    out = rewrite_config(cfg, "gemma3", dus(8, 2))
    assert out["text_config"]["layer_types"] == [S, S, S, S, S, F, S, S, S, F, S, S]
    assert "sliding_window_pattern" not in out["text_config"]
    assert rewrite_config(cfg, "gemma3", keep(8))["text_config"]["layer_types"] == [S, S, S, S, S, F, S, S]


def test_gemma3_new_names_and_gpt2_bare_names(family_src, original, tmp_path):
    src = family_src("gemma3")
    cfg = json.loads((src / "config.json").read_text())
    renamed = {}
    for k, v in read_tensors(src).items():  # as saved from a model loaded from model.language_model.* names
        k = "model." + k.replace("language_model.model.", "language_model.", 1) if not k.startswith("lm_head") else k
        renamed[k] = v
    folder = write_checkpoint(tmp_path / "g3", cfg, renamed)
    assert layer_prefix("gemma3", renamed) == "model.language_model.layers"
    assert torch.equal(load_output(folder).logits, original("gemma3").logits)
    assert torch.equal(reference_surgery(folder, dus(8, 2)).logits, reference_surgery(src, dus(8, 2)).logits)

    src = family_src("gpt2")
    cfg = json.loads((src / "config.json").read_text())
    n_pos = cfg["n_positions"]
    bare = {k.removeprefix("transformer."): v for k, v in read_tensors(src).items()}
    for i in range(4):  # openai-community/gpt2 style: GPT2Model names and the causal-mask buffers
        bare[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos).bfloat16()
    folder = write_checkpoint(tmp_path / "gpt2", cfg, bare)
    got = load_output(folder)
    assert not got.missing_keys and not got.unexpected_keys  # attn.bias is on GPT-2's ignore list
    assert torch.equal(got.logits, original("gpt2").logits)
    ref = reference_surgery(folder, dus(4, 1))
    assert "h.5.attn.bias" in ref.state_dict
    assert torch.equal(ref.logits, reference_surgery(src, dus(4, 1)).logits)


# --- MTP ------------------------------------------------------------------------------------------------------

def test_deepseek_mtp_layer_follows_the_last_layer(family_src, original):
    src = family_src("deepseek_v3")
    source = read_tensors(src)
    mtp_suffixes = {k[len("model.layers.4."):] for k in source if k.startswith("model.layers.4.")}
    assert {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
            "shared_head.head.weight", "embed_tokens.weight"} <= mtp_suffixes
    assert any(s.startswith("mlp.experts.") for s in mtp_suffixes)
    # transformers 5.24 ignores only model.layers.61.* (the real model's MTP index): reported unexpected.
    assert {k.split(".")[2] for k in original("deepseek_v3").unexpected_keys} == {"4"}

    ref = reference_surgery(src, dus(4, 1), build_model=False)
    assert ref.extra_keys == {f"model.layers.6.{s}" for s in mtp_suffixes}
    assert all(torch.equal(ref.state_dict[f"model.layers.6.{s}"], source[f"model.layers.4.{s}"]) for s in mtp_suffixes)
    assert ref.config["num_nextn_predict_layers"] == 1
    dropped = reference_surgery(src, dus(4, 1), mtp="drop", build_model=False)
    assert not dropped.extra_keys and not any(k.startswith("model.layers.6.") for k in dropped.state_dict)


def test_qwen3_next_mtp_is_copied_and_silently_ignored(family_src, original):
    src = family_src("qwen3_next")
    ref = reference_surgery(src, dus(4, 1), build_model=False)
    assert ref.extra_keys == {k for k in read_tensors(src) if k.startswith("mtp.")} != set()
    assert not original("qwen3_next").unexpected_keys


# --- relabels ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hub_config", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen2_as_llama_is_exact(family_src, dtype, hub_config):
    src = family_src("qwen2", hub_config=hub_config)
    cfg, tensors = json.loads((src / "config.json").read_text()), read_tensors(src)
    llama_cfg, llama_tensors = relabel_qwen2_to_llama(cfg, tensors)
    assert llama_cfg["attention_bias"] is True
    assert all(not t.any() for k, t in llama_tensors.items() if k.endswith("o_proj.bias"))
    qwen = rebuild_model("qwen2", cfg, tensors, compute_dtype=dtype)
    llama = rebuild_model("llama3", llama_cfg, llama_tensors, compute_dtype=dtype)
    assert type(llama).__name__ == "LlamaForCausalLM"
    inputs = model_inputs(cfg)
    assert torch.equal(logits_of(llama, inputs), logits_of(qwen, inputs))


@pytest.mark.parametrize("hub_config", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_phi3_as_llama_is_exact(family_src, dtype, hub_config):
    src = family_src("phi3", hub_config=hub_config)
    cfg, tensors = json.loads((src / "config.json").read_text()), read_tensors(src)
    llama_cfg, llama_tensors = relabel_phi3_to_llama(cfg, tensors)
    if hub_config:  # transformers 4 spelling: longrope in rope_scaling, original_max_position_embeddings on top
        assert llama_cfg["rope_scaling"]["type"] == "longrope" and "original_max_position_embeddings" in llama_cfg
    else:
        assert llama_cfg["rope_parameters"]["rope_type"] == "longrope"
    phi = rebuild_model("phi3", cfg, tensors, compute_dtype=dtype)
    llama = rebuild_model("llama3", llama_cfg, llama_tensors, compute_dtype=dtype)
    inputs = model_inputs(cfg)  # 24 tokens: short factors, inside the sliding window
    assert torch.equal(logits_of(llama, inputs), logits_of(phi, inputs))
    long_inputs = model_inputs(cfg, seq_len=80)  # > original_max_position_embeddings (64): long factors
    assert torch.equal(logits_of(llama, long_inputs), logits_of(phi, long_inputs))


def test_relabels_refuse_what_llama_cannot_compute(family_src):
    cfg = json.loads((family_src("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
                      / "config.json").read_text())
    with pytest.raises(NotExpressible):
        relabel_qwen2_to_llama(cfg, {})
    cfg = json.loads((family_src("phi3") / "config.json").read_text())
    cfg["rope_parameters"] = dict(cfg["rope_parameters"], partial_rotary_factor=0.75)  # Phi-4-mini
    with pytest.raises(NotExpressible):
        relabel_phi3_to_llama(cfg, {})

"""Every model family of the registry, end to end: a tiny random model that transformers builds
offline (configs shaped like the real ones: sliding windows, MoE with dense layers, tied
embeddings, a nested ``text_config``, an MTP layer), then tensorsurgery's keep + float16 cast, DUS
and iDUS from a manifest. Each output loads with the family's class with no missing and no
unexpected keys (but the MTP layer transformers itself reports), and its logits equal exactly
those of the same surgery done in memory (:func:`family_models.reference_surgery`: layers rebuilt
in the new order, the config's per-layer fields following). The relabel presets give logits
exactly equal to the original model's."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from family_models import (  # noqa: E402
    FAMILIES,
    MINISTRAL3,
    REGISTRY_FAMILIES,
    NotExpressible,
    build,
    dus,
    idus,
    keep,
    layer_prefix,
    load_output,
    read_tensors,
    reference_surgery,
    to_module_names,
    write_checkpoint,
)
from tensorsurgery import api  # noqa: E402
from tensorsurgery.errors import PlanError  # noqa: E402
from tensorsurgery.families.registry import get_family, layer_lists  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet_transformers")

NAMES = list(FAMILIES)




@pytest.fixture(scope="module")
def source(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build(name, tmp_path_factory.mktemp(name) / "src", seed=zlib.crc32(name.encode()) % 1000)
        return cache[name]
    return get


def manifest(src: Path, out: Path, layers: str, extra: str = "", rename: str = "") -> str:
    return (f'[source]\nmodel = "{src}"\n{rename}\n[layers]\n{layers}\n\n'
            f'[output]\npath = "{out}"\nmax_shard_size = "40KB"\n{extra}')


def n_layers(src: Path) -> int:
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    if "layers_block_type" in text and "num_hidden_layers" not in text:  # Nemotron-H, as transformers 5 saves it
        return len(text["layers_block_type"])
    return text.get("num_hidden_layers", cfg.get("n_layer", cfg.get("n_layers")))


def assert_output_matches(out: Path, ref) -> None:
    loaded = load_output(out)
    assert loaded.missing_keys == set()
    assert loaded.unexpected_keys == ref.unexpected_on_load()
    assert loaded.mismatched_keys == set()
    assert torch.equal(loaded.logits, ref.logits)
    assert json.loads((out / "config.json").read_text()) == ref.config


#: (plan, arrangement of an n-layer source)
def overlap(n: int) -> int:
    """The m of the DUS and iDUS tests: not n / 2, for dus(n, n / 2) is the identity; this one
    repeats layers."""
    return max(1, n // 4)


def arrangements(n: int) -> dict[str, tuple[str, list[int], str]]:
    m = overlap(n)
    return {
        "keep+float16": ('plan = "keep"', keep(n), 'dtype = "float16"'),
        "dus": (f'plan = "dus"\noverlap = {m}', dus(n, m), ""),
        "idus": (f'plan = "idus"\noverlap = {m}\ngroup = 1', idus(n, m, 1), ""),
    }


@pytest.mark.parametrize("kind", ["keep+float16", "dus", "idus"])
@pytest.mark.parametrize("name", NAMES)
def test_family_surgery_equals_the_reference(source, tmp_path, name, kind):
    src = source(name)
    layers, arrangement, extra = arrangements(n_layers(src))[kind]
    out = tmp_path / "out"
    api.apply(manifest(src, out, layers, extra))
    assert api.verify(out).ok
    ref = reference_surgery(src, arrangement, dtype="float16" if "float16" in kind else None)
    assert_output_matches(out, ref)


def test_deepseek_v3_dense_after_moe_is_one_line(source, tmp_path):
    """DeepSeek-V3's config can only say 'the first k layers are dense': a DUS that puts a dense
    layer after a MoE one is refused, naming the output layer."""
    src = source("deepseek_v3")
    with pytest.raises(PlanError) as e:
        api.plan(manifest(src, tmp_path / "out", 'plan = "dus"\noverlap = 0'))
    n = n_layers(src)
    assert str(e.value) == (
        f"manifest.toml: layers: output layer {n} (layer 0 of source 'source') is dense but follows a layer that "
        f"is not (output layer 1); deepseek_v3's config can only say that the first first_k_dense_replace layers "
        f"are dense: arrange the dense layers first, or relabel the model as a family with a per-layer list")


def test_qwen3_moe_dense_layers_move_with_their_source_layers(source, tmp_path):
    src = source("qwen3_moe")
    n = n_layers(src)
    plan = api.plan(manifest(src, tmp_path / "out", f'plan = "dus"\noverlap = {overlap(n)}'))
    src_dense = json.loads((src / "config.json").read_text())["mlp_only_layers"]
    arrangement = dus(n, overlap(n))
    assert plan.config["mlp_only_layers"] == [i for i, s in enumerate(arrangement) if s in src_dense]
    assert plan.config["decoder_sparse_step"] == 1
    assert [k.endswith("dense") for k in plan.kinds] == [s in src_dense for s in arrangement]


@pytest.mark.parametrize("name, preset", [("qwen2", "qwen2-to-llama"), ("phi3", "phi3-to-llama")])
def test_relabel_presets_give_the_original_logits(source, tmp_path, name, preset):
    src = source(name)
    out = tmp_path / "out"
    api.apply(manifest(src, out, 'plan = "keep"', rename=f'[rename]\npreset = "{preset}"\n'))
    assert api.verify(out).ok
    relabelled = load_output(out)
    assert type(relabelled.model).__name__ == "LlamaForCausalLM"
    assert relabelled.missing_keys == relabelled.unexpected_keys == set()
    original = load_output(src)
    assert torch.equal(relabelled.logits, original.logits)


@pytest.mark.parametrize("name", ["qwen2", "phi3", "gemma2"])
def test_mistral_to_llama_refuses_other_families(source, tmp_path, name):
    src = source(name)
    with pytest.raises(PlanError) as e:
        api.plan(manifest(src, tmp_path / "out", 'plan = "keep"', rename='[rename]\npreset = "mistral-to-llama"\n'))
    model_type = json.loads((src / "config.json").read_text())["model_type"]
    arch = json.loads((src / "config.json").read_text())["architectures"][0]
    hint = {"qwen2": "use preset 'qwen2-to-llama'", "phi3": "use preset 'phi3-to-llama'"}.get(
        name, "remove the preset (no built-in preset converts it)")
    assert str(e.value) == (f"manifest.toml: source 'source': rename.preset 'mistral-to-llama' converts mistral "
                            f"checkpoints, but this source is {model_type} ({arch}); {hint}")


# --- multimodal families as the Hub spells them -----------------------------------------------------

@pytest.mark.parametrize("name", [
    "mistral3",
    "llama4",
    "qwen2_5_vl",
])
def test_hub_configs_of_multimodal_families(tmp_path, name):
    """Source configs spelled as on the Hub (transformers 4.x): Llama 4 with "no_rope_layers": [] and no
    moe_layers or layer_types (all derived by transformers, written out by the tool), Mistral 3 with
    rope_theta, Qwen2.5-VL with no text_config at all."""
    src = build(name, tmp_path / "src", seed=zlib.crc32(name.encode()) % 1000, hub_config=True)
    n = n_layers(src)
    out = tmp_path / "out"
    m = overlap(n)
    api.apply(manifest(src, out, f'plan = "dus"\noverlap = {m}'))
    assert api.verify(out).ok
    ref = reference_surgery(src, dus(n, m))
    assert_output_matches(out, ref)
    if name == "llama4":
        text = json.loads((out / "config.json").read_text())["text_config"]
        n_out = 2 * (n - m)
        assert len(text["no_rope_layers"]) == len(text["layer_types"]) == n_out  # written out
        assert text["interleave_moe_layer_step"] == 1 and text["moe_layers"] == ref.config["text_config"]["moe_layers"]


def test_mistral3_with_a_ministral3_text_tower(tmp_path):
    """Ministral 3 is Mistral 3 too (text_config model_type ministral3, yarn rope with Llama 4 query
    scaling), here with tied embeddings: no lm_head.weight in the checkpoint."""
    src = build("mistral3", tmp_path / "src", seed=7, **MINISTRAL3)
    assert not any("lm_head" in k for k in read_tensors(src))
    n = n_layers(src)
    out = tmp_path / "out"
    api.apply(manifest(src, out, f'plan = "idus"\noverlap = {n // 2}\ngroup = 1'))
    assert_output_matches(out, reference_surgery(src, idus(n, n // 2, 1)))


@pytest.mark.parametrize("name", ["mistral3", "qwen2_5_vl", "gemma3"])
def test_names_saved_by_transformers_4_52_to_4_57(source, tmp_path, name):
    """Checkpoints saved by transformers 4.52-4.57 name the decoder model.language_model.layers.N (and
    the towers model.vision_tower / model.visual); 5.24 loads them, and the tool finds their layers."""
    src = source(name)
    renamed = to_module_names(name, read_tensors(src))
    folder = write_checkpoint(tmp_path / "src", json.loads((src / "config.json").read_text()), renamed)
    assert layer_prefix(name, renamed) == "model.language_model.layers"
    n = n_layers(folder)
    out = tmp_path / "out"
    api.apply(manifest(folder, out, f'plan = "dus"\noverlap = {overlap(n)}'))
    ref = reference_surgery(folder, dus(n, overlap(n)))
    assert_output_matches(out, ref)
    assert torch.equal(ref.logits, reference_surgery(src, dus(n, overlap(n))).logits)


@pytest.mark.parametrize("family, text", [
    ("llama4", {}),
    ("llama4", {"no_rope_layers": []}),  # Meta's configs: derived, as if absent
    ("llama4", {"no_rope_layer_interval": 2, "attention_chunk_size": None}),
    ("llama4", {"no_rope_layers": [0, 1, 1, 0, 1], "attention_chunk_size": 16}),
    ("qwen2_5_vl", {"use_sliding_window": True, "sliding_window": 8, "num_hidden_layers": 30}),  # default 80, not 28
    ("qwen2_5_vl", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3}),
])
def test_multimodal_derivations_are_transformers_own(family, text):
    """The registry derives the per-layer lists of a text_config as the family's text config class does."""
    from transformers import Llama4TextConfig, Qwen2_5_VLTextConfig

    cfg = {"num_hidden_layers": 5, **text}
    n = cfg["num_hidden_layers"]
    want = {"llama4": Llama4TextConfig, "qwen2_5_vl": Qwen2_5_VLTextConfig}[family](**cfg)
    keys = {"llama4": ("no_rope_layers", "layer_types"), "qwen2_5_vl": ("layer_types",)}[family]
    assert layer_lists(get_family(family), cfg, n) == {k: getattr(want, k) for k in keys}


# --- sliding windows on, and relabels after an up-scale --------------------------------------------

@pytest.mark.parametrize("name, window", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    ("smollm3", dict(use_sliding_window=True, sliding_window=8)),
], ids=["qwen2", "qwen3", "smollm3"])
def test_sliding_layers_move_with_their_source_layers(tmp_path, name, window):
    """The Hub's Qwen2/Qwen3/SmolLM3 configs have the window off; with it on (a window of 8 in a
    sequence of 24), layer_types says which layers slide, and a DUS must keep each layer's own."""
    src = build(name, tmp_path / "src", seed=5, **window)
    n = n_layers(src)
    out = tmp_path / "out"
    api.apply(manifest(src, out, f'plan = "dus"\noverlap = {overlap(n)}'))
    text = json.loads((out / "config.json").read_text())
    assert len(set(text["layer_types"])) == 2  # both kinds present: the test exercises the window
    assert_output_matches(out, reference_surgery(src, dus(n, overlap(n))))


@pytest.mark.parametrize("name, preset", [("qwen2", "qwen2-to-llama"), ("phi3", "phi3-to-llama")])
def test_relabel_after_an_up_scale_equals_the_up_scaled_original(source, tmp_path, name, preset):
    """A relabel preset with a DUS: the Llama it writes gives the logits of the same DUS of the
    original family, done in memory."""
    src = source(name)
    n = n_layers(src)
    out = tmp_path / "out"
    api.apply(manifest(src, out, f'plan = "dus"\noverlap = {overlap(n)}', rename=f'[rename]\npreset = "{preset}"\n'))
    relabelled = load_output(out)
    assert type(relabelled.model).__name__ == "LlamaForCausalLM"
    assert relabelled.missing_keys == relabelled.unexpected_keys == set()
    assert torch.equal(relabelled.logits, reference_surgery(src, dus(n, overlap(n))).logits)


# --- registry entries of issue 17 -------------------------------------------------------------------

#: Families whose Hub config.json spells a pattern that transformers 5 re-saves as a list: built so.
HUB_FORM = {"cohere2", "nemotron_h", "lfm2", "ernie4_5_moe", "exaone4"}


#: The cases of the families whose config says which layer is which by a rule (a period and
#: offset, an index list, a pattern string, a span and interval) that it cannot say of the output,
#: with the tool's one line. The reference (family_models.RULE_FAMILIES, from transformers' own
#: config classes) must find the same cases not expressible.
_ANY_ORDER = "choose an arrangement it can describe, or keep the layers in order"
_JAMBA = ("manifest.toml: layers: output layer {at} (layer 1 of source 'source') is mamba, but jamba's config can "
          "only say that every 4th layer from 2 is attention (attn_layer_period = 4, attn_layer_offset = 2), which "
          "makes it attention, and no period and offset make layers {layers} of 12 the attention layers; " + _ANY_ORDER)
_ZAMBA2 = ("manifest.toml: layers: output layer {at} (layer 2 of source 'source') is hybrid, but zamba2's config can "
           "only say that its hybrid layers appear once each, in their order, and it is output layer {first} already "
           "(they share transformer blocks that hold one adapter per hybrid layer, numbered in order, which a moved "
           "hybrid layer cannot take along); " + _ANY_ORDER)
REFUSED = {
    # 7 layers, attention at 2 and 6: the DUS [0-5, 1-6] puts it at 2, 7, 11; the iDUS at 3, 4, 11.
    ("jamba", "dus"): _JAMBA.format(at=6, layers="2, 7, 11"),
    ("jamba", "idus"): _JAMBA.format(at=2, layers="3-4, 11"),
    # Hybrid layers 2 and 5 of 7: both plans repeat layer 2.
    ("zamba2", "dus"): _ZAMBA2.format(at=7, first=2),
    ("zamba2", "idus"): _ZAMBA2.format(at=4, first=3),
    # Dense layers 0 and 1 of 7: the DUS puts layer 1 at 6, after MoE layers (the iDUS keeps them first).
    ("lfm2_moe", "dus"): "manifest.toml: layers: output layer 6 (layer 1 of source 'source') is dense but follows a "
                         "layer that is not (output layer 2); lfm2_moe's config can only say that the first "
                         "num_dense_layers layers are dense: arrange the dense layers first, or relabel the model "
                         "as a family with a per-layer list",
    # MoE from layer 2 to the last: the DUS puts dense layer 1 at 6 (the iDUS keeps 0, 1, 1 first: start 3).
    ("ernie4_5_moe", "dus"): "manifest.toml: layers: output layer 6 (layer 1 of source 'source') is dense, but "
                             "ernie4_5_moe's config can only say that every layer from 2 to the last is MoE "
                             "(moe_layer_start_index = 2, moe_layer_end_index = -1, moe_layer_interval = 1), which "
                             "makes it MoE, and no start, end and interval make layers 2-5, 7-11 of 12 the MoE "
                             "layers; " + _ANY_ORDER,
}


def _check_refused(name: str, kind: str, src: Path, out: Path, layers: str, extra: str, arrangement) -> None:
    with pytest.raises(NotExpressible):
        reference_surgery(src, arrangement, build_model=False)
    with pytest.raises(PlanError) as e:
        api.apply(manifest(src, out, layers, extra))
    assert str(e.value) == REFUSED[(name, kind)]
    assert not out.exists()


@pytest.mark.parametrize("kind", ["keep+float16", "dus", "idus"])
@pytest.mark.parametrize("name", list(REGISTRY_FAMILIES))
def test_registry_entry_surgery_equals_the_reference(tmp_path, name, kind):
    """Falcon (transformer.h.N), DBRX (transformer.blocks.N, n_layers), GLM-4 MoE with its MTP layer,
    Command R7B's Hub config (sliding_window_pattern 4, no layer_types), and the hybrids whose config
    says which layer is which by a rule (Jamba, Bamba, Zamba2, ...): exact logits, with an overlap
    that breaks the layers' parity, or refused in one line where the config cannot say the output."""
    src = build(name, tmp_path / "src", seed=zlib.crc32(name.encode()) % 1000, hub_config=name in HUB_FORM)
    n = n_layers(src)
    layers, arrangement, extra = arrangements(n)[kind]
    out = tmp_path / "out"
    if (name, kind) in REFUSED:
        _check_refused(name, kind, src, out, layers, extra, arrangement)
        return
    api.apply(manifest(src, out, layers, extra))
    assert api.verify(out).ok
    ref = reference_surgery(src, arrangement, dtype="float16" if "float16" in kind else None)
    assert_output_matches(out, ref)


#: Arrangements that move layers and that the rule fields can say (the parity-breaking DUS and
#: iDUS above cannot), and the config forms the sweep above does not build: (family, number of
#: layers, [layers] table, arrangement, Hub form).
MOVING = {
    # n - 2m = 4: the attention layers stay every 4th from 2 and the expert layers odd.
    "jamba-dus-8-2": ("jamba", 8, 'plan = "dus"\noverlap = 2', dus(8, 2), False),
    # Layer 0 dropped: attention at 1 and 5 (attn_layer_offset 2 -> 1), experts even (offset 1 -> 0).
    "jamba-first-dropped": ("jamba", 7, 'plan = "explicit"\narrangement = [[1, 7]]', [1, 2, 3, 4, 5, 6], False),
    # Mamba layers repeated, the hybrid layers (2 and 5) once each, in order.
    "zamba2-mamba-repeated": ("zamba2", 7, 'plan = "explicit"\narrangement = [0, 1, 1, 2, 3, 4, 4, 5, 6, 6]',
                              [0, 1, 1, 2, 3, 4, 4, 5, 6, 6], False),
    # As transformers 5 saves them: Nemotron-H on layers_block_type alone (no num_hidden_layers, no
    # pattern string), LFM2 with layer_types beside full_attn_idxs.
    "nemotron_h-dus-transformers5": ("nemotron_h", 7, 'plan = "dus"\noverlap = 1', dus(7, 1), False),
    "nemotron_h-idus-transformers5": ("nemotron_h", 7, 'plan = "idus"\noverlap = 1\ngroup = 1', idus(7, 1, 1), False),
    "lfm2-dus-transformers5": ("lfm2", 7, 'plan = "dus"\noverlap = 1', dus(7, 1), False),
    # ERNIE as transformers 5 saves it (moe_layer_end_index 6, not -1): the iDUS's MoE layers run to 11.
    "ernie4_5_moe-idus-transformers5": ("ernie4_5_moe", 7, 'plan = "idus"\noverlap = 1\ngroup = 1', idus(7, 1, 1),
                                        False),
    # EXAONE 4 with the integer pattern: kept by a DUS of n - 2m = 4, dropped by the iDUS (layer_types says it).
    "exaone4-dus-8-2-transformers5": ("exaone4", 8, 'plan = "dus"\noverlap = 2', dus(8, 2), False),
    "exaone4-idus-transformers5": ("exaone4", 7, 'plan = "idus"\noverlap = 1\ngroup = 1', idus(7, 1, 1), False),
    "exaone4-dus-8-2": ("exaone4", 8, 'plan = "dus"\noverlap = 2', dus(8, 2), True),  # "LLLG" kept
}


@pytest.mark.parametrize("case", list(MOVING))
def test_rule_fields_rewritten_for_a_moving_arrangement(tmp_path, case):
    name, n, layers, arrangement, hub = MOVING[case]
    src = build(name, tmp_path / "src", seed=zlib.crc32(name.encode()) % 1000, num_layers=n, hub_config=hub)
    out = tmp_path / "out"
    api.apply(manifest(src, out, layers))
    assert api.verify(out).ok
    assert_output_matches(out, reference_surgery(src, arrangement))


def test_glm4_moe_mtp_layer_dropped_by_rename(tmp_path):
    """GLM-4.5's MTP layer (model.layers.N after the N counted ones) is not a decoder layer, so the
    layer-count check does not stand in the way of rename.drop; the output's config counts no MTP
    layer once it is dropped, and computes as the same DUS without it."""
    src = build("glm4_moe", tmp_path / "src", seed=3)
    n = n_layers(src)
    out = tmp_path / "out"
    drop = f'[rename]\ndrop = ["^model\\\\.layers\\\\.{n}\\\\."]\n'
    api.apply(manifest(src, out, f'plan = "dus"\noverlap = {overlap(n)}', rename=drop))
    assert api.verify(out).ok
    ref = reference_surgery(src, dus(n, overlap(n)), mtp="drop")
    loaded = load_output(out)
    assert loaded.missing_keys == loaded.unexpected_keys == set()
    assert torch.equal(loaded.logits, ref.logits)
    assert json.loads((out / "config.json").read_text()) == {**ref.config, "num_nextn_predict_layers": 0}

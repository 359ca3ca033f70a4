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

from family_models import FAMILIES, build, dus, idus, keep, load_output, reference_surgery  # noqa: E402
from tensorsurgery import api  # noqa: E402
from tensorsurgery.errors import PlanError  # noqa: E402

NAMES = list(FAMILIES)


@pytest.fixture(scope="module", autouse=True)
def _quiet_single_threaded():
    import transformers.utils.logging as hf_logging

    hf_logging.disable_progress_bar()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds synchronisation
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(level)


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
    return cfg.get("text_config", cfg).get("num_hidden_layers", cfg.get("n_layer"))


def assert_output_matches(out: Path, ref) -> None:
    loaded = load_output(out)
    assert loaded.missing_keys == set()
    assert loaded.unexpected_keys == ref.unexpected_on_load()
    assert loaded.mismatched_keys == set()
    assert torch.equal(loaded.logits, ref.logits)
    assert json.loads((out / "config.json").read_text()) == ref.config


#: (plan, arrangement of an n-layer source)
def arrangements(n: int) -> dict[str, tuple[str, list[int], str]]:
    m = n // 2
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
    plan = api.plan(manifest(src, tmp_path / "out", f'plan = "dus"\noverlap = {n // 2}'))
    src_dense = json.loads((src / "config.json").read_text())["mlp_only_layers"]
    arrangement = dus(n, n // 2)
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

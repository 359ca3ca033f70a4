"""Parity with mergekit: the seed's SOLAR DUS recipe run through mergekit's ``passthrough`` merge
(its Python API, offline, on the CPU) and through ``manifests/solar-dus.toml`` with
``dtype = "float16"`` gives bitwise-equal tensors, on the tiny 32-layer Mistral.

The mergekit config is the seed's own (``seed/mergekit_DUS.yaml``, committed as
``tests/data/mergekit_DUS.yaml``): slices ``[0, 24]`` and ``[8, 32]`` of one model,
``merge_method: passthrough``, ``dtype: float16``. Only the model path is filled in.

config.json is NOT the same, by design: mergekit keeps the source's architecture and only
sets ``num_hidden_layers`` (48) and ``dtype`` (float16); the solar-dus manifest relabels
Mistral as Llama (``mistral-to-llama`` preset), as the SOLAR paper does. mergekit's config.json
vs ours:

* ``architectures``: ``["MistralForCausalLM"]`` vs ``["LlamaForCausalLM"]``
* ``model_type``: ``"mistral"`` vs ``"llama"``
* ``sliding_window``: kept (the source's value) vs removed (Llama has no sliding window)
* ``max_position_embeddings``: the source's value vs the source's ``sliding_window`` (the span
  every layer was trained to attend over; 32768 -> 4096 for Mistral-7B)
* ``attention_bias``, ``mlp_bias``: absent vs ``false`` (Llama's keys, spelled out)
* ``transformers_version``: mergekit writes the running transformers' version, we keep the
  source's (equal here: the fixture is written with the same transformers), not compared.

Every other key is equal. Run on mergekit's own YAML (accepted in place of a manifest),
tensorsurgery keeps the source's architecture like mergekit does, and config.json is equal too.
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from torch_helpers import no_network

from tensorsurgery.cli import main

REPO = Path(__file__).resolve().parent.parent
SEED_YAML = REPO / "tests" / "data" / "mergekit_DUS.yaml"
PLACEHOLDER = "your_initialized_model_path"
MISSING = "<absent>"

# mergekit 0.1.5 touches numpy.core (deprecated in numpy 2) when imported; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No network: the hub in offline mode, and any internet connection attempt fails."""
    with no_network("the parity test"):
        yield


def seed_config(model: Path) -> dict:
    """The seed's mergekit config with ``model`` as the (single) source model."""
    config = yaml.safe_load(SEED_YAML.read_text(encoding="utf-8"))
    assert config["merge_method"] == "passthrough" and config["dtype"] == "float16"
    assert [s["sources"][0]["layer_range"] for s in config["slices"]] == [[0, 24], [8, 32]]
    for s in config["slices"]:
        for src in s["sources"]:
            assert src["model"] == PLACEHOLDER
            src["model"] = str(model)
    return config


@pytest.fixture(scope="module")
def mergekit_output(offline, tmp_path_factory, tiny_mistral) -> Path:
    """mergekit 0.1.5's passthrough merge of the seed config, on the CPU."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = tmp_path_factory.mktemp("mergekit") / "solar-dus"
    config = MergeConfiguration.model_validate(seed_config(tiny_mistral))
    run_merge(config, str(out), options=MergeOptions(
        device="cpu", copy_tokenizer=False, write_model_card=False, lazy_unpickle=False,
        clone_tensors=True, quiet=True,
    ))
    return out


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert key not in out
                out[key] = f.get_tensor(key)
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert len(a) == 3 + 48 * 9  # embed, norm, lm_head + 9 tensors in each of the 48 layers
    for key in sorted(a):
        x, y = a[key], b[key]
        assert x.dtype == y.dtype == torch.float16, key
        assert x.shape == y.shape, key
        assert torch.equal(x.view(torch.int16), y.view(torch.int16)), key


def config_differences(mergekit: dict, ours: dict) -> dict:
    keys = (mergekit.keys() | ours.keys()) - {"transformers_version"}
    return {k: (mergekit.get(k, MISSING), ours.get(k, MISSING)) for k in sorted(keys)
            if mergekit.get(k, MISSING) != ours.get(k, MISSING)}


def test_solar_dus_manifest_matches_mergekit_passthrough(capsys, tmp_path, tiny_mistral, mergekit_output):
    text = (REPO / "manifests" / "solar-dus.toml").read_text(encoding="utf-8") + '\ndtype = "float16"\n'
    assert tomllib.loads(text)["output"]["dtype"] == "float16"
    manifest = tmp_path / "solar-dus.toml"
    manifest.write_text(text, encoding="utf-8")
    ours = tmp_path / "ours"
    assert main(["apply", str(manifest), "--source", str(tiny_mistral), "--output", str(ours),
                 "--no-progress"]) == 0

    assert_bitwise_equal(read_all(mergekit_output), read_all(ours))

    source = json.loads((tiny_mistral / "config.json").read_text())
    mk = json.loads((mergekit_output / "config.json").read_text())
    our = json.loads((ours / "config.json").read_text())
    assert mk["num_hidden_layers"] == our["num_hidden_layers"] == 48
    assert mk["dtype"] == our["dtype"] == "float16"
    assert config_differences(mk, our) == {
        "architectures": (["MistralForCausalLM"], ["LlamaForCausalLM"]),
        "model_type": ("mistral", "llama"),
        "sliding_window": (source["sliding_window"], MISSING),
        "max_position_embeddings": (source["max_position_embeddings"], source["sliding_window"]),
        "attention_bias": (MISSING, False),
        "mlp_bias": (MISSING, False),
    }


def test_mergekit_yaml_itself_matches_mergekit_passthrough(capsys, tmp_path, tiny_mistral, mergekit_output):
    """tensorsurgery run on the seed's mergekit YAML: same tensors, and the same config.json."""
    ours = tmp_path / "ours"
    assert main(["apply", str(SEED_YAML), "--source", str(tiny_mistral), "--output", str(ours),
                 "--no-progress"]) == 0
    assert_bitwise_equal(read_all(mergekit_output), read_all(ours))
    mk = json.loads((mergekit_output / "config.json").read_text())
    our = json.loads((ours / "config.json").read_text())
    assert config_differences(mk, our) == {}

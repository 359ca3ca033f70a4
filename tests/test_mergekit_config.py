"""mergekit passthrough YAMLs as manifests: the seed's ``mergekit_DUS.yaml`` (a copy in tests/data,
so the test runs in a clean clone), multi-model slices, and one-line errors for the rest.

Outputs are compared with the solar-dus manifest's, with the in-memory reference and, when
mergekit is installed, with what mergekit itself writes from the same YAML.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers

from reference import ARRANGEMENTS, load_source_state_dict, reference_state_dict
from tensorsurgery.cli import main
from tensorsurgery.errors import ManifestError
from tensorsurgery.families.rules import RenameSpec
from tensorsurgery.manifest.loading import load_manifest
from tensorsurgery.manifest.mergekit import manifest_from_mergekit
from tensorsurgery.manifest.merges import METHODS
from tensorsurgery.manifest.toml import LayersSpec, Segment, SourceSpec

DATA = Path(__file__).resolve().parent / "data"
SEED_YAML = DATA / "mergekit_DUS.yaml"
SOLAR_TOML = Path(__file__).resolve().parent.parent / "manifests" / "solar-dus.toml"


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


#: mergekit's lazy unpickler imports numpy.core, deprecated in numpy 2.
MERGEKIT_WARNINGS = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")


def run_mergekit(yaml_text: str, out: Path) -> Path:
    """mergekit's own passthrough, for comparison."""
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    config = MergeConfiguration.model_validate(yaml.safe_load(yaml_text))
    run_merge(config, str(out), MergeOptions(lazy_unpickle=False, write_model_card=False, quiet=True))
    return out


# --- the seed's YAML -----------------------------------------------------------------------------------------

#: sha256 of the seed's ``mergekit_DUS.yaml`` as the project received it (the file in the shared
#: seed folder, which is not part of the repository): tests/data holds a byte-for-byte copy.
SEED_YAML_SHA256 = "cbe92f952fd3f3d8479a65d9410e9c9dcd42995d42200b08d5299e56c0af1f38"


def test_seed_yaml_is_the_seeds_own_file():
    """tests/data/mergekit_DUS.yaml is the seed's YAML unchanged, so what it is compared with below is
    what mergekit users run; if this fails, the copy was edited: restore it rather than the hash."""
    assert hashlib.sha256(SEED_YAML.read_bytes()).hexdigest() == SEED_YAML_SHA256


def test_seed_yaml_as_manifest():
    m = load_manifest(SEED_YAML)
    assert m.sources == (SourceSpec("your_initialized_model_path", "your_initialized_model_path"),)
    assert m.rename == RenameSpec()
    assert m.layers == LayersSpec(plan="explicit", arrangement=(
        Segment("your_initialized_model_path", 0, 24), Segment("your_initialized_model_path", 8, 32)))
    assert (m.output.path, m.output.dtype, dict(m.tensor_sources), dict(m.config)) == (
        "out/mergekit_DUS", "float16", {}, {})
    assert m.text == SEED_YAML.read_text()
    m = load_manifest(SEED_YAML, sources={"": "/models/m7b"}, output="elsewhere")
    assert (m.sources[0].model, m.output.path) == ("/models/m7b", "elsewhere")


def test_seed_yaml_equals_solar_dus_in_float16(tmp_path, tiny_mistral):
    out = tmp_path / "yaml"
    assert main(["apply", str(SEED_YAML), "--source", str(tiny_mistral), "--output", str(out), "--no-progress"]) == 0
    assert main(["verify", str(SEED_YAML), str(out), "--source", str(tiny_mistral), "--no-progress"]) == 0
    assert main(["verify", str(out), "--no-progress"]) == 0  # from its own provenance record
    toml = tmp_path / "solar-dus.toml"
    toml.write_text(SOLAR_TOML.read_text().replace('# dtype = "float16"', 'dtype = "float16"'))
    assert main(["apply", str(toml), "--source", str(tiny_mistral), "--output", str(tmp_path / "toml"),
                 "--no-progress"]) == 0
    got = load_source_state_dict(out)
    assert_same_tensors(got, load_source_state_dict(tmp_path / "toml"))
    assert_same_tensors(got, reference_state_dict(tiny_mistral, ARRANGEMENTS["solar-dus"], torch.float16))
    cfg, source_cfg = (json.loads((p / "config.json").read_text()) for p in (out, tiny_mistral))
    # mergekit keeps the architecture; only the layer count and dtype change
    assert cfg == dict(source_cfg, num_hidden_layers=48, dtype="float16")
    assert (out / "tokenizer.json").read_bytes() == (tiny_mistral / "tokenizer.json").read_bytes()


@MERGEKIT_WARNINGS
def test_seed_yaml_equals_mergekit(tmp_path, tiny_mistral):
    text = SEED_YAML.read_text().replace("your_initialized_model_path", str(tiny_mistral))
    (tmp_path / "dus.yml").write_text(text)
    assert main(["apply", str(tmp_path / "dus.yml"), "--output", str(tmp_path / "ours"), "--no-progress"]) == 0
    theirs = run_mergekit(text, tmp_path / "theirs")
    assert_same_tensors(load_source_state_dict(tmp_path / "ours"), load_source_state_dict(theirs))
    ours_cfg, theirs_cfg, source_cfg = (json.loads((p / "config.json").read_text())
                                        for p in (tmp_path / "ours", theirs, tiny_mistral))
    # mergekit re-saves config.json through transformers, which stamps its own version; we keep the
    # source's (no transformers re-saved it). Every other field must be the same.
    assert theirs_cfg.pop("transformers_version") == transformers.__version__
    assert ours_cfg.pop("transformers_version") == source_cfg["transformers_version"]
    assert ours_cfg == theirs_cfg


def test_seed_yaml_on_a_native_mistral(tmp_path, tiny_mistral):
    """A native checkpoint gets Hugging Face names (and q/k rows permuted) under a YAML too."""
    from test_native import make_native
    native = make_native(tiny_mistral, tmp_path / "native")
    out = tmp_path / "out"
    assert main(["apply", str(SEED_YAML), "--source", str(native), "--output", str(out), "--no-progress"]) == 0
    assert_same_tensors(load_source_state_dict(out),
                        reference_state_dict(tiny_mistral, ARRANGEMENTS["solar-dus"], torch.float16))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["sliding_window"]) == ("mistral", 48, 32)


# --- several models -------------------------------------------------------------------------------------------

MULTI = """\
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 4]}}]
  - sources: [{{model: {b}, layer_range: [2, 6]}}]
  - sources: [{{model: {a}, layer_range: [10, 12]}}]
  - sources: [{{model: {b}, layer_range: [30, 32]}}]
dtype: bfloat16
"""


@MERGEKIT_WARNINGS
def test_multi_model_slices_equal_mergekit(tmp_path, tiny_mistral, tiny_mistral_single):
    """Layers from both models in slice order; embeddings from the first slice's model, final norm
    and lm_head from the last slice's, as mergekit does."""
    text = MULTI.format(a=tiny_mistral, b=tiny_mistral_single)
    (tmp_path / "multi.yaml").write_text(text)
    assert main(["apply", str(tmp_path / "multi.yaml"), "--output", str(tmp_path / "ours"), "--no-progress"]) == 0
    got = load_source_state_dict(tmp_path / "ours")
    a, b = load_source_state_dict(tiny_mistral), load_source_state_dict(tiny_mistral_single)
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(got["model.layers.4.mlp.up_proj.weight"], b["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.9.self_attn.q_proj.weight"], a["model.layers.11.self_attn.q_proj.weight"])
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_hidden_layers"] == 12
    assert_same_tensors(got, load_source_state_dict(run_mergekit(text, tmp_path / "theirs")))


def test_multi_model_manifest():
    text = (MULTI.format(a="org/base@v2", b="/data/other/base/").replace("bfloat16", "float32")
            + "base_model: /data/cfg\nout_dtype: float16\n")
    m = manifest_from_mergekit(Path("x/multi.yml"), text)
    assert m.sources == (SourceSpec("cfg", "/data/cfg"), SourceSpec("base", "org/base", "v2"),
                         SourceSpec("base-2", "/data/other/base/"))
    assert [(s.source, s.start, s.stop) for s in m.layers.arrangement] == [
        ("base", 0, 4), ("base-2", 2, 6), ("base", 10, 12), ("base-2", 30, 32)]
    assert dict(m.tensor_sources) == {"model.embed_tokens.weight": "base", "model.norm.weight": "base-2",
                                      "lm_head.weight": "base-2"}
    assert (m.output.path, m.output.dtype) == ("out/multi", "float16")


def test_tensor_from_a_source_that_lacks_it(tmp_path, tiny_mistral, capsys):
    """The last slice's model must have the final norm the output takes from it."""
    from safetensors.torch import save_file
    other = tmp_path / "other"
    other.mkdir()
    tensors = load_source_state_dict(tiny_mistral)
    del tensors["model.norm.weight"]
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    (other / "config.json").write_bytes((tiny_mistral / "config.json").read_bytes())
    (tmp_path / "m.yml").write_text(f"merge_method: passthrough\nslices:\n"
                                    f"  - sources: [{{model: {tiny_mistral}, layer_range: [0, 2]}}]\n"
                                    f"  - sources: [{{model: {other}, layer_range: [0, 2]}}]\n")
    assert main(["plan", str(tmp_path / "m.yml")]) == 2
    assert capsys.readouterr().err == (
        f"tensorsurgery: error: {tmp_path / 'm.yml'}: 'model.norm.weight' is to come from source 'other', "
        f"which has no such tensor; use sources of the same architecture\n")


# --- errors ---------------------------------------------------------------------------------------------------

SLICE = "slices:\n  - sources:\n      - model: m\n        layer_range: [0, 4]\n"
#: The merge methods built, as the messages list them.
BUILT = ", ".join(METHODS)


@pytest.mark.parametrize("text, message", [
    ("merge_method: average\n" + SLICE,
     f"merge_method: expected one of: {BUILT}, found 'average'"),
    (SLICE, f"merge_method: missing; give passthrough (slices of layers) or a merge method ({BUILT})"),
    ("merge_method: passthrough\n",
     "slices: missing; list the layers to copy, e.g. - sources: [{model: PATH, layer_range: [0, 24]}]"),
    ("merge_method: passthrough\nslices: []\n",
     "slices: expected a non-empty list, found a list []; list the layers to copy, e.g. - sources: "
     "[{model: PATH, layer_range: [0, 24]}]"),
    ("merge_method: passthrough\nmodels:\n  - model: m\n",
     "models: list the layers to copy as slices with a layer_range instead"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n"
     "      - {model: b, layer_range: [0, 4]}\n",
     "slices[0].sources: 2 sources: combining models in one slice is a merge, not passthrough; give each "
     "slice exactly one source"),
    ("merge_method: passthrough\nslices:\n  - sources: []\n",
     "slices[0].sources: found a list []; give each slice exactly one source"),
    ("merge_method: passthrough\n" + SLICE.replace("[0, 4]", "[4, 2]"),
     "slices[0].sources[0].layer_range: expected [start, stop] with 0 <= start < stop (stop excluded), found "
     "a list [4, 2]"),
    ("merge_method: passthrough\n" + SLICE.replace("[0, 4]", "[0, 4, 8]"),
     "slices[0].sources[0].layer_range: expected [start, stop] with 0 <= start < stop (stop excluded), found "
     "a list [0, 4, 8]"),
    ("merge_method: passthrough\n" + SLICE.replace("        layer_range: [0, 4]\n", ""),
     "slices[0].sources[0].layer_range: expected [start, stop] with 0 <= start < stop (stop excluded), found "
     "nothing"),
    ("merge_method: passthrough\n" + SLICE.replace("model: m", "model: m+"),
     "slices[0].sources[0].model: 'm+' is not a model reference; use PATH+ADAPTER_FOLDER for a LoRA adapter"),
    ("merge_method: passthrough\n" + SLICE.replace("model: m", "model: m@"),
     "slices[0].sources[0].model: 'm@' is not a model reference; use PATH or REPO@REVISION"),
    ("merge_method: passthrough\n" + SLICE + "        parameters: {scale: 0.5}\n",
     "slices[0].sources[0].parameters: parameters such as scale change tensor values; only a byte-exact "
     "passthrough is supported"),
    ("merge_method: passthrough\n" + SLICE + "        weight: 1\n",
     "slices[0].sources[0].weight: unknown key; expected one of: model, layer_range"),
    ("merge_method: passthrough\nnormalize: true\n" + SLICE,
     "normalize: unknown key; expected one of: merge_method, slices, dtype, out_dtype, base_model, "
     "tokenizer_source"),
    ("merge_method: passthrough\ndtype: fp16\n" + SLICE,
     "dtype: unsupported dtype a string 'fp16'; expected one of: float16, bfloat16, float32"),
    ("merge_method: passthrough\ndtype: float16\nout_dtype: bfloat16\n" + SLICE,
     "dtype: float16 then out_dtype bfloat16 rounds every tensor twice; tensorsurgery casts once: remove dtype "
     "or set it to bfloat16 or float32"),
    ("merge_method: passthrough\ntokenizer_source: union\n" + SLICE,
     "tokenizer_source: 'union' is not supported; the base model's tokenizer files are copied (remove it or "
     "use base)"),
    ("merge_method: passthrough\nslices: [\n", "not valid YAML: expected the node content, but found '<stream end>' "
                                               "(at line 3, column 1)"),
    ("- passthrough\n", "expected a mergekit config (a YAML mapping with merge_method and slices), found a list "
                        "['passthrough']"),
])
def test_errors_name_the_file_and_key(text, message):
    with pytest.raises(ManifestError) as excinfo:
        manifest_from_mergekit(Path("cfg.yml"), text)
    assert str(excinfo.value) == f"cfg.yml: {message}"


def test_dtype_names():
    def dtype(extra: str) -> str | None:
        return manifest_from_mergekit(Path("c.yml"), "merge_method: passthrough\n" + SLICE + extra).output.dtype
    assert dtype("") is None
    assert dtype("dtype: torch.bfloat16\n") == "bfloat16"
    assert dtype("dtype: float32\nout_dtype: float16\n") == "float16"
    assert dtype("dtype: float16\nout_dtype: float16\n") == "float16"
    assert dtype("tokenizer_source: base\nbase_model: m\n") is None


def test_cli_error_is_one_line(tmp_path, capsys):
    (tmp_path / "m.yaml").write_text("merge_method: average\nbase_model: m\nmodels:\n  - model: a\n")
    assert main(["apply", str(tmp_path / "m.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == (f"tensorsurgery: error: {tmp_path / 'm.yaml'}: merge_method: expected one of: {BUILT}, "
                   f"found 'average'\n")


def test_layer_range_beyond_the_source(tmp_path, tiny_mistral, capsys):
    (tmp_path / "m.yml").write_text(SEED_YAML.read_text().replace("[8, 32]", "[8, 40]"))
    assert main(["plan", str(tmp_path / "m.yml"), "--source", str(tiny_mistral)]) == 2
    assert "layers 8..39 of source 'your_initialized_model_path', which has 32 layers" in capsys.readouterr().err

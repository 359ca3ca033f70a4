"""Checkpoint assembly (:mod:`tensorsurgery.sources.checkpoint`), pure: which files make a checkpoint
(one weight format), which are copied, the index's weight map, the checks between index, shards
and config."""
from __future__ import annotations

import pytest

from helpers import decoder_config, decoder_specs, make_header
from tensorsurgery.errors import SourceError
from tensorsurgery.sources.checkpoint import SourceFiles, assemble, index_weight_map, select_files

HF_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def test_select_files_prefers_the_hf_shards_and_never_takes_both_formats():
    names = [*HF_SHARDS, "model.safetensors.index.json", "config.json", "consolidated.safetensors",
             "params.json", "tokenizer.model", "tokenizer.model.v3", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "generation_config.json", "README.md", ".gitattributes",
             "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_config.json", "LICENSE",
             "USE_POLICY.md", "notes.txt"]
    files = select_files(names, "org/m")
    assert files == SourceFiles(
        layout="hf", config="config.json", index="model.safetensors.index.json", weights=(),  # from the index
        copied=("LICENSE", "USE_POLICY.md", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
                "tokenizer.model", "tokenizer.model.v3", "tokenizer_config.json"),
        card="README.md")
    assert files.small == ("config.json", "model.safetensors.index.json", *files.copied, "README.md")


def test_select_files_single_hf_file():
    files = select_files(["model.safetensors", "config.json", "consolidated.safetensors", "params.json"], "org/m")
    assert files == SourceFiles("hf", "config.json", None, ("model.safetensors",), (), None)


def test_select_files_native_layout_when_there_are_no_hf_weights():
    names = ["consolidated.00.safetensors", "consolidated.01.safetensors", "params.json", "config.json",
             "tekken.json", "pytorch_model.bin"]
    assert select_files(names, "org/m") == SourceFiles(
        "mistral", "params.json", None, ("consolidated.00.safetensors", "consolidated.01.safetensors"),
        ("tekken.json",), None)


def test_select_files_errors():
    with pytest.raises(SourceError) as e:
        select_files(["pytorch_model.bin", "config.json"], "org/m@0123456789ab")
    assert str(e.value) == ("org/m@0123456789ab: no model.safetensors, model.safetensors.index.json or "
                            "consolidated.safetensors; only safetensors checkpoints are supported")
    with pytest.raises(SourceError) as e:
        select_files(["consolidated.safetensors", "config.json"], "org/m")
    assert str(e.value) == ("org/m: has mistral weights but no params.json; a checkpoint needs it next to its "
                            "weights")


def test_index_weight_map_takes_plain_file_names_only():
    where = "idx.json"
    assert index_weight_map({"weight_map": {"a": "model-2.safetensors", "b": "model-1.safetensors"}}, where) == {
        "a": "model-2.safetensors", "b": "model-1.safetensors"}
    with pytest.raises(SourceError) as e:
        index_weight_map({"weight_map": {"a": "../../blobs/x.safetensors"}}, where)
    assert str(e.value) == ("idx.json: tensor 'a' maps to '../../blobs/x.safetensors'; shard names must be "
                            "plain *.safetensors file names inside the folder")


@pytest.mark.parametrize("index, message", [
    ([], "idx.json: expected a JSON object, found list; re-download the index"),
    ({"metadata": [], "weight_map": {"a": "m.safetensors"}},
     "idx.json: metadata is list, expected an object; re-download the index"),
    ({"metadata": {}}, "idx.json: no weight_map; re-download the index"),
    ({"weight_map": {}}, "idx.json: no weight_map; re-download the index"),
])
def test_index_weight_map_errors(index, message):
    with pytest.raises(SourceError) as e:
        index_weight_map(index, "idx.json")
    assert str(e.value) == message


def _assemble(tmp_path, config, index=None, specs=None):
    specs = specs or decoder_specs(2)
    header = make_header(tmp_path / "model.safetensors", specs)
    files = SourceFiles("hf", "config.json", None, ("model.safetensors",), (), None)
    return assemble(tmp_path, files, {"model.safetensors": header}, config, index=index)


def test_assemble_counts_layers_and_checks_the_config(tmp_path):
    ckpt = _assemble(tmp_path, decoder_config(2))
    assert ckpt.num_layers == 2 and ckpt.family.name == "mistral"
    with pytest.raises(SourceError) as e:
        _assemble(tmp_path, decoder_config(3))
    assert str(e.value) == (f"{tmp_path / 'config.json'}: num_hidden_layers = 3 but the tensors hold 2 layers; "
                            f"the config and weights do not belong together (use the config.json that came with "
                            f"these weights)")
    with pytest.raises(SourceError) as e:
        _assemble(tmp_path, [1, 2])
    assert str(e.value) == f"{tmp_path / 'config.json'}: expected a JSON object, found list"


def test_an_index_that_disagrees_with_its_shards_is_found_by_its_summary(tmp_path):
    from tensorsurgery.sources.checkpoint import IndexMismatch, index_difference, summarize_index
    specs = decoder_specs(2)
    right = {name: "model.safetensors" for name, _, _ in specs}
    assert _assemble(tmp_path, decoder_config(2), index=summarize_index(right)).num_layers == 2
    wrong = dict(right)
    wrong.pop("model.norm.weight")
    with pytest.raises(IndexMismatch):
        _assemble(tmp_path, decoder_config(2), index=summarize_index(wrong))
    header = make_header(tmp_path / "model.safetensors", specs)
    assert str(index_difference(tmp_path / "idx.json", wrong, {"model.safetensors": header})) == (
        f"{tmp_path / 'idx.json'}: tensor 'model.norm.weight' in model.safetensors is missing from the weight_map")

"""End to end: the seed manifests applied with the CLI to the tiny random Mistral fixtures, checked
against the in-memory reference surgery (tests/reference.py) with safetensors and transformers:
same tensors bit for bit, same logits exactly, files the Hub and transformers accept."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import snapshot, write_manifest
from reference import ARRANGEMENTS, load_source_state_dict, reference_config_dict, reference_model, reference_state_dict
from tensorsurgery.cli import main

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
SEEDS = ("llama2-init-mistral", "solar-dus", "idus-1layer", "idus-8layer")
COPIED = ("generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")


def apply(manifest: Path, source: Path, output: Path, *extra: str) -> int:
    return main(["apply", str(manifest), "--source", str(source), "--output", str(output), *extra])


def output_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in ``folder``, read with the official library."""
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                assert key not in state
                state[key] = f.get_tensor(key)
    return state


def assert_bitwise_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, t in expected.items():
        assert got[key].dtype == t.dtype and got[key].shape == t.shape, key
        bits = torch.int32 if t.dtype == torch.float32 else torch.int16
        assert torch.equal(got[key].view(bits), t.view(bits)), key


def input_ids(config: dict, seq_len: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    return torch.randint(0, config["vocab_size"], (2, seq_len), generator=gen)


def variant(tmp_path: Path, seed: str, extra_output: str) -> Path:
    """A copy of a seed manifest with lines added to its [output] table (the last table)."""
    text = (MANIFESTS / f"{seed}.toml").read_text(encoding="utf-8")
    assert text.rindex("[output]") > text.rindex("[layers]")
    return write_manifest(tmp_path / f"{seed}-variant.toml", text + "\n" + extra_output + "\n")


@pytest.fixture(scope="module", params=SEEDS)
def seed_output(request, tiny_mistral, tmp_path_factory):
    """(seed name, output folder) of ``apply`` of that seed manifest to ``tiny_mistral``."""
    out = tmp_path_factory.mktemp(request.param) / "out"
    before = snapshot(tiny_mistral)
    assert apply(MANIFESTS / f"{request.param}.toml", tiny_mistral, out, "--no-progress") == 0
    assert snapshot(tiny_mistral) == before  # the source's bytes and mtimes are untouched
    return request.param, out


# --- the four seed manifests -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seen_logits() -> dict[str, torch.Tensor]:
    """Logits of each seed's output, to check that the arrangements give different models."""
    return {}


def test_loads_as_llama_with_the_reference_tensors_and_logits(seed_output, tiny_mistral, seen_logits):
    from transformers import AutoModelForCausalLM

    seed, out = seed_output
    arrangement = ARRANGEMENTS[seed]
    assert_bitwise_equal(output_state_dict(out), reference_state_dict(tiny_mistral, arrangement))

    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert len(model.model.layers) == len(arrangement)
    reference = reference_model(tiny_mistral, arrangement, dtype=torch.float32)
    config = json.loads((tiny_mistral / "config.json").read_text())
    ids = input_ids(config, config["sliding_window"])
    with torch.no_grad():
        got, expected = model.eval()(ids).logits, reference(ids).logits
    assert got.dtype == expected.dtype == torch.float32
    assert torch.equal(got, expected)
    # Different arrangements compute different functions, so the check above can fail.
    seen_logits.setdefault(seed, got)
    assert sum(torch.equal(got, other) for other in seen_logits.values()) == 1


def test_files(seed_output, tiny_mistral):
    seed, out = seed_output
    n = len(ARRANGEMENTS[seed])
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["README.md", "config.json", "model.safetensors", "tensorsurgery.json", *COPIED])
    for path in out.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert not (out / "model.safetensors.index.json").exists()  # one shard: no index
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == n
    assert config == reference_config_dict(tiny_mistral, n)
    for name in COPIED:
        assert (out / name).read_bytes() == (tiny_mistral / name).read_bytes()
    assert list(out.parent.iterdir()) == [out]  # no temporary folder left beside the output


def test_verify_passes(seed_output, tiny_mistral, capsys):
    seed, out = seed_output
    assert main(["verify", str(MANIFESTS / f"{seed}.toml"), str(out), "--source", str(tiny_mistral),
                 "--no-progress"]) == 0
    assert "verified" in capsys.readouterr().out


def test_relabel_keeps_mistral_logits(tiny_mistral, tmp_path):
    """Only the relabel without layer changes computes the same function as the Mistral source."""
    from transformers import AutoModelForCausalLM, MistralForCausalLM

    out = tmp_path / "out"
    assert apply(MANIFESTS / "llama2-init-mistral.toml", tiny_mistral, out, "--no-progress") == 0
    config = json.loads((tiny_mistral / "config.json").read_text())
    ids = input_ids(config, config["sliding_window"] - 4)  # inside the window Mistral's attention = Llama's
    mistral = MistralForCausalLM.from_pretrained(tiny_mistral, dtype=torch.float32).eval()
    llama = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(llama).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, mistral(ids).logits)


# --- variants ---------------------------------------------------------------------------------------------

def test_sharded_output(tiny_mistral, tmp_path):
    before = snapshot(tiny_mistral)
    manifest = variant(tmp_path, "solar-dus", 'max_shard_size = "40KB"')
    out = tmp_path / "out"
    assert apply(manifest, tiny_mistral, out, "--no-progress") == 0
    assert snapshot(tiny_mistral) == before  # the source's bytes and mtimes are untouched

    shards = sorted(out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 5
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map, total = {}, 0
    for path in shards:
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                weight_map[key] = path.name
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
        assert path.stat().st_size - 8 - int.from_bytes(path.read_bytes()[:8], "little") <= 40_000
    assert index["weight_map"] == weight_map
    assert index["metadata"]["total_size"] == total
    assert_bitwise_equal(output_state_dict(out), reference_state_dict(tiny_mistral, ARRANGEMENTS["solar-dus"]))

    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == 48


def test_float16_cast(tiny_mistral, tmp_path):
    manifest = variant(tmp_path, "idus-8layer", 'dtype = "float16"')
    out = tmp_path / "out"
    assert apply(manifest, tiny_mistral, out, "--no-progress") == 0
    got = output_state_dict(out)
    assert {t.dtype for t in got.values()} == {torch.float16}
    source = load_source_state_dict(tiny_mistral)
    assert {t.dtype for t in source.values()} == {torch.bfloat16}
    assert_bitwise_equal(got, reference_state_dict(tiny_mistral, ARRANGEMENTS["idus-8layer"], dtype=torch.float16))
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16" and config["num_hidden_layers"] == 48


def test_single_file_source(tiny_mistral_single, tmp_path):
    out = tmp_path / "out"
    assert apply(MANIFESTS / "solar-dus.toml", tiny_mistral_single, out, "--no-progress") == 0
    assert_bitwise_equal(output_state_dict(out),
                         reference_state_dict(tiny_mistral_single, ARRANGEMENTS["solar-dus"]))
    config = json.loads((out / "config.json").read_text())
    assert config == reference_config_dict(tiny_mistral_single, 48)
    for name in COPIED:
        assert (out / name).read_bytes() == (tiny_mistral_single / name).read_bytes()


# --- safety ----------------------------------------------------------------------------------------------

def test_existing_output_needs_force(tiny_mistral, tmp_path, capsys):
    manifest = MANIFESTS / "idus-1layer.toml"
    out = tmp_path / "out"
    assert apply(manifest, tiny_mistral, out, "--no-progress") == 0
    first = snapshot(out)
    capsys.readouterr()

    assert apply(manifest, tiny_mistral, out, "--no-progress") == 2
    err = capsys.readouterr().err
    assert err == (f"tensorsurgery: error: {out.resolve()}: already exists; pass --force to replace it, "
                   f"or choose another --output\n")
    assert snapshot(out) == first

    (out / "stale.txt").write_text("from an older run")
    assert apply(manifest, tiny_mistral, out, "--no-progress", "--force") == 0
    assert not (out / "stale.txt").exists()
    assert_bitwise_equal(output_state_dict(out), reference_state_dict(tiny_mistral, ARRANGEMENTS["idus-1layer"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_output_inside_the_source_is_refused(tiny_mistral, capsys):
    before = snapshot(tiny_mistral)
    listing = sorted(p.name for p in tiny_mistral.iterdir())
    for target in (tiny_mistral / "out", tiny_mistral, tiny_mistral.parent):
        assert apply(MANIFESTS / "solar-dus.toml", tiny_mistral, target, "--no-progress", "--force") == 2
        err = capsys.readouterr().err
        assert err.startswith("tensorsurgery: error: ") and err.count("\n") == 1
        assert "overlaps the source" in err and "Traceback" not in err
    assert sorted(p.name for p in tiny_mistral.iterdir()) == listing
    assert snapshot(tiny_mistral) == before

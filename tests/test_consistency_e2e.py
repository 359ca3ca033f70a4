"""The consistency check against transformers: each [config] override apply refuses would have
written a model transformers does not load as its tensors (a weight left random, a size
mismatch, a config it rejects), and the outputs it lets through load with no key missing, left
over or of another shape."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from cli_helpers import error_line, run, write_manifest
from synthetic import TINY, mistral_config, mistral_tensors, write_checkpoint

SMALL = replace(TINY, layers=4)


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    """A tied MistralForCausalLM: no lm_head.weight, tie_word_embeddings true."""
    specs = [s for s in mistral_tensors(SMALL) if s[0] != "lm_head.weight"]
    return write_checkpoint(tmp_path_factory.mktemp("tied") / "src", specs,
                            mistral_config(SMALL, tie_word_embeddings=True), seed=4)


def load(folder: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)


def loads_cleanly(folder: Path) -> bool:
    """True when transformers builds the model from ``folder`` with every weight from its files."""
    try:
        _, info = load(folder)
    except (ValueError, TypeError, RuntimeError, StrictDataclassError):  # the config is refused
        return False
    return not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])


@pytest.mark.parametrize("override", [
    "tie_word_embeddings = false", "vocab_size = 320", "num_hidden_layers = 4.0",
    'layer_types = ["full_attention", "full_attention"]',
])
def test_what_apply_refuses_transformers_does_not_load(tied, tmp_path, capsys, quiet_transformers, override):
    import tomllib

    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, tied, out, layers='plan = "keep"', extra=f"[config]\n{override}\n")
    assert "would disagree" in error_line(*run(capsys, "apply", manifest))
    assert not out.exists()
    # What apply would have written without the check: the source's tensors, the overridden config.
    written = shutil.copytree(tied, tmp_path / "as-written")
    config = {**json.loads((tied / "config.json").read_text()), **tomllib.loads(override)}
    (written / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert not loads_cleanly(written)


@pytest.mark.parametrize("layers", ['plan = "keep"', 'plan = "dus"\noverlap = 1',
                                    'plan = "idus"\noverlap = 1\ngroup = 1'])
def test_what_apply_writes_loads_with_every_weight(tied, tmp_path, capsys, quiet_transformers, layers):
    out = tmp_path / "out"
    # A consistent override too: a longer context, still an int.
    manifest = write_manifest(tmp_path, tied, out, layers=layers, extra="[config]\nmax_position_embeddings = 128\n")
    assert run(capsys, "apply", manifest)[0] == 0
    assert loads_cleanly(out)
    model, _ = load(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied

"""Shared pytest fixtures: tiny random Mistral checkpoints written to temporary folders.

The checkpoints come from :func:`build_tiny_mistral` in ``scripts/make_demo_checkpoint.py`` (the
script that also builds ``examples/tiny-mistral/``), with seeds other than the demo's.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
SCRIPTS_DIR = TESTS_DIR.parent / "scripts"
# ``import reference`` from the tests and ``import make_demo_checkpoint`` below, whatever the
# rootdir / import mode pytest runs with.
for _path in (str(TESTS_DIR), str(SCRIPTS_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from make_demo_checkpoint import build_tiny_mistral  # noqa: E402

#: Seeds of the fixtures (the demo checkpoint uses 0).
TINY_MISTRAL_SEED = 1234
TINY_MISTRAL_SINGLE_SEED = 4321


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    """A 32-layer random MistralForCausalLM in bf16, in 4 safetensors shards with an index.

    Also holds config.json, generation_config.json and a word-level tokenizer. Read-only:
    tests must not modify it (it is shared by the whole session).
    """
    path = build_tiny_mistral(
        tmp_path_factory.mktemp("tiny-mistral"), TINY_MISTRAL_SEED, max_shard_size="40KB",
    )
    assert len(list(path.glob("model-*-of-*.safetensors"))) >= 3
    return path


@pytest.fixture(scope="session")
def tiny_mistral_single(tmp_path_factory) -> Path:
    """Same kind of checkpoint as :func:`tiny_mistral` (other seed) as one ``model.safetensors``."""
    path = build_tiny_mistral(
        tmp_path_factory.mktemp("tiny-mistral-single"), TINY_MISTRAL_SINGLE_SEED,
        max_shard_size="1GB",
    )
    assert (path / "model.safetensors").exists()
    assert not (path / "model.safetensors.index.json").exists()
    return path


def pytest_configure(config):
    # Also declared in pyproject.toml by the package owner; registering twice is harmless.
    config.addinivalue_line("markers", "torch: needs torch and transformers")

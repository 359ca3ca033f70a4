"""Shared pytest fixtures: tiny synthetic Mistral checkpoints written to temporary folders.

The checkpoints come from ``tests/synthetic.py`` (real names, shapes and config.json,
seeded finite values, a word-level tokenizer), which needs no torch. Tests that need torch or
transformers (logits, casts against torch, mergekit) live in the modules of :data:`TORCH_MODULES`:
they carry the ``torch`` marker, so ``pytest -m "not torch"`` runs the rest, and without torch
installed they are not collected at all.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from synthetic import TINY, make_mistral

# torch's CPU kernels sum in their vector width: 8 float32 lanes at AVX2, 16 at AVX512. Where an
# oracle's bytes depend on it (mergekit's arcee_fusion softmax), ours are its AVX2 order, on any
# machine; so the oracles run at AVX2 everywhere (set before torch is imported, in this process
# and the mergekit and peft children that inherit it).
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

TESTS_DIR = Path(__file__).resolve().parent
# ``import helpers`` / ``import reference`` from the tests, whatever the rootdir / import mode.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

#: What a test module that needs torch imports (directly, or through another such module).
_IMPORTS = re.compile(r"^(?:from|import) (\w+)", re.M)
_TORCH = {"torch", "transformers", "mergekit", "peft"}


def _torch_modules() -> frozenset[str]:
    """Test modules that need torch and transformers (and, for parity, mergekit or peft): found
    from their imports, so a new module is never left out of the list by hand."""
    imports = {p.name: set(_IMPORTS.findall(p.read_text(encoding="utf-8"))) for p in TESTS_DIR.glob("*.py")}
    needs = {name for name, found in imports.items() if found & _TORCH}
    while True:  # importing a local module that needs torch (test_merges, family_models) needs it too
        more = {name for name, found in imports.items() if {f"{m}.py" for m in found} & needs} - needs
        if not more:
            return frozenset(n for n in needs if n.startswith("test_"))
        needs |= more


TORCH_MODULES = _torch_modules()

if importlib.util.find_spec("torch") is None:
    collect_ignore = sorted(TORCH_MODULES)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--sweep", action="store_true",
                     help="also run the tests marked sweep (every transformers family in tests/test_sweep.py)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sweep: the full family sweep, collected only with --sweep")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in TORCH_MODULES:
            item.add_marker(pytest.mark.torch)
    if not config.getoption("--sweep"):
        # Deselected, not skipped: the default run is the quick subset, and says nothing was skipped.
        kept = [item for item in items if item.get_closest_marker("sweep") is None]
        if len(kept) != len(items):
            config.hook.pytest_deselected(items=[item for item in items if item not in kept])
            items[:] = kept


@pytest.fixture(scope="session", autouse=True)
def _private_hash_cache():
    """Source-file hashes cached by the tests' applies go to a folder of this session (children
    inherit it), never to the user's ~/.cache; a test that needs its own sets the variable."""
    folder = tempfile.mkdtemp(prefix="ts-hash-cache-")
    old = os.environ.get("TENSORSURGERY_HASH_CACHE")
    os.environ["TENSORSURGERY_HASH_CACHE"] = folder
    yield
    if old is None:
        os.environ.pop("TENSORSURGERY_HASH_CACHE", None)
    else:
        os.environ["TENSORSURGERY_HASH_CACHE"] = old
    shutil.rmtree(folder, ignore_errors=True)


#: Seeds of the fixtures (the demo checkpoint uses 0).
TINY_MISTRAL_SEED = 1234
TINY_MISTRAL_SINGLE_SEED = 4321


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    """A 32-layer synthetic MistralForCausalLM in bf16, in 4 safetensors shards with an index.

    Also holds config.json, generation_config.json and a word-level tokenizer. Read-only:
    tests must not modify it (it is shared by the whole session).
    """
    path = make_mistral(tmp_path_factory.mktemp("tiny-mistral"), TINY, seed=TINY_MISTRAL_SEED, max_shard_size=40_000)
    assert len(list(path.glob("model-*-of-*.safetensors"))) >= 3
    return path


@pytest.fixture(scope="session")
def tiny_mistral_single(tmp_path_factory) -> Path:
    """Same kind of checkpoint as :func:`tiny_mistral` (other seed) as one ``model.safetensors``."""
    path = make_mistral(tmp_path_factory.mktemp("tiny-mistral-single"), TINY, seed=TINY_MISTRAL_SINGLE_SEED,
                        max_shard_size=10**9)
    assert (path / "model.safetensors").exists()
    assert not (path / "model.safetensors.index.json").exists()
    return path


@pytest.fixture(scope="module")
def quiet_transformers():
    """transformers without progress bars or warnings, and torch on one thread: the family models
    are tiny, and a second thread only adds synchronisation (57 s -> 18 s under load)."""
    import torch
    import transformers.utils.logging as hf_logging

    hf_logging.disable_progress_bar()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(level)

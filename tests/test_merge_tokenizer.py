"""mergekit's ``tokenizer_source`` (``base``, ``union``, a model) in a merge (issue 19).

Fine-tunes of one base keep its vocabulary; mergekit then re-assembles the embedding rows in the
same order (the identity) and writes the tokenizer it took. Ours is the plain merge with that
tokenizer's files: the tensors and config.json bitwise mergekit's, and the tokenizer it loads has
mergekit's vocabulary and chat template. What would move or trim rows is refused in one line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_merges import FINE_TUNES, assert_bitwise_equal, config_differences, mergekit, read_all, toml_manifest
from torch_helpers import no_network
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cli_helpers import error_line, run
from synthetic import tokenizer_files

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")

TOKENIZER = tokenizer_files()
TOKENS = len(json.loads(TOKENIZER["tokenizer.json"])["model"]["vocab"])
CHAT = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"


@pytest.fixture(scope="module", autouse=True)
def offline():
    with no_network("a tokenizer_source test"):
        yield


def _save(model: LlamaForCausalLM, folder: Path, tokenizer: dict[str, bytes]) -> Path:
    model.save_pretrained(folder, max_shard_size="40KB")
    for name, data in tokenizer.items():
        (folder / name).write_bytes(data)
    return folder


def _swapped(files: dict[str, bytes]) -> dict[str, bytes]:
    """The tokenizer with two words' ids swapped: as many tokens, another vocabulary."""
    data = json.loads(files["tokenizer.json"])
    vocab = data["model"]["vocab"]
    vocab["model"], vocab["layer"] = vocab["layer"], vocab["model"]
    return {**files, "tokenizer.json": json.dumps(data).encode()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A base with a tokenizer, fine-tunes with the same vocabulary (ft1 with a chat template of
    its own), one with another vocabulary, and one whose embeddings have rows no token numbers."""
    root = tmp_path_factory.mktemp("tokenizer-models")
    config = LlamaConfig(vocab_size=TOKENS, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    paths = {"base": _save(base, root / "base", TOKENIZER)}
    chat = json.loads(TOKENIZER["tokenizer_config.json"]) | {"chat_template": CHAT}
    tokenizers = {"ft0": TOKENIZER, "ft1": {**TOKENIZER, "tokenizer_config.json": json.dumps(chat).encode()},
                  "ft2": TOKENIZER, "swapped": _swapped(TOKENIZER)}
    for i, (name, files) in enumerate(tokenizers.items()):
        torch.manual_seed(i + 1)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        paths[name] = _save(model, root / name, files)
    padded = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "vocab_size": TOKENS + 4})).to(torch.bfloat16)
    paths["padded"] = _save(padded, root / "padded", TOKENIZER)
    return paths


def _config(paths: dict[str, Path], source: Any, base: str = "base", names: tuple[str, ...] = FINE_TUNES
            ) -> dict[str, Any]:
    return {"merge_method": "ties", "base_model": str(paths[base]), "tokenizer_source": source,
            "models": [{"model": str(paths[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in names],
            "dtype": "bfloat16"}


def _manifest(tmp_path: Path, config: dict[str, Any], door: str, out: Path) -> Path:
    manifest = tmp_path / f"m.{'yml' if door == 'yaml' else 'toml'}"
    if door == "yaml":
        manifest.write_text(yaml.safe_dump(config, sort_keys=False))
    else:
        source = config["tokenizer_source"]
        named = source if source in ("base", "union") else Path(source).name
        text = toml_manifest({k: v for k, v in config.items() if k != "tokenizer_source"}, out)
        manifest.write_text(text.replace("[merge]\n", f'[merge]\ntokenizer_source = "{named}"\n'))
    return manifest


@pytest.mark.parametrize("door", ["yaml", "toml"])
@pytest.mark.parametrize("source", ["union", "base", "ft1"])
def test_one_vocabulary_merges_as_mergekit(capsys, tmp_path, models, source, door):
    config = _config(models, source if source in ("union", "base") else str(models[source]))
    with torch_stable_argsort():
        theirs = mergekit(config, tmp_path / "mergekit")
    ours = tmp_path / "ours"
    code, out, err = run(capsys, "apply", _manifest(tmp_path, config, door, ours), "--output", ours, "--no-progress")
    assert code == 0, out + err
    assert_bitwise_equal(read_all(theirs), read_all(ours))
    assert config_differences(theirs, ours) == {}
    a, b = (AutoTokenizer.from_pretrained(f) for f in (theirs, ours))
    assert a.get_vocab() == b.get_vocab() and len(b) == TOKENS
    assert a.chat_template == b.chat_template == (CHAT if source == "ft1" else None)
    donor = models["ft1" if source == "ft1" else "base"]
    assert (ours / "tokenizer_config.json").read_bytes() == (donor / "tokenizer_config.json").read_bytes()
    record = json.loads((ours / "tensorsurgery.json").read_text())
    assert record["merge"]["tokenizer_source"] == source
    code, out, err = run(capsys, "verify", ours, "--no-progress")
    assert code == 0 and "every byte matches" in out, out + err


def torch_stable_argsort():
    from test_merges import stable_argsort
    return stable_argsort()


@pytest.mark.parametrize("door", ["yaml", "toml"])
def test_what_would_move_rows_is_refused(capsys, tmp_path, models, door):
    out = tmp_path / "out"
    cases = {
        "swapped": (_config(models, "union", names=("ft0", "swapped")),
                    "'swapped' has another vocabulary than 'base' (2 token(s) at other ids, e.g. 'layer')"),
        "padded": (_config(models, "base", base="padded", names=("padded",)) | {"merge_method": "linear"},
                   f"has {TOKENS + 4} embedding rows but its tokenizer numbers {TOKENS} of them"),
        "elsewhere": (_config(models, str(models["ft2"]), names=("ft0",)),
                      "is not base, union or one of the merged models"),
    }
    for case, (config, expected) in cases.items():
        if case == "padded":
            config["models"][0]["parameters"] = {"weight": 1.0}
        manifest = _manifest(tmp_path, config, door, out)
        message = error_line(*run(capsys, "apply", manifest, "--output", out, "--no-progress"))
        assert expected in message and "tokenizer_source" in message, (case, message)
        assert not out.exists()

"""Synthetic checkpoints for tests, demos and benchmarks: the real tensor names, shapes and
config.json of a Mistral-style decoder (what ``save_pretrained`` of ``MistralForCausalLM`` writes),
seeded values, any size, in Hugging Face shards with an index, plus a small word-level tokenizer.

Written in bounded chunks with the package's own header encoder, so a 14.5 GB Mistral-7B shape
costs a few MB of memory; nothing here needs torch. Values are either ``"normal"`` (finite weights
that transformers computes real logits with) or
``"bytes"`` (raw random bytes, fastest, for benchmarks where values do not matter).
Normal values follow the demo's scheme: embeddings N(0, 1), matrices N(0, 1/fan_in), norms
1 + N(0, 0.1) (not all ones, so every layer differs in every tensor): activations stay O(1)
through 32 layers and different layer arrangements give clearly different logits.

Example:
    >>> from synthetic import TINY, make_mistral
    >>> folder = make_mistral("/tmp/tiny", TINY, seed=1)                 # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal, Mapping, Sequence

import numpy as np

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.formats.safetensors import encode_header
from tensorsurgery.ops.transforms import cast_chunk

#: Bytes of values made and written at a time.
_CHUNK = 4 << 20
Values = Literal["normal", "bytes"]


@dataclass(frozen=True, slots=True)
class Dims:
    """The dimensions of a Mistral-style decoder."""

    vocab: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int


#: Mistral-7B's structure at a tiny size: tests and the README's demo (~0.2 MB).
TINY = Dims(vocab=96, hidden=16, intermediate=32, heads=2, kv_heads=1, head_dim=8, layers=32)
#: The benchmarks' default: Mistral-7B's depth and head ratio, narrower (~1.5 GB).
SMALL = Dims(vocab=32000, hidden=1280, intermediate=4480, heads=32, kv_heads=8, head_dim=40, layers=32)
#: The real Mistral-7B-v0.1 (14.5 GB of bf16).
FULL = Dims(vocab=32000, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, layers=32)

Spec = tuple[str, tuple[int, ...]]


def mistral_tensors(d: Dims) -> list[Spec]:
    """``(name, shape)`` of every tensor, in state-dict order: embeddings, layers, norm, lm_head."""
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    specs: list[Spec] = [("model.embed_tokens.weight", (d.vocab, d.hidden))]
    for n in range(d.layers):
        p = f"model.layers.{n}."
        specs += [(p + "self_attn.q_proj.weight", (q, d.hidden)), (p + "self_attn.k_proj.weight", (kv, d.hidden)),
                  (p + "self_attn.v_proj.weight", (kv, d.hidden)), (p + "self_attn.o_proj.weight", (d.hidden, q)),
                  (p + "mlp.gate_proj.weight", (d.intermediate, d.hidden)),
                  (p + "mlp.up_proj.weight", (d.intermediate, d.hidden)),
                  (p + "mlp.down_proj.weight", (d.hidden, d.intermediate)),
                  (p + "input_layernorm.weight", (d.hidden,)), (p + "post_attention_layernorm.weight", (d.hidden,))]
    return specs + [("model.norm.weight", (d.hidden,)), ("lm_head.weight", (d.vocab, d.hidden))]


def mistral_config(d: Dims, **overrides: Any) -> dict[str, Any]:
    """The config.json of a ``MistralForCausalLM`` of dimensions ``d``, as transformers 5's
    ``save_pretrained`` writes it (``dtype``, ``rope_parameters``), with a sliding window shorter
    than the context, as Mistral-7B-v0.1 has."""
    tiny = d.vocab < 1000
    return {
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "dtype": "bfloat16",
        "eos_token_id": 2, "head_dim": d.head_dim, "hidden_act": "silu", "hidden_size": d.hidden,
        "initializer_range": 0.02, "intermediate_size": d.intermediate,
        "max_position_embeddings": 64 if tiny else 32768, "model_type": "mistral", "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers, "num_key_value_heads": d.kv_heads, "pad_token_id": None,
        "rms_norm_eps": 1e-05, "rope_parameters": {"rope_theta": overrides.pop("rope_theta", 10000.0),
                                                   "rope_type": "default"},
        "sliding_window": 32 if tiny else 4096, "tie_word_embeddings": False, "transformers_version": "5.24.0",
        "use_cache": True, "vocab_size": d.vocab, **overrides,
    }


def cut_shards(specs: Sequence[Spec], max_shard_size: int, dtype: str = "BF16") -> list[list[Spec]]:
    """Greedy cut, as transformers does: a new shard when the next tensor would pass the limit."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for name, shape in specs:
        n = _nbytes(shape, dtype)
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def write_checkpoint(folder: str | os.PathLike[str], specs: Sequence[Spec], config: Mapping[str, Any], *,
                     seed: int = 0, max_shard_size: int = 5_000_000_000, dtype: str = "BF16",
                     values: Values = "normal", files: Mapping[str, bytes] | None = None) -> Path:
    """Write the checkpoint ``specs`` describes into ``folder`` (created), Hugging Face layout:
    ``model.safetensors`` or shards with an index, config.json, then ``files`` (name -> bytes).

    Values are seeded by ``seed`` and walk the tensors in order, so the same arguments give the
    same bytes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = cut_shards(specs, max_shard_size, dtype)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    rng = np.random.default_rng(seed)
    weight_map: dict[str, str] = {}
    for filename, shard in zip(names, shards):
        entries, offset = [], 0
        for name, shape in shard:
            entries.append((name, dtype, shape, offset, offset + _nbytes(shape, dtype)))
            offset += _nbytes(shape, dtype)
            weight_map[name] = filename
        with open(folder / filename, "wb") as f:
            f.write(encode_header(entries, {"format": "pt"}))
            for name, shape in shard:
                _write_values(f, rng, name, shape, dtype, values)
    if len(shards) > 1:
        total = sum(_nbytes(shape, dtype) for _, shape in specs)
        _write_json(folder / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    _write_json(folder / "config.json", dict(config))
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)
    return folder


def make_mistral(folder: str | os.PathLike[str], dims: Dims = TINY, *, seed: int = 0,
                 max_shard_size: int = 60_000, values: Values = "normal", tokenizer: bool = True,
                 **config: Any) -> Path:
    """A synthetic ``MistralForCausalLM`` checkpoint of ``dims`` in ``folder``, with
    generation_config.json and (``tokenizer``) a word-level tokenizer; ``config`` overrides
    config.json keys (``num_hidden_layers`` follows ``dims.layers``)."""
    layers = config.pop("num_hidden_layers", dims.layers)
    dims = replace(dims, layers=layers)
    files = {"generation_config.json": _json_bytes({"bos_token_id": 1, "eos_token_id": 2})}
    if tokenizer:
        files.update(tokenizer_files(model_max_length=64 if dims.vocab < 1000 else 32768))
    return write_checkpoint(folder, mistral_tensors(dims), mistral_config(dims, **config), seed=seed,
                            max_shard_size=max_shard_size, values=values, files=files)


def tensor_bytes(dims: Dims, dtype: str = "BF16") -> int:
    """Bytes of tensor data of a checkpoint of ``dims``."""
    return sum(_nbytes(shape, dtype) for _, shape in mistral_tensors(dims))


#: The demo tokenizer's words after the special tokens <unk>, <s>, </s> (fewer than the vocab:
#: the rows beyond the tokenizer are padding, as in many real checkpoints).
WORDS = (
    "the a an of to and in is it that on for with as was at by from this be "
    "model layer layers depth up scaling mistral llama solar tensor tensors weight "
    "shard safetensors surgery copy merge split token small tiny random seed test "
    ". , ! ? : ; ' \" ( ) - 0 1 2 3 4 5 6 7 8 9"
).split()


def tokenizer_files(model_max_length: int = 64) -> dict[str, bytes]:
    """tokenizer.json (a lower-cased word-level tokenizer that prepends ``<s>``, as Mistral's does),
    tokenizer_config.json and special_tokens_map.json, as ``tokenizers`` and transformers save them."""
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(WORDS)))}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in enumerate(specials)]
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos,
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    config = {"bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
              "model_max_length": model_max_length, "padding_side": "left",
              "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return {"tokenizer.json": _json_bytes(tokenizer), "tokenizer_config.json": _json_bytes(config),
            "special_tokens_map.json": _json_bytes(special)}


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * element_size(dtype)


def _write_values(f: BinaryIO, rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: str,
                  values: Values) -> None:
    size, nbytes = element_size(dtype), _nbytes(shape, dtype)
    norm, embedding = name.endswith("norm.weight"), name.endswith("embed_tokens.weight")
    scale = np.float32(0.1 if norm else 1.0 if embedding else 1 / np.sqrt(shape[-1]))
    while nbytes:
        n = min(nbytes, _CHUNK)
        if values == "bytes":
            chunk = rng.bit_generator.random_raw(-(-n // 8)).astype("<u8", copy=False).view(np.uint8)[:n]
        else:
            x = rng.standard_normal(n // size, dtype=np.float32) * scale + np.float32(1.0 if norm else 0.0)
            chunk = cast_chunk(x.view(np.uint8), "F32", dtype) if dtype != "F32" else x.view(np.uint8)
        f.write(chunk.data)
        nbytes -= n


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_bytes(_json_bytes(data))


__all__ = ["Dims", "TINY", "SMALL", "FULL", "mistral_tensors", "mistral_config", "cut_shards", "write_checkpoint",
           "make_mistral", "tensor_bytes", "tokenizer_files"]

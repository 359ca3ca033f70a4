#!/usr/bin/env python3
"""Generate a synthetic Mistral-shaped checkpoint in Hugging Face layout, for benchmarks.

The output looks like a ``save_pretrained`` directory of ``MistralForCausalLM``: real key names,
BF16, sharded ``model-0000K-of-0000N.safetensors`` files, ``model.safetensors.index.json``,
``config.json`` and ``generation_config.json``. Tensor data is pseudo-random bytes (seeded, so a
given seed and shape always produce the same files), written in bounded chunks: peak memory is a
few tens of MB whatever the checkpoint size. Nothing here needs torch or safetensors.

Sizes:

* ``--full``: the real Mistral-7B shape (vocab 32000, hidden 4096, intermediate 14336, 32 heads,
  8 KV heads, head_dim 128, 32 layers): 14,483,464,192 bytes of tensors, cut greedily at 10 GB
  (decimal) into two shards of ~9.94 GB and ~4.54 GB, like the real repository.
* default: the same 32 layers and 4:1 head ratio, narrower (hidden 1280, intermediate 4480,
  head_dim 40): 1,527,155,200 bytes, also in two shards (the cut scales with the total so the
  split looks like the real one).

Usage::

    python benchmarks/make_checkpoint.py OUTDIR [--full] [--seed N]
        [--hidden H] [--intermediate I] [--layers L] [--vocab V]
        [--heads N] [--kv-heads N] [--head-dim D] [--max-shard-size BYTES] [--dry-run]

or from Python: ``make_checkpoint(outdir, full=False, seed=0, **dims) -> Path`` (and
``tensor_bytes(full, **dims)`` for the size without writing anything).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

#: The real Mistral-7B-v0.1 dimensions.
FULL_DIMS = dict(vocab=32000, hidden=4096, intermediate=14336, heads=32, kv_heads=8,
                 head_dim=128, layers=32)
#: The default, ~1.5 GB: same depth and head ratio, narrower.
SMALL_DIMS = dict(vocab=32000, hidden=1280, intermediate=4480, heads=32, kv_heads=8,
                  head_dim=40, layers=32)

#: Tensor bytes of the real Mistral-7B (``metadata.total_size`` of its index).
FULL_TOTAL = 14_483_464_192
#: The real repository's shard cut (transformers' default ``max_shard_size="10GB"``).
FULL_MAX_SHARD = 10_000_000_000
#: Refuse to write if fewer than this many bytes would be left free afterwards.
MIN_FREE_AFTER = 5_000_000_000
#: Bytes of random data produced and written per chunk.
CHUNK = 16 << 20

DTYPE = "BF16"
ITEMSIZE = 2


def encode_header(tensors, metadata: dict | None = None) -> bytes:
    """The 8-byte length plus JSON header for ``(name, dtype, shape, start, end)`` tuples, as the
    official writer lays it out (compact JSON, space-padded to a multiple of 8 bytes).

    Kept here rather than imported from ``tensorsurgery.format`` so the generators do not depend
    on the package under test (``run.py --repo`` may point at any checkout of it).
    """
    obj: dict[str, object] = {}
    if metadata is not None:
        obj["__metadata__"] = dict(metadata)
    for name, dtype, shape, start, end in tensors:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_specs(dims: dict) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` in state-dict order: embeddings, layers in order, final norm, lm_head."""
    h, i, v = dims["hidden"], dims["intermediate"], dims["vocab"]
    q_dim = dims["heads"] * dims["head_dim"]
    kv_dim = dims["kv_heads"] * dims["head_dim"]
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(dims["layers"]):
        p = f"model.layers.{n}."
        specs += [
            (p + "self_attn.q_proj.weight", (q_dim, h)),
            (p + "self_attn.k_proj.weight", (kv_dim, h)),
            (p + "self_attn.v_proj.weight", (kv_dim, h)),
            (p + "self_attn.o_proj.weight", (h, q_dim)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def _nbytes(shape: tuple[int, ...]) -> int:
    n = ITEMSIZE
    for d in shape:
        n *= d
    return n


def tensor_bytes(full: bool = False, **dims) -> int:
    """Bytes of tensor data of the checkpoint ``make_checkpoint(full=full, **dims)`` would write
    (``layers=48`` gives the size of a 48-layer DUS output of the same width)."""
    return sum(_nbytes(shape) for _, shape in tensor_specs(_resolve_dims(full, dims)))


def plan_shards(specs, max_shard_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Cut ``specs`` greedily, as transformers does: start a new shard when the next tensor
    would push the current one past ``max_shard_size`` (a tensor larger than that gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in specs:
        nb = _nbytes(shape)
        if shards[-1] and size + nb > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    return shards


def _resolve_dims(full: bool, dims: dict) -> dict:
    unknown = set(dims) - set(FULL_DIMS)
    if unknown:
        raise TypeError(f"unknown dimension(s) {sorted(unknown)}; known: {sorted(FULL_DIMS)}")
    out = dict(FULL_DIMS if full else SMALL_DIMS)
    out.update({k: int(v) for k, v in dims.items() if v is not None})
    bad = [k for k, v in out.items() if v <= 0]
    if bad:
        raise ValueError(f"dimensions must be positive: {bad}")
    if out["heads"] % out["kv_heads"]:
        raise ValueError(f"heads ({out['heads']}) must be a multiple of kv_heads ({out['kv_heads']})")
    return out


def _config(d: dict) -> dict:
    return {
        "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": d["head_dim"],
        "hidden_act": "silu",
        "hidden_size": d["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": d["intermediate"],
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": d["heads"],
        "num_hidden_layers": d["layers"],
        "num_key_value_heads": d["kv_heads"],
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.34.0.dev0",
        "use_cache": True,
        "vocab_size": d["vocab"],
    }


_GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                      "transformers_version": "4.34.0.dev0"}


def _write_random(f, rng: np.random.Generator, nbytes: int) -> None:
    """Write ``nbytes`` pseudo-random bytes to ``f`` in chunks of at most CHUNK bytes."""
    while nbytes:
        n = min(nbytes, CHUNK)
        words = rng.bit_generator.random_raw(-(-n // 8)).astype("<u8", copy=False)
        f.write(memoryview(words.view(np.uint8)[:n]))
        nbytes -= n


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def make_checkpoint(outdir, full: bool = False, seed: int = 0, *,
                    max_shard_size: int | None = None, dry_run: bool = False,
                    verbose: bool = False, **dims) -> Path:
    """Write a synthetic BF16 Mistral checkpoint to ``outdir`` and return its path.

    ``dims`` overrides any of ``vocab, hidden, intermediate, heads, kv_heads, head_dim, layers``
    (``None`` values are ignored). ``max_shard_size`` defaults to 10 GB for the full shape and
    otherwise scales with the total so that the split resembles the real one (two shards).
    With ``dry_run`` nothing is written; the plan is printed when ``verbose``.

    Raises:
        OSError: writing would leave less than 5 GB of free disk.
    """
    outdir = Path(outdir)
    d = _resolve_dims(full, dims)
    specs = tensor_specs(d)
    total = sum(_nbytes(s) for _, s in specs)
    if max_shard_size is None:
        max_shard_size = FULL_MAX_SHARD if total == FULL_TOTAL else \
            max(1, total * FULL_MAX_SHARD // FULL_TOTAL)
    shards = plan_shards(specs, max_shard_size)
    k = len(shards)
    names = [f"model-{j + 1:05d}-of-{k:05d}.safetensors" for j in range(k)]
    headers = []
    for shard in shards:
        entries, off = [], 0
        for name, shape in shard:
            entries.append((name, DTYPE, shape, off, off + _nbytes(shape)))
            off += _nbytes(shape)
        headers.append(encode_header(entries, {"format": "pt"}))
    on_disk = total + sum(len(h) for h in headers)

    if verbose:
        print(f"dims: {d}")
        print(f"total_size: {total:,} bytes ({total / 1e9:.3f} GB) in {k} shard(s), "
              f"max_shard_size {max_shard_size:,}")
        for name, shard in zip(names, shards):
            size = sum(_nbytes(s) for _, s in shard)
            print(f"  {name}: {len(shard)} tensors, {size:,} bytes "
                  f"({shard[0][0]} .. {shard[-1][0]})")
    if dry_run:
        return outdir

    outdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(outdir).free
    if free - on_disk < MIN_FREE_AFTER:
        raise OSError(f"refusing to write {on_disk / 1e9:.2f} GB to {outdir}: only "
                      f"{free / 1e9:.2f} GB free, and at least {MIN_FREE_AFTER / 1e9:.0f} GB "
                      f"must remain free afterwards")

    rng = np.random.default_rng(seed)
    weight_map: dict[str, str] = {}
    for name, shard, header in zip(names, shards, headers):
        path = outdir / name
        tmp = path.with_name(path.name + ".partial")
        t0 = time.perf_counter()
        with open(tmp, "wb") as f:
            f.write(header)
            for tname, shape in shard:
                _write_random(f, rng, _nbytes(shape))
                weight_map[tname] = name
        os.replace(tmp, path)
        if verbose:
            print(f"wrote {path} ({path.stat().st_size:,} bytes, "
                  f"{time.perf_counter() - t0:.1f}s)")

    _write_json(outdir / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    _write_json(outdir / "config.json", _config(d))
    _write_json(outdir / "generation_config.json", _GENERATION_CONFIG)
    return outdir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--full", action="store_true",
                   help="real Mistral-7B shape, ~14.5 GB (default: a ~1.5 GB narrow variant)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tensor bytes (0)")
    for dim in ("hidden", "intermediate", "layers", "vocab", "heads", "kv-heads", "head-dim"):
        p.add_argument(f"--{dim}", type=int, default=None, metavar="N")
    p.add_argument("--max-shard-size", type=int, default=None, metavar="BYTES",
                   help="greedy shard cut (default: 10e9 for --full, else scaled to the total)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    a = p.parse_args(argv)
    dims = dict(hidden=a.hidden, intermediate=a.intermediate, layers=a.layers, vocab=a.vocab,
                heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim)
    t0 = time.perf_counter()
    try:
        out = make_checkpoint(a.outdir, full=a.full, seed=a.seed, max_shard_size=a.max_shard_size,
                              dry_run=a.dry_run, verbose=True, **dims)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not a.dry_run:
        print(f"done: {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

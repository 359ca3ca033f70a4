#!/usr/bin/env python3
"""Benchmark FP8 block dequantization (issue 20) against a raw pipelined copy of the same output bytes.

One invocation writes a DeepSeek-V3-style FP8 checkpoint (a Llama-shaped decoder whose linear
weights are ``F8_E4M3`` with an F32 ``weight_scale_inv`` per 128x128 block, norms, embeddings and
head in BF16, config.json with ``quantization_config``; random bytes, no NaN patterns), then times,
as child processes through ``run.py``'s launcher (wall time, user/sys CPU and peak RSS from
``wait4``), several rounds in rotated order:

* ``raw pipelined copy (baseline)``: ``run.py --raw-copy`` of the dequantized output's own shards
  (planned as a ``keep`` of the output of one untimed apply): the least work that writes the
  same output bytes (reader thread, 4 MiB page-aligned buffers, writer thread, fsync per shard);
* ``apply (dequantize to bfloat16)``: ``tensorsurgery apply`` of ``plan = "keep"``, ``dtype = "bfloat16"``;
* ``verify MANIFEST OUTPUT`` of that output (the dequantization made again, compared byte for byte).

The raw copy's shards are checked byte-identical to apply's before the timed runs. Everything is
written in a new folder under ``/dev/shm`` (or ``--workdir``) and removed at the end.

Usage::

    python benchmarks/dequant.py [--format fp8|mxfp4] [--size tiny|default] [--runs N] [--workdir DIR]
                                 [--repo PATH] [--max-wait SECONDS] [--json]

``--format mxfp4`` writes a GPT-OSS-shaped checkpoint (MXFP4 experts) instead; it needs torch and
transformers (the config and tensor names come from transformers' GptOss classes).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as runner  # noqa: E402 - the launcher, the raw copy, the table: one definition of each

#: --size -> (layers, hidden, intermediate, kv rows, vocab). ``tiny`` proves the runner works.
SIZES = {"tiny": (2, 256, 640, 128, 1024), "default": (16, 2048, 5632, 512, 32000)}
BLOCK = 128
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}


def _tensors(size: str) -> list[tuple[str, str, tuple[int, ...]]]:
    layers, hidden, inter, kv, vocab = SIZES[size]
    out = [("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", "BF16", (hidden,)), (p + "post_attention_layernorm.weight", "BF16",
                                                                    (hidden,))]
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv, hidden)),
                            ("self_attn.v_proj", (kv, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                            ("mlp.down_proj", (hidden, inter))):
            out.append((p + name + ".weight", "F8_E4M3", shape))
            out.append((p + name + ".weight_scale_inv", "F32", (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))))
    return out + [("model.norm.weight", "BF16", (hidden,)), ("lm_head.weight", "BF16", (vocab, hidden))]


def _write(folder: Path, specs: list[tuple[str, str, tuple[int, ...]]], seed: int) -> int:
    """One ``model.safetensors`` of ``specs`` (name, dtype, shape) with seeded random values."""
    folder.mkdir(parents=True)
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        n = int(np.prod(shape)) * {"F8_E4M3": 1, "U8": 1, "BF16": 2, "F32": 4}[dtype]
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps(meta, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    rng = np.random.default_rng(seed)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for name, dtype, shape in specs:
            f.write(_values(name, dtype, shape, rng))
    return offset


def _values(name: str, dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> bytes:
    n = int(np.prod(shape))
    if dtype == "U8":  # MXFP4: any nibbles; exponents near 127, as trained weights have them
        return rng.integers(118, 130, n, dtype=np.uint8).tobytes() if name.endswith("_scales") else \
            rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    if dtype == "F8_E4M3":
        raw = rng.integers(0, 256, n, dtype=np.uint8)
        return np.where((raw & 0x7F) == 0x7F, raw ^ 1, raw).astype(np.uint8).tobytes()  # no NaN weights
    if dtype == "F32":
        return rng.uniform(1e-4, 1e-3, n).astype(np.float32).tobytes()
    bits = (rng.standard_normal(n, dtype=np.float32) * 0.02).view(np.uint32) >> 16  # bfloat16, truncated
    return bits.astype(np.uint16).tobytes()


def make_fp8_checkpoint(folder: Path, size: str, seed: int = 0) -> int:
    """Write the FP8 checkpoint of ``size`` into ``folder`` (one ``model.safetensors`` and
    config.json); returns its tensor bytes."""
    offset = _write(folder, _tensors(size), seed)
    layers, hidden, inter, kv, vocab = SIZES[size]
    heads = hidden // 128
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv // 128, "head_dim": 128, "vocab_size": vocab, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "quantization_config": QUANT}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return offset


#: --format mxfp4 --size -> GptOssConfig overrides (GPT-OSS-20B's hidden and expert sizes, fewer of them).
MXFP4_SIZES = {"tiny": {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2, "num_local_experts": 4,
                        "head_dim": 32, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1024},
               "default": {"hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 2,
                           "num_local_experts": 16, "vocab_size": 32000}}


def make_mxfp4_checkpoint(folder: Path, size: str, seed: int = 0) -> int:
    """A GPT-OSS-shaped checkpoint (config and tensor names from transformers' GptOss classes,
    built on the meta device): expert tensors as MXFP4 ``_blocks``/``_scales`` (random nibbles,
    exponents 118..129), the rest BF16; returns its tensor bytes."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    dims = MXFP4_SIZES[size]
    layer_types = ["sliding_attention", "full_attention"] * (dims["num_hidden_layers"] // 2)
    config = GptOssConfig(**dims, layer_types=layer_types, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GptOssForCausalLM(config).state_dict().items()}
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    for name, shape in shapes.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, inner, outer = shape
            specs += [(name + "_blocks", "U8", (experts, outer, inner // 32, 16)),
                      (name + "_scales", "U8", (experts, outer, inner // 32))]
        else:
            specs.append((name, "BF16", shape))
    total = _write(folder, specs, seed)
    cfg = {**config.to_dict(), "architectures": ["GptOssForCausalLM"], "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]}}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="default")
    p.add_argument("--format", choices=("fp8", "mxfp4"), default="fp8", help="the quantized source (default: fp8)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", type=Path, help="a folder on tmpfs (default: a new one under /dev/shm)")
    p.add_argument("--repo", type=Path, default=runner.DEFAULT_REPO, help="the checkout to measure")
    p.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for a quiet machine")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    repo = runner.probe_repo(args.repo)
    base = args.workdir or (runner.TMPFS_ROOT if runner.TMPFS_ROOT.is_dir() else None)
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tensorsurgery-dequant-", dir=base)).resolve()
    try:
        return _benchmark(args, repo, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _benchmark(args: argparse.Namespace, repo: runner.Repo, work: Path) -> int:
    source, bench = work / "source", work / "bench"
    bench.mkdir()
    runner.log(f"writing the {args.size} {args.format} checkpoint in {source} ...")
    make = make_fp8_checkpoint if args.format == "fp8" else make_mxfp4_checkpoint
    source_bytes = make(source, args.size)
    out = bench / "out"
    manifest = bench / "dequant.toml"
    manifest.write_text(f'[source]\nmodel = "{source}"\n[layers]\nplan = "keep"\n[output]\n'
                        f'path = "{out / "apply"}"\ndtype = "bfloat16"\n')
    env = {**runner.child_env(repo.path), runner.HASH_CACHE_ENV: str(bench / "hash-cache")}
    made = out / "made"  # one untimed apply: the raw copy's source (and it fills the hash cache)
    time.sleep(2.5)  # the hash cache takes no file younger than 2 s (a write could share its mtime tick)
    warm = runner.measure(repo.ts("apply", str(manifest), "--no-progress", "--output", str(made)),
                          bench / "warm.log", env)
    if warm["exit"] != 0:
        raise SystemExit(f"dequant.py: error: apply failed: {runner._tail(bench / 'warm.log')}")
    copy = bench / "copy.toml"
    copy.write_text(f'[source]\nmodel = "{made}"\n[layers]\nplan = "keep"\n[output]\npath = "{out / "raw"}"\n')
    spec = runner.build_spec(repo.path, copy, out / "raw", bench / "raw.json")
    assert spec["transforms"] == 0, spec["transforms"]
    rows = [
        runner.Approach("raw", "raw pipelined copy (baseline: the dequantized output's bytes)",
                        [sys.executable, str(runner.THIS), "--raw-copy", str(bench / "raw.json")], out / "raw"),
        runner.Approach("dequant", f"apply ({'FP8 blocks' if args.format == 'fp8' else 'MXFP4'} -> bfloat16)",
                        repo.ts("apply", str(manifest), "--no-progress"),
                        out / "apply"),
        runner.Approach("verify", "verify MANIFEST OUTPUT (the dequantization made again)",
                        repo.ts("verify", str(manifest), str(out / "apply"), "--no-progress"), after="dequant"),
    ]
    # The baseline writes the very shards apply writes.
    runner.run_one(rows[0], bench, 0, {"dropped": 0, "why": None, "max_wait": 0, "tmpfs": True, "env": env,
                                       "runs": 0})
    shards = sorted(p.name for p in made.glob("*.safetensors"))
    if not shards or not all(filecmp.cmp(made / s, out / "raw" / s, shallow=False) for s in shards):
        raise SystemExit("dequant.py: error: the raw copy's shards differ from apply's")
    rows[0].samples.clear()
    ctx = {"dropped": 0, "why": None, "max_wait": args.max_wait, "tmpfs": True, "env": env}
    runner.run_all(rows, bench, args.runs, ctx)
    summary = runner.summarize(rows)
    command = " ".join(["python benchmarks/dequant.py", "--format", args.format, "--size", args.size, "--runs",
                        str(args.runs)])
    m = runner.machine(work, repo)
    if args.json:
        print(json.dumps({"command": command, "source_bytes": source_bytes, "machine": m, "results": summary},
                         indent=2))
    else:
        print(f"{command}\n{runner.format_machine(m)}\nsource: {source_bytes:,} bytes of tensors ({args.format}, "
              f"scales, BF16), {args.runs} run(s) each, order rotated; files on {runner.filesystem(work)['fstype']}\n")
        print(runner.format_table(summary))
    return 0 if all(r.get("samples") for r in summary) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark merging a LoRA adapter (issue 20) against a raw pipelined copy of the same output bytes.

One invocation writes a mid-size synthetic BF16 Llama-shaped checkpoint and two peft-style LoRA
adapters of it (every linear projection, float32 factors, rank 16 and rank 128), then times, as
child processes through ``run.py``'s launcher (wall time, user/sys CPU and peak RSS from
``wait4``), several rounds in rotated order:

* ``raw pipelined copy (baseline)``: ``run.py --raw-copy`` of the merged output's own shards
  (planned as a ``keep`` of the output of one untimed apply): the least work that writes the
  same output bytes;
* ``apply (adapter r=16)`` and ``apply (adapter r=128)``: ``tensorsurgery apply`` of
  ``plan = "keep"`` with ``adapter =`` on the source;
* ``verify MANIFEST OUTPUT`` of the rank-16 output (the merge made again, compared byte for byte).

``--dora``: the adapters are DoRA ones (``use_dora``, a float32 ``lora_magnitude_vector`` per
module), so each merged row is also normed and scaled.

``--peft``: also ``peft merge_and_unload`` at each rank, as people merge today: transformers loads
the whole base, peft merges every module and ``save_pretrained`` writes the output (the oracle the
tests compare our bytes with, here for its time and memory).

Everything is written in a new folder under ``/dev/shm`` (or ``--workdir``) and removed at the end.

Usage::

    python benchmarks/lora.py [--size tiny|default] [--runs N] [--dora] [--peft] [--workdir DIR]
                              [--repo PATH] [--max-wait SECONDS] [--json]
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
SIZES = {"tiny": (2, 256, 640, 128, 1024), "default": (8, 2048, 5632, 512, 32000)}
RANKS = (16, 128)
#: The peft baseline, run as a child: base folder, adapter folder, output folder.
PEFT_MERGE = ("import sys, torch; from transformers import AutoModelForCausalLM; from peft import PeftModel; "
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16); "
              "PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])")
_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


def _shapes(size: str) -> dict[str, tuple[int, int]]:
    _, hidden, inter, kv, _ = SIZES[size]
    return {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter)}


def _write(path: Path, specs: list[tuple[str, str, tuple[int, ...]]], values) -> int:
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in specs:
        n = int(np.prod(shape)) * {"BF16": 2, "F32": 4}[dtype]
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps(meta, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for _, dtype, shape in specs:
            f.write(values(dtype, shape))
    return offset


def make_base(folder: Path, size: str, seed: int = 0) -> int:
    """A BF16 Llama-shaped checkpoint of ``size`` in ``folder``; returns its tensor bytes."""
    layers, hidden, inter, kv, vocab = SIZES[size]
    folder.mkdir(parents=True)
    specs = [("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", "BF16", (hidden,)),
                  (p + "post_attention_layernorm.weight", "BF16", (hidden,))]
        specs += [(p + name + ".weight", "BF16", shape) for name, shape in _shapes(size).items()]
    specs += [("model.norm.weight", "BF16", (hidden,)), ("lm_head.weight", "BF16", (vocab, hidden))]
    rng = np.random.default_rng(seed)

    def values(_dtype: str, shape: tuple[int, ...]) -> bytes:
        bits = (rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * 0.02).view(np.uint32) >> 16
        return bits.astype(np.uint16).tobytes()

    total = _write(folder / "model.safetensors", specs, values)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
              "num_key_value_heads": kv // 128, "head_dim": 128, "vocab_size": vocab, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def make_adapter(folder: Path, size: str, r: int, seed: int = 1, dora: bool = False) -> int:
    """A peft LoRA folder of rank ``r`` on every projection (float32 factors; with ``dora``, a
    float32 magnitude per output row too); returns its tensor bytes."""
    folder.mkdir(parents=True)
    specs = []
    for i in range(SIZES[size][0]):
        for name, (rows, cols) in _shapes(size).items():
            key = f"base_model.model.model.layers.{i}.{name}"
            specs += [(key + ".lora_A.weight", "F32", (r, cols)), (key + ".lora_B.weight", "F32", (rows, r))]
            specs += [(key + ".lora_magnitude_vector", "F32", (rows,))] if dora else []
    rng = np.random.default_rng(seed)
    total = _write(folder / "adapter_model.safetensors", specs,
                   lambda _dtype, shape: (rng.standard_normal(shape, dtype=np.float32) * 0.01).tobytes())
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": [p.split(".")[1] for p in _PROJ],
        "use_rslora": False, "use_dora": dora, "fan_in_fan_out": False, "task_type": "CAUSAL_LM"}))
    return total


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="default")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", type=Path, help="a folder on tmpfs (default: a new one under /dev/shm)")
    p.add_argument("--repo", type=Path, default=runner.DEFAULT_REPO, help="the checkout to measure")
    p.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for a quiet machine")
    p.add_argument("--dora", action="store_true", help="DoRA adapters (use_dora, a magnitude per row)")
    p.add_argument("--peft", action="store_true", help="also peft's merge_and_unload + save_pretrained")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    repo = runner.probe_repo(args.repo)
    base = args.workdir or (runner.TMPFS_ROOT if runner.TMPFS_ROOT.is_dir() else None)
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tensorsurgery-lora-", dir=base)).resolve()
    try:
        return _benchmark(args, repo, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _benchmark(args: argparse.Namespace, repo: runner.Repo, work: Path) -> int:
    source, bench = work / "source", work / "bench"
    bench.mkdir()
    runner.log(f"writing the {args.size} checkpoint and its adapters in {work} ...")
    source_bytes = make_base(source, args.size)
    adapter_bytes = {r: make_adapter(work / f"adapter-r{r}", args.size, r, dora=args.dora)
                     for r in RANKS}
    out = bench / "out"
    manifests = {}
    for r in RANKS:
        manifests[r] = bench / f"lora-r{r}.toml"
        manifests[r].write_text(f'[source]\nmodel = "{source}"\nadapter = "{work / f"adapter-r{r}"}"\n'
                                f'[layers]\nplan = "keep"\n[output]\npath = "{out / f"r{r}"}"\n')
    env = {**runner.child_env(repo.path), runner.HASH_CACHE_ENV: str(bench / "hash-cache")}
    made = out / "made"  # one untimed apply: the raw copy's source (and it fills the hash cache)
    time.sleep(2.5)  # the hash cache takes no file younger than 2 s
    warm = runner.measure(repo.ts("apply", str(manifests[RANKS[0]]), "--no-progress", "--output", str(made)),
                          bench / "warm.log", env)
    if warm["exit"] != 0:
        raise SystemExit(f"lora.py: error: apply failed: {runner._tail(bench / 'warm.log')}")
    copy = bench / "copy.toml"
    copy.write_text(f'[source]\nmodel = "{made}"\n[layers]\nplan = "keep"\n[output]\npath = "{out / "raw"}"\n')
    spec = runner.build_spec(repo.path, copy, out / "raw", bench / "raw.json")
    assert spec["transforms"] == 0, spec["transforms"]
    kind = "DoRA" if args.dora else "LoRA"
    rows = [
        runner.Approach("raw", "raw pipelined copy (baseline: the merged output's bytes)",
                        [sys.executable, str(runner.THIS), "--raw-copy", str(bench / "raw.json")], out / "raw"),
        *(runner.Approach(f"lora-r{r}", f"apply (BF16 base + {kind} r={r})",
                          repo.ts("apply", str(manifests[r]), "--no-progress"), out / f"r{r}") for r in RANKS),
        runner.Approach("verify", f"verify MANIFEST OUTPUT (r={RANKS[0]}: the merge made again)",
                        repo.ts("verify", str(manifests[RANKS[0]]), str(out / f"r{RANKS[0]}"), "--no-progress"),
                        after=f"lora-r{RANKS[0]}"),
        *(runner.Approach(f"peft-r{r}", f"peft merge_and_unload + save_pretrained ({kind} r={r})",
                          [sys.executable, "-c", PEFT_MERGE, str(source), str(work / f"adapter-r{r}"),
                           str(out / f"peft-r{r}")], out / f"peft-r{r}") for r in (RANKS if args.peft else ())),
    ]
    runner.run_one(rows[0], bench, 0, {"dropped": 0, "why": None, "max_wait": 0, "tmpfs": True, "env": env,
                                       "runs": 0})
    shards = sorted(p.name for p in made.glob("*.safetensors"))
    if not shards or not all(filecmp.cmp(made / s, out / "raw" / s, shallow=False) for s in shards):
        raise SystemExit("lora.py: error: the raw copy's shards differ from apply's")
    rows[0].samples.clear()
    ctx = {"dropped": 0, "why": None, "max_wait": args.max_wait, "tmpfs": True, "env": env}
    runner.run_all(rows, bench, args.runs, ctx)
    summary = runner.summarize(rows)
    command = " ".join(["python benchmarks/lora.py", "--size", args.size, "--runs", str(args.runs)]
                       + (["--dora"] if args.dora else []) + (["--peft"] if args.peft else []))
    m = runner.machine(work, repo)
    if args.json:
        print(json.dumps({"command": command, "source_bytes": source_bytes, "adapter_bytes": adapter_bytes,
                          "machine": m, "results": summary}, indent=2))
    else:
        print(f"{command}\n{runner.format_machine(m)}\nsource: {source_bytes:,} bytes of BF16 tensors; adapters: "
              + ", ".join(f"r={r} {n:,} bytes (F32)" for r, n in adapter_bytes.items())
              + f"; {args.runs} run(s) each, order rotated; files on {runner.filesystem(work)['fstype']}\n")
        print(runner.format_table(summary))
    return 0 if all(r.get("samples") for r in summary) else 1


if __name__ == "__main__":
    sys.exit(main())

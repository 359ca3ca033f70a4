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

``--moe``: the base is a Qwen3-MoE-shaped one (each layer's MLP 16 experts of intermediate 768,
stored one expert at a time as transformers saves them) and the adapters are peft's
``target_parameters`` LoRAs on the fused ``mlp.experts.gate_up_proj`` and ``down_proj`` (plus the
attention projections), merged into every expert's ``gate_proj``/``up_proj``/``down_proj``.

``--dora``: the adapters are DoRA ones (``use_dora``, a float32 ``lora_magnitude_vector`` per
module), so each merged row is also normed and scaled.

``--merge``: also a linear merge (weights 0.5, 0.5) of the base with the rank-16 adapter and a
second model of the same shape, mergekit's ``model: BASE+ADAPTER`` (the adapted tensors made while
the merge reads them: ``tensorsurgery.ops.derived``), beside the same merge without the adapter.

``--peft``: also ``peft merge_and_unload`` at each rank, as people merge today: transformers loads
the whole base, peft merges every module and ``save_pretrained`` writes the output (the oracle the
tests compare our bytes with, here for its time and memory).

Everything is written in a new folder under ``/dev/shm`` (or ``--workdir``) and removed at the end.

Usage::

    python benchmarks/lora.py [--size tiny|default] [--runs N] [--moe] [--dora] [--peft] [--workdir DIR]
                              [--merge] [--repo PATH] [--max-wait SECONDS] [--json]
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
#: --moe: experts and their intermediate size (Qwen3-30B-A3B has 128 of 768; fewer keep it mid-size).
MOE = (16, 768)
_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
#: The peft baseline, run as a child: base folder, adapter folder, output folder.
PEFT_MERGE = ("import sys, torch; from transformers import AutoModelForCausalLM; from peft import PeftModel; "
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16); "
              "PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])")
_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


def _shapes(size: str, moe: bool = False) -> dict[str, tuple[int, int]]:
    """Each layer's 2-D tensors (name -> shape): with ``moe``, every expert's instead of the MLP's."""
    _, hidden, inter, kv, _ = SIZES[size]
    if moe:
        experts, inter = MOE
        mlp = {f"mlp.experts.{e}.{n}": shape for e in range(experts)
               for n, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                ("down_proj", (hidden, inter)))}
        return {**{k: v for k, v in _shapes(size).items() if k in _ATTENTION}, "mlp.gate": (experts, hidden), **mlp}
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


def make_base(folder: Path, size: str, seed: int = 0, moe: bool = False) -> int:
    """A BF16 Llama-shaped (``moe``: Qwen3-MoE-shaped) checkpoint of ``size`` in ``folder``;
    returns its tensor bytes."""
    layers, hidden, inter, kv, vocab = SIZES[size]
    folder.mkdir(parents=True)
    specs = [("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", "BF16", (hidden,)),
                  (p + "post_attention_layernorm.weight", "BF16", (hidden,))]
        specs += [(p + name + ".weight", "BF16", shape) for name, shape in _shapes(size, moe).items()]
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
    if moe:
        config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=MOE[0],
                      num_experts_per_tok=2, moe_intermediate_size=MOE[1], decoder_sparse_step=1, mlp_only_layers=[])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def make_adapter(folder: Path, size: str, r: int, seed: int = 1, dora: bool = False, moe: bool = False) -> int:
    """A peft LoRA folder of rank ``r`` on every projection (float32 factors; with ``dora``, a
    float32 magnitude per output row too; with ``moe``, on the attention projections and the
    fused expert parameters, as peft's ``target_parameters`` saves them); returns its tensor bytes."""
    folder.mkdir(parents=True)
    specs = []
    hidden = SIZES[size][1]
    experts, inter = MOE
    for i in range(SIZES[size][0]):
        for name, (rows, cols) in _shapes(size).items():
            if moe and name not in _ATTENTION:
                continue
            key = f"base_model.model.model.layers.{i}.{name}"
            specs += [(key + ".lora_A.weight", "F32", (r, cols)), (key + ".lora_B.weight", "F32", (rows, r))]
            specs += [(key + ".lora_magnitude_vector", "F32", (rows,))] if dora else []
        if moe:  # gate_up_proj [E, 2I, H] innermost (registered first), then down_proj [E, H, I]
            key = f"base_model.model.model.layers.{i}.mlp.experts"
            specs += [(key + ".base_layer.lora_A.weight", "F32", (experts * r, hidden)),
                      (key + ".base_layer.lora_B.weight", "F32", (2 * inter, r * experts)),
                      (key + ".lora_A.weight", "F32", (experts * r, inter)),
                      (key + ".lora_B.weight", "F32", (hidden, r * experts))]
    rng = np.random.default_rng(seed)
    total = _write(folder / "adapter_model.safetensors", specs,
                   lambda _dtype, shape: (rng.standard_normal(shape, dtype=np.float32) * 0.01).tobytes())
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
        "target_modules": [p.split(".")[1] for p in (_ATTENTION if moe else _PROJ)],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if moe else None,
        "use_rslora": False, "use_dora": dora, "fan_in_fan_out": False, "task_type": "CAUSAL_LM"}))
    return total


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="default")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", type=Path, help="a folder on tmpfs (default: a new one under /dev/shm)")
    p.add_argument("--repo", type=Path, default=runner.DEFAULT_REPO, help="the checkout to measure")
    p.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for a quiet machine")
    p.add_argument("--moe", action="store_true", help="a Qwen3-MoE base, LoRA on its fused expert parameters")
    p.add_argument("--dora", action="store_true", help="DoRA adapters (use_dora, a magnitude per row)")
    p.add_argument("--peft", action="store_true", help="also peft's merge_and_unload + save_pretrained")
    p.add_argument("--merge", action="store_true", help="also a linear merge of the base+adapter with another model")
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
    if args.moe and args.dora:
        raise SystemExit("lora.py: error: --moe with --dora: peft's target_parameters cannot be DoRA")
    source_bytes = make_base(source, args.size, moe=args.moe)
    adapter_bytes = {r: make_adapter(work / f"adapter-r{r}", args.size, r, dora=args.dora, moe=args.moe)
                     for r in RANKS}
    out = bench / "out"
    merges = {}
    if args.merge:  # the base+adapter (r = 16) merged with a second model, and the same without the adapter
        make_base(work / "other", args.size, seed=2, moe=args.moe)
        for key, adapter in (("merge", f'adapter = "{work / f"adapter-r{RANKS[0]}"}"\n'), ("merge-plain", "")):
            merges[key] = bench / f"{key}.toml"
            merges[key].write_text(f'[sources.a]\nmodel = "{source}"\n{adapter}'
                                   f'[sources.b]\nmodel = "{work / "other"}"\n[merge]\nmethod = "linear"\n'
                                   f'[merge.models.a]\nweight = 0.5\n'
                                   f'[merge.models.b]\nweight = 0.5\n[output]\npath = "{out / key}"\n')
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
    kind = ("DoRA" if args.dora else "LoRA") + (" on experts" if args.moe else "")
    with_adapter = f" + {kind} r={RANKS[0]}"
    rows = [
        runner.Approach("raw", "raw pipelined copy (baseline: the merged output's bytes)",
                        [sys.executable, str(runner.THIS), "--raw-copy", str(bench / "raw.json")], out / "raw"),
        *(runner.Approach(f"lora-r{r}", f"apply (BF16 base + {kind} r={r})",
                          repo.ts("apply", str(manifests[r]), "--no-progress"), out / f"r{r}") for r in RANKS),
        runner.Approach("verify", f"verify MANIFEST OUTPUT (r={RANKS[0]}: the merge made again)",
                        repo.ts("verify", str(manifests[RANKS[0]]), str(out / f"r{RANKS[0]}"), "--no-progress"),
                        after=f"lora-r{RANKS[0]}"),
        *(runner.Approach(key, f"apply (linear merge of the base{with_adapter if key == 'merge' else ''} and "
                                f"another model)", repo.ts("apply", str(m), "--no-progress"), out / key)
          for key, m in merges.items()),
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
    flags = [f"--{f}" for f in ("moe", "dora", "peft", "merge") if getattr(args, f)]
    command = " ".join(["python benchmarks/lora.py", "--size", args.size, "--runs", str(args.runs), *flags])
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

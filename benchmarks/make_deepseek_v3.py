#!/usr/bin/env python3
"""Generate a DeepSeek-V3-shaped checkpoint as sparse files, and time tensorsurgery's header-only
commands on it (``scale``).

The checkpoint has the tensor names, dtypes and shapes of ``deepseek-ai/DeepSeek-V3`` on the
Hugging Face hub: 61 decoder layers (the first ``first_k_dense_replace = 3`` dense, the other 58
MoE with 256 routed experts and 1 shared expert), MLA attention (``q_a_proj``,
``q_a_layernorm``, ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``,
``o_proj``), the router (``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``), FP8
(``F8_E4M3``) linear weights each with a ``weight_scale_inv`` F32 tensor of 128x128 blocks, BF16
norms, embeddings, router and head, and the multi-token-prediction layer ``model.layers.61``
(a full MoE layer plus ``embed_tokens``, ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``,
``shared_head.head``). 91,991 tensors, 688.6 GB of tensor data, in 163 shards named
``model-000NN-of-000163.safetensors``, with ``model.safetensors.index.json``, ``config.json``
and ``generation_config.json`` as in the real repository.

Each shard is a real safetensors header followed by a hole: the file is truncated to its full
size, so it reads as zeros and takes almost no disk (~10 MB in all). Only header-reading
commands make sense on it (``inspect``, ``plan``, ``apply --dry-run``): anything that reads or
copies the data would read ~689 GB of zeros. The generator refuses a filesystem that would fill
the hole with real blocks.

Usage::

    python benchmarks/make_deepseek_v3.py OUT [--layers N] [--no-mtp] [--shards K]
    python benchmarks/make_deepseek_v3.py scale [--layers N] [--workdir DIR] [--repo PATH]
                                                [--runs N] [--cold] [--json] [--keep]

``--layers N``: N decoder layers (the first min(3, N) dense) and the MTP layer ``model.layers.N``;
the shard count scales with the size (163 at N = 61). ``--no-mtp`` leaves the MTP layer out (and
sets ``num_nextn_predict_layers = 0``).

``scale`` writes two such checkpoints (with and without the MTP layer) in a temporary folder,
manifests for them (``plan = "keep"`` with ``dtype`` unset; ``plan = "dus"``, overlap 8; and,
on the one without MTP, an explicit arrangement of the MoE layers only, the one shape today's
layer stacking accepts), then times ``tensorsurgery inspect``, ``plan`` and ``apply --dry-run``
of each as child processes (wall, user/sys CPU, peak RSS, exit code and the error line), against
the targets of 3 s and 100 MB, and removes everything.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tensorsurgery.formats.safetensors import encode_header

HERE = Path(__file__).resolve().parent

# deepseek-ai/DeepSeek-V3 config.json
HIDDEN = 7168
VOCAB = 129280
INTERMEDIATE = 18432
MOE_INTERMEDIATE = 2048
ROUTED_EXPERTS = 256
SHARED_EXPERTS = 1
Q_LORA_RANK = 1536
KV_LORA_RANK = 512
HEADS = 128
QK_NOPE_HEAD_DIM = 128
QK_ROPE_HEAD_DIM = 64
V_HEAD_DIM = 128
FIRST_K_DENSE = 3
LAYERS = 61
#: FP8 weights are scaled per block of 128 x 128 (``quantization_config.weight_block_size``).
BLOCK = 128
#: Shards of the real repository, for 61 layers plus the MTP layer.
SHARDS = 163
SHARD_METADATA = {"format": "pt"}

Spec = tuple[str, str, tuple[int, ...]]
_ITEMSIZE = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def _fp8(name: str, rows: int, cols: int) -> list[Spec]:
    """An FP8 linear weight and its inverse block scales."""
    return [(f"{name}.weight", "F8_E4M3", (rows, cols)),
            (f"{name}.weight_scale_inv", "F32", (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)))]


def _norm(name: str, size: int) -> list[Spec]:
    return [(f"{name}.weight", "BF16", (size,))]


def layer_specs(i: int, *, moe: bool, mtp: bool = False) -> list[Spec]:
    """The tensors of decoder layer ``i`` (MoE or dense), with the MTP extras when ``mtp``."""
    p = f"model.layers.{i}."
    out: list[Spec] = []
    if mtp:
        out += [(p + "embed_tokens.weight", "BF16", (VOCAB, HIDDEN))]
        out += _norm(p + "enorm", HIDDEN) + _norm(p + "hnorm", HIDDEN)
        out += [(p + "eh_proj.weight", "BF16", (HIDDEN, 2 * HIDDEN))]
    out += _norm(p + "input_layernorm", HIDDEN)
    a = p + "self_attn."
    out += _fp8(a + "q_a_proj", Q_LORA_RANK, HIDDEN)
    out += _norm(a + "q_a_layernorm", Q_LORA_RANK)
    out += _fp8(a + "q_b_proj", HEADS * (QK_NOPE_HEAD_DIM + QK_ROPE_HEAD_DIM), Q_LORA_RANK)
    out += _fp8(a + "kv_a_proj_with_mqa", KV_LORA_RANK + QK_ROPE_HEAD_DIM, HIDDEN)
    out += _norm(a + "kv_a_layernorm", KV_LORA_RANK)
    out += _fp8(a + "kv_b_proj", HEADS * (QK_NOPE_HEAD_DIM + V_HEAD_DIM), KV_LORA_RANK)
    out += _fp8(a + "o_proj", HIDDEN, HEADS * V_HEAD_DIM)
    out += _norm(p + "post_attention_layernorm", HIDDEN)
    m = p + "mlp."
    if moe:
        out += [(m + "gate.weight", "BF16", (ROUTED_EXPERTS, HIDDEN)),
                (m + "gate.e_score_correction_bias", "F32", (ROUTED_EXPERTS,))]
        for e in range(ROUTED_EXPERTS):
            out += _mlp(f"{m}experts.{e}.", MOE_INTERMEDIATE)
        out += _mlp(m + "shared_experts.", MOE_INTERMEDIATE * SHARED_EXPERTS)
    else:
        out += _mlp(m, INTERMEDIATE)
    if mtp:
        out += _norm(p + "shared_head.norm", HIDDEN)
        out += [(p + "shared_head.head.weight", "BF16", (VOCAB, HIDDEN))]
    return out


def _mlp(prefix: str, inter: int) -> list[Spec]:
    return (_fp8(prefix + "gate_proj", inter, HIDDEN) + _fp8(prefix + "up_proj", inter, HIDDEN)
            + _fp8(prefix + "down_proj", HIDDEN, inter))


def tensor_specs(layers: int = LAYERS, mtp: bool = True) -> list[Spec]:
    """Every tensor in file order: embeddings, the decoder layers, final norm and head, then the
    MTP layer (``model.layers.{layers}``), which the real repository keeps in its last shards."""
    specs: list[Spec] = [("model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN))]
    for i in range(layers):
        specs += layer_specs(i, moe=i >= FIRST_K_DENSE)
    specs += _norm("model.norm", HIDDEN) + [("lm_head.weight", "BF16", (VOCAB, HIDDEN))]
    if mtp:
        specs += layer_specs(layers, moe=layers >= FIRST_K_DENSE, mtp=True)
    return specs


def nbytes(spec: Spec) -> int:
    return _ITEMSIZE[spec[1]] * math.prod(spec[2])


def split_shards(specs: list[Spec], n: int) -> list[list[Spec]]:
    """Cut ``specs`` in order into ``n`` shards of about equal size (a tensor goes to the shard
    where its first byte falls), as the real repository's ~4.2 GB shards."""
    total = sum(map(nbytes, specs))
    shards: list[list[Spec]] = [[] for _ in range(n)]
    at = 0
    for s in specs:
        shards[min(n - 1, at * n // total)].append(s)
        at += nbytes(s)
    return [s for s in shards if s]


def config(layers: int = LAYERS, mtp: bool = True) -> dict:
    """config.json of deepseek-ai/DeepSeek-V3, with the layer count (and MTP count) given."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
        },
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": FIRST_K_DENSE,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "kv_lora_rank": KV_LORA_RANK,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": MOE_INTERMEDIATE,
        "moe_layer_freq": 1,
        "n_group": 8,
        "n_routed_experts": ROUTED_EXPERTS,
        "n_shared_experts": SHARED_EXPERTS,
        "norm_topk_prob": True,
        "num_attention_heads": HEADS,
        "num_experts_per_tok": 8,
        "num_hidden_layers": layers,
        "num_key_value_heads": HEADS,
        "num_nextn_predict_layers": 1 if mtp else 0,
        "pretraining_tp": 1,
        "q_lora_rank": Q_LORA_RANK,
        "qk_nope_head_dim": QK_NOPE_HEAD_DIM,
        "qk_rope_head_dim": QK_ROPE_HEAD_DIM,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [BLOCK, BLOCK],
        },
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "use_cache": True,
        "v_head_dim": V_HEAD_DIM,
        "vocab_size": VOCAB,
    }


GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
                     "temperature": 0.6, "top_p": 0.95, "transformers_version": "4.46.3"}


def _check_sparse(folder: Path) -> None:
    """Refuse a filesystem where truncating a file up allocates (and zero-fills) its blocks."""
    probe = folder / ".sparse-probe"
    try:
        with open(probe, "wb") as f:
            f.truncate(1 << 30)
        used = os.stat(probe).st_blocks * 512
    finally:
        probe.unlink(missing_ok=True)
    if used > (1 << 20):
        raise OSError(f"{folder}: this filesystem allocated {used:,} bytes for a 1 GiB hole; it does not "
                      f"support sparse files, and the checkpoint would take ~689 GB")


def make_deepseek_v3(out: str | os.PathLike[str], *, layers: int = LAYERS, mtp: bool = True,
                     shards: int | None = None) -> dict:
    """Write the sparse checkpoint into ``out``; returns a summary (tensors, shards, bytes)."""
    if layers < 1:
        raise ValueError(f"--layers must be at least 1, found {layers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_sparse(out)
    specs = tensor_specs(layers, mtp)
    total = sum(map(nbytes, specs))
    if shards is None:
        full = sum(map(nbytes, tensor_specs(LAYERS, True)))
        shards = max(1, round(SHARDS * total / full))
    groups = split_shards(specs, shards)
    n = len(groups)
    weight_map: dict[str, str] = {}
    header_bytes = 0
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{n:06d}.safetensors"
        entries, off = [], 0
        for tname, dtype, shape in group:
            entries.append((tname, dtype, shape, off, off + nbytes((tname, dtype, shape))))
            off += entries[-1][4] - entries[-1][3]
            weight_map[tname] = name
        header = encode_header(entries, SHARD_METADATA)
        header_bytes += len(header)
        with open(out / name, "wb") as f:
            f.write(header)
            f.truncate(len(header) + off)  # the data section: a hole
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config(layers, mtp), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    on_disk = sum(p.stat().st_blocks * 512 for p in out.iterdir())
    return {"path": str(out), "layers": layers, "mtp": mtp, "tensors": len(specs),
            "fp8_weights": sum(d == "F8_E4M3" for _, d, _ in specs),
            "scale_inv": sum(t.endswith("weight_scale_inv") for t, _, _ in specs),
            "shards": n, "total_size": total, "header_bytes": header_bytes, "disk_bytes": on_disk}


def _describe(s: dict) -> str:
    return (f"{s['path']}: {s['layers']} layers{' + MTP layer' if s['mtp'] else ''}, {s['tensors']:,} tensors "
            f"({s['fp8_weights']:,} FP8 weights, {s['scale_inv']:,} weight_scale_inv), {s['shards']} shards, "
            f"{s['total_size']:,} bytes of tensors as holes ({s['header_bytes'] / 1e6:.1f} MB of headers; "
            f"{s['disk_bytes'] / 1e6:.1f} MB on disk)")


# -- scale: time the header-only commands ----------------------------------------------------

#: Targets for the header-only commands on a DeepSeek-V3-sized checkpoint.
TARGET_S, TARGET_MB = 3.0, 100
#: RLIMIT_FSIZE of every timed command: should one write data after all, it fails at 1 GiB.
FSIZE_LIMIT = 1 << 30


def _manifests(bench: Path, source: Path, tag: str, layers: int, moe_only: bool) -> dict[str, Path]:
    out = bench / "out"
    head = f'[source]\nmodel = "{source}"\n\n'
    overlap = 8 if layers > 16 else max(1, layers // 2)
    texts = {
        f"{tag}-keep": head + f'[layers]\nplan = "keep"\n\n[output]\npath = "{out / (tag + "-keep")}"\n',
        f"{tag}-dus": (head + f'[layers]\nplan = "dus"\noverlap = {overlap}\n\n'
                       f'[output]\npath = "{out / (tag + "-dus")}"\n'),
    }
    if moe_only and layers > FIRST_K_DENSE:
        texts[f"{tag}-moe"] = (head + f'[layers]\nplan = "explicit"\narrangement = [[{FIRST_K_DENSE}, {layers}]]\n\n'
                               f'[output]\npath = "{out / (tag + "-moe")}"\n')
    paths = {}
    for key, text in texts.items():
        paths[key] = bench / f"{key}.toml"
        paths[key].write_text(text)
    return paths


def scale(args: argparse.Namespace) -> int:
    import run
    repo = run.probe_repo(args.repo)
    env = run.child_env(repo.path)
    created = args.workdir is None or not args.workdir.exists()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="tensorsurgery-dsv3-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    bench = workdir / "bench"
    written: list[Path] = []
    try:
        shutil.rmtree(bench, ignore_errors=True)
        bench.mkdir()
        sources = {}
        for tag, mtp in (("dsv3", True), ("dsv3-nomtp", False)):
            path = workdir / f"{tag}-{args.layers}"
            shutil.rmtree(path, ignore_errors=True)
            written.append(path)
            t0 = time.perf_counter()
            summary = make_deepseek_v3(path, layers=args.layers, mtp=mtp)
            run.log(f"generated in {time.perf_counter() - t0:.1f} s: {_describe(summary)}")
            sources[tag] = (path, summary)
        jobs: list[tuple[str, list[str]]] = []
        for tag, (path, _) in sources.items():
            manifests = _manifests(bench, path, tag, args.layers, moe_only=tag == "dsv3-nomtp")
            jobs.append((f"inspect {tag}", repo.ts("inspect", str(path))))
            for key, m in manifests.items():
                plan = key.removeprefix(tag + "-")
                jobs.append((f"plan {tag} {plan}", repo.ts("plan", str(m))))
                jobs.append((f"apply --dry-run {tag} {plan}", repo.ts("apply", str(m), "--dry-run", "--no-progress")))
        results = []
        for r in range(args.runs):
            for name, argv in jobs:
                if args.cold:
                    run.drop_caches()
                waited = run.wait_quiet(args.max_wait)
                logfile = bench / (name.replace(" ", "_").replace("-", "") + ".log")
                s = run.measure(argv, logfile, env, fsize_limit=FSIZE_LIMIT)
                s.update(name=name, run=r + 1, argv=argv, last_line=run._tail(logfile, 1), waited_s=round(waited, 1))
                results.append(s)
                run.log(f"[run {r + 1}/{args.runs}] {name}: exit {s['exit']}, "
                        + (f"{s['wall_s']:.2f} s, {s['maxrss_kb'] / 1024:.0f} MB" if "wall_s" in s else "no rusage")
                        + (f": {s['last_line']}" if s["exit"] else ""))
        report = _scale_report(results, jobs, sources, repo, args)
        print(json.dumps(report, indent=2) if args.json else _scale_table(report))
        return 0
    finally:
        shutil.rmtree(bench, ignore_errors=True)
        if not args.keep:
            for p in written:
                shutil.rmtree(p, ignore_errors=True)
            if created:
                shutil.rmtree(workdir, ignore_errors=True)


def _scale_report(results: list[dict], jobs, sources, repo, args) -> dict:
    import statistics
    rows = []
    for name, argv in jobs:
        samples = [s for s in results if s["name"] == name]
        ok = [s for s in samples if "wall_s" in s]
        row = {"command": name, "argv": argv, "exits": [s["exit"] for s in samples],
               "last_line": samples[-1]["last_line"], "samples": samples}
        if ok:
            row.update(median_wall_s=statistics.median(s["wall_s"] for s in ok),
                       median_user_s=statistics.median(s["user_s"] for s in ok),
                       median_sys_s=statistics.median(s["sys_s"] for s in ok),
                       peak_rss_mb=max(s["maxrss_kb"] for s in ok) / 1024,
                       max_other_cpus=max(s["other_cpus"] + s["steal_cpus"] for s in ok))
            row["meets_target"] = (all(e == 0 for e in row["exits"]) and row["median_wall_s"] < TARGET_S
                                   and row["peak_rss_mb"] < TARGET_MB)
        rows.append(row)
    return {"command": "python benchmarks/make_deepseek_v3.py scale " + " ".join(_scale_argv(args)),
            "tensorsurgery": {"repo": str(repo.path), "git": repo.git, "version": repo.version},
            "cache": "page cache dropped before each command" if args.cold else
                     "warm: headers in the page cache (just written)",
            "sources": {tag: s for tag, (_, s) in sources.items()},
            "targets": {"wall_s": TARGET_S, "peak_rss_mb": TARGET_MB}, "results": rows}


def _scale_argv(args: argparse.Namespace) -> list[str]:
    out = ["--layers", str(args.layers), "--runs", str(args.runs)]
    out += ["--repo", str(args.repo)] if args.repo.resolve() != HERE.parent else []
    out += ["--max-wait", f"{args.max_wait:g}"] if args.max_wait != 30 else []
    return out + ["--cold"] * args.cold + ["--json"] * args.json


def run_busy() -> float:
    import run
    return run.BUSY


def _scale_table(report: dict) -> str:
    lines = [report["command"],
             f"tensorsurgery {report['tensorsurgery']['version']} from {report['tensorsurgery']['repo']} "
             f"(git {report['tensorsurgery']['git']}); {report['cache']}"]
    for tag, s in report["sources"].items():
        lines.append(f"{tag}: {_describe(s)}")
    lines += ["", f"| command | exit | median wall s | user s | sys s | peak RSS MB | < {TARGET_S:g} s and "
              f"< {TARGET_MB} MB | other CPUs meanwhile |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    errors = []
    for r in report["results"]:
        exits = ",".join(map(str, sorted(set(r["exits"]))))
        if "median_wall_s" in r:
            lines.append(f"| {r['command']} | {exits} | {r['median_wall_s']:.2f} | {r['median_user_s']:.2f} | "
                         f"{r['median_sys_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                         f"{'yes' if r['meets_target'] else 'no'} | {r['max_other_cpus']:.2f} |")
        else:
            lines.append(f"| {r['command']} | {exits} | - | - | - | - | no | - |")
        if any(r["exits"]):
            errors.append(f"- {r['command']}: {r['last_line']}")
    notes = ["", f"other CPUs meanwhile = the most CPUs other processes (and steal) used during a run of the "
             f"command; above {run_busy()} the timing is noisy"]
    return "\n".join(lines + ([""] + errors if errors else []) + notes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["scale"]:
        p = argparse.ArgumentParser(prog="make_deepseek_v3.py scale",
                                    description="time tensorsurgery inspect, plan and apply --dry-run on "
                                                "DeepSeek-V3-shaped sparse checkpoints")
        p.add_argument("--layers", type=int, default=LAYERS, help=f"decoder layers ({LAYERS})")
        p.add_argument("--workdir", type=Path, help="where to write (default: a new folder in $TMPDIR)")
        p.add_argument("--repo", type=Path, default=HERE.parent, help="the tensorsurgery checkout to run")
        p.add_argument("--runs", type=int, default=1, help="runs of each command (1)")
        p.add_argument("--cold", action="store_true", help="drop the page cache before each command (root)")
        p.add_argument("--max-wait", type=float, default=30, metavar="SECONDS",
                       help="before each command, wait up to this long for other processes to go quiet (30)")
        p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return scale(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder (a folder named 'scale' must be given as ./scale)")
    p.add_argument("--layers", type=int, default=LAYERS, help=f"decoder layers ({LAYERS})")
    p.add_argument("--no-mtp", action="store_true", help="leave out the multi-token-prediction layer")
    p.add_argument("--shards", type=int, help=f"shard count (default: {SHARDS}, scaled with --layers)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        s = make_deepseek_v3(a.out, layers=a.layers, mtp=not a.no_mtp, shards=a.shards)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{_describe(s)}; {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

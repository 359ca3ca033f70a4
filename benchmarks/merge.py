#!/usr/bin/env python3
"""Merge benchmark: tensorsurgery's ``slerp``, ``ties``, ``linear``, ``task_arithmetic``, ``dare_linear``,
``dare_ties``, ``della``, ``della_linear``, ``sce``, ``karcher``, ``arcee_fusion`` and the other built
methods against mergekit on the same YAML, and against the least any merge can do, all in one process,
on tmpfs by default.

The models are synthetic Mistral-shaped bf16 checkpoints with normally distributed values
(``tests/synthetic.py``'s ``make_mistral``, one seed each; the base of task_arithmetic is
the first). The baseline (**raw**) reads every input file once and writes the output's bytes
once (a reader and a writer thread, 4 MiB buffers, fsync): a merge cannot move fewer bytes.
Each row prints wall time, its ratio to raw and to mergekit, and the command's own peak RSS
(``wait4``). mergekit's output is compared with ours byte for byte, and ``verify`` is timed too.
The DARE, DELLA and arcee_fusion rows run both with ``--random-seed`` (:data:`SEED`), and they, ``ties_rescale`` and
``karcher`` run mergekit with ``--num-threads 1`` (its rescale sums round otherwise with several threads).
Everything written is removed at the end.

    python benchmarks/merge.py [--layers N] [--models K] [--method M] [--workdir DIR] [--runs N] [--no-mergekit]
                               [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the synthetic checkpoints

from synthetic import SMALL, Dims, make_mistral, tensor_bytes  # noqa: E402

BUFFER = 4 << 20
#: The DARE rows' seed.
SEED = 42


#: A small launcher (python -S) that runs the command as its own child and reports that child's
#: peak RSS: a child of this process would carry this process's peak across fork and exec.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run(argv: list[str], env: dict[str, str], report: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``argv`` as a grandchild, which must exit 0."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(report), *argv], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - t0
    rss, code = report.read_text().split()
    if int(code) != 0:
        raise SystemExit(f"{argv[:3]} failed: {proc.stderr.decode()[-2000:]}")
    return wall, int(rss) / 1024


def raw(inputs: list[Path], out: Path, nbytes: int) -> float:
    """Read every input file once and write ``nbytes`` to ``out`` once, pipelined; wall seconds."""
    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for _ in range(4):
        free.put(bytearray(BUFFER))
    t0 = time.perf_counter()

    def reader() -> None:
        left = nbytes
        for path in inputs:
            with open(path, "rb", buffering=0) as f:
                while True:
                    buf = free.get()
                    n = f.readinto(buf)
                    if not n:
                        free.put(buf)
                        break
                    w = min(n, left)  # the output is as large as one input: write that much of the stream
                    left -= w
                    full.put((buf, w))
        full.put(None)

    thread = threading.Thread(target=reader)
    thread.start()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while (item := full.get()) is not None:
            buf, w = item
            if w:
                os.write(fd, memoryview(buf)[:w])
            free.put(buf)
        os.fsync(fd)
    finally:
        os.close(fd)
        thread.join()
    return time.perf_counter() - t0


def configs(models: list[Path]) -> dict[str, dict]:
    weights = [0.3, 0.45, 0.7, 0.2, 0.6][:len(models)]
    return {
        "slerp": {"merge_method": "slerp", "base_model": str(models[0]),
                  "models": [{"model": str(models[0])}, {"model": str(models[1])}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]}},
        "linear": {"merge_method": "linear",
                   "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)]},
        "ties": {"merge_method": "ties", "base_model": str(models[0]),
                 "models": [{"model": str(m), "parameters": {"weight": w, "density": 0.3}}
                            for m, w in zip(models[1:], weights)]},
        "ties_rescale": {"merge_method": "ties", "base_model": str(models[0]), "parameters": {"rescale": True},
                         "models": [{"model": str(m), "parameters": {"weight": w, "density": 0.3}}
                                    for m, w in zip(models[1:], weights)]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": str(models[0]),
                             "models": [{"model": str(m), "parameters": {"weight": w, "density": 0.5, "gamma": 0.05}}
                                        for m, w in zip(models[1:], weights)]},
        "model_stock": {"merge_method": "model_stock", "base_model": str(models[0]),
                        "models": [{"model": str(m)} for m in models[1:]]},
        "nuslerp": {"merge_method": "nuslerp", "base_model": str(models[0]),
                    "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models[1:3], weights)]},
        "multislerp": {"merge_method": "multislerp", "base_model": str(models[0]),
                       "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models[1:], weights)]},
        "karcher": {"merge_method": "karcher", "models": [{"model": str(m)} for m in models]},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": str(models[0]),
                         "models": [{"model": str(models[1])}]},
        "sce": {"merge_method": "sce", "base_model": str(models[0]), "parameters": {"select_topk": 0.3},
                "models": [{"model": str(m)} for m in models[1:]]},
        "nearswap": {"merge_method": "nearswap", "base_model": str(models[0]), "parameters": {"t": 0.1},
                     "models": [{"model": str(models[1])}]},
        **{method: {"merge_method": method, "base_model": str(models[0]),
                    "models": [{"model": str(m)} for m in models[1:]]} for method in ("ram", "ramplus_tl")},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(models[0]),
                            "models": [{"model": str(m), "parameters": {"weight": w}}
                                       for m, w in zip(models[1:], weights)]},
        **{method: {"merge_method": method, "base_model": str(models[0]),
                    "models": [{"model": str(m), "parameters": {"weight": w, "density": d}}
                               for m, w, d in zip(models[1:], weights, (0.5, 0.3, 0.7, 0.4))]}
           for method in ("dare_linear", "dare_ties", "della", "della_linear")},
    }


#: mergekit-yaml with torch.argsort, torch.sort and torch.topk made stable (the lowest index first among
#: equal values).
STABLE_MERGEKIT = ("import sys, torch; a, s = torch.argsort, torch.sort; "
                   "torch.argsort = lambda x, dim=-1, descending=False, **k: a(x, dim=dim, descending=descending, "
                   "stable=True); torch.sort = lambda x, dim=-1, descending=False, **k: s(x, dim=dim, "
                   "descending=descending, stable=True); "
                   "torch.topk = lambda x, k, dim=-1, largest=True, sorted=True: (lambda o: (torch.gather(x, dim, o), "
                   "o))(a(x, dim=dim, descending=largest, stable=True).narrow(dim, 0, k)); "
                   "from mergekit.scripts.run_yaml import main; sys.argv[0] = 'mergekit-yaml'; main()")
#: The methods whose result depends on which of equal values a sort or top-k keeps (and for sce
#: on torch's sums: run on one thread).
SORTING = ("ties", "breadcrumbs_ties", "sce")


def differing_elements(a: Path, b: Path) -> tuple[int, int]:
    """How many elements of ``a``'s tensors differ from ``b``'s, and the most units in the last
    place any one differs by (read with the official reader; (0, 0): bitwise equal)."""
    import torch
    from safetensors import safe_open

    def read(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for p in sorted(folder.glob("*.safetensors")):
            with safe_open(p, framework="pt") as f:  # bf16: torch (mergekit brings it)
                for k in f.keys():
                    out[k] = f.get_tensor(k)
        return out

    ours, theirs = read(a), read(b)
    assert ours.keys() == theirs.keys()
    count = most = 0
    for key, x in ours.items():
        y = theirs[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        bits = {2: torch.int16, 4: torch.int32}[x.element_size()]
        d = (x.contiguous().view(bits).long() - y.contiguous().view(bits).long()).abs()
        count += int((d != 0).sum())
        most = max(most, int(d.max()) if d.numel() else 0)
    return count, most


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="layers of each model (8: 0.5 GB of bf16 each)")
    p.add_argument("--models", type=int, default=3, help="models merged (task_arithmetic: the first is the base)")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    p.add_argument("--runs", type=int, default=1, help="runs of each row (the best is reported)")
    p.add_argument("--method", action="append", help="only this method (repeatable; default: all)")
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--json", action="store_true")
    return p


def measure(layers: int, count: int, workdir: Path | None, runs: int, methods: list[str] | None,
            with_mergekit: bool, dims: Dims = SMALL) -> list[dict]:
    """One row per method (``methods``; None: all): our apply and verify, the raw baseline and,
    ``with_mergekit`` and where installed, mergekit on the same YAML, with the elements that differ;
    the models are ``count`` synthetic Mistrals of shape ``dims`` with ``layers`` layers."""
    dims = replace(dims, layers=layers)
    size = tensor_bytes(dims)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    # the venv's own mergekit-yaml, found without the venv on PATH (python run by its full path)
    here = Path(sys.executable).parent / "mergekit-yaml"
    mergekit = (str(here) if here.exists() else shutil.which("mergekit-yaml")) if with_mergekit else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="ts-merge-bench-", dir=workdir) as tmp:
        bench = Path(tmp)
        models = [make_mistral(bench / f"m{i}", dims, seed=i, max_shard_size=max(1, size // 2 + 1), tokenizer=False)
                  for i in range(count)]
        for method, config in configs(models).items():
            if methods and method not in methods:
                continue
            seeded = ["--random-seed", str(SEED)] if method.startswith(("dare", "della", "arcee")) else []
            yml = bench / f"{method}.yml"
            yml.write_text(json.dumps(config))  # JSON is YAML
            merged = models[:2] if method in ("slerp", "nearswap", "arcee_fusion") else models  # the base and one other
            inputs = sorted(f for m in merged for f in m.glob("*.safetensors"))
            base = min(raw(inputs, bench / "raw.bin", size) for _ in range(runs))
            (bench / "raw.bin").unlink()
            ours = bench / f"ours-{method}"
            best = None
            for _ in range(runs):
                shutil.rmtree(ours, ignore_errors=True)
                t = run([sys.executable, "-m", "tensorsurgery", "apply", str(yml), "--output", str(ours),
                         "--no-progress", "--force", *seeded], env, bench / "rss")
                best = t if best is None or t[0] < best[0] else best
            assert best is not None
            verify = run([sys.executable, "-m", "tensorsurgery", "verify", str(yml), str(ours), "--no-progress",
                          *seeded], env, bench / "rss")
            row = {"method": method, "models": count, "layers": layers, "bytes_per_model": size, "raw_s": base,
                   "ours_s": best[0], "ours_rss_mb": best[1], "verify_s": verify[0], "verify_rss_mb": verify[1]}
            if mergekit:
                theirs = bench / f"mergekit-{method}"
                flags = [str(yml), str(theirs), "--device", "cpu", "--no-copy-tokenizer", "--no-write-model-card",
                         # the rescale sums (karcher's norms) round as ours on one torch thread only
                         "--quiet", *seeded, *(["--num-threads", "1"] if seeded or "rescale" in method or
                                               method == "karcher" else [])]
                t = run([mergekit, *flags], env, bench / "rss")
                row.update(mergekit_s=t[0], mergekit_rss_mb=t[1], differing=differing_elements(theirs, ours))
                shutil.rmtree(theirs)
                # which equal magnitudes it keeps (della: how it ranks them) is torch's unstable sort's choice
                if "ties" in method or method.startswith("della") or method in SORTING:
                    one = ["--num-threads", "1"] if method == "sce" else []
                    run([sys.executable, "-c", STABLE_MERGEKIT, *flags, *one], env, bench / "rss")
                    row.update(differing_stable=differing_elements(theirs, ours))
                    shutil.rmtree(theirs)
            shutil.rmtree(ours)
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    """The rows of :func:`measure` as a table, under a line that says the models' size."""
    if not rows:
        return "no merge rows"
    r0 = rows[0]
    lines = [f"{r0['models']} models of {r0['bytes_per_model'] / 1e9:.2f} GB (bf16, {r0['layers']} layers)",
             f"{'method':<16} {'raw s':>6} {'ours s':>7} {'x raw':>6} {'RSS MB':>7} {'verify s':>8} "
             f"{'mergekit s':>10} {'x mk':>5} {'mk RSS MB':>9} {'elements differing (max ulps)':>29}"]
    for r in rows:
        differing = "{} ({})".format(*r["differing"]) if "mergekit_s" in r else "-"
        mk = (f"{r['mergekit_s']:>10.2f} {r['ours_s'] / r['mergekit_s']:>5.2f} {r['mergekit_rss_mb']:>9.0f} "
              f"{differing:>29}") if "mergekit_s" in r else f"{'-':>10} {'-':>5} {'-':>9} {differing:>29}"
        lines.append(f"{r['method']:<16} {r['raw_s']:>6.2f} {r['ours_s']:>7.2f} {r['ours_s'] / r['raw_s']:>6.2f} "
                     f"{r['ours_rss_mb']:>7.0f} {r['verify_s']:>8.2f} {mk}")
        if "differing_stable" in r:
            lines.append(f"{'':<16} against mergekit with stable sorts: "
                         f"{'{} ({})'.format(*r['differing_stable'])} elements differing (max ulps)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    rows = measure(a.layers, a.models, a.workdir, a.runs, a.method, not a.no_mergekit)
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"workdir {a.workdir or 'default'}")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

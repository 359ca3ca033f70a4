#!/usr/bin/env python3
"""How long and how much memory reading one huge safetensors header takes: ours vs the official.

One invocation writes a sparse safetensors file whose header is just under the official reader's
100 MB limit (``MAX_HEADER_SIZE``) and whose data section is a hole (``truncate``: it costs no
disk), then measures, each in its own child process (a fresh interpreter, so nothing leaks between
measurements), wall time of the operation and the child's peak RSS (``ru_maxrss`` from
``os.wait4``; the RSS right after the imports is shown too):

* ``official keys``: ``safetensors.safe_open(path, framework="numpy")`` and ``keys()``: the Rust
  reader parses and validates the whole header at open, ``keys()`` makes the Python names.
* ``official full``: the same plus ``get_slice(name)`` with ``get_dtype()`` and ``get_shape()`` of
  every tensor, kept in a list: what our ``Header`` holds (names, dtypes, shapes) in Python objects.
* ``ours read_header``: ``tensorsurgery.formats.safetensors.read_header(path)``, the Header kept alive.
* ``plan keep`` and ``plan dus`` (``--names model`` only): ``tensorsurgery plan MANIFEST`` as a user
  runs it (the command line in-process, its summary printed to a buffer) on a manifest beside the
  file that keeps the layers or stacks them DUS-style (overlap: a quarter of the layers), with a
  Qwen3-MoE config.json: headers read, every output tensor planned, shard headers encoded.

and prints ratios (ours / official) for time and peak RSS. ``--apply`` measures instead, per run
and plan (``--only "plan keep"`` for one), ``tensorsurgery apply`` of the plan into ``WORKDIR-out``
(the tiny tensors are 256 bytes each, read from the hole: a 540k-tensor output is 138 MB), then
``verify MANIFEST OUTPUT``, then ``verify OUTPUT`` with the file renamed away (the record alone),
and prints each one's peak RSS against the budget of issue 18, 64 MB + 1 KB per output tensor.
``--baseline DIR`` adds ``baseline ...`` rows: our rows again with ``DIR`` (another checkout of
tensorsurgery, e.g. from ``git archive`` or ``git worktree``) first on ``PYTHONPATH``, for
before/after numbers measured side by side (the plan rows need a checkout with
``tensorsurgery.cli.main``). Runs alternate and the table shows medians. The file is removed at the
end unless ``--keep``.

Tensor names follow a mixture-of-experts model, ``model.layers.{i}.mlp.experts.{j}.{gate,up,
down}_proj.weight`` (``--names model``, the default: ~0.8M tensors fit in 100 MB, each entry being
~125 bytes of JSON), or are short, ``l{i}.e{j}.{g,u,d}`` with zero-size tensors (``--names short``:
the most tensors a 100 MB header can hold, ~1.6M; JSON needs ~48 bytes per entry before the name,
shape and offsets, so 1.7M tensors cannot fit under the limit with any naming).

Results and the commands that made them: ``benchmarks/README.md``, section "Header scale".

Usage::

    python benchmarks/header_scale.py [--names model|short] [--runs N] [--workdir DIR]
        [--max-header-bytes B] [--tensors N] [--baseline DIR] [--keep] [--json]
        [--only "official keys,ours read_header,..."] [--apply]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MAX_HEADER = 100_000_000

#: Child programs: argv[1] is the file. Each prints one JSON line: seconds and RSS after imports.
CHILDREN = {
    "official keys": """
import sys, time, json
from safetensors import safe_open
rss0 = open('/proc/self/status').read().split('VmRSS:')[1].split()[0]
t = time.perf_counter()
f = safe_open(sys.argv[1], framework="numpy")
keys = f.keys()
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "rss_after_imports_kb": int(rss0), "tensors": len(keys)}))
""",
    "official full": """
import sys, time, json
from safetensors import safe_open
rss0 = open('/proc/self/status').read().split('VmRSS:')[1].split()[0]
t = time.perf_counter()
f = safe_open(sys.argv[1], framework="numpy")
info = []
for k in f.keys():
    s = f.get_slice(k)
    info.append((k, s.get_dtype(), s.get_shape()))
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "rss_after_imports_kb": int(rss0), "tensors": len(info)}))
""",
    "ours read_header": """
import sys, time, json
from tensorsurgery.formats.safetensors import read_header
rss0 = open('/proc/self/status').read().split('VmRSS:')[1].split()[0]
t = time.perf_counter()
h = read_header(sys.argv[1])
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "rss_after_imports_kb": int(rss0), "tensors": len(h.entries)}))
""",
}
# ``tensorsurgery plan`` as a user runs it (the command line, its summary printed), on a manifest
# next to the file: argv[2] is the manifest. Only with --names model, whose layers a config.json
# beside the file describes.
_PLAN_CHILD = """
import io, sys, time, json, contextlib
from tensorsurgery.cli import main
rss0 = open('/proc/self/status').read().split('VmRSS:')[1].split()[0]
out = io.StringIO()
t = time.perf_counter()
with contextlib.redirect_stdout(out):
    code = main(["plan", sys.argv[2]])
dt = time.perf_counter() - t
assert code == 0, code
print(json.dumps({"seconds": dt, "rss_after_imports_kb": int(rss0), "tensors": None}))
"""
PLANS = {"plan keep": 'plan = "keep"', "plan dus": 'plan = "dus"\noverlap = {overlap}'}
CHILDREN.update({label: _PLAN_CHILD for label in PLANS})
# ``--apply``: the commands that write and read the output, in this order per run and plan (each a
# child as above; argv[2:] are the command's arguments). ``verify OUTPUT`` runs with the source
# renamed away, so it checks the record only.
_COMMAND_CHILD = """
import io, sys, time, json, contextlib
from tensorsurgery.cli import main
rss0 = open('/proc/self/status').read().split('VmRSS:')[1].split()[0]
out = io.StringIO()
t = time.perf_counter()
with contextlib.redirect_stdout(out):
    code = main(sys.argv[2:])
dt = time.perf_counter() - t
assert code == 0, (code, out.getvalue()[-2000:])
print(json.dumps({"seconds": dt, "rss_after_imports_kb": int(rss0), "tensors": None}))
"""
COMMANDS = ("apply", "verify MANIFEST OUTPUT", "verify OUTPUT")
OFFICIAL = ("official keys", "official full")
OURS = ("ours read_header", *PLANS)
BASELINE = "baseline "


def entry_json(name: str, dtype: str, shape: tuple[int, ...], start: int, end: int) -> str:
    shape_s = ",".join(map(str, shape))
    return (f'"{name}":{{"dtype":"{dtype}","shape":[{shape_s}],'
            f'"data_offsets":[{start},{end}]}}')


def tensor_stream(names: str):
    """Endless ``(name, dtype, shape, nbytes)`` in a model's order."""
    if names == "model":
        projs = [("gate_proj", (16, 8)), ("up_proj", (16, 8)), ("down_proj", (8, 16))]
        experts = 256
        layer = 0
        while True:
            for j in range(experts):
                for proj, shape in projs:
                    yield (f"model.layers.{layer}.mlp.experts.{j}.{proj}.weight", "BF16", shape,
                           shape[0] * shape[1] * 2)
            layer += 1
    else:
        layer = 0
        while True:
            for j in range(10000):
                for p in "gud":
                    yield f"l{layer}.e{j}.{p}", "BF16", (0,), 0
            layer += 1


def write_file(path: Path, names: str, max_header: int, tensors: int | None) -> tuple[int, int]:
    """Write the sparse file; return (tensor count, header bytes)."""
    parts: list[str] = []
    size = 1  # "{"
    offset = 0
    count = 0
    for name, dtype, shape, nbytes in tensor_stream(names):
        if tensors is not None and count == tensors:
            break
        piece = entry_json(name, dtype, shape, offset, offset + nbytes)
        if tensors is None and size + len(piece) + 1 + 1 + 7 > max_header:  # "," "}" padding
            break
        parts.append(piece)
        size += len(piece) + 1
        offset += nbytes
        count += 1
    raw = ("{" + ",".join(parts) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER:
        raise SystemExit(f"header of {len(raw)} bytes exceeds {MAX_HEADER}: the official reader "
                         f"would refuse it; use fewer --tensors or --names short")
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)  # data section: a hole
    if names == "model":
        write_plans(path.parent, layers=int(parts[-1].split(".", 3)[2]) + 1)
    return count, len(raw)


def write_plans(folder: Path, layers: int) -> None:
    """config.json of a Qwen3-MoE-shaped model with ``layers`` layers, and a manifest per plan
    row (``plan-keep.toml``, ``plan-dus.toml``; DUS overlaps a quarter of the layers)."""
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen3_moe", "num_hidden_layers": layers, "mlp_only_layers": [],
        "decoder_sparse_step": 1}))
    for label, layer_spec in PLANS.items():
        out = folder / "out"  # never written: plan only
        text = (f'[source]\nmodel = "{folder}"\n\n[layers]\n{layer_spec.format(overlap=layers // 4)}\n\n'
                f'[output]\npath = "{out}"\n')
        (folder / manifest_name(label)).write_text(text)


def manifest_name(label: str) -> str:
    return label.replace(" ", "-") + ".toml"


def measure(label: str, path: Path, baseline: Path | None = None,
            args: list[str] | None = None) -> dict:
    """Run ``label``'s child on ``path`` (``args`` after it: a command's arguments) and return its
    JSON line with wall time and peak RSS."""
    env = dict(os.environ)
    own = label.removeprefix(BASELINE)
    root = baseline if own != label and baseline is not None else REPO
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    program = _COMMAND_CHILD if args is not None else CHILDREN[own]
    argv = [sys.executable, "-c", program, str(path)]
    if args is not None:
        argv += args
    elif own in PLANS:
        argv.append(str(path.parent / manifest_name(own)))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(root))
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all children)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{label} failed ({proc.returncode}): {err.decode()[-2000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result.update(label=label, wall=wall, peak_mb=usage.ru_maxrss / 1024,
                  base_mb=result["rss_after_imports_kb"] / 1024)
    return result


def output_tensors(folder: Path) -> int:
    """How many tensors the output's shards hold (from their headers)."""
    count = 0
    for shard in folder.glob("*.safetensors"):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            count += len(json.loads(f.read(n))) - 1  # __metadata__
    return count


def command_runs(path: Path, plans: list[str], runs: int, baseline: Path | None) -> dict[str, list[dict]]:
    """``--apply``: per run and plan, ``apply`` into ``out``, ``verify MANIFEST OUTPUT``, then
    ``verify OUTPUT`` with the source renamed away (the record alone); the output removed after."""
    folder = path.parent
    out = folder.with_name(folder.name + "-out")  # outside the source folder, as apply requires
    hidden = folder / "model.safetensors.hidden"
    roots = [""] + ([BASELINE] if baseline else [])
    results: dict[str, list[dict]] = {}
    for run in range(runs):
        for root in roots[run % len(roots):] + roots[:run % len(roots)]:
            for plan in plans:
                manifest = str(folder / manifest_name(plan))
                steps = {"apply": ["apply", manifest, "--no-progress", "--output", str(out)],
                         "verify MANIFEST OUTPUT": ["verify", manifest, str(out), "--no-progress"],
                         "verify OUTPUT": ["verify", str(out), "--no-progress"]}
                try:
                    for command, argv in steps.items():
                        label = f"{root}{command} ({plan.removeprefix('plan ')})"
                        if command == "verify OUTPUT":
                            path.rename(hidden)
                        try:
                            r = measure(label, path, baseline, argv)
                        finally:
                            if hidden.exists():
                                hidden.rename(path)
                        if command == "apply":
                            r["tensors"] = output_tensors(out)
                        results.setdefault(label, []).append(r)
                        print(f"# run {run + 1} {label}: {r['seconds']:.2f} s, peak {r['peak_mb']:.0f} MB",
                              file=sys.stderr)
                finally:
                    shutil.rmtree(out, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--names", choices=["model", "short"], default="model")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where to write the file (default: a tmp dir)")
    ap.add_argument("--max-header-bytes", type=int, default=MAX_HEADER - 64)
    ap.add_argument("--tensors", type=int, default=None,
                    help="exactly this many tensors (default: as many as fit)")
    ap.add_argument("--only", default=None, help="comma-separated labels to run")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another tensorsurgery checkout whose read_header and plan rows to measure too "
                         "('baseline ...')")
    ap.add_argument("--apply", action="store_true",
                    help="measure apply, verify MANIFEST OUTPUT and verify OUTPUT (the record alone) of "
                         "the --only plans (default both) instead of the readers; output in WORKDIR-out")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    labels = [label for label in CHILDREN if args.names == "model" or label not in PLANS]
    if args.baseline:
        labels += [BASELINE + label for label in OURS if label in labels]
    if args.only is not None:
        labels = [s.strip() for s in args.only.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="header-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "model.safetensors"
    t = time.perf_counter()
    count, header_len = write_file(path, args.names, args.max_header_bytes, args.tensors)
    print(f"# {path}: {count:,} tensors, header {header_len:,} bytes, file "
          f"{path.stat().st_size:,} bytes (sparse), written in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    results: dict[str, list[dict]] = {label: [] for label in labels}
    try:
        if args.apply:
            if args.names != "model":
                raise SystemExit("--apply needs --names model (a config.json and manifests)")
            plans = [label for label in labels if label in PLANS] or list(PLANS)
            results = command_runs(path, plans, args.runs, args.baseline)
        for run in range(0 if args.apply else args.runs):
            order = labels[run % len(labels):] + labels[:run % len(labels)]
            for label in order:
                r = measure(label, path, args.baseline)
                assert r["tensors"] in (count, None), (label, r["tensors"], count)
                results[label].append(r)
                print(f"# run {run + 1} {label}: {r['seconds']:.2f} s, peak {r['peak_mb']:.0f} MB",
                      file=sys.stderr)
    finally:
        if not args.keep:
            for made in [path, workdir / "config.json", *(workdir / manifest_name(p) for p in PLANS)]:
                made.unlink(missing_ok=True)
            if args.workdir is None:
                workdir.rmdir()

    summary = {label: {"seconds": statistics.median(r["seconds"] for r in rs),
                       "tensors": rs[0]["tensors"],
                       "peak_mb": statistics.median(r["peak_mb"] for r in rs),
                       "base_mb": statistics.median(r["base_mb"] for r in rs),
                       "runs": [round(r["seconds"], 3) for r in rs]}
               for label, rs in results.items()}
    if args.json:
        print(json.dumps({"tensors": count, "header_bytes": header_len, "names": args.names,
                          "results": summary}, indent=1))
        return 0
    print(f"{count:,} tensors, header {header_len:,} bytes ({args.names} names), "
          f"median of {args.runs} run(s)\n")
    if args.apply:
        print_commands(summary, results)
        return 0
    refs = [o for o in OFFICIAL if o in summary]
    head = "| reader | seconds | peak RSS MB | RSS after imports MB |"
    sep = "|---|---:|---:|---:|"
    for o in refs:
        head += f" time / {o} | RSS / {o} |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    for label, s in summary.items():
        row = f"| {label} | {s['seconds']:.2f} | {s['peak_mb']:.0f} | {s['base_mb']:.0f} |"
        for o in refs:
            row += (f" {s['seconds'] / summary[o]['seconds']:.2f}x |"
                    f" {s['peak_mb'] / summary[o]['peak_mb']:.2f}x |")
        print(row)
    return 0


def print_commands(summary: dict[str, dict], results: dict[str, list[dict]]) -> None:
    """``--apply``'s table: each command's peak RSS against the budget of 64 MB + 1 KB per output
    tensor (the output tensor count is its apply's)."""
    print("| command | output tensors | wall s | peak RSS MB | MB per 1k output tensors over 64 MB "
          "| budget MB (64 + 1 KB/tensor) | runs: wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    tensors: dict[str, int] = {}
    for label, s in summary.items():
        plan = label[label.index("("):]
        root = label[:len(BASELINE)] if label.startswith(BASELINE) else ""
        n = tensors.setdefault(root + plan, s["tensors"] or tensors.get(root + plan, 0))
        peak = max(r["peak_mb"] for r in results[label])
        per_k = (peak - 64) / n * 1000 if n else float("nan")
        print(f"| {label} | {n:,} | {s['seconds']:.2f} | {peak:.0f} | {per_k:.2f} | {64 + n / 1024:.0f} | "
              f"{', '.join(f'{x:.2f}' for x in s['runs'])} |")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark tensorsurgery against a plain copy loop (and mergekit) on one synthetic checkpoint.

One invocation generates a Mistral-shaped BF16 checkpoint (``make_checkpoint.py``), writes
manifests for it (DUS: layers 0..23 then 8..31, 48 layers; DUS in float16; the Llama2-init-Mistral
relabel, all 32 layers kept) and a mergekit passthrough config (the seed's ``mergekit_DUS.yaml``),
then times each approach as a child process, several runs, alternating:

* ``copy loop (baseline)``: the DUS plan's output written by the plainest code there is: for each
  shard, the header, then ``os.copy_file_range`` of every planned source byte range in order,
  fsync. Same output bytes as ``apply`` (the plan is built here with the library and handed over).
* ``tensorsurgery plan`` (headers only), ``apply`` (DUS), ``apply`` with ``dtype = "float16"``,
  ``verify`` of the DUS output (when the CLI has ``verify``), ``apply --link`` (when the CLI has
  ``--link``) on DUS and on the relabel, where every output shard equals a source shard.
* ``mergekit-yaml`` passthrough (when installed; ``--no-mergekit`` to skip).

Each measurement is one child process, forked from a bare launcher interpreter (not from this
driver, whose memory would leak into the child's ``ru_maxrss``): wall time from fork to exit and
peak RSS from ``os.wait4`` (``ru_maxrss``: the command or the largest of its descendants).
Before each one: ``sync``, the page cache dropped (``echo 3 > /proc/sys/vm/drop_caches``, as root;
otherwise the runner says the runs are warm-cache), and a wait (``--max-wait``) until other
processes leave the CPUs idle. The CPU time other processes used during each measurement is
recorded and reported, so a noisy run is visible. Runs rotate the order of the approaches. The
table (stdout) shows medians and the ratio to the baseline's median; ``--json`` prints the same
as JSON. Everything written is removed at the end (the source too, unless ``--keep``).

Usage::

    python benchmarks/run.py [--size default|full] [--runs N] [--workdir DIR] [--keep]
                             [--no-mergekit] [--max-wait SECONDS] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LAYERS, OVERLAP = 32, 8
#: Left free on the workdir's filesystem after the source and two outputs.
MARGIN = 5_000_000_000
#: Seconds of quiet after the cache drop, before each measurement.
SETTLE = 1.0
#: CPUs' worth of other processes' work above which a measurement waits, or is flagged noisy.
BUSY = 0.25
#: Environment of every child: never reach the network.
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


# -- the baseline, run as a child: ``run.py --copy-loop SPEC`` --------------------------------

def copy_loop(spec_path: str) -> int:
    """Write the shards a spec describes: header, then copy_file_range of each range, fsync."""
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["output"])
    out.mkdir(parents=True)
    sources: dict[str, int] = {}
    for shard in spec["shards"]:
        fd = os.open(out / shard["filename"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, bytes.fromhex(shard["header"]))
            for path, offset, length in shard["ranges"]:
                src = sources.get(path)
                if src is None:
                    src = sources[path] = os.open(path, os.O_RDONLY)
                while length:
                    n = os.copy_file_range(src, fd, length, offset)
                    if n == 0:
                        raise OSError(f"{path}: ends before byte {offset}")
                    offset, length = offset + n, length - n
            os.fsync(fd)
        finally:
            os.close(fd)
    for src in sources.values():
        os.close(src)
    return 0


# -- inputs ---------------------------------------------------------------------------------

def _generator():
    sys.path.insert(0, str(HERE))
    import make_checkpoint
    return make_checkpoint


def prepare_source(workdir: Path, size: str) -> Path:
    """The synthetic checkpoint for ``size`` in ``workdir``: reused when a previous ``--keep``
    run left a complete one, else generated."""
    gen = _generator()
    full = size == "full"
    path = workdir / f"source-{size}"
    stamp = {"size": size, "seed": 0, "total_size": gen.tensor_bytes(full)}
    try:
        if json.loads((path / ".bench-stamp.json").read_text()) == stamp:
            log(f"reusing the {size} checkpoint in {path}")
            return path
    except (OSError, ValueError):
        pass
    shutil.rmtree(path, ignore_errors=True)
    log(f"generating the {size} checkpoint ({stamp['total_size'] / 1e9:.2f} GB) in {path} ...")
    t0 = time.perf_counter()
    gen.make_checkpoint(path, full=full, seed=0)
    (path / ".bench-stamp.json").write_text(json.dumps(stamp))  # dotfiles are not copied by apply
    log(f"  done in {time.perf_counter() - t0:.1f} s")
    return path


def write_inputs(bench: Path, source: Path) -> dict[str, Path]:
    """Manifests (DUS, DUS float16, relabel) and the mergekit passthrough YAML, in ``bench``."""
    head = f'[source]\nmodel = "{source}"\n\n[rename]\npreset = "mistral-to-llama"\n\n'
    dus = head + f'[layers]\nplan = "dus"\noverlap = {OVERLAP}\n\n[output]\n'
    out = bench / "out"
    paths = {k: bench / f"{k}.toml" for k in ("dus", "f16", "keep")}
    paths["dus"].write_text(dus + f'path = "{out / "apply-dus"}"\n')
    paths["f16"].write_text(dus + f'path = "{out / "apply-f16"}"\ndtype = "float16"\n')
    paths["keep"].write_text(head + f'[layers]\nplan = "keep"\n\n[output]\npath = "{out / "apply-keep"}"\n')
    paths["mergekit"] = bench / "mergekit-dus.yaml"
    paths["mergekit"].write_text(
        "slices:\n"
        f"  - sources:\n    - model: {source}\n      layer_range: [0, {LAYERS - OVERLAP}]\n"
        f"  - sources:\n    - model: {source}\n      layer_range: [{OVERLAP}, {LAYERS}]\n"
        "merge_method: passthrough\ndtype: float16\n")
    return paths


def _plan(manifest: Path, **kwargs):
    sys.path.insert(0, str(REPO))
    from tensorsurgery import api
    return api.plan(manifest, **kwargs)


def write_copy_spec(manifest: Path, output: Path, spec: Path) -> None:
    """Plan ``manifest`` with the library and write what the copy loop needs."""
    plan = _plan(manifest)
    if any(t.transform != "none" for t in plan.tensors):
        raise SystemExit(f"run.py: error: {manifest}: the plan has transforms; a copy loop cannot write it")
    spec.write_text(json.dumps({"output": str(output), "shards": [
        {"filename": s.filename, "header": s.header.hex(),
         "ranges": [[str(t.source.path), t.source.offset, t.source.length] for t in s.tensors]}
        for s in plan.shards]}))


def linked_shards(manifest: Path) -> str:
    """'k of n' output shards that ``apply --link`` would link, for the table's notes."""
    try:
        plan = _plan(manifest, link=True)
    except TypeError:
        return "?"
    return f"{sum(getattr(s, 'link', None) is not None for s in plan.shards)} of {len(plan.shards)}"


# -- approaches -----------------------------------------------------------------------------

@dataclass
class Approach:
    """One row: the child's argv, the folder it writes (removed after each run), or why not run."""

    key: str
    name: str
    argv: list[str] | None
    output: Path | None = None
    note: str = ""
    after: str | None = None  # runs right after this approach, on its output
    samples: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _ts(*args: str) -> list[str]:
    return [sys.executable, "-m", "tensorsurgery", *args]


def _cli_help(command: str) -> str:
    r = subprocess.run(_ts(command, "--help"), capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    return r.stdout if r.returncode == 0 else ""


def _mergekit() -> str | None:
    here = Path(sys.executable).parent / "mergekit-yaml"
    return str(here) if here.exists() else shutil.which("mergekit-yaml")


def _apply(manifest: Path, output: Path, *flags: str) -> list[str]:
    return _ts("apply", str(manifest), "--no-progress", *flags, "--output", str(output))


def approaches(bench: Path, inputs: dict[str, Path], mergekit: bool) -> list[Approach]:
    out = bench / "out"
    rows = [
        Approach("plan", "tensorsurgery plan (DUS)", _ts("plan", str(inputs["dus"]))),
        Approach("copy", "copy loop (baseline, DUS)",
                 [sys.executable, str(Path(__file__).resolve()), "--copy-loop", str(inputs["spec"])], out / "copy"),
        Approach("apply", "tensorsurgery apply (DUS)", _apply(inputs["dus"], out / "dus"), out / "dus"),
        Approach("verify", "tensorsurgery verify (DUS)", _ts("verify", str(inputs["dus"]), str(out / "dus"),
                                                            "--no-progress"), after="apply"),
        Approach("f16", "tensorsurgery apply (DUS, float16)", _apply(inputs["f16"], out / "f16"), out / "f16"),
        Approach("link", "tensorsurgery apply --link (DUS)", _apply(inputs["dus"], out / "link", "--link"),
                 out / "link"),
        Approach("keep", "tensorsurgery apply (relabel, 32 layers)", _apply(inputs["keep"], out / "keep"),
                 out / "keep"),
        Approach("keep-link", "tensorsurgery apply --link (relabel, 32 layers)",
                 _apply(inputs["keep"], out / "keep-link", "--link"), out / "keep-link"),
        Approach("mergekit", "mergekit-yaml passthrough (DUS, float16)", None, out / "mergekit"),
    ]
    by = {a.key: a for a in rows}
    if "verify" not in _cli_help("verify"):
        by["verify"].argv, by["verify"].note = None, "skipped: this tensorsurgery has no `verify` command"
    if "--link" not in _cli_help("apply"):
        for k in ("link", "keep-link"):
            by[k].argv, by[k].note = None, "skipped: `tensorsurgery apply --help` has no --link"
    else:
        by["link"].note = f"--link: {linked_shards(inputs['dus'])} output shards linked"
        by["keep-link"].note = f"--link: {linked_shards(inputs['keep'])} output shards linked"
    exe = _mergekit()
    if not mergekit:
        by["mergekit"].note = "skipped: --no-mergekit"
    elif exe is None:
        by["mergekit"].note = "skipped: mergekit-yaml is not installed"
    else:
        by["mergekit"].argv = [exe, str(inputs["mergekit"]), str(out / "mergekit"), "--no-copy-tokenizer",
                               "--clone-tensors", "--no-write-model-card", "--quiet"]
    return rows


# -- measuring ------------------------------------------------------------------------------

#: Runs in a bare interpreter (``python -S``): forks the command, waits for it with wait4 and
#: writes "wall maxrss_kb utime stime oublock inblock status" to argv[1]. A child's ru_maxrss
#: includes the peak RSS of the process it was spawned from (Linux records the old address space
#: at exec), so the command is forked from this ~9 MB launcher, never from the benchmark driver.
LAUNCHER = """
import os, signal, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    f.write(f"{wall} {ru.ru_maxrss} {ru.ru_utime} {ru.ru_stime} {ru.ru_oublock} {ru.ru_inblock} {status}")
"""


def cpu_times() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / tick, (f[7] if len(f) > 7 else 0) / tick


def drop_caches() -> str | None:
    """Flush dirty pages, drop the page cache (as root) and let the disk settle (deletes of the
    previous output issue discards on some mounts); returns why the cache was not dropped."""
    os.sync()
    why = None
    if os.geteuid() != 0:
        why = "not root"
    else:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            why = f"/proc/sys/vm/drop_caches: {e.strerror}"
    time.sleep(SETTLE)
    return why


def wait_quiet(max_wait: float) -> float:
    """Wait until other processes use under BUSY CPUs for 2 s running, at most ``max_wait`` s;
    returns the seconds waited."""
    t0 = time.monotonic()
    quiet = 0
    while time.monotonic() - t0 < max_wait and quiet < 2:
        before = cpu_times()[0]
        time.sleep(1)
        quiet = quiet + 1 if cpu_times()[0] - before < BUSY else 0
    return time.monotonic() - t0


def measure(argv: list[str], logfile: Path) -> dict:
    """Run ``argv`` as a grandchild through :data:`LAUNCHER`: wall seconds, its peak RSS and CPU
    from wait4, exit code, and the CPU other processes used meanwhile."""
    result = logfile.with_suffix(".rusage")
    result.unlink(missing_ok=True)
    busy0, steal0 = cpu_times()
    with open(logfile, "wb") as logf:
        p = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(result), *argv],
                             stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                             env={**os.environ, **CHILD_ENV}, cwd=logfile.parent, start_new_session=True)
        try:
            p.wait()
        except BaseException:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher's own session: it and the command
            p.wait()
            raise
    busy1, steal1 = cpu_times()
    try:
        wall, maxrss, utime, stime, oublock, inblock, status = result.read_text().split()
    except (OSError, ValueError):
        return {"exit": p.returncode or 1}
    wall, own = float(wall), float(utime) + float(stime)
    return {"wall_s": wall, "maxrss_kb": int(maxrss), "user_s": float(utime), "sys_s": float(stime),
            "io_write_bytes": int(oublock) * 512, "io_read_bytes": int(inblock) * 512,
            "other_cpus": max(0.0, busy1 - busy0 - own) / wall, "steal_cpus": (steal1 - steal0) / wall,
            "exit": os.waitstatus_to_exitcode(int(status))}


def new_bytes(path: Path | None) -> int:
    """Bytes of the files in ``path``, not counting hard links (files shared with a source)."""
    if path is None or not path.exists():
        return 0
    return sum(st.st_size for p in path.rglob("*") if p.is_file() and (st := p.stat()).st_nlink == 1)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def run_one(a: Approach, bench: Path, run: int, ctx: dict) -> bool:
    """Measure ``a`` once (cache dropped, machine quiet first); record the sample or the failure."""
    if a.output is not None:
        shutil.rmtree(a.output, ignore_errors=True)
    why = drop_caches()
    ctx["dropped"] += why is None
    ctx["why"] = ctx["why"] or why
    waited = wait_quiet(ctx["max_wait"])
    logfile = bench / f"{a.key}.log"
    s = measure(a.argv, logfile)
    s.update(run=run, waited_s=round(waited, 1), bytes_written=new_bytes(a.output))
    label = f"[run {run}/{ctx['runs']}] {a.name}:"
    if s["exit"] != 0:
        a.failures.append(f"run {run} failed: exit {s['exit']}: {_tail(logfile)}")
        log(f"{label} {a.failures[-1]}")
        return False
    a.samples.append(s)
    log(f"{label} {s['wall_s']:.2f} s, {s['maxrss_kb'] / 1024:.0f} MB peak RSS, "
        f"{s['bytes_written'] / 1e9:.2f} GB written; other processes {s['other_cpus']:.2f} CPUs, "
        f"steal {s['steal_cpus']:.2f}" + (f" (waited {waited:.0f} s for quiet)" if waited > 3 else ""))
    return True


def run_all(rows: list[Approach], bench: Path, runs: int, max_wait: float) -> dict:
    """``runs`` rounds; each round rotates the order, and a dependent row follows its parent."""
    units = [a for a in rows if a.argv and a.after is None]
    followers = {a.after: a for a in rows if a.argv and a.after}
    ctx = {"dropped": 0, "why": None, "runs": runs, "max_wait": max_wait}
    for r in range(runs):
        order = units[r % len(units):] + units[:r % len(units)]
        for a in order:
            ok = run_one(a, bench, r + 1, ctx)
            f = followers.get(a.key)
            if f is not None and ok:  # a follower needs its parent's output
                run_one(f, bench, r + 1, ctx)
            if a.output is not None:
                shutil.rmtree(a.output, ignore_errors=True)
    return ctx


# -- report ---------------------------------------------------------------------------------

def summarize(rows: list[Approach]) -> list[dict]:
    base = next((a for a in rows if a.key == "copy" and a.samples), None)
    base_median = statistics.median(s["wall_s"] for s in base.samples) if base else None
    out = []
    for a in rows:
        row = {"key": a.key, "approach": a.name, "note": "; ".join(filter(None, [a.note, *a.failures])),
               "samples": a.samples}
        if a.samples:
            walls = [s["wall_s"] for s in a.samples]
            row.update(median_wall_s=statistics.median(walls), min_wall_s=min(walls), max_wall_s=max(walls),
                       peak_rss_mb=max(s["maxrss_kb"] for s in a.samples) / 1024,
                       median_cpu_s=statistics.median(s["user_s"] + s["sys_s"] for s in a.samples),
                       bytes_written=max(s["bytes_written"] for s in a.samples))
            row["ratio"] = row["median_wall_s"] / base_median if base_median else None
        out.append(row)
    return out


def format_table(summary: list[dict]) -> str:
    lines = ["| approach | median wall s | ratio vs baseline | peak RSS MB | bytes written | CPU s | "
             "runs: min-max s |", "|---|---:|---:|---:|---:|---:|---:|"]
    notes, noisy = [], []
    for r in summary:
        if r["note"]:
            notes.append(f"{r['approach']}: {r['note']}")
        if "median_wall_s" not in r:
            lines.append(f"| {r['approach']} | - | - | - | - | - | - |")
            continue
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"
        lines.append(f"| {r['approach']} | {r['median_wall_s']:.2f} | {ratio} | {r['peak_rss_mb']:.0f} | "
                     f"{r['bytes_written']:,} | {r['median_cpu_s']:.2f} | "
                     f"{r['min_wall_s']:.2f}-{r['max_wall_s']:.2f} |")
        noisy += [f"{r['approach']} run {s['run']} ({s['wall_s']:.2f} s: other processes "
                  f"{s['other_cpus']:.2f} CPUs, steal {s['steal_cpus']:.2f})"
                  for s in r["samples"] if s["other_cpus"] + s["steal_cpus"] > BUSY]
    notes += [f"noisy: {n}" for n in noisy] or ["no measurement ran beside other processes' work "
                                                f"(> {BUSY} CPUs)"]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def machine(workdir: Path) -> dict:
    mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu,
            "ram_gib": round(int(mem["MemTotal"].split()[0]) / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "workdir": str(workdir), **_filesystem(workdir), "versions": _versions()}


def _filesystem(path: Path) -> dict:
    """The /proc/mounts entry with the longest mount point containing ``path``."""
    best = ("?", "/", "?", "")
    real = os.path.realpath(path)
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype, opts = line.split()[:4]
        mnt = mnt.replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
            best = (dev, mnt, fstype, opts)
    return {"device": best[0], "mount": best[1], "fstype": best[2], "mount_options": best[3]}


def _versions() -> dict:
    from importlib import metadata
    out = {}
    for dist in ("tensorsurgery", "mergekit", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True)
    out["git"] = git.stdout.strip() or None
    return out


def format_machine(m: dict) -> str:
    v = m["versions"]
    return (f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, kernel {m['kernel']}, "
            f"Python {m['python']}\nworkdir: {m['workdir']} on {m['fstype']} ({m['device']} at {m['mount']}, "
            f"{m['mount_options']})\nversions: tensorsurgery {v['tensorsurgery']} (git {v['git']}), "
            f"mergekit {v['mergekit']}, torch {v['torch']}")


# -- driver ---------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_disk(workdir: Path, size: str) -> None:
    """Refuse when the source, two outputs and a margin do not fit on the workdir's filesystem."""
    gen = _generator()
    full = size == "full"
    stamp = workdir / f"source-{size}" / ".bench-stamp.json"
    source = 0 if stamp.exists() else gen.tensor_bytes(full)
    out = gen.tensor_bytes(full, layers=2 * (LAYERS - OVERLAP))
    need = source + 2 * out + MARGIN
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"run.py: error: {workdir}: {free / 1e9:.1f} GB free, but --size {size} needs "
                         f"{need / 1e9:.1f} GB (source {source / 1e9:.1f} GB + 2 outputs of {out / 1e9:.1f} GB "
                         f"+ {MARGIN / 1e9:.0f} GB margin); free some space or pass --workdir on a larger disk")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("default", "full"), default="default",
                   help="default: ~1.5 GB narrow Mistral; full: the real 7B shape, ~14.5 GB in, ~21.5 GB out")
    p.add_argument("--runs", type=int, default=3, help="measurements of each approach (3)")
    p.add_argument("--workdir", type=Path, help="where to write (default: a new folder in $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the generated source in --workdir for the next run")
    p.add_argument("--no-mergekit", action="store_true", help="skip mergekit even when it is installed")
    p.add_argument("--max-wait", type=float, default=120, metavar="SECONDS",
                   help="before each measurement, wait up to this long for other processes to go quiet (120)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--copy-loop", metavar="SPEC", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.copy_loop:
        return copy_loop(args.copy_loop)
    if args.runs < 1:
        raise SystemExit("run.py: error: --runs must be at least 1")
    if args.keep and args.workdir is None:
        raise SystemExit("run.py: error: --keep needs --workdir (a folder the next invocation can reuse)")
    created = args.workdir is None or not args.workdir.exists()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="tensorsurgery-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    bench, source = workdir / "bench", None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        check_disk(workdir, args.size)
        source = prepare_source(workdir, args.size)
        return benchmark(args, workdir, bench, source)
    except KeyboardInterrupt:
        log("run.py: interrupted; removing what it wrote")
        return 130
    finally:
        shutil.rmtree(bench, ignore_errors=True)
        if source is not None and not args.keep:
            shutil.rmtree(source, ignore_errors=True)
        if created and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def benchmark(args: argparse.Namespace, workdir: Path, bench: Path, source: Path) -> int:
    shutil.rmtree(bench, ignore_errors=True)
    bench.mkdir()
    inputs = write_inputs(bench, source)
    inputs["spec"] = bench / "copy-loop.json"
    write_copy_spec(inputs["dus"], bench / "out" / "copy", inputs["spec"])
    rows = approaches(bench, inputs, mergekit=not args.no_mergekit)
    for a in rows:
        if a.argv is None:
            log(f"{a.name}: {a.note}")
    ctx = run_all(rows, bench, args.runs, args.max_wait)
    summary = summarize(rows)
    m = machine(workdir)
    total = sum(len(a.samples) + len(a.failures) for a in rows)
    caches = ("page cache dropped before every measurement" if ctx["dropped"] == total else
              f"page cache NOT dropped ({ctx['why']}): warm-cache runs")
    command = " ".join(["python", os.path.relpath(__file__, REPO)] + argv_of(args))
    if args.json:
        print(json.dumps({"command": command, "size": args.size, "runs": args.runs, "cache": caches,
                          "source_bytes": new_bytes(source), "machine": m, "results": summary}, indent=2))
    else:
        print(f"{command}\n{format_machine(m)}\nsource: {args.size}, {new_bytes(source):,} bytes; "
              f"{args.runs} run(s) each, order rotated per run; {caches}\n")
        print(format_table(summary))
        print("\nratio = median wall / baseline median wall (lower is faster); peak RSS = max over runs of the "
              "child's ru_maxrss; bytes written = the output folder's files, hard links to the source excluded; "
              "CPU s = median user+sys of the child")
    return 0 if any(r["key"] == "copy" and r["samples"] for r in summary) else 1


def argv_of(args: argparse.Namespace) -> list[str]:
    out = ["--size", args.size, "--runs", str(args.runs)]
    out += ["--workdir", str(args.workdir)] if args.workdir else []
    out += ["--keep"] * args.keep + ["--no-mergekit"] * args.no_mergekit + ["--json"] * args.json
    return out + (["--max-wait", f"{args.max_wait:g}"] if args.max_wait != 120 else [])


if __name__ == "__main__":
    sys.exit(main())

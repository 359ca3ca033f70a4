#!/usr/bin/env python3
"""Benchmark tensorsurgery against the physical limit (a raw pipelined copy), a naive copy loop
and mergekit, on one synthetic checkpoint.

One invocation generates a Mistral-shaped BF16 checkpoint (``make_checkpoint.py``), writes
manifests for it (DUS: layers 0..23 then 8..31, 48 layers; DUS in float16; the Llama2-init-Mistral
relabel, all 32 layers kept) and a mergekit passthrough config (the seed's ``mergekit_DUS.yaml``),
then times each approach as a child process, several runs, alternating:

* ``raw pipelined copy (baseline)``: the DUS plan's output written by the least work that can
  write it: a reader thread ``preadv``\\ s the planned source ranges into 4 reusable 4 MiB
  page-aligned buffers, a writer thread ``pwrite``\\ s them (full buffers with ``O_DIRECT`` where
  the filesystem allows it, as ``apply`` does), header first, fsync at the end of each shard. No
  hashing, no transform, no provenance. Every ratio is against this row.
* ``copy_file_range loop (naive baseline)``: per shard, the header, then ``os.copy_file_range``
  of every planned range in order, fsync; one thread, no overlap.
* ``tensorsurgery plan`` (headers only), ``apply`` (DUS), ``apply`` with ``dtype = "float16"``
  (and ``--threads 1`` of both when the CLI has ``--threads``), ``verify MANIFEST OUTPUT``
  (manifest mode) and ``verify OUTPUT`` (record mode, sources hidden) of the DUS output, each
  with a ``cat`` of the bytes it must read as its own baseline, ``apply --link`` on DUS and on the
  relabel, where every output shard equals a source shard.
* ``mergekit-yaml`` passthrough (when installed; ``--no-mergekit`` to skip).

The two baselines write the same bytes as ``apply``: their plan is built with the library of the
checkout under test, in a child process (``--repo``), and handed over as byte ranges.

Each measurement is one child process, forked from a bare launcher interpreter (not from this
driver, whose memory would leak into the child's ``ru_maxrss``): wall time from fork to exit,
user and sys CPU and peak RSS from ``os.wait4``. Before each one: ``sync``, the page cache
dropped (``echo 3 > /proc/sys/vm/drop_caches``, as root; otherwise the runner says the runs are
warm-cache; with ``--tmpfs`` there is nothing to drop, the files are in RAM), and a wait
(``--max-wait``) until other processes leave the CPUs idle. The CPU time other processes used
during each measurement is recorded and reported, so a noisy run is visible. Runs rotate the
order of the approaches. The table (stdout) shows medians and the ratio to the raw copy's median;
``--json`` prints the same as JSON. Everything written is removed at the end (the source too,
unless ``--keep``).

Usage::

    python benchmarks/run.py [--size tiny|default|full] [--runs N] [--workdir DIR | --tmpfs]
                             [--repo PATH] [--threads N] [--keep] [--no-mergekit]
                             [--max-wait SECONDS] [--json]
"""
from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import platform
import queue
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
THIS = Path(__file__).resolve()
DEFAULT_REPO = HERE.parent
LAYERS, OVERLAP = 32, 8
#: --size -> (full shape?, dimension overrides for make_checkpoint). ``tiny`` (~90 MB) is for
#: proving the runner works, not for numbers.
SIZES = {"tiny": (False, {"hidden": 256, "intermediate": 896, "head_dim": 8}),
         "default": (False, {}), "mid": (False, {"hidden": 2048, "intermediate": 6144, "head_dim": 64}),
         "full": (True, {})}
#: The environment variable of tensorsurgery's source-file hash cache (a checkout without the
#: cache ignores it).
HASH_CACHE_ENV = "TENSORSURGERY_HASH_CACHE"
#: Left free on the workdir's filesystem after the source and two outputs.
MARGIN = 5_000_000_000
#: With --tmpfs: RAM left available after the source and two outputs (tmpfs pages are RAM).
TMPFS_RAM_MARGIN = 4_000_000_000
TMPFS_ROOT = Path("/dev/shm")
#: Seconds of quiet after the cache drop, before each measurement.
SETTLE = 1.0
#: CPUs' worth of other processes' work above which a measurement waits, or is flagged noisy.
BUSY = 0.25
#: The raw copy's buffers: as many and as large as tensorsurgery's pump (stream.py).
RAW_BUFFER, RAW_BUFFERS = 4 << 20, 4
#: The cat baseline's read size.
CAT_BUFFER = 16 << 20


#: Python code that makes this interpreter import tensorsurgery only from PYTHONPATH: it drops the
#: current directory from sys.path (``python -c``/``-m`` put it first: run from a checkout's root,
#: a child would import that checkout instead) and the meta-path finder of an editable install of
#: tensorsurgery (setuptools' ``__editable__..._finder``), which otherwise resolves any submodule
#: the checkout under test lacks from the installed tree.
ISOLATE = ("import sys; sys.path[:] = [p for p in sys.path if p]; "
           "sys.meta_path[:] = [f for f in sys.meta_path if 'tensorsurgery' not in "
           "getattr(sys.modules.get(getattr(f, '__module__', '')), 'MAPPING', {})]")
#: ``python -c TS_SHIM ARGS...`` is ``python -m tensorsurgery ARGS...`` with :data:`ISOLATE` first.
TS_SHIM = ISOLATE + "; import runpy; runpy.run_module('tensorsurgery', run_name='__main__', alter_sys=True)"


def isolate() -> None:
    """:data:`ISOLATE`, in this interpreter."""
    exec(ISOLATE)  # noqa: S102 - a constant of this file


def child_env(repo: Path) -> dict[str, str]:
    """Environment of every child: the checkout under test first on the path, never the network."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}


# -- baselines, run as children: ``run.py --raw-copy SPEC``, ``--copy-loop SPEC``, ``--cat ...`` --

def raw_copy(spec_path: str) -> int:
    """Write the shards a spec describes, pipelined: this thread preads every planned range into
    reusable page-aligned buffers, a writer thread pwrites them (O_DIRECT for full buffers where
    the filesystem takes it), fsync per shard. No hashing, no transform."""
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["output"])
    out.mkdir(parents=True)
    _RawCopy(out, spec["shards"]).run()
    return 0


class _RawCopy:
    def __init__(self, out: Path, shards: list[dict]):
        self.out, self.shards = out, shards
        self.free: queue.Queue = queue.Queue()
        for _ in range(RAW_BUFFERS):
            self.free.put(mmap.mmap(-1, RAW_BUFFER))
        self.blocks: queue.Queue = queue.Queue()
        self.failed: list[BaseException] = []

    def run(self) -> None:
        writer = threading.Thread(target=self._write_loop, name="raw-writer", daemon=True)
        writer.start()
        sources: dict[str, int] = {}
        try:
            for idx, shard in enumerate(self.shards):
                self.idx, self.offset, self.buf, self.n = idx, 0, self._take(), 0
                header = memoryview(bytes.fromhex(shard["header"]))
                while len(header):
                    k = min(RAW_BUFFER - self.n, len(header))
                    self.buf[self.n:self.n + k] = header[:k]
                    self._advance(k)
                    header = header[k:]
                for path, offset, length in shard["ranges"]:
                    fd = sources.get(path)
                    if fd is None:
                        fd = sources[path] = os.open(path, os.O_RDONLY)
                    while length:
                        k = min(RAW_BUFFER - self.n, length)
                        with memoryview(self.buf) as whole, whole[self.n:self.n + k] as view:
                            got = os.preadv(fd, [view], offset)
                        if got == 0:
                            raise OSError(f"{path}: ends before byte {offset}")
                        offset, length = offset + got, length - got
                        self._advance(got)
                self.blocks.put((self.idx, self.offset, self.buf, self.n, True))
        finally:
            self.blocks.put(None)
            writer.join()
            for fd in sources.values():
                os.close(fd)
        if self.failed:
            raise self.failed[0]

    def _advance(self, n: int) -> None:
        self.n += n
        if self.n == RAW_BUFFER:
            self.blocks.put((self.idx, self.offset, self.buf, self.n, False))
            self.offset, self.buf, self.n = self.offset + self.n, self._take(), 0

    def _take(self) -> mmap.mmap:
        while True:
            if self.failed:
                raise self.failed[0]
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue

    def _write_loop(self) -> None:
        files: dict[int, list[int | None]] = {}
        try:
            while (block := self.blocks.get()) is not None:
                idx, offset, buf, n, last = block
                if idx not in files:
                    files[idx] = list(_open_output(self.out / self.shards[idx]["filename"]))
                fds = files[idx]
                with memoryview(buf) as whole, whole[:n] as view:
                    if fds[1] is not None and not last:
                        try:
                            _pwrite_all(fds[1], view, offset)
                        except OSError as e:
                            if e.errno != errno.EINVAL:
                                raise
                            os.close(fds[1])  # the filesystem refuses direct I/O after all
                            fds[1] = None
                    if fds[1] is None or last:
                        _pwrite_all(fds[0], view, offset)
                if last:
                    os.fsync(fds[0])
                    for fd in files.pop(idx):
                        if fd is not None:
                            os.close(fd)
                self.free.put(buf)
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            self.failed.append(e)
        finally:
            for fds in files.values():
                for fd in fds:
                    if fd is not None:
                        os.close(fd)


def _open_output(path: Path) -> tuple[int, int | None]:
    """A normal descriptor, and an O_DIRECT one when the filesystem accepts it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        dfd = os.open(path, os.O_WRONLY | os.O_DIRECT) if hasattr(os, "O_DIRECT") else None
    except OSError:
        dfd = None
    return fd, dfd


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


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


def cat(paths: list[str]) -> int:
    """Read every file (a folder means its ``*.safetensors``) sequentially, 16 MiB at a time."""
    buf = memoryview(bytearray(CAT_BUFFER))
    total = 0
    for p in paths:
        files = sorted(Path(p).glob("*.safetensors")) if Path(p).is_dir() else [Path(p)]
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while n := fh.readinto(buf):
                    total += n
    print(f"read {total} bytes")
    return 0


# -- the copy spec, built in a child with the checkout under test: ``run.py --plan-spec`` -----

def plan_spec(manifest: str, output: str, spec_path: str, link: bool) -> int:
    """Plan ``manifest`` with the ``tensorsurgery`` on PYTHONPATH and write the byte ranges of
    every output shard (and which API built them) to ``spec_path`` as JSON."""
    isolate()
    import tensorsurgery
    plan, api = _plan_with_any_api(Path(manifest), link)
    root = Path(tensorsurgery.__file__).resolve().parent
    strays = sorted(f"{name} ({m.__file__})" for name, m in list(sys.modules.items())
                    if name.startswith("tensorsurgery.") and getattr(m, "__file__", None)
                    and not Path(m.__file__).resolve().is_relative_to(root))
    if strays:
        raise SystemExit(f"modules imported from outside {root}: {', '.join(strays)}")
    shards, transforms = [], 0
    for s in plan.shards:
        header = bytes(s.header)
        if len(header) < 8 or struct.unpack("<Q", header[:8])[0] != len(header) - 8:
            raise SystemExit(f"{s.filename}: Shard.header is not 8-byte length + JSON ({len(header)} bytes); "
                             f"the runner cannot write it")
        ranges = []
        for t in s.tensors:
            transforms += getattr(t, "transform", "none") != "none"
            # A range's file: a path, or (since the byte-source seam) a LocalFile whose location it is.
            where = t.source.path if hasattr(t.source, "path") else t.source.file.location
            ranges.append([str(where), int(t.source.offset), int(t.source.length)])
        shards.append({"filename": s.filename, "header": header.hex(), "ranges": ranges,
                       "link": str(s.link) if getattr(s, "link", None) is not None else None})
    Path(spec_path).write_text(json.dumps({
        "api": api, "module": tensorsurgery.__file__, "version": getattr(tensorsurgery, "__version__", None),
        "output": output, "transforms": transforms, "shards": shards,
        "sources": sorted({r[0] for s in shards for r in s["ranges"]})}))
    return 0


def _plan_with_any_api(manifest: Path, link: bool):
    """(plan, how): ``tensorsurgery.api.plan(path)`` or ``tensorsurgery.plan(path)`` when the
    checkout has that public API, else the functions the CLI used before it existed."""
    import importlib.util
    import inspect
    import types

    import tensorsurgery
    candidates = []
    if importlib.util.find_spec("tensorsurgery.api") is not None:
        import tensorsurgery.api
        candidates.append((getattr(tensorsurgery.api, "plan", None), "tensorsurgery.api.plan"))
    candidates.append((getattr(tensorsurgery, "plan", None), "tensorsurgery.plan"))
    for fn, how in candidates:
        if not callable(fn) or isinstance(fn, types.ModuleType):
            continue
        if not link:
            return fn(manifest), how
        try:
            takes_link = "link" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes_link = False
        if takes_link:
            return fn(manifest, link=True), f"{how}(link=True)"
    from tensorsurgery.manifest.toml import load_manifest
    from tensorsurgery.plan import build_plan  # an early checkout's module names
    from tensorsurgery.source import resolve_source
    m = load_manifest(manifest)
    checkpoints = {s.name: resolve_source(s.model, s.revision, name=s.name) for s in m.sources}
    return (build_plan(m, checkpoints, link=link),
            "tensorsurgery.plan.build_plan (load_manifest, resolve_source)" + ("(link=True)" if link else ""))


def build_spec(repo: Path, manifest: Path, output: Path, spec: Path, *, link: bool = False) -> dict:
    """Run :func:`plan_spec` in a child with ``repo`` on PYTHONPATH; the spec it wrote."""
    argv = [sys.executable, str(THIS), "--plan-spec", str(manifest), str(output), str(spec)] + ["--link"] * link
    r = subprocess.run(argv, capture_output=True, text=True, env=child_env(repo), cwd=spec.parent)
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise SystemExit(f"run.py: error: planning {manifest.name} with the tensorsurgery in {repo}: {why}")
    return json.loads(spec.read_text())


# -- inputs ---------------------------------------------------------------------------------

def _generator():
    sys.path.insert(0, str(HERE))
    import make_checkpoint
    return make_checkpoint


def prepare_source(workdir: Path, size: str) -> Path:
    """The synthetic checkpoint for ``size`` in ``workdir``: reused when a previous ``--keep``
    run left a complete one, else generated."""
    gen = _generator()
    full, dims = SIZES[size]
    path = workdir / f"source-{size}"
    stamp = {"size": size, "seed": 0, "total_size": gen.tensor_bytes(full, **dims)}
    try:
        if json.loads((path / ".bench-stamp.json").read_text()) == stamp:
            log(f"reusing the {size} checkpoint in {path}")
            return path
    except (OSError, ValueError):
        pass
    shutil.rmtree(path, ignore_errors=True)
    log(f"generating the {size} checkpoint ({stamp['total_size'] / 1e9:.2f} GB) in {path} ...")
    t0 = time.perf_counter()
    gen.make_checkpoint(path, full=full, seed=0, **dims)
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


# -- the checkout under test ----------------------------------------------------------------

@dataclass
class Repo:
    """The tensorsurgery checkout every child runs (``--repo``), as the children see it."""

    path: Path
    module: str
    version: str | None
    git: str | None
    helps: dict[str, str] = field(default_factory=dict)

    def ts(self, *args: str) -> list[str]:
        """``python -m tensorsurgery ARGS`` of this checkout only (see :data:`TS_SHIM`)."""
        return [sys.executable, "-c", TS_SHIM, *args]

    def help(self, command: str) -> str:
        """``tensorsurgery COMMAND --help`` of this checkout ("" when it fails)."""
        if command not in self.helps:
            r = subprocess.run(self.ts(command, "--help"), capture_output=True, text=True,
                               env=child_env(self.path), cwd="/")
            self.helps[command] = r.stdout if r.returncode == 0 else ""
        return self.helps[command]


def probe_repo(path: Path) -> Repo:
    """Check that a child with PYTHONPATH=``path`` imports tensorsurgery from ``path``."""
    path = path.resolve()
    if not (path / "tensorsurgery" / "__init__.py").is_file():
        raise SystemExit(f"run.py: error: --repo {path}: no tensorsurgery/__init__.py there; give the root of a "
                         f"checkout (e.g. `git worktree add /tmp/before <commit>`)")
    r = subprocess.run([sys.executable, "-c", ISOLATE + "; import json, tensorsurgery as t; "
                        "print(json.dumps([t.__file__, getattr(t, '__version__', None)]))"],
                       capture_output=True, text=True, env=child_env(path), cwd="/")
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"run.py: error: --repo {path}: `import tensorsurgery` fails: {why}")
    module, version = json.loads(r.stdout)
    if not Path(module).resolve().is_relative_to(path):
        raise SystemExit(f"run.py: error: --repo {path}: children import tensorsurgery from {module}, not from "
                         f"the checkout; unset PYTHONPATH or fix the install")
    git = subprocess.run(["git", "-C", str(path), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return Repo(path, module, version, git.stdout.strip() or None)


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
    baseline: str | None = None  # key of the row this one is also compared with ("vs own baseline")
    hide: Path | None = None  # renamed away during the measurement (the source, for record mode)
    show_output: bool = False  # the command's last output line goes into the notes
    env: dict[str, str] = field(default_factory=dict)  # on top of the children's environment
    samples: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _mergekit() -> str | None:
    here = Path(sys.executable).parent / "mergekit-yaml"
    return str(here) if here.exists() else shutil.which("mergekit-yaml")


def approaches(repo: Repo, bench: Path, inputs: dict[str, Path], spec: dict,
               args: argparse.Namespace) -> list[Approach]:
    out = bench / "out"
    has_threads = "--threads" in repo.help("apply")
    threads = ["--threads", str(args.threads)] if args.threads and has_threads else []
    if args.threads and not has_threads:
        args.notes.append(f"--threads {args.threads}: ignored, `tensorsurgery apply --help` of {repo.path} "
                          f"has no --threads (and no --threads 1 rows)")
        log(args.notes[-1])
    tflag = f" --threads {args.threads}" if threads else ""

    def apply(key: str, name: str, manifest: str, *flags: str) -> Approach:
        argv = repo.ts("apply", str(inputs[manifest]), "--no-progress", *flags, "--output", str(out / key))
        return Approach(key, name, argv, out / key)

    py = [sys.executable, str(THIS)]
    rows = [
        Approach("raw", "raw pipelined copy (baseline, DUS)", py + ["--raw-copy", str(inputs["spec"])], out / "raw"),
        Approach("copy", "copy_file_range loop (naive baseline, DUS)", py + ["--copy-loop", str(inputs["copy-spec"])],
                 out / "copy"),
        Approach("plan", "tensorsurgery plan (DUS)", repo.ts("plan", str(inputs["dus"]))),
        apply("apply", f"apply (DUS){tflag}", "dus", *threads),
        Approach("verify", "verify MANIFEST OUTPUT (DUS, manifest mode)",
                 repo.ts("verify", str(inputs["dus"]), str(out / "apply"), "--no-progress"), after="apply",
                 baseline="cat-verify", show_output=True),
        Approach("cat-verify", "cat output + sources (what manifest verify reads)",
                 py + ["--cat", str(out / "apply"), *spec["sources"]], after="apply"),
        Approach("verify-record", "verify OUTPUT (DUS, record mode: sources hidden)",
                 repo.ts("verify", str(out / "apply"), "--no-progress"), after="apply", baseline="cat-output",
                 hide=inputs["source"], show_output=True),
        Approach("cat-output", "cat output shards (what record verify reads)", py + ["--cat", str(out / "apply")],
                 after="apply"),
        apply("f16", f"apply (DUS, float16){tflag}", "f16", *threads),
        apply("link", f"apply --link (DUS){tflag}", "dus", "--link", *threads),
        apply("keep", f"apply (relabel, 32 layers){tflag}", "keep", *threads),
        apply("keep-link", f"apply --link (relabel, 32 layers){tflag}", "keep", "--link", *threads),
        Approach("mergekit", "mergekit-yaml passthrough (DUS, float16)", None, out / "mergekit"),
    ]
    at = next(i for i, a in enumerate(rows) if a.key == "apply")
    nocache = apply("apply-nocache", f"apply (DUS, source hashes not cached){tflag}", "dus", *threads)
    nocache.env = {HASH_CACHE_ENV: "off"}
    nocache.note = f"{HASH_CACHE_ENV}=off: every source file is read and hashed again, as on a first run"
    rows.insert(at + 1, nocache)
    if has_threads and args.threads != 1:
        at = next(i for i, a in enumerate(rows) if a.key == "apply")
        rows.insert(at + 1, apply("apply-t1", "apply --threads 1 (DUS)", "dus", "--threads", "1"))
        at = next(i for i, a in enumerate(rows) if a.key == "f16")
        rows.insert(at + 1, apply("f16-t1", "apply --threads 1 (DUS, float16)", "f16", "--threads", "1"))
    by = {a.key: a for a in rows}
    if "verify" not in repo.help("verify"):
        for k in ("verify", "verify-record", "cat-verify", "cat-output"):
            by[k].argv, by[k].note = None, "skipped: this tensorsurgery has no `verify` command"
    if "--link" not in repo.help("apply"):
        for k in ("link", "keep-link"):
            by[k].argv, by[k].note = None, "skipped: `tensorsurgery apply --help` has no --link"
    else:
        by["link"].note = f"--link: {linked_shards(repo, bench, inputs['dus'])} output shards linked"
        by["keep-link"].note = f"--link: {linked_shards(repo, bench, inputs['keep'])} output shards linked"
    exe = _mergekit()
    if args.no_mergekit:
        by["mergekit"].note = "skipped: --no-mergekit"
    elif exe is None:
        by["mergekit"].note = "skipped: mergekit-yaml is not installed"
    else:
        by["mergekit"].argv = [exe, str(inputs["mergekit"]), str(out / "mergekit"), "--no-copy-tokenizer",
                               "--clone-tensors", "--no-write-model-card", "--quiet"]
    return rows


def linked_shards(repo: Repo, bench: Path, manifest: Path) -> str:
    """'k of n' output shards that ``apply --link`` would link, for the table's notes."""
    spec = build_spec(repo.path, manifest, bench / "out" / "unused", bench / f"{manifest.stem}-link.json", link=True)
    return f"{sum(s['link'] is not None for s in spec['shards'])} of {len(spec['shards'])}"


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


def drop_caches(tmpfs: bool = False) -> str | None:
    """Flush dirty pages, drop the page cache (as root) and let the disk settle (deletes of the
    previous output issue discards on some mounts); returns why the cache was not dropped.
    On tmpfs nothing is dropped: the files are page-cache pages themselves."""
    os.sync()
    why = None
    if tmpfs:
        why = "tmpfs"
    elif os.geteuid() != 0:
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


def measure(argv: list[str], logfile: Path, env: dict[str, str] | None = None, *,
            fsize_limit: int | None = None) -> dict:
    """Run ``argv`` as a grandchild through :data:`LAUNCHER`: wall seconds, its peak RSS and CPU
    from wait4, exit code, and the CPU other processes used meanwhile. ``fsize_limit``: RLIMIT_FSIZE
    of the command (a write past it fails with EFBIG)."""
    result = logfile.with_suffix(".rusage")
    result.unlink(missing_ok=True)
    busy0, steal0 = cpu_times()

    def limit() -> None:
        if fsize_limit is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    with open(logfile, "wb") as logf:
        p = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(result), *argv],
                             stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                             env=env or dict(os.environ), cwd=logfile.parent, start_new_session=True,
                             preexec_fn=limit if fsize_limit is not None else None)
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
    why = drop_caches(ctx["tmpfs"])
    ctx["dropped"] += why is None
    ctx["why"] = ctx["why"] or why
    waited = wait_quiet(ctx["max_wait"])
    logfile = bench / f"{a.key}.log"
    hidden = a.hide.with_name(a.hide.name + ".hidden") if a.hide is not None else None
    if hidden is not None:
        os.rename(a.hide, hidden)
    try:
        s = measure(a.argv, logfile, {**ctx["env"], **a.env})
    finally:
        if hidden is not None:
            os.rename(hidden, a.hide)
    s.update(run=run, waited_s=round(waited, 1), bytes_written=new_bytes(a.output),
             sha256_from=_hash_origins(a.output))
    label = f"[run {run}/{ctx['runs']}] {a.name}:"
    if s["exit"] != 0:
        a.failures.append(f"run {run} failed: exit {s['exit']}: {_tail(logfile)}")
        log(f"{label} {a.failures[-1]}")
        return False
    if a.show_output and not a.samples:
        a.note = "; ".join(filter(None, [a.note, f"it printed: {_tail(logfile, 1)}"]))
    a.samples.append(s)
    log(f"{label} {s['wall_s']:.2f} s (user {s['user_s']:.2f}, sys {s['sys_s']:.2f}), "
        f"{s['maxrss_kb'] / 1024:.0f} MB peak RSS, {s['bytes_written'] / 1e9:.2f} GB written; "
        f"other processes {s['other_cpus']:.2f} CPUs, steal {s['steal_cpus']:.2f}"
        + (f" (waited {waited:.0f} s for quiet)" if waited > 3 else ""))
    return True


def warm_hash_cache(repo: Repo, bench: Path, manifest: Path, env: dict[str, str], args: argparse.Namespace) -> None:
    """One untimed ``apply`` first, so that the measured ones find the source files' sha256 in
    the run's own hash cache (``bench/hash-cache``), as every run after the first on a machine
    does; the ``apply-nocache`` row measures a first run."""
    out = bench / "out" / "warm-up"
    log(f"warming the source hash cache in {bench / 'hash-cache'} (one untimed apply) ...")
    r = subprocess.run(repo.ts("apply", str(manifest), "--no-progress", "--output", str(out)), env=env, cwd="/",
                       capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    cached = (bench / "hash-cache").is_dir() and any((bench / "hash-cache").iterdir())
    args.notes.append("source-file sha256 cache: " + (
        f"warmed by one untimed apply, so apply rows take the sources' hashes from it ({HASH_CACHE_ENV}="
        f"{bench / 'hash-cache'})" if cached and r.returncode == 0 else
        "none (this tensorsurgery has no hash cache, or the warm-up failed): every apply hashes the sources"))
    log(f"  {args.notes[-1]}")


def _hash_origins(output: Path | None) -> list[str]:
    """Where the provenance record of ``output`` says its source-file hashes came from."""
    try:
        record = json.loads((output / "tensorsurgery.json").read_text()) if output is not None else {}
    except (OSError, ValueError):
        return []
    return sorted({str(f.get("sha256_from")) for src in record.get("sources", []) for f in src.get("files", [])})


def run_all(rows: list[Approach], bench: Path, runs: int, ctx: dict) -> None:
    """``runs`` rounds; each round rotates the order (and the order of the rows that follow a
    parent on its output, right after it)."""
    units = [a for a in rows if a.argv and a.after is None]
    followers: dict[str, list[Approach]] = {}
    for a in rows:
        if a.argv and a.after:
            followers.setdefault(a.after, []).append(a)
    ctx["runs"] = runs
    for r in range(runs):
        order = units[r % len(units):] + units[:r % len(units)]
        for a in order:
            ok = run_one(a, bench, r + 1, ctx)
            fs = followers.get(a.key, [])
            if ok and fs:  # a follower needs its parent's output
                for f in fs[r % len(fs):] + fs[:r % len(fs)]:
                    run_one(f, bench, r + 1, ctx)
            if a.output is not None:
                shutil.rmtree(a.output, ignore_errors=True)


# -- report ---------------------------------------------------------------------------------

def summarize(rows: list[Approach]) -> list[dict]:
    medians = {a.key: statistics.median(s["wall_s"] for s in a.samples) for a in rows if a.samples}
    out = []
    for a in rows:
        origins = sorted({o for smp in a.samples for o in smp.get("sha256_from", [])})
        origin_note = f"source sha256 from: {', '.join(origins)}" if origins else ""
        row = {"key": a.key, "approach": a.name, "argv": a.argv,
               "note": "; ".join(filter(None, [a.note, origin_note, *a.failures])), "samples": a.samples}
        if a.samples:
            walls = [s["wall_s"] for s in a.samples]
            row.update(median_wall_s=statistics.median(walls), min_wall_s=min(walls), max_wall_s=max(walls),
                       peak_rss_mb=max(s["maxrss_kb"] for s in a.samples) / 1024,
                       median_user_s=statistics.median(s["user_s"] for s in a.samples),
                       median_sys_s=statistics.median(s["sys_s"] for s in a.samples),
                       median_cpu_s=statistics.median(s["user_s"] + s["sys_s"] for s in a.samples),
                       bytes_written=max(s["bytes_written"] for s in a.samples))
            row["ratio"] = row["median_wall_s"] / medians["raw"] if "raw" in medians else None
            if a.baseline:
                row["baseline"] = a.baseline
                row["ratio_own_baseline"] = (row["median_wall_s"] / medians[a.baseline]
                                             if a.baseline in medians else None)
        out.append(row)
    return out


def format_table(summary: list[dict]) -> str:
    lines = ["| approach | median wall s | vs raw copy | vs own baseline | user s | sys s | peak RSS MB | "
             "bytes written | runs: min-max s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes, noisy = [], []
    names = {r["key"]: r["approach"] for r in summary}
    for r in summary:
        if r["note"]:
            notes.append(f"{r['approach']}: {r['note']}")
        if "median_wall_s" not in r:
            lines.append(f"| {r['approach']} | - | - | - | - | - | - | - | - |")
            continue
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"
        own = "-"
        if r.get("ratio_own_baseline") is not None:
            own = f"{r['ratio_own_baseline']:.2f}x"
            notes.append(f"{r['approach']}: its own baseline is `{names[r['baseline']]}`")
        lines.append(f"| {r['approach']} | {r['median_wall_s']:.2f} | {ratio} | {own} | {r['median_user_s']:.2f} | "
                     f"{r['median_sys_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['bytes_written']:,} | "
                     f"{r['min_wall_s']:.2f}-{r['max_wall_s']:.2f} |")
        noisy += [f"{r['approach']} run {s['run']} ({s['wall_s']:.2f} s: other processes "
                  f"{s['other_cpus']:.2f} CPUs, steal {s['steal_cpus']:.2f})"
                  for s in r["samples"] if s["other_cpus"] + s["steal_cpus"] > BUSY]
    notes += [f"noisy: {n}" for n in noisy] or ["no measurement ran beside other processes' work "
                                                f"(> {BUSY} CPUs)"]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def machine(workdir: Path, repo: Repo) -> dict:
    mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu,
            "ram_gib": round(int(mem["MemTotal"].split()[0]) / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "workdir": str(workdir), **filesystem(workdir), "versions": _versions(repo)}


def filesystem(path: Path) -> dict:
    """The /proc/mounts entry with the longest mount point containing ``path``."""
    best = ("?", "/", "?", "")
    real = os.path.realpath(path)
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype, opts = line.split()[:4]
        mnt = mnt.replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
            best = (dev, mnt, fstype, opts)
    return {"device": best[0], "mount": best[1], "fstype": best[2], "mount_options": best[3]}


def _versions(repo: Repo) -> dict:
    from importlib import metadata
    out = {"tensorsurgery": repo.version, "tensorsurgery_repo": str(repo.path), "git": repo.git}
    for dist in ("mergekit", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def format_machine(m: dict) -> str:
    v = m["versions"]
    return (f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, kernel {m['kernel']}, "
            f"Python {m['python']}\nworkdir: {m['workdir']} on {m['fstype']} ({m['device']} at {m['mount']}, "
            f"{m['mount_options']})\nversions: tensorsurgery {v['tensorsurgery']} from {v['tensorsurgery_repo']} "
            f"(git {v['git']}), mergekit {v['mergekit']}, torch {v['torch']}")


# -- driver ---------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_disk(workdir: Path, size: str, tmpfs: bool) -> None:
    """Refuse when the source, two outputs and a margin do not fit on the workdir's filesystem
    (and, on tmpfs, in the RAM left available)."""
    gen = _generator()
    full, dims = SIZES[size]
    stamp = workdir / f"source-{size}" / ".bench-stamp.json"
    source = 0 if stamp.exists() else gen.tensor_bytes(full, **dims)
    out = gen.tensor_bytes(full, **{**dims, "layers": 2 * (LAYERS - OVERLAP)})
    need = source + 2 * out + MARGIN
    free = shutil.disk_usage(workdir).free
    what = f"source {source / 1e9:.1f} GB + 2 outputs of {out / 1e9:.1f} GB"
    if tmpfs:
        mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        avail = int(mem["MemAvailable"].split()[0]) * 1024
        ram = source + 2 * out + TMPFS_RAM_MARGIN
        if free < need or avail < ram:
            raise SystemExit(f"run.py: error: --tmpfs: {workdir} has {free / 1e9:.1f} GB free and the machine "
                             f"{avail / 1e9:.1f} GB of RAM available, but --size {size} needs {need / 1e9:.1f} GB "
                             f"free and {ram / 1e9:.1f} GB available ({what} + margins); use a smaller --size "
                             f"or a disk --workdir")
    elif free < need:
        raise SystemExit(f"run.py: error: {workdir}: {free / 1e9:.1f} GB free, but --size {size} needs "
                         f"{need / 1e9:.1f} GB ({what} + {MARGIN / 1e9:.0f} GB margin); free some space "
                         f"or pass --workdir on a larger disk")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="default",
                   help="tiny: ~90 MB, to check the runner works; default: ~1.5 GB narrow Mistral; mid: ~3.35 GB "
                        "(hidden 2048, ~5 GB of DUS out; fits --tmpfs on 24 GB); "
                        "full: the real 7B shape, ~14.5 GB in, ~21.5 GB out")
    p.add_argument("--runs", type=int, default=3, help="measurements of each approach (3)")
    p.add_argument("--workdir", type=Path, help="where to write (default: a new folder in $TMPDIR, or in "
                   "/dev/shm with --tmpfs)")
    p.add_argument("--tmpfs", action="store_true",
                   help="source and outputs on tmpfs (/dev/shm): no disk in the way, CPU costs show; page "
                        "cache drops do not apply there")
    p.add_argument("--repo", type=Path, default=DEFAULT_REPO,
                   help="the tensorsurgery checkout to measure (its CLI, and its library for the baselines' "
                        "plan); default: this one. E.g. `git worktree add /tmp/before <commit>`")
    p.add_argument("--threads", type=int, metavar="N",
                   help="pass --threads N to every apply (only if the CLI under test has --threads)")
    p.add_argument("--keep", action="store_true", help="keep the generated source in --workdir for the next run")
    p.add_argument("--no-mergekit", action="store_true", help="skip mergekit even when it is installed")
    p.add_argument("--max-wait", type=float, default=120, metavar="SECONDS",
                   help="before each measurement, wait up to this long for other processes to go quiet (120)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--rows", metavar="KEY,KEY", type=lambda s: [k for k in s.split(",") if k],
                   help="measure only these rows (keys as in --json: raw, copy, plan, apply, apply-t1, verify, "
                        "cat-verify, verify-record, cat-output, f16, f16-t1, link, keep, keep-link, mergekit); "
                        "a verify or cat row brings its apply row along")
    p.add_argument("--merges", metavar="METHOD,METHOD", type=lambda s: [k for k in s.split(",") if k],
                   help="also measure these merge methods (or 'all') side by side with mergekit, on 3 synthetic "
                        "bf16 models of 8 layers (benchmarks/merge.py: 0.5 GB each; --size tiny: 40 kB)")
    p.add_argument("--copy-loop", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--raw-copy", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--cat", nargs="+", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--plan-spec", nargs=3, metavar=("MANIFEST", "OUTPUT", "SPEC"), help=argparse.SUPPRESS)
    p.add_argument("--link", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.notes = []
    if args.copy_loop:
        return copy_loop(args.copy_loop)
    if args.raw_copy:
        return raw_copy(args.raw_copy)
    if args.cat:
        return cat(args.cat)
    if args.plan_spec:
        return plan_spec(*args.plan_spec, link=args.link)
    if args.runs < 1:
        raise SystemExit("run.py: error: --runs must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("run.py: error: --threads must be at least 1")
    if args.keep and args.workdir is None:
        raise SystemExit("run.py: error: --keep needs --workdir (a folder the next invocation can reuse)")
    repo = probe_repo(args.repo)
    if args.tmpfs and args.workdir is None:
        if not TMPFS_ROOT.is_dir() or filesystem(TMPFS_ROOT)["fstype"] != "tmpfs":
            raise SystemExit(f"run.py: error: --tmpfs: {TMPFS_ROOT} is not a tmpfs here; pass --workdir on one")
        args.workdir = Path(tempfile.mkdtemp(prefix="tensorsurgery-bench-", dir=TMPFS_ROOT))
        args.auto_workdir, created = True, True
    else:
        created = args.workdir is None or not args.workdir.exists()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="tensorsurgery-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    bench, source = workdir / "bench", None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.tmpfs and filesystem(workdir)["fstype"] != "tmpfs":
            raise SystemExit(f"run.py: error: --tmpfs: {workdir} is on {filesystem(workdir)['fstype']}, not tmpfs")
        check_disk(workdir, args.size, args.tmpfs)
        source = prepare_source(workdir, args.size)
        return benchmark(args, repo, workdir, bench, source)
    except KeyboardInterrupt:
        log("run.py: interrupted; removing what it wrote")
        return 130
    finally:
        shutil.rmtree(bench, ignore_errors=True)
        if source is not None:
            hidden = source.with_name(source.name + ".hidden")  # only if killed mid-measurement
            if hidden.exists() and not source.exists():
                os.rename(hidden, source)
            if not args.keep:
                shutil.rmtree(source, ignore_errors=True)
        if created and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def benchmark(args: argparse.Namespace, repo: Repo, workdir: Path, bench: Path, source: Path) -> int:
    shutil.rmtree(bench, ignore_errors=True)
    bench.mkdir()
    inputs = write_inputs(bench, source)
    inputs["source"] = source
    inputs["spec"], inputs["copy-spec"] = bench / "raw-copy.json", bench / "copy-loop.json"
    spec = build_spec(repo.path, inputs["dus"], bench / "out" / "raw", inputs["spec"])
    if spec["transforms"]:
        raise SystemExit(f"run.py: error: {inputs['dus']}: the plan has {spec['transforms']} transforms; "
                         f"a copy cannot write it")
    inputs["copy-spec"].write_text(json.dumps({**spec, "output": str(bench / "out" / "copy")}))
    log(f"baselines planned with {spec['api']} from {spec['module']}")
    rows = approaches(repo, bench, inputs, spec, args)
    if args.rows:
        known = {a.key for a in rows}
        if unknown := [k for k in args.rows if k not in known]:
            raise SystemExit(f"run.py: error: --rows: no row {', '.join(unknown)}; rows: {', '.join(sorted(known))}")
        wanted = set(args.rows) | {a.after for a in rows if a.key in args.rows and a.after}
        rows = [a for a in rows if a.key in wanted]
    for a in rows:
        if a.argv is None:
            log(f"{a.name}: {a.note}")
    env = {**child_env(repo.path), HASH_CACHE_ENV: str(bench / "hash-cache")}
    ctx = {"dropped": 0, "why": None, "max_wait": args.max_wait, "tmpfs": args.tmpfs, "env": env}
    if any(a.argv and a.key not in ("raw", "copy", "plan", "apply-nocache", "mergekit") for a in rows):
        warm_hash_cache(repo, bench, inputs["dus"], env, args)
    run_all(rows, bench, args.runs, ctx)
    summary = summarize(rows)
    m = machine(workdir, repo)
    total = sum(len(a.samples) + len(a.failures) for a in rows)
    if args.tmpfs:
        caches = ("files on tmpfs, i.e. in RAM: page cache drops do not apply (every read is from memory, "
                  "every write lands in memory; fsync and O_DIRECT cost no disk time)")
    elif ctx["dropped"] == total:
        caches = "page cache dropped before every measurement"
    else:
        caches = f"page cache NOT dropped ({ctx['why']}): warm-cache runs"
    shown = THIS.relative_to(Path.cwd()) if THIS.is_relative_to(Path.cwd()) else THIS
    command = " ".join(["python", str(shown)] + argv_of(args))
    merges = None
    if args.merges:  # in the same workdir, after the DUS rows, each row with its own raw baseline
        import merge

        from synthetic import SMALL, TINY
        merges = merge.measure(8, 3, workdir, args.runs, None if args.merges == ["all"] else args.merges,
                               not args.no_mergekit, TINY if args.size == "tiny" else SMALL)
    if args.json:
        print(json.dumps({"command": command, "size": args.size, "runs": args.runs, "cache": caches,
                          "tmpfs": args.tmpfs, "baseline_plan_api": spec["api"], "notes": args.notes,
                          "source_bytes": new_bytes(source), "machine": m, "results": summary,
                          **({"merges": merges} if merges is not None else {})}, indent=2))
    else:
        print(f"{command}\n{format_machine(m)}\nsource: {args.size}, {new_bytes(source):,} bytes; "
              f"{args.runs} run(s) each, order rotated per run; {caches}\n"
              f"baselines planned with {spec['api']}\n" + "".join(f"{n}\n" for n in args.notes))
        print(format_table(summary))
        print("\nvs raw copy = median wall / median wall of the raw pipelined copy (lower is faster); vs own "
              "baseline = median wall / median wall of the cat of the bytes that verify must read; user s, sys s = "
              "median CPU seconds of the child (and its children); peak RSS = max over runs of the child's "
              "ru_maxrss; bytes written = the output folder's files, hard links to the source excluded")
        if merges is not None:
            print(f"\nmerges (benchmarks/merge.py; x raw = wall / reading every input once and writing the output "
                  f"once):\n{merge.format_rows(merges)}")
    return 0 if any(r["key"] == "raw" and r["samples"] for r in summary) else 1


def argv_of(args: argparse.Namespace) -> list[str]:
    out = ["--size", args.size, "--runs", str(args.runs)]
    out += ["--tmpfs"] * args.tmpfs
    out += ["--workdir", str(args.workdir)] if args.workdir and not getattr(args, "auto_workdir", False) else []
    out += ["--repo", str(args.repo)] if args.repo.resolve() != DEFAULT_REPO else []
    out += ["--threads", str(args.threads)] if args.threads else []
    out += ["--rows", ",".join(args.rows)] if args.rows else []
    out += ["--keep"] * args.keep + ["--no-mergekit"] * args.no_mergekit + ["--json"] * args.json
    return out + (["--max-wait", f"{args.max_wait:g}"] if args.max_wait != 120 else [])


if __name__ == "__main__":
    sys.exit(main())

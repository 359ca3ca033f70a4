"""Real faults during ``tensorsurgery apply``, in a child process: SIGKILL, SIGINT, SIGTERM part-way
through writing, and a full disk (a write failing with EFBIG under ``RLIMIT_FSIZE``).

Whatever happens, nothing appears under the output name until it is complete, the sources are
never touched (bytes and mtimes), unfinished ``*.partial`` shards do not survive a reported
failure, and ``apply --resume`` finishes the job from the shards that are whole and verify.

The checkpoint is a ~170 MB synthetic Mistral (tests/synthetic.py); the job is a
DUS to 4 layers cut into ~40 MB shards, so a signal can land between shards. The tests wait for
the temporary folder to hold a shard (no fixed sleeps); if a fast machine finishes the whole job
before the signal is sent, the run is repeated.
"""
from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

from synthetic import Dims, make_mistral, tensor_bytes  # noqa: E402
from tensorsurgery.manifest.loading import load_manifest  # noqa: E402
from tensorsurgery.output.target import TMP_MARKER  # noqa: E402
from tensorsurgery.planning.planner import build_plan  # noqa: E402
from tensorsurgery.sources.local import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals and RLIMIT_FSIZE on Linux")

#: 8000 x 1280 bf16 embeddings and lm_head (20 MB each) and 3 layers of 43 MB: 169 MB.
DIMS = Dims(vocab=8000, hidden=1280, intermediate=4480, heads=32, kv_heads=8, head_dim=40, layers=3)
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
TIMEOUT = 60


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_mistral(tmp_path_factory.mktemp("faults") / "mistral", DIMS, values="bytes",
                        max_shard_size=tensor_bytes(DIMS) * 2 // 3)


@pytest.fixture
def job(source, tmp_path):
    """(manifest, output folder, temporary folder) of a DUS of ``source`` into ~40 MB shards."""
    out = tmp_path / "dus"
    manifest = tmp_path / "dus.toml"
    manifest.write_text(f'[source]\nmodel = "{source}"\n\n[rename]\npreset = "mistral-to-llama"\n\n'
                        f'[layers]\nplan = "dus"\noverlap = 1\n\n'
                        f'[output]\npath = "{out}"\nmax_shard_size = "40MB"\n', encoding="utf-8")
    return manifest, out, tmp_path / ".dus.tensorsurgery-tmp"


def shard_sizes(manifest: Path) -> list[int]:
    m = load_manifest(manifest)
    plan = build_plan(m, {s.name: load_checkpoint(s.model) for s in m.sources})
    return [s.nbytes for s in plan.shards]


def fingerprint(folder: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (sha256, size, mtime_ns) of every file in ``folder``."""
    out = {}
    for p in sorted(folder.iterdir()):
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(4 << 20):
                digest.update(chunk)
        st = p.stat()
        out[p.name] = (digest.hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def listing(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


def finished(folder: Path) -> list[str]:
    return [n for n in listing(folder) if SHARD.fullmatch(n)]


def partials(folder: Path) -> list[str]:
    return [n for n in listing(folder) if n.endswith(".partial")]


def _child_setup(fsize: int | None = None):
    def setup():
        # A child started from a shell job may inherit SIGINT ignored; Python then would not
        # turn it into KeyboardInterrupt. Ctrl-C at a terminal finds it at its default.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return setup


def tensorsurgery(*args, fsize: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensorsurgery", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=_child_setup(fsize))


def interrupted_apply(manifest: Path, out: Path, tmp: Path, sig: int, *, wait_for_finished: bool):
    """Start ``apply``, wait until its temporary folder holds a finished shard (or, without
    ``wait_for_finished``, a ``*.partial``), send ``sig``; returns (exit code, stderr, files
    in the temporary folder once it exited). Retried if the job completes before the signal."""
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "tensorsurgery", "apply", str(manifest), "--no-progress"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_child_setup())
        deadline = time.monotonic() + TIMEOUT
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                names = listing(tmp)
                if any(SHARD.fullmatch(n) for n in names) or (
                        not wait_for_finished and any(n.endswith(".partial") for n in names)):
                    proc.send_signal(sig)
                    break
                time.sleep(0.0005)
            else:
                if proc.poll() is None:
                    pytest.fail("apply wrote no shard within the timeout")
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode == 0:  # finished before the signal: start over
            shutil.rmtree(out)
            continue
        return proc.returncode, err, listing(tmp)
    pytest.fail("apply always finished before it could be interrupted")


def assert_resume_finishes(manifest: Path, out: Path, tmp: Path, kept: int | None, total: int, *,
                           verify: bool = True) -> None:
    """``apply --resume`` keeps ``kept`` shards (None: the failed run left no temporary folder),
    writes the rest, and (``verify``) the output then verifies against the manifest."""
    r = tensorsurgery("apply", manifest, "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    note = (f"--resume: kept {kept} of {total} shard(s) that verify against the plan" if kept is not None
            else "--resume: no interrupted run found; writing everything")
    assert r.stderr == f"note: {note}\n"
    assert r.stdout.startswith(f"wrote {out}\n")
    assert not tmp.exists()
    if not verify:
        return
    v = tensorsurgery("verify", manifest, "--no-progress")
    assert v.returncode == 0, v.stdout + v.stderr
    assert v.stdout.startswith(f"verified {out}: ")


# --- SIGKILL -------------------------------------------------------------------------------------

def test_sigkill_then_resume(job, source):
    manifest, out, tmp = job
    total = len(shard_sizes(manifest))
    assert total >= 4
    before = fingerprint(source)

    code, err, left = interrupted_apply(manifest, out, tmp, signal.SIGKILL, wait_for_finished=True)
    assert code == -signal.SIGKILL
    assert err == ""  # killed: no chance to say anything
    assert not out.exists()
    done = [n for n in left if SHARD.fullmatch(n)]
    assert 1 <= len(done) < total
    assert set(left) <= set(done) | {f"{n}.partial" for n in shard_names(total)} | {TMP_MARKER}

    assert_resume_finishes(manifest, out, tmp, kept=len(done), total=total)
    assert fingerprint(source) == before


def test_sigkill_then_resume_rewrites_a_damaged_shard(job):
    manifest, out, tmp = job
    total = len(shard_sizes(manifest))
    _, _, left = interrupted_apply(manifest, out, tmp, signal.SIGKILL, wait_for_finished=True)
    done = [n for n in left if SHARD.fullmatch(n)]
    # A finished shard damaged after the crash (one flipped byte near the end) is not kept.
    with open(tmp / done[0], "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert_resume_finishes(manifest, out, tmp, kept=len(done) - 1, total=total)


def test_sigkill_then_plain_apply_starts_over(job, source):
    manifest, out, tmp = job
    before = fingerprint(source)
    interrupted_apply(manifest, out, tmp, signal.SIGKILL, wait_for_finished=True)
    assert tmp.is_dir() and not out.exists()
    r = tensorsurgery("apply", manifest, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (f"note: removed {tmp}, left by an interrupted run (use --resume to keep its finished "
            f"shards)\n") in r.stderr
    assert not tmp.exists()
    assert tensorsurgery("verify", manifest, "--no-progress").returncode == 0
    assert fingerprint(source) == before


def shard_names(total: int) -> list[str]:
    return [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]


# --- SIGINT, SIGTERM ------------------------------------------------------------------------------

@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")],
                         ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("when", ["partial", "finished"])
def test_signal_part_way(job, source, sig, code, word, when):
    manifest, out, tmp = job
    total = len(shard_sizes(manifest))
    before = fingerprint(source)
    rc, err, left = interrupted_apply(manifest, out, tmp, sig, wait_for_finished=when == "finished")
    assert rc == code
    left = [n for n in left if n != TMP_MARKER]
    if left:
        assert err == (f"tensorsurgery: {word}; nothing was written under the output name; {len(left)} finished "
                       f"shard(s) are kept in {tmp}: run the same command with --resume to keep them, or without "
                       f"it to start over\n")
    else:
        assert err == (f"tensorsurgery: {word}; nothing was written under the output name; run the same "
                       f"command to start over\n")
    assert not out.exists()
    # The unfinished shard is removed; finished ones stay for --resume (or nothing at all).
    assert all(SHARD.fullmatch(n) for n in left), left
    if when == "finished":
        assert left
    else:
        assert left or not tmp.exists()
    assert fingerprint(source) == before
    assert_resume_finishes(manifest, out, tmp, kept=len(left) if tmp.exists() else None, total=total,
                           verify=False)


# --- full disk: RLIMIT_FSIZE -------------------------------------------------------------------------

def test_file_too_large_on_the_first_shard(job, source):
    manifest, out, tmp = job
    sizes = shard_sizes(manifest)
    limit = 8 << 20
    assert sizes[0] > limit
    before = fingerprint(source)
    r = tensorsurgery("apply", manifest, "--no-progress", fsize=limit)
    assert r.returncode == 2
    assert r.stdout == ""
    first = tmp / shard_names(len(sizes))[0]
    assert r.stderr == (f"tensorsurgery: error: {first}: write failed: File too large; free disk space or "
                        f"raise the file size limit, then run the same command again\n")
    assert not out.exists()
    assert not tmp.exists()  # nothing finished: no leftover at all
    assert fingerprint(source) == before


def test_file_too_large_part_way_then_resume(job, source):
    manifest, out, tmp = job
    sizes = shard_sizes(manifest)
    names = shard_names(len(sizes))
    # Unaligned, so O_DIRECT's aligned writes meet the limit mid-buffer too.
    limit = sizes[0] + 12345
    failing = next(i for i, n in enumerate(sizes) if n > limit)
    assert failing >= 1
    r = tensorsurgery("apply", manifest, "--no-progress", fsize=limit)
    assert r.returncode == 2
    assert r.stderr == (f"tensorsurgery: error: {tmp / names[failing]}: write failed: File too large; free "
                        f"disk space or raise the file size limit, then run the same command with --resume "
                        f"to keep the {failing} finished shard(s)\n")
    assert not out.exists()
    left = [n for n in listing(tmp) if n != TMP_MARKER]
    assert not partials(tmp)
    assert left == names[:failing]  # the shards before the failing one, whole
    assert_resume_finishes(manifest, out, tmp, kept=len(left), total=len(sizes))


# --- two runs, one output: the lock ---------------------------------------------------------------

from cli_helpers import REPO as CHECKOUT  # noqa: E402
from cli_helpers import child_env, error_line, run  # noqa: E402
from tensorsurgery.io.shardfile import PARTIAL_SUFFIX  # noqa: E402
from tensorsurgery.output.outlock import lock_path, output_lock  # noqa: E402


def tiny_job(folder: Path, source: Path, *, overlap: int = 8, name: str = "m.toml") -> Path:
    """A manifest of a DUS of ``source`` into ``folder/out``, in a few shards."""
    manifest = folder / name
    manifest.write_text(f'[source]\nmodel = "{source}"\n\n[layers]\nplan = "dus"\noverlap = {overlap}\n\n'
                        f'[output]\npath = "{folder / "out"}"\nmax_shard_size = "400KB"\n', encoding="utf-8")
    return manifest


def busy_line(pid: int, out: Path) -> str:
    return f"another tensorsurgery (pid {pid}) is writing {out}; wait for it or stop it"


def test_a_second_run_is_refused_and_touches_nothing(capsys, tiny_mistral, tmp_path):
    manifest = tiny_job(tmp_path, tiny_mistral)
    out = tmp_path / "out"
    tmp = tmp_path / ".out.tensorsurgery-tmp"
    # What a first run, still writing, has on disk: its temporary folder with a finished shard.
    tmp.mkdir()
    (tmp / TMP_MARKER).touch()
    (tmp / "model-00001-of-00003.safetensors").write_bytes(b"x" * 100)
    (tmp / f"model-00002-of-00003.safetensors{PARTIAL_SUFFIX}").write_bytes(b"y" * 10)
    before = sorted(p.name for p in tmp.iterdir())
    with output_lock(out):
        for flags in ([], ["--force"], ["--resume"], ["--force", "--resume"]):
            assert error_line(*run(capsys, "apply", manifest, *flags)) == busy_line(os.getpid(), out)
            assert sorted(p.name for p in tmp.iterdir()) == before
            assert not out.exists()
    assert run(capsys, "apply", manifest)[0] == 0
    assert run(capsys, "verify", manifest)[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["m.toml", "out"]  # the lock file goes with the run


def test_a_lock_left_by_a_dead_run_is_stale(capsys, tiny_mistral, tmp_path):
    manifest = tiny_job(tmp_path, tiny_mistral)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(tmp_path / "out").write_text(f"{dead.stdout.strip():<19}\n")  # not locked by anyone
    code, _, err = run(capsys, "apply", manifest)
    assert (code, err) == (0, "")
    assert run(capsys, "verify", manifest)[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["m.toml", "out"]


_GO = """
import os, sys, time
from tensorsurgery.cli import main
go = sys.argv[1]
open(f"{go}.{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.0005)
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_two_runs_at_once(capsys, tiny_mistral, tmp_path, force):
    """Two applies started at the same instant (both imported, then released together), many times,
    either started first: one writes a complete output, the other says why it did not, in one line."""
    busy = runs = 0
    # At least 8 pairs; more (up to 32) while fewer than 2 overlapped: a loaded machine can
    # serialise a pair, which proves nothing about the lock either way.
    for i in range(32):
        if i >= 8 and busy >= 2:
            break
        runs += 1
        folder = tmp_path / str(i)
        folder.mkdir()
        manifest = tiny_job(folder, tiny_mistral)
        out = folder / "out"
        if force:
            assert run(capsys, "apply", manifest)[0] == 0
        go = folder / "go"
        argv = ["apply", str(manifest), "--no-progress"] + (["--force"] if force else [])
        procs = [subprocess.Popen([sys.executable, "-c", _GO, str(go), *argv], cwd=CHECKOUT, env=child_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        if i % 2:
            procs.reverse()
        deadline = time.monotonic() + TIMEOUT
        while not all((folder / f"go.{p.pid}").exists() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.001)  # both imported and waiting
        go.touch()
        results = [(p.wait(timeout=TIMEOUT), *p.communicate()) for p in procs]
        pids = [p.pid for p in procs]
        codes = sorted(r[0] for r in results)
        assert codes in ([0, 2], [0, 0] if force else [0, 2]), results
        for (code, _, stderr), pid in zip(results, pids):
            assert "Traceback" not in stderr, stderr
            if code == 2:
                other = pids[1 - pids.index(pid)]
                line = error_line(code, "", stderr)
                # Either it met the lock, or the other run had finished before it started.
                assert line in (busy_line(other, out),
                                f"{out}: already exists; pass --force to replace it, or choose another --output")
                busy += line == busy_line(other, out)
            else:
                assert stderr == ""
        v = run(capsys, "verify", manifest)
        assert v[0] == 0, v
        assert sorted(os.listdir(folder)) == sorted(["go", "m.toml", "out", *(f"go.{p}" for p in pids)])
    print(f"{busy} of {runs} met the lock")
    assert busy >= 2  # the runs did overlap (a machine that serialises them every time proves nothing)


# --- a kill, SIGTERM or a full disk at every file-system step ------------------------------------

#: The calls that change the file system (os.open only when it may create or write).
_STEPS = ("open", "mkdir", "rename", "replace", "unlink", "rmdir", "fsync", "write", "pwrite")
_WRITES = {"open", "mkdir", "fsync", "write", "pwrite"}  # where a full disk shows


def _hook(at: int, action: str) -> list[int]:
    """Make the ``at``-th file-system step (counted over every thread) do ``action`` instead:
    "kill" (SIGKILL: no cleanup at all), "term" (SIGTERM, handled like the user's), "enospc"
    (fail with a full disk); at=0 only counts. Returns the counter."""
    import errno
    count = [0]
    for name in _STEPS:
        real = getattr(os, name)

        def hooked(*a, _real=real, _name=name, **kw):
            if _name == "open" and not (a[1] & (os.O_CREAT | os.O_WRONLY | os.O_RDWR)):
                return _real(*a, **kw)
            if action == "enospc" and _name not in _WRITES:
                return _real(*a, **kw)
            count[0] += 1
            if count[0] == at:
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if action == "term":
                    os.kill(os.getpid(), signal.SIGTERM)
                if action == "enospc":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(a[0]) if a else None)
            return _real(*a, **kw)
        setattr(os, name, hooked)
    return count


def _forked(argv: list[str], at: int, action: str, err: Path) -> tuple[int, int]:
    """Run ``tensorsurgery ARGV`` in a forked child with :func:`_hook`; (exit code, steps taken)."""
    counted = err.with_suffix(".count")
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            sys.stdout = open(os.devnull, "w")
            sys.stderr = open(err, "w")
            from tensorsurgery.cli import main
            count = _hook(at, action)
            code = main(argv)
            counted.write_text(str(count[0]))
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), int(counted.read_text()) if counted.exists() else -1


def _beside(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n != "err" and not n.startswith("err."))


@pytest.mark.parametrize("action", ["kill", "term", "enospc"])
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_every_step(capsys, tiny_mistral, tmp_path, force, action):
    """At each file-system step of ``apply`` (``--force`` over an earlier, different output): a
    kill, a SIGTERM, a full disk. After each, the earlier output is never lost (under its name or
    in the folder the next run restores it from), what the message says is true, and the command
    it names (the same one, with --resume when it says so) completes to an output that verifies,
    with nothing left beside it."""
    flags = ["--force"] if force else []
    steps = None
    at = 0
    while steps is None or at <= steps:
        at += 1
        folder = tmp_path / str(at)
        folder.mkdir()
        manifest = tiny_job(folder, tiny_mistral)
        out = folder / "out"
        if force:
            older = tiny_job(folder, tiny_mistral, overlap=4, name="old.toml")
            assert run(capsys, "apply", older)[0] == 0
        argv = ["apply", str(manifest), "--no-progress", *flags]
        code, taken = _forked(argv, at, action, folder / "err")
        err = (folder / "err").read_text()
        if code == 0:  # the step was past the last one (or its failure is harmless): done
            steps = taken if steps is None else steps
            assert run(capsys, "verify", manifest)[0] == 0
            assert _beside(folder) == sorted(["m.toml", "out", *(["old.toml"] if force else [])]), err
            continue
        assert "Traceback" not in err, err
        if action == "kill":
            assert code == -signal.SIGKILL
        elif action == "term":
            assert code == 143 and err.startswith("tensorsurgery: terminated; ") and err.count("\n") == 1, err
        else:
            assert code == 2 and err.startswith("tensorsurgery: error: ") and err.count("\n") == 1, err
        if "is complete and in place" in err:
            assert run(capsys, "verify", manifest)[0] == 0
        if "nothing was written" in err:
            assert (run(capsys, "verify", older)[0] == 0) if force else not out.exists(), (at, err, _beside(folder))
        if force:  # the earlier output: under its name, or where the next run restores it from
            hidden = [folder / n for n in os.listdir(folder) if ".tensorsurgery-old-" in n]
            assert any(run(capsys, "verify", older, p)[0] == 0 for p in [out, *hidden]) or \
                run(capsys, "verify", manifest)[0] == 0, (at, err, _beside(folder))
        # Killed once the new output was whole: it is complete (a plain run then says it exists).
        complete = run(capsys, "verify", manifest)[0] == 0
        again = argv + (["--resume"] if "--resume" in err else [])
        code, _, err2 = run(capsys, *again)
        if not force and code == 2:
            assert complete or "is complete: an interrupted run had renamed it into place" in err2, (at, err, err2)
            assert "already exists" in err2 or "is complete" in err2, (at, err, err2)
        else:
            assert code == 0, (at, err, err2)
        assert run(capsys, "verify", manifest)[0] == 0, (at, err)
        assert _beside(folder) == sorted(["m.toml", "out", *(["old.toml"] if force else [])]), (at, err)
    assert steps is not None and steps > 10


def test_an_output_that_is_a_mount_point(capsys, monkeypatch, tiny_mistral, tmp_path):
    """A container volume mounted at the output: refused before anything is written (the final
    rename would fail with EBUSY). Simulated at tensorsurgery.output.target.is_mount_point: a real bind
    mount needs root (or a user namespace the suite does not assume)."""
    import tensorsurgery.output.target as target_module
    manifest = tiny_job(tmp_path, tiny_mistral)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(target_module, "is_mount_point", lambda p: Path(p) == out)
    for flags in ([], ["--force"]):
        assert error_line(*run(capsys, "apply", manifest, *flags)) == (
            f"{out}: is a mount point (a volume); an output is written beside it and renamed into place, which a "
            f"mount point cannot take; write into a folder inside it: --output {out / 'out'}")
        assert sorted(os.listdir(tmp_path)) == ["m.toml", "out"] and not os.listdir(out)
    code, _, err = run(capsys, "apply", manifest, "--output", out / "out")
    assert (code, err) == (0, "")
    assert run(capsys, "verify", manifest, out / "out")[0] == 0


def test_verify_while_an_apply_writes_the_output(capsys, tiny_mistral, tmp_path):
    manifest = tiny_job(tmp_path, tiny_mistral)
    out = tmp_path / "out"
    with output_lock(out):
        assert error_line(*run(capsys, "verify", manifest)) == (
            f"{out}: not there yet: another tensorsurgery (pid {os.getpid()}) is writing it; wait for it, then run "
            f"verify again")
    line = error_line(*run(capsys, "verify", manifest))  # no lock: the usual message
    assert line.startswith(f"{out}: output folder not found; ")


@pytest.mark.parametrize("kind", ["folder", "link", "fifo"])
def test_something_else_at_the_lock_file_name(capsys, tiny_mistral, tmp_path, kind):
    from tensorsurgery.output.outlock import lock_path

    manifest = tiny_job(tmp_path, tiny_mistral)
    out = tmp_path / "out"
    lock = lock_path(out)
    if kind == "folder":
        lock.mkdir()
    elif kind == "link":
        lock.symlink_to(tmp_path / "elsewhere")
    else:
        os.mkfifo(lock)
    code, _, err = run(capsys, "apply", manifest)
    assert code == 2
    assert f"{lock}: is " in err
    assert "at the name of tensorsurgery's lock file; remove it yourself, then run the same command again" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and os.path.lexists(lock)

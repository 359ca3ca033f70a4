"""Helpers of the tests that use tensorsurgery as a person would, through its command line:
manifests written into a folder, the command line run in this process or in a child (with a
timeout, so a FIFO that hangs fails the test instead of the suite), a child's own peak memory,
one-line error checks, and snapshots of folders that see links, FIFOs and folders without
opening them.

Only ``tensorsurgery.cli.main`` and the standard library are used, so these tests run unchanged
against an older checkout of the package (``PYTHONPATH=OLD python -m pytest ...``).
"""
from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from tensorsurgery.cli import main

#: The checkout under test: children import tensorsurgery from here.
REPO = Path(__file__).resolve().parent.parent
PREFIX = "tensorsurgery: error: "
#: Seconds a command may take; a FIFO opened for reading without O_NONBLOCK would block forever.
TIMEOUT = 30


def write_manifest(folder: Path, source: Path | str, output: Path | str, *, name: str = "m.toml",
                   layers: str = 'plan = "dus"\noverlap = 8', extra: str = "", output_extra: str = "") -> Path:
    """A manifest in ``folder``: ``source`` depth up-scaled (by default), into ``output``;
    ``extra`` goes before ``[output]`` (tables such as ``[config]``), ``output_extra`` into it."""
    path = folder / name
    path.write_text(f'[source]\nmodel = "{source}"\n\n[layers]\n{layers}\n\n{extra}\n'
                    f'[output]\npath = "{output}"\nmax_shard_size = "100KB"\n{output_extra}\n', encoding="utf-8")
    return path


class Hung(Exception):
    """The command did not finish in time (a FIFO opened blocking, ``/dev/zero`` read to the end)."""


def _hung(signum: int, frame: object) -> None:  # noqa: ARG001 - signal handler signature
    raise Hung(f"no answer in {TIMEOUT} s")


def run(capsys, *argv: object, timeout: int = TIMEOUT) -> tuple[int, str, str]:
    """``tensorsurgery ARGV`` in this process: (exit code, stdout, stderr). A command still running
    after ``timeout`` seconds raises :class:`Hung` (SIGALRM interrupts a blocked open)."""
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(timeout)
    try:
        code = main([str(a) for a in argv])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    return code, out, err


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child that imports tensorsurgery from the checkout under test."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def run_child(*argv: object, cwd: Path, timeout: float = TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """``python -m tensorsurgery ARGV`` in a child, from ``cwd``, killed after ``timeout`` seconds."""
    return subprocess.run([sys.executable, "-m", "tensorsurgery", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=child_env(**env), stdin=subprocess.DEVNULL)


def error_line(code: int, out: str, err: str) -> str:
    """Check an error as the README promises one (exit 2, one line on stderr, no traceback, nothing
    on stdout); returns the message after ``tensorsurgery: error: ``."""
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err, err
    assert err.startswith(PREFIX) and err.endswith("\n") and err.count("\n") == 1, err
    assert out == "", out
    return err[len(PREFIX):-1]


def child_error(proc: subprocess.CompletedProcess) -> str:
    """:func:`error_line` for a finished child."""
    return error_line(proc.returncode, proc.stdout, proc.stderr)


def differences(code: int, out: str, err: str) -> list[str]:
    """Check that verify found differences (exit 1, nothing on stderr); returns the difference
    lines (the last line, the summary, left out)."""
    assert code == 1, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert err == "", err
    lines = out.splitlines()
    assert "difference(s); the output is NOT what" in lines[-1], out
    return lines[:-1]


def kind(path: Path) -> str:
    """What ``path`` is, without following a link or opening it."""
    mode = os.lstat(path).st_mode
    for test, name in ((stat.S_ISLNK, "link"), (stat.S_ISDIR, "dir"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISREG, "file")):
        if test(mode):
            return name
    return "special"


#: Files up to this size are hashed by :func:`snapshot`; larger ones (sparse test files of GBs)
#: are compared by size and modification time.
HASHED = 64 << 20


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` (links not followed, FIFOs not opened): relative path ->
    (kind, sha256, size and mtime of a file, or a link's target), to compare before and after."""
    out: dict[str, tuple] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            what = kind(path)
            if what == "file":
                st = path.stat()
                digest = hashlib.sha256()
                if st.st_size <= HASHED:
                    with open(path, "rb") as f:
                        while chunk := f.read(1 << 20):
                            digest.update(chunk)
                detail: tuple = (digest.hexdigest(), st.st_size, st.st_mtime_ns)
            elif what == "link":
                detail = (os.readlink(path),)
            else:
                detail = ()
            out[str(path.relative_to(folder))] = (what, *detail)
    return out


def replace_with(path: Path, what: str, *, outside: Path | None = None) -> None:
    """Replace the file ``path`` with ``what``: ``dangling`` (a link to nothing), ``folder``,
    ``fifo``, ``dev-zero`` (a link to /dev/zero), ``outside`` (a link to a copy of the same bytes
    in the folder ``outside``), ``missing``."""
    data = path.read_bytes() if what == "outside" else None
    path.unlink()
    if what == "dangling":
        path.symlink_to(path.parent / "no-such-file")
    elif what == "folder":
        path.mkdir()
    elif what == "fifo":
        os.mkfifo(path)
    elif what == "dev-zero":
        path.symlink_to("/dev/zero")
    elif what == "outside":
        assert outside is not None and data is not None
        outside.mkdir(parents=True, exist_ok=True)
        (outside / path.name).write_bytes(data)
        path.symlink_to(outside / path.name)
    else:
        assert what == "missing", what


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def argv_of(*parts: Sequence[object] | object) -> list[str]:
    """Flatten ``parts`` into an argument list of strings."""
    out: list[str] = []
    for p in parts:
        out += [str(x) for x in p] if isinstance(p, (list, tuple)) else [str(p)]
    return out


_RUN_AND_REPORT = (
    "import atexit, os, re, runpy, sys\n"
    "def report():\n"
    "    hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
    "    open(os.environ['TS_HWM_FILE'], 'w').write(hwm)\n"
    "atexit.register(report)\n"
    "sys.argv = ['tensorsurgery', *sys.argv[1:]]\n"
    "runpy.run_module('tensorsurgery', run_name='__main__')\n"
)


def peak_rss_mb(tmp_path: Path, *argv: object) -> float:
    """Run ``tensorsurgery ARGV`` in a child and return the child's own peak RSS in MB. The child
    reports its VmHWM itself: wait4's ru_maxrss would carry the parent's peak across fork+exec
    (and the pytest process holds torch)."""
    hwm = tmp_path / "hwm"
    proc = subprocess.run([sys.executable, "-c", _RUN_AND_REPORT, *map(str, argv)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=child_env(TS_HWM_FILE=str(hwm)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(hwm.read_text()) / 1024

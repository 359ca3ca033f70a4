"""A cached Hub source without a network (issue 16): without ``HF_HUB_OFFLINE``, a fully cached
source waited ~47 s through a dozen retry lines of huggingface_hub before it worked. Now a commit
the cache holds is read without any request, and a branch or tag is resolved from the cache's
``refs/`` after one short try, with one note line.

Each case runs in a child (huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` at import),
against an endpoint where nothing listens (connection refused at once) and one that accepts
connections and never answers (the probe's timeout), which also counts the connections made.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import test_hub
from test_hub import COMMIT, add_to_cache, write_manifest

from cli_helpers import REPO

hf_repo = test_hub.hf_repo  # the repo files, a fixture

#: Seconds a plan of a cached source may take without a network (it took 47).
QUICK = 10


class Silent:
    """A TCP server that accepts every connection and never answers; ``accepted`` counts them."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent() -> Iterator[Silent]:
    server = Silent()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def cached(tmp_path, hf_repo) -> Path:
    """An HF_HOME whose cache holds org/tiny at COMMIT, refs/main pointing at it."""
    home = tmp_path / "hf_home"
    add_to_cache(home / "hub", "org/tiny", COMMIT, hf_repo)
    return home


def _run(tmp_path: Path, home: Path, endpoint: str, *argv: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "PYTHONPATH"}
    env.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, HF_TOKEN="", PYTHONPATH=str(REPO))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tensorsurgery", *argv], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return done, time.monotonic() - started


def _at_commit(tmp_path: Path) -> Path:
    """A manifest of org/tiny at ``revision = COMMIT``."""
    manifest = write_manifest(tmp_path / "m.toml", "org/tiny", tmp_path / "out")
    text = manifest.read_text().replace('model = "org/tiny"\n', f'model = "org/tiny"\nrevision = "{COMMIT}"\n')
    manifest.write_text(text)
    return manifest


def _endpoint(kind: str, silent: Silent) -> str:
    return "http://127.0.0.1:9" if kind == "refused" else silent.url


@pytest.mark.parametrize("kind", ["refused", "silent"])
@pytest.mark.parametrize("command", ["plan", "apply"])
def test_cached_branch_without_a_network(tmp_path, cached, silent, kind, command):
    manifest = write_manifest(tmp_path / "m.toml", "org/tiny", tmp_path / "out")
    done, seconds = _run(tmp_path, cached, _endpoint(kind, silent), command, str(manifest), *(
        ["--no-progress"] if command == "apply" else []))
    assert done.returncode == 0, done.stderr
    assert seconds < QUICK, (seconds, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("note: the Hub cannot be reached (")
    assert lines[0].endswith(f"); using the cached revision {COMMIT[:7]} of org/tiny")
    assert COMMIT in done.stdout if command == "plan" else (tmp_path / "out" / "tensorsurgery.json").is_file()


@pytest.mark.parametrize("command", ["plan", "apply"])
def test_cached_commit_touches_no_network(tmp_path, cached, silent, command):
    """A commit the cache holds: not one connection, not one line on stderr."""
    manifest = _at_commit(tmp_path)
    done, seconds = _run(tmp_path, cached, silent.url, command, str(manifest), "--no-progress"
                         if command == "apply" else "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and silent.accepted == [] and seconds < QUICK


def test_partly_cached_commit_without_a_network(tmp_path, cached, silent):
    """A commit whose snapshot lacks a shard needs the Hub: one error line, at once."""
    snapshot = cached / "hub" / "models--org--tiny" / "snapshots" / COMMIT
    (snapshot / "model-00002-of-00004.safetensors").unlink()
    manifest = _at_commit(tmp_path)
    done, seconds = _run(tmp_path, cached, silent.url, "plan", str(manifest))
    assert done.returncode == 2 and seconds < QUICK, (seconds, done.stderr)
    assert done.stderr.splitlines() == [
        f"tensorsurgery: error: org/tiny@{COMMIT[:12]}: 1 weight file(s) not in the Hugging Face cache "
        f"(model-00002-of-00004.safetensors) and the Hub cannot be reached; download them once online"]

"""Check and use are the same file (issue 16): every check of a file (a regular file, inside its
folder, the one that was planned) is made on the descriptor that is then read, so a name swapped
for a link, a FIFO or another file between a check and a use wins no race. No torch.

The races run many times against a thread that swaps the name in a loop; each test fails on a
tool that checks a file by name and then opens it by name again.
"""
from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import tensorsurgery as ts
from cli_helpers import write_manifest
from tensorsurgery.errors import SourceError
from tensorsurgery.io import fsio

SECRET = b'{"secret": "a file outside the source folder that must never reach an output"}'


@pytest.fixture
def src(tmp_path, tiny_mistral) -> Path:
    """A copy of the fixture checkpoint to swap files in."""
    return shutil.copytree(tiny_mistral, tmp_path / "src")


@contextmanager
def swapping(path: Path, first: Path, second: Path) -> Iterator[None]:
    """While the block runs, a thread makes the name ``path`` alternately the regular file
    ``first`` (a hard link of it) and a symbolic link to ``second``, each by an atomic rename,
    so ``path`` always names one of the two."""
    spare = path.parent.parent / f".swap-{path.name}"
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            os.link(first, spare)
            os.replace(spare, path)
            os.symlink(second, spare)
            os.replace(spare, path)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        spare.unlink(missing_ok=True)
        os.link(first, spare)
        os.replace(spare, path)


def runs(n: int, fn: Callable[[], object]) -> tuple[int, int]:
    """Call ``fn`` ``n`` times; returns (times it returned, times it raised SourceError)."""
    ok = refused = 0
    for _ in range(n):
        try:
            fn()
            ok += 1
        except SourceError:
            refused += 1
    return ok, refused


# --------------------------------------------------------------------------- copied files

def test_a_copied_file_swapped_for_a_link_never_copies_the_link_target(tmp_path):
    """copy_file checks the file it opened: a tokenizer.json swapped (in a loop) for a link to a
    secret outside the folder is refused or copied as itself, never the secret."""
    root = tmp_path / "src"
    root.mkdir()
    original = tmp_path / "tokenizer.json.orig"
    original.write_bytes(b'{"tokenizer": 1}')
    secret = tmp_path / "secret.json"
    secret.write_bytes(SECRET)
    name = root / "tokenizer.json"
    shutil.copy(original, name)
    out = tmp_path / "out"
    out.mkdir()
    leaked = 0

    def copy() -> None:
        nonlocal leaked
        dest = out / "tokenizer.json"
        dest.unlink(missing_ok=True)
        fsio.copy_file(name, dest, inside=root)
        leaked += dest.read_bytes() == SECRET

    with swapping(name, original, secret):
        ok, refused = runs(2000, copy)
    assert leaked == 0
    assert ok and refused  # both sides of the swap were seen


def test_apply_never_copies_a_link_swapped_in_for_a_copied_file(tmp_path, src):
    """The same through apply (planned once, executed many times while tokenizer.json is swapped
    for a link to a secret outside the source): every run is refused in one line or copies the
    real file."""
    original = tmp_path / "tokenizer.json.orig"
    shutil.copy(src / "tokenizer.json", original)
    secret = tmp_path / "secret.json"
    secret.write_bytes(SECRET)
    out = tmp_path / "out"
    plan = ts.plan(str(write_manifest(tmp_path, src, out, layers='plan = "keep"')))
    copies: list[bytes] = []

    def apply() -> None:
        ts.execute(plan, force=True)
        copies.append((out / "tokenizer.json").read_bytes())

    with swapping(src / "tokenizer.json", original, secret):
        ok, refused = runs(200, apply)
    assert SECRET not in copies
    assert ok and set(copies) == {original.read_bytes()}

"""The command line in a real terminal (issue 9): in a terminal, ``tensorsurgery verify
manifests/demo.toml`` (the README's first command) crashed in the progress bar with ``TypeError:
bool() undefined when iterable == total == None`` and exited 1 ("differences found"). CI never saw
it: its stderr is not a terminal, so no bar was drawn.

Here each command runs in a child whose stdin, stdout and stderr are a pseudo-terminal (so
``isatty()`` is true and tqdm draws), as a user at a shell runs it: apply, verify against the
manifest, verify from the record with and without the sources, push and ``apply --push-to-hub``
(offline, so the upload fails: one error line, after verify drew its bar), plan and inspect.
Each must exit as documented, with no traceback, and apply and verify must have drawn a bar.
"""
from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from cli_helpers import REPO, TIMEOUT, Hung, child_env

#: What a drawn tqdm bar leaves in the terminal: a carriage return and a rate in bytes.
BAR = ("\r", "B/s")


def run_in_pty(*argv: object, cwd: Path, cols: int = 100, rows: int = 30, **env: str) -> tuple[int, str]:
    """``python -m tensorsurgery ARGV`` with a terminal of ``cols`` x ``rows`` as stdin, stdout and
    stderr; returns the exit code and everything written to the terminal (``\\r\\n`` as ``\\n``)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "tensorsurgery", *map(str, argv)], stdin=slave, stdout=slave,
                            stderr=slave, cwd=cwd, env=child_env(**env), start_new_session=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise Hung(f"tensorsurgery {argv} did not finish in {TIMEOUT} s")
            ready, _, _ = select.select([master], [], [], left)
            if not ready:
                continue
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed its end of the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=TIMEOUT)
    finally:
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", errors="replace").replace("\r\n", "\n")


def assert_bar(text: str, desc: str) -> None:
    assert f"{desc}:" in text and all(mark in text for mark in BAR), f"no {desc!r} progress bar in:\n{text!r}"


def assert_clean(code: int, text: str, expected: int) -> None:
    assert code == expected, f"exit {code}, expected {expected}:\n{text}"
    assert "Traceback" not in text and "Error:" not in text.replace("tensorsurgery: error:", ""), text


@pytest.fixture
def demo(tmp_path) -> Path:
    """The README's quick start, as a fresh clone holds it: manifests/demo.toml and the tiny
    checkpoint it names (relative paths, so it runs from this folder)."""
    (tmp_path / "manifests").mkdir()
    shutil.copy(REPO / "manifests" / "demo.toml", tmp_path / "manifests" / "demo.toml")
    shutil.copytree(REPO / "examples" / "tiny-mistral", tmp_path / "examples" / "tiny-mistral")
    return tmp_path


@pytest.mark.parametrize("cols, rows", [(100, 30), (0, 30), (0, 0)],
                         ids=["100-columns", "width-unknown", "size-unknown"])  # the last: as `script` makes it
def test_readme_commands_in_a_terminal(demo, cols, rows):
    """`tensorsurgery apply manifests/demo.toml --force && tensorsurgery verify manifests/demo.toml`."""
    code, text = run_in_pty("apply", "manifests/demo.toml", "--force", cwd=demo, cols=cols, rows=rows)
    assert_clean(code, text, 0)
    assert_bar(text, "writing")
    assert f"wrote {demo / 'out' / 'demo-dus'}" in text

    code, text = run_in_pty("verify", "manifests/demo.toml", cwd=demo, cols=cols, rows=rows)
    assert_clean(code, text, 0)
    assert_bar(text, "verifying")
    assert "verified out/demo-dus: " in text


def test_verify_output_in_a_terminal_with_and_without_sources(demo):
    assert run_in_pty("apply", "manifests/demo.toml", cwd=demo)[0] == 0
    code, text = run_in_pty("verify", "out/demo-dus", cwd=demo)
    assert_clean(code, text, 0)
    assert_bar(text, "verifying")
    assert "every byte matches the recorded manifest applied to the sources" in text

    (demo / "examples").rename(demo / "moved")  # the record's source is gone
    code, text = run_in_pty("verify", "out/demo-dus", cwd=demo)
    assert_clean(code, text, 0)
    assert_bar(text, "verifying")
    assert "sources not found" in text


def test_verify_finding_differences_in_a_terminal(demo):
    """Exit 1 means differences, and only then."""
    assert run_in_pty("apply", "manifests/demo.toml", cwd=demo)[0] == 0
    config = demo / "out" / "demo-dus" / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 48', '"num_hidden_layers": 47'))
    for argv in (["manifests/demo.toml"], ["out/demo-dus"]):
        code, text = run_in_pty("verify", *argv, cwd=demo)
        assert_clean(code, text, 1)
        assert_bar(text, "verifying")
        assert "config.json: num_hidden_layers = 47 but the tensors hold 48 layers" in text
        assert "out/demo-dus: 2 difference(s); the output is NOT what" in text


@pytest.mark.parametrize("how", ["push", "apply --push-to-hub"])
def test_push_offline_in_a_terminal(demo, how):
    """The upload cannot happen offline: verify runs first (its bar is drawn), then one error line."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(demo / "hf-home"), "HF_TOKEN": ""}
    if how == "push":
        assert run_in_pty("apply", "manifests/demo.toml", cwd=demo)[0] == 0
        code, text = run_in_pty("push", "out/demo-dus", "someone/demo-dus", cwd=demo, **env)
    else:
        code, text = run_in_pty("apply", "manifests/demo.toml", "--push-to-hub", "someone/demo-dus", cwd=demo, **env)
        assert_bar(text, "writing")
    assert_clean(code, text, 2)
    assert_bar(text, "verifying")
    errors = [line for line in text.split("\n") if "tensorsurgery: error:" in line]
    assert len(errors) == 1, text
    assert text.index("verifying:") < text.index("tensorsurgery: error:")
    out = "out/demo-dus" if how == "push" else str(demo / "out" / "demo-dus")
    assert re.fullmatch(rf"tensorsurgery: error: someone/demo-dus: push to the Hugging Face Hub failed "
                        rf"\(OfflineModeIsEnabled: .*\); the output is complete in {re.escape(out)}; retry with "
                        rf"`tensorsurgery push {re.escape(out)} someone/demo-dus`", errors[0].strip()), errors[0]
    assert (demo / "out" / "demo-dus" / "tensorsurgery.json").is_file()  # the output stays whole


@pytest.mark.parametrize("argv, expected", [
    (["plan", "manifests/demo.toml"], "disk needed: "),
    (["inspect", "examples/tiny-mistral"], "examples/tiny-mistral: hf layout, model_type mistral, 32 layers"),
    (["apply", "manifests/demo.toml", "--dry-run"], "dry run: nothing written"),
])
def test_other_commands_in_a_terminal(demo, argv, expected):
    code, text = run_in_pty(*argv, cwd=demo)
    assert_clean(code, text, 0)
    assert expected in text


def test_an_error_in_a_terminal_is_one_line(demo):
    code, text = run_in_pty("apply", "manifests/demo.toml", "--source", "nowhere", cwd=demo)
    assert_clean(code, text, 2)
    assert text == ("tensorsurgery: error: source 'source': 'nowhere' is not a folder nor a Hugging Face repo id; "
                    "pass --source PATH to a local copy\n")


#: A bar with a total: "verifying: 100%|####| 230k/230k [00:00<00:00, 1.35MB/s]" (done/total, elapsed<ETA).
TOTAL = re.compile(r"(?P<desc>\w+): +\d+%\|[^|]*\| *(?P<done>[\d.]+[kMGT]?)/(?P<total>[\d.]+[kMGT]?) "
                   r"\[\d\d:\d\d<\d\d:\d\d")


@pytest.mark.parametrize("target", ["manifests/demo.toml", "out/demo-dus", "record-only"])
def test_verify_bar_has_a_total(demo, target):
    """The verify bar had no total or ETA ("verifying: 1.23MB [00:00, 45.6MB/s]") although the bytes
    to check are known; now it has them as apply's bar has, and ends at its total."""
    code, text = run_in_pty("apply", "manifests/demo.toml", cwd=demo)
    assert_clean(code, text, 0)
    assert any(m["desc"] == "writing" for m in TOTAL.finditer(text)), text  # apply's bar, the model
    if target == "record-only":
        (demo / "examples").rename(demo / "moved")
        target = "out/demo-dus"
    code, text = run_in_pty("verify", target, cwd=demo)
    assert_clean(code, text, 0)
    bars = [m for m in TOTAL.finditer(text) if m["desc"] == "verifying"]
    assert bars, f"no total in the verify bar:\n{text!r}"
    assert bars[-1]["done"] == bars[-1]["total"], text
    # The total is the tensor data verify checks, as its last line says ("(230.43 kB of tensor data)").
    checked = float(re.search(r"\(([\d.]+) kB of tensor data\)", text)[1])
    assert abs(float(bars[-1]["total"].rstrip("k")) - checked) < 1, (bars[-1][0], checked)

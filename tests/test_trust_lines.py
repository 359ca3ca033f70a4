"""One line, not a traceback, and no surprise (issue 16): inputs that crashed, ran out of memory,
waited a long time or did something the user did not ask for are each one error line with exit
code 2, found before anything is written:

* ``--threads`` beyond what a process can start (``RuntimeError: can't start new thread``), or 0;
"""
from __future__ import annotations

import pytest

import tensorsurgery as ts
from cli_helpers import child_error, error_line, run, run_child, snapshot, write_manifest

# --------------------------------------------------------------------------- --threads


@pytest.mark.parametrize("threads", [0, -1, 257])
@pytest.mark.parametrize("command", ["apply", "verify"])
def test_threads_out_of_range(capsys, tiny_mistral, tmp_path, command, threads):
    """Old main took 0 and -1 as the default and started 257 threads without a word."""
    manifest = write_manifest(tmp_path, tiny_mistral, tmp_path / "out")
    before = snapshot(tmp_path)
    message = error_line(*run(capsys, command, manifest, "--no-progress", "--threads", threads))
    assert message == (f"--threads {threads} is out of range: give a number from 1 to 256 (default "
                       f"{ts.api.DEFAULT_THREADS}: one per core, up to 8)")
    assert snapshot(tmp_path) == before


def test_threads_far_out_of_range_is_one_line(tmp_path, tiny_mistral):
    """``apply --threads 100000`` was `RuntimeError: can't start new thread` after planning
    (in a child: old main starts threads until the OS refuses)."""
    manifest = write_manifest(tmp_path, tiny_mistral, tmp_path / "out")
    before = snapshot(tmp_path)
    proc = run_child("apply", manifest, "--no-progress", "--threads", 100000, cwd=tmp_path)
    assert child_error(proc).startswith("--threads 100000 is out of range: give a number from 1 to 256")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("call", ["apply", "verify", "push", "execute"])
def test_threads_out_of_range_in_the_api(tiny_mistral, tmp_path, call):
    """The API raises before it plans or starts a thread, in its own words."""
    manifest = write_manifest(tmp_path, tiny_mistral, tmp_path / "out")
    before = snapshot(tmp_path)
    with pytest.raises(ts.OptionError, match=r"^threads=100000 is out of range: give a number from 1 to 256 "):
        if call == "apply":
            ts.apply(manifest, threads=100000)
        elif call == "verify":
            ts.verify(manifest, threads=100000)
        elif call == "push":
            ts.push(tmp_path, "someone/model", threads=100000)
        else:
            ts.execute(ts.plan(manifest), threads=100000)
    assert snapshot(tmp_path) == before

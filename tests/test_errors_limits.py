"""One line, not a traceback, and no surprise (issue 16): inputs that crashed, ran out of memory,
waited a long time or did something the user did not ask for are each one error line with exit
code 2, found before anything is written:

* ``--threads`` beyond what a process can start (``RuntimeError: can't start new thread``), or 0;
* manifests that ask for more than any model has (a 60 kB mergekit YAML whose aliases repeat a
  slice, a 529-byte "billion laughs", 27 kB of TOML ranges: 1.5 to 2 GB and a ``MemoryError``),
  or that nest or refer to themselves past what the parsers take (``RecursionError``);
"""
from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tensorsurgery as ts
from cli_helpers import child_env, child_error, error_line, run, run_child, snapshot, write_manifest

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


# --------------------------------------------------------------------------- manifest size

#: Address space of a child planning a hostile manifest: a real plan of the tiny model fits
#: (test_bounded_child_plans_a_real_manifest); the old plans of 96,000 layers did not.
CHILD_MEMORY = 512 << 20


def _plan_bounded(folder: Path, manifest: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``tensorsurgery plan MANIFEST`` (in ``folder``) in a child limited to :data:`CHILD_MEMORY` and 60 s, and
    the seconds it took."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tensorsurgery", "plan", manifest.name], cwd=folder,
                          capture_output=True, text=True, timeout=60, env=child_env(), preexec_fn=limit,
                          stdin=subprocess.DEVNULL)
    return proc, time.monotonic() - start


def _laughs(level: int) -> str:
    """A YAML list of 10**(level + 1) values in a few hundred bytes: each level is an anchored list
    of the level below, nine times more by alias."""
    if level == 0:
        return "&a0 [x, x, x, x, x, x, x, x, x, x]"
    return f"&a{level} [{_laughs(level - 1)}, " + ", ".join([f"*a{level - 1}"] * 9) + "]"


def _hostile(name: str, model: Path) -> str:
    passthrough = "merge_method: passthrough\nslices:\n"
    if name == "aliases.yml":  # 60 kB: one slice of 32 layers, then 12,000 aliases of it
        return passthrough + f"  - &s {{sources: [{{model: {model}, layer_range: [0, 32]}}]}}\n" + "  - *s\n" * 12_000
    if name == "slices.yml":  # 25 kB, fewer values than aliases.yml but more slices than any model
        return passthrough + f"  - &s {{sources: [{{model: {model}, layer_range: [0, 32]}}]}}\n" + "  - *s\n" * 5000
    if name == "layers.yml":
        return passthrough + f"  - sources: [{{model: {model}, layer_range: [0, 100]}}]\n" * 50
    if name == "laughs.yml":  # 529 bytes, 10**9 values
        return passthrough + f"  - sources: [{{model: {model}, layer_range: {_laughs(8)}}}]\n"
    if name == "self.yml":
        return passthrough + "  - &s {sources: [*s]}\n"
    if name == "deep.yml":
        return passthrough + "  - " + "[" * 5000 + "]" * 5000 + "\n"
    toml = f'[source]\nmodel = "{model}"\n'
    if name == "ranges.toml":  # 27 kB: 3,000 times all 32 layers
        return toml + '[layers]\nplan = "explicit"\narrangement = [' + ", ".join(["[0, 32]"] * 3000) + \
            ']\n[output]\npath = "out"\n'
    if name == "one-range.toml":
        return toml + '[layers]\nplan = "explicit"\narrangement = [[0, 100_000_000]]\n[output]\npath = "out"\n'
    if name == "sources.toml":
        return "".join(f'[sources.s{i}]\nmodel = "{model}"\n' for i in range(300)) + '[output]\npath = "out"\n'
    if name == "rules.toml":
        rules = ", ".join(f"{{ match = 'x{i}', replace = 'y' }}" for i in range(1100))
        return toml + f"[rename]\nrules = [{rules}]\n" + '[output]\npath = "out"\n'
    assert name == "deep.toml", name
    return toml + "[config]\nx = " + "[" * 5000 + "]" * 5000 + '\n[output]\npath = "out"\n'


@pytest.mark.parametrize("name, message", [
    ("aliases.yml", "its aliases (*name) expand to more than 100,000 values, more than a manifest may hold (a "
                    "mergekit config has a few hundred); write the slices out instead of repeating aliases"),
    ("slices.yml", "slices: asks for 5,001 slices, more than the 4,096 a manifest may ask for (real models need "
                   "far fewer); check the manifest"),
    ("layers.yml", "slices: asks for 5,000 output layers, more than the 4,096 a manifest may ask for (real models "
                   "need far fewer); check the manifest"),
    ("laughs.yml", "its aliases (*name) expand to more than 100,000 values, more than a manifest may hold (a "
                   "mergekit config has a few hundred); write the slices out instead of repeating aliases"),
    ("self.yml", "not valid YAML for a manifest: the alias at line 3 is inside the node it refers to (a "
                 "structure that holds itself); write it out"),
    ("deep.yml", "not valid YAML for a manifest: lists or mappings nested too deeply (hundreds of levels); a "
                 "mergekit config is a few levels deep"),
    ("ranges.toml", "layers.arrangement: asks for 96,000 output layers, more than the 4,096 a manifest may ask "
                    "for (real models need far fewer); check the manifest"),
    ("one-range.toml", "layers.arrangement: asks for 100,000,000 output layers, more than the 4,096 a manifest "
                       "may ask for (real models need far fewer); check the manifest"),
    ("sources.toml", "sources: asks for 300 sources, more than the 256 a manifest may ask for (real models need "
                     "far fewer); check the manifest"),
    ("rules.toml", "rename: asks for 1,100 rename rules and drop patterns, more than the 1,024 a manifest may ask "
                   "for (real models need far fewer); check the manifest"),
    ("deep.toml", "not valid TOML for a manifest: arrays or tables nested too deeply (hundreds of levels); a "
                  "manifest is a few levels deep"),
])
def test_hostile_manifest_is_one_line_fast_and_small(tmp_path, tiny_mistral, name, message):
    """Old main: aliases.yml planned 384,032 layers (2 GB, MemoryError under this limit), laughs.yml
    ran out of memory formatting its layer_range, ranges.toml built a plan of 96,000 layers, the
    deep ones were 1,000 lines of RecursionError."""
    manifest = tmp_path / name
    manifest.write_text(_hostile(name, tiny_mistral), encoding="utf-8")
    before = snapshot(tmp_path)
    proc, seconds = _plan_bounded(tmp_path, manifest)
    assert child_error(proc) == f"{name}: {message}"
    assert seconds < 15, seconds  # ~0.3 s; the old plans took 6 to 20 s before they failed
    assert snapshot(tmp_path) == before


def test_bounded_child_plans_a_real_manifest(tmp_path, tiny_mistral):
    """The limit of the test above leaves room for a real plan (the one a passthrough DUS makes)."""
    manifest = tmp_path / "dus.yml"
    manifest.write_text(f"merge_method: passthrough\nslices:\n"
                        f"  - sources: [{{model: {tiny_mistral}, layer_range: [0, 24]}}]\n"
                        f"  - sources: [{{model: {tiny_mistral}, layer_range: [8, 32]}}]\n", encoding="utf-8")
    proc, _ = _plan_bounded(tmp_path, manifest)
    assert proc.returncode == 0, proc.stderr


def test_largest_allowed_arrangement_plans(capsys, tiny_mistral, tmp_path):
    """4,096 output layers (128 copies of all 32) is still planned: the bound is not below it."""
    manifest = write_manifest(tmp_path, tiny_mistral, tmp_path / "out",
                              layers='plan = "explicit"\narrangement = [' + ", ".join(["[0, 32]"] * 128) + "]")
    code, out, err = run(capsys, "plan", manifest)
    assert code == 0, err
    assert "layers: 4096\n" in out, out[:500]

"""The benchmark generators and runners still run against the package (they live outside the
package's imports, so nothing else would notice when a refactoring breaks them): tiny sizes, no
timing asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tensorsurgery import api

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def bench(*argv: object, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(BENCH / str(argv[0])), *map(str, argv[1:])], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_deepseek_v3_makes_a_checkpoint_the_tool_and_the_official_reader_read(tmp_path):
    out = tmp_path / "dsv3"
    bench("make_deepseek_v3.py", out, "--layers", 5, cwd=tmp_path)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = sorted(out.glob("*.safetensors"))[0]
    with safe_open(str(shard), framework="numpy") as f:
        assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard.name}
    plan = api.plan(f'[source]\nmodel = "{out}"\n[layers]\nplan = "keep"\n[output]\npath = "{tmp_path / "o"}"\n')
    assert plan.tensor_count == len(index["weight_map"])
    assert plan.family == "deepseek_v3" and len(plan.layers) == 5
    assert any(t.name.startswith("model.layers.5.") for t in plan.tensors)  # the MTP layer, after the last


def test_header_scale_measures_every_row(tmp_path):
    result = json.loads(bench("header_scale.py", "--runs", 1, "--max-header-bytes", 300_000, "--json",
                              "--workdir", tmp_path, cwd=tmp_path))
    assert result["tensors"] > 1000 and result["header_bytes"] <= 300_000
    rows = result["results"]
    assert set(rows) == {"official keys", "official full", "ours read_header", "plan keep", "plan dus"}
    assert all(r["seconds"] > 0 and r["peak_mb"] >= r["base_mb"] > 0 for r in rows.values())
    assert not any(tmp_path.iterdir())  # the file and the manifests are removed


def test_header_scale_apply_measures_apply_and_both_verifies(tmp_path):
    work = tmp_path / "w"
    result = json.loads(bench("header_scale.py", "--apply", "--only", "plan keep", "--tensors", 2000, "--runs", 1,
                              "--json", "--workdir", work, cwd=tmp_path))
    rows = result["results"]
    assert set(rows) == {"apply (keep)", "verify MANIFEST OUTPUT (keep)", "verify OUTPUT (keep)"}
    assert rows["apply (keep)"]["tensors"] == 2000  # counted in the output's header
    assert all(r["seconds"] > 0 and r["peak_mb"] >= r["base_mb"] > 0 for r in rows.values())
    assert not any(work.iterdir()) and not (tmp_path / "w-out").exists()  # all removed


def test_run_py_measures_apply_against_the_raw_copy(tmp_path):
    """The smallest run.py round (tiny size, tmpfs when it has room, three rows): every row ran,
    apply wrote as many shard bytes as the raw copy, and verify read them back."""
    result = json.loads(bench("run.py", "--size", "tiny", "--runs", 1, "--no-mergekit", "--max-wait", 0,
                              "--rows", "raw,apply,verify", "--workdir", tmp_path / "w", "--json", cwd=tmp_path))
    rows = {r["key"]: r for r in result["results"]}
    assert set(rows) == {"raw", "apply", "verify"}
    assert all(s["exit"] == 0 for r in rows.values() for s in r["samples"])
    raw, apply = rows["raw"]["samples"][0], rows["apply"]["samples"][0]
    # apply writes the raw copy's shard bytes plus config, index, card, tokenizer and the record
    assert raw["bytes_written"] > 0 and 0 < apply["bytes_written"] - raw["bytes_written"] < 1_000_000
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())  # cleaned up


def test_dequant_py_measures_dequantization_against_the_raw_copy(tmp_path):
    """dequant.py at its tiny size: the three rows ran, apply wrote the raw copy's shard bytes (plus
    the small files), and everything it wrote is gone."""
    result = json.loads(bench("dequant.py", "--size", "tiny", "--runs", 1, "--max-wait", 0, "--workdir",
                              tmp_path / "w", "--json", cwd=tmp_path))
    rows = {r["key"]: r for r in result["results"]}
    assert set(rows) == {"raw", "dequant", "verify"}
    assert all(s["exit"] == 0 for r in rows.values() for s in r["samples"])
    raw, apply = rows["raw"]["samples"][0], rows["dequant"]["samples"][0]
    assert raw["bytes_written"] > 0 and 0 < apply["bytes_written"] - raw["bytes_written"] < 1_000_000
    assert not any((tmp_path / "w").iterdir())


def test_lora_py_measures_an_adapter_merge_against_the_raw_copy(tmp_path):
    """lora.py at its tiny size: the four rows and the two of ``--merge`` ran, apply wrote the raw
    copy's shard bytes (plus the small files), and everything it wrote is gone."""
    result = json.loads(bench("lora.py", "--size", "tiny", "--runs", 1, "--max-wait", 0, "--workdir",
                              tmp_path / "w", "--merge", "--json", cwd=tmp_path))
    rows = {r["key"]: r for r in result["results"]}
    assert set(rows) == {"raw", "lora-r16", "lora-r128", "verify", "merge", "merge-plain"}
    assert all(s["exit"] == 0 for r in rows.values() for s in r["samples"])
    raw, apply = rows["raw"]["samples"][0], rows["lora-r16"]["samples"][0]
    assert raw["bytes_written"] > 0 and 0 < apply["bytes_written"] - raw["bytes_written"] < 1_000_000
    assert not any((tmp_path / "w").iterdir())


@pytest.mark.torch  # mergekit runs beside us
def test_run_py_measures_merges_side_by_side_with_mergekit(tmp_path):
    """``--merges``: a row per method with our time and RSS, its raw baseline, verify, and mergekit's
    time with the elements that differ (0 for linear, bitwise mergekit's)."""
    result = json.loads(bench("run.py", "--size", "tiny", "--runs", 1, "--max-wait", 0, "--rows", "raw",
                              "--merges", "linear,slerp", "--workdir", tmp_path / "w", "--json", cwd=tmp_path))
    rows = {r["method"]: r for r in result["merges"]}
    assert set(rows) == {"linear", "slerp"}
    assert all(r["raw_s"] > 0 and r["ours_s"] > 0 and r["verify_s"] > 0 and r["ours_rss_mb"] > 0 for r in rows.values())
    assert rows["linear"]["mergekit_s"] > 0 and rows["linear"]["differing"] == [0, 0]
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())

"""Tests for tensorsurgery.cli through ``main(argv)``: plan (text and JSON), apply --dry-run,
inspect, one-line errors with exit code 2, and the README's demo command in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import run
from helpers import snapshot, write_manifest
from tensorsurgery.cli import main
from tensorsurgery.errors import HeaderError, ManifestError

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"




def assert_one_line_error(err: str, message: str) -> None:
    assert err == f"tensorsurgery: error: {message}\n"
    assert "Traceback" not in err


# --- plan -----------------------------------------------------------------------------------------

def test_plan_text_solar_dus(tiny_mistral, tmp_path, capsys):
    code, out, err = run(capsys, "plan", MANIFESTS / "solar-dus.toml", "--source", tiny_mistral,
                         "--output", tmp_path / "out")
    assert code == 0 and err == ""
    lines = out.splitlines()
    n_files = len(list(tiny_mistral.glob("model-*-of-*.safetensors")))
    assert f"  source: {tiny_mistral} (hf layout, {n_files} file(s))" in lines
    assert "layers: 48" in lines
    assert "  out     0..23  <-  source 0..23" in lines
    assert "  out    24..47  <-  source 8..31   <- seam: jump -16" in lines
    assert "seams: 1, largest layer distance 16" in lines
    assert "tensors: 435 none" in lines
    assert "shards: 1" in lines
    assert any(line.startswith("  model.safetensors ") and line.endswith(" 435 tensors") for line in lines)
    assert f"output: {tmp_path / 'out'}" in lines
    assert not (tmp_path / "out").exists()


def test_plan_text_shards_and_seams(tiny_mistral, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.toml", (MANIFESTS / "idus-8layer.toml").read_text()
                              + '\nmax_shard_size = "100KB"\ndtype = "float32"\n')
    code, out, _ = run(capsys, "plan", manifest, "--source", tiny_mistral, "--output", tmp_path / "out")
    assert code == 0
    lines = out.splitlines()
    assert "  out     0..15  <-  source 0..15" in lines
    assert "  out    16..31  <-  source 8..23   <- seam: jump -8" in lines
    assert "  out    32..47  <-  source 16..31   <- seam: jump -8" in lines
    assert "seams: 2, largest layer distance 8" in lines
    assert "tensors: 435 cast" in lines
    n = int(next(line for line in lines if line.startswith("shards: ")).split()[1])
    assert n >= 4
    for i in range(1, n + 1):
        assert any(line.startswith(f"  model-{i:05d}-of-{n:05d}.safetensors ") for line in lines)


def test_plan_json(tiny_mistral, tmp_path, capsys):
    code, out, err = run(capsys, "plan", MANIFESTS / "idus-1layer.toml", "--source", tiny_mistral,
                         "--output", tmp_path / "out", "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert [(d["source"], d["layer"]) for d in data["layers"]] == [
        ("source", i) for k in range(24) for i in (k, k + 8)]
    assert len(data["layers"]) == 48
    assert data["seams"] == [{"position": p, "jump": 7 if p % 2 else -8, "kinds_differ": False} for p in range(1, 48)]
    assert data["family"] == "mistral" and {d["kind"] for d in data["layers"]} == {""}
    assert [s["filename"] for s in data["shards"]] == ["model.safetensors"]
    tensors = data["shards"][0]["tensors"]
    assert len(tensors) == 435
    t = next(t for t in tensors if t["name"] == "model.layers.1.mlp.up_proj.weight")
    assert (t["source_key"], t["transform"], t["dtype"]) == ("model.layers.8.mlp.up_proj.weight", "none", "BF16")
    assert data["total_size"] == sum(t["nbytes"] for t in tensors)
    assert data["config"]["num_hidden_layers"] == 48
    assert data["config"]["architectures"] == ["LlamaForCausalLM"]
    assert data["output"] == str(tmp_path / "out")


def test_plan_reads_no_weights(tiny_mistral, tmp_path, capsys):
    before = snapshot(tiny_mistral)
    code, _, _ = run(capsys, "plan", MANIFESTS / "solar-dus.toml", "--source", tiny_mistral, "--output", tmp_path / "o")
    assert code == 0
    assert snapshot(tiny_mistral) == before
    assert list(tmp_path.iterdir()) == []


# --- apply --dry-run ----------------------------------------------------------------------------------

def test_apply_dry_run_writes_nothing(tiny_mistral, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "apply", MANIFESTS / "solar-dus.toml", "--source", tiny_mistral,
                         "--output", out_dir, "--dry-run")
    assert code == 0 and err == ""
    assert "  out    24..47  <-  source 8..31   <- seam: jump -16" in out.splitlines()
    assert out.splitlines()[-1] == "dry run: nothing written"
    assert list(tmp_path.iterdir()) == []


# --- inspect ------------------------------------------------------------------------------------------

def test_inspect_folder(tiny_mistral, capsys):
    code, out, err = run(capsys, "inspect", tiny_mistral)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"{tiny_mistral}: hf layout, model_type mistral, 32 layers, 291 tensors, ")
    shards = sorted(p.name for p in tiny_mistral.glob("*.safetensors"))
    for name in shards:
        assert any(line.startswith(f"  {name}  ") for line in lines)
    assert lines[-1] == "  dtypes: BF16 x291"

    code, out, _ = run(capsys, "inspect", tiny_mistral, "--json")
    data = json.loads(out)
    assert (data["layers"], data["tensors"], data["layout"], data["model_type"]) == (32, 291, "hf", "mistral")
    assert sorted(s["file"] for s in data["shards"]) == shards
    assert data["nbytes"] == sum((tiny_mistral / s).stat().st_size for s in shards)


def test_inspect_single_file(tiny_mistral_single, capsys):
    path = tiny_mistral_single / "model.safetensors"
    code, out, err = run(capsys, "inspect", path)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 291 + 1
    assert lines[-1].startswith("291 tensors, ")
    norm = next(line for line in lines if line.startswith("model.norm.weight "))
    assert norm.split() == ["model.norm.weight", "BF16", "[16]", "32", "B"]

    code, out, _ = run(capsys, "inspect", path, "--json")
    data = json.loads(out)
    assert data["file"] == str(path) and len(data["tensors"]) == 291
    assert {"name": "model.norm.weight", "dtype": "BF16", "shape": [16], "nbytes": 32} in data["tensors"]


def test_inspect_folder_with_single_file(tiny_mistral_single, capsys):
    code, out, _ = run(capsys, "inspect", tiny_mistral_single)
    assert code == 0
    assert out.splitlines()[1].startswith("  model.safetensors  291 tensors  ")


# --- errors -------------------------------------------------------------------------------------------

def test_bad_manifest_key(tiny_mistral, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "bad.toml", '[source]\nmodel = "x"\n[layers]\nplan = "dus"\n'
                              'overlap = 8\nrepeat = 2\n[output]\npath = "o"\n')
    for command in ("plan", "apply"):
        code, out, err = run(capsys, command, manifest, "--source", tiny_mistral)
        assert code == 2 and out == ""
        assert_one_line_error(err, f"{manifest}: layers.repeat: unknown key; expected one of: plan, overlap, "
                                   f"group, arrangement")


def test_missing_source_folder(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code, out, err = run(capsys, "apply", MANIFESTS / "solar-dus.toml", "--source", missing,
                         "--output", tmp_path / "out")
    assert code == 2 and out == ""
    assert_one_line_error(err, f"source 'source': '{missing}' is not a folder nor a Hugging Face repo id; "
                               f"pass --source PATH to a local copy")
    assert not (tmp_path / "out").exists()


def test_missing_manifest(tmp_path, capsys):
    code, _, err = run(capsys, "plan", tmp_path / "absent.toml")
    assert code == 2
    assert err.startswith(f"tensorsurgery: error: {tmp_path / 'absent.toml'}: cannot read the manifest: ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_inspect_not_a_checkpoint(tmp_path, capsys):
    code, _, err = run(capsys, "inspect", tmp_path)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"tensorsurgery: error: {tmp_path}: ")


@pytest.mark.parametrize("argv", [["--traceback", "plan", "{m}"], ["plan", "{m}", "--traceback"],
                                  ["--traceback", "apply", "{m}"], ["--traceback", "inspect", "{m}"]])
def test_traceback_flag_shows_the_traceback_and_keeps_exit_2(tmp_path, argv, capsys):
    manifest = write_manifest(tmp_path / "bad.toml", '[source]\nmodel = "x"\nextra = 1\n[output]\npath = "o"\n')
    assert main([a.format(m=manifest) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    kind = HeaderError if "inspect" in argv else ManifestError
    assert f"tensorsurgery.errors.{kind.__name__}: " in err
    assert err.splitlines()[-1].startswith("tensorsurgery: error: ")


def test_usage_error_is_exit_2(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["frobnicate"])
    assert excinfo.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --- the README's demo ----------------------------------------------------------------------------------

def test_demo_manifest_runs(tmp_path):
    out = tmp_path / "demo-dus"
    proc = subprocess.run([sys.executable, "-m", "tensorsurgery", "apply", "manifests/demo.toml", "--output",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"wrote {out}"
    assert "Traceback" not in proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 48
    assert (out / "model.safetensors").is_file()


def test_plan_and_inspect_do_without_numpy(tiny_mistral, tmp_path):
    """Planning reads headers only: the numpy kernels (casts, comparisons) are not even imported,
    which keeps `plan` on a 90k-tensor checkpoint small and quick."""
    code = ("import sys\nfrom tensorsurgery.cli import main\n"
            f"assert main(['plan', {str(MANIFESTS / 'solar-dus.toml')!r}, '--source', {str(tiny_mistral)!r}]) == 0\n"
            f"assert main(['inspect', {str(tiny_mistral)!r}]) == 0\n"
            "assert 'numpy' not in sys.modules, 'numpy was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr

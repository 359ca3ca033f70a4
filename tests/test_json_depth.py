"""A JSON file nested deeper than any checkpoint's (600 levels: valid JSON) is one line, not
thousands of lines of RecursionError, in every command that reads it."""
from __future__ import annotations

import json
import shutil

import pytest

from cli_helpers import run, write_manifest
from tensorsurgery.io.fsio import JSON_DEPTH, json_depth

DEEP = json.loads("[" * 600 + "]" * 600)


def test_json_depth_counts_without_recursion():
    assert (json_depth(1), json_depth([]), json_depth({"a": [1, {"b": []}]}), json_depth(DEEP)) == (0, 1, 4, 600)
    deeper: list = []
    for _ in range(50_000):  # far past Python's recursion limit
        deeper = [deeper]
    assert json_depth(deeper) == 50_001


@pytest.fixture
def deep_source(tiny_mistral, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_mistral, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "x": DEEP}))
    return source


@pytest.mark.parametrize("command", ["plan", "apply", "inspect"])
def test_a_deep_source_config_is_one_line(capsys, deep_source, tmp_path, command):
    manifest = write_manifest(tmp_path, deep_source, tmp_path / "out")
    code, _, err = run(capsys, command, deep_source if command == "inspect" else manifest)
    assert code == 2
    assert err == (f"tensorsurgery: error: {deep_source / 'config.json'}: JSON nested deeper than {JSON_DEPTH} "
                   f"levels; no checkpoint file nests like this, so it is not the file a checkpoint holds there\n")
    assert not (tmp_path / "out").exists()


def test_a_deep_output_config_is_one_line_in_verify(capsys, tiny_mistral, tmp_path):
    manifest = write_manifest(tmp_path, tiny_mistral, tmp_path / "out")
    assert run(capsys, "apply", manifest, "--no-progress")[0] == 0
    config = tmp_path / "out" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "x": DEEP}))
    for args in ((tmp_path / "out",), (manifest, tmp_path / "out")):
        code, out, err = run(capsys, "verify", *args)
        assert code in (1, 2)
        lines = (out + err).splitlines()
        assert len(lines) <= 3 and any("config.json" in line for line in lines), lines
        assert "Traceback" not in out + err

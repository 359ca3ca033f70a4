"""No surprise (issue 16): inputs that did something other than what the user meant are one line,
exit code 2, nothing written:

* an output path that names a file (``out/m.gguf``: a folder of safetensors was made under that
  name), in the manifest, with ``--output`` and with the API's ``output=``;
"""
from __future__ import annotations

from pathlib import Path

import pytest

import tensorsurgery as ts
from cli_helpers import error_line, run, snapshot, write_manifest
from tensorsurgery.errors import ManifestError

FOLDER_OF_SHARDS = "names a file; tensorsurgery writes a folder of safetensors shards with config.json"


# --------------------------------------------------------------------------- output names a file

@pytest.mark.parametrize("name, folder", [("m.gguf", "m"), ("m.safetensors", "m"), ("M.BIN", "M"),
                                          ("m.pt", "m"), ("m.tar.gz", "m"), ("config.json", "config")])
def test_output_path_that_names_a_file(capsys, tiny_mistral, tmp_path, name, folder):
    """``path = "out/m.gguf"`` silently made a folder of safetensors called m.gguf."""
    output = tmp_path / "out" / name
    manifest = write_manifest(tmp_path, tiny_mistral, output)
    before = snapshot(tmp_path)
    for command in ("plan", "apply", "verify"):
        message = error_line(*run(capsys, command, manifest))
        assert message == (f'{manifest}: output.path: "{output}" {FOLDER_OF_SHARDS}: give a folder name such '
                           f'as "{tmp_path / "out" / folder}"'), command
        assert snapshot(tmp_path) == before, command


def test_output_option_that_names_a_file(capsys, tiny_mistral, tmp_path):
    manifest = write_manifest(tmp_path, tiny_mistral, tmp_path / "out")
    before = snapshot(tmp_path)
    for command in ("plan", "apply"):
        message = error_line(*run(capsys, command, manifest, "--output", "out/solar.gguf"))
        assert message == f'--output "out/solar.gguf" {FOLDER_OF_SHARDS}: give a folder name such as "out/solar"'
        assert snapshot(tmp_path) == before, command
    with pytest.raises(ManifestError) as e:
        ts.apply(manifest, output=Path("out/solar.safetensors"))
    assert str(e.value) == (f'output= "out/solar.safetensors" {FOLDER_OF_SHARDS}: give a folder name such as '
                            f'"out/solar"')
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["solar-10.7b", "m.v2", "out.d", "model_safetensors", ".gguf"])
def test_folder_names_with_dots_are_fine(tiny_mistral, tmp_path, name):
    assert ts.plan(write_manifest(tmp_path, tiny_mistral, tmp_path / name)).output == tmp_path / name

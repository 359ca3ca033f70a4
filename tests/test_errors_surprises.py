"""No surprise (issue 16): inputs that did something other than what the user meant are one line,
exit code 2, nothing written:

* an output path that names a file (``out/m.gguf``: a folder of safetensors was made under that
  name), in the manifest, with ``--output`` and with the API's ``output=``;
* a folder given where a manifest file is expected (``[Errno 21] Is a directory``): what it holds
  says what to run instead.
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


# --------------------------------------------------------------------------- a folder as the manifest

def _folder_refused(capsys, tmp_path: Path, folder: Path) -> str:
    """The same line from plan, apply and ``verify FOLDER OUTPUT``; nothing written."""
    before = snapshot(tmp_path)
    messages = set()
    for argv in (["plan", folder], ["apply", folder, "--no-progress"], ["verify", folder, tmp_path / "out"]):
        messages.add(error_line(*run(capsys, *argv)))
        assert snapshot(tmp_path) == before, argv
    assert len(messages) == 1, messages
    return messages.pop()


def test_checkpoint_folder_as_manifest(capsys, tiny_mistral, tmp_path):
    """``plan some/folder`` said ``[Errno 21] Is a directory``."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_mistral / "config.json").read_text())
    assert _folder_refused(capsys, tmp_path, folder) == (
        f"{folder}: is a folder, not a manifest file; it holds a checkpoint: to see it, run: tensorsurgery "
        f"inspect {folder}; to use it, name it as a source in a manifest")
    assert "inspect" in error_line(*run(capsys, "plan", tiny_mistral))


def test_output_folder_as_manifest(capsys, tiny_mistral, tmp_path):
    output = tmp_path / "solar"
    assert run(capsys, "apply", write_manifest(tmp_path, tiny_mistral, output), "--no-progress")[0] == 0
    assert _folder_refused(capsys, tmp_path, output) == (
        f"{output}: is a folder, not a manifest file; it is a tensorsurgery output: to check it against its "
        f"record, run: tensorsurgery verify {output}")


@pytest.mark.parametrize("others, hint", [
    (["solar.toml"], "did you mean {folder}/solar.toml?"),
    (["dus.yaml", "notes.txt"], "did you mean {folder}/dus.yaml?"),
    (["a.toml", "b.yml"], "give the manifest TOML (or mergekit passthrough YAML) file"),
    ([], "give the manifest TOML (or mergekit passthrough YAML) file"),
])
def test_folder_of_manifests_as_manifest(capsys, tmp_path, others, hint):
    folder = tmp_path / "manifests"
    folder.mkdir()
    for name in others:
        (folder / name).write_text("# a manifest\n")
    assert _folder_refused(capsys, tmp_path, folder) == (
        f"{folder}: is a folder, not a manifest file; " + hint.format(folder=folder))

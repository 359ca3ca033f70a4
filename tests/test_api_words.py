"""The Python API speaks its own words: ``sources=`` takes what a user would pass, and its errors
name its parameters (``sources=PATH``), not the command line's options (``--source PATH``)."""
from __future__ import annotations

import pytest

import tensorsurgery as ts
from tensorsurgery.cli import main
from tensorsurgery.errors import ManifestError, api_words

TWO_SOURCES = ('[sources.a]\nmodel = "x"\n[sources.b]\nmodel = "y"\n'
               '[layers]\nplan = "explicit"\narrangement = [{ source = "a", layers = [0, 2] }]\n'
               '[output]\npath = "o"\n')


def _manifest(tmp_path, text):
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


def test_sources_as_a_str_or_a_path_is_the_one_source(tiny_mistral, tmp_path):
    manifest = _manifest(tmp_path, '[source]\nmodel = "elsewhere"\n[output]\npath = "o"\n')
    for given in (str(tiny_mistral), tiny_mistral):
        m = ts.load(manifest, sources=given)
        assert m.sources[0].model == str(tiny_mistral)
        assert ts.plan(manifest, sources=given).tensors


@pytest.mark.parametrize("bad", [3, ["./a"], {"a": 3}, {1: "./a"}])
def test_sources_of_another_type_is_a_type_error_that_says_what_to_pass(tmp_path, bad):
    manifest = _manifest(tmp_path, '[source]\nmodel = "x"\n[output]\npath = "o"\n')
    with pytest.raises(TypeError, match=r"^sources= takes a folder or repo id \(a str or path\) for the "
                                        r"manifest's one source, or a mapping of source names"):
        ts.load(manifest, sources=bad)


def test_api_errors_name_the_api_parameters_and_the_cli_its_options(tmp_path, capsys):
    manifest = _manifest(tmp_path, TWO_SOURCES)
    with pytest.raises(ManifestError) as e:
        ts.load(manifest, sources="./here")
    assert str(e.value) == (f'{manifest}: sources=PATH is ambiguous with 2 sources; use sources={{"NAME": PATH}}')
    with pytest.raises(ManifestError) as e:
        ts.load(manifest, sources={"c": "./here"})
    assert str(e.value).startswith(f'{manifest}: sources={{"c": ...}}: no source called \'c\'')
    assert main(["plan", str(manifest), "--source", "./here"]) == 2
    assert capsys.readouterr().err == (f"tensorsurgery: error: {manifest}: --source PATH is ambiguous with 2 "
                                       f"sources; use --source NAME=PATH\n")
    with pytest.raises(ManifestError) as e:  # the CLI's words end with its run
        ts.load(manifest, sources="./here")
    assert "--source" not in str(e.value)


def test_the_translation_keeps_what_is_not_an_option():
    assert api_words("pass --source PATH to a local copy") == "pass sources=PATH to a local copy"
    assert api_words("choose another --output, then run it with --force; --forceful stays") == (
        "choose another output=, then run it with force=True; --forceful stays")

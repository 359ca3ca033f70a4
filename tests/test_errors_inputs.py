"""One line, not a traceback (issue 9): inputs that made tensorsurgery crash, write a broken output
or leave a temporary folder behind are each one error line with exit code 2, found before
anything is written:

* rename templates with a missing group or a bad escape, a rename to ``__metadata__`` (a name the
  safetensors format reserves);
* ``[config]`` values config.json cannot hold (TOML dates and times, NaN, infinities);
* manifests that cannot make a model (a drop of every tensor, of a layer config.json counts);
* an index whose ``metadata`` is not an object;
* provenance records whose entries have the wrong types, at every level (``verify OUTPUT``,
  ``push``), or that name files outside the output folder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import differences, error_line, run, snapshot, write_manifest

INDEX = "model.safetensors.index.json"
RECORD = "tensorsurgery.json"


def refused_everywhere(capsys, tmp_path: Path, manifest: Path, commands=("plan", "apply", "verify")) -> str:
    """The same one-line error from each command; nothing written. Returns the message."""
    before = snapshot(tmp_path)
    messages = set()
    for command in commands:
        argv = [command, manifest] + (["--no-progress"] if command == "apply" else [])
        messages.add(error_line(*run(capsys, *argv)))
        assert snapshot(tmp_path) == before, command
    assert len(messages) == 1, messages
    return messages.pop()


def manifest_with(tmp_path: Path, source: Path, *, rename: str = "", config: str = "",
                  layers: str = 'plan = "dus"\noverlap = 8') -> Path:
    extra = (f"[rename]\n{rename}\n" if rename else "") + (f"[config]\n{config}\n" if config else "")
    return write_manifest(tmp_path, source, tmp_path / "out", layers=layers, extra=extra)


# --------------------------------------------------------------------------- rename

@pytest.mark.parametrize("match, replace, why", [
    (r"^(model)\.norm\.weight$", r"\2.norm.weight", "invalid group reference 2 at position 1"),
    (r"^model\.norm\.weight$", r"\q", r"bad escape \q at position 0"),
    (r"^(?P<m>model)\.norm\.weight$", r"\g<x>.norm.weight", "unknown group name 'x'"),
    (r"^model\.norm\.weight$", "\\", "bad escape (end of pattern) at position 0"),
])
def test_invalid_replace_template(capsys, tiny_mistral, tmp_path, match, replace, why):
    manifest = manifest_with(tmp_path, tiny_mistral, rename=f"rules = [{{ match = '{match}', replace = '{replace}' }}]")
    message = refused_everywhere(capsys, tmp_path, manifest)
    assert message == (f"{manifest}: rename: rule {{ match = {match!r}, replace = {replace!r} }}: the replacement "
                       f"is invalid ({why}); use \\1 or \\g<name> for groups the match defines and \\\\ for a "
                       f"backslash")


def test_rename_to_the_reserved_metadata_name(capsys, tiny_mistral, tmp_path):
    """The official reader rejects a shard with a tensor called __metadata__; apply and verify passed."""
    manifest = manifest_with(tmp_path, tiny_mistral,
                             rename="rules = [{ match = '^model\\.norm\\.weight$', replace = '__metadata__' }]")
    assert refused_everywhere(capsys, tmp_path, manifest) == (
        f"{manifest}: rename: tensor '__metadata__' is a name the safetensors format reserves for metadata; change "
        f"the rename rules so no tensor is called that")


# --------------------------------------------------------------------------- [config]

@pytest.mark.parametrize("toml, where, shown", [
    ("created = 1979-05-27T07:32:00Z", "config.created", "1979-05-27 07:32:00+00:00"),
    ("day = 1979-05-27", "config.day", "1979-05-27"),
    ("at = 07:32:00", "config.at", "07:32:00"),
    ("local = 1979-05-27T07:32:00", "config.local", "1979-05-27 07:32:00"),
    ("rope_scaling = { factor = 2.0, since = 2024-01-01 }", "config.rope_scaling.since", "2024-01-01"),
    ("days = [1, 2024-01-01]", "config.days[1]", "2024-01-01"),
])
def test_toml_date_in_config(capsys, tiny_mistral, tmp_path, toml, where, shown):
    """apply wrote the shards, then failed on json.dumps and left its temporary folder."""
    manifest = manifest_with(tmp_path, tiny_mistral, config=toml)
    assert refused_everywhere(capsys, tmp_path, manifest) == (
        f"{manifest}: {where}: a TOML date/time ({shown}) has no JSON form; write it as a string")
    assert not (tmp_path / ".out.tensorsurgery-tmp").exists()


@pytest.mark.parametrize("toml, where, shown", [
    ("rope_theta = nan", "config.rope_theta", "nan"),
    ("rope_theta = inf", "config.rope_theta", "inf"),
    ("rope_theta = -inf", "config.rope_theta", "-inf"),
    ("rope_scaling = { factor = nan }", "config.rope_scaling.factor", "nan"),
    ("layer_scale = [1.0, +inf]", "config.layer_scale[1]", "inf"),
])
def test_non_finite_number_in_config(capsys, tiny_mistral, tmp_path, toml, where, shown):
    """Written as NaN (not JSON), after which the output could never verify."""
    manifest = manifest_with(tmp_path, tiny_mistral, config=toml)
    assert refused_everywhere(capsys, tmp_path, manifest) == (
        f"{manifest}: {where}: {shown} is not a JSON number; config.json cannot hold it")


# --------------------------------------------------------------------------- no model

def test_drop_of_every_tensor(capsys, tiny_mistral, tmp_path):
    """Was: no shards, an empty weight map, 48 layers in config.json, and verify passed."""
    manifest = manifest_with(tmp_path, tiny_mistral, rename="drop = ['.']")
    assert refused_everywhere(capsys, tmp_path, manifest) == (
        f"{manifest}: rename: no tensor is left (rename.drop removes every one); an output needs weights, so narrow "
        f"the drop patterns")


@pytest.mark.parametrize("drop, layers, position, layer", [
    (r"layers\.", 'plan = "keep"', 0, 0),
    (r"layers\.", 'plan = "dus"\noverlap = 8', 0, 0),
    (r"^model\.layers\.5\.", 'plan = "keep"', 5, 5),
    (r"^model\.layers\.30\.", 'plan = "dus"\noverlap = 8', 46, 30),
])
def test_drop_of_every_tensor_of_a_layer(capsys, tiny_mistral, tmp_path, drop, layers, position, layer):
    manifest = manifest_with(tmp_path, tiny_mistral, rename=f"drop = ['{drop}']", layers=layers)
    assert refused_everywhere(capsys, tmp_path, manifest) == (
        f"{manifest}: output layer {position} (layer {layer} of source 'source') has no tensors left after "
        f"rename.drop, yet config.json would count it; remove the layer from [layers] instead of dropping its tensors")


def test_drop_of_some_tensors_of_each_layer_is_fine(capsys, tiny_mistral, tmp_path):
    manifest = manifest_with(tmp_path, tiny_mistral, rename=r"drop = ['\.mlp\.up_proj\.']")
    code, _, err = run(capsys, "apply", manifest, "--no-progress")
    assert (code, err) == (0, "")
    assert run(capsys, "verify", manifest)[0] == 0


# --------------------------------------------------------------------------- index metadata

@pytest.mark.parametrize("metadata", [[1], "total", 5, True])
@pytest.mark.parametrize("command", ["plan", "apply", "inspect"])
def test_index_metadata_that_is_not_an_object(capsys, tiny_mistral, tmp_path, metadata, command):
    src = shutil.copytree(tiny_mistral, tmp_path / "src")
    index = json.loads((src / INDEX).read_text())
    index["metadata"] = metadata
    (src / INDEX).write_text(json.dumps(index))
    manifest = write_manifest(tmp_path, src, tmp_path / "out")
    before = snapshot(tmp_path)
    argv = {"inspect": ["inspect", src], "plan": ["plan", manifest], "apply": ["apply", manifest, "--no-progress"]}
    assert error_line(*run(capsys, *argv[command])) == (
        f"{src / INDEX}: metadata is {type(metadata).__name__}, expected an object; re-download the index")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- hostile records

@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_mistral):
    """(output with its source kept, output whose source is gone, the manifest of the first, its source)."""
    base = tmp_path_factory.mktemp("trust-records")
    src = shutil.copytree(tiny_mistral, base / "src")
    manifest = write_manifest(base, src, base / "live")
    gone = shutil.copytree(tiny_mistral, base / "gone")
    orphan_manifest = write_manifest(base, gone, base / "orphan", name="orphan.toml")
    from tensorsurgery.cli import main
    assert main(["apply", str(manifest), "--no-progress"]) == 0
    assert main(["apply", str(orphan_manifest), "--no-progress"]) == 0
    shutil.rmtree(gone)
    return base / "live", base / "orphan", manifest, src


def _first(d: dict) -> str:
    return next(iter(d))


def _shard(r: dict) -> dict:
    return r["shards"][_first(r["shards"])]


def _tensor(r: dict) -> dict:
    return r["tensors"][_first(r["tensors"])]


#: edit of the record -> (what the message says is wrong, what it should be)
RECORD_EDITS = {
    "not-an-object": (lambda r: [r], "the file", "a JSON object"),
    "manifest-number": (lambda r: r.update(manifest=5), "manifest", "a string"),
    "manifest-name-null": (lambda r: r.update(manifest_name=None), "manifest_name", "a string"),
    "shards-list": (lambda r: r.update(shards=[]), "shards", "an object"),
    "shard-size-string": (lambda r: _shard(r).update(size="1"), "shards[{shard!r}]", "{{size, header_sha256}}"),
    "shard-size-bool": (lambda r: _shard(r).update(size=True), "shards[{shard!r}]", "{{size, header_sha256}}"),
    "shard-size-negative": (lambda r: _shard(r).update(size=-8), "shards[{shard!r}]", "{{size, header_sha256}}"),
    "shard-sha-short": (lambda r: _shard(r).update(header_sha256="abc"), "shards[{shard!r}]",
                        "{{size, header_sha256}}"),
    "shard-entry-list": (lambda r: r["shards"].update({_first(r["shards"]): []}), "shards[{shard!r}]",
                         "{{size, header_sha256}}"),
    "files-list": (lambda r: r.update(files=["config.json"]), "files", "an object"),
    "file-sha-number": (lambda r: r["files"].update({"config.json": 5}), "files['config.json']", "a sha256"),
    "tensors-list": (lambda r: r.update(tensors=[]), "tensors", "an object"),
    "tensor-entry-number": (lambda r: r["tensors"].update({_first(r["tensors"]): 7}), "tensors[{tensor!r}]",
                            "{{shard (one of the shards), dtype, shape, sha256}}"),
    "tensor-shape-float": (lambda r: _tensor(r).update(shape=[1.5]), "tensors[{tensor!r}]",
                           "{{shard (one of the shards), dtype, shape, sha256}}"),
    "tensor-shape-string": (lambda r: _tensor(r).update(shape="96x16"), "tensors[{tensor!r}]",
                            "{{shard (one of the shards), dtype, shape, sha256}}"),
    "tensor-dtype-null": (lambda r: _tensor(r).update(dtype=None), "tensors[{tensor!r}]",
                          "{{shard (one of the shards), dtype, shape, sha256}}"),
    "tensor-unknown-shard": (lambda r: _tensor(r).update(shard="model-00009-of-00009.safetensors"),
                             "tensors[{tensor!r}]", "{{shard (one of the shards), dtype, shape, sha256}}"),
    "tensor-sha-upper": (lambda r: _tensor(r).update(sha256=_tensor(r)["sha256"].upper()), "tensors[{tensor!r}]",
                         "{{shard (one of the shards), dtype, shape, sha256}}"),
    "layers-object": (lambda r: r.update(layers={}), "layers", "a list"),
    "sources-string": (lambda r: r.update(sources="src"), "sources", "a list"),
    "source-entry-number": (lambda r: r.update(sources=[1]), "sources[0]",
                            "{{name, model, root (optional), layout, revision, repo_id}}"),
    "source-name-list": (lambda r: r["sources"][0].update(name=[]), "sources[0]",
                         "{{name, model, root (optional), layout, revision, repo_id}}"),
    "source-root-number": (lambda r: r["sources"][0].update(root=5), "sources[0]",
                           "{{name, model, root (optional), layout, revision, repo_id}}"),
    "source-revision-number": (lambda r: r["sources"][0].update(revision=3), "sources[0]",
                               "{{name, model, root (optional), layout, revision, repo_id}}"),
    "no-shards": (lambda r: r.update(shards={}, tensors={}), "shards", "an object naming at least one shard"),
    "no-config": (lambda r: r["files"].__delitem__("config.json"), "files", "an object naming config.json"),
    "shard-outside": (lambda r: r["shards"].update({"../x.safetensors": _shard(r)}), "shards['../x.safetensors']",
                      "a file name in the output folder"),
    "file-outside": (lambda r: r["files"].update({"../../../etc/passwd": "0" * 64}), "files['../../../etc/passwd']",
                     "a file name in the output folder"),
    "file-in-subfolder": (lambda r: r["files"].update({"sub/x.json": "0" * 64}), "files['sub/x.json']",
                          "a file name in the output folder"),
    "file-dotdot": (lambda r: r["files"].update({"..": "0" * 64}), "files['..']", "a file name in the output folder"),
    "record-version-newer": (lambda r: r.update(record_version=99), None, "99"),
    "record-version-string": (lambda r: r.update(record_version="2"), None, "'2'"),
}


def _hostile(folder: Path, tmp_path: Path, name: str) -> tuple[Path, str]:
    out = shutil.copytree(folder, tmp_path / "out")
    record = json.loads((out / RECORD).read_text())
    # (.get: records of tensorsurgery 0.1 have no shards table; the other edits still apply to them)
    shard, tensor = _first(record.get("shards") or {"": 0}), _first(record["tensors"])
    edit, where, expected = RECORD_EDITS[name]
    edited = edit(record)
    (out / RECORD).write_text(json.dumps(edited if edited is not None else record, indent=2))
    if where is None:
        from tensorsurgery import __version__
        return out, (f"{out / RECORD}: record_version {expected} is not one this tensorsurgery {__version__} reads "
                     f"(2 to 3); upgrade tensorsurgery, or verify with the manifest")
    message = (f"{out / RECORD}: {where.format(shard=shard, tensor=tensor)} is not "
               f"{expected.format(shard=shard, tensor=tensor)}; this is not a provenance record tensorsurgery wrote "
               f"(or it was edited): verify with the manifest instead")
    return out, message


@pytest.mark.parametrize("sources", ["gone", "present"])
@pytest.mark.parametrize("name", list(RECORD_EDITS))
def test_hostile_record_in_record_mode(capsys, outputs, tmp_path, name, sources):
    live, orphan, _, _ = outputs
    out, message = _hostile(orphan if sources == "gone" else live, tmp_path, name)
    assert error_line(*run(capsys, "verify", out)) == message


@pytest.mark.parametrize("name", ["source-name-list", "shard-size-bool", "file-outside", "no-shards"])
def test_hostile_record_in_manifest_mode(capsys, outputs, tmp_path, name):
    """Against the manifest a record of the wrong shape is one more difference."""
    live, _, manifest, src = outputs
    out, message = _hostile(live, tmp_path, name)
    lines = differences(*run(capsys, "verify", manifest, out, "--source", src))
    assert lines == [f"{RECORD}: {message}"]


@pytest.mark.parametrize("name", ["source-name-list", "tensor-shape-float"])
def test_hostile_record_through_push(capsys, outputs, tmp_path, name):
    live, _, _, _ = outputs
    out, message = _hostile(live, tmp_path, name)
    assert error_line(*run(capsys, "push", out, "someone/model")) == message


# --------------------------------------------------------------------------- the manifest itself

# (`verify FOLDER` is verify from a record: a folder is not a manifest there)
@pytest.mark.parametrize("command, what", [(c, w) for c in ("plan", "apply", "verify")
                                           for w in ("dev-zero", "folder", "large") if (c, w) != ("verify", "folder")])
def test_manifest_that_is_not_a_manifest(capsys, tmp_path, what, command):
    """/dev/zero given as the manifest was read to the end (a MemoryError); now one line at once."""
    path = tmp_path / "m.toml"
    if what == "dev-zero":
        path.symlink_to("/dev/zero")
        why = "it holds more than 1,048,576 bytes; is this the manifest?"
    elif what == "folder":
        path.mkdir()
        why = "give the manifest TOML (or mergekit passthrough YAML) file"
    else:
        path.write_text("# " + "x" * (1 << 20) + "\n")
        why = "it holds more than 1,048,576 bytes; is this the manifest?"
    reading = "is a folder, not a manifest file;" if what == "folder" else "cannot read the manifest:"
    assert error_line(*run(capsys, command, path, timeout=10)) == f"{path}: {reading} {why}"

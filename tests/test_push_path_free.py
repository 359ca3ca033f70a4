"""Nothing push uploads names a local path (issue 16), and a pulled copy of the upload still
verifies: the local output keeps its record (with the sources' folders, for ``verify OUTPUT``
here), push uploads the record as :func:`tensorsurgery.output.record.published_record` makes it, and the
card is made from the path-free manifest text (:mod:`tensorsurgery.manifest.path_free`).

The Hub is not reachable: the recording client of test_push stands in for ``HfApi``, and a pulled
copy is its uploaded bytes written into a new folder."""
from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import test_hub
import yaml
from test_hub import COMMIT, add_to_cache
from test_push import RecordingApi

import tensorsurgery as ts
from tensorsurgery.cli import main
from tensorsurgery.errors import PlanError, WriteError
from tensorsurgery.manifest.path_free import folder_name, is_local_path, path_free_manifest

SECRET = "secret-project-7f3a"
hf_repo = test_hub.hf_repo  # the files of a Hub repo of the tiny Mistral, a fixture


# ---------------------------------------------------------------------------------------------
# The manifest text (pure)


def test_local_paths_become_folder_names_and_nothing_else_changes():
    text = (f'# made from /home/alice/{SECRET}/Mistral-7B\n[source]\nmodel = "/home/alice/{SECRET}/Mistral-7B/"\n'
            '[layers]\nplan = "dus"\noverlap = 8\n[output]\npath = "../outputs/dus"\npush_to_hub = "org/name"\n')
    free = path_free_manifest(text)
    assert SECRET not in free and "/home" not in free and ".." not in free
    data = tomllib.loads(free)
    assert data["source"]["model"] == "Mistral-7B" and data["output"] == {"path": "dus", "push_to_hub": "org/name"}
    assert data["layers"] == tomllib.loads(text)["layers"]
    assert path_free_manifest(free) == free  # idempotent: the card rebuilt from it is the same card


def test_repo_ids_and_paths_inside_the_project_are_kept():
    text = '[source]\nmodel = "examples/tiny-mistral"\n[output]\npath = "out/x"\npush_to_hub = "org/name"\n'
    assert path_free_manifest(text) == text
    # "/" alone (a path) must not eat the slash of the repo id beside it.
    text = '[source]\nmodel = "org/name"\n[output]\npath = "/"\n'
    assert tomllib.loads(path_free_manifest(text)) == {"source": {"model": "org/name"}, "output": {"path": "local"}}


def test_mergekit_yaml_models():
    text = (f"slices:\n- sources:\n  - model: /home/alice/{SECRET}/M\n    layer_range: [0, 8]\n"
            f"  - model: 'C:\\Users\\alice\\M2'\n    layer_range: [4, 12]\nmerge_method: passthrough\n")
    data = yaml.safe_load(path_free_manifest(text))
    assert [s["model"] for s in data["slices"][0]["sources"]] == ["M", "M2"]


def test_mergekit_adapter_references_lose_their_local_parts():
    """``MODEL+ADAPTER``: each part that is a local path becomes its folder's name; a repo id part
    stays, and a string that is a local path as a whole is one path (a ``+`` in a folder name)."""
    text = (f"slices:\n- sources:\n  - model: org/base+/home/alice/{SECRET}/lora\n    layer_range: [0, 8]\n"
            f"  - model: M+~/adapters/a2\n    layer_range: [0, 8]\n"
            f"  - model: /data/c++/{SECRET}/M3\n    layer_range: [0, 8]\nmerge_method: passthrough\n")
    out = path_free_manifest(text)
    assert SECRET not in out and "alice" not in out and "~" not in out
    assert [s["model"] for s in yaml.safe_load(out)["slices"][0]["sources"]] == ["org/base+lora", "M+a2", "M3"]


def test_a_path_spelled_with_escapes_is_refused():
    text = f'[source]\nmodel = "\\u002fhome/alice/{SECRET}/M"\n'
    with pytest.raises(PlanError) as e:
        path_free_manifest(text)
    assert str(e.value) == (f"the manifest names the local path '/home/alice/{SECRET}/M' in a way tensorsurgery "
                            f"cannot take out of the copy it publishes (README.md, and tensorsurgery.json on the "
                            f"Hub); write it without escapes, or give it with sources= / output= instead")


@pytest.mark.parametrize("value, local", [("/a", True), ("~/a", True), ("..", True), ("a/../b", True),
                                          ("C:\\a", True), ("\\\\host\\share", True), ("a/b", False),
                                          ("org/name", False), ("a..b", False)])
def test_is_local_path(value, local):
    assert is_local_path(value) is local


def test_folder_name():
    assert [folder_name(p) for p in ("/a/b/M/", "C:\\x\\M2", "/", "~", "..")] == ["M", "M2", "local", "local",
                                                                                     "local"]


# ---------------------------------------------------------------------------------------------
# Push and pull


def _manifest(path: Path, model: str, output: Path) -> Path:
    path.write_text(f'[source]\nmodel = "{model}"\n[layers]\nplan = "dus"\noverlap = 8\n'
                    f'[output]\npath = "{output}"\n', encoding="utf-8")
    return path


#: The start of the .gitattributes the Hub creates in every new repo.
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def _pull(uploaded: dict[str, bytes], folder: Path) -> Path:
    """A pulled copy of the upload in ``folder``, as ``hf download REPO --local-dir FOLDER``
    leaves it: the repo's files (the Hub's .gitattributes too) and huggingface_hub's own download
    metadata in .cache/huggingface, written by huggingface_hub itself."""
    from huggingface_hub._local_folder import write_download_metadata
    folder.mkdir(parents=True)
    for name, data in {**uploaded, ".gitattributes": GITATTRIBUTES}.items():
        (folder / name).write_bytes(data)
        write_download_metadata(folder, name, COMMIT, "etag-" + name)
    assert (folder / ".cache" / "huggingface" / "download").is_dir()
    return folder


def _assert_path_free(uploaded: dict[str, bytes], *paths: Path) -> None:
    for name, data in uploaded.items():
        for word in (SECRET, *map(str, paths)):
            assert word.encode() not in data, f"{name} names {word}"


@pytest.fixture
def pushed_local(tmp_path, tiny_mistral):
    """An output of a source in a folder named SECRET, pushed: (tmp root, source, output, api)."""
    source = shutil.copytree(tiny_mistral, tmp_path / SECRET / "model")
    out = tmp_path / SECRET / "out"
    assert main(["apply", str(_manifest(tmp_path / SECRET / "m.toml", str(source), out)), "--no-progress"]) == 0
    api = RecordingApi()
    result = ts.push(out, "me/x", api=api)
    assert result.verified.mode == "record+sources"
    return tmp_path, source, out, api


def test_push_uploads_no_local_path(pushed_local):
    tmp, source, out, api = pushed_local
    uploaded = api.uploaded()
    assert sorted(uploaded) == sorted(p.name for p in out.iterdir())
    _assert_path_free(uploaded, tmp, tmp.resolve())
    record = json.loads(uploaded["tensorsurgery.json"])
    assert [(s["name"], s["model"], s["repo_id"], "root" in s) for s in record["sources"]] == [
        ("source", "model", None, False)]
    assert tomllib.loads(record["manifest"])["source"]["model"] == "model"
    # The local output keeps its record: verify here still compares with the sources.
    local = json.loads((out / "tensorsurgery.json").read_text())
    assert [s["root"] for s in local["sources"]] == [str(source)]
    report = ts.verify(out)
    assert report.ok and report.mode == "record+sources"
    assert all(data == (out / name).read_bytes() for name, data in uploaded.items() if name != "tensorsurgery.json")


def test_a_pulled_copy_verifies_in_record_mode(pushed_local, capsys):
    tmp, source, _, api = pushed_local
    pulled = _pull(api.uploaded(), tmp / "elsewhere" / "pulled")
    report = ts.verify(pulled)
    assert report.ok and report.mode == "record" and report.sources_changed == ()
    capsys.readouterr()
    assert main(["verify", str(pulled)]) == 0
    assert capsys.readouterr().out.strip().endswith(
        "every file matches the sha256 in tensorsurgery.json; sources not found, so not compared with them")
    # Given its source, the pulled copy (card included) is what the recorded manifest makes of it.
    report = ts.verify(pulled, sources=source)
    assert report.ok and report.mode == "record+sources", report.differences
    # A pulled copy can be pushed again, still naming no local path.
    again = RecordingApi()
    ts.push(pulled, "me/y", api=again)
    assert again.uploaded() == api.uploaded()


def test_a_pulled_copy_with_a_changed_file_does_not_verify(pushed_local):
    tmp, _, _, api = pushed_local
    uploaded = api.uploaded()
    pulled = _pull({**uploaded, "README.md": uploaded["README.md"] + b"x"}, tmp / "pulled")
    report = ts.verify(pulled)
    assert report.mode == "record" and [d.where for d in report.differences] == ["README.md"]


@pytest.mark.parametrize("kind", ["link", "folder", "file"])
def test_only_the_download_entries_of_their_kind_are_left_alone(pushed_local, kind):
    """.gitattributes (a regular file) and .cache (a folder) are what a download adds; the same
    names as another kind (a link out of the folder), and anything else, are still differences."""
    tmp, source, _, api = pushed_local
    pulled = _pull(api.uploaded(), tmp / "pulled")
    (pulled / ".gitattributes").unlink()
    if kind == "link":
        (pulled / ".gitattributes").symlink_to(source / "config.json")
        expected = [(".gitattributes", "unexpected symbolic link (not part of this output; remove it)")]
    elif kind == "folder":
        (pulled / ".gitattributes").mkdir()
        expected = [(".gitattributes", "unexpected folder (not part of this output; remove it)")]
    else:
        (pulled / ".gitattributes.bak").write_bytes(GITATTRIBUTES)
        expected = [(".gitattributes.bak", "unexpected file (not part of this output; remove it)")]
    assert [(d.where, d.what) for d in ts.verify(pulled).differences] == expected


def test_a_hub_source_uploads_its_repo_id_and_commit(tmp_path, monkeypatch, hf_repo):
    """A Hub source's record entry is its repo id and commit, not its folder in this machine's
    cache; a pulled copy on a machine with that commit cached verifies against it."""
    from huggingface_hub import constants
    hub_cache = tmp_path / SECRET / "hf_home" / "hub"
    hub_cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(hub_cache.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    add_to_cache(hub_cache, "org/tiny", COMMIT, hf_repo)
    out = tmp_path / SECRET / "out"
    assert main(["apply", str(_manifest(tmp_path / SECRET / "m.toml", "org/tiny", out)), "--no-progress"]) == 0
    assert str(hub_cache) in (out / "tensorsurgery.json").read_text()  # the local record: where it was read
    api = RecordingApi()
    ts.push(out, "me/x", api=api)
    uploaded = api.uploaded()
    _assert_path_free(uploaded, tmp_path)
    [entry] = json.loads(uploaded["tensorsurgery.json"])["sources"]
    assert (entry["model"], entry["repo_id"], entry["revision"], "root" in entry) == ("org/tiny", "org/tiny",
                                                                                     COMMIT, False)
    pulled = _pull(uploaded, tmp_path / "pulled")
    report = ts.verify(pulled)
    assert report.ok and report.mode == "record+sources", report.differences
    shutil.rmtree(hub_cache / "models--org--tiny")
    report = ts.verify(pulled)
    assert report.ok and report.mode == "record"


def test_a_source_config_naming_where_it_was_loaded_from(tmp_path, tiny_mistral):
    """Older transformers saved ``_name_or_path`` (the folder the model was loaded from) in
    config.json: the output's config.json, which is uploaded, names none (the top-level key is
    dropped, as transformers' own save does; a sub-config's is emptied, transformers' value
    there), and the output verifies against its manifest."""
    source = shutil.copytree(tiny_mistral, tmp_path / SECRET / "model")
    config = json.loads((source / "config.json").read_text())
    config["_name_or_path"] = str(tmp_path / SECRET / "base")
    config["task_specific_params"] = {"generate": {"_name_or_path": f"/home/alice/{SECRET}", "max_length": 8}}
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    manifest = _manifest(tmp_path / "m.toml", str(source), out)
    assert main(["apply", str(manifest), "--no-progress"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert "_name_or_path" not in written
    assert written["task_specific_params"] == {"generate": {"_name_or_path": "", "max_length": 8}}
    api = RecordingApi()
    ts.push(out, "me/x", api=api)
    _assert_path_free(api.uploaded(), tmp_path)
    assert ts.verify(manifest).ok


def test_apply_push_to_hub_of_a_mergekit_yaml(tmp_path, tiny_mistral, monkeypatch, capsys):
    """The mergekit passthrough YAML's model paths, through ``apply --push-to-hub``."""
    import huggingface_hub
    source = shutil.copytree(tiny_mistral, tmp_path / SECRET / "model")
    text = (Path(__file__).parent / "data" / "mergekit_DUS.yaml").read_text().replace(
        "your_initialized_model_path", str(source))
    (tmp_path / SECRET / "dus.yml").write_text(text)
    made: list[RecordingApi] = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: made.append(RecordingApi()) or made[-1])
    out = tmp_path / SECRET / "out"
    assert main(["apply", str(tmp_path / SECRET / "dus.yml"), "--output", str(out), "--no-progress",
                 "--push-to-hub", "me/x"]) == 0
    [api] = made
    uploaded = api.uploaded()
    _assert_path_free(uploaded, tmp_path)
    manifest = json.loads(uploaded["tensorsurgery.json"])["manifest"]
    assert [s["sources"][0]["model"] for s in yaml.safe_load(manifest)["slices"]] == ["model", "model"]
    assert ts.verify(_pull(uploaded, tmp_path / "pulled")).ok


def test_an_older_output_whose_card_names_its_source_is_not_pushed(pushed_local):
    """An output of an older tensorsurgery has the manifest's paths in its card (and its record
    the sha256 of that card, so it verifies): push refuses it in one line, uploading nothing."""
    import hashlib
    tmp, source, out, _ = pushed_local
    card = (out / "README.md").read_text().replace('model = "model"', f'model = "{source}"')
    (out / "README.md").write_text(card)
    record = json.loads((out / "tensorsurgery.json").read_text())
    record["files"]["README.md"] = hashlib.sha256(card.encode()).hexdigest()
    (out / "tensorsurgery.json").write_text(json.dumps(record))
    shutil.move(source, tmp / "moved")  # the record alone verifies it now
    api = RecordingApi()
    with pytest.raises(WriteError) as e:
        ts.push(out, "me/x", api=api)
    assert str(e.value) == (f"{out / 'README.md'}: names the local path {source} (written by an older "
                            f"tensorsurgery; apply again with force=True to rewrite it); nothing uploaded may name "
                            f"one, so nothing was pushed to me/x")
    assert api.calls == []


def test_a_copied_file_naming_the_source_folder_is_not_pushed(tmp_path, tiny_mistral, monkeypatch, capsys):
    """Older transformers saved the folder a tokenizer was loaded from in tokenizer_config.json;
    copied byte for byte, it would be published: push says which file, in one line, exit 2."""
    import huggingface_hub
    source = shutil.copytree(tiny_mistral, tmp_path / SECRET / "model")
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["name_or_path"] = str(source / "tokenizer")
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    made: list[RecordingApi] = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: made.append(RecordingApi()) or made[-1])
    out = tmp_path / "out"
    assert main(["apply", str(_manifest(tmp_path / "m.toml", str(source), out)), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["push", str(out), "me/x"]) == 2
    assert capsys.readouterr().err == (
        f"tensorsurgery: error: {out / 'tokenizer_config.json'}: names the local path {source} (copied from the "
        f"source; remove it from the source's tokenizer_config.json, then apply again with --force); nothing "
        f"uploaded may name one, so nothing was pushed to me/x\n")
    assert all(api.calls == [] for api in made)

"""Pushing an output to the Hub (:mod:`tensorsurgery.publish.upload`). The Hub is not reachable here: a
recording client stands in for ``HfApi`` and the tests assert the calls made to it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
from huggingface_hub.errors import HfHubHTTPError

import tensorsurgery as ts
from tensorsurgery.cli import main
from tensorsurgery.errors import ManifestError, NotVerifiedError, WriteError
from tensorsurgery.manifest.loading import load_manifest
from tensorsurgery.publish.upload import push_folder


class RecordingApi:
    """Records ``create_repo`` / ``create_commit`` calls; ``fail`` is raised by ``create_commit``."""

    instances: list[RecordingApi] = []

    def __init__(self, token=None, fail: BaseException | None = None):
        self.token, self.fail, self.calls = token, fail, []
        self.received: list[dict[str, bytes]] = []
        RecordingApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(url=f"https://huggingface.co/{repo_id}")

    def create_commit(self, **kwargs):
        self.calls.append(("create_commit", kwargs))
        # Read now, as the Hub client would: push closes the descriptors it hands over once done.
        self.received.append({op.path_in_repo: _content(op.path_or_fileobj) for op in kwargs["operations"]})
        if self.fail is not None:
            raise self.fail
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123")

    def uploaded(self) -> dict[str, bytes]:
        """Every file of the last commit, by its path in the repo, as the bytes the Hub got."""
        return self.received[-1]


def _content(source) -> bytes:
    """What huggingface_hub would send for a ``path_or_fileobj``: bytes, a path's bytes, or a file
    object's (read from the start, its position kept, as huggingface_hub does)."""
    if isinstance(source, bytes):
        return source
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    at = source.tell()
    source.seek(0)
    data = source.read()
    source.seek(at)
    return data


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_mistral) -> Path:
    """A finished output (read-only: tests that change it copy it)."""
    tmp = tmp_path_factory.mktemp("push")
    assert main(["apply", str(write_manifest(tmp, tiny_mistral)), "--no-progress"]) == 0
    return tmp / "out"


@pytest.fixture
def output(tmp_path, finished) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "out"))


def test_push_creates_a_private_repo_and_uploads_the_folder(output):
    api = RecordingApi()
    url = push_folder(output, "me/tiny-dus", api=api)
    assert url == "https://huggingface.co/me/tiny-dus/commit/abc123"
    assert api.calls[0] == ("create_repo", "me/tiny-dus",
                            {"repo_type": "model", "private": True, "exist_ok": True, "token": None})
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    commit = {k: v for k, v in api.calls[1][1].items() if k != "operations"}
    assert commit == {"repo_id": "me/tiny-dus", "repo_type": "model", "token": None,
                      "commit_message": "Upload out (tensorsurgery)"}
    # One commit of every file of the output, each once; all but the record byte for byte.
    uploaded = api.uploaded()
    assert sorted(uploaded) == sorted(p.name for p in output.iterdir())
    assert len(api.calls[1][1]["operations"]) == len(uploaded)
    assert all(data == (output / name).read_bytes() for name, data in uploaded.items() if name != "tensorsurgery.json")


def test_push_public_with_a_token(output):
    api = RecordingApi()
    push_folder(output, "tiny-dus", private=False, token="hf_x", api=api)
    assert api.calls[0] == ("create_repo", "tiny-dus",
                            {"repo_type": "model", "private": False, "exist_ok": True, "token": "hf_x"})


def test_push_refuses_a_folder_that_is_not_a_finished_output(tmp_path):
    api = RecordingApi()
    with pytest.raises(WriteError) as e:
        push_folder(tmp_path, "me/x", api=api)
    assert str(e.value) == (f"{tmp_path}: no tensorsurgery.json, so not a finished tensorsurgery output; "
                            f"not pushed to me/x")
    (tmp_path / "tensorsurgery.json").write_text("[]")
    with pytest.raises(WriteError) as e:
        push_folder(tmp_path, "me/x", api=api)
    assert str(e.value) == (f"{tmp_path / 'tensorsurgery.json'}: the file is not a JSON object; this is not a "
                            f"provenance record tensorsurgery wrote (or it was edited): verify with the manifest "
                            f"instead; not pushed to me/x")
    assert api.calls == []


@pytest.mark.parametrize("repo_id", ["", "a/b/c", "../x", "me/", "/x", "me/x y"])
def test_push_refuses_a_bad_repo_id(output, repo_id):
    with pytest.raises(WriteError) as e:
        push_folder(output, repo_id, api=RecordingApi())
    assert str(e.value) == f'push_to_hub: {repo_id!r} is not a Hugging Face repo id; use "org/name"'


def test_hub_errors_become_one_line(output):
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    error = HfHubHTTPError("403 Forbidden: you don't have the rights.\nRequest id: xyz",
                           response=httpx2.Response(403, request=request))
    with pytest.raises(WriteError) as e:
        push_folder(output, "me/x", api=RecordingApi(fail=error))
    assert str(e.value) == (f"me/x: push to the Hugging Face Hub failed (HfHubHTTPError: 403 Forbidden: you don't "
                            f"have the rights.); the output is complete in {output}; retry with "
                            f"`tensorsurgery push {output} me/x`")
    assert (output / "tensorsurgery.json").is_file()


# ---------------------------------------------------------------------------------------------
# Manifest key and CLI


def write_manifest(tmp_path: Path, source: Path, extra: str = "") -> Path:
    path = tmp_path / "m.toml"
    path.write_text(f'[source]\nmodel = "{source}"\n[layers]\nplan = "dus"\noverlap = 8\n'
                    f'[output]\npath = "{tmp_path / "out"}"\n{extra}', encoding="utf-8")
    return path


@pytest.fixture
def recording_hub(monkeypatch):
    """Every ``HfApi()`` made by push_folder is a RecordingApi."""
    RecordingApi.instances = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi.instances


def test_manifest_push_keys(tmp_path, tiny_mistral):
    m = load_manifest(write_manifest(tmp_path, tiny_mistral, 'push_to_hub = "me/x"\nprivate = false\n'))
    assert (m.output.push_to_hub, m.output.private) == ("me/x", False)
    m = load_manifest(write_manifest(tmp_path, tiny_mistral))
    assert (m.output.push_to_hub, m.output.private) == (None, True)
    path = write_manifest(tmp_path, tiny_mistral, 'push_to_hub = "me/x/y"\n')
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    assert str(e.value) == f"{path}: output.push_to_hub: 'me/x/y' is not a Hugging Face repo id; use \"org/name\""


def test_cli_apply_verifies_then_pushes(tmp_path, tiny_mistral, recording_hub, capsys):
    manifest = write_manifest(tmp_path, tiny_mistral)
    assert main(["apply", str(manifest), "--no-progress", "--push-to-hub", "me/tiny-dus"]) == 0
    out = tmp_path / "out"
    [api] = recording_hub
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0][2]["private"] is True
    assert api.calls[1][1]["repo_id"] == "me/tiny-dus"
    assert sorted(api.uploaded()) == sorted(p.name for p in out.iterdir())
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"verified {out} (every byte matches the manifest applied to the sources); "
        "pushed to https://huggingface.co/me/tiny-dus/commit/abc123")
    assert json.loads((out / "tensorsurgery.json").read_text())["tool"] == "tensorsurgery"


def test_cli_apply_pushes_to_the_manifest_repo(tmp_path, tiny_mistral, recording_hub):
    manifest = write_manifest(tmp_path, tiny_mistral, 'push_to_hub = "org/from-manifest"\nprivate = false\n')
    assert main(["apply", str(manifest), "--no-progress"]) == 0
    [api] = recording_hub
    assert api.calls[0][1:] == ("org/from-manifest",
                                {"repo_type": "model", "private": False, "exist_ok": True, "token": None})


def test_cli_dry_run_pushes_nothing(tmp_path, tiny_mistral, recording_hub, capsys):
    manifest = write_manifest(tmp_path, tiny_mistral)
    assert main(["apply", str(manifest), "--dry-run", "--push-to-hub", "me/x"]) == 0
    assert recording_hub == [] and not (tmp_path / "out").exists()
    assert capsys.readouterr().out.splitlines()[-1] == "dry run: nothing written, nothing pushed to me/x"


def test_cli_push_failure_is_one_line_and_keeps_the_output(tmp_path, tiny_mistral, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "HfApi",
                        lambda token=None: RecordingApi(fail=ConnectionError("Hub unreachable\ndetails")))
    manifest = write_manifest(tmp_path, tiny_mistral)
    assert main(["apply", str(manifest), "--no-progress", "--push-to-hub", "me/x"]) == 2
    out = tmp_path / "out"
    assert capsys.readouterr().err == (
        f"tensorsurgery: error: me/x: push to the Hugging Face Hub failed (ConnectionError: Hub unreachable); "
        f"the output is complete in {out}; retry with `tensorsurgery push {out} me/x`\n")
    assert (out / "tensorsurgery.json").is_file()


def _tampered_output(tmp_path: Path, source: Path) -> Path:
    assert main(["apply", str(write_manifest(tmp_path, source)), "--no-progress"]) == 0
    out = tmp_path / "out"
    shard = sorted(out.glob("model*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    return out


def test_api_push_of_an_output_that_does_not_verify_raises_and_uploads_nothing(tmp_path, tiny_mistral,
                                                                               recording_hub):
    out = _tampered_output(tmp_path, tiny_mistral)
    with pytest.raises(NotVerifiedError) as e:
        ts.push(out, "me/x")
    assert str(e.value) == f"{out} does not verify (1 difference(s)); nothing was pushed to me/x"
    assert not e.value.report.ok
    assert recording_hub == []


def test_cli_push_says_which_verify_mode_ran(tmp_path, tiny_mistral, recording_hub, capsys):
    import shutil
    source = tmp_path / "src"
    shutil.copytree(tiny_mistral, source)
    assert main(["apply", str(write_manifest(tmp_path, source)), "--no-progress"]) == 0
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["push", str(out), "me/x"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"verified {out} (every byte matches the recorded manifest applied to the sources); pushed to ")
    shutil.rmtree(source)  # the record alone is left to check against: say so
    assert main(["push", str(out), "me/x"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"verified {out} (every file matches the sha256 in tensorsurgery.json; sources not found")


def test_cli_push_of_an_output_that_does_not_verify_exits_1(tmp_path, tiny_mistral, recording_hub, capsys):
    out = _tampered_output(tmp_path, tiny_mistral)
    capsys.readouterr()
    assert main(["push", str(out), "me/x"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"tensorsurgery: {out} does not verify; not pushed to me/x"
    assert recording_hub == []


def test_cli_push_after_a_source_was_rewritten_at_the_same_size(tmp_path, tiny_mistral, recording_hub, capsys):
    """A source updated in place since apply (same size, mtime set back) made push refuse an
    untouched output (every tensor a difference): it is pushed, and the line says the record
    alone was checked, and why."""
    import os
    import shutil
    source = shutil.copytree(tiny_mistral, tmp_path / "src")
    assert main(["apply", str(write_manifest(tmp_path, source)), "--no-progress"]) == 0
    out = tmp_path / "out"
    shard = sorted(source.glob("model*.safetensors"))[0]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert main(["push", str(out), "me/x"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"verified {out} (every file matches the sha256 in tensorsurgery.json; sources changed since apply: "
        f"{shard.name}; checked the output against its record only); pushed to "
        f"https://huggingface.co/me/x/commit/abc123")
    assert [c[0] for c in recording_hub[0].calls] == ["create_repo", "create_commit"]

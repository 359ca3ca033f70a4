"""``verify OUTPUT`` of an output built from a Hugging Face repo (issue 9): the record names the
repo, its commit and the cache snapshot. Verifying must never download a model (a record can name
any repo), and weights that left the cache leave the record to check against, not an error."""
from __future__ import annotations

import pytest
import test_hub
from huggingface_hub import constants
from test_hub import COMMIT, HF_SHARDS, FakeHub, add_to_cache

from cli_helpers import run, write_manifest
from tensorsurgery.sources import hub

cache = test_hub.cache  # the same empty offline Hugging Face cache, a fixture


@pytest.fixture
def repo_files(tiny_mistral) -> dict[str, bytes]:
    """The files of a Hugging Face-layout repo: the tiny Mistral fixture's."""
    return {p.name: p.read_bytes() for p in tiny_mistral.iterdir() if p.is_file()}


@pytest.fixture
def built(cache, repo_files, tmp_path, capsys):
    snap = add_to_cache(cache, "org/tiny", COMMIT, repo_files)
    manifest = write_manifest(tmp_path, "org/tiny", tmp_path / "out")
    assert run(capsys, "apply", manifest, "--no-progress")[0] == 0
    return snap, tmp_path / "out"


def test_verify_from_the_cache(built, capsys):
    _, out = built
    code, text, err = run(capsys, "verify", out)
    assert (code, err) == (0, "")
    assert "every byte matches the recorded manifest applied to the sources" in text


def test_weights_pruned_from_the_cache(built, capsys):
    """`hf cache` pruned a shard: offline this was `not in the Hugging Face cache` (exit 2)."""
    snap, out = built
    (snap / HF_SHARDS[1]).resolve().unlink()
    code, text, err = run(capsys, "verify", out)
    assert (code, err) == (0, "")
    assert "sources not found, so not compared with them" in text


def test_verify_downloads_no_weights(built, capsys, repo_files, cache, monkeypatch):
    """Online (a fake Hub), with a shard gone from the cache: nothing is fetched, and a shard
    still cached is not downloaded again either."""
    snap, out = built
    fake = FakeHub(cache, repo_files)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HubClient", lambda *_args, **_kwargs: fake)
    code, _, err = run(capsys, "verify", out)
    assert (code, err) == (0, "")
    assert all(not name.endswith(".safetensors") for files in fake.fetched for name in files), fake.fetched
    (snap / HF_SHARDS[1]).resolve().unlink()
    code, text, err = run(capsys, "verify", out)
    assert (code, err) == (0, "")
    assert "sources not found, so not compared with them" in text
    assert all(not name.endswith(".safetensors") for files in fake.fetched for name in files), fake.fetched

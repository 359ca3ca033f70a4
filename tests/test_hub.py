"""Hub sources (:mod:`tensorsurgery.sources.hub`), with no network.

Offline tests build the cache layout huggingface_hub reads (``models--org--name/refs/main``,
``snapshots/<commit>/<file>`` symlinks into ``blobs/``) and run with HF_HUB_OFFLINE, so the
library's own resolution code (``HfApi.resolve_revision``, ``snapshot_download``) runs. The
online paths (downloading only one format, planning from remote headers) run against
:class:`FakeHub`, which serves a folder's bytes through the :class:`~tensorsurgery.sources.hub.HubClient`
interface: the HTTP layer itself is not exercised here.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from tensorsurgery.cli import main
from tensorsurgery.errors import SourceError
from tensorsurgery.formats.safetensors import encode_header, read_header
from tensorsurgery.manifest.loading import load_manifest
from tensorsurgery.output.source_hash import cached_sha256
from tensorsurgery.planning.planner import build_plan
from tensorsurgery.report import plan_as_dict
from tensorsurgery.sources import hub
from tensorsurgery.sources.hub import resolve_hub_source
from tensorsurgery.sources.resolver import resolve_source

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
HF_SHARDS = ("model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
             "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors")
TOKENIZER_FILES = ("generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")
CARD = "---\nlicense: apache-2.0\nlanguage: [en]\n---\n# Tiny Mistral\nThe source's own card.\n"
PARAMS = {"dim": 16, "n_layers": 32, "hidden_dim": 32, "n_heads": 2, "n_kv_heads": 1, "head_dim": 8,
          "norm_eps": 1e-5, "vocab_size": 96, "rope_theta": 10000.0, "sliding_window": 32}
# Hugging Face name -> Mistral native name (the inverse of the mistral-to-llama preset's table).
_TO_NATIVE = (("model.embed_tokens.", "tok_embeddings."), ("model.norm.", "norm."), ("lm_head.", "output."),
              ("model.layers.", "layers."), ("self_attn.q_proj", "attention.wq"),
              ("self_attn.k_proj", "attention.wk"), ("self_attn.v_proj", "attention.wv"),
              ("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"),
              ("mlp.down_proj", "feed_forward.w2"), ("mlp.up_proj", "feed_forward.w3"),
              ("post_attention_layernorm", "ffn_norm"), ("input_layernorm", "attention_norm"))


# ---------------------------------------------------------------------------------------------
# Fixtures: repo contents and the cache layout


def git_blob_id(data: bytes) -> str:
    """The id git (and the Hub) gives a small, non-LFS file: sha1 of "blob <size>\\0" + data."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes],
                 ref: str | None = "main") -> Path:
    """Store ``files`` as huggingface_hub does: LFS files (safetensors) as ``blobs/<sha256>``, small
    files as ``blobs/<git blob id>``, relative symlinks in ``snapshots/<commit>``; ``refs/<ref>``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob_id = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_blob_id(data)
        (repo / "blobs" / blob_id).write_bytes(data)
        link = snap / name
        if not link.is_symlink():
            link.symlink_to(f"../../blobs/{blob_id}")
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def native_files(hf_single: Path) -> dict[str, bytes]:
    """Mistral's native layout made from a one-file HF checkpoint: the same bytes, native names."""
    header = read_header(hf_single / "model.safetensors")
    data = (hf_single / "model.safetensors").read_bytes()[header.data_start:]

    def native(name: str) -> str:
        for hf_part, native_part in _TO_NATIVE:
            name = name.replace(hf_part, native_part)
        return name

    head = encode_header(((native(e.name), e.dtype, e.shape, e.start, e.end) for e in header.entries),
                         {"format": "pt"})
    return {"consolidated.safetensors": head + data, "params.json": json.dumps(PARAMS).encode()}


@pytest.fixture(scope="session")
def hf_repo(tiny_mistral) -> dict[str, bytes]:
    """The files of a Hugging Face-layout repo: the tiny Mistral fixture plus a card."""
    files = {p.name: p.read_bytes() for p in tiny_mistral.iterdir() if p.is_file()}
    assert set(HF_SHARDS) <= set(files)
    return {**files, "README.md": CARD.encode()}


@pytest.fixture(scope="session")
def native_repo(tiny_mistral_single, hf_repo) -> dict[str, bytes]:
    """A native-layout repo (consolidated.safetensors, params.json) with the same tokenizer."""
    return {**native_files(tiny_mistral_single), **{n: hf_repo[n] for n in TOKENIZER_FILES}}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline. huggingface_hub reads HF_HOME / HF_HUB_CACHE and
    HF_HUB_OFFLINE into ``constants`` at import; its functions read the constants at call time."""
    hub_cache = tmp_path / "hf_home" / "hub"
    hub_cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(hub_cache.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def write_manifest(path: Path, model: str, output: Path, plan: str = 'plan = "dus"\noverlap = 8') -> Path:
    path.write_text(f'[source]\nmodel = "{model}"\n\n[rename]\npreset = "mistral-to-llama"\n\n'
                    f'[layers]\n{plan}\n\n[output]\npath = "{output}"\n', encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Offline, through huggingface_hub's own cache resolution


def test_offline_cached_repo_resolves_to_its_commit(cache, hf_repo):
    snap = add_to_cache(cache, "org/tiny", COMMIT, hf_repo)
    ckpt = resolve_hub_source("org/tiny")
    assert (ckpt.root, ckpt.revision, ckpt.repo_id, ckpt.layout) == (snap, COMMIT, "org/tiny", "hf")
    assert tuple(ckpt.headers) == HF_SHARDS
    assert ckpt.extra_files == TOKENIZER_FILES
    assert ckpt.num_layers == 32


def test_offline_revision_can_be_a_commit_or_another_ref(cache, hf_repo):
    add_to_cache(cache, "org/tiny", COMMIT, hf_repo)
    add_to_cache(cache, "org/tiny", OTHER_COMMIT, hf_repo, ref="v1.0")
    assert resolve_hub_source("org/tiny", "v1.0").revision == OTHER_COMMIT
    assert resolve_hub_source("org/tiny", COMMIT).revision == COMMIT
    assert resolve_hub_source("org/tiny", "main").revision == COMMIT


def test_offline_cache_with_both_formats_uses_only_the_hf_shards(cache, hf_repo, native_repo):
    # What mergekit leaves behind: a snapshot holding both the HF shards and consolidated.safetensors.
    add_to_cache(cache, "org/tiny", COMMIT, {**native_repo, **hf_repo})
    ckpt = resolve_hub_source("org/tiny")
    assert ckpt.layout == "hf"
    assert tuple(ckpt.headers) == HF_SHARDS
    assert "params.json" not in ckpt.extra_files and ckpt.extra_files == TOKENIZER_FILES
    manifest = write_manifest(cache.parent / "m.toml", "org/tiny", cache.parent / "out")
    plan = build_plan(load_manifest(manifest), {"source": ckpt})
    assert {t.source.file.name for t in plan.tensors} == set(HF_SHARDS)
    assert plan.sources[0].files == HF_SHARDS


def test_offline_native_only_repo(cache, native_repo):
    snap = add_to_cache(cache, "mistralai/tiny-native", COMMIT, native_repo)
    ckpt = resolve_hub_source("mistralai/tiny-native")
    assert (ckpt.root, ckpt.layout, tuple(ckpt.headers)) == (snap, "mistral", ("consolidated.safetensors",))
    assert ckpt.config["num_hidden_layers"] == 32 and ckpt.extra_files == TOKENIZER_FILES


def test_offline_repo_not_in_cache_is_one_clear_error(cache):
    with pytest.raises(SourceError) as e:
        resolve_hub_source("org/absent")
    assert str(e.value) == (f"org/absent@main: not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is "
                            f"set; download it once online, or pass sources=PATH to a local copy")


def test_offline_weights_missing_from_the_cache(cache, hf_repo):
    snap = add_to_cache(cache, "org/tiny", COMMIT, {n: d for n, d in hf_repo.items() if n != HF_SHARDS[2]})
    for download in (True, False):
        with pytest.raises(SourceError) as e:
            resolve_hub_source("org/tiny", download=download)
        assert str(e.value) == (f"org/tiny@{COMMIT[:12]}: 1 weight file(s) not in the Hugging Face cache "
                                f"({HF_SHARDS[2]}) and HF_HUB_OFFLINE is set; download them once online")
    assert not (snap / HF_SHARDS[2]).exists()


def test_offline_ref_without_snapshot(cache, hf_repo):
    add_to_cache(cache, "org/tiny", COMMIT, hf_repo)
    (cache / "models--org--tiny" / "refs" / "main").write_text(OTHER_COMMIT)
    with pytest.raises(SourceError) as e:
        resolve_hub_source("org/tiny")
    snap = cache / "models--org--tiny" / "snapshots" / OTHER_COMMIT
    assert str(e.value) == (f"org/tiny@{OTHER_COMMIT[:12]}: the cache holds no snapshot folder {snap} and "
                            f"HF_HUB_OFFLINE is set; download the repo once online or pass sources=PATH")


def test_resolve_source_sends_repo_ids_to_the_hub(cache, hf_repo, tiny_mistral):
    add_to_cache(cache, "org/tiny", COMMIT, hf_repo)
    assert resolve_source("org/tiny", download=False).revision == COMMIT
    assert resolve_source(str(tiny_mistral)).repo_id is None


def test_cli_plan_and_apply_from_the_cache(cache, hf_repo, tmp_path, capsys):
    add_to_cache(cache, "org/tiny", COMMIT, hf_repo)
    manifest = write_manifest(tmp_path / "m.toml", "org/tiny", tmp_path / "out")
    assert main(["plan", str(manifest), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["sources"][0]["revision"] == COMMIT
    assert main(["apply", str(manifest), "--no-progress"]) == 0
    record = json.loads((tmp_path / "out" / "tensorsurgery.json").read_text())
    assert [(s["model"], s["revision"], s["layout"]) for s in record["sources"]] == [("org/tiny", COMMIT, "hf")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["README.md", "config.json", "model.safetensors", "tensorsurgery.json", *TOKENIZER_FILES])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: org/tiny" in card and "license: apache-2.0" in card
    assert "The source's own card." not in card


def test_cli_repo_not_in_cache_exit_2_one_line(cache, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.toml", "examples/tiny-mistral", tmp_path / "out")
    assert main(["plan", str(manifest), "--source", "org/absent"]) == 2
    err = capsys.readouterr().err
    assert err == (f"tensorsurgery: error: org/absent@main: not in the Hugging Face cache ({cache}) and "
                   f"HF_HUB_OFFLINE is set; download it once online, or pass --source PATH to a local copy\n")


def test_cli_environment_in_a_fresh_process(tmp_path, hf_repo):
    """HF_HOME and HF_HUB_OFFLINE as a user sets them: read by huggingface_hub at import."""
    home = tmp_path / "hf_home"
    add_to_cache(home / "hub", "org/tiny", COMMIT, hf_repo)
    manifest = write_manifest(tmp_path / "m.toml", "examples/tiny-mistral", tmp_path / "out")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tensorsurgery", *argv], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    done = run("apply", str(manifest), "--source", "org/tiny", "--no-progress")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "out" / "tensorsurgery.json").read_text())
    assert record["sources"][0]["revision"] == COMMIT
    assert record["sources"][0]["root"] == str(home / "hub" / "models--org--tiny" / "snapshots" / COMMIT)
    done = run("plan", str(manifest), "--source", "org/other")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"tensorsurgery: error: org/other@main: not in the Hugging Face cache ({home / 'hub'}) and "
        f"HF_HUB_OFFLINE is set; download it once online, or pass --source PATH to a local copy"]


# ---------------------------------------------------------------------------------------------
# Online paths, against a fake Hub


class FakeHub:
    """A :class:`~tensorsurgery.sources.hub.HubClient` serving ``files`` at ``commit``; "downloads" write the
    cache layout. Records what was fetched and which byte ranges were read."""

    def __init__(self, cache: Path, files: dict[str, bytes], commit: str = COMMIT):
        self.cache, self.files, self.commit = cache, files, commit
        self.fetched: list[tuple[str, ...]] = []
        self.ranges: list[tuple[str, int, int]] = []

    def resolve(self, repo_id, revision):
        return self.commit

    def list_files(self, repo_id, commit):
        return {name: len(data) for name, data in self.files.items()}

    def snapshot_dir(self, repo_id, commit):
        return self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit

    def fetch(self, repo_id, commit, files):
        self.fetched.append(tuple(files))
        add_to_cache(self.cache, repo_id, commit, {f: self.files[f] for f in files if f in self.files}, ref=None)

    def read_range(self, repo_id, commit, filename, start, stop):
        self.ranges.append((filename, start, stop))
        return self.files[filename][start:stop]


SMALL_HF = ("config.json", "model.safetensors.index.json", *TOKENIZER_FILES, "README.md")


def test_download_fetches_the_hf_shards_only(cache, hf_repo, native_repo):
    fake = FakeHub(cache, {**native_repo, **hf_repo})
    ckpt = resolve_hub_source("org/tiny", client=fake)
    assert fake.fetched == [SMALL_HF, HF_SHARDS]
    assert (ckpt.layout, tuple(ckpt.headers), ckpt.revision) == ("hf", HF_SHARDS, COMMIT)
    snap = fake.snapshot_dir("org/tiny", COMMIT)
    assert sorted(p.name for p in snap.iterdir()) == sorted([*SMALL_HF, *HF_SHARDS])
    assert fake.ranges == []


def test_download_native_repo(cache, native_repo):
    fake = FakeHub(cache, native_repo)
    ckpt = resolve_hub_source("org/native", client=fake)
    assert fake.fetched == [("params.json", *TOKENIZER_FILES), ("consolidated.safetensors",)]
    assert ckpt.layout == "mistral"


def test_download_skips_cached_weights(cache, hf_repo):
    add_to_cache(cache, "org/tiny", COMMIT, {n: hf_repo[n] for n in HF_SHARDS[:3]}, ref=None)
    fake = FakeHub(cache, hf_repo)
    resolve_hub_source("org/tiny", client=fake)
    assert fake.fetched == [SMALL_HF, HF_SHARDS[3:]]


def test_plan_reads_remote_headers_and_downloads_no_weights(cache, hf_repo, tmp_path):
    fake = FakeHub(cache, hf_repo)
    remote = resolve_hub_source("org/tiny", download=False, client=fake)
    assert fake.fetched == [SMALL_HF]
    snap = fake.snapshot_dir("org/tiny", COMMIT)
    assert not any((snap / s).exists() for s in HF_SHARDS)
    # The tiny shards are smaller than the first read (100 kB), so one range read each.
    assert fake.ranges == [(s, 0, len(hf_repo[s])) for s in HF_SHARDS]
    assert remote.extra_files == TOKENIZER_FILES
    assert all(h.path == snap / n for n, h in remote.headers.items())  # where the download will put them

    manifest = load_manifest(write_manifest(tmp_path / "m.toml", "org/tiny", tmp_path / "out"))
    before = plan_as_dict(build_plan(manifest, {"source": remote}))
    local = resolve_hub_source("org/tiny", client=fake)  # now download
    assert fake.fetched == [SMALL_HF, SMALL_HF, HF_SHARDS]
    assert local.headers == remote.headers and dict(local.weight_map) == dict(remote.weight_map)
    assert plan_as_dict(build_plan(manifest, {"source": local})) == before


def test_remote_headers_read_only_the_header_bytes(tmp_path, hf_repo, monkeypatch):
    monkeypatch.setattr(hub, "_FIRST_READ", 1024)  # as for real shards, whose data dwarfs the header
    fake = FakeHub(tmp_path / "cache", hf_repo)
    remote = resolve_hub_source("org/tiny", download=False, client=fake)
    starts = {n: h.data_start for n, h in remote.headers.items()}
    assert all(start > 1024 for start in starts.values())
    assert fake.ranges == [r for s in HF_SHARDS for r in ((s, 0, 1024), (s, 1024, starts[s]))]
    for name, header in remote.headers.items():
        local = read_header(_write(tmp_path / name, hf_repo[name]))
        assert (header.data_start, header.entries, header.metadata) == (local.data_start, local.entries,
                                                                        local.metadata)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_plan_of_a_native_repo_from_remote_headers(cache, native_repo, tmp_path):
    fake = FakeHub(cache, native_repo)
    remote = resolve_hub_source("org/native", download=False, client=fake)
    assert fake.fetched == [("params.json", *TOKENIZER_FILES)]
    assert (remote.layout, remote.config["num_hidden_layers"]) == ("mistral", 32)
    manifest = load_manifest(write_manifest(tmp_path / "m.toml", "org/native", tmp_path / "out"))
    before = plan_as_dict(build_plan(manifest, {"source": remote}))
    assert {t["transform"] for s in before["shards"] for t in s["tensors"]} == {"none", "permute"}
    local = resolve_hub_source("org/native", client=fake)
    assert plan_as_dict(build_plan(manifest, {"source": local})) == before


def test_plan_reads_only_the_uncached_headers_remotely(cache, hf_repo):
    add_to_cache(cache, "org/tiny", COMMIT, {n: hf_repo[n] for n in HF_SHARDS[:3]}, ref=None)
    fake = FakeHub(cache, hf_repo)
    remote = resolve_hub_source("org/tiny", download=False, client=fake)
    assert [r[0] for r in fake.ranges] == [HF_SHARDS[3]] and fake.fetched == [SMALL_HF]
    assert tuple(remote.headers) == HF_SHARDS


def test_index_naming_a_shard_the_repo_lacks(cache, hf_repo):
    fake = FakeHub(cache, {n: d for n, d in hf_repo.items() if n != HF_SHARDS[1]})
    with pytest.raises(SourceError) as e:
        resolve_hub_source("org/tiny", client=fake)
    assert str(e.value) == (f"org/tiny@{COMMIT[:12]}: model.safetensors.index.json names shard "
                            f"'{HF_SHARDS[1]}', which the repo does not have at this commit; the repo is "
                            f"broken, pick another revision")


def _http_error(cls, status: int):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/x/revision/main")
    response = httpx2.Response(status, request=request)
    return cls(f"{status} Client Error.\n\nRepository Not Found for url: ...", response=response)


@pytest.mark.parametrize("error, message", [
    (_http_error(RepositoryNotFoundError, 404),
     "org/x@main: no such model repo on the Hugging Face Hub, or it is private and no valid token is set "
     "(HF_TOKEN); check the name"),
    (_http_error(GatedRepoError, 403),
     "org/x@main: the repo is gated; accept its terms on huggingface.co and set HF_TOKEN "
     "(or run `hf auth login`)"),
    (_http_error(RevisionNotFoundError, 404),
     "org/x@main: no such revision on the Hugging Face Hub; check the branch, tag or commit in source.revision"),
    (ConnectionResetError("connection reset\nby peer"),
     "org/x@main: cannot resolve on the Hugging Face Hub (connection reset); retry, or pass sources=PATH "
     "to a local copy"),
])
def test_hub_errors_become_one_line(cache, error, message):
    class Failing(FakeHub):
        def resolve(self, repo_id, revision):
            raise error

    with pytest.raises(SourceError) as e:
        resolve_hub_source("org/x", client=Failing(cache, {}))
    assert str(e.value) == message


# ---------------------------------------------------------------------------------------------
# cached_sha256


def test_cached_sha256_names_lfs_blobs_only(cache, hf_repo, tmp_path):
    snap = add_to_cache(cache, "org/tiny", COMMIT, hf_repo)
    shard = snap / HF_SHARDS[0]
    assert cached_sha256(shard) == hashlib.sha256(hf_repo[HF_SHARDS[0]]).hexdigest()
    assert cached_sha256(snap / "config.json") is None  # a small file: git blob id, not sha256
    plain = tmp_path / "model.safetensors"
    plain.write_bytes(hf_repo[HF_SHARDS[0]])
    assert cached_sha256(plain) is None
    assert cached_sha256(tmp_path / "missing") is None

"""Source-file sha256 for the provenance record: the identity-keyed hash cache (a second apply
from the same unchanged source does not read it again; any change to the file is re-hashed) and
where each hash came from."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tensorsurgery.cli import main
from tensorsurgery.output.source_hash import CACHE_ENV, HashCache, SourceHasher, default_cache_dir

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
PAST = time.time() - 3600


def _file(folder: Path, name: str = "w.safetensors", data: bytes = b"x" * 3000) -> Path:
    path = folder / name
    path.write_bytes(data)
    os.utime(path, (PAST, PAST))  # not "racy": written long enough before it is hashed
    return path


def _hash(path: Path, cache: HashCache):
    hashes, _ = SourceHasher([path], cache=cache).result()
    return hashes[path]


@pytest.fixture
def cache(tmp_path) -> HashCache:
    return HashCache(tmp_path / "cache")


def test_second_hash_comes_from_the_cache_without_reading(tmp_path, cache, monkeypatch):
    path = _file(tmp_path)
    first = _hash(path, cache)
    assert (first.sha256, first.origin) == (hashlib.sha256(path.read_bytes()).hexdigest(), "read")
    assert len(list(cache.folder.iterdir())) == 1

    def no_read(*_args, **_kwargs):
        raise AssertionError("a cached file was read")
    monkeypatch.setattr(SourceHasher, "_read", no_read)
    second = _hash(path, cache)
    assert (second.sha256, second.origin) == (first.sha256, "cache")


@pytest.mark.parametrize("change", ["mtime", "size", "inode", "content-same-size", "in-place-mtime-restored"])
def test_a_changed_file_is_hashed_again(tmp_path, cache, change):
    path = _file(tmp_path)
    assert _hash(path, cache).origin == "read"
    assert _hash(path, cache).origin == "cache"
    if change == "mtime":
        os.utime(path, (PAST + 10, PAST + 10))
    elif change == "size":
        with open(path, "ab") as f:
            f.write(b"y")
        os.utime(path, (PAST, PAST))  # same mtime as cached: the size alone must tell
    elif change == "inode":
        other = _file(tmp_path, "other", b"z" * 3000)
        os.replace(other, path)  # same size, same mtime, another inode
        os.utime(path, (PAST, PAST))
    elif change == "content-same-size":
        path.write_bytes(b"q" * 3000)
        os.utime(path, (PAST + 1, PAST + 1))
    else:  # rsync --inplace -t, cp -p: same inode, size and mtime; only the change time moved
        path.write_bytes(b"r" * 3000)
        os.utime(path, (PAST, PAST))
    again = _hash(path, cache)
    assert (again.sha256, again.origin) == (hashlib.sha256(path.read_bytes()).hexdigest(), "read")
    assert _hash(path, cache).origin == "cache"


def test_a_file_modified_just_now_is_not_cached(tmp_path, cache):
    path = tmp_path / "fresh"
    path.write_bytes(b"a" * 100)  # mtime = now: a write within the timestamp's tick could go unseen
    assert _hash(path, cache).origin == "read"
    assert _hash(path, cache).origin == "read"
    assert not cache.folder.exists() or not list(cache.folder.iterdir())


@pytest.mark.parametrize("damage", ["garbage", "not-an-object", "bad-sha", "other-size", "empty"])
def test_a_corrupt_or_inconsistent_entry_is_ignored_and_replaced(tmp_path, cache, damage):
    path = _file(tmp_path)
    digest = _hash(path, cache).sha256
    entry = next(cache.folder.iterdir())
    data = json.loads(entry.read_text())
    entry.write_bytes({"garbage": b"\x00{not json", "not-an-object": b"[1, 2]",
                       "bad-sha": json.dumps({**data, "sha256": "0" * 63}).encode(),
                       "other-size": json.dumps({**data, "size": data["size"] + 1, "sha256": "0" * 64}).encode(),
                       "empty": b""}[damage])
    again = _hash(path, cache)
    assert (again.sha256, again.origin) == (digest, "read")
    assert _hash(path, cache).origin == "cache"


def test_an_unwritable_cache_folder_does_not_fail_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    path = _file(tmp_path)
    cache = HashCache(blocker / "cache")
    assert _hash(path, cache).origin == "read"
    assert _hash(path, cache).origin == "read"


@pytest.mark.parametrize("value", ["off", "0", "false", "OFF"])
def test_the_environment_variable_disables_the_cache(monkeypatch, value):
    monkeypatch.setenv(CACHE_ENV, value)
    assert default_cache_dir() is None
    assert HashCache(None).get(os.stat(__file__)) is None


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "tensorsurgery" / "sha256"


def _sources_of(out: Path) -> list[dict]:
    record = json.loads((out / "tensorsurgery.json").read_text())
    return [f for s in record["sources"] for f in s["files"]]


def test_the_record_says_cache_on_the_second_apply(tiny_mistral, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    source = tmp_path / "src"
    shutil.copytree(tiny_mistral, source)
    for p in source.glob("*.safetensors"):
        os.utime(p, (PAST, PAST))

    def apply(name: str) -> list[dict]:
        out = tmp_path / name
        assert main(["apply", str(MANIFESTS / "solar-dus.toml"), "--source", str(source), "--output", str(out),
                     "--no-progress"]) == 0
        return _sources_of(out)

    first, second = apply("one"), apply("two")
    assert first and {f["sha256_from"] for f in first} == {"read"}
    assert {f["sha256_from"] for f in second} == {"cache"}
    for f in second:
        assert f["sha256"] == hashlib.sha256((source / f["name"]).read_bytes()).hexdigest()
    assert [f["sha256"] for f in first] == [f["sha256"] for f in second]
    # the two outputs differ only by where the source hashes came from
    assert (json.loads((tmp_path / "one" / "tensorsurgery.json").read_text())["tensors"]
            == json.loads((tmp_path / "two" / "tensorsurgery.json").read_text())["tensors"])

    monkeypatch.setenv(CACHE_ENV, "off")
    assert {f["sha256_from"] for f in apply("three")} == {"read"}

    # a source shard rewritten (another mtime) is hashed again, the others come from the cache
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    changed = sorted(source.glob("*.safetensors"))[0]
    os.utime(changed, (PAST + 5, PAST + 5))
    origins = {f["name"]: f["sha256_from"] for f in apply("four")}
    assert origins.pop(changed.name) == "read"
    assert set(origins.values()) == {"cache"}

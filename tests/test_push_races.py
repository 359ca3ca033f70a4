"""Push uploads what verify read (:mod:`tensorsurgery.publish.push_files`): a file swapped between verify
and the upload, for a link (even to the same bytes), another file, a FIFO, or rewritten in place,
is refused in one line and nothing is uploaded. The swaps are made at the one point between them:
``push_folder``, which :func:`tensorsurgery.api.push` calls once verify passed."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import huggingface_hub
import pytest
from test_push import RecordingApi, write_manifest

import tensorsurgery as ts
import tensorsurgery.publish.push_files
import tensorsurgery.publish.upload
from tensorsurgery.cli import main
from tensorsurgery.errors import WriteError
from tensorsurgery.publish.upload import push_folder


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_mistral) -> Path:
    tmp = tmp_path_factory.mktemp("push-races")
    assert main(["apply", str(write_manifest(tmp, tiny_mistral)), "--no-progress"]) == 0
    return tmp / "out"


@pytest.fixture
def output(tmp_path, finished) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "out"))


def first_shard(output: Path) -> Path:
    return sorted(output.glob("model*.safetensors"))[0]


def after_verify(monkeypatch, change):
    """Make ``change(folder)`` happen once verify passed, just before push_folder opens anything."""
    original = tensorsurgery.publish.upload.push_folder

    def push_folder_after(folder, *args, **kwargs):
        change(Path(folder))
        return original(folder, *args, **kwargs)
    monkeypatch.setattr(tensorsurgery.publish.upload, "push_folder", push_folder_after)


def refused(output: Path, api: RecordingApi) -> str:
    """Push ``output`` expecting a refusal: its message, one line, with nothing sent."""
    with pytest.raises(WriteError) as e:
        ts.push(output, "me/x", api=api)
    assert "\n" not in str(e.value)
    assert api.calls == []
    return str(e.value)


def test_the_bytes_uploaded_are_the_verified_bytes_read_from_the_checked_descriptors(output):
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    api = RecordingApi()
    ts.push(output, "me/x", api=api)
    uploaded = api.uploaded()
    assert sorted(uploaded) == sorted(before)
    assert all(uploaded[name] == data for name, data in before.items() if name != "tensorsurgery.json")
    # Every file but the record (made in memory) went to huggingface_hub as its open descriptor,
    # never as its name in the folder.
    sources = {op.path_in_repo: op.path_or_fileobj for op in api.calls[-1][1]["operations"]}
    assert all(isinstance(s, str) and s.startswith(("/proc/self/fd/", "/dev/fd/"))
               for name, s in sources.items() if name != "tensorsurgery.json")


def test_without_a_descriptor_path_file_objects_are_uploaded(output, monkeypatch):
    monkeypatch.setattr(tensorsurgery.publish.push_files, "descriptor_path", lambda fd: None)
    api = RecordingApi()
    ts.push(output, "me/x", api=api)
    sources = [op.path_or_fileobj for op in api.calls[-1][1]["operations"] if op.path_in_repo != "tensorsurgery.json"]
    assert sources and not any(isinstance(s, (str, bytes)) for s in sources)
    assert all(data == (output / name).read_bytes() for name, data in api.uploaded().items()
               if name != "tensorsurgery.json")


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_a_shard_swapped_for_a_link_to_the_same_bytes_is_not_pushed(output, tmp_path, monkeypatch, target):
    shard = first_shard(output)
    copy = (tmp_path if target == "outside" else output) / "copy.bin"

    def swap(folder):
        shutil.copyfile(shard, copy)
        shard.unlink()
        shard.symlink_to(copy)
    after_verify(monkeypatch, swap)
    assert refused(output, RecordingApi()) == (
        f"{shard}: is a symbolic link (to {copy}), not a regular file; replace it with the real file; nothing was "
        f"pushed to me/x; run `tensorsurgery push {output} me/x` again")


def test_a_shard_rewritten_in_place_with_the_same_size_is_not_pushed(output, monkeypatch):
    shard = first_shard(output)

    def rewrite(folder):
        with open(shard, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
    after_verify(monkeypatch, rewrite)
    assert refused(output, RecordingApi()) == (
        f"{shard}: changed since it was verified (modified since); nothing was pushed to me/x; run "
        f"`tensorsurgery push {output} me/x` again")


def test_a_rewrite_that_sets_the_modification_time_back_is_seen_by_the_change_time(output, monkeypatch):
    shard = first_shard(output)

    def rewrite(folder):
        st = shard.stat()
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    after_verify(monkeypatch, rewrite)
    assert refused(output, RecordingApi()).startswith(
        f"{shard}: changed since it was verified (its inode changed since: renamed, linked or its permissions "
        f"changed); nothing was pushed to me/x")


def test_a_file_replaced_by_another_with_the_same_bytes_is_not_pushed(output, monkeypatch):
    config = output / "config.json"

    def replace(folder):
        other = folder.parent / "config.tmp"
        shutil.copyfile(config, other)
        os.replace(other, config)
    after_verify(monkeypatch, replace)
    assert refused(output, RecordingApi()).startswith(
        f"{config}: changed since it was verified (it is another file now); nothing was pushed to me/x")


def test_a_record_swapped_after_verify_is_not_pushed(output, monkeypatch):
    """The record says what every file must be: the one uploaded is the one verify read."""
    record = output / "tensorsurgery.json"

    def swap(folder):
        text = record.read_text()
        record.unlink()
        record.write_text(text)  # the same bytes; the filesystem may even reuse the inode number
    after_verify(monkeypatch, swap)
    message = refused(output, RecordingApi())
    assert message.startswith(f"{record}: changed since it was verified (")
    assert message.endswith(f"); nothing was pushed to me/x; run `tensorsurgery push {output} me/x` again")


def test_a_file_removed_after_verify_is_not_pushed(output, monkeypatch):
    card = output / "README.md"
    after_verify(monkeypatch, lambda folder: card.unlink())
    assert refused(output, RecordingApi()) == (
        f"{card}: is missing (removed since it was verified); nothing was pushed to me/x; run "
        f"`tensorsurgery push {output} me/x` again")


@pytest.mark.parametrize("name", ["config.json", "first shard"])
def test_a_fifo_in_place_of_a_file_is_refused_without_hanging(output, monkeypatch, name):
    path = first_shard(output) if name == "first shard" else output / name

    def swap(folder):
        path.unlink()
        os.mkfifo(path)
    after_verify(monkeypatch, swap)
    found: list[str] = []
    # A FIFO nobody writes to would block an open or a read for ever: run it aside, so that a
    # hang fails the test instead of the suite.
    worker = threading.Thread(target=lambda: found.append(refused(output, RecordingApi())), daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "push hung on a FIFO"
    assert found == [f"{path}: is a FIFO (named pipe), not a regular file; replace it with the real file; nothing "
                     f"was pushed to me/x; run `tensorsurgery push {output} me/x` again"]


def test_a_change_while_the_files_are_checked_is_not_pushed(output, monkeypatch):
    """A shard written to after push opened it (here: while the copied files are searched for
    local paths, the last check) is refused too: the descriptors are checked again last."""
    shard = first_shard(output)
    original = tensorsurgery.publish.upload.find_local_path

    def find_then_write(*args, **kwargs):
        with open(shard, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            f.write(b"\x00")
        return original(*args, **kwargs)
    monkeypatch.setattr(tensorsurgery.publish.upload, "find_local_path", find_then_write)
    assert refused(output, RecordingApi()).startswith(
        f"{shard}: changed while it was checked for the upload (modified since); nothing was pushed to me/x")


def test_the_cli_refuses_in_one_line_with_exit_2(output, monkeypatch, capsys):
    made: list[RecordingApi] = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: made.append(RecordingApi()) or made[-1])
    shard = first_shard(output)

    def swap(folder):
        target = folder.parent / "elsewhere.safetensors"
        shutil.copyfile(shard, target)
        shard.unlink()
        shard.symlink_to(target)
    after_verify(monkeypatch, swap)
    capsys.readouterr()
    assert main(["push", str(output), "me/x"]) == 2
    assert capsys.readouterr().err == (
        f"tensorsurgery: error: {shard}: is a symbolic link (to {output.parent / 'elsewhere.safetensors'}), not a "
        f"regular file; replace it with the real file; nothing was pushed to me/x; run "
        f"`tensorsurgery push {output} me/x` again\n")
    assert all(api.calls == [] for api in made)


def test_apply_push_to_hub_refuses_a_shard_swapped_after_its_verify(tmp_path, tiny_mistral, monkeypatch, capsys):
    made: list[RecordingApi] = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: made.append(RecordingApi()) or made[-1])
    after_verify(monkeypatch, lambda folder: first_shard(folder).write_bytes(first_shard(folder).read_bytes()))
    assert main(["apply", str(write_manifest(tmp_path, tiny_mistral)), "--no-progress", "--push-to-hub", "me/x"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"tensorsurgery: error: {first_shard(tmp_path / 'out')}: changed since it was verified")
    assert all(api.calls == [] for api in made)


def test_push_folder_alone_checks_what_the_record_says(output):
    """Without a verify first (no stamps), what the record says of each file is still checked on
    the descriptor uploaded: a shard's size and header bytes, another file's sha256."""
    config = output / "config.json"
    config.write_bytes(config.read_bytes() + b" ")
    api = RecordingApi()
    with pytest.raises(WriteError) as e:
        push_folder(output, "me/x", api=api)
    assert str(e.value) == (f"{config}: its sha256 is not the one tensorsurgery.json records; nothing was pushed to "
                            f"me/x; verify it (tensorsurgery verify {output})")
    assert api.calls == []


def test_push_folder_alone_checks_a_shards_header_and_size(output):
    shard = first_shard(output)
    data = bytearray(shard.read_bytes())
    data[8] = ord(" ") if data[8] != ord(" ") else ord("\t")  # the header's first byte, same size
    shard.write_bytes(bytes(data))
    api = RecordingApi()
    with pytest.raises(WriteError) as e:
        push_folder(output, "me/x", api=api)
    assert str(e.value) == (f"{shard}: its header is not the one tensorsurgery.json records; nothing was pushed to "
                            f"me/x; verify it (tensorsurgery verify {output})")
    with open(shard, "ab") as f:
        f.write(b"\0")
    with pytest.raises(WriteError) as e:
        push_folder(output, "me/x", api=api)
    assert str(e.value).startswith(f"{shard}: is {len(data) + 1:,} bytes, tensorsurgery.json says {len(data):,}; ")
    assert api.calls == []


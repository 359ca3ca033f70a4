"""``apply`` must never lose data, and must not be led astray by what a source or an output's
neighbourhood holds (issue 9). Every refusal is one line, exit 2, and every folder involved is
the same before and after (snapshots that see links and FIFOs without opening them).

* ``--force`` replaces only an earlier tensorsurgery output or an empty folder; ``.``, ``""`` and
  ``..`` as the output are refused (run from a folder holding a manifest and a file of the user's);
* whatever sits at the temporary folder's name (a link to a source, a folder of someone else's,
  a file) is refused, never deleted or followed, with or without ``--resume``;
* a source's files that are links out of its folder, FIFOs, ``/dev/zero`` or oversized JSON are
  refused by ``plan``, ``apply`` and ``inspect`` before anything is written, without hanging;
* a dry run writes nothing and refuses nothing; an output under /proc is "not writable"; the
  ``--resume`` hint only when a shard was finished; the summaries say which bytes they count;
  ``plan --link`` says which shards would be linked.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import (
    child_env,
    child_error,
    error_line,
    replace_with,
    run,
    run_child,
    shard_names,
    snapshot,
    write_manifest,
)

RECORD = "tensorsurgery.json"
INDEX = "model.safetensors.index.json"


@pytest.fixture
def src(tmp_path, tiny_mistral) -> Path:
    """A copy of the fixture checkpoint to break."""
    return shutil.copytree(tiny_mistral, tmp_path / "src")


def refused(capsys, folder: Path, *argv: object) -> str:
    """Run ``tensorsurgery ARGV``; check it is refused with one line and that nothing under
    ``folder`` changed. Returns the message."""
    before = snapshot(folder)
    message = error_line(*run(capsys, *argv))
    assert snapshot(folder) == before
    return message


# --------------------------------------------------------------------------- the output path

@pytest.fixture
def work(tmp_path) -> Path:
    """A user's folder: the current folder of the run, holding a manifest and a file of theirs."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "thesis.tex").write_text("three years of work\n")
    return folder


@pytest.mark.parametrize("path, option, message", [
    (".", None, "{work}: is the current folder or holds it; give the output a folder of its own (for example "
                "out/NAME)"),
    ("./", None, "{work}: is the current folder or holds it; give the output a folder of its own (for example "
                 "out/NAME)"),
    ("..", None, "{parent}: is the current folder or holds it; give the output a folder of its own (for example "
                 "out/NAME)"),
    ("", None, "m.toml: output.path: is empty; give the folder to write the output to"),
    (" ", None, "m.toml: output.path: is empty; give the folder to write the output to"),
    ("out/x", ".", "{work}: is the current folder or holds it; give the output a folder of its own (for example "
                   "out/NAME)"),
    ("out/x", "", "--output is empty; give the folder to write the output to"),
])
def test_output_that_is_the_current_folder(capsys, monkeypatch, tiny_mistral, work, path, option, message):
    write_manifest(work, tiny_mistral, path)
    monkeypatch.chdir(work)
    argv = ["apply", "m.toml", "--force"] + (["--output", option] if option is not None else [])
    got = refused(capsys, work.parent, *argv)
    assert got == message.format(work=work, parent=work.parent)


def test_output_dot_in_a_child_process(tiny_mistral, work):
    """The issue's report as it happened: `apply --force` with `path = "."`, from the user's folder."""
    write_manifest(work, tiny_mistral, ".")
    before = snapshot(work.parent)
    proc = run_child("apply", "m.toml", "--force", cwd=work)
    assert child_error(proc) == (f"{work}: is the current folder or holds it; give the output a folder of its "
                                 f"own (for example out/NAME)")
    assert snapshot(work.parent) == before


def test_force_refuses_a_folder_that_is_not_an_output(capsys, tiny_mistral, tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    manifest = write_manifest(tmp_path, tiny_mistral, target)
    assert refused(capsys, tmp_path, "apply", manifest, "--force") == (
        f"{target}: exists and is not a tensorsurgery output (no {RECORD}); --force replaces only an earlier output "
        f"or an empty folder; remove it yourself or choose another --output")


def test_force_refuses_a_folder_whose_record_is_a_link(capsys, tiny_mistral, tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    (tmp_path / "old.json").write_text("{}")
    (target / RECORD).symlink_to(tmp_path / "old.json")
    manifest = write_manifest(tmp_path, tiny_mistral, target)
    assert refused(capsys, tmp_path, "apply", manifest, "--force").startswith(
        f"{target}: exists and is not a tensorsurgery output (no {RECORD}); ")


@pytest.mark.parametrize("what", ["file", "link"])
def test_force_refuses_what_is_not_a_folder(capsys, tiny_mistral, tmp_path, what):
    target = tmp_path / "target"
    if what == "file":
        target.write_text("a file of mine\n")
        described = "a regular file"
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "keep.txt").write_text("mine")
        target.symlink_to(tmp_path / "elsewhere")
        described = f"a symbolic link (to {tmp_path / 'elsewhere'})"
    manifest = write_manifest(tmp_path, tiny_mistral, target)
    assert refused(capsys, tmp_path, "apply", manifest, "--force") == (
        f"{target}: exists and is {described}, not a folder; --force replaces only an earlier tensorsurgery output; "
        f"remove it yourself or choose another --output")


def test_without_force_an_existing_output_is_kept(capsys, tiny_mistral, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "x").write_text("x")
    manifest = write_manifest(tmp_path, tiny_mistral, target)
    assert refused(capsys, tmp_path, "apply", manifest) == (
        f"{target}: already exists; pass --force to replace it, or choose another --output")


def test_force_replaces_an_earlier_output_and_an_empty_folder(capsys, tiny_mistral, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    manifest = write_manifest(tmp_path, tiny_mistral, target)
    code, out, err = run(capsys, "apply", manifest, "--force")
    assert (code, err) == (0, "")
    first = (target / RECORD).stat().st_ino
    code, out, err = run(capsys, "apply", manifest, "--force")
    assert (code, err) == (0, "")
    assert (target / RECORD).stat().st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.toml", "out"]  # nothing left beside it
    assert run(capsys, "verify", manifest)[0] == 0


def test_force_keeps_a_folder_at_the_name_it_moves_the_old_output_to(capsys, tiny_mistral, tmp_path):
    """--force moves the earlier output aside before deleting it: under a name of its own, never
    over (or by deleting) what someone keeps at `.out.tensorsurgery-old`."""
    target = tmp_path / "out"
    manifest = write_manifest(tmp_path, tiny_mistral, target)
    assert run(capsys, "apply", manifest)[0] == 0
    kept = tmp_path / ".out.tensorsurgery-old"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    before = snapshot(kept)
    code, _, err = run(capsys, "apply", manifest, "--force")
    assert (code, err) == (0, "")
    assert snapshot(kept) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tensorsurgery-old", "m.toml", "out"]


# --------------------------------------------------------------------------- the temporary folder's name

def _tmp(target: Path) -> Path:
    return target.parent / f".{target.name}.tensorsurgery-tmp"


@pytest.mark.parametrize("flags", [["--resume"], [], ["--force"]], ids=["resume", "plain", "force"])
def test_link_at_the_temporary_name_to_the_source(capsys, src, tmp_path, flags):
    """The issue's attack: a link at `.out.tensorsurgery-tmp` to the source; --resume deleted its files."""
    target = tmp_path / "out"
    _tmp(target).symlink_to(src)
    manifest = write_manifest(tmp_path, src, target)
    message = refused(capsys, tmp_path, "apply", manifest, *flags)
    assert message == (f"{_tmp(target)}: is a symbolic link (to {src}), at the name of tensorsurgery's temporary "
                       f"folder; remove it yourself, then run the same command again")


@pytest.mark.parametrize("flags", [["--resume"], []], ids=["resume", "plain"])
def test_folder_of_someone_else_at_the_temporary_name(capsys, tiny_mistral, tmp_path, flags):
    target = tmp_path / "out"
    _tmp(target).mkdir()
    (_tmp(target) / "model-00001-of-00003.safetensors").write_bytes(b"not ours")
    (_tmp(target) / "notes.txt").write_text("mine")
    manifest = write_manifest(tmp_path, tiny_mistral, target)
    assert refused(capsys, tmp_path, "apply", manifest, *flags) == (
        f"{_tmp(target)}: is a folder tensorsurgery did not make, at the name of tensorsurgery's temporary folder; "
        f"remove it yourself, then run the same command again")


def test_marker_that_is_a_link_is_not_ours(capsys, tiny_mistral, tmp_path):
    target = tmp_path / "out"
    _tmp(target).mkdir()
    (_tmp(target) / "notes.txt").write_text("mine")
    (tmp_path / "marker").write_text("")
    (_tmp(target) / ".tensorsurgery-partial").symlink_to(tmp_path / "marker")
    manifest = write_manifest(tmp_path, tiny_mistral, target)
    assert refused(capsys, tmp_path, "apply", manifest, "--resume").startswith(
        f"{_tmp(target)}: is a folder tensorsurgery did not make, ")


def test_file_at_the_temporary_name(capsys, tiny_mistral, tmp_path):
    target = tmp_path / "out"
    _tmp(target).write_text("mine")
    manifest = write_manifest(tmp_path, tiny_mistral, target)
    assert refused(capsys, tmp_path, "apply", manifest, "--resume") == (
        f"{_tmp(target)}: is a regular file, at the name of tensorsurgery's temporary folder; remove it yourself, "
        f"then run the same command again")


# --------------------------------------------------------------------------- hostile sources

#: What each command is given: the manifest (plan, apply) or the source folder (inspect).
COMMANDS = ["plan", "apply", "inspect"]


def _argv(command: str, tmp_path: Path, src: Path) -> list[object]:
    if command == "inspect":
        return ["inspect", src]
    manifest = write_manifest(tmp_path, src, tmp_path / "out")
    return [command, manifest] + (["--no-progress"] if command == "apply" else [])


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("target", ["etc-passwd", "outside-copy", "relative-outside"])
def test_copied_file_linking_out_of_the_source(capsys, src, tmp_path, command, target):
    """tokenizer.json -> /etc/passwd would be copied into the output and pushed to the Hub."""
    link = src / "tokenizer.json"
    if target == "etc-passwd":
        link.unlink()
        link.symlink_to("/etc/passwd")
        real = "/etc/passwd"
    else:
        replace_with(link, "outside", outside=tmp_path / "elsewhere")
        real = str(tmp_path / "elsewhere" / "tokenizer.json")
        if target == "relative-outside":
            link.unlink()
            link.symlink_to("../elsewhere/tokenizer.json")
    message = refused(capsys, tmp_path, *_argv(command, tmp_path, src))
    assert message == (f"{link}: is a link to {real}, outside {src}; a checkpoint's files must be inside its folder "
                       f"(copy the file in instead of linking it)")
    assert not (tmp_path / "out").exists()


def test_links_inside_the_source_are_fine(capsys, src, tmp_path):
    """A link that stays in the folder is read through; the output holds a regular file."""
    (src / "sub").mkdir()
    (src / "tokenizer.json").rename(src / "sub" / "tokenizer.json")
    (src / "tokenizer.json").symlink_to("sub/tokenizer.json")
    via = tmp_path / "via"
    via.symlink_to(src)  # the source folder given through a link
    manifest = write_manifest(tmp_path, via, tmp_path / "out")
    code, _, err = run(capsys, "apply", manifest, "--no-progress")
    assert (code, err) == (0, "")
    out = tmp_path / "out" / "tokenizer.json"
    assert not out.is_symlink() and out.read_bytes() == (src / "sub" / "tokenizer.json").read_bytes()
    assert run(capsys, "verify", manifest)[0] == 0
    assert run(capsys, "verify", tmp_path / "out")[0] == 0


def _special(src: Path, name: str, what: str) -> str:
    """Make ``src/name`` a FIFO, a link to /dev/zero or a folder; the message apply must give."""
    path = src / (shard_names(src)[1] if name == "shard" else name)
    replace_with(path, {"fifo": "fifo", "dev-zero": "dev-zero", "folder": "folder"}[what])
    if what == "fifo":
        return f"{path}: is a FIFO (named pipe), not a regular file; replace it with the real file"
    if what == "dev-zero":
        return (f"{path}: is a link to /dev/zero, outside {src}; a checkpoint's files must be inside its folder "
                f"(copy the file in instead of linking it)")
    if name == "config.json":
        return f"{src}: has hf weights but no config.json; a checkpoint needs it next to its weights"
    if name == INDEX:
        return (f"{src}: no model.safetensors, {INDEX} or consolidated.safetensors; only safetensors checkpoints are "
                f"supported")
    return f"{path}: is a folder, not a regular file; replace it with the real file"


#: (file, what it becomes). A folder at a copied file's name is not a file to copy: it is left
#: out like any other sub-folder.
SPECIAL = [(name, what) for name in ("config.json", INDEX, "shard", "tokenizer.json", "generation_config.json")
           for what in ("fifo", "dev-zero", "folder") if what != "folder" or name in ("config.json", INDEX, "shard")]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name, what", SPECIAL)
def test_special_files_in_the_source(capsys, src, tmp_path, command, name, what):
    """FIFOs made plan, apply and inspect hang; /dev/zero was read whole. Each is now one line, at once."""
    expected = _special(src, name, what)
    assert refused(capsys, tmp_path, *_argv(command, tmp_path, src)) == expected
    assert not (tmp_path / "out").exists()


def test_character_device_in_the_source(capsys, src, tmp_path):
    config = src / "config.json"
    config.unlink()
    try:
        os.mknod(config, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    assert refused(capsys, tmp_path, *_argv("plan", tmp_path, src)) == (
        f"{config}: is a character device, not a regular file; replace it with the real file")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name, size, limit", [("config.json", 1_200_000_000, 16 << 20),
                                               (INDEX, 600_000_000, 512 << 20)])
def test_oversized_json_in_the_source(capsys, src, tmp_path, command, name, size, limit):
    """A 1.2 GB config.json was read whole (a MemoryError under a cap): refused from its size."""
    path = src / name
    with open(path, "r+b") as f:
        f.truncate(size)  # sparse: no disk, and nothing is read
    assert refused(capsys, tmp_path, *_argv(command, tmp_path, src)) == (
        f"{path}: is {size:,} bytes, more than the {limit:,} such a file may weigh; this is not the file a "
        f"checkpoint holds there")


def test_fifo_in_the_source_does_not_hang_a_child(src, tmp_path):
    """The same in a child process, with a hard timeout: the command must answer, not block."""
    os.unlink(src / "config.json")
    os.mkfifo(src / "config.json")
    manifest = write_manifest(tmp_path, src, tmp_path / "out")
    for argv in (["plan", manifest], ["apply", manifest], ["inspect", src]):
        assert child_error(run_child(*argv, cwd=tmp_path, timeout=30)).endswith(
            "config.json: is a FIFO (named pipe), not a regular file; replace it with the real file")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- smaller things

def test_dry_run_with_an_existing_output(capsys, tiny_mistral, tmp_path):
    target = tmp_path / "out"
    manifest = write_manifest(tmp_path, tiny_mistral, target)
    assert run(capsys, "apply", manifest, "--no-progress")[0] == 0
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "apply", manifest, "--dry-run")
    assert (code, err) == (0, "")
    assert f"note: {target} exists: apply would need --force to replace it" in out.splitlines()
    assert out.splitlines()[-1] == "dry run: nothing written"
    assert snapshot(tmp_path) == before


def test_dry_run_says_what_apply_would_refuse(capsys, tiny_mistral, tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"\xff\xd8")
    manifest = write_manifest(tmp_path, tiny_mistral, target)
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "apply", manifest, "--dry-run", "--force")
    assert (code, err) == (0, "")
    assert (f"note: apply would refuse: {target}: exists and is not a tensorsurgery output (no {RECORD}); --force "
            f"replaces only an earlier output or an empty folder; remove it yourself or choose another --output"
            ) in out.splitlines()
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_output_under_proc_is_not_writable(capsys, tiny_mistral, tmp_path):
    manifest = write_manifest(tmp_path, tiny_mistral, "/proc/tensorsurgery-test/out")
    assert refused(capsys, tmp_path, "apply", manifest, "--no-progress") == (
        "/proc: is not a writable folder (a virtual filesystem that holds no files); choose an --output where "
        "you can write")
    code, out, err = run(capsys, "apply", manifest, "--dry-run")
    assert (code, err) == (0, "")
    assert ("note: apply would refuse: /proc: is not a writable folder (a virtual filesystem that holds no files); "
            "choose an --output where you can write") in out.splitlines()


def _fsize(limit: int):
    def setup() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return setup


def test_no_resume_hint_when_no_shard_was_finished(tiny_mistral, tmp_path):
    """A write that fails in the first shard leaves nothing to resume: the hint says to run again."""
    target = tmp_path / "out"
    manifest = write_manifest(tmp_path, tiny_mistral, target)
    proc = subprocess.run([sys.executable, "-m", "tensorsurgery", "apply", str(manifest), "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, env=child_env(),
                          preexec_fn=_fsize(20_000))
    message = child_error(proc)
    assert message.endswith("then run the same command again"), message
    assert "--resume" not in message
    assert re.fullmatch(rf"{re.escape(str(_tmp(target)))}/model-00001-of-\d{{5}}\.safetensors: write failed: File "
                        rf"too large; free disk space or raise the file size limit, then run the same command again",
                        message), message
    assert not target.exists() and not _tmp(target).exists()


def test_summaries_say_which_bytes_they_count(capsys, tiny_mistral, tmp_path):
    manifest = write_manifest(tmp_path, tiny_mistral, tmp_path / "out")
    code, out, err = run(capsys, "apply", manifest, "--no-progress")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert re.fullmatch(r"  48 layers, 435 tensors \([\d.]+ kB of tensor data\) in \d+ shard\(s\)", lines[1]), lines
    assert re.fullmatch(r"  [\d.]+ kB of shard files written in [\d.]+ s \([\d.]+ [kMG]?B/s\)", lines[2]), lines
    code, out, err = run(capsys, "verify", manifest)
    assert (code, err) == (0, "")
    assert re.fullmatch(r"verified .*: \d+ files, 435 tensors \([\d.]+ kB of tensor data\); every byte matches the "
                        r"manifest applied to the sources\n", out), out


def test_plan_link_names_the_linked_shards(capsys, tiny_mistral, tmp_path):
    manifest = tmp_path / "keep.toml"
    manifest.write_text(f'[source]\nmodel = "{tiny_mistral}"\n[rename]\npreset = "mistral-to-llama"\n'
                        f'[output]\npath = "{tmp_path / "out"}"\n')
    code, out, err = run(capsys, "plan", manifest, "--link")
    assert (code, err) == (0, "")
    names = shard_names(tiny_mistral)
    for name in names:
        assert re.search(rf"^  {name} +[\d.]+ kB +\d+ tensors  linked to {tiny_mistral / name} \(not written\)$", out,
                         re.M), out
    assert re.search(r"disk needed: 0 B \([\d.]+ kB of linked shards take no space\)", out), out
    code, out, err = run(capsys, "plan", manifest)
    assert "linked" not in out and "disk needed: 0 B" not in out


@pytest.mark.parametrize("what", ["fifo", "dev-zero"])
def test_inspect_of_a_special_file(capsys, tmp_path, what):
    path = tmp_path / "model.safetensors"
    if what == "fifo":
        os.mkfifo(path)
        expected = f"{path}: is a FIFO (named pipe), not a regular file; replace it with the real file"
    else:
        path = Path("/dev/zero")
        expected = "/dev/zero: is a character device, not a regular file; replace it with the real file"
    assert error_line(*run(capsys, "inspect", path)) == expected


def test_a_large_model_card_in_the_source(capsys, src, tmp_path):
    """Only the card's front matter is used (its licence): a card with embedded images, megabytes
    long, is read no further than needed and is no reason to refuse the checkpoint."""
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Model\n\n![chart](data:image/png;base64,"
                                   + "A" * (6 << 20) + ")\n")
    manifest = write_manifest(tmp_path, src, tmp_path / "out")
    code, _, err = run(capsys, "apply", manifest, "--no-progress")
    assert (code, err) == (0, "")
    assert "\nlicense: apache-2.0\n" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("link", [False, True])
def test_a_minus_zero_offset_is_refused_before_it_can_become_a_linked_shard(capsys, tmp_path, src, link):
    """The official reader refuses ``-0`` as an offset (serde_json reads it as a float). With
    ``--link`` such a source file would become an output shard as is, one transformers cannot
    open: it is refused with one line, with and without ``--link``, and nothing is written."""
    shard = sorted(src.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[-0,', 1)
    assert len(header) == n + 1
    shard.write_bytes((n + 1).to_bytes(8, "little") + header + data[8 + n:])
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, src, out, layers='plan = "keep"')
    message = refused(capsys, tmp_path, "apply", manifest, *(["--link"] if link else []))
    assert re.fullmatch(rf"{re.escape(str(shard))}: tensor '[a-z_.0-9]+': data_offsets must be \[start, end\] with "
                        rf"0 <= start <= end, found \[-0\.0, [0-9]+\]", message), message
    assert not out.exists()

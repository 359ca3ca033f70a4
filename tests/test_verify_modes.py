"""``verify`` must not pass what it did not check (issue 9), in each of its three modes:

* ``manifest``: ``verify MANIFEST OUTPUT --source SRC`` (re-derived from the sources);
* ``record+sources``: ``verify OUTPUT`` while the sources the record names are still there;
* ``record``: ``verify OUTPUT`` with the sources gone (the record's hashes alone).

A shard or any other file that is missing, a link (dangling, to ``/dev/zero``, out of the folder),
a folder or a FIFO is a difference (exit 1, one line naming the file), never a pass and never a
hang; every file of the output is checked (tokenizer files, generation config, card), files that
should not be there are reported, shard headers are checked byte for byte in every mode, and
JSON values are compared with their types (48 is not 48.0, false is not 0).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from cli_helpers import differences, error_line, replace_with, run, shard_names, write_manifest

MODES = ["manifest", "record+sources", "record"]
INDEX = "model.safetensors.index.json"
RECORD = "tensorsurgery.json"
#: What the verdict line says for a clean output in each mode.
VERDICT = {"manifest": "every byte matches the manifest applied to the sources",
           "record+sources": "every byte matches the recorded manifest applied to the sources",
           "record": "sources not found"}


class Built:
    """One clean multi-shard output with its source kept (manifest and record+sources modes) and
    one whose source was deleted after apply (record mode). Read-only: tests damage copies."""

    def __init__(self, base: Path, tiny_mistral: Path):
        self.src = shutil.copytree(tiny_mistral, base / "src")
        self.manifest = write_manifest(base, self.src, base / "live")
        assert _apply(self.manifest) == 0
        gone = shutil.copytree(tiny_mistral, base / "gone")
        assert _apply(write_manifest(base, gone, base / "orphan", name="orphan.toml")) == 0
        shutil.rmtree(gone)
        self.live, self.orphan = base / "live", base / "orphan"
        assert len(shard_names(self.live)) >= 3


def _apply(manifest: Path) -> int:
    from tensorsurgery.cli import main
    return main(["apply", str(manifest), "--no-progress"])


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_mistral) -> Built:
    return Built(tmp_path_factory.mktemp("trust-verify"), tiny_mistral)


class Case:
    """A fresh copy of the output for one mode; :meth:`verify` runs the CLI in that mode."""

    def __init__(self, built: Built, mode: str, tmp_path: Path):
        self.built, self.mode = built, mode
        self.out = shutil.copytree(built.orphan if mode == "record" else built.live, tmp_path / "out",
                                   symlinks=True)
        self.tmp = tmp_path

    def verify(self, capsys) -> tuple[int, str, str]:
        if self.mode == "manifest":
            return run(capsys, "verify", self.built.manifest, self.out, "--source", self.built.src)
        return run(capsys, "verify", self.out)

    def shard(self) -> str:
        return shard_names(self.out)[1]


@pytest.fixture(params=MODES)
def case(request, built, tmp_path) -> Case:
    return Case(built, request.param, tmp_path)


def test_clean_output_verifies(case, capsys):
    code, out, err = case.verify(capsys)
    assert (code, err) == (0, "")
    assert out.startswith(f"verified {case.out}: ") and VERDICT[case.mode] in out


# --------------------------------------------------------------------------- not a regular file

WHAT = {"dangling": "is a symbolic link (to {out}/no-such-file), expected a regular file",
        "dev-zero": "is a symbolic link (to /dev/zero), expected a regular file",
        "outside": "is a symbolic link (to {tmp}/elsewhere/{name}), expected a regular file",
        "folder": "is a folder, expected a regular file",
        "fifo": "is a FIFO (named pipe), expected a regular file",
        "missing": "is missing"}


@pytest.mark.parametrize("what", list(WHAT))
def test_shard_that_is_not_a_regular_file(case, capsys, what):
    """A shard replaced by a dangling link, /dev/zero, a link out of the folder (to the very same
    bytes), a folder, a FIFO or nothing: one difference naming it, whatever the mode."""
    name = case.shard()
    replace_with(case.out / name, what, outside=case.tmp / "elsewhere")
    lines = differences(*case.verify(capsys))
    assert lines == [f"{name}: " + WHAT[what].format(out=case.out, tmp=case.tmp, name=name)]


@pytest.mark.parametrize("what", ["fifo", "dev-zero", "outside", "dangling"])
@pytest.mark.parametrize("name", ["config.json", INDEX, "tokenizer.json", "generation_config.json", "README.md"])
def test_other_file_that_is_not_a_regular_file(case, capsys, name, what):
    replace_with(case.out / name, what, outside=case.tmp / "elsewhere")
    lines = differences(*case.verify(capsys))
    assert lines == [f"{name}: " + WHAT[what].format(out=case.out, tmp=case.tmp, name=name)]


@pytest.mark.parametrize("what", ["fifo", "outside", "dev-zero", "missing"])
def test_record_that_is_not_a_regular_file(case, capsys, what):
    """Against the manifest the record is one more file to check (a difference); in record mode
    it is what the output is checked against, so the output cannot be verified (exit 2)."""
    replace_with(case.out / RECORD, what, outside=case.tmp / "elsewhere")
    result = case.verify(capsys)
    if case.mode == "manifest":
        assert differences(*result) == [f"{RECORD}: " + WHAT[what].format(out=case.out, tmp=case.tmp, name=RECORD)]
        return
    message = error_line(*result)
    path = case.out / RECORD
    if what == "missing":
        assert message == (f"{path}: missing; this folder was not written by tensorsurgery, give the manifest: "
                           f"tensorsurgery verify MANIFEST {case.out}")
    else:
        assert message == (f"{path}: " + WHAT[what].format(out=case.out, tmp=case.tmp, name=RECORD)
                           + "; cannot verify against it: verify with the manifest instead")


# --------------------------------------------------------------------------- every file checked

def test_edited_tokenizer_and_generation_files(case, capsys):
    """Tokenizer, chat template and sampling settings are what a user gets: each edit is caught."""
    out = case.out
    tok = json.loads((out / "tokenizer.json").read_text())
    tok["model"]["vocab"]["<evil>"] = len(tok["model"]["vocab"])
    (out / "tokenizer.json").write_text(json.dumps(tok))
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{{ 'ignore previous instructions' }}"
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    gen = json.loads((out / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=1.7)
    (out / "generation_config.json").write_text(json.dumps(gen))
    lines = differences(*case.verify(capsys))
    assert [line.split(":")[0] for line in lines] == ["generation_config.json", "tokenizer.json",
                                                      "tokenizer_config.json"]
    for line in lines:
        if case.mode == "record":
            assert line.endswith(": differs from what tensorsurgery wrote (sha256 in tensorsurgery.json)"), line
        else:
            assert ": differs from its source file " in line and str(case.built.src) in line, line


def test_same_size_edit_of_a_copied_file(case, capsys):
    path = case.out / "special_tokens_map.json"
    data = bytearray(path.read_bytes())
    i = data.index(b"<")
    data[i + 1] ^= 0x20  # <unk> -> <Unk>: same size, one byte
    path.write_bytes(bytes(data))
    lines = differences(*case.verify(capsys))
    assert len(lines) == 1 and lines[0].startswith("special_tokens_map.json: "), lines
    if case.mode != "record":
        assert f"from byte {i + 1} on" in lines[0]


#: Files a loader (transformers, peft, vLLM) would pick up from the folder.
STRAYS = ["pytorch_model.bin", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
          "model-00099-of-00099.safetensors", "model.safetensors"]


def test_files_that_should_not_be_there(case, capsys):
    for name in STRAYS:
        (case.out / name).write_bytes(b"{}")
    (case.out / "extra").mkdir()
    (case.out / "notes.txt").symlink_to("/etc/hostname")
    lines = differences(*case.verify(capsys))
    assert sorted(lines) == sorted([f"{n}: unexpected file (not part of this output; remove it)" for n in STRAYS]
                                   + ["extra: unexpected folder (not part of this output; remove it)",
                                      "notes.txt: unexpected symbolic link (not part of this output; remove it)"])


# --------------------------------------------------------------------------- shard headers

def _read(path: Path) -> tuple[dict, int, bytes]:
    """A shard's header JSON, its header length and its data."""
    content = path.read_bytes()
    (n,) = struct.unpack("<Q", content[:8])
    return json.loads(content[8:8 + n]), n, content[8 + n:]


def _rewrite(path: Path, text: str, n: int | None = None, data: bytes | None = None) -> None:
    """Write header ``text`` padded with spaces to ``n`` bytes (default: its own length)."""
    _, old_n, old_data = _read(path)
    raw = text.encode()
    raw += b" " * ((n if n is not None else len(raw)) - len(raw))
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + (old_data if data is None else data))


def format_np(path: Path) -> None:
    header, n, _ = _read(path)
    header["__metadata__"] = {"format": "np"}
    _rewrite(path, json.dumps(header, separators=(",", ":")), n)


def reordered(path: Path) -> None:
    header, n, _ = _read(path)
    _rewrite(path, json.dumps(dict(reversed(list(header.items()))), separators=(",", ":")), n)


def padding(path: Path) -> None:
    content = path.read_bytes()
    (n,) = struct.unpack("<Q", content[:8])
    text = content[8:8 + n].decode()
    assert text.endswith(" ")
    # The same JSON, its last padding space a newline: same size, still valid JSON.
    _rewrite(path, text[:-1] + "\n", n)


def padded_shard(out: Path) -> str:
    """A shard whose header has padding (so an edit of the padding keeps its size)."""
    for name in shard_names(out):
        with open(out / name, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if f.read(n).endswith(b" "):
                return name
    raise AssertionError("no shard header has padding")


def metadata_added(path: Path) -> None:
    header, n, _ = _read(path)
    header["__metadata__"] = {"format": "pt", "note": "hello"}
    text = json.dumps(header, separators=(",", ":"))
    _rewrite(path, text, len(text) + (-len(text)) % 8)


#: edit -> (the line against the plan, the line against the record)
HEADER_EDITS = {
    format_np: ("header metadata is {'format': 'np'}, expected {'format': 'pt'}",
                "header bytes differ from what tensorsurgery wrote (sha256 in tensorsurgery.json): metadata, "
                "order or padding changed"),
    reordered: ("header bytes differ from the planned ones (order, spacing or padding)",
                "header bytes differ from what tensorsurgery wrote (sha256 in tensorsurgery.json): metadata, "
                "order or padding changed"),
    padding: ("header bytes differ from the planned ones (order, spacing or padding)",
              "header bytes differ from what tensorsurgery wrote (sha256 in tensorsurgery.json): metadata, "
              "order or padding changed"),
    metadata_added: ("header metadata is {'format': 'pt', 'note': 'hello'}, expected {'format': 'pt'}",
                     "header bytes differ from what tensorsurgery wrote (sha256 in tensorsurgery.json): metadata, "
                     "order or padding changed"),
}


@pytest.mark.parametrize("edit", list(HEADER_EDITS), ids=lambda f: f.__name__)
def test_shard_header_edits(case, capsys, edit):
    """Every tensor's bytes stay where they were; only the header changes, and is caught in every mode."""
    name = padded_shard(case.out)
    edit(case.out / name)
    lines = differences(*case.verify(capsys))
    against_plan, against_record = HEADER_EDITS[edit]
    assert lines == [f"{name}: {against_record if case.mode == 'record' else against_plan}"]


# --------------------------------------------------------------------------- JSON types

def test_config_values_compared_with_their_types(case, capsys):
    path = case.out / "config.json"
    config = json.loads(path.read_text())
    assert config["num_hidden_layers"] == 48 and config["tie_word_embeddings"] is False
    assert config["use_cache"] is True
    config.update(num_hidden_layers=48.0, tie_word_embeddings=0, use_cache=1)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    lines = differences(*case.verify(capsys))
    # Whatever the mode, what transformers would refuse in them is named too.
    types = ["config.json: num_hidden_layers = 48.0 is not an integer",
             "config.json: tie_word_embeddings = 0 is not a boolean (true or false)",
             "config.json: use_cache = 1 is not a boolean (true or false)"]
    if case.mode == "record":
        assert lines == ["config.json: differs from what tensorsurgery wrote (sha256 in tensorsurgery.json)", *types]
    else:
        assert lines == ["config.json: num_hidden_layers is 48.0, expected 48",
                         "config.json: tie_word_embeddings is 0, expected false",
                         "config.json: use_cache is 1, expected true", *types]


def test_index_total_size_as_a_float(case, capsys):
    path = case.out / INDEX
    index = json.loads(path.read_text())
    total = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = float(total)
    path.write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    lines = differences(*case.verify(capsys))
    if case.mode == "record":
        assert lines == [f"{INDEX}: differs from what tensorsurgery wrote (sha256 in tensorsurgery.json)"]
    else:
        assert lines == [f"{INDEX}: metadata.total_size is {float(total)}, expected {total}"]


def test_same_values_other_formatting(case, capsys):
    path = case.out / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()), separators=(",", ":")))
    lines = differences(*case.verify(capsys))
    if case.mode == "record":
        assert lines == ["config.json: differs from what tensorsurgery wrote (sha256 in tensorsurgery.json)"]
    else:
        assert lines == ["config.json: holds the expected values but not the bytes tensorsurgery writes "
                         "(formatting or key order)"]


# --------------------------------------------------------------------------- recorded sources that changed

@pytest.mark.parametrize("change", ["shard-deleted", "shard-replaced", "folder-gone"])
def test_record_mode_when_the_recorded_source_changed(capsys, tiny_mistral, tmp_path, change):
    """`verify OUTPUT` compares with the recorded sources only when they are as apply read them;
    a source shard deleted or replaced by another version leaves the record to check against
    (a deleted shard was an error, exit 2; another version would have reported every tensor)."""
    src = shutil.copytree(tiny_mistral, tmp_path / "src")
    manifest = write_manifest(tmp_path, src, tmp_path / "out")
    assert run(capsys, "apply", manifest, "--no-progress")[0] == 0
    shard = src / shard_names(src)[0]
    if change == "shard-deleted":
        shard.unlink()
    elif change == "shard-replaced":
        shard.write_bytes(shard.read_bytes() + b"\0" * 8)
    else:
        shutil.rmtree(src)
    code, out, err = run(capsys, "verify", tmp_path / "out")
    assert (code, err) == (0, "")
    why = (f"sources changed since apply: {shard.name}; checked the output against its record only"
           if change == "shard-replaced" else "sources not found, so not compared with them")
    assert out.endswith(f"every file matches the sha256 in tensorsurgery.json; {why}\n")


def _same_size_rewrite(path: Path) -> None:
    """Rewrite ``path`` in place with other bytes of the same size and its mtime set back, as
    a new revision of a fine-tune copied over the old one (``cp -p``, ``rsync --inplace -t``)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("output_changed", [False, True])
def test_a_source_rewritten_at_the_same_size_leaves_the_record_to_check(capsys, tiny_mistral, tmp_path,
                                                                        output_changed):
    """A source updated in place since apply, same size (it was compared byte for byte: every
    tensor of the untouched output was a difference, and push refused it): verify says the
    sources changed and checks the record alone, which still catches an output byte flipped."""
    src = shutil.copytree(tiny_mistral, tmp_path / "src")
    manifest = write_manifest(tmp_path, src, tmp_path / "out")
    assert run(capsys, "apply", manifest, "--no-progress")[0] == 0
    out = tmp_path / "out"
    changed = shard_names(src)[-1]
    _same_size_rewrite(src / changed)
    note = f"sources changed since apply: {changed}; checked the output against its record only"
    if output_changed:
        _flip_last_byte(out / shard_names(out)[0])
    code, text, err = run(capsys, "verify", out)
    if not output_changed:
        assert (code, err) == (0, "")
        assert text.splitlines() == [f"verified {out}: {text.split(': ', 1)[1].split(';')[0]}; every file matches "
                                     f"the sha256 in tensorsurgery.json; {note}"]
        return
    lines = text.splitlines()
    assert code == 1 and err == ""
    assert len(lines) == 3 and "sha256" in lines[0] and "differs from the record's" in lines[0]
    assert lines[1:] == [note, f"{out}: 1 difference(s); the output is NOT what its record says"]
    report = json.loads(run(capsys, "verify", out, "--json")[1])
    assert (report["mode"], report["ok"], report["sources_changed"]) == ("record", False, [changed])


def test_a_file_name_cannot_forge_a_line_of_the_report(case, capsys):
    (case.out / "x\nverified everything").write_text("")
    lines = differences(*case.verify(capsys))
    assert lines == ["'x\\nverified everything': unexpected file (not part of this output; remove it)"]

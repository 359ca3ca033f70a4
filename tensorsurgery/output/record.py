"""The provenance record ``tensorsurgery.json`` written into every output: what was built, from
what, and the sha256 of every byte, so the output can be checked later, even without its sources.

:func:`build_record` makes it from a plan and the hashes taken while writing (pure);
:func:`parse_record` reads one back into typed values, refusing a record whose entries have the
wrong types with one line; :func:`published_record` is the record push uploads, which names no
local path.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Literal, Mapping, Protocol

from tensorsurgery._version import __version__
from tensorsurgery.errors import SourceError, VerifyError
from tensorsurgery.formats.safetensors_output import SAFETENSORS
from tensorsurgery.io.fsio import INDEX_LIMIT, describe_entry, parse_json, read_json
from tensorsurgery.manifest.merges import spec_data
from tensorsurgery.manifest.path_free import folder_name, path_free_manifest
from tensorsurgery.ops.recipe import inputs_data
from tensorsurgery.output.outlock import holder
from tensorsurgery.output.record_stream import NotStreamable, iter_entries, open_record, read_head
from tensorsurgery.planning.planner import Plan
from tensorsurgery.sources.checkpoint import CONFIG_NAME, RECORD_NAME

#: Version 2 added the shards table (size and header sha256 of every shard) and the hash origins;
#: version 3 lets a source have no ``root`` (the record push uploads, :func:`published_record`).
RECORD_VERSION = 3


@dataclass(frozen=True, slots=True)
class SourceHash:
    """A source file's sha256 and where it came from: ``read`` (hashed by this run), ``hub-blob``
    (the Hugging Face cache names the blob by it) or ``cache`` (tensorsurgery's own hash cache,
    for a file whose identity (device, inode, size, mtime, ctime) has not changed)."""

    sha256: str
    origin: str


@dataclass(frozen=True, slots=True)
class RecordedShard:
    """A shard as the record describes it."""

    name: str
    size: int
    header_sha256: str


@dataclass(frozen=True, slots=True)
class RecordedTensor:
    """An output tensor as the record describes it."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str


@dataclass(frozen=True, slots=True)
class Record:
    """A parsed provenance record. ``data`` is the whole JSON object, for what is not typed here
    (the sources, the layer map)."""

    path: Path
    manifest_name: str
    manifest: str
    shards: Mapping[str, RecordedShard]
    files: Mapping[str, str]
    tensors: Mapping[str, RecordedTensor]
    link: bool
    data: Mapping[str, Any]
    #: Where the tensor entries start in the file (read with ``part="head"``), else None.
    tensors_offset: int | None = None


#: How much of a record :func:`read_record` reads.
RecordPart = Literal["whole", "typed", "head"]


def header_sha256(shard_header: bytes) -> str:
    """The sha256 of a shard's header bytes (length prefix, JSON and padding)."""
    return hashlib.sha256(shard_header).hexdigest()


def build_record(plan: Plan, tensor_hashes: Mapping[str, str], file_hashes: Mapping[str, str],
                 source_hashes: Mapping[Path, SourceHash] | None = None) -> dict[str, Any]:
    """The record of ``plan``'s output, whole (the writer streams it instead:
    :func:`record_head` and :func:`tensor_entries`, the same JSON).

    Args:
        plan: what was written.
        tensor_hashes: output tensor name -> sha256 of its bytes.
        file_hashes: every other file written but the record (config.json, the index, the card,
            copied files) -> sha256.
        source_hashes: each source weight file's path -> its hash and where it came from.
    """
    return {**record_head(plan, file_hashes, source_hashes), TENSORS: dict(tensor_entries(plan, tensor_hashes))}


#: The record's last key: one entry per output tensor, written (and compared) one at a time.
TENSORS = "tensors"


def record_head(plan: Plan, file_hashes: Mapping[str, str],
                source_hashes: Mapping[Path, SourceHash] | None = None) -> dict[str, Any]:
    """Everything in the record before its :data:`TENSORS` (small, whatever the tensor count);
    arguments as for :func:`build_record`."""
    source_hashes = source_hashes or {}
    return {
        "tool": "tensorsurgery",
        "version": __version__,
        "record_version": RECORD_VERSION,
        "manifest_name": plan.manifest_name,
        "manifest": plan.manifest_text,
        "sources": [{"name": s.name, "model": s.model, "root": str(s.root), "layout": s.layout,
                     "revision": s.revision, "repo_id": s.repo_id,
                     "files": [_source_file(s.root / f, source_hashes.get(s.root / f)) for f in s.files]}
                    for s in plan.sources],
        "layers": [{"source": r.source, "layer": r.layer} for r in plan.layers],
        # The LoRA adapters merged (each module's scaling is also its tensors' operation's).
        **({"adapters": [{"source": a.source, "path": a.path,
                          **({"repo_id": a.hub[0], "revision": a.hub[1]} if a.hub else {}),
                          "files": [{"name": n, "size": size, "sha256": h} for n, size, h in a.files],
                          "scalings": dict(a.scalings)} for a in plan.adapters]} if plan.adapters else {}),
        **({"merge": spec_data(plan.merge)} if plan.merge else {}),
        # Planned with --link: shards identical to a source file were grouped as that file.
        "link": any(s.link is not None for s in plan.shards),
        "shards": {s.filename: {"size": s.nbytes, "header_sha256": header_sha256(s.header)} for s in plan.shards},
        "files": dict(sorted(file_hashes.items())),
    }


class TensorHashes(Protocol):
    """Output tensor name -> sha256 of its bytes (a dict, or verify's view of what it checked)."""

    def __getitem__(self, name: str, /) -> str: ...


def tensor_entries(plan: Plan, tensor_hashes: TensorHashes) -> Iterator[tuple[str, dict[str, Any]]]:
    """The record's :data:`TENSORS`, one ``(name, entry)`` at a time in output order: made as they
    are written or compared, so that no 500k-entry object is ever held."""
    for shard in plan.shards:
        filename = shard.filename
        for t in shard.tensors:
            source = t.source
            yield t.name, {"shard": filename, "dtype": t.dtype, "shape": list(t.shape), "source": t.source_name,
                           "source_file": source.file.name if source else None, "source_key": t.source_key,
                           "transform": t.transform, **inputs_data(t), "sha256": tensor_hashes[t.name]}


def published_record(data: Mapping[str, Any]) -> dict[str, Any]:
    """The record ``data`` (as :func:`parse_record` accepted it) as push uploads it: no local path.
    The manifest text is path-free (:func:`~tensorsurgery.manifest.path_free.path_free_manifest`, as the
    card shows it); a source has no ``root``, and its ``model`` is its repo id (with the recorded
    ``revision``) or, for a local folder, the folder's name. Everything verify compares (shards,
    files, tensors, layers) is kept, so a pulled copy verifies against it; the local record keeps
    its paths, for ``verify OUTPUT`` against the sources on this machine.

    Raises:
        PlanError: a local path of the manifest cannot be taken out of its text.
    """
    sources = [{**{k: v for k, v in s.items() if k != "root"},
                "model": s["repo_id"] if isinstance(s.get("repo_id"), str) else folder_name(s["model"])}
               for s in data["sources"]]
    return {**data, "manifest": path_free_manifest(data["manifest"]), "sources": sources}


def _source_file(path: Path, digest: SourceHash | None) -> dict[str, Any]:
    try:
        size: int | None = path.stat().st_size
    except OSError:
        size = None
    return {"name": path.name, "size": size, "sha256": digest.sha256 if digest else None,
            "sha256_from": digest.origin if digest else None}


def require_folder(output: Path) -> Path:
    """``output`` if it is a folder.

    Raises:
        VerifyError: it is not.
    """
    output = Path(output)
    if not output.is_dir():
        pid = holder(Path(os.path.abspath(output)))
        if pid is not None:
            raise VerifyError(f"{output}: not there yet: another tensorsurgery (pid {pid}) is writing it; wait for "
                              f"it, then run verify again")
        raise VerifyError(f"{output}: output folder not found; run `tensorsurgery apply` first or give the "
                          f"output path")
    return output


def read_record(output: Path, part: RecordPart = "whole") -> Record:
    """The provenance record of the output folder ``output``: ``part`` says how much of it.

    * ``whole``: everything, ``data`` the whole JSON object;
    * ``typed``: ``data`` without the tensor entries (``data["tensors"]`` is empty) but
      ``tensors`` typed, parsed one entry at a time (:mod:`tensorsurgery.output.record_stream`): ~0.3 KB
      a tensor instead of ~2 KB while read;
    * ``head``: no tensors at all, and the file offset where their entries start
      (``tensors_offset``), for :func:`tensorsurgery.output.record_stream.same_tensors`.

    A record not laid out as the writer lays it out is read whole whatever ``part`` says (and
    ``tensors_offset`` is None then).

    Raises:
        VerifyError: missing, unreadable, or not a record this version can check (with ``head``,
            the tensor entries are not checked).
    """
    path = output / RECORD_NAME
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise VerifyError(f"{path}: missing; this folder was not written by tensorsurgery, give the "
                          f"manifest: tensorsurgery verify MANIFEST {output}") from None
    except OSError as e:
        raise VerifyError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise VerifyError(f"{path}: is {describe_entry(path, mode)}, expected a regular file; cannot verify "
                          f"against it: verify with the manifest instead")
    if part != "whole":
        streamed = _read_streamed(path, output, part)
        if streamed is not None:
            return streamed
    try:
        data = read_json(path, limit=INDEX_LIMIT, inside=output)
    except SourceError as e:
        raise VerifyError(f"unreadable provenance record: {e}") from None
    return parse_record(data, path)


def _read_streamed(path: Path, output: Path, part: RecordPart) -> Record | None:
    """:func:`read_record`'s ``head`` and ``typed`` parts; None when the record is to be read whole
    (laid out otherwise, or wrong in its tensors: the whole read says how, with its own message)."""
    try:
        fd = open_record(path, output)
    except (SourceError, NotStreamable):
        return None
    try:
        head_bytes, offset = read_head(fd)
        head = parse_json(head_bytes, path)
        if not isinstance(head, dict) or TENSORS in head:
            return None
        record = parse_record({**head, TENSORS: {}}, path)
        if part == "head":
            return replace(record, tensors_offset=offset)
        tensors, names = {}, _Interned()
        for name, entry in iter_entries(fd, offset):
            t = _recorded_tensor(name, entry, record.shards, _read_whole)
            # One string object for each shard and dtype, not one per tensor.
            tensors[name] = RecordedTensor(name, names[t.shard], names[t.dtype], t.shape, t.sha256)
        return replace(record, tensors=MappingProxyType(tensors))
    except (NotStreamable, SourceError, VerifyError, OSError):
        return None
    finally:
        os.close(fd)


def _read_whole(where: str, expected: str) -> VerifyError:
    """A wrong tensor entry met while streaming: caught, and the record read whole, which names it."""
    return VerifyError(f"{where} is not {expected}")


class _Interned(dict[str, str]):
    """Equal strings as one object: ``interned[s]`` is the first ``s`` seen."""

    def __missing__(self, key: str) -> str:
        self[key] = key
        return key


def parse_record(data: Any, path: Path) -> Record:
    """Type-check a record's JSON ``data`` (read from ``path``).

    Raises:
        VerifyError: one line naming the first entry of the wrong type, or a file name that is not
            a plain name in the output folder (a record naming ``../../etc/passwd`` must not make
            verify read it).
    """
    def fail(where: str, expected: str) -> VerifyError:
        return VerifyError(f"{path}: {where} is not {expected}; this is not a provenance record tensorsurgery "
                           f"wrote (or it was edited): verify with the manifest instead")
    if not isinstance(data, dict):
        raise fail("the file", "a JSON object")
    if "shards" not in data and isinstance(data.get("tensors"), dict):
        raise VerifyError(f"{path}: written by tensorsurgery {data.get('version')}, which did not record shard "
                          f"headers; verify with the manifest (tensorsurgery verify MANIFEST {path.parent})")
    version = data.get("record_version")
    if not (isinstance(version, int) and _is_count(version) and 2 <= version <= RECORD_VERSION):
        raise VerifyError(f"{path}: record_version {version!r} is not one this tensorsurgery {__version__} reads "
                          f"(2 to {RECORD_VERSION}); upgrade tensorsurgery, or verify with the manifest")
    for key, kind, name in (("manifest", str, "a string"), ("manifest_name", str, "a string"),
                            ("shards", dict, "an object"), ("files", dict, "an object"),
                            ("tensors", dict, "an object"), ("layers", list, "a list"), ("sources", list, "a list")):
        if not isinstance(data.get(key), kind):
            raise fail(key, name)
    _check_sources(data["sources"], fail)
    if not data["shards"]:
        raise fail("shards", "an object naming at least one shard")
    shards = {}
    for name, entry in data["shards"].items():
        if not (_is_file_name(name) and SAFETENSORS.is_shard_name(name)):  # the one container written
            raise fail(f"shards[{name!r}]", "a file name in the output folder")
        if not (isinstance(entry, dict) and _is_count(entry.get("size")) and _is_sha(entry.get("header_sha256"))):
            raise fail(f"shards[{name!r}]", "{size, header_sha256}")
        shards[name] = RecordedShard(name, entry["size"], entry["header_sha256"])
    for name, digest in data["files"].items():
        if not _is_file_name(name):
            raise fail(f"files[{name!r}]", "a file name in the output folder")
        if not _is_sha(digest):
            raise fail(f"files[{name!r}]", "a sha256")
    if CONFIG_NAME not in data["files"]:
        raise fail("files", f"an object naming {CONFIG_NAME}")
    tensors = {name: _recorded_tensor(name, entry, shards, fail) for name, entry in data["tensors"].items()}
    return Record(path=path, manifest_name=data["manifest_name"], manifest=data["manifest"],
                  shards=MappingProxyType(shards), files=MappingProxyType(dict(data["files"])),
                  tensors=MappingProxyType(tensors), link=data.get("link") is True, data=MappingProxyType(data))


def _recorded_tensor(name: str, entry: Any, shards: Mapping[str, RecordedShard],
                     fail: Callable[[str, str], VerifyError]) -> RecordedTensor:
    """A record's tensor entry, type-checked (its shard one of ``shards``)."""
    if not (isinstance(entry, dict) and entry.get("shard") in shards and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list) and all(_is_count(d) for d in entry["shape"])
            and _is_sha(entry.get("sha256"))):
        raise fail(f"tensors[{name!r}]", "{shard (one of the shards), dtype, shape, sha256}")
    return RecordedTensor(name, entry["shard"], entry["dtype"], tuple(entry["shape"]), entry["sha256"])


def _check_sources(sources: list[Any], fail: Callable[[str, str], VerifyError]) -> None:
    """Each source entry is what :func:`build_record` or :func:`published_record` writes
    (``verify OUTPUT`` resolves them again); a published one has no ``root``."""
    for i, entry in enumerate(sources):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("name", "model", "layout"))
                and all(isinstance(entry.get(k), (str, type(None))) for k in ("revision", "repo_id", "root"))):
            raise fail(f"sources[{i}]", "{name, model, root (optional), layout, revision, repo_id}")
        files = entry.get("files")
        if not (isinstance(files, list) and all(isinstance(f, dict) and isinstance(f.get("name"), str)
                                                 and _is_file_name(f["name"])
                                                 and (f.get("size") is None or _is_count(f["size"]))
                                                 for f in files)):
            raise fail(f"sources[{i}].files", "a list of {name, size} of file names in the source folder")


def _is_file_name(name: str) -> bool:
    """A plain file name: no folder part, not ``.`` or ``..``, no NUL."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_sha(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)

"""Check an output against its own provenance record (``tensorsurgery.json``), without the
sources: every tensor's sha256, the shard set and index, and the other files' sha256."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from .chunks import CAST_CHUNK, pread_exact
from .errors import HeaderError, VerifyError
from .format import read_header
from .provenance import PROVENANCE_NAME
from .source import INDEX_NAME
from .verify import Difference, Progress, VerifyReport, _load_json, _require_folder


def read_record(output: Path) -> dict[str, Any]:
    """The provenance record of ``output``.

    Raises:
        VerifyError: missing or unreadable ``tensorsurgery.json``.
    """
    path = _require_folder(output) / PROVENANCE_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VerifyError(f"{path}: missing; this folder was not written by tensorsurgery, give the "
                          f"manifest: tensorsurgery verify MANIFEST {output}") from None
    except (OSError, ValueError) as e:
        raise VerifyError(f"{path}: unreadable provenance record ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("tensors"), dict):
        raise VerifyError(f"{path}: not a tensorsurgery provenance record (no tensors table)")
    return record


def verify_record(output: Path, *, progress: Progress = None) -> VerifyReport:
    """Check every tensor of ``output`` against the sha256 its ``tensorsurgery.json`` records,
    and the index against the record's shard names. Needs no source.

    Raises:
        VerifyError: no usable provenance record.
    """
    output = _require_folder(output)
    record = read_record(output)
    tensors: dict[str, Any] = record["tensors"]
    diffs: list[Difference] = []
    by_shard: dict[str, list[str]] = {}
    for name, entry in tensors.items():
        by_shard.setdefault(str(entry.get("shard")), []).append(name)
    present = {p.name for p in output.glob("*.safetensors")}
    diffs += [Difference(n, "unexpected shard (not in tensorsurgery.json)") for n in sorted(present - set(by_shard))]
    nbytes = 0
    for shard, names in sorted(by_shard.items()):
        nbytes += _hash_shard(output / shard, names, tensors, diffs, progress)
    _check_record_index(output, by_shard, diffs)
    _check_record_files(output, record.get("files") or {}, diffs)
    return VerifyReport(output, "record", len(tensors), nbytes, tuple(diffs))


def _check_record_files(output: Path, files: Mapping[str, str], diffs: list[Difference]) -> None:
    """config.json, the index and copied files against the sha256 the record gives them."""
    for name, want in sorted(files.items()):
        path = output / name
        if not path.is_file():
            diffs.append(Difference(name, "is missing"))
        elif hashlib.sha256(path.read_bytes()).hexdigest() != want:
            diffs.append(Difference(name, "differs from what tensorsurgery wrote (sha256 in tensorsurgery.json)"))


def _hash_shard(path: Path, names: list[str], tensors: Mapping[str, Any], diffs: list[Difference],
                progress: Progress) -> int:
    if not path.is_file():
        diffs.append(Difference(path.name, "shard is missing"))
        return 0
    try:
        header = read_header(path)
    except HeaderError as e:
        diffs.append(Difference(path.name, f"invalid safetensors header: {e}"))
        return 0
    nbytes = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for name in names:
            entry, want = header.tensors.get(name), tensors[name]
            if entry is None:
                diffs.append(Difference(name, f"missing from {path.name}"))
                continue
            if [entry.dtype, list(entry.shape)] != [want.get("dtype"), want.get("shape")]:
                diffs.append(Difference(name, f"is {entry.dtype} {list(entry.shape)}, the record says "
                                              f"{want.get('dtype')} {want.get('shape')}"))
            digest = _hash_range(fd, header.data_start + entry.start, entry.nbytes, progress)
            nbytes += entry.nbytes
            if digest != want.get("sha256"):
                diffs.append(Difference(name, f"sha256 {digest} differs from the record's {want.get('sha256')}"))
        diffs += [Difference(n, f"unexpected tensor in {path.name}") for n in header.tensors if n not in tensors]
    finally:
        os.close(fd)
    return nbytes


def _hash_range(fd: int, offset: int, length: int, progress: Progress) -> str:
    digest = hashlib.sha256()
    buf = bytearray(min(length, CAST_CHUNK * 4) or 1)
    for start in range(0, length, len(buf)):
        view = memoryview(buf)[:min(len(buf), length - start)]
        pread_exact(fd, view, offset + start)
        digest.update(view)
        if progress:
            progress(len(view))
    return digest.hexdigest()


def _check_record_index(output: Path, by_shard: Mapping[str, list[str]], diffs: list[Difference]) -> None:
    path = output / INDEX_NAME
    if len(by_shard) == 1 and not path.exists():
        return
    index = _load_json(path, diffs)
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if index is not None and not isinstance(wmap, dict):
        diffs.append(Difference(INDEX_NAME, "has no weight_map"))
    if not isinstance(wmap, dict):
        return
    expected = {n: s for s, names in by_shard.items() for n in names}
    for name in sorted(expected.keys() | wmap.keys()):
        if name not in wmap:
            diffs.append(Difference(INDEX_NAME, f"weight_map lacks tensor {name!r} (in {expected[name]})"))
        elif wmap.get(name) != expected.get(name):
            diffs.append(Difference(INDEX_NAME, f"weight_map puts {name!r} in {wmap.get(name)}, the record "
                                                f"says {expected.get(name)}"))

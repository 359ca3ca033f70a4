"""Prove an output is what it should be, byte for byte, in one of two modes:

* :func:`verify_output` compares the folder with a :class:`tensorsurgery.planning.planner.Plan` (re-derived
  from the manifest and the sources): every file the plan writes, with the bytes it must hold
  (:mod:`tensorsurgery.output.expected`), the provenance record against the plan and those bytes, and
  no file besides.
* :func:`verify_record` compares the folder with its own provenance record when the sources are
  not at hand: every shard's size and header, every tensor's sha256, every other file's sha256,
  and no file besides.

Either way a file that is missing, not a regular file (a link, a FIFO, a folder) or not
expected is a difference.
"""
from __future__ import annotations

import itertools
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tensorsurgery.errors import HeaderError, SourceError, VerifyError
from tensorsurgery.families.consistency import Tensor, check_consistency, failing_checks
from tensorsurgery.families.registry import family_of
from tensorsurgery.formats.output_format import OutputFormat
from tensorsurgery.formats.safetensors_output import SAFETENSORS
from tensorsurgery.io.fsio import pread_exact, read_json
from tensorsurgery.io.hashing import DEFAULT_THREADS, first_of_each
from tensorsurgery.ops.recipe import identity
from tensorsurgery.output.compare import (
    IN_FLIGHT,
    Difference,
    Progress,
    compare_copy,
    compare_data,
    compare_sha256,
    compare_shard,
    first_difference,
    hash_fd_range,
    hash_output_range,
    json_diff,
    open_output_file,
    thread_buffer,
    unexpected_entries,
)
from tensorsurgery.output.expected import expected_files, json_stream
from tensorsurgery.output.record import (
    TENSORS,
    Record,
    header_sha256,
    read_record,
    record_head,
    require_folder,
    tensor_entries,
)
from tensorsurgery.output.record_stream import NotStreamable, open_record, same_tensors
from tensorsurgery.planning.planner import Plan
from tensorsurgery.planning.table import OutputTensor
from tensorsurgery.sources.checkpoint import CONFIG_NAME, RECORD_NAME


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of a verification; ``ok`` only when there is no difference. ``nbytes`` counts
    the tensor bytes checked (the data sections of the shards, not their headers).
    ``sources_changed``: in ``record`` mode, the recorded source files that are there but are not
    the files apply read (another size or sha256), which is why the record alone was checked."""

    output: Path
    mode: str
    tensors: int
    nbytes: int
    files: int
    differences: tuple[Difference, ...]
    sources_changed: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.differences

    def as_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "mode": self.mode, "ok": self.ok, "tensors": self.tensors,
                "tensor_bytes": self.nbytes, "files": self.files, "sources_changed": list(self.sources_changed),
                "differences": [{"where": d.where, "what": d.what} for d in self.differences]}


def verify_output(plan: Plan, output: Path, *, progress: Progress = None, progress_total: Progress = None,
                  threads: int = DEFAULT_THREADS) -> VerifyReport:
    """Compare the folder ``output`` with ``plan``, reading every byte of both sides once.
    ``progress`` is called with the tensor bytes as they are checked; ``progress_total`` once
    first, with the bytes to check in all (for a bar's total and ETA).

    A tensor made by the same recipe (inputs, operation, dtype) as an earlier one (the layers
    DUS repeats) is compared with its source but not hashed again: equal bytes, equal hash.

    Raises:
        VerifyError: ``output`` is not a folder.
    """
    output = require_folder(output)
    if progress_total:
        progress_total(plan.total_size)
    files = expected_files(plan)
    diffs = unexpected_entries(output, {f.name for f in files} | {RECORD_NAME})
    tensors = plan.tensors  # each tensor made when asked for (planning.table)
    same = first_of_each(map(identity, tensors))
    unhashed = {tensors[i].name for i in same}
    tensor_hashes: dict[str, str] = {}
    file_hashes: dict[str, str] = {}
    planned_headers = True  # every shard's header is the planned one, byte for byte
    for f in files:
        path = output / f.name
        if f.shard is not None:
            hashes, found = compare_shard(f.shard, path, threads=threads, progress=progress, unhashed=unhashed,
                                          fmt=plan.output_format)
            tensor_hashes.update(hashes)
            planned_headers = planned_headers and not any(d.where == f.name for d in found)
        else:
            digest, found = (compare_copy(f.copy, path) if f.copy is not None
                             else compare_data(f.name, path, f.data or b""))
            if digest is not None:
                file_hashes[f.name] = digest
        diffs += found
    _borrow_hashes(plan, tensors, output, same, tensor_hashes)
    diffs += _check_record(plan, output, tensor_hashes, file_hashes)
    # Headers equal to the planned ones hold the planned tensors: not read (and held) again.
    diffs += check_meaning(output, [s.filename for s in plan.shards], plan.output_format, planned=plan.config,
                           tensors=tensors if planned_headers else None)
    nbytes = sum(s.data_size for s in plan.shards)
    return VerifyReport(output, "manifest", len(tensors), nbytes, len(files) + 1, tuple(diffs))


def _borrow_hashes(plan: Plan, tensors: Sequence[OutputTensor], output: Path, same: dict[int, int],
                   tensor_hashes: dict[str, str]) -> None:
    """Fill in the hash of each right tensor (``tensors`` is ``plan.tensors``) that was not hashed:
    its first copy's, when that one is right too (same recipe, same expected bytes), else its own,
    read again (rare)."""
    for i, j in same.items():
        name = tensors[i].name
        if tensor_hashes.get(name) != "":
            continue
        if tensor_hashes.get(tensors[j].name):
            tensor_hashes[name] = tensor_hashes[tensors[j].name]
            continue
        shard = next(s for s in plan.shards if name in s.tensors.names)
        t = next(t for t in shard.tensors if t.name == name)
        tensor_hashes[name] = hash_output_range(output / shard.filename, len(shard.header) + t.offset, t.nbytes)


def _check_record(plan: Plan, output: Path, tensor_hashes: dict[str, str],
                  file_hashes: dict[str, str]) -> list[Difference]:
    """The record must say what the writer would have written for these (verified) bytes. The
    manifest text and the sources may legitimately differ (verified with another copy of the
    manifest, sources moved or given with --source), so they are not compared."""
    diffs: list[Difference] = []
    fd = open_output_file(output / RECORD_NAME, diffs)
    if fd is None:
        return diffs
    os.close(fd)
    try:
        record = read_record(output, "head")
        # The tensors as the writer lays them out, with the hashes verify took: byte for byte the
        # record's (the usual case), or read whole and compared entry by entry.
        same = record.tensors_offset is not None and _same_tensors(plan, output, record.tensors_offset, tensor_hashes)
        if not same:
            record = read_record(output)
    except VerifyError as e:
        return [Difference(RECORD_NAME, str(e))]
    files = {f.name: file_hashes.get(f.name, record.files.get(f.name, "")) for f in expected_files(plan)
             if f.shard is None}
    want = json.loads(json.dumps(record_head(plan, files)))
    for key in ("layers", "link", "shards", "files"):
        diffs += [Difference(RECORD_NAME, line) for line in json_diff(want[key], record.data.get(key), key)][:20]
    if not same:
        found = record.data.get(TENSORS)
        assert isinstance(found, dict)  # parse_record checked
        hashes = _RecordHashes(tensor_hashes, record)
        diffs += [Difference(RECORD_NAME, line) for line in _tensor_diffs(plan, hashes, found)][:20]
    return diffs


def _same_tensors(plan: Plan, output: Path, offset: int, tensor_hashes: Mapping[str, str]) -> bool:
    """Whether the record's tensor entries, from ``offset``, are the bytes the writer makes of
    ``plan`` and ``tensor_hashes`` (False at once when a tensor was not verified: its bytes differ)."""
    if any(name not in tensor_hashes for s in plan.shards for name in s.tensors.names):
        return False
    pieces = json_stream({}, TENSORS, tensor_entries(plan, tensor_hashes))
    first = next(pieces)
    try:
        fd = open_record(output / RECORD_NAME, output)
    except (SourceError, NotStreamable):
        return False
    try:
        return same_tensors(fd, offset, itertools.chain([first[len(_TENSORS_OPEN):]], pieces))
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class _RecordHashes:
    """Tensor name -> the sha256 verify took of its bytes; where the bytes are wrong (a difference
    already) the record's own hash stands in, so that one damaged tensor is not reported twice."""

    verified: Mapping[str, str]
    record: Record

    def __getitem__(self, name: str) -> str:
        digest = self.verified.get(name)
        if digest is not None:
            return digest
        recorded = self.record.tensors.get(name)
        return recorded.sha256 if recorded is not None else ""


def _tensor_diffs(plan: Plan, hashes: _RecordHashes, found: Mapping[str, Any]) -> list[str]:
    """:func:`json_diff` of the record's tensors against the plan's (the lines sorted by tensor
    name, as for the whole objects), made one planned entry at a time: the plan's entries are
    never one object beside the record's."""
    differing: list[tuple[str, list[str]]] = []
    matched = 0
    for name, entry in tensor_entries(plan, hashes):
        got = found.get(name, _MISSING)
        if got is not _MISSING:
            matched += 1
            # Equal canonical JSON is json_diff finding nothing (types included: 1, 1.0 and true differ).
            if json.dumps(entry, sort_keys=True) == json.dumps(got, sort_keys=True):
                continue
        want = json.loads(json.dumps(entry))
        differing.append((name, list(json_diff({name: want}, {} if got is _MISSING else {name: got}, TENSORS))))
    if matched != len(found):  # the record names tensors the plan does not make (rare: a set only then)
        planned = {name for s in plan.shards for name in s.tensors.names}
        differing += [(name, list(json_diff({}, {name: got}, TENSORS))) for name, got in found.items()
                      if name not in planned]
    differing.sort(key=itemgetter(0))
    return [line for _, lines in differing for line in lines]


_MISSING = object()
#: What :func:`json_stream` of an empty head puts before the first tensor entry.
_TENSORS_OPEN = json.dumps({TENSORS: {}}, indent=2).encode()[:-len("}\n}")]


def verify_record(output: Path, *, progress: Progress = None, progress_total: Progress = None,
                  threads: int = DEFAULT_THREADS) -> VerifyReport:
    """Check ``output`` against its own ``tensorsurgery.json``: every shard's size and header bytes,
    every tensor's sha256, every other file's sha256, and no file besides. Needs no source.
    ``progress`` and ``progress_total`` as for :func:`verify_output`.

    Tensors are checked on ``threads`` threads. A tensor whose recorded sha256 and size equal an
    earlier tensor's (a layer DUS repeats) is compared byte for byte with that one instead of
    being hashed again, once that one matched its hash: equal bytes, equal hash.

    Raises:
        VerifyError: no usable provenance record.
    """
    output = require_folder(output)
    record = read_record(output, "typed")
    expected = set(record.shards) | set(record.files) | {RECORD_NAME}
    diffs = unexpected_entries(output, expected)
    fmt = SAFETENSORS  # the container of every output tensorsurgery writes, and so of every record's
    fds: list[int] = []
    try:
        tensors: list[_Recorded] = []
        for shard in record.shards.values():
            tensors += _recorded_tensors(output, record, shard.name, fmt, diffs, fds)
        if progress_total:
            progress_total(sum(t.nbytes for t in tensors))
        diffs += _check_recorded_tensors(tensors, threads, progress)
    finally:
        for fd in fds:
            os.close(fd)
    for name, digest in sorted(record.files.items()):
        found = compare_sha256(name, output / name, digest)
        if found and name == CONFIG_NAME:
            # Which checks apply to the family is known from its source, not here: the check
            # only says what a changed config.json breaks.
            found += check_meaning(output, list(record.shards), fmt)
        diffs += found
    return VerifyReport(output, "record", len(record.tensors), sum(t.nbytes for t in tensors), len(expected),
                        tuple(diffs))


def check_meaning(output: Path, shards: list[str], fmt: OutputFormat,
                  planned: Mapping[str, Any] | None = None,
                  tensors: Sequence[Tensor] | None = None) -> list[Difference]:
    """config.json of ``output`` against the headers of its shards (of the container ``fmt``;
    :mod:`tensorsurgery.families.consistency`): a config that disagrees with the tensors loads
    another model than they hold. A check that the ``planned`` config fails too with these tensors
    does not describe the family (apply let it through), so it is not reported. A missing or
    broken file is a difference of its own, reported elsewhere, so it is not checked here.
    ``tensors``: what the headers hold, when the caller knows it (they are the planned ones); else
    they are read."""
    probe: list[Difference] = []
    for name in (CONFIG_NAME, *shards):
        fd = open_output_file(output / name, probe)
        if fd is None:
            return []
        os.close(fd)
    try:
        config = read_json(output / CONFIG_NAME, inside=output)
        if tensors is None:
            tensors = [e for name in shards for e in fmt.read_header(output / name).entries]
    except (SourceError, HeaderError):
        return []
    if not isinstance(config, dict):
        return []
    found = check_consistency(config, tensors, family_of(config))
    if found and planned is not None:
        skip = failing_checks(planned, tensors, family_of(planned))
        found = [f for f in found if f.check not in skip]
    # The findings say "config.json KEY = ..."; the difference is already named after the file.
    return [Difference(CONFIG_NAME, f.message.removeprefix(f"{CONFIG_NAME} ")) for f in found]


@dataclass(frozen=True, slots=True)
class _Recorded:
    """A tensor of an output shard to check against the record: where its bytes are (``fd``, an
    open descriptor of the shard) and the sha256 the record gives them."""

    name: str
    fd: int
    offset: int
    nbytes: int
    sha256: str


def _recorded_tensors(output: Path, record: Record, name: str, fmt: OutputFormat, diffs: list[Difference],
                      fds: list[int]) -> list[_Recorded]:
    """Check one shard's size, header and tensor names (of the container ``fmt``) against the
    record; returns its tensors to check, in file order (none when the shard itself is wrong).
    Its descriptor goes in ``fds``."""
    shard = record.shards[name]
    path = output / name
    fd = open_output_file(path, diffs)
    if fd is None:
        return []
    fds.append(fd)
    size = os.fstat(fd).st_size
    try:
        raw = fmt.read_raw_header(fd, size)
    except OSError as e:
        diffs.append(Difference(name, f"cannot be read ({e.strerror or e})"))
        return []
    if raw is None:
        diffs.append(Difference(name, fmt.header_difference(None, b"")))
        return []
    # The header first: an added metadata key changes the size too, and is better named as such.
    if header_sha256(raw) != shard.header_sha256:
        diffs.append(Difference(name, "header bytes differ from what tensorsurgery wrote (sha256 in "
                                      "tensorsurgery.json): metadata, order or padding changed"))
        return []
    if size != shard.size:
        diffs.append(Difference(name, f"is {size} bytes, the record says {shard.size} (truncated or padded)"))
        return []
    try:
        header = fmt.parse_header(path, raw, size)
    except HeaderError as e:
        diffs.append(Difference(name, f"invalid safetensors header: {e}"))
        return []
    recorded = {t.name: t for t in record.tensors.values() if t.shard == name}
    diffs += [Difference(n, f"unexpected tensor in {name}") for n in header.tensors if n not in recorded]
    diffs += [Difference(n, f"missing from {name}") for n in recorded if n not in header.tensors]
    return [_Recorded(entry.name, fd, header.data_start + entry.start, entry.nbytes, recorded[entry.name].sha256)
            for entry in header.entries if entry.name in recorded]

def _check_recorded_tensors(tensors: list[_Recorded], threads: int, progress: Progress) -> list[Difference]:
    """sha256 of every tensor against the record, on ``threads`` threads; a repeat of an earlier
    tensor (same recorded sha256 and size) is compared with it instead, once it matched."""
    first: dict[tuple[str, int], int] = {}
    digests: list[str] = [""] * len(tensors)
    # Only the jobs in flight are held (a Future is ~1.6 KB): at most IN_FLIGHT, oldest first.
    jobs: dict[int, Future[str]] = {}
    # FIFO: a repeat starts after its first copy has started, so waiting for it cannot deadlock.
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for i, t in enumerate(tensors):
            j = first.setdefault((t.sha256, t.nbytes), i)
            if j == i:
                jobs[i] = pool.submit(_hash_tensor, t, progress)
            else:
                original = jobs[j].result if j in jobs else _done(digests[j])
                jobs[i] = pool.submit(_check_repeat, t, tensors[j], original, progress)
            if len(jobs) > IN_FLIGHT:
                oldest = next(iter(jobs))
                digests[oldest] = jobs.pop(oldest).result()
        for i, job in jobs.items():
            digests[i] = job.result()
    return [Difference(t.name, f"sha256 {digest} differs from the record's {t.sha256}")
            for t, digest in zip(tensors, digests) if digest != t.sha256]


def _hash_tensor(t: _Recorded, progress: Progress) -> str:
    return hash_fd_range(t.fd, t.offset, t.nbytes, progress)


def _done(digest: str) -> Callable[[], str]:
    return lambda: digest


def _check_repeat(t: _Recorded, original: _Recorded, original_digest: Callable[[], str], progress: Progress) -> str:
    """The sha256 of ``t``'s bytes: the record's when they equal ``original``'s bytes and those
    matched the record (``original_digest()``, waited for); else hashed."""
    if original_digest() != original.sha256:
        return _hash_tensor(t, progress)
    a, b = thread_buffer("a"), thread_buffer("b")
    for start in range(0, t.nbytes, len(a)):
        n = min(len(a), t.nbytes - start)
        got, want = memoryview(a)[:n], memoryview(b)[:n]
        pread_exact(t.fd, got, t.offset + start)
        pread_exact(original.fd, want, original.offset + start)
        if first_difference(got, want) is not None:
            return _hash_tensor(t, None)
        if progress:
            progress(n)
    return t.sha256



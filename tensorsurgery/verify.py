"""Prove an output is what its manifest asks for, byte for byte.

:func:`verify_output` re-derives nothing itself: it takes the :class:`Plan` built from the
sources' headers and compares the output folder with it: the set of shard files, each header,
every tensor's bytes against its (transformed) source bytes, the index, config.json and the
provenance record, streaming in bounded chunks and hashing as it reads.
:mod:`tensorsurgery.record` checks a folder against its own ``tensorsurgery.json`` when the
sources are not at hand.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .chunks import CAST_CHUNK, expected_chunks, pread_exact
from .errors import HeaderError, VerifyError
from .format import read_header
from .plan import OutputTensor, Plan, Shard
from .provenance import PROVENANCE_NAME, provenance_record
from .source import INDEX_NAME

Progress = Callable[[int], None] | None
_THREADS = 2


@dataclass(frozen=True, slots=True)
class Difference:
    """One way the output is not what it should be: ``where`` is a file or tensor name."""

    where: str
    what: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of a verification; ``ok`` only when there is no difference."""

    output: Path
    mode: str
    tensors: int
    nbytes: int
    differences: tuple[Difference, ...]

    @property
    def ok(self) -> bool:
        return not self.differences

    def as_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "mode": self.mode, "ok": self.ok, "tensors": self.tensors,
                "bytes": self.nbytes,
                "differences": [{"where": d.where, "what": d.what} for d in self.differences]}


def verify_output(plan: Plan, output: Path, *, progress: Progress = None) -> VerifyReport:
    """Compare the folder ``output`` with ``plan``, reading every byte of both sides once.

    Raises:
        VerifyError: ``output`` is not a folder.
    """
    output = _require_folder(output)
    diffs: list[Difference] = []
    _check_files(plan, output, diffs)
    jobs: list[tuple[OutputTensor, Path, int]] = []
    for shard in plan.shards:
        path = output / shard.filename
        if not path.is_file():
            continue
        size = path.stat().st_size
        if size != shard.nbytes:
            diffs.append(Difference(shard.filename, f"is {size} bytes, expected {shard.nbytes} "
                                                    f"(truncated or padded)"))
            continue
        with _Files() as files:
            _check_header(shard, path, files.open(path), diffs)
        jobs += [(t, path, len(shard.header)) for t in shard.tensors]
    # Comparing and hashing are CPU-bound and release the GIL: tensors are checked on two
    # threads; results come back in plan order, so the report is deterministic.
    with ThreadPoolExecutor(_THREADS) as pool:
        results = list(pool.map(lambda job: _check_tensor(*job, progress), jobs))
    hashes: dict[str, str] = {}
    for (t, _, _), (digest, first_diff) in zip(jobs, results):
        if first_diff is None:
            hashes[t.name] = digest  # the record is checked only where the bytes are right
        else:
            diffs.append(Difference(t.name, f"bytes differ from {t.source_key!r} of {t.source.path.name} "
                                            f"(transform: {t.transform}) from byte {first_diff} on"))
    nbytes = sum(t.nbytes for t, _, _ in jobs)
    _check_index(plan, output, diffs)
    _check_config(plan, output, diffs)
    _check_record(plan, output, hashes, diffs)
    return VerifyReport(output, "manifest", len(plan.tensors), nbytes, tuple(diffs))


def intact_shard_hashes(shard: Shard, path: Path, *, progress: Progress = None) -> dict[str, str] | None:
    """The sha256 of each tensor of the shard file ``path`` if it is exactly what ``shard``
    plans (header and every byte, against the sources); None otherwise. ``--resume`` uses it to
    keep finished shards."""
    if not path.is_file() or path.stat().st_size != shard.nbytes:
        return None
    diffs: list[Difference] = []
    hashes = {}
    with _Files() as files:
        _check_header(shard, path, files.open(path), diffs)
        for t in shard.tensors:
            if diffs:
                return None
            hashes[t.name], first_diff = _compare_tensor(t, files.open(path), len(shard.header), files, progress)
            if first_diff is not None:
                return None
    return hashes


def _check_tensor(t: OutputTensor, path: Path, data_start: int, progress: Progress) -> tuple[str, int | None]:
    with _Files() as files:
        return _compare_tensor(t, files.open(path), data_start, files, progress)


def _require_folder(output: Path) -> Path:
    output = Path(output)
    if not output.is_dir():
        raise VerifyError(f"{output}: output folder not found; run `tensorsurgery apply` first or "
                          f"give the output path")
    return output


class _Files:
    """Read-only descriptors opened on demand and closed together."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}

    def open(self, path: Path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def __enter__(self) -> "_Files":
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _check_files(plan: Plan, output: Path, diffs: list[Difference]) -> None:
    expected = {s.filename for s in plan.shards}
    present = {p.name for p in output.glob("*.safetensors")}
    diffs += [Difference(name, "shard is missing") for name in sorted(expected - present)]
    diffs += [Difference(name, "unexpected shard (not in the plan)") for name in sorted(present - expected)]


def _check_header(shard: Shard, path: Path, fd: int, diffs: list[Difference]) -> None:
    raw = bytearray(len(shard.header))
    pread_exact(fd, memoryview(raw), 0)
    if raw == shard.header:
        return
    try:
        header = read_header(path)
    except HeaderError as e:
        diffs.append(Difference(shard.filename, f"invalid safetensors header: {e}"))
        return
    for t in shard.tensors:
        e = header.tensors.get(t.name)
        if e is None:
            diffs.append(Difference(t.name, f"missing from the header of {shard.filename}"))
        elif (e.dtype, e.shape, e.start, e.end) != (t.dtype, t.shape, t.offset, t.offset + t.nbytes):
            diffs.append(Difference(t.name, f"header says {e.dtype} {list(e.shape)} at [{e.start}, {e.end}), "
                                            f"expected {t.dtype} {list(t.shape)} at [{t.offset}, {t.offset + t.nbytes})"))
    planned = {t.name for t in shard.tensors}
    diffs += [Difference(n, f"unexpected tensor in {shard.filename}") for n in header.tensors if n not in planned]
    if not any(d.where in planned or d.where in header.tensors for d in diffs):
        diffs.append(Difference(shard.filename, "header bytes differ from the plan (metadata or order)"))


def _compare_tensor(t: OutputTensor, out_fd: int, data_start: int, files: _Files,
                    progress: Progress) -> tuple[str, int | None]:
    """sha256 of the output bytes, and the offset of the first byte that differs from the
    expected ones (None when all are equal)."""
    digest = hashlib.sha256()
    actual = bytearray(CAST_CHUNK * 2)
    pos, first_diff = 0, None
    for chunk in expected_chunks(t, files.open(t.source.path)):
        view = memoryview(actual)[:len(chunk)]
        pread_exact(out_fd, view, data_start + t.offset + pos)
        digest.update(view)
        if first_diff is None:
            # numpy compares at memcmp speed; memoryview == goes element by element.
            got, want = np.frombuffer(view, np.uint8), np.frombuffer(chunk, np.uint8)
            if not np.array_equal(got, want):
                first_diff = pos + int(np.flatnonzero(got != want)[0])
        pos += len(chunk)
        if progress:
            progress(len(chunk))
    return digest.hexdigest(), first_diff


def _load_json(path: Path, diffs: list[Difference]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        diffs.append(Difference(path.name, "is missing"))
    except (OSError, ValueError) as e:
        diffs.append(Difference(path.name, f"is not valid JSON ({e})"))
    return None


def _check_index(plan: Plan, output: Path, diffs: list[Difference]) -> None:
    path = output / INDEX_NAME
    if plan.index is None:
        if path.exists():
            diffs.append(Difference(INDEX_NAME, "unexpected: the plan writes a single model.safetensors"))
        return
    index = _load_json(path, diffs)
    if index is None:
        return
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict):
        diffs.append(Difference(INDEX_NAME, "has no weight_map"))
        return
    for name, shard in plan.index["weight_map"].items():
        if name not in wmap:
            diffs.append(Difference(INDEX_NAME, f"weight_map lacks tensor {name!r} (in {shard})"))
        elif wmap[name] != shard:
            diffs.append(Difference(INDEX_NAME, f"weight_map puts {name!r} in {wmap[name]}, expected {shard}"))
    diffs += [Difference(INDEX_NAME, f"weight_map has unexpected tensor {n!r}") for n in wmap
              if n not in plan.index["weight_map"]]
    total = (index.get("metadata") or {}).get("total_size")
    if total != plan.total_size:
        diffs.append(Difference(INDEX_NAME, f"metadata.total_size is {total}, expected {plan.total_size}"))


def _check_config(plan: Plan, output: Path, diffs: list[Difference]) -> None:
    config = _load_json(output / "config.json", diffs)
    if config is None:
        return
    if not isinstance(config, dict):
        diffs.append(Difference("config.json", "is not a JSON object"))
        return
    expected = json.loads(json.dumps(dict(plan.config)))
    for key in sorted(expected.keys() | config.keys()):
        if key not in config:
            diffs.append(Difference("config.json", f"{key} is missing, expected {expected[key]!r}"))
        elif key not in expected:
            diffs.append(Difference("config.json", f"{key} is unexpected ({config[key]!r})"))
        elif config[key] != expected[key]:
            diffs.append(Difference("config.json", f"{key} is {config[key]!r}, expected {expected[key]!r}"))


def _check_record(plan: Plan, output: Path, hashes: Mapping[str, str], diffs: list[Difference]) -> None:
    record = _load_json(output / PROVENANCE_NAME, diffs)
    if record is None:
        return
    tensors = record.get("tensors") if isinstance(record, dict) else None
    if not isinstance(tensors, dict):
        diffs.append(Difference(PROVENANCE_NAME, "has no tensors table"))
        return
    # What the writer records for this plan (JSON round trip: tuples become lists).
    want = json.loads(json.dumps(provenance_record(plan, {t.name: hashes.get(t.name) for t in plan.tensors})))
    if record.get("layers") != want["layers"]:
        diffs.append(Difference(PROVENANCE_NAME, "layers (the layer map) differ from the plan's"))
    for t in plan.tensors:
        entry = tensors.get(t.name)
        if not isinstance(entry, dict):
            diffs.append(Difference(PROVENANCE_NAME, f"lacks tensor {t.name!r}"))
            continue
        if t.name in hashes and entry.get("sha256") != hashes[t.name]:
            diffs.append(Difference(PROVENANCE_NAME, f"sha256 of {t.name!r} is {entry.get('sha256')}, "
                                                     f"the output bytes hash to {hashes[t.name]}"))
        for key, value in want["tensors"][t.name].items():
            if key != "sha256" and entry.get(key) != value:
                diffs.append(Difference(PROVENANCE_NAME, f"{key} of {t.name!r} is {entry.get(key)!r}, "
                                                         f"expected {value!r}"))
    planned = {t.name for t in plan.tensors}
    diffs += [Difference(PROVENANCE_NAME, f"records unexpected tensor {n!r}") for n in tensors if n not in planned]


def iter_differences(report: VerifyReport) -> Iterator[str]:
    """One line per difference, for printing."""
    for d in report.differences:
        yield f"{d.where}: {d.what}"

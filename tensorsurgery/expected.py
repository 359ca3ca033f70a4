"""What every file of an output must hold, defined once: the writer writes exactly these bytes,
``--resume`` keeps a finished shard only when it holds them, and both ``verify`` modes check them.

* a shard: its planned header, then each tensor's bytes, made from the source by the tensor's
  steps (:func:`tensor_chunks`);
* config.json, the index and the model card: bytes rendered from the plan (:func:`json_bytes`);
* a copied file (tokenizer, licence...): the source file's bytes;
* the provenance record, whose content needs the hashes of all of the above, is built by
  :mod:`tensorsurgery.record`.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from .checkpoint import CARD_NAME, CONFIG_NAME, INDEX_NAME
from .dtypes import element_size
from .fsio import pread_exact
from .planning import CopyFile, OutputTensor, Plan, Shard
from .steps import Cast, PermuteRotary, Zeros
from .transforms import cast_chunk, permute_head

#: Source bytes per step of a transformed tensor; small because a cast makes a few temporaries.
CAST_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ExpectedFile:
    """One file of an output and what it must hold: ``shard`` (a planned shard), ``data`` (exact
    bytes: config.json, the index, the card) or ``copy`` (a source file's bytes)."""

    name: str
    shard: Shard | None = None
    data: bytes | None = None
    copy: CopyFile | None = None

    @property
    def kind(self) -> str:
        return "shard" if self.shard else "copy" if self.copy else "data"


def json_bytes(data: Mapping[str, Any]) -> bytes:
    """The bytes tensorsurgery writes for a JSON file: indented, UTF-8, a final newline."""
    return (json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable) + "\n").encode("utf-8")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "items"):
        return dict(value.items())
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def expected_files(plan: Plan) -> tuple[ExpectedFile, ...]:
    """Every file of ``plan``'s output but the provenance record, in the order they are written."""
    files = [ExpectedFile(s.filename, shard=s) for s in plan.shards]
    files += [ExpectedFile(c.name, copy=c) for c in plan.copy_files]
    if plan.index is not None:
        files.append(ExpectedFile(INDEX_NAME, data=json_bytes(plan.index)))
    files.append(ExpectedFile(CONFIG_NAME, data=json_bytes(plan.config)))
    if plan.card is not None:
        files.append(ExpectedFile(CARD_NAME, data=plan.card.encode("utf-8")))
    return tuple(files)


def tensor_chunks(t: OutputTensor, fd: int | None, chunk: int = CAST_CHUNK) -> Iterator[memoryview]:
    """The output bytes of ``t``, made from its source (open as ``fd``; None for zeros) by its
    steps, in bounded chunks: one head at a time for a rotary permutation, ``chunk`` source bytes
    at a time otherwise.

    Each yielded view is valid only until the next one is requested: buffers are reused, per
    thread, so a thread consumes one of these generators at a time.
    """
    if any(isinstance(s, Zeros) for s in t.steps):
        zeros = _scratch(min(t.nbytes, chunk))[1].data
        zeros[:] = bytes(len(zeros))
        for start in range(0, t.nbytes, len(zeros) or 1):
            yield zeros[:min(len(zeros), t.nbytes - start)]
        return
    assert fd is not None and t.source is not None
    permute = next((s for s in t.steps if isinstance(s, PermuteRotary)), None)
    cast = next((s for s in t.steps if isinstance(s, Cast)), None)
    if permute is not None:
        row_bytes = t.source.length // t.shape[0]
        step = row_bytes * (t.shape[0] // permute.heads)  # one head
    else:
        size = element_size(t.source_dtype) if cast else 1
        step = max(chunk - chunk % size, size)
    scratch, out = _scratch(step)
    for start in range(0, t.source.length, step):
        n = min(step, t.source.length - start)
        pread_exact(fd, scratch.data[:n], t.source.offset + start)
        data = scratch[:n]
        if permute is not None:
            data = permute_head(data, row_bytes)
        if cast is not None:
            data = cast_chunk(data, cast.source, cast.target, out=out)
        yield data.data


_local = threading.local()


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's scratch buffers: ``n`` bytes for source bytes, ``2n`` for cast output.
    Reused across tensors: fresh multi-MB arrays per tensor make glibc raise its mmap threshold
    and keep the freed memory resident, which shows as creeping peak RSS."""
    have = getattr(_local, "buffers", None)
    if have is None or have[0].size < n:
        _local.buffers = (np.empty(n, np.uint8), np.empty(2 * n, np.uint8))
    src, out = _local.buffers
    return src[:n], out[:2 * n]

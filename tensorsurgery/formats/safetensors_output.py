"""The safetensors output container (:class:`~tensorsurgery.formats.output_format.OutputFormat`):
shards named as Hugging Face names them (``model.safetensors``, or ``model-0000N-of-0000M.safetensors``
and ``model.safetensors.index.json``), headers with ``{"format": "pt"}`` metadata (what
transformers' ``save_pretrained`` writes, and what its loader checks), and the header diff that
``verify`` and ``--resume`` report. Reading and encoding a header are
:mod:`tensorsurgery.formats.safetensors`'s.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

from tensorsurgery._version import __version__
from tensorsurgery.formats.output_format import HeaderEntry, IndexedShard
from tensorsurgery.formats.safetensors import MAX_HEADER_SIZE, Header, encode_header, parse_header, read_header
from tensorsurgery.io.fsio import pread_exact

SUFFIX = ".safetensors"


@dataclass(frozen=True, slots=True)
class SafetensorsOutput:
    """Shards of the safetensors container, as Hugging Face writes them."""

    single_name: str = "model" + SUFFIX
    index_name: str = "model" + SUFFIX + ".index.json"
    #: Every shard's ``__metadata__`` (pairs: the object stays hashable): transformers refuses to
    #: load a shard saved with another framework's ``format``.
    metadata: tuple[tuple[str, str], ...] = (("format", "pt"),)

    def shard_name(self, i: int, n: int) -> str:
        """``model.safetensors`` alone, else ``model-00001-of-00003.safetensors`` and so on."""
        return self.single_name if n == 1 else f"model-{i + 1:05d}-of-{n:05d}{SUFFIX}"

    def is_shard_name(self, name: str) -> bool:
        return name.endswith(SUFFIX)

    def encode_header(self, entries: Iterable[HeaderEntry]) -> bytes:
        return encode_header(entries, dict(self.metadata))

    def index(self, shards: Sequence[IndexedShard]) -> Mapping[str, Any] | None:
        """``model.safetensors.index.json`` content; None for a single ``model.safetensors``, as
        Hugging Face writes no index then."""
        if len(shards) == 1:
            return None
        return MappingProxyType({
            "metadata": {"total_size": sum(size for _, size, _ in shards), "tensorsurgery_version": __version__},
            "weight_map": {name: filename for filename, _, names in shards for name in names},
        })

    def read_raw_header(self, fd: int, size: int) -> bytes | None:
        """Length prefix, JSON and padding; None when the length prefix does not fit the file."""
        if size < 8:
            return None
        prefix = bytearray(8)
        pread_exact(fd, memoryview(prefix), 0)
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, MAX_HEADER_SIZE):
            return None
        raw = bytearray(n)
        pread_exact(fd, memoryview(raw), 8)
        return bytes(prefix + raw)

    def parse_header(self, path: Path, raw: bytes, size: int) -> Header:
        return parse_header(path, raw[8:], size)

    def read_header(self, path: Path) -> Header:
        return read_header(path, keep_raw=False)

    def header_difference(self, found: bytes | None, expected: bytes) -> str:
        if found is None:
            return "has no valid safetensors header (its length prefix does not fit the file)"
        try:
            got = json.loads(found[8:].decode("utf-8"))
            want = json.loads(expected[8:].decode("utf-8"))
        except ValueError:
            return "header is not the planned one (not valid JSON)"
        if not isinstance(got, dict):
            return "header is not the planned one (not a JSON object)"
        if got.get("__metadata__") != want.get("__metadata__"):
            return f"header metadata is {got.get('__metadata__')!r}, expected {want.get('__metadata__')!r}"
        extra = sorted(set(got) - set(want))
        missing = sorted(set(want) - set(got))
        if missing:
            return f"header lacks tensor {missing[0]!r}"
        if extra:
            return f"header has unexpected tensor {extra[0]!r}"
        changed = [k for k in want if got[k] != want[k]]
        if changed:
            return f"header says {changed[0]!r} is {got[changed[0]]}, expected {want[changed[0]]}"
        return "header bytes differ from the planned ones (order, spacing or padding)"


#: The container every output is written in.
SAFETENSORS = SafetensorsOutput()

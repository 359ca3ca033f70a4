"""What an output container is to the rest of tensorsurgery: the one interface the planner, the
writer, ``--resume``, both ``verify`` modes, the record and ``push`` use for the files that hold
the tensors. Today's only container is safetensors
(:mod:`tensorsurgery.formats.safetensors_output`); another one is one new module implementing
:class:`OutputFormat`, and nothing else looks inside a shard's header or guesses its name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

from tensorsurgery.formats.safetensors import Header

#: A tensor as a header lays it out: name, dtype, shape, start and end in the data section.
HeaderEntry = tuple[str, str, tuple[int, ...], int, int]
#: A shard as an index lists it: file name, bytes of tensor data, the tensors' names in order.
IndexedShard = tuple[str, int, Iterable[str]]


class OutputFormat(Protocol):
    """A container of output shards: how they are named, what their headers hold and how two
    headers differ, and the index that names the shard of each tensor."""

    @property
    def index_name(self) -> str:
        """The index file's name (written only for an output of several shards)."""

    def shard_name(self, i: int, n: int) -> str:
        """The name of shard ``i`` (from 0) of ``n``."""

    def is_shard_name(self, name: str) -> bool:
        """Whether ``name`` is the name of one of this container's shards (a record's, a finished
        shard kept for ``--resume``)."""

    def encode_header(self, entries: Iterable[HeaderEntry]) -> bytes:
        """A shard's header bytes for ``entries`` (in data order), with the container's metadata."""

    def index(self, shards: Sequence[IndexedShard]) -> Mapping[str, Any] | None:
        """The index's content for ``shards``, or None when the output needs none (one shard)."""

    def read_raw_header(self, fd: int, size: int) -> bytes | None:
        """The header bytes of the open shard ``fd`` (of ``size`` bytes) as the file holds them, or
        None when the file has no header that fits it."""

    def parse_header(self, path: Path, raw: bytes, size: int) -> Header:
        """The tensors of the shard ``path`` (of ``size`` bytes) from its ``raw`` header bytes (as
        :meth:`read_raw_header` returned them)."""

    def read_header(self, path: Path) -> Header:
        """The tensors of the shard file ``path``, read from its header."""

    def header_difference(self, found: bytes | None, expected: bytes) -> str:
        """What differs between the header bytes ``found`` in a shard (None: no header that fits
        the file) and the ``expected`` ones, in words."""

"""Where a byte range's bytes are (:class:`~tensorsurgery.ops.recipe.ByteRange`): a byte source, and the
reader that reads it. Apply, ``--resume`` and both ``verify`` modes read every source byte through
these two objects, and nothing else opens a source file: another kind of source (a remote one)
is one new module implementing :class:`ByteSource` and :class:`Reader`.

A source is plan data: immutable and hashable, equal exactly when it is the same source (the
identity in a tensor's dedup and hash key, :func:`tensorsurgery.ops.recipe.identity`), with a name
for messages. It is opened once per user (a lane of the writer, a comparison) into a
:class:`Reader`, which reads any range straight into a buffer it is given (no copy in between,
the page-aligned buffers of the writer included) and may be shared by threads.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Protocol

from tensorsurgery.io.fsio import open_regular, pread_exact


class Reader(Protocol):
    """An open byte source. Safe to share between threads (reads at given offsets, no position)."""

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the source's bytes from ``offset``.

        Raises:
            ReadError: the source ends first (it changed or was truncated since it was planned).
        """

    def size(self) -> int:
        """The source's size in bytes, now."""

    def close(self) -> None:
        """Release what :meth:`ByteSource.open` took (the reader is not used after)."""


class ByteSource(Protocol):
    """The bytes a byte range points into (see the module docstring). Hashable: equal sources are
    the same bytes."""

    def __hash__(self) -> int: ...

    @property
    def name(self) -> str:
        """Its short name (a file's name), as the record and ``plan`` show it."""

    @property
    def location(self) -> str:
        """Where it is, in full (a file's path), for messages and ``plan --json``."""

    def open(self) -> Reader:
        """A reader of it; the caller closes it.

        Raises:
            SourceError: it cannot be read (missing, not a regular file...).
        """


# A NamedTuple, as ByteRange is (tensorsurgery.ops.recipe): the writer and verify hash every tensor's
# ranges for its dedup key, 1.7M in the largest plans, and a tuple hashes in C (a frozen
# dataclass's __hash__ is Python: +100 ns a tensor).
class LocalFile(NamedTuple):
    """A regular file on a local filesystem, opened with :func:`tensorsurgery.io.fsio.open_regular`'s
    checks (regular file only: a FIFO would hang, ``/dev/zero`` never ends)."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def location(self) -> str:
        return str(self.path)

    def open(self) -> FileReader:
        return FileReader(open_regular(self.path))


class FileReader:
    """A reader of an open file descriptor (owned: :meth:`close` closes it), with ``preadv``."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read_into(self, view: memoryview, offset: int) -> None:
        pread_exact(self.fd, view, offset)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        os.close(self.fd)


class Readers:
    """Readers of byte sources, each opened on first use and closed together (a context manager).
    One per user (a writer lane, a comparison); its readers may be handed to threads."""

    def __init__(self) -> None:
        self._open: dict[ByteSource, Reader] = {}

    def open(self, source: ByteSource) -> Reader:
        """The reader of ``source`` (see :meth:`ByteSource.open`). A source made of other sources
        (:mod:`tensorsurgery.ops.derived`) says ``open_in(readers)`` and opens those here: a
        tensor's made input costs no file descriptor of its own."""
        reader = self._open.get(source)
        if reader is None:
            open_in = getattr(source, "open_in", None)
            reader = self._open[source] = open_in(self) if open_in is not None else source.open()
        return reader

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()

    def __enter__(self) -> Readers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The files push uploads, each opened once and checked on its descriptor, so that what is
checked is what is uploaded: a file swapped after verify (for a link, a FIFO, another file, or
rewritten) wins no race.

:func:`stamp_folder` notes every regular file of an output before verify reads it. After verify
passed, :class:`UploadFiles` opens each file to upload without following links
(:func:`~tensorsurgery.io.fsio.open_regular`: a regular file, really inside the folder), refuses one
that is not the very file verify read (another inode, size, modification or change time: a
rename, a link or a write all change the inode's change time), and checks against the record
what costs no second read of the weights: a shard's size and header bytes, every other file's
sha256. huggingface_hub is handed the descriptor's own name (``/proc/self/fd/N``: the open file,
whatever its folder entry leads to by then), so that the upload reads the checked file and Xet
still works (huggingface_hub turns Xet off for a file object).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping

from tensorsurgery.errors import SourceError, WriteError
from tensorsurgery.formats.safetensors_output import SAFETENSORS
from tensorsurgery.io.fsio import open_regular, read_fd_limited, sha256_fd
from tensorsurgery.output.record import RecordedShard, header_sha256


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What says a file is the one verify read: device, inode, size, modification and change
    time (ns). Unlike :class:`~tensorsurgery.io.fsio.FileId`, the change time counts: between
    verify and the upload nothing of tensorsurgery's links or renames an output file."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stamp_folder(folder: Path) -> dict[str, FileStamp]:
    """The stamp of every regular file in ``folder`` (not through links), by name: taken before
    verify reads them, for :class:`UploadFiles` to compare what it uploads with."""
    with os.scandir(folder) as entries:
        found = [(e.name, e.stat(follow_symlinks=False)) for e in entries]
    return {name: FileStamp.of(st) for name, st in found if stat.S_ISREG(st.st_mode)}


class UploadFiles:
    """The open descriptors of the files of ``folder`` to upload to ``repo_id``, each opened once
    and checked (see the module docstring); closed together. A context manager.

    ``verified``: the stamps :func:`stamp_folder` took before verify passed; None (an upload
    without a verify first) checks only what the record says.
    """

    def __init__(self, folder: Path, repo_id: str, verified: Mapping[str, FileStamp] | None = None) -> None:
        self.folder, self.repo_id, self.verified = folder, repo_id, verified
        self.fds: dict[str, int] = {}
        self.stamps: dict[str, FileStamp] = {}
        self._objects: list[BinaryIO] = []

    def open(self, name: str) -> int:
        """The descriptor of the file ``name``, opened (once) and checked.

        Raises:
            WriteError: not a regular file inside the folder, or not the file verify read.
        """
        if name in self.fds:
            return self.fds[name]
        path = self.folder / name
        try:
            fd = open_regular(path, inside=self.folder, follow=False)
        except SourceError as e:
            if not os.path.lexists(path):
                raise self._refuse(f"{path}: is missing (removed since it was verified)") from None
            raise self._refuse(str(e)) from None
        self.fds[name] = fd
        self.stamps[name] = now = FileStamp.of(os.fstat(fd))
        then = None if self.verified is None else self.verified.get(name)
        if self.verified is not None and then != now:
            raise self._refuse(f"{path}: changed since it was verified ({_change(then, now)})")
        return fd

    def read(self, name: str, limit: int | None = None) -> bytes:
        """The bytes of the file ``name`` (opened as :meth:`open` does), bounded by ``limit``."""
        fd = self.open(name)
        try:
            return read_fd_limited(fd, self.folder / name, os.fstat(fd).st_size if limit is None else limit)
        except SourceError as e:
            raise self._refuse(str(e)) from None

    def check_shard(self, shard: RecordedShard) -> None:
        """The shard's size and header bytes are the record's (its tensors' bytes are verify's
        to check; the stamp says they were not touched since).

        Raises:
            WriteError: they are not.
        """
        fd = self.open(shard.name)
        size = os.fstat(fd).st_size
        if size != shard.size:
            raise self._refuse(f"{self.folder / shard.name}: is {size:,} bytes, tensorsurgery.json says "
                               f"{shard.size:,}", verify=True)
        raw = SAFETENSORS.read_raw_header(fd, size)  # a record's shards: the one container written
        if raw is None or header_sha256(raw) != shard.header_sha256:
            raise self._refuse(f"{self.folder / shard.name}: its header is not the one tensorsurgery.json records",
                               verify=True)

    def check_sha256(self, name: str, digest: str) -> None:
        """The file ``name`` holds the bytes whose sha256 the record gives.

        Raises:
            WriteError: it does not.
        """
        if sha256_fd(self.open(name)) != digest:
            raise self._refuse(f"{self.folder / name}: its sha256 is not the one tensorsurgery.json records",
                               verify=True)

    def upload_source(self, name: str) -> str | BinaryIO:
        """What to hand huggingface_hub for the file ``name``: the open file's own path
        (``/proc/self/fd/N``), or where there is none, a file object reading the descriptor."""
        fd = self.open(name)
        path = descriptor_path(fd)
        if path is not None:
            return path
        f = os.fdopen(os.dup(fd), "rb")
        self._objects.append(f)
        return f

    def check_unchanged(self) -> None:
        """Every file opened is still as it was when opened (no write since).

        Raises:
            WriteError: one changed.
        """
        for name, fd in self.fds.items():
            now = FileStamp.of(os.fstat(fd))
            if now != self.stamps[name]:
                raise self._refuse(f"{self.folder / name}: changed while it was checked for the upload "
                                   f"({_change(self.stamps[name], now)})")

    def close(self) -> None:
        for f in self._objects:
            f.close()
        for fd in self.fds.values():
            os.close(fd)
        self._objects.clear()
        self.fds.clear()

    def __enter__(self) -> UploadFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refuse(self, what: str, *, verify: bool = False) -> WriteError:
        # Nothing has been sent yet: every refusal comes before create_repo.
        then = (f"verify it (tensorsurgery verify {self.folder})" if verify
                else f"run `tensorsurgery push {self.folder} {self.repo_id}` again")
        return WriteError(f"{what}; nothing was pushed to {self.repo_id}; {then}")


def descriptor_path(fd: int) -> str | None:
    """A path that opens the very file ``fd`` is (``/proc/self/fd/N``, or ``/dev/fd/N``), checked
    to lead to it; None where the system has none."""
    st = os.fstat(fd)
    for base in ("/proc/self/fd", "/dev/fd"):
        path = f"{base}/{fd}"
        try:
            there = os.stat(path)
        except OSError:
            continue
        if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
            return path
    return None


def _change(then: FileStamp | None, now: FileStamp) -> str:
    """How the file stamped ``now`` differs from the one stamped ``then``, in words."""
    if then is None:
        return "it was not a regular file then"
    if (then.dev, then.ino) != (now.dev, now.ino):
        return "it is another file now"
    if then.size != now.size:
        return f"{then.size:,} bytes then, {now.size:,} now"
    if then.mtime_ns != now.mtime_ns:
        return "modified since"
    return "its inode changed since: renamed, linked or its permissions changed"


"""One output shard on disk: written as ``NAME.partial``, with ``O_DIRECT`` for full aligned
buffers where the filesystem allows it (the page cache is spared and writes overlap reads), then
fsynced and renamed to ``NAME``, so a file under its final name is always whole (``--resume``
relies on it)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """Where the shard ``path`` is written until it is whole."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


class ShardFile:
    """A shard being written. Use :meth:`write`, then :meth:`finish` (or :meth:`close` on failure)."""

    def __init__(self, path: Path, *, direct: bool = True):
        self.path = path
        self.partial = partial_path(path)
        # O_NOFOLLOW: a link planted at the name cannot redirect the write.
        self._fd: int | None = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                                       | os.O_CLOEXEC, 0o644)
        self._direct: int | None = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct = os.open(self.partial, os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                self._direct = None  # tmpfs and some others refuse O_DIRECT

    @property
    def direct(self) -> bool:
        """Full buffers still go through O_DIRECT (the page cache is bypassed)."""
        return self._direct is not None

    def write(self, view: memoryview, offset: int, *, aligned: bool) -> None:
        """Write ``view`` at ``offset``; ``aligned`` (buffer, offset and length all aligned to the
        page) lets it go through ``O_DIRECT``.

        Raises:
            OSError: the write failed; its filename is the partial file.
        """
        try:
            if aligned and self._direct is not None:
                try:
                    _pwrite_all(self._direct, view, offset)
                    return
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    os.close(self._direct)  # the filesystem refuses direct I/O after all
                    self._direct = None
            assert self._fd is not None
            _pwrite_all(self._fd, view, offset)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.partial)) from None

    def finish(self) -> None:
        """fsync, close and rename into place."""
        assert self._fd is not None
        os.fsync(self._fd)
        self.close()
        os.replace(self.partial, self.path)

    def close(self) -> None:
        """Close the descriptors (the partial file stays, for the caller to remove)."""
        for fd in (self._fd, self._direct):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct = None


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n

"""sha256 of every source weight file, for the provenance record.

Files in the Hugging Face cache are named by their sha256 already (``blobs/<sha256>``), so they
are never read for it. Local files are hashed by one background thread that reads each file
sequentially while ``apply`` streams; it runs beside the byte pump (on another core) and its
sequential reads double as read-ahead for the pump's reads of the same files.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Iterable

from .hub import cached_sha256

_CHUNK = 4 << 20


class SourceHasher:
    """Hash ``paths`` in a daemon thread; :meth:`result` waits and returns path -> sha256."""

    def __init__(self, paths: Iterable[Path]):
        self._paths = list(dict.fromkeys(paths))
        self._hashes: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ts-source-hasher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            buf = bytearray(_CHUNK)
            for path in self._paths:
                self._hashes[path] = cached_sha256(path) or self._hash(path, buf)
        except BaseException as e:  # noqa: BLE001 - reported by result()
            self._error = e

    def _hash(self, path: Path, buf: bytearray) -> str:
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while not self._stop.is_set() and (n := f.readinto(buf)):
                digest.update(memoryview(buf)[:n])
        return digest.hexdigest()

    def cancel(self) -> None:
        """Stop early (the run failed); :meth:`result` is then meaningless."""
        self._stop.set()

    def result(self) -> dict[Path, str]:
        """Wait for the hashes.

        Raises:
            OSError: a source file could not be read.
        """
        self._thread.join()
        if self._error is not None:
            raise self._error
        return dict(self._hashes)

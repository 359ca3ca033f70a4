"""sha256 of every source weight file, for the provenance record, and of chosen byte ranges.

Files in the Hugging Face cache are named by their sha256 already (``blobs/<sha256>``), so they
are not hashed again. Local files are hashed by background threads that read each file
sequentially while ``apply`` streams; it runs beside the byte pump (on another core) and its
sequential reads double as read-ahead for the pump's reads of the same files. The same pass
hashes any requested ranges (the tensors of shards ``--link`` shares with a source), so a linked
file is read once.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path
from typing import Iterable, Mapping

from .fsio import STREAM_CHUNK, open_regular
from .record import SourceHash

_THREADS = 2
_SHA256_BLOB = re.compile(r"[0-9a-f]{64}")

#: (name, start, end): a byte range of a file to hash on its own.
Range = tuple[str, int, int]


def cached_sha256(path: str | Path) -> str | None:
    """The sha256 of a file in the Hugging Face cache, without reading it, or None.

    The cache stores an LFS file (every safetensors shard) as ``blobs/<sha256>`` and the snapshot
    holds a symlink to it. Small files are stored under their 40-hex git blob id, and caches
    without symlinks (Windows) hold copies: both give None, so hash those yourself.
    """
    path = Path(path)
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _SHA256_BLOB.fullmatch(target.name) and target.is_file():
        return target.name
    return None


class SourceHasher:
    """Hash ``paths`` (and ``ranges`` of them) in daemon threads; :meth:`result` waits."""

    def __init__(self, paths: Iterable[Path], ranges: Mapping[Path, list[Range]] | None = None):
        self._paths = list(dict.fromkeys([*paths, *(ranges or {})]))
        self._ranges = {p: sorted(r, key=lambda x: x[1]) for p, r in (ranges or {}).items()}
        self._hashes: dict[Path, SourceHash] = {}
        self._range_hashes: dict[str, str] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        # Two threads, one file each at a time: sha256 is CPU-bound, and a file whose tensors
        # are hashed too (a linked shard) costs two hashes per byte.
        self._queue = list(reversed(self._paths))
        self._threads = [threading.Thread(target=self._run, name="ts-source-hasher", daemon=True)
                         for _ in range(min(_THREADS, len(self._paths)))]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        buf = bytearray(STREAM_CHUNK)
        try:
            while self._error is None:
                try:
                    path = self._queue.pop()  # list.pop is atomic under the GIL
                except IndexError:
                    return
                cached = cached_sha256(path)
                digest = None
                if cached is None or path in self._ranges:
                    digest = self._hash(path, buf, whole=cached is None)
                self._hashes[path] = SourceHash(cached, "hub-blob") if cached else SourceHash(digest or "", "read")
        except BaseException as e:  # noqa: BLE001 - reported by result()
            self._error = e

    def _hash(self, path: Path, buf: bytearray, whole: bool) -> str:
        digest = hashlib.sha256()
        ranges = [(name, start, end, hashlib.sha256()) for name, start, end in self._ranges.get(path, [])]
        pos = 0
        fd = open_regular(path)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while not self._stop.is_set() and (n := os.preadv(fd, [buf], pos)):
                view = memoryview(buf)[:n]
                if whole:
                    digest.update(view)
                for _, start, end, h in ranges:
                    if start < pos + n and end > pos:
                        h.update(view[max(start - pos, 0):min(end - pos, n)])
                pos += n
        finally:
            os.close(fd)
        self._range_hashes.update({name: h.hexdigest() for name, _, _, h in ranges})
        return digest.hexdigest()

    def cancel(self) -> None:
        """Stop early (the run failed); :meth:`result` is then meaningless."""
        self._stop.set()

    def result(self) -> tuple[dict[Path, SourceHash], dict[str, str]]:
        """Wait; returns (file path -> hash and its origin, range name -> sha256).

        Raises:
            TensorSurgeryError: a source file could not be opened.
            OSError: a source file could not be read.
        """
        for thread in self._threads:
            thread.join()
        if self._error is not None:
            raise self._error
        return dict(self._hashes), dict(self._range_hashes)

"""sha256 of every source weight file, for the provenance record, and of chosen byte ranges.

A source file's sha256 comes from the first of:

* ``hub-blob``: files in the Hugging Face cache are named by their sha256 (``blobs/<sha256>``);
* ``cache``: tensorsurgery's own hash cache (:class:`HashCache`), which remembers the sha256 of a
  file it hashed under the file's identity: device, inode, size, and modification and inode
  change times in nanoseconds. A write can keep the size and set the mtime back (``cp -p``,
  ``rsync --inplace -t``), but nothing sets the change time back: every write, ``utime`` or
  ``chmod`` moves it. So a second ``apply`` from the same unchanged source reads no byte of it
  twice, and a rewritten file is hashed again;
* ``read``: hashed by this run, by background threads that read each file sequentially while
  ``apply`` streams (beside the byte pump, on another core; the sequential reads double as
  read-ahead for the pump's reads of the same files). The result goes into the cache.

The same pass hashes any requested ranges (the tensors of shards ``--link`` shares with a
source), so a linked file is read once.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping

from tensorsurgery.io.fsio import STREAM_CHUNK, open_regular
from tensorsurgery.output.record import SourceHash

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


#: Environment variable: ``off`` (or ``0``, ``no``, ``false``) disables the hash cache; a path
#: puts it there instead of ``$XDG_CACHE_HOME/tensorsurgery/sha256`` (``~/.cache/...``).
CACHE_ENV = "TENSORSURGERY_HASH_CACHE"
_OFF = {"0", "off", "no", "false", "none", "disable", "disabled"}
#: A file modified this recently (ns) before its hashing started is not cached: on filesystems
#: with coarse timestamps a write right after the hash could keep the same mtime ("racy" files,
#: as git calls them).
RACY_NS = 2_000_000_000


def default_cache_dir() -> Path | None:
    """Where the hash cache lives, or None when :data:`CACHE_ENV` disables it."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tensorsurgery" / "sha256"


class HashCache:
    """sha256 of files by identity (:func:`identity`): one small JSON file per identity, so
    concurrent runs never rewrite each other's entries, and each entry is written atomically
    (a temporary file renamed into place). An entry is used only when every part of the key
    equals the file's ``fstat``; an entry that is not valid is ignored (and replaced). Errors
    reading or writing the cache never fail a run: the file is hashed instead."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    @staticmethod
    def key(st: os.stat_result) -> str:
        return "-".join(f"{v:x}" for v in identity(st).values())

    def get(self, st: os.stat_result) -> str | None:
        """The cached sha256 of the file whose ``fstat`` is ``st``, or None."""
        if self.folder is None:
            return None
        try:
            with open(self.folder / self.key(st), "rb") as f:
                entry = json.loads(f.read(4096))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict):
            return None
        digest = entry.get("sha256")
        want = identity(st)
        if not (isinstance(digest, str) and _SHA256_BLOB.fullmatch(digest)
                and all(type(entry.get(k)) is int and entry[k] == v for k, v in want.items())):
            return None
        return digest

    def put(self, st: os.stat_result, digest: str, path: Path, started_ns: int) -> None:
        """Remember ``digest`` for the file whose ``fstat`` was ``st`` before and after hashing;
        not for a file modified within :data:`RACY_NS` of ``started_ns`` (wall clock)."""
        if self.folder is None or st.st_mtime_ns >= started_ns - RACY_NS:
            return
        entry = {"sha256": digest, **identity(st), "path": str(path)}
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
            os.replace(tmp, self.folder / self.key(st))
            tmp = None
        except OSError:
            pass  # a read-only or full cache folder: the next run hashes again
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass


def identity(st: os.stat_result) -> dict[str, int]:
    """What says a file is unchanged: device, inode, size, mtime and ctime (in ns)."""
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return identity(a) == identity(b)


class SourceHasher:
    """Hash ``paths`` (and ``ranges`` of them) in daemon threads; :meth:`result` waits."""

    def __init__(self, paths: Iterable[Path], ranges: Mapping[Path, list[Range]] | None = None,
                 cache: HashCache | None = None):
        self._cache = cache if cache is not None else HashCache(default_cache_dir())
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
                self._hashes[path] = self._hash(path, buf)
        except BaseException as e:  # noqa: BLE001 - reported by result()
            self._error = e

    def _hash(self, path: Path, buf: bytearray) -> SourceHash:
        """The file's hash and its origin; reads the file only for a hash that is not known, or
        for the ranges asked of it."""
        blob = cached_sha256(path)
        fd = open_regular(path)
        try:
            before = os.fstat(fd)
            known = SourceHash(blob, "hub-blob") if blob else None
            if known is None and (digest := self._cache.get(before)) is not None:
                known = SourceHash(digest, "cache")
            if known is not None and path not in self._ranges:
                return known
            started = time.time_ns()
            digest = self._read(fd, path, buf, whole=known is None)
            if known is not None:
                return known
            if _same_file(before, os.fstat(fd)) and not self._stop.is_set():
                self._cache.put(before, digest, path, started)
            return SourceHash(digest, "read")
        finally:
            os.close(fd)

    def _read(self, fd: int, path: Path, buf: bytearray, whole: bool) -> str:
        digest = hashlib.sha256()
        ranges = [(name, start, end, hashlib.sha256()) for name, start, end in self._ranges.get(path, [])]
        pos = 0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while not self._stop.is_set() and (n := os.preadv(fd, [buf], pos)):
            view = memoryview(buf)[:n]
            if whole:
                digest.update(view)
            for _, start, end, h in ranges:
                if start < pos + n and end > pos:
                    h.update(view[max(start - pos, 0):min(end - pos, n)])
            pos += n
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

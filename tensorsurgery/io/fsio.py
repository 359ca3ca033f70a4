"""Reading files without surprises: only regular files (a FIFO would hang, ``/dev/zero`` never
ends), only inside the folder they belong to (a link out of a checkpoint could carry
``/etc/passwd`` into an output, and a push to the Hub), JSON of bounded size, and bytes streamed
in bounded chunks, never a whole file in memory.

Every source file tensorsurgery reads by name goes through :func:`open_regular`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tensorsurgery.errors import ReadError, SourceChangedError, SourceError

#: Largest JSON file read from a source, by role. A 1.7M-tensor index is ~130 MB; configs,
#: params and tokenizer configs are kilobytes, so 16 MB is generous and still bounded.
JSON_LIMIT = 16 << 20
#: How deep a JSON file may nest: checkpoints' JSON files nest a few levels (a tokenizer.json
#: about ten), and what reads them recurses.
JSON_DEPTH = 64
INDEX_LIMIT = 512 << 20
#: Largest README.md read from a source (only its front matter is used).
TEXT_LIMIT = 4 << 20
#: Bytes per read when streaming a file (hashing, copying).
STREAM_CHUNK = 1 << 20

Progress = Callable[[int], None] | None


def existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest parent that does (where a folder made at
    ``path`` would live: its filesystem, its free space, its permissions)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def describe_mode(mode: int) -> str:
    """What kind of file ``mode`` (from ``stat``) is, in words."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def describe_entry(path: Path, mode: int) -> str:
    """What the folder entry ``path`` (``mode`` from ``lstat``) is, in words; a link says where it leads."""
    if stat.S_ISLNK(mode):
        try:
            return f"a symbolic link (to {os.readlink(path)})"
        except OSError:
            return "a symbolic link"
    return describe_mode(mode)


def _require_inside(path: Path, real: str, root: Path) -> None:
    top = os.path.realpath(root)
    if real != top and not real.startswith(top.rstrip(os.sep) + os.sep):
        raise SourceError(f"{path}: is a link to {real}, outside {root}; a checkpoint's files must be inside "
                          f"its folder (copy the file in instead of linking it)")


@dataclass(frozen=True, slots=True)
class FileId:
    """What says a source file is the one that was planned: device, inode, size and modification
    time (ns), from ``fstat``. Not the inode change time: ``--link`` hard-links a planned file,
    which moves it, and the bytes are no different."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open_regular(path: Path, *, inside: Path | None = None, follow: bool = True,
                 expected: FileId | None = None) -> int:
    """A read-only descriptor of the regular file ``path``, every check made on the descriptor
    itself, so that what is checked is what is read (a name swapped for a link or a FIFO between
    a check by name and the open wins no race).

    Opened with ``O_NONBLOCK`` so a FIFO cannot hang the open (cleared once ``fstat`` says it is a
    regular file); with ``inside``, the opened file's real location (the kernel's, from
    ``/proc/self/fd``) must be in that folder.

    Args:
        path: the file.
        inside: when given, the folder the file's real location must be in.
        follow: False: ``path`` itself must not be a link (``O_NOFOLLOW``; an output's files).
        expected: the identity the file had when it was planned; another file, or this one
            changed since, is refused.

    Raises:
        SourceError: missing, unreadable, not a regular file, or outside ``inside``.
        SourceChangedError: not the file planned (``expected``).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SourceError(f"{path}: missing (or a link to a missing file); the checkpoint is incomplete, "
                          f"re-download it") from None
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise SourceError(f"{path}: is {describe_entry(path, stat.S_IFLNK)}, not a regular file; replace it "
                              f"with the real file") from None
        raise SourceError(f"{path}: cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if inside is not None:
            _require_inside(path, _real_location(fd, path, st), inside)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{path}: is {describe_mode(st.st_mode)}, not a regular file; replace it with the "
                              f"real file")
        if expected is not None and FileId.of(st) != expected:
            raise SourceChangedError(f"{path}: changed since it was planned ({_change(expected, st)}); run the "
                                     f"command again")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _real_location(fd: int, path: Path, st: os.stat_result) -> str:
    """Where the file open as ``fd`` really is: the kernel's name for it. Without ``/proc``, the
    real path of ``path``, when it leads to the very file opened (else it was swapped meanwhile)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = os.path.realpath(path)
        try:
            now = os.stat(real, follow_symlinks=False)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise SourceChangedError(f"{path}: changed while it was opened; run the command again") from None
        return real


def _change(planned: FileId, st: os.stat_result) -> str:
    """How the file open with ``fstat`` result ``st`` differs from the ``planned`` one, in words."""
    if (st.st_dev, st.st_ino) != (planned.dev, planned.ino):
        return "it is another file now"
    if st.st_size != planned.size:
        return f"{planned.size:,} bytes then, {st.st_size:,} now"
    return "modified since"


def check_regular(path: Path, *, inside: Path | None = None) -> None:
    """Refuse ``path`` unless it is a regular file whose real location is in ``inside``; nothing is
    read (see :func:`open_regular`)."""
    os.close(open_regular(path, inside=inside))


def read_limited(path: Path, limit: int, *, inside: Path | None = None, follow: bool = True) -> bytes:
    """The bytes of the regular file ``path``, refused past ``limit`` bytes.

    Raises:
        SourceError: see :func:`open_regular`, or the file is larger than ``limit``.
    """
    fd = open_regular(path, inside=inside, follow=follow)
    try:
        return read_fd_limited(fd, path, limit)
    finally:
        os.close(fd)


def read_fd_limited(fd: int, path: Path, limit: int) -> bytes:
    """The bytes of the open regular file ``fd`` (``path``, for messages), from its start,
    refused past ``limit`` bytes.

    Raises:
        SourceError: the file is (or grew while read) larger than ``limit``.
    """
    size = os.fstat(fd).st_size
    if size > limit:
        raise SourceError(f"{path}: is {size:,} bytes, more than the {limit:,} such a file may weigh; this is "
                          f"not the file a checkpoint holds there")
    # What fstat says, plus one byte to see a file that grew: never a buffer of ``limit`` bytes.
    chunks, total = [], 0
    while total <= limit and (chunk := os.pread(fd, min(size - total, limit - total) + 1, total)):
        chunks.append(chunk)
        total += len(chunk)
    if total > limit:
        raise SourceError(f"{path}: grew past the {limit:,} bytes such a file may weigh while it was read; this is "
                          f"not the file a checkpoint holds there")
    return b"".join(chunks)


def read_json(path: Path, *, limit: int = JSON_LIMIT, inside: Path | None = None, follow: bool = True) -> Any:
    """Parse the JSON file ``path`` (bounded by ``limit`` bytes; NaN and Infinity refused).

    Raises:
        SourceError: unreadable, oversized, not UTF-8 or not valid JSON.
    """
    return parse_json(read_limited(path, limit, inside=inside, follow=follow), path)


def parse_json(raw: bytes, path: Path) -> Any:
    """Parse ``raw``, the bytes of the JSON file ``path`` (NaN and Infinity refused; nesting
    bounded by :data:`JSON_DEPTH`).

    Raises:
        SourceError: not UTF-8, not valid JSON, or nested too deep.
    """
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SourceError(f"{path}: not valid JSON ({e}); re-download it") from None
    if json_depth(value) > JSON_DEPTH:
        raise SourceError(f"{path}: JSON nested deeper than {JSON_DEPTH} levels; no checkpoint file nests "
                          f"like this, so it is not the file a checkpoint holds there")
    return value


def json_depth(value: Any) -> int:
    """How deep ``value`` nests (a scalar is 0, ``[]`` is 1), found without recursion: the
    copies and comparisons of a config recurse, and fail near Python's limit of 1,000 frames."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_text(path: Path, *, limit: int = TEXT_LIMIT, inside: Path | None = None) -> str:
    """The first ``limit`` bytes of the regular file ``path`` as text (UTF-8, undecodable bytes
    replaced); the rest is not read. For a model card, whose front matter comes first: cards
    with embedded images run to megabytes, and that is no reason to refuse a checkpoint."""
    fd = open_regular(path, inside=inside)
    try:
        data = b""
        while len(data) < limit and (more := os.read(fd, limit - len(data))):
            data += more
    finally:
        os.close(fd)
    return data.decode("utf-8", errors="replace")


def pread_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``.

    Raises:
        ReadError: the file ends first (it changed or was truncated since it was planned).
    """
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise ReadError(f"{fd_path(fd)}: ends before byte {offset}; the file changed or was truncated "
                            f"since it was planned")
        view, offset = view[n:], offset + n


def fd_path(fd: int) -> str:
    """The path an open descriptor refers to, for messages."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def sha256_fd(fd: int, *, progress: Progress = None) -> str:
    """sha256 of everything ``fd`` holds, read sequentially in bounded chunks."""
    digest = hashlib.sha256()
    buf = bytearray(STREAM_CHUNK)
    offset = 0
    while n := os.preadv(fd, [buf], offset):
        digest.update(memoryview(buf)[:n])
        offset += n
        if progress:
            progress(n)
    return digest.hexdigest()


def sha256_file(path: Path, *, inside: Path | None = None, progress: Progress = None) -> str:
    """sha256 of the regular file ``path``, streamed (see :func:`open_regular` for the checks)."""
    fd = open_regular(path, inside=inside)
    try:
        return sha256_fd(fd, progress=progress)
    finally:
        os.close(fd)


def copy_file(src: Path, dst: Path, *, inside: Path | None = None) -> str:
    """Copy the regular file ``src`` to the new file ``dst`` (never an existing one, never through a
    link), streamed and fsynced; returns the sha256 of the bytes copied."""
    fd = open_regular(src, inside=inside)
    try:
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            digest = hashlib.sha256()
            buf = bytearray(STREAM_CHUNK)
            offset = 0
            while n := os.preadv(fd, [buf], offset):
                view = memoryview(buf)[:n]
                digest.update(view)
                while len(view):
                    view = view[os.write(out, view):]
                offset += n
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(fd)
    return digest.hexdigest()


class OpenFiles:
    """Read-only descriptors of regular files, opened on first use and closed together. A
    context manager; not shared between threads (each thread keeps its own)."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}

    def open(self, path: Path, *, inside: Path | None = None) -> int:
        """The descriptor of ``path`` (see :func:`open_regular` for the checks)."""
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = open_regular(path, inside=inside)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> OpenFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

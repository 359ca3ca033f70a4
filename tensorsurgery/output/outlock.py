"""One writer per output: ``apply`` holds an exclusive ``flock`` on ``.NAME.tensorsurgery-lock``,
beside the output and its temporary folder, for its whole run (as huggingface_hub locks around its
``.incomplete`` files). The file holds the holder's pid, to name it to a second run.

The kernel drops a flock when its holder dies, however it dies: a lock file that exists but that
nobody holds was left by a killed run and is simply taken over (that is the stale case). The holder
deletes the file before it lets go; a run that locked the inode just deleted sees that the name now
points elsewhere (or nowhere) and tries again, so two runs never hold two different inodes.
"""
from __future__ import annotations

import fcntl
import os
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tensorsurgery.errors import OutputBusyError, OutputExistsError, WriteError
from tensorsurgery.io.fsio import describe_entry

LOCK_SUFFIX = ".tensorsurgery-lock"
#: The pid is written at a fixed width over the start of the file, so a reader never sees it empty.
_PID_WIDTH = 20


def lock_path(target: Path) -> Path:
    """The lock file of the output folder ``target``."""
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold the lock of ``target`` (whose parent folder exists) for the ``with`` block.

    Raises:
        OutputBusyError: another live run holds it.
        OutputExistsError: something that is not a regular file is at the lock's name.
    """
    path = lock_path(target)
    fd = _acquire(path, target)
    try:
        yield
    finally:
        try:
            if _same_file(path, fd):
                os.unlink(path)  # still locked: a run that opened it retries on a fresh file
        except OSError:
            pass
        os.close(fd)


def holder(target: Path) -> int | None:
    """The pid of the live run that holds ``target``'s lock, or None (no lock, or a stale one)."""
    try:
        fd = os.open(lock_path(target), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        return None
    finally:
        os.close(fd)


def _acquire(path: Path, target: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if not os.path.lexists(path):
                raise WriteError(f"{path}: {e.strerror or e}; nothing was written to {target}; free disk space or "
                                 f"choose another --output, then run the same command again") from e
            raise _not_a_lock(path, os.lstat(path).st_mode) from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _not_a_lock(path, os.fstat(fd).st_mode)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                for _ in range(20):  # the holder may be between its lock and its pwrite
                    if pid is not None:
                        break
                    time.sleep(0.01)
                    pid = _read_pid(fd)
                raise OutputBusyError(f"another tensorsurgery (pid {pid if pid is not None else 'unknown'}) is "
                                      f"writing {target}; wait for it or stop it") from None
            if not _same_file(path, fd):
                os.close(fd)  # locked a file its holder deleted on the way out: take the new one
                continue
            try:
                os.pwrite(fd, f"{os.getpid():<{_PID_WIDTH - 1}}\n".encode(), 0)
            except OSError:
                pass  # a full disk: the lock holds without the pid, which only names the holder
            return fd
        except BaseException:
            os.close(fd)
            raise


def _not_a_lock(path: Path, mode: int) -> OutputExistsError:
    """Something else (a link, a folder, a FIFO) sits at the lock file's name: the user's to remove."""
    return OutputExistsError(f"{path}: is {describe_entry(path, mode)}, at the name of tensorsurgery's lock file; "
                             f"remove it yourself, then run the same command again")


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, _PID_WIDTH, 0).decode("ascii").strip()
        return int(text) if text else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None

"""The file-system steps around the temporary folder, each leaving a state the next run (holding the
output's lock, :mod:`tensorsurgery.output.outlock`) recognises: making the temporary folder with its marker
in one rename, swapping it in for an earlier output (``--force``), and finishing or undoing a swap a
crash interrupted. The states and what each command does from them: :mod:`tensorsurgery.output.writer`.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from tensorsurgery.output.target import TMP_MARKER, is_ours
from tensorsurgery.sources.checkpoint import RECORD_NAME

NEW_INFIX = ".tensorsurgery-new-"
OLD_INFIX = ".tensorsurgery-old-"


def make_temp_folder(target: Path, tmp: Path) -> None:
    """Create ``tmp`` holding its marker: both are made under a fresh name, then renamed to ``tmp``,
    so a full disk or a kill never leaves a folder at ``tmp`` without its marker."""
    new = Path(tempfile.mkdtemp(prefix=f".{target.name}{NEW_INFIX}", dir=target.parent))
    try:
        os.close(os.open(new / TMP_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644))
        # rename(2) refuses a link or a non-empty folder at tmp (checked absent under the lock
        # just before); at worst an empty folder planted there since is replaced, losing nothing.
        os.rename(new, tmp)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``. An existing ``target`` (``--force``) is first
    moved onto a fresh empty ``.NAME.tensorsurgery-old-*`` folder and deleted only once the new
    one is in place; the marker travels with the folder and is removed last, so an interrupted
    swap is recognised (:func:`finish_interrupted`)."""
    old = None
    if os.path.lexists(target):
        # A fresh folder of our own to rename the old output onto: whatever else is beside the
        # target, under any name, is never replaced or deleted.
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_INFIX}", dir=target.parent))
        os.replace(target, old)
    os.rename(tmp, target)
    (target / TMP_MARKER).unlink()
    fsync_dir(target.parent)
    if old is not None:
        remove_folder(old, last=RECORD_NAME)


def finish_interrupted(target: Path) -> list[str]:
    """Bring what an interrupted run left around ``target`` to a complete state; notes for the user.

    - a ``-new-`` folder (killed while making its temporary folder): removed;
    - no ``target`` and an earlier output in an ``-old-`` folder (killed between the two renames of
      ``--force``): the earlier output is put back under its name;
    - ``target`` holding the marker (killed after the new output was renamed into place): the marker
      is removed, which completes the new output;
    - ``-old-`` folders beside a complete ``target``: deleted.

    Only folders tensorsurgery makes are touched: under those names, not links, and (``-old-``) an
    earlier output or an empty folder, as ``--force`` replaces; anything else stays.
    """
    notes: list[str] = []
    parent = target.parent
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return notes
    for name in names:
        path = parent / name
        if name.startswith(f".{target.name}{NEW_INFIX}") and _is_dir(path) \
                and set(os.listdir(path)) <= {TMP_MARKER}:
            shutil.rmtree(path)
    olds = [parent / n for n in names if n.startswith(f".{target.name}{OLD_INFIX}") and _replaceable(parent / n)]
    if not os.path.lexists(target) and olds:
        olds.sort(key=lambda p: os.lstat(p).st_mtime_ns)
        back = olds.pop()
        os.rename(back, target)
        fsync_dir(parent)
        notes.append(f"restored {target} from {back}, where an interrupted --force run had moved it")
    elif is_ours(target) and _is_file(target / RECORD_NAME):
        (target / TMP_MARKER).unlink()
        fsync_dir(parent)
        notes.append(f"completed {target}, renamed into place by an interrupted run")
    if _is_dir(target) and not _is_file(target / TMP_MARKER):
        for old in olds:
            remove_folder(old, last=RECORD_NAME)
            notes.append(f"removed {old}, an earlier output an interrupted --force run had not deleted")
    return notes


def remove_folder(folder: Path, *, last: str) -> None:
    """Delete ``folder``, its file ``last`` (the marker of a temporary folder, the record of an
    earlier output) after everything else: killed part-way, the folder is still recognised as
    tensorsurgery's and the next run finishes the deletion."""
    for name in os.listdir(folder):
        if name != last:
            path = folder / name
            shutil.rmtree(path) if _is_dir(path) else path.unlink()
    (folder / last).unlink(missing_ok=True)
    folder.rmdir()


def _replaceable(path: Path) -> bool:
    """An earlier output (its record a regular file) or an empty folder: what --force moved aside."""
    return _is_dir(path) and (not os.listdir(path) or _is_file(path / RECORD_NAME))


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def fsync_dir(path: Path) -> None:
    """Make the renames and removals in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Where an output may be written, decided before anything is: never the current folder or a folder
holding it, never over or inside a source, never over something that is not an earlier output
(``--force`` replaces only those, or an empty folder), only where the filesystem can take files;
and the temporary folder beside the target, which tensorsurgery makes itself or refuses.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from tensorsurgery.errors import OutputExistsError
from tensorsurgery.io.fsio import describe_entry, existing_ancestor
from tensorsurgery.planning.planner import Plan
from tensorsurgery.sources.checkpoint import RECORD_NAME

TMP_SUFFIX = ".tensorsurgery-tmp"
#: Put in a temporary folder when tensorsurgery creates it: only a folder holding it is ever
#: resumed from or deleted (a folder or link planted at that name is refused instead).
TMP_MARKER = ".tensorsurgery-partial"


def temp_path(target: Path) -> Path:
    """The temporary folder ``apply`` writes into before renaming it to ``target``."""
    return target.parent / f".{target.name}{TMP_SUFFIX}"


def check_output(plan: Plan, *, force: bool) -> Path:
    """The absolute output path, after refusing unsafe targets.

    Raises:
        OutputExistsError: the output exists and ``force`` is false; it exists and is not an
            earlier tensorsurgery output nor an empty folder; it is a mount point; it is the
            current folder or holds it; it overlaps a source; it cannot be written.
    """
    target = check_place(plan)
    if target.is_symlink() or target.exists():
        if target.is_dir() and not target.is_symlink() and is_mount_point(target):
            # Found before writing: the final rename onto a mount point fails (EBUSY) only after
            # every byte was written, and --force would not help.
            raise OutputExistsError(f"{target}: is a mount point (a volume); an output is written beside it and "
                                    f"renamed into place, which a mount point cannot take; write into a folder "
                                    f"inside it: --output {target / plan.output.name}")
        if not force:
            raise OutputExistsError(f"{target}: already exists; pass --force to replace it, or choose another "
                                    f"--output")
        _check_replaceable(target)
    return target


def check_place(plan: Plan) -> Path:
    """The absolute output path, after refusing places an output may never go, whatever is there
    now: the current folder or one holding it, over or inside a source, not writable.

    Raises:
        OutputExistsError: as :func:`check_output`, except for what concerns an existing output.
    """
    target = Path(os.path.abspath(plan.output.expanduser()))
    real = target.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OutputExistsError(f"{target}: is the current folder or holds it; give the output a folder of its own "
                                f"(for example out/NAME)")
    for src in plan.sources:
        root = src.root.resolve()
        if real == root or root in real.parents or real in root.parents:
            raise OutputExistsError(f"{target}: the output overlaps the source {src.name!r} ({root}); "
                                    f"choose an output folder outside the source")
    _check_writable(target.parent)
    return target


def is_mount_point(folder: Path) -> bool:
    """Whether ``folder`` is a mount point (its device differs from its parent's, or it is its
    own parent): a container volume, which cannot be renamed or replaced."""
    return os.path.ismount(folder)


def _check_replaceable(target: Path) -> None:
    """``--force`` replaces only what tensorsurgery made or an empty folder: a mistyped path must
    not cost someone their files."""
    mode = os.lstat(target).st_mode
    if not stat.S_ISDIR(mode):
        raise OutputExistsError(f"{target}: exists and is {describe_entry(target, mode)}, not a folder; --force "
                                f"replaces only an earlier tensorsurgery output; remove it yourself or choose another "
                                f"--output")
    entries = os.listdir(target)
    record = target / RECORD_NAME
    if entries and not (record.is_file() and not record.is_symlink()):
        raise OutputExistsError(f"{target}: exists and is not a tensorsurgery output (no {RECORD_NAME}); --force "
                                f"replaces only an earlier output or an empty folder; remove it yourself or choose "
                                f"another --output")


def _check_writable(folder: Path) -> None:
    """Refuse an output whose nearest existing parent cannot take it, before the free-space check
    (which would call /proc "full"). Checked without writing anything (a dry run asks too)."""
    probe = existing_ancestor(folder)
    why = None
    if not probe.is_dir():
        why = "not a folder"
    else:
        fs = os.statvfs(probe)
        if fs.f_blocks == 0:
            why = "a virtual filesystem that holds no files"
        elif fs.f_flag & os.ST_RDONLY:
            why = "a read-only filesystem"
        elif not os.access(probe, os.W_OK | os.X_OK):
            why = "no write permission"
    if why is not None:
        raise OutputExistsError(f"{probe}: is not a writable folder ({why}); choose an --output where you can write")


def is_ours(tmp: Path) -> bool:
    """Whether ``tmp`` is a temporary folder tensorsurgery made: a folder (not a link to one)
    holding the marker, a regular file (not a link planted to look like one)."""
    try:
        return stat.S_ISDIR(os.lstat(tmp).st_mode) and stat.S_ISREG(os.lstat(tmp / TMP_MARKER).st_mode)
    except OSError:
        return False

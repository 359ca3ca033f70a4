"""Run a :class:`Plan`: stream the shards into a temporary folder beside the target, write the
other files (:mod:`tensorsurgery.output.expected`) and the provenance record, fsync, and rename the folder
into place.

Nothing appears under the final name until everything is written; a source is never opened for
writing; an existing output is replaced only with ``force``, only if it is an earlier
tensorsurgery output or an empty folder, and only after the new one is complete.

The steps, and the state a crash (kill, full disk, power) leaves after each. ``OUT`` is the
output, ``T`` = ``.OUT.tensorsurgery-tmp`` (with its marker), ``N`` = ``.OUT.tensorsurgery-new-*``,
``O`` = ``.OUT.tensorsurgery-old-*``, ``L`` = ``.OUT.tensorsurgery-lock``. Every run first takes
``L`` (a second live run is refused, exit 2, touching nothing; a lock nobody holds is stale and
taken over), then brings the state back to one of the first column (:func:`swap.finish_interrupted`):

====  ==========================================  =====================================  ==============================
step  what it does                                on disk if it is interrupted here       what the next run does
====  ==========================================  =====================================  ==============================
1     take ``L``, write the pid                   ``L`` (stale)                           takes ``L`` over
2     make ``N`` + marker, rename ``N`` -> ``T``  ``N`` (empty or marker only)            removes ``N``
3     shards ``X.partial`` -> ``X``, fsynced      ``T`` + finished shards                 plain/--force: removes ``T``
                                                                                          (marker last); --resume: keeps
                                                                                          the shards that verify
4     other files, record, fsync                  ``T`` + shards (the rest is dropped)    as 3
5     (--force) ``mkdtemp O``, ``OUT`` -> ``O``   ``OUT`` missing, earlier output in      renames ``O`` back to ``OUT``,
                                                  ``O``, ``T`` complete                   then as 3 (with --force)
6     ``T`` -> ``OUT``                            ``OUT`` new, marker inside; ``O``       removes the marker (``OUT``
                                                                                          complete), removes ``O``
7     remove the marker, fsync the parent         ``OUT`` complete; ``O``                 removes ``O`` (record last)
8     remove ``O`` (its record last)              ``OUT`` complete, part of ``O``         removes ``O``
9     remove ``L``, let go of it                  ``OUT`` complete, ``L`` (stale)         takes ``L`` over
====  ==========================================  =====================================  ==============================

Ctrl-C, SIGTERM and errors are cleaned up in the run itself: from steps 2-4 it keeps the finished
shards and says whether ``--resume`` helps; from 5 it puts the earlier output back; from 6 on the
new output is completed and the message says it is in place.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from tensorsurgery.errors import OutputExistsError, WriteError
from tensorsurgery.formats.output_format import OutputFormat
from tensorsurgery.io.fsio import copy_file, describe_entry, existing_ancestor, open_regular
from tensorsurgery.output.compare import compare_shard
from tensorsurgery.output.expected import ExpectedFile, expected_files, json_stream
from tensorsurgery.output.linking import find_copied_links
from tensorsurgery.output.outlock import output_lock
from tensorsurgery.output.pump import Pump
from tensorsurgery.output.record import TENSORS, SourceHash, record_head, tensor_entries
from tensorsurgery.output.source_hash import SourceHasher
from tensorsurgery.output.swap import finish_interrupted, fsync_dir, make_temp_folder, move_into_place, remove_folder
from tensorsurgery.output.target import TMP_MARKER, check_output, check_place, is_ours, temp_path
from tensorsurgery.planning.planner import Plan, Shard
from tensorsurgery.sources.checkpoint import RECORD_NAME


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What ``apply`` wrote: the folder, its files, the bytes written (files, headers included; linked
    shards excluded), time, and notes for the user (a leftover temporary folder removed, shards
    kept by ``--resume``)."""

    output: Path
    files: tuple[str, ...]
    nbytes: int
    seconds: float
    tensor_hashes: Mapping[str, str]
    notes: tuple[str, ...] = ()


def execute_plan(plan: Plan, *, force: bool = False, resume: bool = False,
                 progress: Callable[[int], None] | None = None, direct: bool = True,
                 threads: int = 1) -> WriteResult:
    """Write ``plan`` to disk, atomically.

    Shards are streamed into a temporary folder beside the target (:func:`temp_path`); the
    copied files, index, config.json and card follow, then the provenance record; the folder is
    renamed into place last. If the run fails or is interrupted, the finished shards stay in the
    temporary folder and the unfinished one is removed.

    Args:
        plan: from :func:`tensorsurgery.planning.planner.build_plan`.
        force: replace an existing output folder (only once the new one is complete).
        resume: keep the finished shards of an interrupted run whose bytes verify against the
            plan, and write only the rest. Without it a leftover temporary folder is removed.
        progress: called with byte counts as shard bytes are written (from another thread).
        direct: try ``O_DIRECT`` for shard writes (falls back where the filesystem refuses).
        threads: threads that hash output tensors.

    Raises:
        OutputExistsError: see :func:`check_output`, or a temporary folder tensorsurgery did not make.
        WriteError: not enough free disk, or a write failed.
        ReadError: a source changed while it was read.
    """
    started = time.monotonic()
    target = check_place(plan)
    tmp = temp_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{e.filename or target.parent}: {e.strerror or e}; nothing was written to {target}; "
                         f"choose an --output where you can write") from e
    result = None
    try:
        with output_lock(target):
            # What an interrupted run left is finished (or undone) first, then the output is checked
            # again: it may have appeared (another run, or a restored --force) since the first look.
            try:
                notes = finish_interrupted(target)
            except OSError as e:
                raise WriteError(f"{e.filename or target}: {e.strerror or e}, while finishing what an interrupted "
                                 f"run left; nothing was written to {target}; run the same command again") from e
            try:
                target = check_output(plan, force=force)
            except OutputExistsError as e:
                if any(n.startswith("completed ") for n in notes):
                    raise OutputExistsError(f"{target}: is complete: an interrupted run had renamed it into place "
                                            f"and this run finished it; pass --force to replace it") from e
                raise
            result = _write(plan, target, tmp, notes, started, resume=resume, progress=progress, direct=direct,
                            threads=threads)
    except BaseException as e:
        if result is not None:  # interrupted while letting go of the lock: the output is done
            _placed(e, target)
        raise
    return result


def _write(plan: Plan, target: Path, tmp: Path, notes: list[str], started: float, *, resume: bool,
           progress: Callable[[int], None] | None, direct: bool, threads: int) -> WriteResult:
    """:func:`execute_plan` once the lock is held and the output checked."""
    kept = _reuse_leftover(plan, tmp, resume, notes)
    todo = [s for s in plan.shards if s.filename not in kept]
    # A link to a source on another filesystem cannot be made: that shard is copied, and needs space.
    copied = find_copied_links(plan)
    unlinkable = {name for c in copied for name in c.shards}
    notes.extend(c.note for c in copied)
    _check_free_space(tmp.parent, sum(s.nbytes for s in todo if s.link is None or s.filename in unlinkable))
    source_hasher = None
    swapping = False
    try:
        if not is_ours(tmp):
            make_temp_folder(target, tmp)
        linked = [s for s in todo if s.link is not None and s.filename not in unlinkable
                  and _link(s.link, tmp / s.filename)]
        # A linked shard's tensors are hashed in the same sequential pass as its source file.
        source_hasher = SourceHasher([s.root / f for s in plan.sources for f in s.files],
                                     {s.link: _tensor_ranges(s) for s in linked if s.link is not None})
        hashes = Pump(progress=progress, direct=direct, threads=threads).run(
            (s, tmp / s.filename) for s in todo if s not in linked)
        source_hashes, linked_hashes = source_hasher.result()
        hashes.update(linked_hashes)
        for shard_hashes in kept.values():
            hashes.update(shard_hashes)
        _write_files(plan, tmp, hashes, source_hashes)
        swapping = True
        move_into_place(tmp, target)
    except BaseException as e:
        if source_hasher is not None:
            source_hasher.cancel()
        if swapping:
            # Undo a half-done swap (the earlier output back under its name) or complete one
            # whose new output is already in place; which one, the disk says.
            finish_interrupted(target)
            if not os.path.lexists(tmp):
                _placed(e, target)
        finished = _discard_unfinished(tmp, plan.output_format)
        then = (f"run the same command with --resume to keep the {finished} finished shard(s)" if finished
                else "run the same command again")
        if isinstance(e, WriteError):
            raise WriteError(f"{e}, then {then}") from e
        if isinstance(e, OSError):
            raise WriteError(f"{e.filename or target}: {e.strerror or e}; nothing was written to {target}; "
                             f"{then}") from e
        raise
    files = tuple(sorted(p.name for p in target.iterdir()))
    written = sum(s.nbytes for s in todo if s not in linked)
    return WriteResult(output=target, files=files, nbytes=written, seconds=time.monotonic() - started,
                       tensor_hashes=hashes, notes=tuple(notes))


def _link(source: Path, dest: Path) -> bool:
    """Make ``dest`` share ``source``'s bytes: a reflink (copy-on-write clone) where the
    filesystem supports it, else a hard link; False when neither works (then it is copied).
    A hard link shares the inode: editing one file in place edits the other (see README)."""
    # Never open an existing dest for writing: were it a hard link to the source, "wb" would
    # truncate the source itself.
    dest.unlink(missing_ok=True)
    try:
        # open_regular: the planned source file, still a regular file (a FIFO swapped in since
        # the plan would block a plain open).
        with os.fdopen(open_regular(source), "rb") as src, open(dest, "xb") as dst:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
        return True
    except OSError:
        dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
        return True
    except OSError:
        return False


# ioctl number of FICLONE (linux/fs.h): clone a whole file on btrfs, XFS (reflink=1), bcachefs.
_FICLONE = 0x40049409


def _reuse_leftover(plan: Plan, tmp: Path, resume: bool, notes: list[str]) -> dict[str, dict[str, str]]:
    """Shards of an interrupted run to keep (name -> tensor hashes); clears the rest."""
    if not tmp.exists() and not tmp.is_symlink():
        if resume:
            notes.append("--resume: no interrupted run found; writing everything")
        return {}
    mode = os.lstat(tmp).st_mode
    if not is_ours(tmp):
        what = describe_entry(tmp, mode) if not stat.S_ISDIR(mode) else "a folder tensorsurgery did not make"
        raise OutputExistsError(f"{tmp}: is {what}, at the name of tensorsurgery's temporary folder; remove it "
                                f"yourself, then run the same command again")
    if not resume:
        remove_folder(tmp, last=TMP_MARKER)
        notes.append(f"removed {tmp}, left by an interrupted run (use --resume to keep its finished shards)")
        return {}
    kept = {}
    for shard in plan.shards:
        hashes, diffs = compare_shard(shard, tmp / shard.filename, stop_early=True, fmt=plan.output_format)
        if not diffs:
            kept[shard.filename] = hashes
    for path in tmp.iterdir():
        if path.name not in kept and path.name != TMP_MARKER:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    notes.append(f"--resume: kept {len(kept)} of {len(plan.shards)} shard(s) that verify against the plan")
    return kept


def _check_free_space(folder: Path, need: int) -> None:
    probe = existing_ancestor(folder)
    free = shutil.disk_usage(probe).free
    # A little slack for the index, config, record and filesystem metadata.
    if need + (16 << 20) > free:
        raise WriteError(f"{probe}: not enough free disk space: the output needs {need:,} bytes, "
                         f"{free:,} are free; free some space or choose another --output")


def _tensor_ranges(shard: Shard) -> list[tuple[str, int, int]]:
    return [(t.name, t.source.offset, t.source.offset + t.nbytes) for t in shard.tensors if t.source]


def _write_files(plan: Plan, folder: Path, hashes: Mapping[str, str],
                 source_hashes: Mapping[Path, SourceHash]) -> None:
    """Everything but the shards, then the record, whose content needs all their hashes."""
    file_hashes = {f.name: _write_file(folder, f) for f in expected_files(plan) if f.shard is None}
    # Streamed: the record of a 500k-tensor plan is ~200 MB of JSON, never held whole.
    _write_bytes(folder / RECORD_NAME, json_stream(record_head(plan, file_hashes, source_hashes), TENSORS,
                                                   tensor_entries(plan, hashes)))
    fsync_dir(folder)


def _write_file(folder: Path, f: ExpectedFile) -> str:
    if f.copy is not None:
        return copy_file(f.copy.source, folder / f.name, inside=f.copy.inside)
    assert f.data is not None
    return _write_bytes(folder / f.name, f.data)


def _write_bytes(path: Path, data: bytes | Iterable[bytes]) -> str:
    """Write ``data`` (bytes, or pieces of them) to the new file ``path``, fsynced; returns its sha256."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    digest = hashlib.sha256()
    try:
        for piece in [data] if isinstance(data, bytes) else data:
            digest.update(piece)
            view = memoryview(piece)
            while len(view):
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _discard_unfinished(tmp: Path, fmt: OutputFormat) -> int:
    """After a failure: keep finished shards (of the container ``fmt``, for ``--resume``), drop
    everything else; returns how many shards were kept."""
    if not is_ours(tmp):
        return 0
    for path in tmp.iterdir():
        if not fmt.is_shard_name(path.name) and path.name != TMP_MARKER:
            path.unlink(missing_ok=True) if not path.is_dir() or path.is_symlink() else shutil.rmtree(path)
    kept = len([p for p in tmp.iterdir() if p.name != TMP_MARKER])
    if not kept:
        remove_folder(tmp, last=TMP_MARKER)
    return kept


def _placed(e: BaseException, target: Path) -> None:
    """An interrupt or error after the new output was renamed into place: the run is done but for
    deleting the earlier output, which the next run finishes."""
    if isinstance(e, OSError):
        raise WriteError(f"{e.filename or target}: {e.strerror or e}; {target} is complete and in place, but the "
                         f"earlier output it replaced may remain beside it; the next apply to {target} removes "
                         f"it") from e
    # Read by the command line to say what an interrupt left (see cli._interrupted_note).
    e.output_note = f"{target} is complete and in place; nothing is left to do"  # type: ignore[attr-defined]

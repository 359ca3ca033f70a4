"""Run a :class:`Plan`: stream the shards into a temporary folder beside the target, write the
index, config, copied files and provenance record, fsync, and rename the folder into place.

Nothing appears under the final name until everything is written; a source is never opened for
writing; an existing output is replaced only with ``force`` (and only after the new one is
complete).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .card import model_card
from .errors import OutputExistsError, WriteError
from .plan import Plan, Shard
from .provenance import PROVENANCE_NAME, provenance_record
from .source import INDEX_NAME
from .source_hash import SourceHasher
from .stream import Pump
from .verify import intact_shard_hashes

TMP_SUFFIX = ".tensorsurgery-tmp"


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What ``apply`` wrote: the folder, its files, bytes, time, and notes for the user
    (a leftover temporary folder removed, shards kept by ``--resume``)."""

    output: Path
    files: tuple[str, ...]
    nbytes: int
    seconds: float
    tensor_hashes: Mapping[str, str]
    notes: tuple[str, ...] = ()


def temp_path(target: Path) -> Path:
    """The temporary folder ``apply`` writes into before renaming it to ``target``."""
    return target.parent / f".{target.name}{TMP_SUFFIX}"


def check_output(plan: Plan, *, force: bool) -> Path:
    """The absolute output path, after refusing unsafe targets.

    Raises:
        OutputExistsError: the output exists and ``force`` is false, or it equals, lies inside or
            contains a source folder.
    """
    target = plan.output.expanduser().resolve()
    for src in plan.sources:
        root = src.root.resolve()
        if target == root or root in target.parents or target in root.parents:
            raise OutputExistsError(f"{target}: the output overlaps the source {src.name!r} ({root}); "
                                    f"choose an output folder outside the source")
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists; pass --force to replace it, or choose "
                                f"another --output")
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target}: exists and is not a folder; remove it or choose another --output")
    return target


def execute_plan(plan: Plan, *, force: bool = False, resume: bool = False,
                 progress: Callable[[int], None] | None = None, direct: bool = True) -> WriteResult:
    """Write ``plan`` to disk, atomically.

    Shards are streamed into a temporary folder beside the target (:func:`temp_path`); the
    index, config.json, copied files and the provenance record follow; the folder is renamed
    into place last. If the run fails or is interrupted, the finished shards stay in the
    temporary folder and the unfinished one is removed.

    Args:
        plan: from :func:`tensorsurgery.build_plan`.
        force: replace an existing output folder (only once the new one is complete).
        resume: keep the finished shards of an interrupted run whose bytes verify against the
            plan, and write only the rest. Without it a leftover temporary folder is removed.
        progress: called with byte counts as shard bytes are written (from another thread).
        direct: try ``O_DIRECT`` for shard writes (falls back where the filesystem refuses).

    Raises:
        OutputExistsError: see :func:`check_output`.
        WriteError: not enough free disk, or a read or write failed.
    """
    started = time.monotonic()
    target = check_output(plan, force=force)
    tmp = temp_path(target)
    notes: list[str] = []
    kept = _reuse_leftover(plan, tmp, resume, notes)
    todo = [s for s in plan.shards if s.filename not in kept]
    _check_free_space(tmp.parent, sum(s.nbytes for s in todo))
    source_hasher = None
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        linked = [s for s in todo if s.link is not None and _link(s.link, tmp / s.filename)]
        # A linked shard's tensors are hashed in the same sequential pass as its source file.
        source_hasher = SourceHasher(_source_files(plan), {s.link: _tensor_ranges(s) for s in linked})
        hashes = Pump(progress=progress, direct=direct).run((s, tmp / s.filename) for s in todo
                                                            if s not in linked)
        source_hashes, linked_hashes = source_hasher.result()
        hashes.update(linked_hashes)
        for shard_hashes in kept.values():
            hashes.update(shard_hashes)
        _write_metadata(plan, tmp, hashes, source_hashes)
        _move_into_place(tmp, target)
    except BaseException as e:
        if source_hasher is not None:
            source_hasher.cancel()
        _discard_unfinished(tmp)
        if isinstance(e, OSError):
            raise WriteError(f"{e.filename or target}: {e.strerror or e}; nothing was written to {target} "
                             f"(finished shards are kept for --resume)") from e
        raise
    files = tuple(sorted(p.name for p in target.iterdir()))
    return WriteResult(output=target, files=files, nbytes=plan.nbytes, seconds=time.monotonic() - started,
                       tensor_hashes=hashes, notes=tuple(notes))


def _link(source: Path, dest: Path) -> bool:
    """Make ``dest`` share ``source``'s bytes: a reflink (copy-on-write clone) where the
    filesystem supports it, else a hard link; False when neither works (then it is copied).
    A hard link shares the inode: editing one file in place edits the other (see README)."""
    # Never open an existing dest for writing: were it a hard link to the source, "wb" would
    # truncate the source itself.
    dest.unlink(missing_ok=True)
    try:
        with open(source, "rb") as src, open(dest, "xb") as dst:
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
    if not tmp.exists():
        if resume:
            notes.append("--resume: no interrupted run found; writing everything")
        return {}
    if not resume:
        shutil.rmtree(tmp)
        notes.append(f"removed {tmp}, left by an interrupted run (use --resume to keep its finished shards)")
        return {}
    kept = {}
    for shard in plan.shards:
        hashes = intact_shard_hashes(shard, tmp / shard.filename)
        if hashes is not None:
            kept[shard.filename] = hashes
    for path in tmp.iterdir():
        if path.name not in kept:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    notes.append(f"--resume: kept {len(kept)} of {len(plan.shards)} shard(s) that verify against the plan")
    return kept


def _check_free_space(folder: Path, need: int) -> None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    # A little slack for the index, config, record and filesystem metadata.
    if need + (16 << 20) > free:
        raise WriteError(f"{probe}: not enough free disk space: the output needs {need:,} bytes, "
                         f"{free:,} are free; free some space or choose another --output")


def _tensor_ranges(shard: Shard) -> list[tuple[str, int, int]]:
    return [(t.name, t.source.offset, t.source.offset + t.nbytes) for t in shard.tensors]


def _source_files(plan: Plan) -> list[Path]:
    return [s.root / name for s in plan.sources for name in s.files]


def _write_metadata(plan: Plan, folder: Path, hashes: Mapping[str, str], source_hashes: Mapping[Path, str]) -> None:
    files: dict[str, str] = {}
    for src, name in plan.copy_files:
        shutil.copyfile(src, folder / name)
        _fsync_path(folder / name)
        files[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    if plan.index is not None:
        files[INDEX_NAME] = _write_json(folder / INDEX_NAME, plan.index)
    files["config.json"] = _write_json(folder / "config.json", plan.config)
    _write_json(folder / PROVENANCE_NAME, provenance_record(plan, hashes, files, source_hashes))
    _write_card(folder, plan)
    _fsync_path(folder)


def _discard_unfinished(tmp: Path) -> None:
    """After a failure: keep finished shards (for ``--resume``), drop everything else."""
    if not tmp.exists():
        return
    for path in tmp.iterdir():
        if not path.name.endswith(".safetensors"):
            path.unlink(missing_ok=True) if not path.is_dir() else shutil.rmtree(path, ignore_errors=True)
    if not any(tmp.iterdir()):
        tmp.rmdir()


def _write_card(folder: Path, plan: Plan) -> None:
    readme = plan.sources[0].root / "README.md"
    source_card = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else None
    card = model_card(plan, source_card)
    if card is not None:
        (folder / "README.md").write_text(card, encoding="utf-8")
        _fsync_path(folder / "README.md")


def _write_json(path: Path, data: Mapping[str, Any]) -> str:
    """Write ``data`` as indented JSON, fsynced; returns the sha256 of the bytes written."""
    raw = (json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable) + "\n").encode("utf-8")
    with open(path, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(raw).hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "items"):
        return dict(value.items())
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` (``--force``) is moved aside first
    and deleted only after the new folder is in place."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.tensorsurgery-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

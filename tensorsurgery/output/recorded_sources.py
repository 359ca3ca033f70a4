"""Whether the source weight files an output's provenance record names are still the files apply
read: there, regular files, of the recorded size and sha256. ``verify OUTPUT`` compares the
output with its sources only then; a source updated in place since apply (a new revision of a
fine-tune written over the old one, same size) would otherwise make an untouched output report
every tensor as a difference.

The sha256 costs no read for a Hub blob (named by it) or a file the hash cache knows (same
device, inode, size, mtime and ctime as when it was hashed); any other file is read once.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from tensorsurgery.errors import SourceError
from tensorsurgery.output.source_hash import SourceHasher


@dataclass(frozen=True, slots=True)
class SourceFiles:
    """A recorded source's weight files on this machine: ``missing`` ones (gone, or not a regular
    file) and ``changed`` ones (another size or sha256 than the record's), by file name."""

    missing: tuple[str, ...]
    changed: tuple[str, ...]


def check_source_files(root: Path, files: Sequence[Mapping[str, Any]]) -> SourceFiles:
    """Compare the weight files under ``root`` with the record's ``files`` entries
    (``{name, size, sha256}``; a None size or sha256 is not compared). The sha256 is taken only
    when every file is there with its recorded size (a missing file already means the record
    alone is checked).
    """
    missing: list[str] = []
    changed: list[str] = []
    for f in files:
        try:
            st = os.stat(root / f["name"])  # a Hub snapshot's links into blobs/ are followed
        except OSError:
            missing.append(f["name"])
            continue
        if not stat.S_ISREG(st.st_mode):
            missing.append(f["name"])
        elif f.get("size") is not None and st.st_size != f["size"]:
            changed.append(f["name"])
    if missing:
        return SourceFiles(tuple(missing), tuple(changed))
    to_hash = {root / f["name"]: f["sha256"] for f in files
               if isinstance(f.get("sha256"), str) and f["name"] not in changed}
    try:
        hashes, _ = SourceHasher(to_hash).result()
    except (OSError, SourceError):  # unreadable now (or gone since the stat): the record alone is checked
        return SourceFiles(tuple(f["name"] for f in files), ())
    changed += [path.name for path, want in to_hash.items() if hashes[path].sha256 != want]
    order = [f["name"] for f in files]
    return SourceFiles((), tuple(sorted(changed, key=order.index)))

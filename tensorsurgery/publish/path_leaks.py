"""The last check before push uploads: no file to upload names a local path this output knows of
(a source's folder, a Hub source's folder in this machine's cache, the output's own folder).

What tensorsurgery writes names none (the card and the uploaded record are path-free, config.json
drops ``_name_or_path``), but an output written by an older tensorsurgery has a card with the
manifest's paths, and a copied file is the source's bytes (an older transformers saved
``"name_or_path": "/home/alice/..."`` in tokenizer_config.json). The shards are not read: their
headers are tensorsurgery's (or, with ``--link``, the source's, whose metadata it does not
write).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from tensorsurgery.manifest.path_free import is_local_path
from tensorsurgery.output.record import Record
from tensorsurgery.sources.checkpoint import CARD_NAME, CONFIG_NAME, INDEX_NAME, RECORD_NAME

#: A path's bytes where they are not the end of a longer name (``/a/b`` is not in ``/x/a/bc``);
#: a path under it (``/a/b/config.json``) is it.
_BEFORE = rb"(?<![\w.\-/\\~])"
_AFTER = rb"(?![\w.\-])"


@dataclass(frozen=True, slots=True)
class LocalPathFound:
    """``file`` (a file to upload) names the local ``path``; ``why`` says how it got there and
    what to do, in the words of one line."""

    file: str
    path: str
    why: str


def known_local_paths(folder: Path, sources: Iterable[Mapping[str, object]]) -> tuple[str, ...]:
    """The local paths an output knows of, longest first: its folder (as given and resolved) and
    each recorded source's folder (and its model, when that is spelled as a local path)."""
    paths = {os.path.abspath(folder), os.path.realpath(folder)}
    for s in sources:
        root, model = s.get("root"), s.get("model")
        if isinstance(root, str):
            paths.update((root, os.path.realpath(root)))
        if isinstance(model, str) and s.get("repo_id") is None and is_local_path(model):
            paths.add(model)
    # "/" alone (or a one-letter folder) is in every file: too short to mean anything.
    return tuple(sorted((p for p in paths if len(p.strip("/\\")) > 1), key=len, reverse=True))


def find_local_path(folder: Path, record: Record, uploaded_record: bytes,
                    read: Callable[[str], bytes]) -> LocalPathFound | None:
    """The first file to upload (every file the record names but the shards, then the record as
    uploaded) that names a path of :func:`known_local_paths`, or None. ``read`` gives a file's
    bytes by name (push's, from the descriptor it uploads).
    """
    paths = known_local_paths(folder, [s for s in record.data["sources"] if isinstance(s, dict)])
    if not paths:
        return None
    pattern = re.compile(b"|".join(_BEFORE + re.escape(p.encode("utf-8", "surrogateescape")) + _AFTER
                                   for p in paths))
    for name in sorted(record.files):
        found = pattern.search(read(name))
        if found:
            return LocalPathFound(name, found.group().decode("utf-8", "replace"), _why(name))
    found = pattern.search(uploaded_record)
    if found:
        return LocalPathFound(RECORD_NAME, found.group().decode("utf-8", "replace"),
                              "in the manifest text it records, in a spelling taken for no path (a comment?); "
                              "remove it from the manifest, then apply again with --force")
    return None


def _why(name: str) -> str:
    if name in (CARD_NAME, CONFIG_NAME, INDEX_NAME):
        return "written by an older tensorsurgery; apply again with --force to rewrite it"
    return f"copied from the source; remove it from the source's {name}, then apply again with --force"

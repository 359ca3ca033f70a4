"""Resolve a manifest's source (a local folder or a Hugging Face repo id) into a Checkpoint."""
from __future__ import annotations

from pathlib import Path

from tensorsurgery.errors import SourceError
from tensorsurgery.manifest.repo_id import is_repo_id
from tensorsurgery.sources.checkpoint import Checkpoint
from tensorsurgery.sources.local import load_checkpoint


def resolve_source(model: str, revision: str | None = None, *, name: str = "source",
                   download: bool = True, keep_raw: bool = True) -> Checkpoint:
    """The checkpoint for a manifest source: a local folder if ``model`` is one, else a Hugging
    Face repo id resolved through :mod:`tensorsurgery.sources.hub` (``download=False``: weights that are
    not cached are not downloaded, their headers are read remotely; for ``plan`` and ``--dry-run``;
    ``keep_raw``: keep the headers' bytes, which only ``--link`` needs).

    Raises:
        SourceError: neither a folder nor a resolvable repo id.
        HeaderError: a shard breaks the safetensors rules.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return load_checkpoint(path, revision=revision, keep_raw=keep_raw)
    if is_repo_id(model):
        from tensorsurgery.sources.hub import resolve_hub_source
        return resolve_hub_source(model, revision, download=download, keep_raw=keep_raw)
    raise SourceError(f"source {name!r}: {model!r} is not a folder nor a Hugging Face repo id; "
                      f"pass --source PATH to a local copy")

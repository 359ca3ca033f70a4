"""Read a checkpoint from a local folder (or a Hugging Face cache snapshot): the files
:func:`tensorsurgery.sources.checkpoint.select_files` names, each opened as a regular file inside the folder,
JSON bounded in size, shard headers only. :func:`tensorsurgery.sources.checkpoint.assemble` does the rest.
"""
from __future__ import annotations

import os
from pathlib import Path

from tensorsurgery.errors import SourceError
from tensorsurgery.formats.safetensors import Header, read_header
from tensorsurgery.io import fsio
from tensorsurgery.sources.checkpoint import (
    Checkpoint,
    IndexMismatch,
    SourceFiles,
    assemble,
    card_licence,
    index_difference,
    index_weight_map,
    select_files,
    summarize_index,
)


class FolderReader:
    """Reads the files of the checkpoint folder ``root``; every real location must stay in
    ``inside`` (default: ``root``). :mod:`tensorsurgery.sources.hub` subclasses it to read uncached shard
    headers over HTTP."""

    def __init__(self, root: Path, inside: Path | None = None, *, keep_raw: bool = True):
        self.root, self.inside, self.keep_raw = root, inside or root, keep_raw

    def names(self) -> list[str]:
        """The top-level entries of the folder that are not folders (files and links)."""
        try:
            with os.scandir(self.root) as entries:
                return sorted(e.name for e in entries if not e.is_dir(follow_symlinks=False))
        except OSError as e:
            raise SourceError(f"{self.root}: cannot list the folder: {e.strerror or e}") from None

    def json(self, name: str, *, limit: int = fsio.JSON_LIMIT) -> object:
        return fsio.read_json(self.root / name, limit=limit, inside=self.inside)

    def text(self, name: str) -> str:
        return fsio.read_text(self.root / name, inside=self.inside)

    def check(self, name: str) -> None:
        """Refuse ``name`` unless it is a regular file inside the folder (a file copied later)."""
        fsio.check_regular(self.root / name, inside=self.inside)

    def header(self, name: str) -> Header:
        return read_header(self.root / name, keep_raw=self.keep_raw, inside=self.inside)


def read_checkpoint(reader: FolderReader, files: SourceFiles, *, revision: str | None = None,
                    repo_id: str | None = None) -> Checkpoint:
    """Read ``files`` with ``reader`` and assemble the checkpoint.

    Raises:
        SourceError: a file is missing, special, outside the folder, oversized or inconsistent.
        HeaderError: a shard breaks the safetensors rules.
    """
    root = reader.root
    index = None
    shards = files.weights
    if files.index:
        # Summarized and let go before the headers are read: at ~100k tensors the parsed index
        # weighs as much as the headers themselves.
        index = summarize_index(_weight_map(reader, files))
        shards = index.shards
    headers = {}
    for shard in shards:
        try:
            headers[shard] = reader.header(shard)
        except SourceError as e:
            if files.index and not (root / shard).exists():
                raise SourceError(f"{root / files.index}: names shard {shard!r}, which is missing; "
                                  f"re-download it") from None
            raise e
    # The copied files are only streamed into the output later: refuse a FIFO, a device or a link
    # out of the folder now, before anything is written (and before plan says all is well).
    for name in files.copied:
        reader.check(name)
    card_meta = card_licence(reader.text(files.card)) if files.card else {}
    try:
        return assemble(root, files, headers, reader.json(files.config), index=index, card_meta=card_meta,
                        revision=revision, repo_id=repo_id,
                        trust_root=reader.inside if reader.inside != root else None)
    except IndexMismatch:
        assert files.index is not None  # only an index can disagree
        raise index_difference(root / files.index, _weight_map(reader, files), headers) from None


def _weight_map(reader: FolderReader, files: SourceFiles) -> dict[str, str]:
    assert files.index is not None
    return index_weight_map(reader.json(files.index, limit=fsio.INDEX_LIMIT), str(reader.root / files.index))


def load_checkpoint(root: str | os.PathLike[str], *, revision: str | None = None, keep_raw: bool = True) -> Checkpoint:
    """Read the checkpoint folder ``root``: headers only, cross-checked with index and config
    (``keep_raw=False``: the headers' bytes are not kept, see :func:`tensorsurgery.formats.safetensors.read_header`).

    Raises:
        SourceError: missing folder or files, an index that disagrees with its shards, an unsafe
            file (special, linked out of the folder, oversized JSON), a config that is not JSON
            or disagrees with the tensors.
        HeaderError: a shard breaks the safetensors rules.

    Example:
        >>> ckpt = load_checkpoint("examples/tiny-mistral")
        >>> ckpt.layout, ckpt.num_layers
        ('hf', 32)
    """
    path = Path(root)
    if not path.is_dir():
        raise SourceError(f"{path}: source folder not found; give a local folder or a Hugging Face repo id")
    # Absolute, so the provenance record still finds the source from another directory.
    reader = FolderReader(path.resolve(), keep_raw=keep_raw)
    return read_checkpoint(reader, select_files(reader.names(), str(reader.root)), revision=revision)

"""The provenance record ``tensorsurgery.json`` written into every output: tool version,
manifest, sources, and for every output tensor its shard, source and sha256."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from . import __version__
from .plan import Plan

PROVENANCE_NAME = "tensorsurgery.json"


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def provenance_record(plan: Plan, hashes: Mapping[str, str], files: Mapping[str, str] | None = None,
                      source_hashes: Mapping[Path, str] | None = None) -> dict[str, Any]:
    """The record for ``plan`` whose output tensors hashed to ``hashes`` (name -> sha256);
    ``files`` maps the other files written (config.json, index, copies) to their sha256, and
    ``source_hashes`` each source weight file's path to its sha256."""
    source_hashes = source_hashes or {}
    return {
        "tool": "tensorsurgery",
        "version": __version__,
        "manifest_name": plan.manifest_name,
        "manifest": plan.manifest_text,
        "sources": [{"name": s.name, "model": s.model, "root": str(s.root), "layout": s.layout,
                     "revision": s.revision,
                     "files": [{"name": f, "size": _size(s.root / f), "sha256": source_hashes.get(s.root / f)}
                               for f in s.files]} for s in plan.sources],
        "layers": [{"source": r.source, "layer": r.layer} for r in plan.layers],
        # Planned with --link: shards identical to a source file were grouped as that file.
        "link": any(s.link is not None for s in plan.shards),
        "files": dict(files or {}),
        "tensors": {t.name: {"shard": shard.filename, "dtype": t.dtype, "shape": list(t.shape),
                             "source": t.source_name, "source_file": t.source.path.name,
                             "source_key": t.source_key, "transform": t.transform,
                             "sha256": hashes[t.name]}
                    for shard in plan.shards for t in shard.tensors},
    }

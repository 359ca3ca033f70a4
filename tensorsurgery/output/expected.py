"""What every file of an output must hold, defined once: the writer writes exactly these bytes,
``--resume`` keeps a finished shard only when it holds them, and both ``verify`` modes check them.

* a shard: its planned header, then each tensor's bytes, made by its recipe
  (:func:`tensorsurgery.ops.recipe.tensor_chunks`);
* config.json, the index and the model card: bytes rendered from the plan (:func:`json_bytes`);
* a copied file (tokenizer, licence...): the source file's bytes;
* the provenance record, whose content needs the hashes of all of the above, is built by
  :mod:`tensorsurgery.output.record`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from tensorsurgery.output.card import model_card
from tensorsurgery.planning.planner import CopyFile, Plan, Shard
from tensorsurgery.sources.checkpoint import CARD_NAME, CONFIG_NAME


@dataclass(frozen=True, slots=True)
class ExpectedFile:
    """One file of an output and what it must hold: ``shard`` (a planned shard), ``data`` (exact
    bytes: config.json, the index, the card) or ``copy`` (a source file's bytes)."""

    name: str
    shard: Shard | None = None
    data: bytes | None = None
    copy: CopyFile | None = None

    @property
    def kind(self) -> str:
        return "shard" if self.shard else "copy" if self.copy else "data"


def json_bytes(data: Mapping[str, Any]) -> bytes:
    """The bytes tensorsurgery writes for a JSON file: indented, UTF-8, a final newline."""
    return (json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable) + "\n").encode("utf-8")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "items"):
        return dict(value.items())
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def expected_files(plan: Plan) -> tuple[ExpectedFile, ...]:
    """Every file of ``plan``'s output but the provenance record, in the order they are written."""
    files = [ExpectedFile(s.filename, shard=s) for s in plan.shards]
    files += [ExpectedFile(c.name, copy=c) for c in plan.copy_files]
    if plan.index is not None:
        files.append(ExpectedFile(plan.output_format.index_name, data=json_bytes(plan.index)))
    files.append(ExpectedFile(CONFIG_NAME, data=json_bytes(plan.config)))
    files.append(ExpectedFile(CARD_NAME, data=model_card(plan).encode("utf-8")))
    return tuple(files)

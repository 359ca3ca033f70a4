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
from json.encoder import encode_basestring
from typing import Any, Iterable, Iterator, Mapping

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


def json_stream(head: Mapping[str, Any], last_key: str,
                entries: Iterable[tuple[str, Any]]) -> Iterator[bytes]:
    """:func:`json_bytes` of ``{**head, last_key: dict(entries)}``, byte for byte, in pieces of
    about :data:`STREAM_PIECE` bytes, made as ``entries`` are taken: the record of a 500k-tensor
    output is never one object, one string or one list of chunks (the json module's ``dumps``
    holds all three at once). ``entries``' names must be distinct, as a dict's keys are."""
    text = json.dumps({**head, last_key: {}}, indent=2, ensure_ascii=False, default=_jsonable)
    empty = text.rindex("{}")  # the last key's empty object, just before the final "\n}"
    parts = [text[:empty + 1]]
    size = 0
    separator = _NESTED  # before the first entry; ",\n    " before the others
    for name, value in entries:
        # Nested two levels deep: every newline of the value's own indented JSON gets two more
        # indents (a JSON string holds no raw newline, so those are all indentation).
        value_text = (encode_basestring(value) if type(value) is str  # as dumps makes it, in C
                      else json.dumps(value, indent=2, ensure_ascii=False, default=_jsonable))
        piece = f"{separator}{json.dumps(name, ensure_ascii=False)}: {value_text.replace(chr(10), _NESTED)}"
        parts.append(piece)
        separator = "," + _NESTED
        size += len(piece)
        if size >= STREAM_PIECE:
            yield "".join(parts).encode("utf-8")
            parts, size = [], 0
    closing = "" if separator == _NESTED else "\n" + _INDENT  # "{}" when there was no entry
    parts.append(closing + text[empty + 1:] + "\n")
    yield "".join(parts).encode("utf-8")


#: About how many characters :func:`json_stream` hands on at a time.
STREAM_PIECE = 1 << 20
_INDENT = "  "
_NESTED = "\n" + _INDENT * 2


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

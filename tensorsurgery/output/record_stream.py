"""The provenance record read a piece at a time, as :mod:`tensorsurgery.output.writer` lays it out.

A record of 500k tensors is ~200 MB of JSON; parsed whole it is ~1 KB of Python objects per
tensor beside its text. The writer puts the tensors last (``json_stream``): everything before
``,\\n  "tensors": {`` is the small *head*, a JSON object once closed, and the tensors' entries follow
one by one. Here the head is read alone (:func:`read_head`), the entries are parsed one at a time
by the json module's C scanner (:func:`iter_entries`), and a record's tensor section is compared
with the one a plan makes without parsing it (:func:`same_tensors`).

A record laid out any other way (edited, reformatted) is not an error here: every function says so
(None, or :class:`NotStreamable`) and the caller reads it whole, which gives the same result and
the same error messages, at the old memory cost.
"""
from __future__ import annotations

import codecs
import json
import os
from json.decoder import scanstring  # type: ignore[attr-defined]  # the C scanner's, public in all CPythons
from pathlib import Path
from typing import Any, Iterable, Iterator

from tensorsurgery.io.fsio import INDEX_LIMIT, JSON_DEPTH, json_depth, open_regular

#: What starts the tensors: the last top-level key of an indented record (a raw newline followed by
#: two spaces and a quote is only ever a top-level key: JSON strings hold no raw newline).
MARKER = b',\n  "tensors": {'
#: The head is read until the marker, up to this many bytes (it is the manifest, the sources and the
#: shards table: kilobytes, or a few MB for a manifest of many sources).
HEAD_LIMIT = 64 << 20
_PIECE = 1 << 20
_WHITESPACE = " \t\n\r"


class NotStreamable(Exception):
    """The record is not laid out as the writer lays it out (or is not valid JSON there): read it whole."""


def open_record(path: Path, inside: Path) -> int:
    """A descriptor of the record ``path`` (a regular file inside ``inside``; refused as
    :func:`tensorsurgery.io.fsio.read_json` refuses), or raises :class:`NotStreamable` where the whole
    read would refuse it with its own message (too large)."""
    fd = open_regular(path, inside=inside)
    if os.fstat(fd).st_size > INDEX_LIMIT:
        os.close(fd)
        raise NotStreamable(path)
    return fd


def read_head(fd: int) -> tuple[bytes, int]:
    """The record's head as a JSON object's bytes, and the file offset where its tensor entries
    start.

    Raises:
        NotStreamable: no marker in the first :data:`HEAD_LIMIT` bytes.
    """
    buf = bytearray()
    while len(buf) < HEAD_LIMIT:
        piece = os.pread(fd, _PIECE, len(buf))
        if not piece:
            break
        start = max(0, len(buf) - len(MARKER))
        buf += piece
        at = buf.find(MARKER, start)
        if at >= 0:
            return bytes(buf[:at]) + b"\n}", at + len(MARKER)
    raise NotStreamable("no tensors marker")


def _chunks(fd: int, offset: int) -> Iterator[bytes]:
    while piece := os.pread(fd, _PIECE, offset):
        offset += len(piece)
        yield piece


def iter_entries(fd: int, offset: int) -> Iterator[tuple[str, Any]]:
    """The tensor entries ``(name, value)`` of the record open as ``fd`` from ``offset`` (see
    :func:`read_head`), in file order, each parsed as ``json.loads`` would (NaN and Infinity refused,
    nesting bounded as :func:`tensorsurgery.io.fsio.parse_json` bounds it); then checks that nothing
    but the closing braces follow.

    Raises:
        NotStreamable: anything else: invalid JSON, a name twice, trailing data.
    """
    decoder = json.JSONDecoder(parse_constant=_no_constant)
    utf8 = codecs.getincrementaldecoder("utf-8")()
    pieces = _chunks(fd, offset)
    text, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal text, pos, eof
        if eof:
            return False
        piece = next(pieces, None)
        try:
            text = text[pos:] + utf8.decode(piece or b"", final=piece is None)
        except UnicodeDecodeError as e:
            raise NotStreamable(e) from None
        pos, eof = 0, piece is None
        return True

    def skip() -> None:
        nonlocal pos
        while True:
            while pos < len(text) and text[pos] in _WHITESPACE:
                pos += 1
            if pos < len(text) or not more():
                return

    seen: set[str] = set()
    first = True
    while True:
        skip()
        if pos >= len(text):
            raise NotStreamable("ends inside the tensors")
        if text[pos] == "}":
            pos += 1
            break
        if not first:
            if text[pos] != ",":
                raise NotStreamable("no comma")
            pos += 1
            skip()
        first = False
        while True:  # one entry; more text until it parses whole (or the file ends)
            try:
                if text[pos] != '"':
                    raise NotStreamable("no name")
                name, at = scanstring(text, pos + 1)
                while text[at] in _WHITESPACE:
                    at += 1
                if text[at] != ":":
                    raise NotStreamable("no colon")
                at += 1
                while text[at] in _WHITESPACE:
                    at += 1
                value, at = decoder.raw_decode(text, at)
                # A value that ends the text may go on in the next piece (a number's digits).
                if at < len(text) or eof:
                    break
            except (ValueError, IndexError):
                pass
            if not more():
                raise NotStreamable("invalid entry")
        pos = at
        if name in seen or json_depth(value) + 2 > JSON_DEPTH:
            raise NotStreamable("a name twice, or nested too deep")
        seen.add(name)
        yield name, value
    skip()
    if text[pos:pos + 1] != "}":
        raise NotStreamable("no closing brace")
    pos += 1
    skip()
    if pos < len(text):
        raise NotStreamable("trailing data")


def same_tensors(fd: int, offset: int, expected: Iterable[bytes]) -> bool:
    """Whether the bytes of the record open as ``fd`` from ``offset`` to its end are ``expected``'s
    (the tensors part of the record a plan makes, see :func:`tensorsurgery.output.expected.json_stream`)."""
    for piece in expected:
        view = memoryview(piece)
        while len(view):
            got = os.pread(fd, min(len(view), _PIECE), offset)
            if not got or got != view[:len(got)]:
                return False
            offset += len(got)
            view = view[len(got):]
    return not os.pread(fd, 1, offset)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")

"""The safetensors container: read and validate a header, encode one.

The official ``safetensors`` library validates files but does not expose byte offsets, which is
what planning needs, so this small piece is ours. Validation mirrors the Rust reader
(``safetensors/src/tensor.rs``: ``read_metadata`` and ``Metadata::validate``, behind
``serde_json``), one :class:`HeaderError` per rule: a file is accepted here exactly when the
official reader accepts it, except for the few stricter rules listed, each with its reason, in
:data:`DELIBERATE_DIFFERENCES` (a file breaking only those raises :class:`StricterHeaderError`).
``tests/test_format_differential.py`` holds both readers to that.

Two parsers produce the same :class:`Header`: a fast one for the compact layout every known
writer emits (the official one, ``encode_header``), a regular expression over the file's bytes
with no decoded copy and no intermediate JSON tree, and the general one (``json`` with hooks) for
everything else and for every error message. The fast one never raises: on anything unusual it
hands over to the general one.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field, replace
from operator import itemgetter
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping, NamedTuple

from tensorsurgery.errors import HeaderError
from tensorsurgery.formats.dtypes import DTYPE_BITS
from tensorsurgery.io.byte_source import LocalFile
from tensorsurgery.io.fsio import FileId, open_regular
from tensorsurgery.io.gcpause import paused_gc

#: Largest header the official reader accepts (``MAX_HEADER_SIZE`` in tensor.rs).
MAX_HEADER_SIZE = 100_000_000


#: Every file the official reader (safetensors 0.8) accepts and we refuse, by kind: the one place
#: where the two readers knowingly differ (we are never laxer). Each kind raises a
#: :class:`StricterHeaderError` whose ``difference`` is the key, and only once every rule of the
#: official reader has passed; the differential test shows each one with an example.
DELIBERATE_DIFFERENCES: Mapping[str, str] = MappingProxyType({
    "duplicate-tensor-name":
        "the official reader keeps the last of two same-named tensors and hides the other's bytes; "
        "we refuse a header whose meaning depends on JSON key order",
    "duplicate-metadata-key":
        "the official reader keeps the last value of a repeated __metadata__ key; we refuse rather "
        "than silently drop the other value on rewrite",
    "unknown-tensor-field":
        "the official reader ignores fields other than dtype/shape/data_offsets (whatever they "
        "hold); we refuse: a rewrite would drop them and they may change the tensor's meaning",
    "tensor-entry-as-array":
        "serde also reads a tensor entry written as the array [dtype, shape, data_offsets]; no "
        "writer emits it and code reading entry['dtype'] fails on it, so we refuse it",
    "dtype-as-map":
        "serde also reads a dtype written as the map {\"F32\": null}; no writer emits it and "
        "code comparing the dtype to a string fails on it, so we refuse it",
})

_U64_MAX = 2**64 - 1
_METADATA_KEY = "__metadata__"
_FIELDS = frozenset(("dtype", "shape", "data_offsets"))
#: serde_json's nesting limit: a container opened at this depth (the header object is 1) fails.
_MAX_DEPTH = 128
#: The canonical str object of every dtype name, so entries share them.
_DTYPE_NAMES: Mapping[str, str] = {name: name for name in DTYPE_BITS}


class TensorEntry(NamedTuple):
    """One tensor of a header: ``start``/``end`` are offsets into the data section.

    A NamedTuple, not a frozen dataclass: as immutable and typed, and the largest headers hold 1.7M
    of them, which the fast parser makes with one ``tuple.__new__`` each."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Header:
    """A validated safetensors header.

    ``data_start`` is the absolute file offset of the data section (8 + header length), so a
    tensor's bytes are ``[data_start + entry.start, data_start + entry.end)`` of ``path``.
    ``entries`` are in data order; ``tensors`` maps name to entry. ``raw`` is the file's first
    ``data_start`` bytes, kept so a shard can be reproduced (or linked) byte for byte. ``file_id``
    is the identity of the file read (None for a header parsed from bytes): the file planned, which
    ``apply`` and ``verify`` read again only if it is still that file.
    """

    path: Path
    data_start: int
    entries: tuple[TensorEntry, ...]
    metadata: Mapping[str, str] | None
    tensors: Mapping[str, TensorEntry]
    raw: bytes = b""
    file_id: FileId | None = field(default=None, compare=False)  # where it was read, not what it says
    #: The byte source the tensors' bytes are read from (the file at ``path``): made once here,
    #: so a plan's byte ranges of this file share it (one object, not one per tensor).
    source: LocalFile = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", LocalFile(self.path))

    @property
    def data_size(self) -> int:
        return self.entries[-1].end if self.entries else 0

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_size


class StricterHeaderError(HeaderError):
    """A file the official reader accepts but we refuse: ``difference`` is its key in
    :data:`DELIBERATE_DIFFERENCES`. Raised only after every official rule has passed."""

    def __init__(self, message: str, difference: str):
        super().__init__(message)
        self.difference = difference


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor of ``dtype`` and ``shape``, rejecting sub-byte remainders.

    Raises:
        HeaderError: unknown dtype, or a size that is not a whole number of bytes.
    """
    if dtype not in DTYPE_BITS:
        raise HeaderError(f"unknown dtype {dtype!r}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise HeaderError(f"{math.prod(shape)} elements of {dtype} do not end on a byte boundary")
    return bits // 8


def read_header(path: str | os.PathLike[str], *, keep_raw: bool = True, inside: Path | None = None,
                follow: bool = True) -> Header:
    """Read and validate the header of the safetensors file at ``path``; reads no tensor data.
    ``keep_raw=False`` drops ``Header.raw`` (only ``--link`` needs a source header's bytes; at 100k
    tensors they weigh 12 MB). ``inside`` and ``follow`` are :func:`tensorsurgery.io.fsio.open_regular`'s
    checks, made on the descriptor read; ``Header.file_id`` is that descriptor's identity.

    Raises:
        HeaderError: the file breaks a format rule; the message names the file and the tensor.
        SourceError: the file is missing or not a regular file.

    Example:
        >>> header = read_header("model-00001-of-00002.safetensors")  # doctest: +SKIP
        >>> header.tensors["model.embed_tokens.weight"].shape         # doctest: +SKIP
        (32000, 4096)
    """
    path = Path(path)
    try:
        with os.fdopen(open_regular(path, inside=inside, follow=follow), "rb") as f:
            st = os.fstat(f.fileno())
            file_size = st.st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise HeaderError(f"{path}: file is {file_size} bytes, too small to hold a "
                                  f"safetensors header (needs at least 8); re-download it")
            (n,) = struct.unpack("<Q", prefix)
            _check_header_length(path, n, file_size)
            f.seek(0)
            buf = f.read(8 + n)  # prefix and header in one object: Header.raw, never copied
    except OSError as e:
        raise HeaderError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(buf) != 8 + n:
        raise HeaderError(f"{path}: header length {n} points past the end of the file "
                          f"({len(buf)} bytes read); the file is truncated or not safetensors")
    header = _parse(path, buf, file_size)
    return replace(header, raw=header.raw if keep_raw else b"", file_id=FileId.of(st))


def _check_header_length(path: Path, n: int, file_size: int) -> None:
    if n > MAX_HEADER_SIZE:
        raise HeaderError(f"{path}: header length {n} exceeds the maximum of {MAX_HEADER_SIZE} "
                          f"bytes; this is not a valid safetensors file")
    if 8 + n > file_size:
        raise HeaderError(f"{path}: header length {n} points past the end of the file "
                          f"({file_size} bytes); the file is truncated or not safetensors")


def parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    """Validate the JSON header ``raw`` (the bytes after the 8-byte length) of a file of
    ``file_size`` bytes. Pure: exposed so tests and fuzzers can drive it without files.

    Raises:
        HeaderError: one message per broken rule, naming ``path`` and the tensor.
    """
    _check_header_length(path, len(raw), file_size)
    return _parse(path, struct.pack("<Q", len(raw)) + bytes(raw), file_size)


def _parse(path: Path, buf: bytes, file_size: int) -> Header:
    """``buf`` is the file's first bytes: the 8-byte length, then that many bytes of header."""
    data_len = file_size - len(buf)
    with paused_gc():  # a few containers per tensor, none freed: see gcpause
        header = _parse_fast(path, buf, data_len)
        if header is None:
            try:
                text = str(memoryview(buf)[8:], "utf-8")
            except UnicodeDecodeError as e:
                raise HeaderError(f"{path}: header is not valid UTF-8 (byte {e.start})") from None
            header = _parse_general(path, text, buf, data_len)
        return header


# --- the fast parser: the compact layout of every known writer, or None -----------------------

_NUM = rb"(?:0|[1-9][0-9]{0,19})"
#: One tensor entry as the official writer and encode_header print it, and the ``,`` or ``}``
#: after it, matched in the file's bytes. Groups: name, the dtype-and-shape text (a cache key),
#: start, end, separator. A name with an escape, a control character or a quote is not matched
#: (the general parser decodes those); the bytes of a name are decoded as UTF-8 one by one (no
#: byte of a multi-byte UTF-8 character is below 0x80, so none is a quote or a backslash).
_ENTRY = re.compile(
    rb'"([^"\\\x00-\x1f]*)":\{("dtype":"[A-Z0-9_]{1,16}","shape":\[(?:' + _NUM + rb'(?:,' + _NUM
    + rb')*)?\]),"data_offsets":\[(' + _NUM + rb'),(' + _NUM + rb')\]\}([,}])')
#: The dtype and shape out of the cache key.
_KEY = re.compile(rb'"dtype":"([A-Z0-9_]+)","shape":\[([0-9,]*)\]')
#: Where the ``__metadata__`` value ends: ``null`` or a flat object of strings (json then decodes
#: and checks the text matched). Unrolled string loop: no regex backtracking stack per character.
_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_META = re.compile(rb'null|\{(?:' + _STRING + b':' + _STRING + rb'(?:,' + _STRING + b':' + _STRING
                   + rb')*)?\}', re.S)
_META_PREFIX = b'{"' + _METADATA_KEY.encode() + b'":'
_TAIL = re.compile(rb'[ \t\n\r]*\Z')


def _parse_fast(path: Path, buf: bytes, data_len: int) -> Header | None:
    """The :class:`Header` of a compact, valid, duplicate-free header, else None. Never raises.

    Matches the file's bytes (``buf``, from offset 8), so no decoded copy of the header is made:
    names and metadata are decoded as they are found, the rest is ASCII by the grammar."""
    pos = 8
    metadata = None
    if buf.startswith(_META_PREFIX, pos):
        m = _META.match(buf, pos + len(_META_PREFIX))
        if m is None:
            return None
        try:
            metadata, stricter = _check_metadata(path, _DECODER.decode(str(m.group(), "utf-8")))
        except (ValueError, RecursionError, HeaderError):  # UnicodeDecodeError is a ValueError
            return None
        if stricter is not None:
            return None
        pos = m.end()
        if buf.startswith(b"}", pos):
            return _fast_finish(path, buf, pos + 1, data_len, [], {}, metadata, True)
        if not buf.startswith(b",", pos):
            return None
        pos += 1
    elif buf.startswith(b"{}", pos):
        return _fast_finish(path, buf, pos + 2, data_len, [], {}, metadata, True)
    elif buf.startswith(b"{", pos):
        pos += 1
    else:
        return None

    entries: list[TensorEntry] = []
    tensors: dict[str, TensorEntry] = {}
    append = entries.append
    infos: dict[bytes, tuple[str, tuple[int, ...], int]] = {}
    new = tuple.__new__  # a NamedTuple's own constructor costs 3x
    in_order = True
    end, e = 0, b"0"
    try:
        for m in _ENTRY.finditer(buf, pos):
            if m.start() != pos:
                return None
            name, key, s, e_next, sep = m.groups()
            info = infos.get(key)
            if info is None:
                made = _fast_info(_KEY.fullmatch(key))
                if made is None:
                    return None
                info = infos[key] = made
            dtype, shape, nbytes = info
            if s == e:
                start = end  # the previous end, parsed once and one int object for both
            else:
                start = int(s)
                in_order = False
            e = e_next
            end = int(e)
            if end - start != nbytes:
                return None
            name = name.decode()  # UTF-8, strict
            entry = new(TensorEntry, (name, dtype, shape, start, end))
            append(entry)
            tensors[name] = entry
            pos = m.end()
            if sep == b"}":
                break
        else:
            return None
    except UnicodeDecodeError:
        return None
    return _fast_finish(path, buf, pos, data_len, entries, tensors, metadata, in_order)


def _fast_finish(path: Path, buf: bytes, pos: int, data_len: int,
                 entries: list[TensorEntry], tensors: dict[str, TensorEntry],
                 metadata: Mapping[str, str] | None, in_order: bool) -> Header | None:
    if (_TAIL.match(buf, pos) is None or len(tensors) != len(entries)
            or _METADATA_KEY in tensors):
        return None
    if not in_order:
        entries.sort(key=_data_order)
        end = 0
        for e in entries:
            if e.start != end:
                return None
            end = e.end
        tensors = {e.name: e for e in entries}
    if (entries[-1].end if entries else 0) != data_len:
        return None
    return Header(path=path, data_start=len(buf), entries=tuple(entries), metadata=metadata,
                  tensors=MappingProxyType(tensors), raw=buf)


def _fast_info(m: re.Match[bytes] | None) -> tuple[str, tuple[int, ...], int] | None:
    """(dtype, shape, nbytes) of a valid dtype and shape text, or None."""
    if m is None:
        return None
    dt, dims = m.groups()
    dtype = _DTYPE_NAMES.get(str(dt, "ascii"))
    if dtype is None:
        return None
    shape = tuple(map(int, dims.split(b","))) if dims else ()
    numel = 1
    for d in shape:
        numel *= d
        if d > _U64_MAX or numel > _U64_MAX:
            return None
    bits = numel * DTYPE_BITS[dtype]
    if bits > _U64_MAX or bits % 8:
        return None
    return dtype, shape, bits // 8


def _data_order(e: TensorEntry) -> tuple[int, int]:
    return e.start, e.end


# --- the general parser: any JSON, every error message ----------------------------------------

class _Duplicates(dict[str, object]):
    """A JSON object that repeated keys: its values are the last ones, as serde keeps them;
    ``repeated`` lists the repeated keys in the order of their second appearance, ``pairs`` all
    of the object's (key, value) pairs (serde checks the type of every value, kept or not)."""

    __slots__ = ("repeated", "pairs")
    repeated: tuple[str, ...]
    pairs: list[tuple[str, object]]


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        repeated = []
        for k, _ in pairs:
            if k in seen and k not in repeated:
                repeated.append(k)
            seen.add(k)
        out = _Duplicates(out)
        out.repeated, out.pairs = tuple(repeated), pairs
    return out


def _number(s: str) -> float:
    """A JSON number that is not a u64 to serde_json: a float, or an error where it overflows."""
    f = float(s)
    if math.isinf(f):
        raise ValueError(f"number out of range: {s[:40]}")
    return f


def _integer(s: str) -> int | float:
    """serde_json reads ``-0`` as the float -0.0, and integers past 64 bits as floats."""
    if len(s) <= 20 and s != "-0":
        return int(s)
    return _number(s)


def _constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_int=_integer, parse_float=_number,
                            parse_constant=_constant)


def _parse_general(path: Path, text: str, buf: bytes, data_len: int) -> Header:
    try:
        obj = _DECODER.decode(text)
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{path}: header is JSON {type(obj).__name__}, expected an object")
    duplicate = obj.repeated[0] if isinstance(obj, _Duplicates) else None
    if isinstance(obj, _Duplicates) and _METADATA_KEY in obj.repeated:
        # a field of serde's struct: the official reader refuses it too
        raise HeaderError(f"{path}: header has duplicate key {_METADATA_KEY!r}")
    metadata, stricter = _check_metadata(path, obj.pop(_METADATA_KEY, None))
    entries = []
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
    for name, info in obj.items():
        entry, why = _parse_entry(path, name, info, shapes)
        entries.append(entry)
        stricter = stricter or why
    if isinstance(obj, _Duplicates):  # the official reader checks the tensors it then drops, too
        for name, info in obj.pairs:
            if name != _METADATA_KEY and info is not obj.get(name):
                _parse_entry(path, name, info, shapes, kept=False)
    entries.sort(key=_data_order)
    _check_layout(path, entries, data_len)
    if duplicate is not None:
        stricter = stricter or (f"{path}: header has duplicate key {duplicate!r}",
                                "duplicate-tensor-name")
    if stricter:
        raise StricterHeaderError(*stricter)
    return Header(path=path, data_start=len(buf), entries=tuple(entries), metadata=metadata,
                  tensors=MappingProxyType({e.name: e for e in entries}), raw=buf)


def _check_metadata(path: Path, meta: object
                    ) -> tuple[Mapping[str, str] | None, tuple[str, str] | None]:
    """The metadata mapping, and a deliberate difference's (message, key) if it has one."""
    if meta is None:
        return None, None
    values = ([v for _, v in meta.pairs] if isinstance(meta, _Duplicates)  # serde checks them all
              else list(meta.values()) if isinstance(meta, dict) else None)
    if not isinstance(meta, dict) or values is None or not all(type(v) is str for v in values):
        raise HeaderError(f"{path}: __metadata__ must map strings to strings, found {meta!r:.200}")
    if not all(_is_unicode(k) for k in meta) or not all(_is_unicode(str(v)) for v in values):
        raise HeaderError(f"{path}: __metadata__ holds a lone surrogate escape (not valid Unicode), "
                          f"found {meta!r:.200}")
    stricter = None
    if isinstance(meta, _Duplicates):
        stricter = (f"{path}: header has duplicate key {meta.repeated[0]!r}",
                    "duplicate-metadata-key")
    return MappingProxyType(dict(meta)), stricter


def _is_unicode(s: str) -> bool:
    """False if ``s`` holds a lone surrogate: ``json`` decodes an escape such as ``"\\ud800"``
    into one, the official reader rejects it, and it cannot be encoded back to UTF-8."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_u64(x: object) -> bool:
    return type(x) is int and 0 <= x <= _U64_MAX


def _nesting(value: object) -> tuple[float, bool]:
    """The nesting depth of the containers in a JSON value (a scalar is 0; too deep for Python:
    infinity), and whether a string or key in it holds a lone surrogate."""
    if type(value) is str:
        return 0, not _is_unicode(value)
    if isinstance(value, dict):
        items, lone = list(value.values()), not all(map(_is_unicode, value))
    elif isinstance(value, list):
        items, lone = value, False
    else:
        return 0, False
    depth: float = 0
    try:
        for item in items:
            d, bad = _nesting(item)
            depth, lone = max(depth, d), lone or bad
    except RecursionError:
        return math.inf, lone
    return 1 + depth, lone


def _parse_entry(path: Path, name: str, info: object, shapes: dict[tuple[int, ...], tuple[int, ...]], kept: bool = True
                 ) -> tuple[TensorEntry, tuple[str, str] | None]:
    """The entry, and a deliberate difference's (message, key) if it has one. For an entry
    that a later one of the same name replaces (``kept`` false), only the checks the official
    reader makes of every JSON value apply, not those it makes of the tensors it keeps."""
    where = f"{path}: tensor {name!r}"
    if not _is_unicode(name):
        raise HeaderError(f"{where}: name holds a lone surrogate escape (not valid Unicode)")
    stricter = None
    if type(info) is list and len(info) == 3:  # serde's sequence form of a struct
        info = dict(zip(("dtype", "shape", "data_offsets"), info))
        stricter = (f"{where}: expected an object with dtype, shape, data_offsets, found an array",
                    "tensor-entry-as-array")
    if not isinstance(info, dict):
        raise HeaderError(f"{where}: expected an object with dtype, shape, data_offsets")
    extra = set(info) - _FIELDS
    if isinstance(info, _Duplicates):  # serde refuses a repeated field, ignores a repeated unknown one
        for key in info.repeated:
            if key in _FIELDS:
                raise HeaderError(f"{path}: header has duplicate key {key!r}")
    pairs = info.pairs if isinstance(info, _Duplicates) else info.items()
    for key, value in sorted((kv for kv in pairs if kv[0] in extra), key=lambda kv: kv[0]):
        # the official reader ignores their values but parses them first, with less leeway
        depth, lone = _nesting(value)
        if lone or not _is_unicode(key):
            raise HeaderError(f"{where}: field {key!r} holds a lone surrogate escape "
                              f"(not valid Unicode)")
        if 2 + depth >= _MAX_DEPTH:
            raise HeaderError(f"{where}: field {key!r} nests the header deeper than the "
                              f"{_MAX_DEPTH - 1} levels the official JSON parser allows")
    if extra:
        stricter = stricter or (f"{where}: unknown field {sorted(extra)[0]!r}", "unknown-tensor-field")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if (type(dtype) is dict and len(dtype) == 1
            and next(iter(dtype.values())) is None and next(iter(dtype)) in DTYPE_BITS):
        # serde's map form of a unit enum variant: {"F32": null}
        stricter = stricter or (f"{where}: dtype must be a string, found {dtype!r}", "dtype-as-map")
        dtype = next(iter(dtype))
    if type(dtype) is not str or dtype not in DTYPE_BITS:
        raise HeaderError(f"{where}: unknown dtype {dtype!r}; known: {', '.join(DTYPE_BITS)}")
    if type(shape) is not list or not all(_is_u64(d) for d in shape):
        raise HeaderError(f"{where}: shape must be a list of non-negative integers, found {shape!r:.100}")
    if (type(offsets) is not list or len(offsets) != 2 or not all(_is_u64(o) for o in offsets)
            or (kept and offsets[0] > offsets[1])):
        raise HeaderError(f"{where}: data_offsets must be [start, end] with 0 <= start <= end, "
                          f"found {offsets!r:.100}")
    shape = tuple(shape)
    shape = shapes.setdefault(shape, shape)
    return TensorEntry(name=name, dtype=_DTYPE_NAMES[dtype], shape=shape, start=offsets[0],
                       end=offsets[1]), stricter


def _check_layout(path: Path, entries: list[TensorEntry], data_len: int) -> None:
    end = 0
    for e in entries:
        where = f"{path}: tensor {e.name!r}"
        if e.start != end:
            raise HeaderError(f"{where}: data starts at offset {e.start}, expected {end} "
                              f"(tensors must be contiguous, starting at 0)")
        numel = 1
        for d in e.shape:  # as the official reader: checked u64 product, then times the bits
            numel *= d
            if numel > _U64_MAX:
                break
        bits = numel * DTYPE_BITS[e.dtype]
        if bits > _U64_MAX:
            raise HeaderError(f"{where}: shape {list(e.shape)} overflows a 64-bit byte count")
        if bits % 8:
            raise HeaderError(f"{where}: {numel} elements of {e.dtype} do not end on a byte boundary")
        if e.nbytes != bits // 8:
            raise HeaderError(f"{where}: data_offsets span {e.nbytes} bytes but shape "
                              f"{list(e.shape)} of {e.dtype} needs {bits // 8}")
        end = e.end
    if end != data_len:
        raise HeaderError(f"{path}: tensors cover {end} bytes of data but the file holds {data_len} "
                          f"after the header (truncated or trailing bytes); re-download it")


def encode_header(tensors: Iterable[tuple[str, str, tuple[int, ...], int, int]],
                  metadata: Mapping[str, str] | None = None) -> bytes:
    """Encode the 8-byte length plus JSON header for ``(name, dtype, shape, start, end)`` tuples.

    The JSON is padded with spaces to a multiple of 8 bytes so the data section is aligned,
    as the official writer does. Tensor order in the JSON follows the data order. The output is
    that of ``json.dumps`` (compact, ``ensure_ascii=False``) of the header as a dict, written
    entry by entry without building the dict.

    Raises:
        HeaderError: the header would exceed :data:`MAX_HEADER_SIZE`, which no reader accepts.
    """
    items = list(tensors)
    parts = _encode_entries(items, metadata)
    if parts is None:  # not plain str/int values, or a name twice: json.dumps of the dict decides
        obj: dict[str, object] = {}
        if metadata is not None:
            obj[_METADATA_KEY] = dict(metadata)
        for name, dtype, shape, start, end in items:
            obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
        parts = [b"", json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")]
    n = sum(map(len, parts))
    n += -n % 8
    if n > MAX_HEADER_SIZE:
        raise HeaderError(f"a header for {len(items)} tensors would be {n} bytes, over the "
                          f"{MAX_HEADER_SIZE} that safetensors readers accept; spread the tensors "
                          f"over more files")
    parts[0] = struct.pack("<Q", n)
    parts.append(b" " * (n - sum(map(len, parts)) + 8))
    return b"".join(parts)


def _encode_entries(items: list[tuple[str, str, tuple[int, ...], int, int]],
                    metadata: Mapping[str, str] | None) -> list[bytes] | None:
    """``[b"", header JSON piece by piece]``, or None where only json.dumps gives the answer."""
    names = set(map(_FIRST, items))
    if len(names) != len(items) or (metadata is not None and _METADATA_KEY in names):
        return None
    enc = _encode_string
    parts = [b"", b"{"]
    if metadata is not None:
        parts.append(b'"__metadata__":' + json.dumps(
            dict(metadata), separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    comma = "," if len(parts) > 2 else ""
    # The same few (dtype, shape) pairs repeat in every layer: their JSON is made once each, and
    # kept with the shape object it was made from. Plans share one shape object per pair, so the
    # elements' types are checked again only for another object: (True, 8) equals (1, 8) as a
    # key, but json writes it otherwise.
    middles: dict[str, dict[tuple[int, ...], tuple[tuple[int, ...], str]]] = {}
    ints = _INT_TYPES
    # Pieces are joined and encoded every _JOIN entries: one short-lived str per entry, never one per
    # tensor of the shard at once (~165 B each, beside the header itself).
    pieces: list[str] = []
    append = pieces.append
    for name, dtype, shape, start, end in items:
        if len(pieces) == _JOIN:
            parts.append("".join(pieces).encode())
            pieces.clear()
        if (type(name) is not str or type(dtype) is not str or type(shape) is not tuple or type(start) is not int
                or type(end) is not int):
            return None
        by_shape = middles.get(dtype)
        if by_shape is None:
            by_shape = middles[dtype] = {}
        cached = by_shape.get(shape)
        if cached is None or cached[0] is not shape:
            if not ints.issuperset(map(type, shape)):
                return None
            if cached is None:
                cached = by_shape[shape] = (shape, f':{{"dtype":{enc(dtype)},"shape":[{",".join(map(str, shape))}],'
                                                   f'"data_offsets":[')
        append(f"{comma}{enc(name)}{cached[1]}{start},{end}]}}")
        comma = ","
    parts.append("".join(pieces).encode())
    parts.append(b"}")
    return parts


_JOIN = 4096
#: json's own string encoder (the C one where built): what json.dumps writes for a str.
_encode_string = json.encoder.encode_basestring
_INT_TYPES = frozenset({int})
_FIRST = itemgetter(0)

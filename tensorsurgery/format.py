"""The safetensors container: read and validate a header, encode one.

The official ``safetensors`` library validates files but does not expose byte offsets, which is
what planning needs, so this small piece is ours. Validation mirrors the Rust reader
(``safetensors/src/tensor.rs``: ``read_metadata`` and ``Metadata::validate``), one
:class:`HeaderError` per rule, and adds one check it skips: duplicate JSON keys, which ``json``
would otherwise silently collapse to the last one.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

from .dtypes import DTYPE_BITS
from .errors import HeaderError
from .fsio import open_regular

#: Largest header the official reader accepts (``MAX_HEADER_SIZE`` in tensor.rs).
MAX_HEADER_SIZE = 100_000_000


_U64_MAX = 2**64 - 1
_METADATA_KEY = "__metadata__"


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a header: ``start``/``end`` are offsets into the data section."""

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
    ``data_start`` bytes, kept so a shard can be reproduced (or linked) byte for byte.
    """

    path: Path
    data_start: int
    entries: tuple[TensorEntry, ...]
    metadata: Mapping[str, str] | None
    tensors: Mapping[str, TensorEntry]
    raw: bytes = b""

    @property
    def data_size(self) -> int:
        return self.entries[-1].end if self.entries else 0

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_size


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


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of the safetensors file at ``path``; reads no tensor data.

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
        with os.fdopen(open_regular(path), "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise HeaderError(f"{path}: file is {file_size} bytes, too small to hold a "
                                  f"safetensors header (needs at least 8); re-download it")
            (n,) = struct.unpack("<Q", prefix)
            _check_header_length(path, n, file_size)
            raw = f.read(n)
    except OSError as e:
        raise HeaderError(f"{path}: cannot read: {e.strerror or e}") from e
    return parse_header(path, raw, file_size)


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
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"{path}: header is not valid UTF-8 (byte {e.start})") from e
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as e:
        raise HeaderError(f"{path}: header has duplicate key {e.args[0]!r}") from None
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{path}: header is JSON {type(obj).__name__}, expected an object")
    metadata = _parse_metadata(path, obj.pop(_METADATA_KEY, None))
    entries = sorted((_parse_entry(path, k, v) for k, v in obj.items()),
                     key=lambda e: (e.start, e.end))
    _check_layout(path, entries, file_size - 8 - len(raw))
    return Header(path=path, data_start=8 + len(raw), entries=tuple(entries),
                  metadata=metadata, tensors=MappingProxyType({e.name: e for e in entries}),
                  raw=struct.pack("<Q", len(raw)) + bytes(raw))


class _DuplicateKey(Exception):
    pass


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _parse_metadata(path: Path, meta: object) -> Mapping[str, str] | None:
    if meta is None:
        return None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError(f"{path}: __metadata__ must map strings to strings, found {meta!r:.200}")
    if not all(_is_unicode(k) and _is_unicode(v) for k, v in meta.items()):
        raise HeaderError(f"{path}: __metadata__ holds a lone surrogate escape (not valid Unicode), "
                          f"found {meta!r:.200}")
    return MappingProxyType(dict(meta))


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


def _parse_entry(path: Path, name: str, info: object) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not _is_unicode(name):
        raise HeaderError(f"{where}: name holds a lone surrogate escape (not valid Unicode)")
    if not isinstance(info, dict):
        raise HeaderError(f"{where}: expected an object with dtype, shape, data_offsets")
    extra = set(info) - {"dtype", "shape", "data_offsets"}
    if extra:
        raise HeaderError(f"{where}: unknown field {sorted(extra)[0]!r}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderError(f"{where}: unknown dtype {dtype!r}; known: {', '.join(DTYPE_BITS)}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise HeaderError(f"{where}: shape must be a list of non-negative integers, found {shape!r:.100}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise HeaderError(f"{where}: data_offsets must be [start, end] with 0 <= start <= end, "
                          f"found {offsets!r:.100}")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), start=offsets[0], end=offsets[1])


def _check_layout(path: Path, entries: list[TensorEntry], data_len: int) -> None:
    end = 0
    for e in entries:
        where = f"{path}: tensor {e.name!r}"
        if e.start != end:
            raise HeaderError(f"{where}: data starts at offset {e.start}, expected {end} "
                              f"(tensors must be contiguous, starting at 0)")
        numel = 1
        for d in e.shape:
            numel *= d
            if numel * DTYPE_BITS[e.dtype] > _U64_MAX:
                raise HeaderError(f"{where}: shape {list(e.shape)} overflows a 64-bit byte count")
        bits = numel * DTYPE_BITS[e.dtype]
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
    as the official writer does. Tensor order in the JSON follows the data order.
    """
    obj: dict[str, object] = {}
    if metadata is not None:
        obj[_METADATA_KEY] = dict(metadata)
    for name, dtype, shape, start, end in tensors:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw

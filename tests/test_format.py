"""Tests for tensorsurgery.formats.safetensors: one hostile file per header rule, round trips through the
official ``safetensors`` library, and a property test that parse_header never fails any other way.
"""
from __future__ import annotations

import copy
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import TensorSpec, safe_open
from safetensors.numpy import save_file

from tensorsurgery.errors import HeaderError, SourceError
from tensorsurgery.formats.safetensors import (
    DTYPE_BITS,
    MAX_HEADER_SIZE,
    Header,
    StricterHeaderError,
    encode_header,
    parse_header,
    read_header,
    tensor_nbytes,
)

#: The dtypes of the official reader, in the order its own error message lists them.
KNOWN_DTYPES = ("BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, "
                "F8_E5M2FNUZ, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64")
CONTIGUOUS = "(tensors must be contiguous, starting at 0)"
DROP = object()  # entry(field=DROP) leaves the field out


# --- helpers ----------------------------------------------------------------------------------

def file_bytes(header: dict | str | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A file's bytes: u64 little-endian header length (default: the true one), header, data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def entry(**fields: object) -> dict:
    """A one-byte U8 tensor entry with ``fields`` replaced (or left out when set to DROP)."""
    out = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]} | fields
    return {k: v for k, v in out.items() if v is not DROP}


def hostile(tmp_path: Path, content: bytes, stricter: str | None = None) -> tuple[Path, str]:
    """Write ``content`` to a file, read it, and return the path and the HeaderError's text;
    the error is a StricterHeaderError of kind ``stricter`` if given, a plain one otherwise."""
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(content)
    with pytest.raises(HeaderError) as excinfo:
        read_header(path)
    assert getattr(excinfo.value, "difference", None) == stricter
    assert isinstance(excinfo.value, StricterHeaderError) == (stricter is not None)
    return path, str(excinfo.value)


def hostile_entry(tmp_path: Path, data: bytes = b"\0", stricter: str | None = None,
                  **fields: object) -> tuple[Path, str]:
    """:func:`hostile` for a file holding one tensor ``x`` built by :func:`entry`."""
    return hostile(tmp_path, file_bytes({"x": entry(**fields)}, data), stricter)


Expected = dict[str, tuple[str, tuple[int, ...], bytes]]  # name: (dtype, shape, data bytes)


def assert_reads_back(path: Path, expected: Expected) -> Header:
    """read_header(path) names every tensor with its dtype and shape, in contiguous data order,
    with offsets equal to the JSON's, and the bytes at those offsets are the tensor's bytes."""
    header = read_header(str(path))
    content = path.read_bytes()
    (n,) = struct.unpack("<Q", content[:8])
    raw_json = json.loads(content[8:8 + n])
    assert header.path == path and header.data_start == 8 + n
    assert header.file_size == len(content)
    assert sorted(header.tensors) == sorted(expected)
    assert [e.start for e in header.entries] == [0] + [e.end for e in header.entries[:-1]]
    for e in header.entries:
        dtype, shape, data = expected[e.name]
        assert header.tensors[e.name] is e
        assert (e.dtype, e.shape) == (dtype, shape)
        assert [e.start, e.end] == raw_json[e.name]["data_offsets"]
        assert content[header.data_start + e.start:header.data_start + e.end] == data
    return header


def assert_valid(header: Header, raw: bytes, file_size: int) -> None:
    """Every rule holds for an accepted header, checked without format.py's own checks
    (DTYPE_BITS is pinned by test_dtype_table_matches_official_reader)."""
    assert header.data_start == 8 + len(raw)
    assert header.file_size == file_size
    end = 0
    for e in header.entries:
        assert e.dtype in KNOWN_DTYPES.split(", ")
        assert all(type(d) is int and 0 <= d < 2**64 for d in e.shape)
        assert e.start == end, "tensors must be contiguous from offset 0"
        bits = math.prod(e.shape) * DTYPE_BITS[e.dtype]
        assert bits % 8 == 0 and e.end - e.start == bits // 8
        e.name.encode("utf-8")  # no lone surrogates
        end = e.end
    assert end == file_size - 8 - len(raw) == header.data_size
    assert list(header.tensors) == [e.name for e in header.entries]
    for k, v in (header.metadata or {}).items():
        assert isinstance(v, str)
        (k + v).encode("utf-8")


# --- one hostile file per rule ----------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 3, 7])
def test_file_shorter_than_8_bytes(tmp_path, size):
    path, message = hostile(tmp_path, b"\x01" * size)
    assert message == (f"{path}: file is {size} bytes, too small to hold a safetensors header "
                       f"(needs at least 8); re-download it")


def test_missing_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(SourceError) as excinfo:
        read_header(path)
    assert str(excinfo.value) == (f"{path}: missing (or a link to a missing file); the checkpoint is incomplete, "
                                  f"re-download it")


@pytest.mark.parametrize("length", [MAX_HEADER_SIZE + 1, 2**64 - 1])
def test_header_length_over_maximum(tmp_path, length):
    path, message = hostile(tmp_path, file_bytes("{}", length=length))
    assert message == (f"{path}: header length {length} exceeds the maximum of 100000000 bytes; "
                       f"this is not a valid safetensors file")


@pytest.mark.parametrize("length", [3, MAX_HEADER_SIZE])
def test_header_length_past_end_of_file(tmp_path, length):
    path, message = hostile(tmp_path, file_bytes("{}", length=length))
    assert message == (f"{path}: header length {length} points past the end of the file "
                       f"(10 bytes); the file is truncated or not safetensors")


def test_parse_header_checks_length_against_file_size():
    with pytest.raises(HeaderError) as excinfo:
        parse_header(Path("short.safetensors"), b"{}", 9)
    assert str(excinfo.value) == ("short.safetensors: header length 2 points past the end of the "
                                  "file (9 bytes); the file is truncated or not safetensors")


@pytest.mark.parametrize("header, byte", [(b'{"x\xff": 1}', 3), (b'{"\xc3"}', 2)])
def test_header_not_utf8(tmp_path, header, byte):
    path, message = hostile(tmp_path, file_bytes(header))
    assert message == f"{path}: header is not valid UTF-8 (byte {byte})"


@pytest.mark.parametrize("header, reason", [
    ('{"x": ', "Expecting value: line 1 column 7 (char 6)"),
    ("{} x", "Extra data: line 1 column 4 (char 3)"),
    ("{'a': 1}", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("", "Expecting value: line 1 column 1 (char 0)"),
    ("[" * 100_000,
     "maximum recursion depth exceeded while decoding a JSON array from a unicode string"),
])
def test_header_not_json(tmp_path, header, reason):
    path, message = hostile(tmp_path, file_bytes(header))
    assert message == f"{path}: header is not valid JSON ({reason})"


@pytest.mark.parametrize("header, kind", [("[]", "list"), ('"x"', "str"), ("1", "int"),
                                          ("null", "NoneType")])
def test_header_not_an_object(tmp_path, header, kind):
    path, message = hostile(tmp_path, file_bytes(header))
    assert message == f"{path}: header is JSON {kind}, expected an object"


@pytest.mark.parametrize("header, key, stricter", [
    ('{"x":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
     '"x":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}', "x", "duplicate-tensor-name"),
    ('{"x":{"dtype":"U8","dtype":"U8","shape":[0],"data_offsets":[0,0]}}', "dtype", None),
    ('{"__metadata__":{},"__metadata__":{}}', "__metadata__", None),
    ('{"__metadata__":{"a":"b","a":"b"}}', "a", "duplicate-metadata-key"),
], ids=["tensor", "field", "metadata", "metadata-key"])
def test_duplicate_key(tmp_path, header, key, stricter):
    """Repeated fields of serde's structs are refused by the official reader too; repeated
    tensor names and metadata keys only by us (a deliberate difference)."""
    path, message = hostile(tmp_path, file_bytes(header), stricter)
    assert message == f"{path}: header has duplicate key {key!r}"


@pytest.mark.parametrize("header, reason", [
    ('{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,NaN]}}', "NaN is not a JSON value"),
    ('{"x":{"dtype":"U8","shape":[Infinity],"data_offsets":[0,1]}}',
     "Infinity is not a JSON value"),
    ('{"x":{"dtype":"U8","shape":[-Infinity],"data_offsets":[0,1]}}',
     "-Infinity is not a JSON value"),
    ('{"x":{"dtype":"U8","shape":[1e999],"data_offsets":[0,1]}}', "number out of range: 1e999"),
    ('{"x":{"dtype":"U8","shape":[' + "9" * 400 + '],"data_offsets":[0,1]}}',
     "number out of range: " + "9" * 40),
])
def test_numbers_serde_json_cannot_read(tmp_path, header, reason):
    path, message = hostile(tmp_path, file_bytes(header, b"\0"))
    assert message == f"{path}: header is not valid JSON ({reason})"


@pytest.mark.parametrize("offsets, shown", [
    ("[-0,1]", "[-0.0, 1]"), ("[0,-0]", "[0, -0.0]"), ("[0,1.0]", "[0, 1.0]"),
    ("[0,1e0]", "[0, 1.0]"), ("[0," + "1" * 21 + "]", "[0, 1.1111111111111111e+20]"),
])
def test_offsets_spelled_as_floats(tmp_path, offsets, shown):
    """serde_json reads -0, any fraction or exponent, and integers past 20 digits as floats."""
    header = '{"x":{"dtype":"U8","shape":[1],"data_offsets":' + offsets + '}}'
    path, message = hostile(tmp_path, file_bytes(header, b"\0"))
    assert message == (f"{path}: tensor 'x': data_offsets must be [start, end] with "
                       f"0 <= start <= end, found {shown}")


def test_shape_minus_zero(tmp_path):
    path, message = hostile(tmp_path, file_bytes('{"x":{"dtype":"U8","shape":[-0],'
                                                 '"data_offsets":[0,0]}}'))
    assert message == (f"{path}: tensor 'x': shape must be a list of non-negative integers, "
                       f"found [-0.0]")


@pytest.mark.parametrize("metadata, shown", [
    ({"a": 1}, "{'a': 1}"),
    ({"a": None}, "{'a': None}"),
    (["a"], "['a']"),
    ("pt", "'pt'"),
    ({"k": ["v" * 300]}, "{'k': ['" + "v" * 192),  # repr cut at 200 characters
])
def test_metadata_not_str_to_str(tmp_path, metadata, shown):
    path, message = hostile(tmp_path, file_bytes({"__metadata__": metadata}))
    assert message == f"{path}: __metadata__ must map strings to strings, found {shown}"


def test_metadata_lone_surrogate(tmp_path):
    path, message = hostile(tmp_path, file_bytes(r'{"__metadata__":{"format":"\ud800"}}'))
    assert message == (f"{path}: __metadata__ holds a lone surrogate escape (not valid Unicode), "
                       f"found {{'format': '\\ud800'}}")


def test_tensor_name_lone_surrogate(tmp_path):
    path, message = hostile(tmp_path, file_bytes(r'{"w\udc00":{"dtype":"U8","shape":[0],'
                                                 r'"data_offsets":[0,0]}}'))
    assert message == (f"{path}: tensor 'w\\udc00': name holds a lone surrogate escape "
                       f"(not valid Unicode)")


def test_tensor_entry_not_an_object(tmp_path):
    path, message = hostile(tmp_path, file_bytes({"x": [1]}))
    assert message == f"{path}: tensor 'x': expected an object with dtype, shape, data_offsets"


@pytest.mark.parametrize("dtype, shown", [("F8_E4M3FN", "'F8_E4M3FN'"), ("f32", "'f32'"),
                                          (32, "32"), (DROP, "None")])
def test_unknown_dtype(tmp_path, dtype, shown):
    path, message = hostile_entry(tmp_path, dtype=dtype)
    assert message == f"{path}: tensor 'x': unknown dtype {shown}; known: {KNOWN_DTYPES}"


@pytest.mark.parametrize("shape, shown", [
    ([-1], "[-1]"), ([1.5], "[1.5]"), ([1.0], "[1.0]"), ([True], "[True]"), ("3", "'3'"),
    ([2**64], "[18446744073709551616]"), (DROP, "None"),
])
def test_bad_shape(tmp_path, shape, shown):
    path, message = hostile_entry(tmp_path, shape=shape)
    assert message == (f"{path}: tensor 'x': shape must be a list of non-negative integers, "
                       f"found {shown}")


@pytest.mark.parametrize("offsets, shown", [
    ([0], "[0]"), ([0, 1, 2], "[0, 1, 2]"), ([2, 1], "[2, 1]"), ([-1, 1], "[-1, 1]"),
    ([0, 2**64], "[0, 18446744073709551616]"), ([0.0, 1], "[0.0, 1]"), ("0,1", "'0,1'"),
    (DROP, "None"),
])
def test_bad_data_offsets(tmp_path, offsets, shown):
    path, message = hostile_entry(tmp_path, data_offsets=offsets)
    assert message == (f"{path}: tensor 'x': data_offsets must be [start, end] with "
                       f"0 <= start <= end, found {shown}")


def test_unknown_field_in_tensor_entry(tmp_path):
    path, message = hostile_entry(tmp_path, zeta=1, alpha=2, stricter="unknown-tensor-field")
    assert message == f"{path}: tensor 'x': unknown field 'alpha'"


def test_unknown_field_checked_after_the_official_rules(tmp_path):
    """A file the official reader refuses anyway gets the official rule's message."""
    path, message = hostile_entry(tmp_path, data=b"", zeta=1)
    assert message.startswith(f"{path}: tensors cover 1 bytes of data but the file holds 0")


@pytest.mark.parametrize("value, message", [
    ('"\\ud800"', "field 'zeta' holds a lone surrogate escape (not valid Unicode)"),
    ('{"\\udc00":1}', "field 'zeta' holds a lone surrogate escape (not valid Unicode)"),
    ("[" * 126 + "]" * 126,
     "field 'zeta' nests the header deeper than the 127 levels the official JSON parser allows"),
])
def test_unknown_field_the_official_reader_cannot_parse(tmp_path, value, message):
    header = '{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"zeta":' + value + '}}'
    path, got = hostile(tmp_path, file_bytes(header, b"\0"))
    assert got == f"{path}: tensor 'x': {message}"


@pytest.mark.parametrize("header, stricter, message", [
    ('{"x":["U8",[1],[0,1]]}', "tensor-entry-as-array",
     "tensor 'x': expected an object with dtype, shape, data_offsets, found an array"),
    ('{"x":{"dtype":{"U8":null},"shape":[1],"data_offsets":[0,1]}}', "dtype-as-map",
     "tensor 'x': dtype must be a string, found {'U8': None}"),
])
def test_serde_alternative_forms(tmp_path, header, stricter, message):
    path, got = hostile(tmp_path, file_bytes(header, b"\0"), stricter)
    assert got == f"{path}: {message}"


def test_first_offset_not_zero(tmp_path):
    path, message = hostile_entry(tmp_path, data=b"\0" * 5, data_offsets=[4, 5])
    assert message == f"{path}: tensor 'x': data starts at offset 4, expected 0 {CONTIGUOUS}"


@pytest.mark.parametrize("b_offsets", [[8, 12], [2, 6]], ids=["gap", "overlap"])
def test_offsets_not_contiguous(tmp_path, b_offsets):
    header = {"a": entry(dtype="F32", data_offsets=[0, 4]),
              "b": entry(dtype="F32", data_offsets=b_offsets)}
    path, message = hostile(tmp_path, file_bytes(header, b"\0" * b_offsets[1]))
    assert message == (f"{path}: tensor 'b': data starts at offset {b_offsets[0]}, "
                       f"expected 4 {CONTIGUOUS}")


@pytest.mark.parametrize("dtype, shape, end, needed", [
    ("F32", [2], 4, 8), ("BF16", [], 4, 2), ("U8", [0], 1, 0), ("F4", [4], 1, 2),
])
def test_size_mismatch(tmp_path, dtype, shape, end, needed):
    path, message = hostile_entry(tmp_path, data=b"\0" * end, dtype=dtype, shape=shape,
                                  data_offsets=[0, end])
    assert message == (f"{path}: tensor 'x': data_offsets span {end} bytes but shape {shape} "
                       f"of {dtype} needs {needed}")


@pytest.mark.parametrize("dtype, shape", [("U8", [2**32, 2**32]), ("F64", [2**61]),
                                          ("U8", [2**64 - 1, 2]), ("BOOL", [2**40, 2**40, 0])])
def test_shape_overflows_u64(tmp_path, dtype, shape):
    path, message = hostile_entry(tmp_path, data=b"", dtype=dtype, shape=shape, data_offsets=[0, 0])
    assert message == f"{path}: tensor 'x': shape {shape} overflows a 64-bit byte count"


@pytest.mark.parametrize("dtype, shape", [("U8", [2**64 - 1, 0]), ("F64", [2**61 - 1, 0]),
                                          ("BOOL", [2**61, 0]), ("F4", [0, 2**64 - 1])])
def test_shape_with_a_zero_after_a_huge_dimension(tmp_path, dtype, shape):
    """The official reader multiplies the dimensions in u64 (checked), then by the dtype's bits:
    a zero-element shape whose first dimensions fit in u64 is fine whatever the dtype."""
    path = tmp_path / "zero.safetensors"
    path.write_bytes(file_bytes({"x": entry(dtype=dtype, shape=shape, data_offsets=[0, 0])}))
    assert read_header(path).tensors["x"].shape == tuple(shape)


@pytest.mark.parametrize("dtype, shape, numel", [("F4", [3], 3), ("F4", [], 1),
                                                 ("F6_E2M3", [2], 2), ("F6_E3M2", [1, 5], 5)])
def test_sub_byte_dtype_misaligned(tmp_path, dtype, shape, numel):
    path, message = hostile_entry(tmp_path, dtype=dtype, shape=shape)
    assert message == (f"{path}: tensor 'x': {numel} elements of {dtype} do not end on a byte "
                       f"boundary")


@pytest.mark.parametrize("header, data", [({"x": entry(shape=[2], data_offsets=[0, 2])}, b"abc"),
                                          ({}, b"a")], ids=["after-tensor", "no-tensors"])
def test_trailing_bytes_after_data(tmp_path, header, data):
    path, message = hostile(tmp_path, file_bytes(header, data))
    covered = 2 if header else 0
    assert message == (f"{path}: tensors cover {covered} bytes of data but the file holds "
                       f"{len(data)} after the header (truncated or trailing bytes); "
                       f"re-download it")


def test_truncated_data(tmp_path):
    path, message = hostile_entry(tmp_path, data=b"a", shape=[2], data_offsets=[0, 2])
    assert message == (f"{path}: tensors cover 2 bytes of data but the file holds 1 after the "
                       f"header (truncated or trailing bytes); re-download it")


# --- tensor_nbytes and the dtype table --------------------------------------------------------

@pytest.mark.parametrize("dtype, shape, nbytes", [
    ("F32", (2, 3), 24), ("BF16", (), 2), ("U8", (0, 5), 0), ("F4", (4,), 2),
    ("F6_E2M3", (4,), 3), ("C64", (3,), 24), ("BOOL", [7], 7),
])
def test_tensor_nbytes(dtype, shape, nbytes):
    assert tensor_nbytes(dtype, shape) == nbytes


@pytest.mark.parametrize("dtype, shape, message", [
    ("F4", (3,), "3 elements of F4 do not end on a byte boundary"),
    ("F6_E3M2", (), "1 elements of F6_E3M2 do not end on a byte boundary"),
    ("float32", (1,), "unknown dtype 'float32'"),
])
def test_tensor_nbytes_rejects(dtype, shape, message):
    with pytest.raises(HeaderError) as excinfo:
        tensor_nbytes(dtype, shape)
    assert str(excinfo.value) == message


def test_dtype_table_matches_official_reader():
    with pytest.raises(safetensors.SafetensorError) as excinfo:
        safetensors.deserialize(encode_header([("t", "NOPE", (), 0, 0)]))
    official = re.findall(r"`(\w+)`", str(excinfo.value).split("expected one of", 1)[1])
    assert ", ".join(official) == ", ".join(DTYPE_BITS) == KNOWN_DTYPES
    for dtype, bits in DTYPE_BITS.items():  # 8 elements take exactly `bits` bytes
        safetensors.deserialize(encode_header([("t", dtype, (8,), 0, bits)]) + bytes(bits))


# --- files written by the official library, and our encoder read by it -----------------------

def test_reads_file_from_official_numpy_writer(tmp_path):
    arrays = {
        "f64": (np.arange(6, dtype=np.float64).reshape(2, 3), "F64"),
        "f32": (np.linspace(-1, 1, 5, dtype=np.float32), "F32"),
        "f16": (np.array([1.5, -2], dtype=np.float16), "F16"),
        "i64.scalar": (np.array(-7, dtype=np.int64), "I64"),
        "u8.empty": (np.zeros((0, 3), dtype=np.uint8), "U8"),
        "f32.empty": (np.zeros((4, 0), dtype=np.float32), "F32"),
        "mask": (np.array([[True, False], [False, True]]), "BOOL"),
        "c64": (np.array([1 + 2j], dtype=np.complex64), "C64"),
        "i8": (np.arange(-3, 4, dtype=np.int8), "I8"),
    }
    path = tmp_path / "numpy.safetensors"
    save_file({name: a for name, (a, _) in arrays.items()}, path, metadata={"format": "np"})
    header = assert_reads_back(path, {name: (dtype, a.shape, a.tobytes())
                                      for name, (a, dtype) in arrays.items()})
    assert header.metadata == {"format": "np"}


def test_reads_raw_dtypes_from_official_writer(tmp_path):
    """bfloat16, float8 and packed float4 have no numpy dtype: hand the writer raw bytes."""
    raw = {  # name: (writer dtype, storage shape, raw bytes, header dtype, logical shape)
        "bf16": ("bfloat16", (2, 2), np.arange(4, dtype=np.uint16), "BF16", (2, 2)),
        "bf16.scalar": ("bfloat16", (), np.array(0x3F80, dtype=np.uint16), "BF16", ()),
        "f8": ("float8_e4m3fn", (3,), np.arange(3, dtype=np.uint8), "F8_E4M3", (3,)),
        "f4": ("float4_e2m1fn_x2", (3,), np.arange(9, 12, dtype=np.uint8), "F4", (6,)),
        "empty": ("bfloat16", (0,), np.zeros(0, dtype=np.uint16), "BF16", (0,)),
    }
    specs = {name: TensorSpec(dtype=dt, shape=shape, data_ptr=buf.ctypes.data, data_len=buf.nbytes)
             for name, (dt, shape, buf, _, _) in raw.items()}
    path = tmp_path / "raw.safetensors"
    safetensors.serialize_file(specs, str(path))
    header = assert_reads_back(path, {name: (dtype, shape, buf.tobytes())
                                      for name, (_, _, buf, dtype, shape) in raw.items()})
    assert header.metadata is None


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_encoded_header_accepted_by_official_reader(tmp_path, metadata):
    arrays = {"wéight": (np.arange(6, dtype=np.float32).reshape(3, 2), "F32"),
              "bias": (np.array([1, 2, 3], dtype=np.float16), "F16"),
              "step": (np.array(42, dtype=np.int64), "I64"),
              "empty": (np.zeros((2, 0), dtype=np.uint8), "U8")}
    tensors, data = [], b""
    for name, (a, dtype) in arrays.items():
        tensors.append((name, dtype, a.shape, len(data), len(data) + a.nbytes))
        data += a.tobytes()
    path = tmp_path / "ours.safetensors"
    path.write_bytes(encode_header(tensors, metadata) + data)

    with safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(arrays)
        assert f.metadata() == metadata
        for name, (a, _) in arrays.items():
            got = f.get_tensor(name)
            assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)
    header = assert_reads_back(path, {name: (dtype, shape, data[start:end])
                                      for name, dtype, shape, start, end in tensors})
    assert [e.name for e in header.entries] == list(arrays)
    assert header.metadata == metadata


@pytest.mark.parametrize("name_len", range(9))
def test_encoded_header_is_space_padded_to_8(name_len):
    tensors = [("é" * name_len, "BF16", (2,), 0, 4)] if name_len else []
    encoded = encode_header(tensors, {"format": "pt"})
    (n,) = struct.unpack("<Q", encoded[:8])
    raw = encoded[8:]
    assert n == len(raw) and n % 8 == 0
    body = raw.rstrip(b" ")
    assert body.endswith(b"}") and len(raw) - len(body) < 8
    expected = {"__metadata__": {"format": "pt"}}
    expected.update({name: {"dtype": dt, "shape": list(shape), "data_offsets": [start, end]}
                     for name, dt, shape, start, end in tensors})
    assert json.loads(body) == expected


def dumps_header(tensors, metadata=None) -> bytes:
    """encode_header's reference: json.dumps of the header as a dict, padded, length first."""
    obj: dict = {} if metadata is None else {"__metadata__": dict(metadata)}
    for name, dtype, shape, start, end in tensors:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize("tensors, metadata", [
    ([], None), ([], {}), ([("é\"\\\n\x00\u2028\U0001F600", "F32", (1, 2), 0, 8)], {"k\n": "v\""}),
    ([("a", "F32", (), 0, 4), ("a", "U8", (1,), 4, 5)], None),  # a name twice: the dict keeps one
    ([("__metadata__", "F32", (), 0, 4)], {"x": "y"}), ([("__metadata__", "F32", (), 0, 4)], None),
    ([("a", "F32", (True,), 0, 4)], None), ([("a", "F32", [1.0], 0, 4)], None),
    ([("a", None, [1], 0, 4)], None), ([(1, "U8", [1], 0, 1)], None), ([("a", "U8", [], 0, False)], None),
    # a shape seen before (its JSON reused), then one equal to it as a key but not in JSON
    ([("a", "F32", (1,), 0, 4), ("b", "F32", (1,), 4, 8), ("c", "F32", (True,), 8, 12)], None),
    # an equal shape, another tuple object (its element types checked again), then another dtype
    ([("a", "F32", (2, 3), 0, 24), ("b", "F32", tuple(range(2, 4)), 24, 48), ("c", "F16", (2, 3), 48, 60)], None),
], ids=["empty", "empty-metadata", "escapes", "twice", "metadata-name", "metadata-name-alone",
        "bool-dim", "float-dim", "null-dtype", "int-name", "bool-offset", "bool-dim-after-int",
        "equal-shape-other-object"])
def test_encode_header_writes_what_json_dumps_writes(tensors, metadata):
    assert encode_header(iter(tensors), metadata) == dumps_header(tensors, metadata)


@settings(max_examples=100, deadline=None)
@given(layout=st.deferred(lambda: valid_layouts()))
def test_encode_header_writes_what_json_dumps_writes_property(layout):
    tensors, metadata, _ = layout
    assert encode_header(tensors, metadata) == dumps_header(tensors, metadata)


def test_encode_header_refuses_a_header_over_the_maximum(monkeypatch):
    tensors = [(f"t{i}", "U8", (1,), i, i + 1) for i in range(3)]
    size = len(encode_header(tensors)) - 8
    monkeypatch.setattr("tensorsurgery.formats.safetensors.MAX_HEADER_SIZE", size)
    assert len(encode_header(tensors)) == 8 + size
    monkeypatch.setattr("tensorsurgery.formats.safetensors.MAX_HEADER_SIZE", size - 1)
    with pytest.raises(HeaderError) as excinfo:
        encode_header(tensors)
    assert str(excinfo.value) == (f"a header for 3 tensors would be {size} bytes, over the {size - 1} "
                                  f"that safetensors readers accept; spread the tensors over more files")


# --- property: parse_header returns a valid Header or raises HeaderError, nothing else --------

FUZZ_PATH = Path("fuzz.safetensors")
NAMES = st.text(st.characters(codec="utf-8"), max_size=6).filter(lambda s: s != "__metadata__")
NEAR_MISS = st.one_of(  # a JSON value that is almost, or not at all, what a field wants
    st.integers(-2, 40), st.sampled_from([2**32, 2**61, 2**63, 2**64 - 1, 2**64, -2**63]),
    st.sampled_from(sorted(DTYPE_BITS) + ["F8_E4M3FN", "f32", "", "\ud800"]),
    st.none(), st.booleans(), st.floats(), st.just({}),
    st.lists(st.one_of(st.integers(-1, 8), st.sampled_from([2**32, 2**64 - 1, 2**64])), max_size=4),
)


@st.composite
def valid_layouts(draw):
    """(tensors in random JSON order, metadata, data length) of a header that must be accepted."""
    tensors, offset = [], 0
    for name in draw(st.lists(NAMES, max_size=5, unique=True)):
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        if math.prod(shape) * DTYPE_BITS[dtype] % 8:
            shape.append(8)
        size = math.prod(shape) * DTYPE_BITS[dtype] // 8
        tensors.append((name, dtype, tuple(shape), offset, offset + size))
        offset += size
    metadata = draw(st.none() | st.dictionaries(NAMES, NAMES, max_size=2))
    return draw(st.permutations(tensors)), metadata, offset


@st.composite
def json_edited(draw, members: list[list]) -> list[list]:
    """``members`` ([key, value] pairs of the header object) after one JSON-level edit."""
    members = copy.deepcopy(members)
    if not members:
        return [[draw(NAMES), draw(NEAR_MISS)]]
    member = draw(st.sampled_from(members))
    value = member[1]
    edit = draw(st.sampled_from(["set", "drop", "nudge_offsets", "nudge_shape", "whole",
                                 "duplicate", "rename"]))
    if edit == "whole" or not isinstance(value, dict):
        member[1] = draw(NEAR_MISS)
    elif edit == "set":
        value[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(NEAR_MISS)
    elif edit == "drop" and value:
        del value[draw(st.sampled_from(sorted(value)))]
    elif edit == "nudge_offsets" and isinstance(value.get("data_offsets"), list):
        value["data_offsets"] = [o + draw(st.integers(-3, 3)) if isinstance(o, int) else o
                                 for o in value["data_offsets"]]
    elif edit == "nudge_shape" and isinstance(value.get("shape"), list):
        shape = value["shape"]
        value["shape"] = draw(st.sampled_from(
            [shape[1:], shape + [2], [d + 1 for d in shape if isinstance(d, int)]]))
    elif edit == "duplicate":
        members.append(copy.deepcopy(member))
    elif edit == "rename":
        member[0] = draw(st.sampled_from(["__metadata__", "\udc00", members[0][0]]))
    return members


@st.composite
def byte_edited(draw, raw: bytes) -> bytes:
    """``raw`` after one byte flip, truncation, insertion or deletion."""
    at = draw(st.integers(0, len(raw)))
    edit = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
    if edit == "flip" and at < len(raw):
        return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    if edit == "truncate":
        return raw[:at]
    if edit == "insert":
        return raw[:at] + draw(st.binary(min_size=1, max_size=3) | st.sampled_from(
            [b"-", b"0", b"9", b",", b"{", b"]", b'"', b"\\", b" ", b"\xc3"])) + raw[at:]
    return raw[:at] + raw[at + draw(st.integers(1, 4)):]


@st.composite
def mutated_headers(draw):
    """(raw, file_size) from a valid header after JSON-level edits, byte edits and a wrong size."""
    tensors, metadata, data_len = draw(valid_layouts())
    members = [[name, {"dtype": dt, "shape": list(shape), "data_offsets": [start, end]}]
               for name, dt, shape, start, end in tensors]
    if metadata is not None:
        members.insert(draw(st.integers(0, len(members))), ["__metadata__", metadata])
    for _ in range(draw(st.integers(0, 2))):
        members = draw(json_edited(members))
    raw = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in members) + "}").encode()
    raw += b" " * draw(st.integers(0, 7))
    for _ in range(draw(st.integers(0, 2))):
        raw = draw(byte_edited(raw))
    data_len += draw(st.sampled_from([0, 0, 0, 1, -1, 8, -8]))
    return raw, 8 + len(raw) + data_len


def parse_or_header_error(raw: bytes, file_size: int) -> Header | None:
    try:
        return parse_header(FUZZ_PATH, raw, file_size)
    except HeaderError as e:
        assert str(e).startswith(f"{FUZZ_PATH}: ")
        return None


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(raw=st.binary(max_size=200), extra=st.integers(-4, 64))
def test_parse_header_arbitrary_bytes(raw, extra):
    file_size = 8 + len(raw) + extra
    header = parse_or_header_error(raw, file_size)
    if header is not None:
        assert_valid(header, raw, file_size)


@FUZZ
@given(mutated_headers())
def test_parse_header_mutated_headers(case):
    raw, file_size = case
    header = parse_or_header_error(raw, file_size)
    if header is not None:
        assert_valid(header, raw, file_size)


@FUZZ
@given(valid_layouts())
def test_parse_header_accepts_every_valid_layout(layout):
    tensors, metadata, data_len = layout
    raw = encode_header(tensors, metadata)[8:]
    header = parse_header(FUZZ_PATH, raw, 8 + len(raw) + data_len)
    assert_valid(header, raw, 8 + len(raw) + data_len)
    assert [(e.name, e.dtype, e.shape, e.start, e.end) for e in header.entries] == \
        sorted(tensors, key=lambda t: (t[3], t[4]))
    assert header.metadata == metadata

"""Differential tests of tensorsurgery.formats.safetensors against the official ``safetensors`` reader.

Both readers see the same files: valid headers from a seeded generator, then mutated at the JSON
level (number spellings, keys, dtypes, shapes, offsets, metadata, padding, duplicate and unknown
keys, serde's alternative forms) and at the byte level. They must agree on accept/reject, and
when both accept, on every tensor's name, dtype, shape and bytes (so offsets) and the metadata.
The only allowed disagreements are the kinds listed in ``DELIBERATE_DIFFERENCES``: we raise
``StricterHeaderError`` with that kind, and the official reader accepts the file. Each kind is
also shown real by its own example.

Bounded for CI (a few seconds); a campaign is ``TS_FUZZ_EXAMPLES=20000 python -m pytest
tests/test_format_differential.py -s`` (``TS_FUZZ_SEED`` picks the seed; the hypothesis properties
run a tenth as many examples), which prints the counts.
"""
from __future__ import annotations

import collections
import json
import math
import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from test_format import mutated_headers, valid_layouts

from tensorsurgery.errors import HeaderError
from tensorsurgery.formats.safetensors import (
    DELIBERATE_DIFFERENCES,
    DTYPE_BITS,
    MAX_HEADER_SIZE,
    StricterHeaderError,
    _parse_fast,
    _parse_general,
    encode_header,
    read_header,
)

EXAMPLES = int(os.environ.get("TS_FUZZ_EXAMPLES", "1500"))
SEED = int(os.environ.get("TS_FUZZ_SEED", "20240607"))


# --- the two readers on one file ----------------------------------------------------------------

@dataclass
class Verdict:
    accepted: bool
    tensors: dict = field(default_factory=dict)  # name -> (dtype, shape list, data bytes)
    metadata: dict | None = None
    error: str = ""
    difference: str | None = None  # ours only: the StricterHeaderError's kind
    fast: bool = False  # ours only: the fast parser read it


def official(path: Path, content: bytes, with_safe_open: bool) -> Verdict:
    """The official reader's verdict: ``deserialize`` on the bytes, and ``safe_open`` on the file
    (its metadata, and that it agrees with ``deserialize``) when asked or when accepted."""
    try:
        tensors = {name: (t["dtype"], list(t["shape"]), bytes(t["data"]))
                   for name, t in safetensors.deserialize(content)}
        verdict = Verdict(True, tensors)
    except Exception as e:  # SafetensorError, or an overflow on absurd values
        verdict = Verdict(False, error=str(e))
    if verdict.accepted or with_safe_open:
        try:
            with safe_open(str(path), framework="numpy") as f:
                keys, metadata = sorted(f.keys()), f.metadata()
            assert verdict.accepted, f"safe_open accepts what deserialize refuses: {verdict.error}"
            assert keys == sorted(verdict.tensors)
            verdict.metadata = metadata
        except Exception as e:
            if isinstance(e, AssertionError):
                raise
            assert not verdict.accepted, f"deserialize accepts what safe_open refuses: {e}"
    return verdict


def ours(path: Path, content: bytes) -> Verdict:
    try:
        header = read_header(path)
    except StricterHeaderError as e:
        return Verdict(False, error=str(e), difference=e.difference)
    except HeaderError as e:
        return Verdict(False, error=str(e))
    tensors = {e.name: (e.dtype, list(e.shape),
                        content[header.data_start + e.start:header.data_start + e.end])
               for e in header.entries}
    assert len(tensors) == len(header.entries) == len(header.tensors)
    return Verdict(True, tensors, None if header.metadata is None else dict(header.metadata),
                   fast=_check_fast_equals_general(path, content, header))


def _check_fast_equals_general(path: Path, content: bytes, header) -> bool:
    """Where the fast parser answers, the general one gives the same Header; True if it did."""
    buf = content[:header.data_start]
    fast = _parse_fast(path, buf, len(content) - len(buf))
    if fast is not None:
        general = _parse_general(path, buf[8:].decode("utf-8"), buf, len(content) - len(buf))
        assert fast == general and list(fast.tensors) == list(general.tensors)
        assert fast.entries == header.entries and fast.raw == header.raw == buf
    return fast is not None


class Tally:
    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.failures: list[str] = []  # run_campaign's: every disagreement, not just the first

    def check(self, path: Path, content: bytes, with_safe_open: bool = False) -> None:
        """Write ``content``, read it with both readers and assert they agree."""
        path.write_bytes(content)
        off = official(path, content, with_safe_open)
        mine = ours(path, content)
        where = f"file {content[:300]!r}{'...' if len(content) > 300 else ''}"
        if mine.difference is not None:
            assert mine.difference in DELIBERATE_DIFFERENCES, where
            assert off.accepted, (f"{where}: StricterHeaderError {mine.difference} but the official "
                                  f"reader refuses it too ({off.error})")
            self.counts["deliberate: " + mine.difference] += 1
        elif off.accepted != mine.accepted:
            raise AssertionError(f"{where}: official {'accepts' if off.accepted else 'refuses'} "
                                 f"({off.error}), ours {'accepts' if mine.accepted else 'refuses'} "
                                 f"({mine.error})")
        elif off.accepted:
            assert mine.tensors == off.tensors, where
            assert mine.metadata == off.metadata, where
            self.counts["both accept"] += 1
            self.counts["both accept, ours by the fast parser"] += mine.fast
        else:
            self.counts["both refuse"] += 1
        self.counts["cases"] += 1


# --- a seeded generator of valid files, and mutations ---------------------------------------

class Raw:
    """JSON text written as is: a spelling json.dumps would not produce."""

    def __init__(self, text: str):
        self.text = text


class Obj:
    """A JSON object as its list of [key, value] pairs: keys may repeat, order is kept."""

    def __init__(self, pairs: list[list]):
        self.pairs = pairs


NAME_POOL = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight",
             "", "x", "é", "中文.weight", "emoji\U0001F600", 'quo"te', "back\\slash", "new\nline",
             "nul\x00", "del\x7f", "tab\t", "__metadata__x", "__METADATA__", "0", "a b", "ü" * 5,
             "\u2028sep", "model-00001", "a-0", "[-0", ",-0", ":-0"]
NUMBER_SPELLINGS = ["-0", "0.0", "-0.0", "1e2", "1E0", "0e0", "+1", "01", "00", "1.5", "-1",
                    str(2**64 - 1), str(2**64), str(2**63), "1" * 21, "9" * 400, "NaN", "Infinity",
                    "-Infinity", "1e999", "-1e999", "1e-999", "true", "null", '"3"', "[]", "{}",
                    "4294967296", "2305843009213693952", " 1", "1 "]
META_POOL = ["pt", "", "é", "\U0001F600", "a\"b", "x\\y", "\n", "{}", "1"]


def random_name(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return rng.choice(NAME_POOL) + ("" if rng.random() < 0.5 else str(rng.randrange(100)))
    return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0x3000),
                                   rng.randrange(0x10000, 0x10FFFF)]))
                   for _ in range(rng.randrange(0, 6)))


@dataclass
class Case:
    members: list  # [[key, value]] of the header object, values: dict/Obj/list/Raw/...
    data_len: int
    style: dict
    padding: str | None = None  # None: spaces to a multiple of 8, as the official writer
    prefix: str = ""
    data_delta: int = 0
    length_delta: int | None = 0  # None: a huge length
    byte_edits: list = field(default_factory=list)


def valid_case(rng: random.Random) -> Case:
    names = list(dict.fromkeys(random_name(rng) for _ in range(rng.randrange(0, 7))))
    names = [n for n in names if n != "__metadata__"]
    specs = []
    for name in names:
        dtype = rng.choice(list(DTYPE_BITS))
        shape = [rng.choice([0, 1, 1, 2, 3, 5, 8]) for _ in range(rng.randrange(0, 4))]
        if math.prod(shape) * DTYPE_BITS[dtype] % 8:
            shape.append(rng.choice([2, 4, 8]))
            if math.prod(shape) * DTYPE_BITS[dtype] % 8:
                shape[-1] = 8
        specs.append((name, dtype, shape, math.prod(shape) * DTYPE_BITS[dtype] // 8))
    offset, members = 0, []
    for name, dtype, shape, nbytes in specs:  # data order
        members.append([name, {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}])
        offset += nbytes
    if rng.random() < 0.4:
        rng.shuffle(members)
    r = rng.random()
    if r < 0.3:
        meta = {rng.choice(["format", "a", "é", ""]): rng.choice(META_POOL)
                for _ in range(rng.randrange(0, 3))}
        members.insert(rng.choice([0, 0, 0, len(members)]), ["__metadata__", meta])
    elif r < 0.35:
        members.insert(0, ["__metadata__", None])
    style = {"compact": rng.random() < 0.75, "ascii": rng.random() < 0.3,
             "indent": rng.random() < 0.05}
    return Case(members, offset, style, padding=None if rng.random() < 0.7 else "")


def render_value(v, style) -> str:
    sep = (",", ":") if style["compact"] else (", ", ": ")
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, (Obj, dict)):
        pairs = v.pairs if isinstance(v, Obj) else list(v.items())
        return "{" + sep[0].join(render_key(k, style) + sep[1] + render_value(x, style)
                                 for k, x in pairs) + "}"
    if isinstance(v, list):
        return "[" + sep[0].join(render_value(x, style) for x in v) + "]"
    return json.dumps(v, ensure_ascii=style["ascii"])


def render_key(k, style) -> str:
    return k.text if isinstance(k, Raw) else json.dumps(k, ensure_ascii=style["ascii"])


def render(case: Case) -> bytes:
    """The whole file: length, header JSON, padding, data (random bytes), after the edits."""
    style = case.style
    if style["indent"]:
        body = "{\n" + ",\n".join("  " + render_key(k, style) + ": " + render_value(v, style)
                                  for k, v in case.members) + "\n}"
    else:
        body = "{" + ("," if style["compact"] else ", ").join(
            render_key(k, style) + ":" + render_value(v, style) for k, v in case.members) + "}"
    raw = (case.prefix + body).encode("utf-8", "surrogatepass")
    if case.padding is None:
        raw += b" " * (-len(raw) % 8)
    else:
        raw += case.padding.encode("utf-8", "surrogatepass")
    for edit in case.byte_edits:
        raw = edit(raw)
    n = len(raw) + (case.length_delta or 0) if case.length_delta is not None else MAX_HEADER_SIZE + 1
    data = random.Random(len(raw)).randbytes(max(0, case.data_len + case.data_delta))
    return struct.pack("<Q", max(0, n)) + raw + data


def entries_of(case: Case) -> list[list]:
    return [m for m in case.members if isinstance(m[1], (dict, Obj)) and m[0] != "__metadata__"]


def as_obj(member: list) -> Obj:
    if isinstance(member[1], dict):
        member[1] = Obj([[k, v] for k, v in member[1].items()])
    return member[1]


def mutate(case: Case, rng: random.Random) -> str:
    """Apply one random mutation to ``case``; return its name."""
    entries = entries_of(case)
    kind = rng.choice(MUTATIONS if entries else [m for m in MUTATIONS if m not in ENTRY_MUTATIONS])
    globals()["_m_" + kind](case, rng, entries)
    return kind


def _number_slot(rng, entries):
    member = rng.choice(entries)
    obj = as_obj(member)
    fields = [p for p in obj.pairs if p[0] in ("shape", "data_offsets") and isinstance(p[1], list)
              and p[1]]
    return (rng.choice(fields)[1] if fields else None)


def _m_number_spelling(case, rng, entries):
    slot = _number_slot(rng, entries)
    if slot is not None:
        i = rng.randrange(len(slot))
        slot[i] = Raw(rng.choice(NUMBER_SPELLINGS))


def _m_number_nudge(case, rng, entries):
    slot = _number_slot(rng, entries)
    if slot is not None:
        i = rng.randrange(len(slot))
        if isinstance(slot[i], int):
            slot[i] = max(0, slot[i] + rng.choice([-8, -1, 1, 2, 8, 2**64]))


def _m_shape(case, rng, entries):
    obj = as_obj(rng.choice(entries))
    for p in obj.pairs:
        if p[0] == "shape" and isinstance(p[1], list):
            p[1] = rng.choice([p[1] + [0], p[1][1:], [0] + p[1], p[1] + [2**32, 2**32],
                               [2**64 - 1, 0] + p[1], [2**61, 0], [0, 2**64 - 1, 2**64 - 1],
                               [2**62], p[1] + [1]])


def _m_offsets(case, rng, entries):
    obj = as_obj(rng.choice(entries))
    for p in obj.pairs:
        if p[0] == "data_offsets" and isinstance(p[1], list) and len(p[1]) == 2:
            a, b = p[1]
            p[1] = rng.choice([[b, a], [a], [a, b, b], [a, a], [b, b], {"0": a, "1": b}, [a, Raw("-0")]])


def _m_dtype(case, rng, entries):
    obj = as_obj(rng.choice(entries))
    for p in obj.pairs:
        if p[0] == "dtype":
            d = p[1] if isinstance(p[1], str) else "U8"
            p[1] = rng.choice([rng.choice(list(DTYPE_BITS)), d.lower(), d + " ", "F8_E4M3FN", "",
                               Obj([[d, None]]), Obj([[d, []]]), Obj([[d.lower(), None]]), Obj([]),
                               Obj([[d, None], ["F32", None]]), [d], None, 8, Raw('"\\u0055\\u0038"')])


def _m_drop_field(case, rng, entries):
    obj = as_obj(rng.choice(entries))
    if obj.pairs:
        del obj.pairs[rng.randrange(len(obj.pairs))]


def _m_extra_field(case, rng, entries):
    obj = as_obj(rng.choice(entries))
    depth = rng.choice([1, 3, 124, 125, 126, 127])
    value = rng.choice([1, Raw("-0"), "x", None, Raw("1e999"), Raw("1e-999"), Raw("NaN"),
                        Raw("9" * 400), Raw("[" * depth + "]" * depth), Obj([["a", 1], ["a", 2]]),
                        Raw('"\\ud800"'), {"k": [1, {"z": None}]}])
    obj.pairs.insert(rng.randrange(len(obj.pairs) + 1),
                     [rng.choice(["extra", "offsets", "__metadata__", "Dtype", ""]), value])


def _m_duplicate_field(case, rng, entries):
    obj = as_obj(rng.choice(entries))
    if obj.pairs:
        k, v = rng.choice(obj.pairs)
        obj.pairs.append([k, v if rng.random() < 0.5 else Raw("0")])


def _m_reorder_fields(case, rng, entries):
    obj = as_obj(rng.choice(entries))
    rng.shuffle(obj.pairs)


def _m_entry_as_array(case, rng, entries):
    member = rng.choice(entries)
    obj = as_obj(member)
    d = {k: v for k, v in obj.pairs}
    arr = [d.get("dtype"), d.get("shape"), d.get("data_offsets")]
    member[1] = rng.choice([arr, arr, arr[:2], arr + [1], arr[::-1]])


def _m_entry_replaced(case, rng, entries):
    rng.choice(entries)[1] = rng.choice([None, [], "x", 1, Obj([]), Raw("-0"), [1]])


def _m_duplicate_tensor(case, rng, entries):
    k, v = rng.choice(entries)
    if rng.random() < 0.5:
        case.members.append([k, v])
    else:  # same name, the other copy describes another tensor
        case.members.insert(rng.randrange(len(case.members) + 1),
                            [k, {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}])


def _m_rename(case, rng, entries):
    member = rng.choice(entries)
    member[0] = rng.choice(["__metadata__", Raw('"\\ud800"'), Raw('"\\udc00x"'),
                            Raw('"\\ud83d\\ude00"'), Raw('"__metadata\\u005f_"'),
                            Raw('"\\u0078"'), Raw('"a\\/b"'), Raw('"a\\qb"'),
                            str(getattr(member[0], "text", member[0])) + "\x01"])


def _m_metadata(case, rng, entries):
    metas = [m for m in case.members if m[0] == "__metadata__"]
    value = rng.choice([{"a": 1}, {"a": None}, ["a"], "pt", None, {}, Obj([["a", "b"], ["a", "c"]]),
                        Obj([["a", "b"], ["a", 1]]), {"a": Raw('"\\ud800"')},
                        {"a": Raw('"\\ud83d\\ude00"')}, {"a": Raw("-0")}, {"\x00": "é"},
                        {"k": "v" * 50}])
    if metas and rng.random() < 0.7:
        metas[0][1] = value
    else:
        case.members.insert(rng.randrange(len(case.members) + 1), ["__metadata__", value])


def _m_padding(case, rng, entries):
    case.padding = rng.choice(["", " ", "  \t\n\r", "\x00", "\x00\x00", "\x0b", "\x0c", "\u00a0",
                               "\u2028", "x", " }", "\ufeff", "\r\n"])


def _m_prefix(case, rng, entries):
    case.prefix = rng.choice(["\ufeff", " ", "\n\t", "\x00", "\u00a0"])


def _m_style(case, rng, entries):
    case.style = {"compact": rng.random() < 0.5, "ascii": rng.random() < 0.5,
                  "indent": rng.random() < 0.3}


def _m_data_len(case, rng, entries):
    case.data_delta = rng.choice([-8, -1, 1, 8])


def _m_length_field(case, rng, entries):
    case.length_delta = rng.choice([-1, 1, -8, None, -10**9])


def _m_bytes(case, rng, entries):
    def edit(raw: bytes, r=random.Random(rng.random())) -> bytes:
        at = r.randrange(len(raw) + 1)
        what = r.choice(["flip", "insert", "delete", "truncate"])
        if what == "flip" and at < len(raw):
            return raw[:at] + bytes([raw[at] ^ r.randrange(1, 256)]) + raw[at + 1:]
        if what == "insert":
            return raw[:at] + r.choice([b"-", b"0", b"9", b",", b"{", b"]", b'"', b"\\", b" ",
                                        b"\xc3", b"\xed\xa0\x80", b"\xff", b"e", b"."]) + raw[at:]
        if what == "delete":
            return raw[:at] + raw[at + r.randrange(1, 4):]
        return raw[:at]
    case.byte_edits.append(edit)


ENTRY_MUTATIONS = ["number_spelling", "number_nudge", "shape", "offsets", "dtype", "drop_field",
                   "extra_field", "duplicate_field", "reorder_fields", "entry_as_array",
                   "entry_replaced", "duplicate_tensor", "rename"]
MUTATIONS = ENTRY_MUTATIONS + ["metadata", "padding", "prefix", "style", "data_len",
                               "length_field", "bytes"]


def run_campaign(n: int, seed: int, tmp_path: Path) -> Tally:
    rng = random.Random(seed)
    tally = Tally()
    path = tmp_path / "case.safetensors"
    for i in range(n):
        case = valid_case(rng)
        for _ in range(rng.choice([0, 0, 1, 1, 1, 2, 3])):
            tally.counts["mutation: " + mutate(case, rng)] += 1
        try:
            tally.check(path, render(case), with_safe_open=i % 8 == 0)
        except AssertionError as e:
            tally.counts["cases"] += 1
            tally.counts["DISAGREEMENTS"] += 1
            tally.failures.append(f"case {i}: {e}")
    return tally


# --- tests ---------------------------------------------------------------------------------

def test_differential_campaign(tmp_path, capsys):
    """Seeded generator and mutator: the readers agree on every file, but for listed kinds."""
    tally = run_campaign(EXAMPLES, SEED, tmp_path)
    c = tally.counts
    if "TS_FUZZ_EXAMPLES" in os.environ:
        with capsys.disabled():
            print(f"\ndifferential campaign, seed {SEED}:")
            for key, value in sorted(c.items()):
                print(f"  {key}: {value}")
    assert not tally.failures, "\n\n".join(tally.failures[:5])
    assert c["cases"] == EXAMPLES
    assert c["both accept"] > EXAMPLES // 10 and c["both refuse"] > EXAMPLES // 10


#: One file per deliberate difference: the official reader accepts it, we refuse it, saying why.
DIFFERENCE_EXAMPLES = {
    "duplicate-tensor-name": (b'{"x":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
                              b'"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x07",
                              "header has duplicate key 'x'"),
    "duplicate-metadata-key": (b'{"__metadata__":{"format":"pt","format":"np"}}', b"",
                               "header has duplicate key 'format'"),
    "unknown-tensor-field": (b'{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"offsets":-0}}',
                             b"\x07", "tensor 'x': unknown field 'offsets'"),
    "tensor-entry-as-array": (b'{"x":["U8",[1],[0,1]]}', b"\x07",
                              "tensor 'x': expected an object with dtype, shape, data_offsets, "
                              "found an array"),
    "dtype-as-map": (b'{"x":{"dtype":{"U8":null},"shape":[1],"data_offsets":[0,1]}}', b"\x07",
                     "tensor 'x': dtype must be a string, found {'U8': None}"),
}


def test_every_deliberate_difference_has_an_example():
    assert set(DIFFERENCE_EXAMPLES) == set(DELIBERATE_DIFFERENCES)
    assert all(reason and "\n" not in reason for reason in DELIBERATE_DIFFERENCES.values())


@pytest.mark.parametrize("kind", sorted(DIFFERENCE_EXAMPLES))
def test_deliberate_difference_is_real(tmp_path, kind):
    header, data, message = DIFFERENCE_EXAMPLES[kind]
    path = tmp_path / "d.safetensors"
    content = struct.pack("<Q", len(header)) + header + data
    path.write_bytes(content)
    safetensors.deserialize(content)  # the official reader takes it
    with safe_open(str(path), framework="numpy") as f:
        f.keys()
    with pytest.raises(StricterHeaderError) as excinfo:
        read_header(path)
    assert excinfo.value.difference == kind
    assert str(excinfo.value) == f"{path}: {message}"
    # and the differential check counts it as that difference
    tally = Tally()
    tally.check(path, content)
    assert tally.counts["deliberate: " + kind] == 1


#: Spellings Python's json takes and serde_json (into u64) refuses, in every number slot.
@pytest.mark.parametrize("spelling", ["-0", "0.0", "-0.0", "0e0", "1E0", "1e2", "NaN", "Infinity",
                                      "-Infinity", "1e999", "18446744073709551616", "1" * 25])
@pytest.mark.parametrize("slot", ["shape", "start", "end"])
def test_number_spellings_refused_like_official(tmp_path, spelling, slot):
    shape = spelling if slot == "shape" else "0"
    start = spelling if slot == "start" else "0"
    end = spelling if slot == "end" else "0"
    header = f'{{"x":{{"dtype":"U8","shape":[{shape}],"data_offsets":[{start},{end}]}}}}'.encode()
    content = struct.pack("<Q", len(header)) + header
    path = tmp_path / "n.safetensors"
    path.write_bytes(content)
    with pytest.raises(safetensors.SafetensorError):
        safetensors.deserialize(content)
    with pytest.raises(HeaderError) as excinfo:
        read_header(path)
    assert not isinstance(excinfo.value, StricterHeaderError)


@pytest.mark.parametrize("header, data_len", [
    ('{"x":{"dtype":"U8","shape":[18446744073709551615,0],"data_offsets":[0,0]}}', 0),
    ('{"x":{"dtype":"F64","shape":[2305843009213693951,0],"data_offsets":[0,0]}}', 0),
    ('{"x":{"dtype":"BOOL","shape":[2305843009213693952,0],"data_offsets":[0,0]}}', 0),
    ('{"__metadata__":null}', 0),
    ('{}\t\n\r ', 0),
    ('\t\n {"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', 1),
    ('{"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},"a":{"dtype":"U8","shape":[1],'
     '"data_offsets":[0,1]}}', 2),
    ('{"\\ud83d\\ude00":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}', 0),
    ('{"__metadata\\u005f_":{"a":"b"},"\\u0078":{"\\u0064type":"U8","shape":[1],'
     '"data_offsets":[0,1]}}', 1),
    ('{"a":{"data_offsets":[0,0],"shape":[0,5],"dtype":"F4"}}', 0),
])
def test_edge_cases_accepted_like_official(tmp_path, header, data_len):
    raw = header.encode()
    content = struct.pack("<Q", len(raw)) + raw + bytes(range(data_len))
    tally = Tally()
    tally.check(tmp_path / "e.safetensors", content, with_safe_open=True)
    assert tally.counts["both accept"] == 1


@pytest.mark.parametrize("header", [
    '{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"e":' + "[" * 126 + "]" * 126 + "}}",
    '{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"e":1e999}}',
    '{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"e":NaN}}',
    '{"x":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
    '{"__metadata__":{},"__metadata__":{}}',
    '{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"x":{"dtype":"U8","shape":[1],'
    '"data_offsets":[0,1]},"__metadata__":{},"__metadata__":{}}',
    '{"__metadata__":{"a":"b","a":1}}',
    '{"x":{"dtype":{"U8":null,"F32":null},"shape":[1],"data_offsets":[0,1]}}',
    '{"x":["U8",[1],[0,1],1]}',
    '{"x":{"dtype":"bad","shape":[1],"data_offsets":[0,1]},"x":{"dtype":"U8","shape":[1],'
    '"data_offsets":[0,1]}}',
    '{"__metadata__":{"a":1,"a":"b"}}',
    '{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"e":"\\ud800","e":1}}',
    '\ufeff{}',
    '{}\x00',
    '',
])
def test_edge_cases_refused_like_official(tmp_path, header):
    """Refused by both, and not as a deliberate difference: the official reader refuses too."""
    raw = header.encode()
    content = struct.pack("<Q", len(raw)) + raw + (b"\x07" if '"x"' in header else b"")
    tally = Tally()
    tally.check(tmp_path / "r.safetensors", content, with_safe_open=True)
    assert tally.counts["both refuse"] == 1


def test_dropped_duplicate_is_checked_as_json_not_as_layout(tmp_path):
    """Of two same-named tensors the official reader checks both values' types but lays out only
    the last: reversed offsets in the first are no reason to refuse (found by the campaign)."""
    raw = (b'{"x":{"dtype":"U8","shape":[1],"data_offsets":[5,1]},'
           b'"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}')
    tally = Tally()
    tally.check(tmp_path / "d.safetensors", struct.pack("<Q", len(raw)) + raw + b"\x07")
    assert tally.counts["deliberate: duplicate-tensor-name"] == 1


def test_deliberate_differences_extra_field_depth_limit(tmp_path):
    """An unknown field nested to the official parser's limit is a deliberate difference; one
    level deeper and the official reader refuses the file too."""
    for depth, kind in [(125, "deliberate: unknown-tensor-field"), (126, "both refuse")]:
        raw = ('{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"e":' + "[" * depth
               + "]" * depth + "}}").encode()
        tally = Tally()
        tally.check(tmp_path / "d.safetensors", struct.pack("<Q", len(raw)) + raw + b"\x07")
        assert tally.counts[kind] == 1


#: Hypothesis examples per property: a tenth of the campaign's (150 by default).
DIFF = settings(max_examples=EXAMPLES // 10, deadline=None, suppress_health_check=list(HealthCheck))


@DIFF
@given(case=mutated_headers())
def test_hypothesis_mutated_headers_agree(tmp_path_factory, case):
    raw, file_size = case
    content = struct.pack("<Q", len(raw)) + raw
    content += random.Random(file_size).randbytes(max(0, file_size - len(content)))
    Tally().check(tmp_path_factory.getbasetemp() / "h.safetensors", content)


@DIFF
@given(raw=st.binary(max_size=120), extra=st.integers(0, 16))
def test_hypothesis_arbitrary_bytes_agree(tmp_path_factory, raw, extra):
    content = struct.pack("<Q", len(raw)) + raw + bytes(extra)
    Tally().check(tmp_path_factory.getbasetemp() / "b.safetensors", content)


@DIFF
@given(layout=valid_layouts())
def test_encoded_headers_accepted_by_official_reader(tmp_path_factory, layout):
    """Every file encode_header writes is accepted by the official reader, with the same
    tensors and metadata, and read back by ours through the fast parser."""
    tensors, metadata, data_len = layout
    content = encode_header(tensors, metadata) + random.Random(data_len).randbytes(data_len)
    path = tmp_path_factory.getbasetemp() / "enc.safetensors"
    tally = Tally()
    tally.check(path, content, with_safe_open=True)
    assert tally.counts["both accept"] == 1
    n = struct.unpack("<Q", content[:8])[0]
    if all('"' not in t[0] and "\\" not in t[0] and min(map(ord, t[0]), default=32) >= 32
           for t in tensors):
        assert _parse_fast(path, content[:8 + n], data_len) is not None


def test_large_compact_header_takes_the_fast_path(tmp_path):
    """The compact layout of a big checkpoint is parsed without building a JSON tree."""
    tensors, offset = [], 0
    for i in range(3000):
        shape = (4, 2 + i % 3)
        tensors.append((f"model.layers.{i // 30}.mlp.experts.{i % 30}.w", "BF16", shape, offset,
                        offset + 2 * shape[0] * shape[1]))
        offset = tensors[-1][-1]
    buf = encode_header(tensors, {"format": "pt"})
    header = _parse_fast(tmp_path, buf, offset)
    assert header is not None and len(header.entries) == 3000
    shapes = {id(e.shape) for e in header.entries}
    assert len(shapes) == 3  # one tuple per distinct shape
    assert all(a.end is b.start for a, b in zip(header.entries, header.entries[1:]))

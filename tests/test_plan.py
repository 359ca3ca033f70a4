"""Tests for tensorsurgery.planning.planner, from synthetic Checkpoints only (hand-made headers, no files).

The synthetic decoder (tests/helpers.py) has per layer ``self_attn.q_proj`` (32 bytes in BF16),
``mlp.up_proj`` (64) and ``input_layernorm`` (8), plus ``model.embed_tokens`` (80),
``model.norm`` (8) and ``lm_head`` (80), written to the source shards in that order.
"""
from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from helpers import decoder_config, decoder_specs, layer_specs, make_checkpoint, manifest_from_text, split_in_two
from tensorsurgery import __version__
from tensorsurgery.errors import ManifestError, PlanError
from tensorsurgery.families.layers import LayerRef, dus, interlock
from tensorsurgery.formats.safetensors import parse_header
from tensorsurgery.io.byte_source import LocalFile
from tensorsurgery.ops import COPY, PermuteRotary
from tensorsurgery.ops.base import Input
from tensorsurgery.planning.planner import ByteRange, CopyFile, OutputTensor, SourceInfo, build_plan

SRC = Path("/models/src")
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
SUFFIXES = ("input_layernorm.weight", "mlp.up_proj.weight", "self_attn.q_proj.weight")  # natural order
SIZES = {"input_layernorm.weight": 8, "mlp.up_proj.weight": 64, "self_attn.q_proj.weight": 32,
         "model.embed_tokens.weight": 80, "model.norm.weight": 8, "lm_head.weight": 80}
SHAPES = {"input_layernorm.weight": (4,), "mlp.up_proj.weight": (8, 4), "self_attn.q_proj.weight": (4, 4),
          "model.embed_tokens.weight": (10, 4), "model.norm.weight": (4,), "lm_head.weight": (10, 4)}


def manifest(layers: str = "", output: str = "", rename: str = "", config: str = "",
             sources: str = '[source]\nmodel = "/models/src"\n'):
    return manifest_from_text(f'{sources}\n[rename]\n{rename}\n[layers]\n{layers}\n[config]\n{config}\n'
                              f'[output]\npath = "/out/x"\n{output}\n')


def checkpoint(n_layers: int = 4, root: Path = SRC, **config):
    return make_checkpoint(root, split_in_two(decoder_specs(n_layers)), decoder_config(n_layers, **config),
                           extra_files=("generation_config.json", "tokenizer.json"))


def source_range(ckpt, key: str) -> ByteRange:
    header = ckpt.headers[ckpt.weight_map[key]]
    entry = header.tensors[key]
    return ByteRange(LocalFile(ckpt.root / ckpt.weight_map[key]), header.data_start + entry.start,
                     entry.end - entry.start)


def size_of(name: str) -> int:
    """BF16 bytes of output tensor ``name`` of the synthetic decoder."""
    return SIZES[name.split(".", 3)[3]] if name.startswith("model.layers.") else SIZES[name]


def expected_names(n_out: int) -> list[str]:
    """Output tensor names in natural order for ``n_out`` layers."""
    return (["lm_head.weight", "model.embed_tokens.weight"]
            + [f"model.layers.{i}.{s}" for i in range(n_out) for s in SUFFIXES] + ["model.norm.weight"])


def expected_source_keys(arrangement) -> list[str]:
    """Source key of each output tensor, aligned with :func:`expected_names`."""
    return (["lm_head.weight", "model.embed_tokens.weight"]
            + [f"model.layers.{src}.{s}" for src in arrangement for s in SUFFIXES] + ["model.norm.weight"])


def assert_layer_mapping(plan, ckpt, arrangement):
    """Every output tensor: name, source key and byte range, in natural order."""
    assert [t.name for t in plan.tensors] == expected_names(len(arrangement))
    assert [t.source_key for t in plan.tensors] == expected_source_keys(arrangement)
    for t in plan.tensors:
        assert t.source == source_range(ckpt, t.source_key)
        assert t.nbytes == t.source.length == size_of(t.name)
        assert (t.dtype, t.source_dtype, t.transform, t.op) == ("BF16", "BF16", "none", COPY)


# --- the whole plan ----------------------------------------------------------------------------------

def test_keep_plan_whole():
    ckpt = checkpoint(2)
    m = manifest('plan = "keep"')
    plan = build_plan(m, {"source": ckpt})
    h1, h2 = ckpt.headers[SHARD1].data_start, ckpt.headers[SHARD2].data_start
    # Source shard 1: embed 0..80, L0.q 80..112, L0.up 112..176, L0.ln 176..184;
    # shard 2: L1.q 0..32, L1.up 32..96, L1.ln 96..104, norm 104..112, lm_head 112..192.
    s1, s2 = LocalFile(SRC / SHARD1), LocalFile(SRC / SHARD2)
    rows = [
        ("lm_head.weight", (10, 4), 0, 80, "lm_head.weight", ByteRange(s2, h2 + 112, 80)),
        ("model.embed_tokens.weight", (10, 4), 80, 80, "model.embed_tokens.weight", ByteRange(s1, h1 + 0, 80)),
        ("model.layers.0.input_layernorm.weight", (4,), 160, 8, "model.layers.0.input_layernorm.weight",
         ByteRange(s1, h1 + 176, 8)),
        ("model.layers.0.mlp.up_proj.weight", (8, 4), 168, 64, "model.layers.0.mlp.up_proj.weight",
         ByteRange(s1, h1 + 112, 64)),
        ("model.layers.0.self_attn.q_proj.weight", (4, 4), 232, 32, "model.layers.0.self_attn.q_proj.weight",
         ByteRange(s1, h1 + 80, 32)),
        ("model.layers.1.input_layernorm.weight", (4,), 264, 8, "model.layers.1.input_layernorm.weight",
         ByteRange(s2, h2 + 96, 8)),
        ("model.layers.1.mlp.up_proj.weight", (8, 4), 272, 64, "model.layers.1.mlp.up_proj.weight",
         ByteRange(s2, h2 + 32, 64)),
        ("model.layers.1.self_attn.q_proj.weight", (4, 4), 336, 32, "model.layers.1.self_attn.q_proj.weight",
         ByteRange(s2, h2 + 0, 32)),
        ("model.norm.weight", (4,), 368, 8, "model.norm.weight", ByteRange(s2, h2 + 104, 8)),
    ]
    assert plan.output == Path("/out/x")
    assert plan.sources == (SourceInfo("source", "/models/src", SRC, "hf", None, (SHARD1, SHARD2), inside=SRC),)
    assert plan.layers == (LayerRef("source", 0), LayerRef("source", 1))
    assert plan.seams == ()
    assert len(plan.shards) == 1
    shard = plan.shards[0]
    assert shard.filename == "model.safetensors"
    assert shard.tensors == tuple(
        OutputTensor(name=name, dtype="BF16", shape=shape, offset=offset, nbytes=n,
                     inputs=(Input("source", key, "BF16", shape, rng),), op=COPY, transform="none")
        for name, shape, offset, n, key, rng in rows)
    assert plan.index is None
    assert plan.total_size == shard.data_size == 376
    assert plan.nbytes == len(shard.header) + 376
    assert dict(plan.config) == decoder_config(2)
    assert plan.copy_files == (CopyFile(SRC / "generation_config.json", "generation_config.json", SRC),
                               CopyFile(SRC / "tokenizer.json", "tokenizer.json", SRC))
    assert plan.manifest_text == m.text


def test_shard_header_is_a_valid_safetensors_header():
    plan = build_plan(manifest('plan = "dus"\noverlap = 1', 'max_shard_size = 200'), {"source": checkpoint(4)})
    assert len(plan.shards) > 1
    for shard in plan.shards:
        (n,) = struct.unpack("<Q", shard.header[:8])
        assert n == len(shard.header) - 8 and n % 8 == 0
        assert shard.header[8:].rstrip(b" ").endswith(b"}")  # padded with spaces, nothing else
        header = parse_header(Path(shard.filename), shard.header[8:], shard.nbytes)
        assert dict(header.metadata) == {"format": "pt"}
        assert [(e.name, e.dtype, e.shape, e.start, e.end) for e in header.entries] == [
            (t.name, t.dtype, t.shape, t.offset, t.offset + t.nbytes) for t in shard.tensors]
        assert header.data_size == shard.data_size


# --- layer maps ----------------------------------------------------------------------------------------

def test_dus_plan():
    ckpt = checkpoint(12)
    plan = build_plan(manifest('plan = "dus"\noverlap = 4'), {"source": ckpt})
    arrangement = [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 8, 9, 10, 11]
    assert plan.layers == tuple(LayerRef("source", i) for i in arrangement)
    assert plan.seams == ((8, -4),)
    assert_layer_mapping(plan, ckpt, arrangement)
    assert plan.config["num_hidden_layers"] == 16


@pytest.mark.parametrize("group, arrangement, seams", [
    (1, [0, 4, 1, 5, 2, 6, 3, 7, 4, 8, 5, 9, 6, 10, 7, 11],
     tuple((p, 3 if p % 2 else -4) for p in range(1, 16))),
    (4, [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 8, 9, 10, 11], ((8, -4),)),
    (3, [0, 1, 2, 4, 5, 6, 3, 4, 5, 7, 8, 9, 6, 7, 10, 11], ((3, 1), (6, -4), (9, 1), (12, -4), (14, 2))),
])
def test_idus_plan(group, arrangement, seams):
    ckpt = checkpoint(12)
    plan = build_plan(manifest(f'plan = "idus"\noverlap = 4\ngroup = {group}'), {"source": ckpt})
    assert list(interlock(12, 4, group)) == arrangement
    assert plan.layers == tuple(LayerRef("source", i) for i in arrangement)
    assert plan.seams == seams
    assert_layer_mapping(plan, ckpt, arrangement)


def test_idus_8_on_32_layers():
    plan = build_plan(manifest('plan = "idus"\noverlap = 8\ngroup = 8'), {"source": checkpoint(32)})
    assert [r.layer for r in plan.layers] == [*range(16), *range(8, 24), *range(16, 32)]
    assert plan.seams == ((16, -8), (32, -8))
    assert plan.config["num_hidden_layers"] == 48


def test_solar_dus_on_32_layers():
    ckpt = checkpoint(32)
    plan = build_plan(manifest('plan = "dus"\noverlap = 8'), {"source": ckpt})
    assert [r.layer for r in plan.layers] == [*range(24), *range(8, 32)] == list(dus(32, 8))
    assert plan.seams == ((24, -16),)
    assert_layer_mapping(plan, ckpt, list(dus(32, 8)))


def test_explicit_plan():
    ckpt = checkpoint(12)
    plan = build_plan(manifest('plan = "explicit"\narrangement = [[0, 3], 7, [2, 4], 11, 11]'), {"source": ckpt})
    arrangement = [0, 1, 2, 7, 2, 3, 11, 11]
    assert plan.layers == tuple(LayerRef("source", i) for i in arrangement)
    assert plan.seams == ((3, 4), (4, -6), (6, 7), (7, -1))
    assert_layer_mapping(plan, ckpt, arrangement)


def test_multi_source_explicit_plan():
    a = checkpoint(4, root=Path("/models/a"))
    b = checkpoint(4, root=Path("/models/b"))
    m = manifest('plan = "explicit"\narrangement = [{ source = "a", layers = [0, 2] }, '
                 '{ source = "b", layers = [1, 4] }, { source = "a", layers = 3 }, 0]',
                 sources='[sources.a]\nmodel = "/models/a"\n[sources.b]\nmodel = "/models/b"\n')
    plan = build_plan(m, {"a": a, "b": b})
    refs = [("a", 0), ("a", 1), ("b", 1), ("b", 2), ("b", 3), ("a", 3), ("a", 0)]
    assert plan.layers == tuple(LayerRef(s, i) for s, i in refs)
    assert plan.seams == ((2, -1), (5, -1), (6, -4))
    assert [t.name for t in plan.tensors] == expected_names(7)
    by_name = {t.name: t for t in plan.tensors}
    for pos, (src, layer) in enumerate(refs):
        ckpt = {"a": a, "b": b}[src]
        for s in SUFFIXES:
            t = by_name[f"model.layers.{pos}.{s}"]
            assert (t.source_name, t.source_key) == (src, f"model.layers.{layer}.{s}")
            assert t.source == source_range(ckpt, t.source_key)
            assert t.source.file.path.parent == Path(f"/models/{src}")
    # Non-layer tensors come from the first source.
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert (by_name[name].source_name, by_name[name].source.file.path.parent) == ("a", Path("/models/a"))
    assert plan.sources == tuple(SourceInfo(n, f"/models/{n}", Path(f"/models/{n}"), "hf", None, (SHARD1, SHARD2),
                                            inside=Path(f"/models/{n}")) for n in "ab")
    assert plan.config["num_hidden_layers"] == 7
    assert plan.copy_files[0] == CopyFile(Path("/models/a/generation_config.json"), "generation_config.json",
                                         Path("/models/a"))


# --- order ----------------------------------------------------------------------------------------------

def test_natural_order_not_lexicographic():
    plan = build_plan(manifest('plan = "keep"'), {"source": checkpoint(12)})
    names = [t.name for t in plan.tensors]
    assert names == expected_names(12)
    assert names.index("model.layers.2.input_layernorm.weight") < names.index("model.layers.10.input_layernorm.weight")
    assert names != sorted(names)


def test_order_does_not_depend_on_source_order():
    specs = decoder_specs(12)
    plans = []
    for seed in range(4):
        shuffled = specs[:]
        random.Random(seed).shuffle(shuffled)
        ckpt = make_checkpoint(SRC, {"a.safetensors": shuffled[:20], "b.safetensors": shuffled[20:]},
                               decoder_config(12))
        plan = build_plan(manifest('plan = "dus"\noverlap = 4', 'max_shard_size = 300'), {"source": ckpt})
        plans.append(plan)
        assert [t.name for t in plan.tensors] == expected_names(16)
    layouts = {tuple((s.filename, tuple((t.name, t.offset, t.nbytes) for t in s.tensors), s.header)
                     for s in p.shards) for p in plans}
    assert len(layouts) == 1
    # Same inputs, same plan (frozen values compare equal).
    assert build_plan(manifest('plan = "keep"'), {"source": checkpoint(3)}) == \
        build_plan(manifest('plan = "keep"'), {"source": checkpoint(3)})


# --- shards and index -------------------------------------------------------------------------------------

def test_shard_cuts_at_max_shard_size():
    plan = build_plan(manifest('plan = "keep"', 'max_shard_size = 160'), {"source": checkpoint(2)})
    f1, f2, f3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
    assert [(s.filename, [(t.name, t.offset, t.nbytes) for t in s.tensors]) for s in plan.shards] == [
        (f1, [("lm_head.weight", 0, 80), ("model.embed_tokens.weight", 80, 80)]),
        (f2, [("model.layers.0.input_layernorm.weight", 0, 8), ("model.layers.0.mlp.up_proj.weight", 8, 64),
              ("model.layers.0.self_attn.q_proj.weight", 72, 32), ("model.layers.1.input_layernorm.weight", 104, 8)]),
        (f3, [("model.layers.1.mlp.up_proj.weight", 0, 64), ("model.layers.1.self_attn.q_proj.weight", 64, 32),
              ("model.norm.weight", 96, 8)]),
    ]
    assert [s.data_size for s in plan.shards] == [160, 112, 104]
    assert all(s.data_size <= 160 for s in plan.shards)
    assert plan.index["metadata"] == {"total_size": 376, "tensorsurgery_version": __version__}
    assert dict(plan.index["weight_map"]) == {
        "lm_head.weight": f1, "model.embed_tokens.weight": f1,
        "model.layers.0.input_layernorm.weight": f2, "model.layers.0.mlp.up_proj.weight": f2,
        "model.layers.0.self_attn.q_proj.weight": f2, "model.layers.1.input_layernorm.weight": f2,
        "model.layers.1.mlp.up_proj.weight": f3, "model.layers.1.self_attn.q_proj.weight": f3,
        "model.norm.weight": f3,
    }
    assert set(plan.index) == {"metadata", "weight_map"}
    assert plan.total_size == 376
    assert plan.nbytes == 376 + sum(len(s.header) for s in plan.shards)


def test_oversized_tensor_gets_its_own_shard():
    plan = build_plan(manifest('plan = "keep"', 'max_shard_size = 60'), {"source": checkpoint(2)})
    n = len(plan.shards)
    assert n == 7
    assert [s.filename for s in plan.shards] == [f"model-{i:05d}-of-00007.safetensors" for i in range(1, 8)]
    assert [[t.name for t in s.tensors] for s in plan.shards] == [
        ["lm_head.weight"],                          # 80 > 60: alone
        ["model.embed_tokens.weight"],               # 80 > 60: alone
        ["model.layers.0.input_layernorm.weight"],   # 8, but the next one does not fit with it
        ["model.layers.0.mlp.up_proj.weight"],       # 64 > 60: alone
        ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight"],
        ["model.layers.1.mlp.up_proj.weight"],
        ["model.layers.1.self_attn.q_proj.weight", "model.norm.weight"],
    ]
    assert all(t.offset == 0 for s in plan.shards for t in s.tensors[:1])
    assert plan.index["metadata"]["total_size"] == 376
    assert len(plan.index["weight_map"]) == 9


def test_exact_fit_stays_in_one_shard():
    plan = build_plan(manifest('plan = "keep"', 'max_shard_size = 376'), {"source": checkpoint(2)})
    assert [s.filename for s in plan.shards] == ["model.safetensors"]
    assert plan.index is None
    plan = build_plan(manifest('plan = "keep"', 'max_shard_size = 375'), {"source": checkpoint(2)})
    assert [s.filename for s in plan.shards] == ["model-00001-of-00002.safetensors",
                                                 "model-00002-of-00002.safetensors"]
    assert [len(s.tensors) for s in plan.shards] == [8, 1]


def test_many_shards_numbering():
    plan = build_plan(manifest('plan = "keep"', 'max_shard_size = 1'), {"source": checkpoint(4)})
    assert len(plan.shards) == 2 + 3 * 4 + 1 == 15
    assert plan.shards[0].filename == "model-00001-of-00015.safetensors"
    assert plan.shards[-1].filename == "model-00015-of-00015.safetensors"
    assert plan.index["weight_map"]["model.norm.weight"] == "model-00015-of-00015.safetensors"


# --- casts ---------------------------------------------------------------------------------------------------

def mixed_checkpoint():
    specs = decoder_specs(2) + [("model.rotary.inv_freq", "F32", (2,)), ("model.position_ids", "I64", (3,)),
                                ("model.mask", "U8", (5,)), ("model.scale", "BOOL", (1,))]
    return make_checkpoint(SRC, {"model.safetensors": specs}, decoder_config(2))


def test_cast_plan_to_float16():
    ckpt = mixed_checkpoint()
    plan = build_plan(manifest('plan = "keep"', 'dtype = "float16"'), {"source": ckpt})
    got = {t.name: (t.source_dtype, t.dtype, t.source.length, t.nbytes, t.transform) for t in plan.tensors}
    assert got["model.layers.1.mlp.up_proj.weight"] == ("BF16", "F16", 64, 64, "cast")
    assert got["lm_head.weight"] == ("BF16", "F16", 80, 80, "cast")
    assert got["model.rotary.inv_freq"] == ("F32", "F16", 8, 4, "cast")
    assert got["model.position_ids"] == ("I64", "I64", 24, 24, "none")
    assert got["model.mask"] == ("U8", "U8", 5, 5, "none")
    assert got["model.scale"] == ("BOOL", "BOOL", 1, 1, "none")
    assert sum(t.transform == "cast" for t in plan.tensors) == 10
    # Offsets follow the output sizes.
    offset = 0
    for t in plan.shards[0].tensors:
        assert t.offset == offset
        offset += t.nbytes
    assert plan.total_size == 376 + 4 + 24 + 5 + 1
    assert plan.config["torch_dtype"] == "float16"


def test_cast_plan_to_float32():
    plan = build_plan(manifest('plan = "keep"', 'dtype = "float32"'), {"source": mixed_checkpoint()})
    got = {t.name: (t.dtype, t.nbytes, t.transform) for t in plan.tensors}
    assert got["model.embed_tokens.weight"] == ("F32", 160, "cast")
    assert got["model.rotary.inv_freq"] == ("F32", 8, "none")
    assert got["model.position_ids"] == ("I64", 24, "none")
    assert plan.total_size == 2 * 376 + 8 + 24 + 5 + 1
    assert plan.config["torch_dtype"] == "float32"


def test_cast_to_the_same_dtype_is_no_transform():
    plan = build_plan(manifest('plan = "keep"', 'dtype = "bfloat16"'), {"source": checkpoint(2)})
    assert {t.transform for t in plan.tensors} == {"none"}
    assert {t.dtype for t in plan.tensors} == {"BF16"}


def test_cast_shards_by_output_size():
    # 376 bytes of BF16 become 752 of F32: max_shard_size counts output bytes.
    plan = build_plan(manifest('plan = "keep"', 'dtype = "float32"\nmax_shard_size = 400'), {"source": checkpoint(2)})
    assert [s.data_size for s in plan.shards] == [336, 400, 16]


# --- renaming ------------------------------------------------------------------------------------------------

def test_rename_rules_apply_and_layer_segment_is_rewritten():
    plan = build_plan(manifest('plan = "dus"\noverlap = 1',
                               rename="rules = [{ match = '\\.mlp\\.up_proj\\.', replace = '.ffn.w3.' }, "
                                      "{ match = '^lm_head', replace = 'output' }]"),
                      {"source": checkpoint(3)})
    names = [t.name for t in plan.tensors]
    assert "output.weight" in names and "lm_head.weight" not in names
    assert [n for n in names if "ffn" in n] == [f"model.layers.{i}.ffn.w3.weight" for i in range(4)]
    t = next(t for t in plan.tensors if t.name == "model.layers.2.ffn.w3.weight")
    assert t.source_key == "model.layers.1.mlp.up_proj.weight"


def test_drop_rules():
    plan = build_plan(manifest('plan = "keep"', rename="drop = ['^lm_head\\.', 'input_layernorm']"),
                      {"source": checkpoint(2)})
    assert [t.name for t in plan.tensors] == [
        "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"]
    assert plan.total_size == 376 - 80 - 16


# --- Mistral's native layout -----------------------------------------------------------------------------------

NATIVE = [("tok_embeddings.weight", "BF16", (10, 8)), ("norm.weight", "BF16", (8,)),
          ("output.weight", "BF16", (10, 8))] + [
    (f"layers.{i}.{k}", "BF16", shape) for i in range(2) for k, shape in (
        ("attention.wq.weight", (8, 8)), ("attention.wk.weight", (4, 8)), ("attention.wv.weight", (4, 8)),
        ("attention.wo.weight", (8, 8)), ("feed_forward.w1.weight", (6, 8)), ("feed_forward.w2.weight", (8, 6)),
        ("feed_forward.w3.weight", (6, 8)), ("attention_norm.weight", (8,)), ("ffn_norm.weight", (8,)))]


def native_checkpoint(specs=NATIVE, **config):
    cfg = {"model_type": "mistral", "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "hidden_size": 8, **config}
    return make_checkpoint(SRC, {"consolidated.safetensors": specs}, cfg, layout="mistral")


def _heads(t):
    return t.op.heads if isinstance(t.op, PermuteRotary) else None


def test_native_layout_is_renamed_and_permuted():
    ckpt = native_checkpoint()
    plan = build_plan(manifest('plan = "dus"\noverlap = 1', rename='preset = "mistral-to-llama"'),
                      {"source": ckpt})
    got = {t.name: (t.source_key, _heads(t), t.transform) for t in plan.tensors}
    assert list(got) == ["lm_head.weight", "model.embed_tokens.weight"] + [
        f"model.layers.{i}.{k}" for i in range(2) for k in (
            "input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "post_attention_layernorm.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
            "self_attn.q_proj.weight", "self_attn.v_proj.weight")] + ["model.norm.weight"]
    assert got["lm_head.weight"] == ("output.weight", None, "none")
    assert got["model.embed_tokens.weight"] == ("tok_embeddings.weight", None, "none")
    assert got["model.norm.weight"] == ("norm.weight", None, "none")
    assert got["model.layers.0.self_attn.q_proj.weight"] == ("layers.0.attention.wq.weight", 2, "permute")
    assert got["model.layers.1.self_attn.k_proj.weight"] == ("layers.1.attention.wk.weight", 1, "permute")
    assert got["model.layers.1.self_attn.v_proj.weight"] == ("layers.1.attention.wv.weight", None, "none")
    assert got["model.layers.1.mlp.gate_proj.weight"] == ("layers.1.feed_forward.w1.weight", None, "none")
    assert got["model.layers.0.mlp.down_proj.weight"] == ("layers.0.feed_forward.w2.weight", None, "none")
    assert got["model.layers.1.post_attention_layernorm.weight"] == ("layers.1.ffn_norm.weight", None, "none")
    assert plan.config["model_type"] == "llama" and plan.config["architectures"] == ["LlamaForCausalLM"]
    cast = build_plan(manifest('plan = "keep"', 'dtype = "float16"', rename='preset = "mistral-to-llama"'),
                      {"source": ckpt})
    assert {t.name: t.transform for t in cast.tensors}["model.layers.0.self_attn.q_proj.weight"] == "permute+cast"


def test_native_layout_unknown_key_under_preset():
    ckpt = native_checkpoint(NATIVE + [("layers.0.attention.rope.freqs", "F32", (4,))])
    with pytest.raises(ManifestError) as excinfo:
        build_plan(manifest('plan = "keep"', rename='preset = "mistral-to-llama"'), {"source": ckpt})
    assert str(excinfo.value) == ("m.toml: rename: tensor 'layers.0.attention.rope.freqs' matches no rule of the "
                                  "preset; add a [rename] rule for it or drop it")
    plan = build_plan(manifest('plan = "keep"', rename='preset = "mistral-to-llama"\ndrop = ["rope"]'),
                      {"source": ckpt})
    assert len(plan.tensors) == 3 + 2 * 9


def test_native_layout_bad_head_count():
    ckpt = native_checkpoint(num_attention_heads=3)
    with pytest.raises(PlanError) as excinfo:
        build_plan(manifest('plan = "keep"', rename='preset = "mistral-to-llama"'), {"source": ckpt})
    assert str(excinfo.value) == (f"{SRC / 'consolidated.safetensors'}: tensor 'layers.0.attention.wq.weight': "
                                  f"cannot permute for rotary: 8 rows do not split into 3 heads of an even size "
                                  f"(num_attention_heads = 3)")


def test_unknown_preset():
    with pytest.raises(ManifestError) as excinfo:
        build_plan(manifest('plan = "keep"', rename='preset = "llama-to-mistral"'), {"source": checkpoint(2)})
    assert str(excinfo.value) == ("m.toml: rename.preset: unknown preset 'llama-to-mistral'; built-in presets: "
                                  "mistral-to-llama, qwen2-to-llama, phi3-to-llama")


# --- errors ---------------------------------------------------------------------------------------------------

def test_layer_out_of_range_names_the_arrangement_position():
    with pytest.raises(PlanError) as excinfo:
        build_plan(manifest('plan = "explicit"\narrangement = [[0, 4], 2, [2, 5]]'), {"source": checkpoint(4)})
    assert str(excinfo.value) == ("m.toml: layers.arrangement[2]: layers 2..4 of source 'source', which has "
                                  "4 layers (0..3)")
    with pytest.raises(PlanError) as excinfo:
        build_plan(manifest('plan = "explicit"\narrangement = [4]'), {"source": checkpoint(4)})
    assert str(excinfo.value) == ("m.toml: layers.arrangement[0]: layers 4..4 of source 'source', which has "
                                  "4 layers (0..3)")


def test_layer_out_of_range_in_a_second_source():
    m = manifest('plan = "explicit"\narrangement = [[0, 2], { source = "b", layers = [1, 4] }]',
                 sources='[sources.a]\nmodel = "/a"\n[sources.b]\nmodel = "/b"\n')
    with pytest.raises(PlanError) as excinfo:
        build_plan(m, {"a": checkpoint(4), "b": checkpoint(3, root=Path("/b"))})
    assert str(excinfo.value) == "m.toml: layers.arrangement[1]: layers 1..3 of source 'b', which has 3 layers (0..2)"


@pytest.mark.parametrize("layers", ['plan = "dus"\noverlap = 4', 'plan = "dus"\noverlap = 5',
                                    'plan = "idus"\noverlap = 4\ngroup = 1'])
def test_overlap_not_smaller_than_layer_count(layers):
    with pytest.raises(PlanError) as excinfo:
        build_plan(manifest(layers), {"source": checkpoint(4)})
    overlap = layers.split("overlap = ")[1].split("\n")[0]
    assert str(excinfo.value) == f"m.toml: layers.overlap: {overlap} must be smaller than the source's 4 layers"


def test_two_tensors_renamed_to_one_name():
    with pytest.raises(PlanError) as excinfo:
        build_plan(manifest('plan = "keep"', rename="rules = [{ match = '^lm_head', replace = 'model.embed_tokens' }]"),
                   {"source": checkpoint(2)})
    assert str(excinfo.value) == ("m.toml: rename: 'model.embed_tokens.weight' and 'lm_head.weight' both become "
                                  "'model.embed_tokens.weight'; fix the rename rules or drop one")


def test_two_layer_tensors_renamed_to_one_name():
    with pytest.raises(PlanError) as excinfo:
        rules = "rules = [{ match = 'mlp\\.up_proj', replace = 'self_attn.q_proj' }]"
        build_plan(manifest('plan = "keep"', rename=rules),
                   {"source": checkpoint(2)})
    assert str(excinfo.value) == ("m.toml: rename: 'model.layers.0.self_attn.q_proj.weight' and "
                                  "'model.layers.0.mlp.up_proj.weight' both become "
                                  "'model.layers.0.self_attn.q_proj.weight'; fix the rename rules or drop one")


def test_rename_that_loses_the_layer_segment():
    with pytest.raises(PlanError) as excinfo:
        build_plan(manifest('plan = "keep"', rename="rules = [{ match = 'model\\.layers\\.(\\d+)\\.mlp', "
                                                    "replace = 'mlp_\\1' }]"),
                   {"source": checkpoint(2)})
    assert str(excinfo.value) == ("m.toml: rename: layer tensor 'model.layers.0.mlp.up_proj.weight' became "
                                  "'mlp_0.up_proj.weight', which has no layer index; keep it in the rename rules")


def test_sources_whose_layer_shapes_differ():
    b_specs = [(n, d, (8, 6) if n.endswith("up_proj.weight") else s) for n, d, s in decoder_specs(4)]
    b = make_checkpoint("/b", {"model.safetensors": b_specs}, decoder_config(4))
    m = manifest('plan = "explicit"\narrangement = [[0, 2], { source = "b", layers = [2, 4] }]',
                 sources='[sources.a]\nmodel = "/a"\n[sources.b]\nmodel = "/b"\n')
    with pytest.raises(PlanError) as excinfo:
        build_plan(m, {"a": checkpoint(4), "b": b})
    assert str(excinfo.value) == ("m.toml: layers: output layer 2 (source 'b') cannot stack on output layer 0: "
                                  "'model.layers.0.mlp.up_proj.weight' has shape (8, 6) vs (8, 4); "
                                  "use sources of the same architecture")


def test_source_whose_layers_lack_a_tensor():
    b_specs = [s for s in decoder_specs(4) if s[0] != "model.layers.3.input_layernorm.weight"]
    b = make_checkpoint("/b", {"model.safetensors": b_specs}, decoder_config(4))
    m = manifest('plan = "explicit"\narrangement = [[0, 2], { source = "b", layers = [2, 4] }]',
                 sources='[sources.a]\nmodel = "/a"\n[sources.b]\nmodel = "/b"\n')
    with pytest.raises(PlanError) as excinfo:
        build_plan(m, {"a": checkpoint(4), "b": b})
    assert str(excinfo.value) == ("m.toml: layers: output layer 3 (source 'b') cannot stack on output layer 0: "
                                  "'model.layers.0.input_layernorm.weight' has shape none vs (4,); "
                                  "use sources of the same architecture")


def test_base_config_without_layer_count():
    ckpt = make_checkpoint(SRC, {"model.safetensors": decoder_specs(2)}, {"model_type": "mistral"})
    with pytest.raises(PlanError) as excinfo:
        build_plan(manifest('plan = "keep"'), {"source": ckpt})
    assert str(excinfo.value) == ("config.json of the base source has no num_hidden_layers; the layer count "
                                  "cannot be rewritten (add it to the source's config.json)")


def test_base_config_counting_layers_in_a_sub_config_is_not_told_to_add_a_count():
    # Followed, that advice wrote a wrong model (Qwen3-VL): the top-level count followed the
    # arrangement, text_config's did not.
    config = {"model_type": "qwen3_vl", "text_config": {"num_hidden_layers": 2}, "vision_config": {}}
    ckpt = make_checkpoint(SRC, {"model.safetensors": decoder_specs(2)}, config)
    with pytest.raises(PlanError) as excinfo:
        build_plan(manifest('plan = "keep"'), {"source": ckpt})
    assert str(excinfo.value) == ("config.json of the base source has no num_hidden_layers; the layers are counted "
                                  "in text_config.num_hidden_layers, which tensorsurgery does not rewrite for this "
                                  "family (model_type 'qwen3_vl'): it cannot plan this model")


def test_keep_of_a_model_whose_layers_are_not_layers_n():
    # GPT-J names its blocks transformer.h.N and counts them as n_layer: no layer is found, so keep
    # copies every tensor in place and the config's own count stays true; anything else is refused.
    specs = [(f"transformer.h.{i}.attn.weight", "BF16", (4, 4)) for i in range(2)]
    specs.append(("lm_head.weight", "BF16", (10, 4)))
    ckpt = make_checkpoint(SRC, {"model.safetensors": specs}, {"model_type": "gptj", "n_layer": 2})
    plan = build_plan(manifest('plan = "keep"', output='dtype = "float16"'), {"source": ckpt})
    assert sorted(t.name for shard in plan.shards for t in shard.tensors) == sorted(s[0] for s in specs)
    assert plan.config["n_layer"] == 2 and "num_hidden_layers" not in plan.config
    with pytest.raises(PlanError, match="has 0 layers"):
        build_plan(manifest('plan = "explicit"\narrangement = [[0, 2]]'), {"source": ckpt})


def test_layer_specs_helper_matches_sizes():
    # Guard for the literal sizes used above.
    assert [(n, s) for n, _, s in layer_specs(0)] == [
        ("model.layers.0.self_attn.q_proj.weight", (4, 4)), ("model.layers.0.mlp.up_proj.weight", (8, 4)),
        ("model.layers.0.input_layernorm.weight", (4,))]
    assert sum(SIZES[s] for s in SUFFIXES) == 104


def test_a_layer_without_tensors_is_a_plan_error_not_a_crash():
    """assemble refuses a checkpoint with a gap in its layers (test_hostile); a Checkpoint made by
    hand still gets a PlanError, not a KeyError."""
    specs = [("model.embed_tokens.weight", "F32", (8, 4))] + [(f"model.layers.{i}.mlp.w", "F32", (4, 4))
                                                             for i in (0, 1, 3)]
    ckpt = make_checkpoint(Path("/src"), {"model.safetensors": specs}, {"model_type": "llama", "num_hidden_layers": 4})
    for layers in ('plan = "keep"', 'plan = "dus"\noverlap = 1'):
        m = manifest_from_text(f'[source]\nmodel = "/src"\n[layers]\n{layers}\n[output]\npath = "/out/x"\n')
        with pytest.raises(PlanError, match="output layer 2 .layer 2 of source 'source'. has no tensors"):
            build_plan(m, {"source": ckpt})

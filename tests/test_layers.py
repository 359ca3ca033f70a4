"""Tests for tensorsurgery.families.layers: arrangements as literal lists, the ``layers.N`` segment, seams."""
from __future__ import annotations

import pytest

from tensorsurgery.families.layers import GENERIC_LAYERS, LayerRef, dus, interlock, keep, seams

# --- arrangements -------------------------------------------------------------------------------

SOLAR_DUS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
             8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31)
IDUS_1 = (0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15, 8, 16, 9, 17, 10, 18, 11, 19,
          12, 20, 13, 21, 14, 22, 15, 23, 16, 24, 17, 25, 18, 26, 19, 27, 20, 28, 21, 29, 22, 30, 23, 31)
IDUS_8 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
          8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
          16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31)


def test_keep():
    assert keep(32) == tuple(range(32))
    assert keep(1) == (0,)
    assert keep(0) == ()


def test_solar_dus():
    assert dus(32, 8) == SOLAR_DUS
    assert len(SOLAR_DUS) == 48


def test_dus_is_interlock_with_group_n_minus_m():
    assert interlock(32, 8, 24) == SOLAR_DUS
    # A group larger than a copy is the same as one group per copy.
    assert interlock(32, 8, 100) == SOLAR_DUS


def test_idus_1layer():
    assert interlock(32, 8, 1) == IDUS_1


def test_idus_8layer():
    assert interlock(32, 8, 8) == IDUS_8


def test_small_cases():
    assert dus(4, 1) == (0, 1, 2, 1, 2, 3)
    assert dus(4, 0) == (0, 1, 2, 3, 0, 1, 2, 3)
    assert interlock(4, 2, 1) == (0, 2, 1, 3)
    assert interlock(8, 2, 2) == (0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7)


@pytest.mark.parametrize("n, m, g, expected", [
    # copies of 7 layers in groups of 3: A = 0..6, B = 3..9 -> groups 3, 3, 1
    (10, 3, 3, (0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 6, 9)),
    # copies of 5 in groups of 2: 2, 2, 1
    (6, 1, 2, (0, 1, 1, 2, 2, 3, 3, 4, 4, 5)),
    # groups of 4 over copies of 6: 4, 2
    (8, 2, 4, (0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7)),
])
def test_uneven_groups(n, m, g, expected):
    assert interlock(n, m, g) == expected
    assert len(expected) == 2 * (n - m)


# --- the layers.N segment -----------------------------------------------------------------------

@pytest.mark.parametrize("name, index", [
    ("model.layers.0.mlp.up_proj.weight", 0),
    ("model.layers.11.self_attn.q_proj.weight", 11),
    ("layers.3.attention.wq.weight", 3),
    ("model.layers.7", 7),
    ("layers.12", 12),
    ("model.layers.3.mlp.experts.1.w1.weight", 3),
    ("model.layers.3.block.layers.9.weight", 3),
    ("model.embed_tokens.weight", None),
    ("lm_head.weight", None),
    ("model.xlayers.3.weight", None),
    ("xlayers.3.weight", None),
    ("model.layers_3.weight", None),
    ("model.layers.3x.weight", None),
    ("model.layers.weight", None),
    ("model.norm_layers.4.weight", None),
])
def test_layer_index(name, index):
    assert GENERIC_LAYERS.index(name) == index


@pytest.mark.parametrize("name, index, expected", [
    ("model.layers.1.mlp.up_proj.weight", 5, "model.layers.5.mlp.up_proj.weight"),
    # layers.1 must not match inside layers.11 (substring replace of "layers.1" would give "layers.51")
    ("model.layers.11.mlp.up_proj.weight", 5, "model.layers.5.mlp.up_proj.weight"),
    ("model.layers.11.mlp.up_proj.weight", 1, "model.layers.1.mlp.up_proj.weight"),
    ("model.layers.1.mlp.up_proj.weight", 11, "model.layers.11.mlp.up_proj.weight"),
    # a '.1.' replace would also hit the expert index
    ("model.layers.1.mlp.experts.1.w1.weight", 40, "model.layers.40.mlp.experts.1.w1.weight"),
    ("model.layers.3.mlp.experts.3.w1.weight", 0, "model.layers.0.mlp.experts.3.w1.weight"),
    ("model.layers.2.mlp.layers.2.weight", 7, "model.layers.7.mlp.layers.2.weight"),
    ("layers.0.attention.wq.weight", 47, "layers.47.attention.wq.weight"),
    ("model.layers.0", 12, "model.layers.12"),
    # xlayers.3 is not a layers segment; the real one later in the name is
    ("xlayers.3.model.layers.4.w", 9, "xlayers.3.model.layers.9.w"),
    ("model.xlayers.1.layers.1.w", 2, "model.xlayers.1.layers.2.w"),
])
def test_with_layer_index(name, index, expected):
    assert GENERIC_LAYERS.with_index(name, index) == expected
    assert GENERIC_LAYERS.index(expected) == index


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "xlayers.3.weight", "model.layers_3.w"])
def test_with_layer_index_needs_a_segment(name):
    with pytest.raises(ValueError) as excinfo:
        GENERIC_LAYERS.with_index(name, 1)
    assert str(excinfo.value) == f"{name!r} has no decoder layer index"


# --- seams ----------------------------------------------------------------------------------------

def _refs(layers, source="source"):
    return tuple(LayerRef(source, i) for i in layers)


def test_no_seams():
    assert seams(_refs(range(32))) == ()
    assert seams(()) == ()
    assert seams(_refs([5])) == ()


def test_solar_dus_seam():
    assert seams(_refs(SOLAR_DUS)) == ((24, -16),)


def test_idus_8_seams():
    assert seams(_refs(IDUS_8)) == ((16, -8), (32, -8))


def test_idus_1_seams():
    # 0 -> 8 jumps +7, 8 -> 1 jumps -8, and so on: a seam between every pair of layers.
    expected = tuple((pos, 7 if pos % 2 else -8) for pos in range(1, 48))
    assert seams(_refs(IDUS_1)) == expected


def test_forward_jump_and_repeat():
    assert seams(_refs([0, 1, 5, 5, 6])) == ((2, 3), (3, -1))


def test_source_change_is_a_seam_even_when_the_index_continues():
    arrangement = (LayerRef("a", 0), LayerRef("a", 1), LayerRef("b", 2), LayerRef("b", 3), LayerRef("a", 0))
    assert seams(arrangement) == ((2, 0), (4, -4))


# --- family layer places ------------------------------------------------------------------------------

def test_a_scheme_with_several_prefixes_finds_each_and_nothing_else():
    from tensorsurgery.families.layers import LayerScheme
    scheme = LayerScheme(("language_model.model.layers", "model.language_model.layers"))
    assert scheme.index("language_model.model.layers.12.mlp.up_proj.weight") == 12
    assert scheme.index("model.language_model.layers.3.self_attn.q_proj.weight") == 3
    # A vision tower's own layers, and the decoder's name as a substring, are not decoder layers.
    assert scheme.index("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") is None
    assert scheme.index("x.language_model.model.layers.1.w") is None
    assert scheme.with_index("language_model.model.layers.12.mlp.experts.1.w", 40) == \
        "language_model.model.layers.40.mlp.experts.1.w"
    assert scheme.suffix("model.language_model.layers.3.self_attn.q_proj.weight") == "self_attn.q_proj.weight"
    gpt2 = LayerScheme(("transformer.h", "h"))
    assert (gpt2.index("transformer.h.7.attn.c_attn.weight"), gpt2.index("h.2.mlp.c_fc.bias")) == (7, 2)
    assert gpt2.index("transformer.wte.weight") is None

"""tensorsurgery.families.kind_fields, pure: each rule's encode against a brute-force search over every
value of its config keys, for every assignment of kinds to up to 9 layers (7 for the three-key
span), and what the index lists and pattern strings write."""
from __future__ import annotations

import itertools

import pytest

from tensorsurgery.families.kind_fields import KindIndices, PatternString, PeriodOffset, SpanInterval, Unexpressible
from tensorsurgery.families.layers import LayerRef

JAMBA = PeriodOffset("attn_layer_period", "attn_layer_offset", "attention", "mamba", 8, 4)
ERNIE = SpanInterval("moe_layer_interval", "moe_layer_start_index", "moe_layer_end_index", "MoE", "dense", (1, -1, 1))
REFS = [LayerRef("source", i) for i in range(9)]


def _all_kinds(max_n: int = 9):
    for n in range(1, max_n + 1):
        yield from (list(k) for k in itertools.product([False, True], repeat=n))


@pytest.mark.parametrize("text", [{}, {"attn_layer_period": 2, "attn_layer_offset": 1}])
def test_period_offset_says_every_arrangement_some_period_and_offset_can(text):
    for kinds in _all_kinds():
        n = len(kinds)
        possible = [(p, o) for p in range(1, n + 2) for o in range(p)
                    if [i % p == o for i in range(n)] == kinds]
        try:
            out = {**text, **JAMBA.encode(text, kinds, REFS[:n])}
        except Unexpressible:
            assert not possible, kinds
            continue
        assert possible and JAMBA.decode(out, n) == kinds, kinds
        assert out.get("attn_layer_offset", 4) < out.get("attn_layer_period", 8)  # transformers' validator


@pytest.mark.parametrize("text", [{}, {"moe_layer_start_index": 2, "moe_layer_end_index": 5, "moe_layer_interval": 2}])
def test_span_interval_says_every_arrangement_some_start_end_and_interval_can(text):
    for kinds in _all_kinds(7):
        n = len(kinds)
        possible = [(s, e, v) for s in range(n + 1) for e in range(-1, n + 1) for v in range(1, n + 2)
                    if ERNIE.decode({"moe_layer_start_index": s, "moe_layer_end_index": e, "moe_layer_interval": v},
                                    n) == kinds]
        try:
            out = {**text, **ERNIE.encode(text, kinds, REFS[:n])}
        except Unexpressible:
            assert not possible, kinds
            continue
        assert possible and ERNIE.decode(out, n) == kinds, kinds


def test_kept_values_are_not_rewritten():
    assert JAMBA.encode({}, [i % 8 == 4 for i in range(16)], REFS) == {}
    assert ERNIE.encode({}, [i >= 1 for i in range(9)], REFS) == {}
    assert PatternString("p", repeats=True).encode({"p": "LLLG"}, list("LLLGLLLG"), REFS) == {}


def test_pattern_strings():
    nemotron = PatternString("hybrid_override_pattern")
    assert nemotron.decode({"hybrid_override_pattern": "M-M*"}, 4) == ["M", "-", "M", "*"]
    assert nemotron.decode({"hybrid_override_pattern": "M-M*"}, 5) is None  # one letter per layer, or nothing
    assert nemotron.encode({"hybrid_override_pattern": "M-M*"}, list("M-MM-M*"), REFS) == {
        "hybrid_override_pattern": "M-MM-M*"}
    exaone = PatternString("sliding_window_pattern", repeats=True)
    assert exaone.decode({"sliding_window_pattern": "LLLG"}, 6) == list("LLLGLL")
    assert exaone.encode({"sliding_window_pattern": "LLLG"}, list("LLLLGL"), REFS) == {
        "sliding_window_pattern": "LLLLGL"}


def test_index_lists_in_order():
    zamba = KindIndices("hybrid_layer_ids", "hybrid", of=("layers_block_type", "hybrid"), in_order=True, why="why")
    text = {"layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"], "hybrid_layer_ids": [1, 3]}
    kinds = zamba.decode(text, 4)
    arrangement = [LayerRef("source", i) for i in (0, 0, 1, 2, 2, 3)]
    assert zamba.encode(text, [kinds[r.layer] for r in arrangement], arrangement) == {"hybrid_layer_ids": [2, 5]}
    swapped = [LayerRef("source", i) for i in (3, 1)]
    with pytest.raises(Unexpressible) as e:
        zamba.encode(text, [True, True], swapped)
    assert (e.value.layer, e.value.why) == (
        1, "it follows hybrid layer 3 of source 'source', which comes after it (why)")
    bamba = KindIndices("attn_layer_indices", "attention")
    assert bamba.decode({"attn_layer_indices": None}, 3) == [False] * 3
    assert bamba.encode({"attn_layer_indices": None}, [True, False, False], REFS) == {}  # null stays null

"""Merges (issue 19): mergekit's ``sce``, through both front doors, bitwise equal to mergekit 0.1.5
run with one torch thread and its ``torch.topk`` made stable (the lowest index first among equal
variances); the kernel on tensors of many statistics blocks against mergekit's own function."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from merge_checks import (
    CODES,
    equals_mergekit,
    family_fixture,
    file_inputs,
    flipped_byte_found,
    prepared_op,
    same_bytes_on_threads,
)
from test_merges import (
    FINE_TUNES,
    _raw,
    _yaml,
    mergekit,
)

from cli_helpers import error_line, run

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")

@contextmanager
def stable_topk():
    """torch.topk made stable (the lowest index first among equal values) and torch on one
    thread while mergekit runs: its sums and sorts are then deterministic."""
    topk, threads = torch.topk, torch.get_num_threads()

    def stable(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True, **_: Any):
        order = torch.argsort(x, dim=dim, descending=largest, stable=True).narrow(dim, 0, k)
        return torch.gather(x, dim, order), order

    torch.topk = stable
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.topk = topk
        torch.set_num_threads(threads)


def _sce_reference(tensors: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.sce import sce_merge

    with stable_topk():
        return sce_merge.merge_group(TensorGroup.from_tensors(tensors, base_index=0), select_topk=select_topk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sce_kernel_on_tensors_of_many_blocks(tmp_path, dtype):
    """Both passes on tensors longer than a statistics block, whose variances tie massively
    (differences on a coarse grid, the k-th largest variance shared by elements in several
    blocks), with zero differences, four models (torch sums the last columns in another order)
    and selections of none, some and all: bitwise mergekit's ``sce_merge`` in every element range."""
    from tensorsurgery.ops import Sce
    from tensorsurgery.ops.blocks import STAT_BLOCK

    n = STAT_BLOCK * 3 + 123
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(n, generator=gen).to(dtype)
    xs = [base + (torch.randint(-6, 7, (n,), generator=gen) / 64).to(dtype) for _ in range(4)]
    xs[1][::97] = base[::97]
    xs[2][::5] = base[::5]
    path, inputs = file_inputs(tmp_path, [base, *xs])
    raws = [_raw(x) for x in (base, *xs)]
    k = base.element_size()
    cuts = []
    for topk in (0.0, 0.013, 0.37, 1.0):
        expected = _raw(_sce_reference([base, *xs], topk).to(dtype))
        t = prepared_op(Sce(topk, CODES[dtype]), path, inputs)
        if t.op.keep is not None:
            cuts.append(t.op.keep.cut)
        for start, stop in ((0, n), (STAT_BLOCK - 5, STAT_BLOCK * 2 + 7), (n - 3, n)):
            ours = t.op.apply([r[start * k:stop * k] for r in raws], inputs, start)
            assert (ours != expected[start * k:stop * k]).sum() == 0, (topk, start, stop)
    assert any(0 < c < n for c in cuts)  # a cut falls inside a tie group


def test_sce_weights_fall_back_to_equal_when_the_vectors_vanish(tmp_path):
    """Task vectors whose squares' means sum below 1e-6 (tiny differences; or none kept, at
    select_topk 0) take mergekit's equal weights; larger ones their own: bitwise mergekit's."""
    from tensorsurgery.ops import Sce

    gen = torch.Generator().manual_seed(3)
    base = torch.randn(5000, generator=gen).to(torch.bfloat16)
    for noise, equal in ((1e-4, True), (3e-2, False)):
        xs = [(base.float() + torch.randn(5000, generator=gen) * noise).to(torch.bfloat16) for _ in range(3)]
        path, inputs = file_inputs(tmp_path, [base, *xs])
        for topk in (1.0, 0.0, 0.5):
            t = prepared_op(Sce(topk, "BF16"), path, inputs)
            ours = t.op.apply([_raw(x) for x in (base, *xs)], inputs, 0)
            assert (ours != _raw(_sce_reference([base, *xs], topk))).sum() == 0, (noise, topk)
            assert (t.op.weights == (0.333984375,) * 3) == (equal or topk == 0), (noise, topk, t.op.weights)


def _sce_models(paths: dict[str, Path]) -> list[dict[str, Any]]:
    return [{"model": str(paths[n])} for n in FINE_TUNES]


#: sce's cases: bitwise mergekit's with its topk made stable, on one thread.
SCE_CASES = {
    "sce": lambda p: {"merge_method": "sce", "base_model": str(p["base"]), "models": _sce_models(p),
                      "parameters": {"select_topk": 0.3}, "dtype": "bfloat16"},
    "sce-all-int8-weights-ignored": lambda p: {
        "merge_method": "sce", "base_model": str(p["base"]), "parameters": {"int8_mask": True},
        "models": [{"model": str(p[n]), "parameters": {"weight": 0.5}} for n in FINE_TUNES[:2]]},
    "sce-f16-to-bf16": lambda p: {"merge_method": "sce", "base_model": str(p["base"]), "models": _sce_models(p),
                                  "parameters": {"select_topk": 0.05}, "dtype": "float16", "out_dtype": "bfloat16"},
    "sce-f32-filters": lambda p: {
        "merge_method": "sce", "base_model": str(p["base"]), "models": _sce_models(p), "dtype": "float32",
        "parameters": {"select_topk": [{"filter": "mlp", "value": 0.6}, {"value": 0.1}]}},
}


models = family_fixture()


@pytest.mark.parametrize("door", ["yaml", "toml"])
@pytest.mark.parametrize("case", sorted(SCE_CASES))
def test_sce_equals_mergekit_with_a_stable_topk(capsys, tmp_path, models, case, door):
    config = SCE_CASES[case](models)
    with stable_topk():
        theirs = mergekit(config, tmp_path / "mergekit")
    equals_mergekit(capsys, tmp_path, config, door, theirs, case)


def test_sce_is_reproducible_and_verified(capsys, tmp_path, models):
    """The same bytes on 1 and 3 threads; verify (which recomputes the statistics) catches one
    changed byte in both modes."""
    manifest = _yaml(tmp_path, SCE_CASES["sce"](models))
    t3 = same_bytes_on_threads(capsys, tmp_path, manifest)
    flipped_byte_found(capsys, manifest, t3, "sce")


def test_sce_refusals(capsys, tmp_path, models):
    out = tmp_path / "out"
    for config, expected in (
        ({"merge_method": "sce", "models": _sce_models(models)}, "base_model: missing; sce adds"),
        ({"merge_method": "sce", "base_model": str(models["base"]),
          "models": [{"model": str(models["ft0"]), "parameters": {"select_topk": 0.5}}]},
         "select_topk: is set once for the merge, not per model"),
    ):
        message = error_line(*run(capsys, "apply", _yaml(tmp_path, config), "--output", out))
        assert expected in message, message
        assert not out.exists()

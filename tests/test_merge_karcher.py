"""Merges (issue 19): mergekit's ``karcher``, through both front doors, bitwise equal to mergekit
0.1.5 run with one torch thread in bfloat16 and float16 (whose dots torch makes in its own
kernel, re-made here); in float32 bitwise where mergekit's iteration takes no step, and otherwise
by the rule its MKL dot products leave (test_karcher_f32_rule); the kernel on tensors of many
statistics blocks against mergekit's own function, every step taken."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from merge_checks import (
    CODES,
    equals_mergekit,
    family_fixture,
    file_inputs,
    prepared_op,
    single_thread_mergekit,
    threads_and_verify,
)
from test_merges import (
    FINE_TUNES,
    _raw,
    _ulps,
    _yaml,
    read_all,
)

from cli_helpers import error_line, run

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")


def _reference(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """mergekit's ``karcher_merge_tensors`` on one torch thread."""
    from mergekit.merge_methods.karcher import karcher_merge_tensors

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return karcher_merge_tensors(tensors, [1 / len(tensors)] * len(tensors), max_iter=max_iter, tol=tol)
    finally:
        torch.set_num_threads(threads)


def _ours(tmp_path: Path, tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> tuple[Any, Any]:
    """Our prepared mean of ``tensors`` (read from a file) and its bytes made in three ranges
    that cut the statistics blocks."""
    import numpy as np

    from tensorsurgery.ops import Karcher
    from tensorsurgery.ops.blocks import STAT_BLOCK

    path, inputs = file_inputs(tmp_path, tensors)
    t = prepared_op(Karcher(max_iter, tol, CODES[tensors[0].dtype]), path, inputs)
    raws, k, n = [_raw(x) for x in tensors], tensors[0].element_size(), tensors[0].numel()
    cuts = sorted({0, min(n, STAT_BLOCK - 5), min(n, 2 * STAT_BLOCK + 7), n})
    parts = [t.op.apply([r[a * k:b * k] for r in raws], inputs, a) for a, b in zip(cuts, cuts[1:]) if b > a]
    return t.op, np.concatenate(parts)


def _differing(expected: torch.Tensor, ours: Any) -> int:
    k = expected.element_size()
    return int((_raw(expected).reshape(-1, k) != ours.reshape(-1, k)).any(1).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dots_and_norms_are_torch_s(dtype):
    """torch.dot of 16-bit vectors and linalg.vector_norm of float32 ones, on one thread, of 47
    lengths (the tails of every size, and vectors longer than a statistics block fed in blocks
    of 4,096): bitwise ours."""
    import numpy as np

    from tensorsurgery.ops.torch_norms import HalfDot, VectorNorm

    gen = torch.Generator().manual_seed(6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in [*range(1, 300, 7), 4096, 5000, 65536 + 17, 300001]:
            x, y = (torch.randn(n, generator=gen).to(dtype) for _ in range(2))
            dot, norm = HalfDot(n), VectorNorm(n)
            fx, fy = x.float().numpy(), y.float().numpy()
            for a in range(0, n, 4096):
                dot.add(fx[a:a + 4096], fy[a:a + 4096])
                norm.add(fx[a:a + 4096])
            assert torch.dot(x, y).float().item() == float(torch.tensor(dot.value()).to(dtype)), n
            assert torch.linalg.vector_norm(x.float()).item() == float(np.float32(norm.value())), n
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_karcher_kernel_on_tensors_of_many_blocks(tmp_path, dtype):
    """Models far apart (every step of the iteration taken: 10 steps, 32 passes), close ones
    (bfloat16 rounds every angle to 0: no step), two, four, a zero model among them, a tensor
    below every tolerance, a length torch's dot and norm end in tails: bitwise mergekit's."""
    from tensorsurgery.ops.blocks import STAT_BLOCK

    gen = torch.Generator().manual_seed(4)
    n = 2 * STAT_BLOCK + 77
    base = torch.randn(n, generator=gen)
    far = [torch.randn(n, generator=gen).to(dtype) for _ in range(4)]
    close = [(base + 0.01 * torch.randn(n, generator=gen)).to(dtype) for _ in range(3)]
    cases = [("far", far[:3], 10, 1e-5), ("two-steps", far[:2], 3, 1e-5), ("four", far, 10, 1e-3),
             ("close", close, 10, 1e-5), ("a-zero-model", [far[0], torch.zeros(n, dtype=dtype), far[1]], 10, 1e-5),
             ("below-tol", [x * 1e-9 for x in far[:2]], 10, 1e-5), ("short", [x[:45] for x in far[:3]], 10, 1e-5)]
    steps = {}
    for name, xs, max_iter, tol in cases:
        mix, ours = _ours(tmp_path, xs, max_iter, tol)
        assert _differing(_reference(xs, max_iter, tol).to(dtype), ours) == 0, name
        steps[name] = len(mix.steps)
    assert steps["far"] == 10 and steps["two-steps"] == 3 and steps["short"] > 0
    assert dtype != torch.bfloat16 or steps["close"] == 0


def test_karcher_f32_rule(tmp_path):
    """float32: torch's dot is MKL's ``sdot`` (its own summation order, which we do not re-make;
    ours is exactly rounded). Where mergekit's iteration takes no step (close models: the first
    tangent's norm is below tol) the dots do not reach a byte: bitwise. Where it steps, the
    tangent is rounding noise (zero in exact arithmetic) whose direction follows the dots' last
    bits: measured 99,556 of 131,149 elements differ, by at most 2.3e-7 of the largest magnitude
    (many float32 units on the small elements)."""
    gen = torch.Generator().manual_seed(5)
    n = 131149
    base = torch.randn(n, generator=gen)
    close = [base + 0.02 * torch.randn(n, generator=gen) for _ in range(3)]
    mix, ours = _ours(tmp_path, close)
    assert len(mix.steps) == 0 and _differing(_reference(close), ours) == 0
    far = [torch.randn(n, generator=gen) for _ in range(3)]
    mix, ours = _ours(tmp_path, far)
    theirs = _reference(far)
    mine = torch.from_numpy(ours.copy()).view(torch.float32)
    assert len(mix.steps) >= 1 and 0 < _differing(theirs, ours) < n
    assert float((theirs - mine).abs().max()) <= 2 ** -20 * float(theirs.abs().max())
    assert int(_ulps(theirs[theirs.abs() > 1e-3], mine[theirs.abs() > 1e-3]).max()) > 1  # the rule is needed


def _models(paths: dict[str, Path], names: tuple[str, ...] = FINE_TUNES) -> list[dict[str, Any]]:
    return [{"model": str(paths[n])} for n in names]


#: karcher's cases: bitwise mergekit's on one thread (the fine-tunes' weight matrices are far
#: apart: every step is taken; their norms' weights close: none).
KARCHER_CASES = {
    "karcher": lambda p: {"merge_method": "karcher", "models": _models(p), "dtype": "bfloat16"},
    "karcher-f16-steps-tol-base-among-models": lambda p: {
        "merge_method": "karcher", "base_model": str(p["base"]), "models": _models(p, ("base", "ft0", "ft1")),
        "dtype": "float16", "parameters": {"max_iter": 3, "tol": 1e-4}, "out_dtype": "bfloat16"},
    "karcher-filters": lambda p: {
        "merge_method": "karcher", "models": _models(p, FINE_TUNES[:2]),
        "parameters": {"max_iter": [{"filter": "mlp", "value": 1}, {"value": 6}]}},
}


models = family_fixture()


@pytest.mark.parametrize("door", ["yaml", "toml"])
@pytest.mark.parametrize("case", sorted(KARCHER_CASES))
def test_karcher_equals_mergekit(capsys, tmp_path, models, case, door):
    config = KARCHER_CASES[case](models)
    theirs = single_thread_mergekit(config, tmp_path / "mergekit")
    equals_mergekit(capsys, tmp_path, config, door, theirs, case)


def test_karcher_f32_merge_follows_the_rule(capsys, tmp_path, models):
    """dtype float32: the norms' tensors (close: no step) bitwise mergekit's; the others by
    test_karcher_f32_rule's bound (measured: 28 of 39 tensors, 35,226 of 83,376 elements differ,
    by at most 1.8e-7 of a tensor's largest magnitude)."""
    config = {**KARCHER_CASES["karcher"](models), "dtype": "float32"}
    theirs = read_all(single_thread_mergekit(config, tmp_path / "mergekit"))
    assert run(capsys, "apply", _yaml(tmp_path, config), "--output", tmp_path / "ours", "--no-progress")[0] == 0
    ours = read_all(tmp_path / "ours")
    assert theirs.keys() == ours.keys()
    for key in sorted(theirs):
        a, b = theirs[key], ours[key]
        if "norm" in key:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key
        assert float((a - b).abs().max()) <= 2 ** -20 * float(a.abs().max()), key


def test_karcher_is_reproducible_and_verified(capsys, tmp_path, models):
    """The same bytes on 1 and 3 threads; verify (which re-makes every pass) catches one changed
    byte in both modes."""
    threads_and_verify(capsys, tmp_path, KARCHER_CASES["karcher"](models), "karcher")


def test_karcher_refusals(capsys, tmp_path, models):
    out = tmp_path / "out"
    for config, expected in (
        ({"merge_method": "karcher", "models": _models(models), "parameters": {"max_iter": 2.5}},
         "karcher: max_iter is the number of steps (a whole number, 0 or more), found 2.5"),
        ({"merge_method": "karcher", "models": [{"model": str(models["ft0"]), "parameters": {"tol": 0.1}}]},
         "tol: is set once for the merge, not per model"),
        ({"merge_method": "karcher", "base_model": str(models["base"]), "models": _models(models)},
         "is not among the models; karcher takes no base of its own"),
    ):
        message = error_line(*run(capsys, "apply", _yaml(tmp_path, config), "--output", out))
        assert expected in message, message
        assert not out.exists()

"""Merges (issue 19): mergekit's ``nearswap``, through both front doors, bitwise equal to stock
mergekit 0.1.5 (elementwise: no sort, no random draw, no reduction), and the kernel on hard values
against mergekit's own function."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from merge_checks import CODES, equals_mergekit, family_fixture, threads_and_verify
from test_merges import (
    _raw,
    _yaml,
    mergekit,
)

from cli_helpers import error_line, run

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")


def _hard(n: int, dtype: torch.dtype, gen: torch.Generator, scale: float) -> torch.Tensor:
    """Normal values times ``scale``, with signed zeros, subnormals, huge values, infinities."""
    info = torch.finfo(dtype)
    x = torch.randn(n, generator=gen) * scale
    special = torch.tensor([0.0, -0.0, info.tiny / 4, -info.tiny / 8, info.max, -info.max, float("inf"),
                            float("-inf"), 1e-30])
    pick = torch.randint(0, n, (n // 200,), generator=gen)
    x[pick] = special[torch.randint(0, len(special), (len(pick),), generator=gen)]
    return x.to(dtype)


def _same(reference: torch.Tensor, ours: Any, n: int) -> torch.Tensor:
    """Elements bitwise equal, NaN payloads aside (torch's vector and scalar paths quiet NaNs
    differently)."""
    mine = torch.from_numpy(ours.copy()).view(reference.dtype)
    same = (reference.view(-1).view(torch.uint8).reshape(n, -1) == mine.view(torch.uint8).reshape(n, -1)).all(1)
    return same | (reference.isnan() & mine.isnan())


def _group(tensors: list[torch.Tensor]) -> Any:
    from mergekit.merge_methods.base import TensorGroup

    return TensorGroup.from_tensors(tensors, base_index=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nearswap_kernel_on_hard_values(dtype):
    """Elements near and far apart (differences around t), equal ones (below the 1e-6 floor) and
    the hard values, on chunks longer than a block: bitwise mergekit's ``nearswap_merge``."""
    from mergekit.merge_methods.nearswap import nearswap_merge

    from tensorsurgery.ops import NearSwap
    from tensorsurgery.ops.arith import BLOCK
    from tensorsurgery.ops.base import Input

    n = BLOCK * 2 + 17
    gen = torch.Generator().manual_seed(4)
    base = _hard(n, dtype, gen, 1.0)
    other = (base.float() + torch.randn(n, generator=gen) * 0.01).to(dtype)
    other[::7] = base[::7]
    other[::101] = _hard(n, dtype, gen, 1.0)[::101]
    inputs = [Input("s", "k", CODES[dtype], (n,), None)] * 2
    for t in (0.0, 0.001, 0.0123, 2.0):
        reference = nearswap_merge.merge_group(_group([base, other]), t=t)
        ours = NearSwap(t, CODES[dtype]).apply([_raw(base), _raw(other)], inputs, 0)
        same = _same(reference, ours, n)
        assert same.all(), (t, int((~same).sum()))
        assert reference.isnan().any() and reference.isinf().any()  # the hard values are there


#: nearswap's cases (base and one other model).
NEARSWAP_CASES = {
    "nearswap": lambda p: {"merge_method": "nearswap", "base_model": str(p["base"]),
                           "models": [{"model": str(p["base"])}, {"model": str(p["ft1"])}],
                           "parameters": {"t": 0.01}},
    "nearswap-f16-gradient-filters": lambda p: {
        "merge_method": "nearswap", "base_model": str(p["base"]), "models": [{"model": str(p["ft0"])}],
        "dtype": "float16", "out_dtype": "bfloat16",
        "parameters": {"t": [{"filter": "mlp", "value": [0.001, 0.03]}, {"value": 0.02}]}},
    "nearswap-f32": lambda p: {"merge_method": "nearswap", "base_model": str(p["base"]), "dtype": "float32",
                               "models": [{"model": str(p["ft2"])}], "parameters": {"t": 0.0005}},
}


models = family_fixture()


@pytest.mark.parametrize("door", ["yaml", "toml"])
@pytest.mark.parametrize("case", sorted(NEARSWAP_CASES))
def test_nearswap_equals_mergekit(capsys, tmp_path, models, case, door):
    config = NEARSWAP_CASES[case](models)
    equals_mergekit(capsys, tmp_path, config, door, mergekit(config, tmp_path / "mergekit"))


def test_nearswap_is_reproducible_and_verified(capsys, tmp_path, models):
    threads_and_verify(capsys, tmp_path, NEARSWAP_CASES["nearswap"](models), "nearswap")


def test_nearswap_refusals(capsys, tmp_path, models):
    out = tmp_path / "out"
    two = [{"model": str(models["ft0"])}, {"model": str(models["ft1"])}]
    for config, expected in (
        ({"merge_method": "nearswap", "base_model": str(models["base"]), "models": two, "parameters": {"t": 0.1}},
         "models: 2 models besides the base; nearswap interpolates the base towards exactly 1"),
        ({"merge_method": "nearswap", "base_model": str(models["base"]), "models": two[:1]},
         "parameters: missing t; nearswap needs one"),
    ):
        message = error_line(*run(capsys, "apply", _yaml(tmp_path, config), "--output", out))
        assert expected in message, message
        assert not out.exists()


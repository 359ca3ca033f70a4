"""Merges (issue 19): mergekit's ``ram`` and ``ramplus_tl``, through both front doors, bitwise equal
to stock mergekit 0.1.5 (no sort, no random draw; the sums over the models in torch's order), and
the kernels on tensors of several blocks against mergekit's own functions."""
from __future__ import annotations

import pytest
import torch
from merge_checks import CODES, equals_mergekit, family_fixture, file_inputs, prepared_op, threads_and_verify
from test_merge_nearswap import _group, _hard, _same
from test_merges import FINE_TUNES, _raw, mergekit

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")


models = family_fixture()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ram_kernels_on_tensors_of_many_blocks(tmp_path, dtype):
    """Both methods on tensors longer than a statistics block, four models (torch sums the last
    columns in another order), differences exactly at epsilon (rounded to the merge dtype) and
    around it, unchanged elements, the hard values: bitwise mergekit's ``ram_merge`` and
    ``ramplus_tl_merge`` (whose counts are over the whole tensor; its result float32)."""
    from mergekit.merge_methods.ram import ram_merge, ramplus_tl_merge

    from tensorsurgery.ops import Ram, RamPlus
    from tensorsurgery.ops.blocks import STAT_BLOCK

    n = STAT_BLOCK * 2 + 77
    gen = torch.Generator().manual_seed(5)
    base = _hard(n, dtype, gen, 1.0)
    eps = 1e-3
    at = float(torch.tensor(eps).to(dtype))
    xs = []
    for i in range(4):
        step = (torch.randint(-3, 4, (n,), generator=gen) * at).to(dtype)  # 0, +-eps, +-2 eps, +-3 eps
        x = (base.float() + step.float()).to(dtype)
        x[::i + 2] = base[::i + 2]  # each model changes another share of the elements
        x[(3 * i)::103] = _hard(n, dtype, gen, 1.0)[(3 * i)::103]
        xs.append(x)
    path, inputs = file_inputs(tmp_path, [base, *xs])
    raws = [_raw(x) for x in (base, *xs)]
    k = base.element_size()
    varied = False
    for epsilon in (eps, 0.0, 0.5):
        plain = ram_merge.merge_group(_group([base, *xs]), epsilon=epsilon)
        ours = Ram(epsilon, CODES[dtype]).apply(raws, inputs, 0)
        assert _same(plain, ours, n).all(), ("ram", epsilon, int((~_same(plain, ours, n)).sum()))
        for r, alpha in ((0.1, 0.2), (2.5, 7.0)):
            plus = ramplus_tl_merge.merge_group(_group([base, *xs]), r=r, alpha=alpha, epsilon=epsilon)
            assert plus.dtype == torch.float32
            t = prepared_op(RamPlus(r, alpha, epsilon, CODES[dtype]), path, inputs)
            for start, stop in ((0, n), (STAT_BLOCK - 5, STAT_BLOCK + 7), (n - 3, n)):
                mine = t.op.apply([x[start * k:stop * k] for x in raws], inputs, start)
                same = _same(plus[start:stop], mine, stop - start)
                assert same.all(), ("ramplus_tl", epsilon, r, alpha, start, int((~same).sum()))
            varied |= len(set(t.op.scales)) > 1
    assert varied  # the models' own factors, not all clamped at alpha


#: ram's cases.
RAM_CASES = {
    "ram": lambda p: {"merge_method": "ram", "base_model": str(p["base"]),
                      "models": [{"model": str(p[n])} for n in FINE_TUNES], "parameters": {"epsilon": 0.01}},
    "ram-f16-default": lambda p: {"merge_method": "ram", "base_model": str(p["base"]), "dtype": "float16",
                                  "models": [{"model": str(p[n])} for n in FINE_TUNES[:2]]},
    "ramplus_tl": lambda p: {"merge_method": "ramplus_tl", "base_model": str(p["base"]),
                             "models": [{"model": str(p[n])} for n in FINE_TUNES],
                             "parameters": {"epsilon": 0.02, "r": 0.5, "alpha": 1.5}},
    "ramplus_tl-to-bf16-filters": lambda p: {
        "merge_method": "ramplus_tl", "base_model": str(p["base"]), "out_dtype": "bfloat16",
        "models": [{"model": str(p[n]), "parameters": {"weight": 1}} for n in FINE_TUNES],
        "parameters": {"epsilon": [{"filter": "mlp", "value": 0.03}, {"value": 0.01}], "r": [0.1, 0.9]}},
    # mergekit writes the float32 result whatever the merge dtype (not cast to it without out_dtype)
    "ramplus_tl-f16-writes-f32": lambda p: {"merge_method": "ramplus_tl", "base_model": str(p["base"]),
                                            "dtype": "float16", "models": [{"model": str(p[n])} for n in FINE_TUNES]},
    "ramplus_tl-f32": lambda p: {"merge_method": "ramplus_tl", "base_model": str(p["base"]), "dtype": "float32",
                                 "models": [{"model": str(p[n])} for n in FINE_TUNES]},
}


@pytest.mark.parametrize("door", ["yaml", "toml"])
@pytest.mark.parametrize("case", sorted(RAM_CASES))
def test_ram_equals_mergekit(capsys, tmp_path, models, case, door):
    config = RAM_CASES[case](models)
    equals_mergekit(capsys, tmp_path, config, door, mergekit(config, tmp_path / "mergekit"))


def test_ram_is_reproducible_and_verified(capsys, tmp_path, models):
    threads_and_verify(capsys, tmp_path, RAM_CASES["ramplus_tl"](models), "ramplus_tl")

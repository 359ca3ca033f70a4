"""mergekit's ``nuslerp`` (issue 19): spherical interpolation of two models (or of their
differences from a base) with one angle per tensor, per row or per column, through both front
doors, against stock mergekit 0.1.5 on the tiny models of tests/test_merges.py, and the kernel on
tensors of many statistics blocks against mergekit's own ``nuslerp`` function.

In 16-bit merge dtypes mergekit rounds each norm, dot and angle to that dtype, and ours (float64
sums over fixed blocks, rounded once to float32, then to the dtype) round alike on these tensors:
bitwise (on long tensors torch's sums are not always the exact sums rounded once: see
test_kernel_on_tensors_of_many_blocks). In float32 its sums are torch's float32 reductions and
ours float64: the coefficients are a few float32 units apart, and the values within 8 float32
units of the largest input at that element (measured: 6). Where two vectors are colinear
(mergekit's ``1 - cos^2 <= eps^2``) both interpolate linearly: bitwise in every dtype.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from merge_checks import (
    CODES,
    apply_door,
    equals_mergekit,
    family_fixture,
    flipped_byte_found,
    same_bytes_on_threads,
)
from test_merges import (
    _raw,
    _yaml,
    mergekit,
    read_all,
)
from torch_helpers import no_network

from cli_helpers import error_line, run
from tensorsurgery.io.byte_source import LocalFile

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def offline():
    with no_network("a merge test"):
        yield


models = family_fixture()


def _two(p: dict[str, Path], a: Any, b: Any, names: tuple[str, str] = ("ft0", "ft1")) -> list[dict[str, Any]]:
    return [{"model": str(p[n]), "parameters": {"weight": w}} for n, w in zip(names, (a, b))]


#: Bitwise mergekit's (16-bit merge dtypes): the whole-tensor angle with a base, per row without a
#: base (weights a gradient), per column with a base and a filtered flag.
CASES = {
    "nuslerp": lambda p: {"merge_method": "nuslerp", "base_model": str(p["base"]), "models": _two(p, 0.3, 0.7)},
    "nuslerp-rows-f16-no-base": lambda p: {
        "merge_method": "nuslerp", "dtype": "float16", "parameters": {"nuslerp_flatten": False},
        "models": _two(p, [0.2, 0.9], 0.5), "out_dtype": "float32"},
    "nuslerp-columns": lambda p: {
        "merge_method": "nuslerp", "base_model": str(p["base"]),
        "parameters": {"nuslerp_flatten": False,
                       "nuslerp_row_wise": [{"filter": "mlp", "value": False}, {"value": True}]},
        "models": _two(p, 1, 2, ("ft0", "ft2"))},
}
#: float32 merges: within 8 units of the largest input (test_float32_is_mergekit_to_a_few_units).
F32_CASES = {
    "nuslerp-f32-no-base": lambda p: {"merge_method": "nuslerp", "dtype": "float32", "models": _two(p, 0.3, 0.7)},
    "nuslerp-f32-rows": lambda p: {"merge_method": "nuslerp", "dtype": "float32", "base_model": str(p["base"]),
                                   "parameters": {"nuslerp_flatten": False}, "models": _two(p, -0.3, 1.0)},
}


@pytest.mark.parametrize("door", ["yaml", "toml"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_nuslerp_equals_mergekit(capsys, tmp_path, models, case, door):
    config = CASES[case](models)
    theirs = mergekit(config, tmp_path / "mergekit")
    equals_mergekit(capsys, tmp_path, config, door, theirs, case)


def _f32_units(x: torch.Tensor) -> torch.Tensor:
    """One float32 unit in the last place of each |x| (of its binade; the smallest normal's for 0)."""
    exponent = torch.floor(torch.log2(x.abs().double().clamp(min=2.0 ** -126)))
    return torch.pow(2.0, exponent - 23)


@pytest.mark.parametrize("case", sorted(F32_CASES))
def test_float32_is_mergekit_to_a_few_units(capsys, tmp_path, models, case):
    config = F32_CASES[case](models)
    theirs = read_all(mergekit(config, tmp_path / "mergekit"))
    _, out = apply_door(capsys, tmp_path, config, name=case)
    ours = read_all(out)
    sources = {n: read_all(models[n]) for n in ("base", "ft0", "ft1")}
    differing = elements = 0
    for key in sorted(theirs):
        xs = [sources[n][key].double() for n in ("ft0", "ft1")]
        largest = torch.maximum(xs[0].abs(), xs[1].abs())
        if "base_model" in config:
            base = sources["base"][key].double()
            largest = torch.maximum(largest, torch.maximum((xs[0] - base).abs(), (xs[1] - base).abs()))
        error = (theirs[key].double() - ours[key].double()).abs() / _f32_units(largest)
        assert float(error.max()) <= 8, f"{key}: {float(error.max())} units of the largest input"
        differing += int((theirs[key] != ours[key]).sum())
        elements += theirs[key].numel()
    assert differing > 0  # the tolerance is needed (else this test would say bitwise)
    assert elements == 83376


def test_record_plan_threads_and_verify(capsys, tmp_path, models):
    """plan says the merge; the record has each tensor's t and flags; the bytes are the same on 1
    and 3 threads; verify (which reads the statistics again) catches one changed byte."""
    config = CASES["nuslerp-columns"](models)
    manifest = _yaml(tmp_path, config)
    code, out, err = run(capsys, "plan", manifest)
    assert code == 0 and "merge: nuslerp of ft0, ft2 onto base" in out, out + err
    t3 = same_bytes_on_threads(capsys, tmp_path, manifest)
    import json
    record = json.loads((t3 / "tensorsurgery.json").read_text())
    op = record["tensors"]["model.layers.1.self_attn.q_proj.weight"]["operation"]
    assert op == {"name": "nuslerp", "t": pytest.approx(2 / 3), "row_wise": True, "flatten": False, "base": True,
                  "dtype": "BF16"}
    assert record["tensors"]["model.layers.1.mlp.up_proj.weight"]["operation"]["row_wise"] is False
    flipped_byte_found(capsys, manifest, t3, "nuslerp")


def test_refusals(capsys, tmp_path, models):
    out = tmp_path / "out"
    three = _two(models, 1, 1) + _two(models, 1, 1, ("ft2", "ft2"))[:1]
    for config, message in (
            ({"merge_method": "nuslerp", "models": three},
             "models: 3 models besides the base; nuslerp merges at most 2"),
            ({"merge_method": "nuslerp", "base_model": str(models["base"]), "models": three[:1]},
             "models: 1 model besides the base; nuslerp needs at least 2"),
            ({"merge_method": "nuslerp", "models": [{"model": str(models["ft0"])}, *three[1:2]]}, "missing weight")):
        assert message in error_line(*run(capsys, "apply", _yaml(tmp_path, config), "--output", out)), message
        assert not out.exists()


def _pattern(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors of ``shape``, random, but where some rows (last dimension) or columns (first)
    are colinear (rows 1 and 5: one a power-of-two multiple of the other with four nonzero entries
    of one magnitude, their cosine exactly 1 or -1 in every dtype) or zero (row 2)."""
    x = torch.randn(shape, generator=gen).to(dtype)
    y = (torch.randn(shape, generator=gen) * 0.5 + x.float() * 0.3).to(dtype)
    rows = x.view(-1, shape[-1])
    for r in (1, 5):
        rows[r] = 0
        rows[r, [0, 3, 100, shape[-1] - 1]] = torch.tensor([0.25, -0.25, 0.25, 0.25], dtype=dtype)
        y.view(-1, shape[-1])[r] = rows[r] * (4 if r == 1 else -2)
    x.view(-1, shape[-1])[2] = 0  # a zero row: its norm clamped, its unit vector 0
    y[0] = x[0] * 2  # colinear in 16-bit dtypes (the dot of the unit vectors rounds to 1)
    return x, y


def _torch_statistics_differ(v0: torch.Tensor, v1: torch.Tensor) -> bool:
    """Whether torch's 16-bit norms or dot of the unit vectors (mergekit's: torch's sum of a long
    16-bit tensor is not the exact sum rounded once) differ from the exact sums rounded once to the
    dtype (ours)."""
    def exact(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(x), dtype=torch.float32).to(v0.dtype)

    norms = [torch.norm(v).clamp(min=1e-7) for v in (v0, v1)]
    exact_norms = [exact(v.double().norm()).clamp(min=1e-7) for v in (v0, v1)]
    u = [v / n for v, n in zip((v0, v1), exact_norms)]
    return any(not torch.equal(a, b) for a, b in zip(norms, exact_norms)) or \
        not torch.equal((u[0] * u[1]).sum(), exact((u[0] * u[1]).double().sum()))


def _group(v: torch.Tensor, flatten: bool, row_wise: bool, g: int) -> torch.Tensor:
    """Group ``g`` of ``v``'s elements: the whole tensor, column ``g`` or row ``g``."""
    if flatten:
        return v.reshape(-1)
    return v.reshape(v.shape[0], -1)[:, g] if row_wise else v.reshape(-1, v.shape[-1])[g]


@pytest.mark.parametrize("dtype", list(CODES))
def test_kernel_on_tensors_of_many_blocks(tmp_path, dtype):
    """The two statistics passes on tensors longer than a statistics block (65,536 elements), with
    rows that cross block boundaries, in the three groupings and with and without a base, against
    mergekit's own ``nuslerp`` (merge_methods/nuslerp.py), in several element ranges. 16-bit: every
    group bitwise but those where torch's norm or dot rounds to another value than the exact sum,
    and those within 4 units of the largest input;
    float32: within 16 units of the largest input (measured 12, on the 189k-element flattened
    tensor: mergekit's float32 sums are less exact the longer they are), colinear rows bitwise."""
    from mergekit.merge_methods.nuslerp import nuslerp

    from tensorsurgery.ops import Nuslerp
    from tensorsurgery.ops.base import ByteRange, Input
    from tensorsurgery.ops.blocks import STAT_BLOCK
    from tensorsurgery.ops.interpreter import Prepared, prepared

    code = CODES[dtype]
    gen = torch.Generator().manual_seed(2)
    explained = 0
    for shape in ((40, 5003), (9, 7, 3001)):
        n = int(torch.Size(shape).numel())
        assert n > 2 * STAT_BLOCK + 7
        x, y = _pattern(shape, gen, dtype)
        base = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
        for flatten, row_wise, with_base in ((True, False, True), (False, False, False), (False, True, True),
                                             (False, False, True), (False, True, False)):
            t = 0.37
            if with_base:
                a, b = x + base, y + base
                v0, v1 = a - base, b - base  # the differences mergekit interpolates (rounded)
                tensors = (base, a, b)
            else:
                v0, v1 = x, y
                tensors = (x, y)
            expected = nuslerp(t, v0, v1, dim=0 if row_wise else -1, flatten=flatten)
            expected = (base + expected if with_base else expected).reshape(-1)
            path = tmp_path / "x.bin"
            path.write_bytes(b"".join(_raw(v).tobytes() for v in tensors))
            size = x.element_size() * n
            file = LocalFile(path)
            inputs = tuple(Input("s", "k", code, shape, ByteRange(file, i * size, size))
                           for i in range(len(tensors)))
            reader = LocalFile(path).open()
            try:
                mix = prepared(Prepared(code, size, inputs, Nuslerp(t, row_wise, flatten, with_base, code)),
                               [reader] * len(inputs)).op
            finally:
                reader.close()
            raws, k = [_raw(v) for v in tensors], x.element_size()
            largest = torch.stack([v.reshape(-1).abs() for v in (v0, v1, *tensors)]).amax(0)
            units = _f32_units(largest) * 2.0 ** (23 - {torch.bfloat16: 7, torch.float16: 10}.get(dtype, 23))
            for start, stop in ((0, n), (STAT_BLOCK - 5, STAT_BLOCK * 2 + 7), (n - 3, n)):
                ours = torch.from_numpy(mix.apply([r[start * k:stop * k] for r in raws], inputs, start).copy())
                ours = ours.view(dtype)
                error = (ours.double() - expected[start:stop].double()).abs() / units[start:stop]
                case = (shape, flatten, row_wise, with_base, start)
                assert float(error.max()) <= (16 if dtype == torch.float32 else 4), (case, float(error.max()))
                if dtype == torch.float32 or start:
                    continue
                differ = torch.from_numpy(mix.groups.index(0, n))[ours != expected].unique().tolist()
                assert len(differ) <= 3, (case, len(differ))
                for g in differ:  # each group that differs is one where torch's sums round otherwise
                    picked = [_group(v, flatten, row_wise, g) for v in (v0, v1)]
                    assert _torch_statistics_differ(*picked), (case, g)
                    explained += 1
            if dtype == torch.float32 and not (flatten or row_wise or with_base):  # the colinear rows: bitwise
                got = torch.from_numpy(mix.apply(raws, inputs, 0).copy()).view(dtype).view(-1, shape[-1])
                assert torch.equal(got[[1, 5]], expected.view(-1, shape[-1])[[1, 5]]), shape
    assert dtype == torch.float32 or explained > 0  # torch's 16-bit sums do round otherwise, here and there

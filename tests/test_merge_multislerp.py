"""mergekit's ``multislerp`` (issue 19): barycentric interpolation of any number of models (or of
their differences from a base) on the hypersphere, through both front doors, against stock
mergekit 0.1.5 on the tiny models of tests/test_merges.py, and the kernel on tensors of many
statistics blocks against mergekit's own method.

Its four sums over each tensor (the norms, the mean's norm, the dots with the normalized mean,
the tangent average's norm) are ours in float64 over fixed blocks, each made from what the
previous ones round to, rounded once to float32 then to the merge dtype. In 16-bit dtypes they
round as torch's do on these tensors: bitwise. In float32 torch's norms are float32 reductions
less exact the longer the tensor (1e-6 relative on 217k normal values, against 2e-8 for its sum),
and the norms enter three times (the unit vectors, the mean's norm, the scale): the values are
within 32 float32 units of the largest input at that element on the tiny models (measured 18),
128 on a 217k-element tensor (measured 80).
"""
from __future__ import annotations

import shutil
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
from test_merge_nuslerp import _f32_units
from test_merges import (
    FINE_TUNES,
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


def _models(p: dict[str, Path], *weights: Any) -> list[dict[str, Any]]:
    return [{"model": str(p[n]), "parameters": {"weight": w}} for n, w in zip(FINE_TUNES, weights)]


#: Bitwise mergekit's (16-bit merge dtypes).
CASES = {
    "multislerp": lambda p: {"merge_method": "multislerp", "base_model": str(p["base"]),
                             "models": _models(p, 0.3, 0.45, 0.7)},
    "multislerp-f16-no-base-unnormalized": lambda p: {
        "merge_method": "multislerp", "dtype": "float16", "out_dtype": "float32",
        "parameters": {"normalize_weights": False, "eps": 1e-6},
        "models": _models(p, [0.2, 0.9], 0.5, [{"filter": "mlp", "value": 0.1}, {"value": 0.3}])},
    "multislerp-two": lambda p: {"merge_method": "multislerp", "base_model": str(p["base"]),
                                 "models": _models(p, 1, 2)},
    "multislerp-one": lambda p: {"merge_method": "multislerp", "base_model": str(p["base"]), "models": _models(p, 1)},
}
F32_CASES = {
    "multislerp-f32": lambda p: {"merge_method": "multislerp", "base_model": str(p["base"]), "dtype": "float32",
                                 "models": _models(p, 0.3, -0.2, 0.9)},
    "multislerp-f32-no-base": lambda p: {"merge_method": "multislerp", "dtype": "float32",
                                         "models": _models(p, 1, 1, 1)},
}


@pytest.mark.parametrize("door", ["yaml", "toml"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_multislerp_equals_mergekit(capsys, tmp_path, models, case, door):
    config = CASES[case](models)
    theirs = mergekit(config, tmp_path / "mergekit")
    equals_mergekit(capsys, tmp_path, config, door, theirs, case)


@pytest.mark.parametrize("case", sorted(F32_CASES))
def test_float32_is_mergekit_to_a_few_units(capsys, tmp_path, models, case):
    config = F32_CASES[case](models)
    theirs = read_all(mergekit(config, tmp_path / "mergekit"))
    ours = read_all(apply_door(capsys, tmp_path, config, name=case)[1])
    sources = {n: read_all(models[n]) for n in ("base", *FINE_TUNES)}
    differing = 0
    for key in sorted(theirs):
        xs = [sources[n][key].double() for n in FINE_TUNES]
        if "base_model" in config:
            xs += [x - sources["base"][key].double() for x in xs] + [sources["base"][key].double()]
        largest = torch.stack([x.abs() for x in xs]).amax(0)
        error = (theirs[key].double() - ours[key].double()).abs() / _f32_units(largest)
        assert float(error.max()) <= 32, f"{key}: {float(error.max())} units of the largest input"
        differing += int((theirs[key] != ours[key]).sum())
    assert differing > 0  # the tolerance is needed (else this test would say bitwise)


def test_threads_and_verify(capsys, tmp_path, models):
    """The same bytes on 1 and 3 threads; verify (which reads the four sums again) catches one
    changed byte."""
    config = CASES["multislerp"](models)
    manifest = _yaml(tmp_path, config)
    code, out, err = run(capsys, "plan", manifest)
    assert code == 0 and "merge: multislerp of ft0, ft1, ft2 onto base" in out, out + err
    t3 = same_bytes_on_threads(capsys, tmp_path, manifest)
    flipped_byte_found(capsys, manifest, t3, "multislerp")


def test_refusals(capsys, tmp_path, models):
    """A missing weight; and three models whose unit vectors' weighted sum is zero (a model, its
    negation and zeros), where mergekit raises: one line, exit 2, nothing written."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    config = {"merge_method": "multislerp", "models": [{"model": str(models["ft0"])}]}
    assert "missing weight" in error_line(*run(capsys, "apply", _yaml(tmp_path, config), "--output", out))
    assert not out.exists()
    for name, change in (("neg", lambda t: -t), ("zero", torch.zeros_like)):
        shutil.copytree(models["ft0"], tmp_path / name)
        for shard in (tmp_path / name).glob("*.safetensors"):
            tensors = {k: change(v).contiguous() for k, v in load_file(shard).items()}
            save_file(tensors, shard, metadata={"format": "pt"})
    config = {"merge_method": "multislerp", "models": [{"model": str(p), "parameters": {"weight": 1}}
                                                       for p in (models["ft0"], tmp_path / "neg", tmp_path / "zero")]}
    with pytest.raises(ValueError, match="The weighted sum of the input tensors is zero"):
        mergekit(config, tmp_path / "mergekit")
    message = error_line(*run(capsys, "apply", _yaml(tmp_path, config), "--output", out, "--no-progress"))
    assert message.endswith("multislerp: the weighted sum of the models' unit vectors is zero (antipodal models "
                            "whose weights balance out); mergekit fails here too: change the weights"), message
    assert not out.exists()


def _mergekit_multislerp(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None,
                         normalize: bool, eps: float) -> torch.Tensor:
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.multislerp import multislerp

    group = TensorGroup.from_tensors(([base] if base is not None else []) + tensors,
                                     base_index=0 if base is not None else None)
    return multislerp([group], parameters={"weight": weights, "normalize_weights": normalize, "eps": eps})[0]


@pytest.mark.parametrize("dtype", list(CODES))
def test_kernel_on_tensors_of_many_blocks(tmp_path, dtype):
    """The four statistics passes on a tensor longer than a statistics block (65,536 elements),
    with and without a base, normalized or not, against mergekit's own method, in several element
    ranges: 16-bit bitwise, float32 within 128 units of the largest input (module docstring); two
    antipodal models of equal weight (the mean is zero) interpolated linearly as mergekit does,
    three refused as mergekit fails (in float16 mergekit's eps is 0: both make NaN)."""
    from tensorsurgery.errors import PlanError
    from tensorsurgery.io.byte_source import LocalFile
    from tensorsurgery.ops import Multislerp
    from tensorsurgery.ops.base import ByteRange, Input
    from tensorsurgery.ops.blocks import STAT_BLOCK
    from tensorsurgery.ops.interpreter import Prepared, prepared

    code = CODES[dtype]
    gen = torch.Generator().manual_seed(3)
    shape = (31, 7001)
    n = 31 * 7001
    base = (torch.randn(shape, generator=gen) * 0.5).to(dtype)
    xs = [(torch.randn(shape, generator=gen) * 0.1 + base.float() * s).to(dtype) for s in (0.9, 1.1, 1.0)]
    antipodal = [xs[0], (-xs[0].float()).to(dtype)]

    def ours(tensors: list[torch.Tensor], op: Multislerp) -> torch.Tensor:
        path = tmp_path / "x.bin"
        path.write_bytes(b"".join(_raw(v).tobytes() for v in tensors))
        size = base.element_size() * n
        file = LocalFile(path)
        inputs = tuple(Input("s", "k", code, shape, ByteRange(file, i * size, size)) for i in range(len(tensors)))
        reader = LocalFile(path).open()
        try:
            mix = prepared(Prepared(code, size, inputs, op), [reader] * len(inputs)).op
        finally:
            reader.close()
        raws, k = [_raw(v) for v in tensors], base.element_size()
        parts = [torch.from_numpy(mix.apply([r[a * k:b * k] for r in raws], inputs, a).copy()).view(dtype)
                 for a, b in ((0, STAT_BLOCK - 5), (STAT_BLOCK - 5, STAT_BLOCK * 2 + 7), (STAT_BLOCK * 2 + 7, n))]
        return torch.cat(parts)

    cases = [(xs, [0.3, 0.45, 0.7], base, True), (xs, [0.5, -0.2, 0.9], None, False),
             (xs[:2], [1.0, 2.0], base, True), (antipodal, [1.0, 1.0], None, True)]
    for tensors, weights, b, normalize in cases:
        theirs = _mergekit_multislerp(tensors, weights, b, normalize, 1e-8).reshape(-1)
        mine = ours(([b] if b is not None else []) + tensors,
                    Multislerp(tuple(weights), normalize, 1e-8, b is not None, code))
        case = (len(tensors), weights, b is not None)
        if dtype != torch.float32 or tensors is antipodal:
            # bitwise; NaN payloads aside (float16's antipodal pair: mergekit's eps rounds to 0 there,
            # so it divides 0 by 0 and so do we)
            same = (mine.view(-1, 1).view(torch.uint8) == theirs.reshape(-1, 1).view(torch.uint8)).all(1)
            assert bool((same | (mine.isnan() & theirs.isnan())).all()), case
            continue
        largest = torch.stack([v.reshape(-1).abs() for v in [*tensors, *([b] if b is not None else [])]]).amax(0)
        error = (mine.double() - theirs.double()).abs() / _f32_units(largest)
        assert float(error.max()) <= 128, (case, float(error.max()))
    balanced = [*antipodal, xs[1] * 0]
    if dtype == torch.float16:  # eps is 0 in float16: the mean's norm is not below it, and 0 / 0 is NaN
        assert bool(_mergekit_multislerp(balanced, [1.0, 1.0, 1.0], None, True, 1e-8).isnan().all())
        assert bool(ours(balanced, Multislerp((1.0, 1.0, 1.0), True, 1e-8, False, code)).isnan().all())
        return
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        _mergekit_multislerp(balanced, [1.0, 1.0, 1.0], None, True, 1e-8)
    with pytest.raises(PlanError, match="the weighted sum of the models' unit vectors is zero"):
        ours(balanced, Multislerp((1.0, 1.0, 1.0), True, 1e-8, False, code))


def test_wrong_guesses_cost_passes_not_bytes(tmp_path, monkeypatch):
    """The mean's norm and the dots are guessed from the Gram matrix so that one pass makes the
    three later sums; a guess proven wrong costs a pass (the sequential passes' values are used),
    never a byte: mergekit's bytes whatever the guesses."""
    import tensorsurgery.ops.blocks as blocks
    import tensorsurgery.ops.multislerp as ms
    from tensorsurgery.ops.base import ByteRange, Input
    from tensorsurgery.ops.interpreter import Prepared, prepared

    gen = torch.Generator().manual_seed(5)  # (seed 4: a mean's norm within 2% of a unit of a rounding midpoint,
    shape, dtype = (29, 9001), torch.bfloat16  # where the Gram matrix's guess falls on the other side: 3 passes)
    base = torch.randn(shape, generator=gen).to(dtype)
    xs = [(base.float() + torch.randn(shape, generator=gen) * 0.3).to(dtype) for _ in range(3)]
    weights = [0.3, 0.45, 0.7]
    theirs = _mergekit_multislerp(xs, weights, base, True, 1e-8).reshape(-1)
    path = tmp_path / "x.bin"
    path.write_bytes(b"".join(_raw(v).tobytes() for v in (base, *xs)))
    size = base.element_size() * base.numel()
    inputs = tuple(Input("s", "k", "BF16", shape, ByteRange(LocalFile(path), i * size, size)) for i in range(4))
    passes = []
    original = blocks.input_blocks
    monkeypatch.setattr(blocks, "input_blocks", lambda *a, **k: (passes.append(1), original(*a, **k))[1])
    guess_mean_norm, guess_dots = ms._guess_mean_norm, ms._guess_dots
    guesses = {"right": (guess_mean_norm, guess_dots), "mean norm wrong": (lambda *a: 1.0, guess_dots),
               "dots wrong": (guess_mean_norm, lambda *a: tuple(d + 1 for d in guess_dots(*a)))}
    counts = {}
    for name, (mean_norm, dots) in guesses.items():
        monkeypatch.setattr(ms, "_guess_mean_norm", mean_norm)
        monkeypatch.setattr(ms, "_guess_dots", dots)
        passes.clear()
        reader = LocalFile(path).open()
        try:
            mix = prepared(Prepared("BF16", size, inputs, ms.Multislerp(tuple(weights), True, 1e-8, True, "BF16")),
                           [reader] * 4).op
        finally:
            reader.close()
        counts[name] = len(passes)
        ours = torch.from_numpy(mix.apply([_raw(v) for v in (base, *xs)], inputs, 0).copy()).view(dtype)
        assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16)), name
    assert counts == {"right": 2, "mean norm wrong": 3, "dots wrong": 3}, counts

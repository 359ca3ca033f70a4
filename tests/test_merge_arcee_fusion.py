"""Merges (issue 19): mergekit's ``arcee_fusion``, through both front doors, against mergekit 0.1.5
on one torch thread: the test models' tensors bitwise in bfloat16 and float16 (one element of
83,376 in float32); the kernel against mergekit's own functions, with its sampled quartiles
(tensors of more than 1,000,000 elements) drawn from torch's seeded generator. Where ours can
differ: torch's exponentials and logarithms are SLEEF's (within a unit), ours correctly rounded;
an importance that rounds otherwise and lies at the threshold takes the other model's value."""
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
    flipped_byte_found,
    prepared_op,
    same_bytes_on_threads,
    single_thread_mergekit,
)
from test_merges import (
    _raw,
    _yaml,
    read_all,
)

from cli_helpers import error_line, run

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")


def _reference(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mergekit's ``arcee_fusion_merge_method`` body on one torch thread (the global generator
    as it is: seed it first for a sampled tensor)."""
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion, _compute_importance

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mask, _ = DynamicThresholdFusion().compute_fusion_mask(_compute_importance(x, base))
        return base + (x - base) * mask
    finally:
        torch.set_num_threads(threads)


def _differing(tmp_path: Path, base: torch.Tensor, x: torch.Tensor, seed: int | None = None,
               offset: int = 0) -> int:
    """Elements of our result (made in three ranges that cut rows and blocks) that are not
    mergekit's."""
    import numpy as np

    from tensorsurgery.ops import ArceeFusion
    from tensorsurgery.ops.base import Input

    expected = _raw(_reference(base, x))
    path, flat = file_inputs(tmp_path, [base.reshape(-1), x.reshape(-1)])
    inputs = tuple(Input(i.source, i.key, i.dtype, tuple(base.shape), i.range) for i in flat)
    t = prepared_op(ArceeFusion(CODES[base.dtype], seed, offset), path, inputs)
    n, k = base.numel(), base.element_size()
    cuts = sorted({0, n // 3 + 7, 2 * n // 3 + 1, n})
    raws = [_raw(base), _raw(x)]
    ours = np.concatenate([t.op.apply([r[a * k:b * k] for r in raws], inputs, a) for a, b in zip(cuts, cuts[1:])])
    return int((ours.reshape(-1, 4) != expected.reshape(-1, 4)).any(1).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_arcee_fusion_kernel(tmp_path, dtype):
    """Rows of 48, 500 and 1000 columns (blocks of whole rows, several rows a block and a row of
    a block's size), a 1-D tensor (one row), fine-tune-like differences: bitwise mergekit's in
    bfloat16; measured 6 and 15 of 300,000 and 1,000,000 elements in float16, up to 13 in float32 (AVX2)."""
    gen = torch.Generator().manual_seed(0)
    bound = {torch.bfloat16: 0, torch.float16: 20, torch.float32: 20}[dtype]
    for shape in ((64, 48), (80, 48), (300, 1000), (2000, 500), (4096,)):
        base = (torch.randn(*shape, generator=gen) * 0.02).to(dtype)
        x = (base.float() + 0.02 * torch.randn(*shape, generator=gen)).to(dtype)
        assert _differing(tmp_path, base, x) <= bound, shape


def test_arcee_fusion_samples_the_quartiles_of_large_tensors(tmp_path):
    """Two tensors of 1.2M elements: mergekit draws 1,000,000 indices for each from torch's
    generator (seeded 42), the second's after the first's; ours the same draws from the stream at
    offsets 0 and 1,000,000: the thresholds equal, the elements mergekit's but 13 of 1.2M (an
    importance at the threshold rounded otherwise, see the module docstring) in the second."""
    gen = torch.Generator().manual_seed(1)
    bases = [(torch.randn(1200, 1000, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(2)]
    xs = [(b.float() + 0.02 * torch.randn(1200, 1000, generator=gen)).to(torch.bfloat16) for b in bases]
    torch.manual_seed(42)
    assert _differing(tmp_path, bases[0], xs[0], 42, 0) == 0
    assert _differing(tmp_path, bases[1], xs[1], 42, 1_000_000) <= 20


def _config(p: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {"merge_method": "arcee_fusion", "base_model": str(p["base"]), "models": [{"model": str(p["ft0"])}],
            **extra}


#: arcee_fusion's cases: bitwise mergekit's on one thread (its result is float32, as mergekit
#: writes it, unless out_dtype says otherwise).
FUSION_CASES = {
    "arcee_fusion": lambda p: _config(p),
    "arcee_fusion-bf16": lambda p: _config(p, dtype="bfloat16"),
    "arcee_fusion-f16-to-bf16": lambda p: _config(p, dtype="float16", out_dtype="bfloat16"),
}


models = family_fixture(("ft0", "ft1"))


@pytest.mark.parametrize("door", ["yaml", "toml"])
@pytest.mark.parametrize("case", sorted(FUSION_CASES))
def test_arcee_fusion_equals_mergekit(capsys, tmp_path, models, case, door):
    config = FUSION_CASES[case](models)
    theirs = single_thread_mergekit(config, tmp_path / "mergekit")
    equals_mergekit(capsys, tmp_path, config, door, theirs, case)


def _threshold_flips(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], paths: dict[str, Path],
                     dtype: torch.dtype) -> int:
    """The elements that differ, each checked to be the base's value in one output and the
    model's (``base + (x - base)``, the difference in the merge ``dtype``) in the other (an
    importance at the threshold)."""
    base, model = read_all(paths["base"]), read_all(paths["ft0"])
    assert theirs.keys() == ours.keys()
    differing = 0
    for key in sorted(theirs):
        a, b = theirs[key], ours[key]
        assert a.dtype == b.dtype == torch.float32, key
        d = a.view(torch.int32) != b.view(torch.int32)
        differing += int(d.sum())
        kept = base[key].float() + (model[key].to(dtype) - base[key].to(dtype)).float()
        choices = torch.stack([base[key].float()[d], kept[d]])
        assert bool(((choices == a[d]).any(0) & (choices == b[d]).any(0)).all()), key
    return differing


def test_arcee_fusion_f32_is_mergekit_but_at_the_threshold(capsys, tmp_path, models):
    """dtype float32: measured 1 element of 83,376 differs (its importance at the threshold)."""
    config = _config(models, dtype="float32")
    theirs = read_all(single_thread_mergekit(config, tmp_path / "mergekit"))
    assert run(capsys, "apply", _yaml(tmp_path, config), "--output", tmp_path / "ours", "--no-progress")[0] == 0
    assert _threshold_flips(theirs, read_all(tmp_path / "ours"), models, torch.float32) <= 5


def test_arcee_fusion_is_reproducible_and_verified(capsys, tmp_path, models):
    """The same bytes on 1 and 3 threads; verify catches one changed byte in both modes."""
    manifest = _yaml(tmp_path, FUSION_CASES["arcee_fusion"](models))
    t3 = same_bytes_on_threads(capsys, tmp_path, manifest)
    flipped_byte_found(capsys, manifest, t3, "arcee_fusion")


def test_arcee_fusion_refusals(capsys, tmp_path, models):
    out = tmp_path / "out"
    for config, expected in (
        ({"merge_method": "arcee_fusion", "models": [{"model": str(models["ft0"])}]},
         "base_model: missing; arcee_fusion adds"),
        ({"merge_method": "arcee_fusion", "base_model": str(models["base"]),
          "models": [{"model": str(models["ft0"])}, {"model": str(models["ft1"])}]},
         "2 models besides the base; arcee_fusion interpolates the base towards exactly 1"),
    ):
        message = error_line(*run(capsys, "apply", _yaml(tmp_path, config), "--output", out))
        assert expected in message, message
        assert not out.exists()


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict[str, Path]:
    """A one-layer model of 24,000 tokens (its embeddings and lm_head of 1.15M elements each: both
    sampled) and a fine-tune of it, bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide")
    config = LlamaConfig(vocab_size=24000, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    base.save_pretrained(root / "ft0")
    return {"base": root / "base", "ft0": root / "ft0"}


def test_arcee_fusion_seeded_sampling_equals_mergekit(capsys, tmp_path, wide):
    """mergekit with --random-seed 42 draws the samples of lm_head's importances, then the
    embeddings' (the tensors in their names' order); ours with the same seed: the unsampled tensors
    bitwise, lm_head but 4 and the embeddings but 5 of 1,152,000 elements (at the threshold, as
    the module docstring says; drawn from the wrong place of the stream, the quartiles and so
    thousands of elements would move); without a seed, one line."""
    from test_merge_dare import mergekit as seeded_mergekit

    config = _config(wide)
    theirs = seeded_mergekit(config, tmp_path / "mergekit", 42)
    manifest = _yaml(tmp_path, config)
    code, out, err = run(capsys, "apply", manifest, "--output", tmp_path / "ours", "--random-seed", 42,
                         "--no-progress")
    assert code == 0, out + err
    mine = read_all(tmp_path / "ours")
    assert _threshold_flips(read_all(theirs), mine, wide, torch.bfloat16) <= 20
    message = error_line(*run(capsys, "apply", manifest, "--output", tmp_path / "unseeded"))
    assert "arcee_fusion takes the quartiles of tensor 'lm_head.weight' (1,152,000 elements) from 1,000,000 " \
           "importances drawn at random and needs a seed" in message, message
    assert not (tmp_path / "unseeded").exists()

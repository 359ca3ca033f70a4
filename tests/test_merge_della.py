"""DELLA merges (issue 19): mergekit's ``della`` and ``della_linear``, through both front doors,
bitwise equal to mergekit 0.1.5 run with one torch thread, the same seed and its ``torch.argsort``
made stable (equal magnitudes ranked in index order).

The models are test_merge_dare's: a tiny random Llama of 12 layers (mergekit's order of tensors by
name, ``layers.10`` before ``layers.2``, is not the output's) and three fine-tunes of it, bf16 and
f32. The kernel is checked on its own against mergekit's ``della_magprune`` on tensors of many
chunks whose magnitudes tie massively, and its probability table against torch's arithmetic.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from test_merge_dare import FINE_TUNES, _family, _manifest, _models, mergekit, one_thread
from test_merges import _raw, assert_bitwise_equal, config_differences, read_all, stable_argsort
from torch_helpers import no_network
from transformers import AutoModelForCausalLM

from cli_helpers import differences, error_line, run

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def offline():
    with no_network("a DELLA test"):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("della-models")
    return {"bf16": _family(root / "bf16", FINE_TUNES, layers=12),
            "f32": _family(root / "f32", FINE_TUNES, layers=12, dtype=torch.float32)}


#: Every parameter form: a per-model epsilon, a density gradient, filtered densities, an epsilon
#: gradient (the default epsilon, 0.15, where none is given).
GRADIENT = [{"weight": 0.5, "density": 0.6, "epsilon": 0.1}, {"weight": 0.3, "density": [0.2, 0.8, 0.5]},
            {"weight": 0.7, "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.45}],
             "epsilon": [0.05, 0.2]}]


def _config(method: str, paths: dict[str, Path], models: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"merge_method": method, "base_model": str(paths["base"]), **extra, "models": _models(paths, models)}


#: case -> (models' dtype, seed, config without the models' paths)
CASES = {
    "della-bf16": ("bf16", 7, lambda p: _config("della", p, GRADIENT)),
    "della_linear-bf16-seed2": ("bf16", 12345, lambda p: _config("della_linear", p, GRADIENT)),
    "della-f32": ("f32", 7, lambda p: _config("della", p, GRADIENT, parameters={"epsilon": 0.12})),
    "della_linear-f32-normalize-lambda": ("f32", 3, lambda p: _config(
        "della_linear", p, GRADIENT, parameters={"normalize": True, "lambda": 1.3})),
    "della-f16-unnormalized-lambda-negative-density-0-1": ("bf16", 3, lambda p: _config(
        "della", p, [{"weight": 0.5, "density": 1.0}, {"weight": -0.3, "density": 0.5, "epsilon": 0.4},
                     {"weight": 0.7, "density": 0.0}],
        dtype="float16", out_dtype="bfloat16", parameters={"normalize": False, "lambda": 0.7})),
    "della_linear-no-rescale": ("bf16", 5, lambda p: _config("della_linear", p, GRADIENT,
                                                             parameters={"rescale": False})),
}


def mergekit_stable(config: dict[str, Any], out: Path, seed: int) -> Path:
    """mergekit's merge (one torch thread, seeded) with its argsort made stable."""
    with stable_argsort():
        return mergekit(config, out, seed)


@pytest.fixture(scope="module")
def references(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("della-mergekit")
    return {case: mergekit_stable(make(models[dtype]), root / case, seed)
            for case, (dtype, seed, make) in CASES.items()}


@pytest.mark.parametrize("door", ["yaml", "toml"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_della_equals_mergekit(capsys, tmp_path, models, references, case, door):
    dtype, seed, make = CASES[case]
    ours = tmp_path / "ours"
    manifest, seeded = _manifest(tmp_path, make(models[dtype]), door, ours, seed)
    code, out, err = run(capsys, "apply", manifest, "--output", ours, "--no-progress", *seeded)
    assert code == 0, out + err
    assert_bitwise_equal(read_all(references[case]), read_all(ours))
    assert config_differences(references[case], ours) == {}
    code, out, err = run(capsys, "verify", manifest, ours, "--no-progress", *seeded)
    assert code == 0 and "every byte matches" in out, out + err


def test_threads_record_verify_and_load(capsys, tmp_path, models, references):
    """The bytes do not depend on --threads; the record holds the seed and the epsilons; verify
    finds one flipped byte (with the manifest, and from the record alone); transformers loads the
    output and computes mergekit's logits."""
    dtype, seed, make = CASES["della-bf16"]
    manifest, seeded = _manifest(tmp_path, make(models[dtype]), "yaml", tmp_path / "unused", seed)
    outputs = []
    for threads in (1, 3):
        out = tmp_path / f"t{threads}"
        assert run(capsys, "apply", manifest, "--output", out, "--threads", threads, "--no-progress", *seeded)[0] == 0
        outputs.append(read_all(out))
    assert_bitwise_equal(*outputs)
    ours = tmp_path / "t3"
    record = json.loads((ours / "tensorsurgery.json").read_text())
    assert record["merge"]["seed"] == seed and record["merge"]["method"] == "della"
    q = record["tensors"]["model.layers.2.self_attn.q_proj.weight"]["operation"]
    assert q["name"] == "della" and q["seed"] == seed and q["ties"] and q["offset"] > 0
    assert q["epsilons"] == [0.1, 0.15, pytest.approx(0.05 + 0.15 * 2 / 11)]
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(f).eval()(ids).logits for f in (ours, references["della-bf16"])]
    assert torch.equal(*logits)
    shard = ours / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1000] ^= 1
    shard.write_bytes(bytes(data))
    for argv in (("verify", manifest, ours, *seeded), ("verify", ours)):
        found = differences(*run(capsys, *argv, "--no-progress"))
        assert len(found) == 1 and "(transform: della)" in found[0], found
    found = differences(*run(capsys, "verify", manifest, tmp_path / "t1", "--random-seed", seed + 1, "--no-progress"))
    assert len(found) > 10  # another seed is another output


def test_refusals_are_one_line(capsys, tmp_path, models):
    paths = models["bf16"]
    out = tmp_path / "out"
    manifest, _ = _manifest(tmp_path, _config("della", paths, GRADIENT), "yaml", out, 1)
    message = error_line(*run(capsys, "apply", manifest, "--output", out))
    assert "della keeps random parts of each delta and needs a seed: set seed = N in [merge]" in message, message
    bad = _config("della_linear", paths, [{"weight": 1, "density": 0.9}, *GRADIENT[1:]])  # 0.9 + 0.15 >= 1
    manifest, _ = _manifest(tmp_path, bad, "yaml", out, 1)
    message = error_line(*run(capsys, "apply", manifest, "--output", out, "--random-seed", 1))
    assert "merge: tensor 'lm_head.weight': model 'ft0': density 0.9 and epsilon 0.15: density - epsilon and " \
           "density + epsilon must lie in (0, 1), as mergekit's della requires; lower epsilon" in message, message
    with pytest.raises(ValueError, match="epsilon"):  # mergekit refuses them too
        mergekit_stable(bad, tmp_path / "theirs", 1)
    assert not out.exists()


def test_shapes_mergekit_cannot_rank_are_refused():
    from tensorsurgery.manifest.merges import MergeModel, MergeSpec, Resolved
    from tensorsurgery.planning.della import della_operation

    spec = MergeSpec("della", (MergeModel("a", {}),), "base", {}, seed=1)
    values = Resolved({"normalize": True, "rescale": True, "lambda": 1.0},
                      ({"weight": 1.0, "density": 0.5, "epsilon": 0.1},))
    assert della_operation(spec, values, "BF16", 0, (3, 4)).epsilons == (0.1,)
    with pytest.raises(ValueError, match=r"shape \[2, 3, 4\]: della of a tensor of 3 dimensions"):
        della_operation(spec, values, "BF16", 0, (2, 3, 4))
    with pytest.raises(ValueError, match=r"shape \[5, 1\]: rows of one element"):
        della_operation(spec, values, "BF16", 0, (5, 1))
    dense = Resolved(values.shared, ({"weight": 1.0, "density": 1.0, "epsilon": 0.1},))
    assert della_operation(spec, dense, "BF16", 0, (2, 3, 4)).densities == (1.0,)  # nothing to rank


@pytest.mark.parametrize("wd", [torch.bfloat16, torch.float32])
def test_probability_table_is_torchs_arithmetic(wd):
    """mergekit's rank -> probability steps in torch, for every rank of rows of many lengths."""
    from tensorsurgery.ops.della_kernel import probability_table
    from tensorsurgery.ops.mt_stream import keep_threshold

    rng = np.random.default_rng(1)
    pairs = [(0.5, 0.15), (0.123, 0.0777), (0.9, 0.0999)]
    pairs += [(float(d), float(d * f * min(1 - d, d) / d)) for d, f in zip(rng.uniform(0.05, 0.95, 12),
                                                                         rng.uniform(0.01, 0.99, 12))]
    for columns in (2, 3, 48, 255, 256, 257, 896, 4864, 65539):
        ranks = (torch.arange(columns).to(wd) + 1)[None]
        low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
        norm = ((ranks - low) / (high - low)).clamp(0, 1)
        for d, e in pairs:
            probs = ((d - e) + norm * 2 * e)[0].float().numpy()
            expected = [keep_threshold(p) for p in probs]
            assert np.array_equal(probability_table(columns, d, e, "BF16" if wd == torch.bfloat16 else "F32"),
                                  expected), (columns, d, e)


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (3, 70001)), (torch.float16, (2000, 48)),
                                         (torch.float32, (150001,))])
def test_kernel_on_tensors_of_many_chunks(tmp_path, dtype, shape, ties):
    """Both passes on tensors of several chunks (rows longer than a chunk, many rows a chunk, one
    long row), whose differences tie massively (a coarse grid), with zero differences: bitwise
    mergekit's della_magprune (its argsort stable), rescale and sums, drawn from one seed."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import RescaleNorm, della_magprune

    from tensorsurgery.io.byte_source import LocalFile
    from tensorsurgery.ops import Della
    from tensorsurgery.ops.base import ByteRange, Input

    code = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=gen).to(dtype)
    xs = [base + (torch.randint(-6, 7, shape, generator=gen) / 64).to(dtype) for _ in range(3)]
    xs[1].view(-1)[::97] = base.view(-1)[::97]
    path = tmp_path / "x.bin"
    path.write_bytes(b"".join(_raw(x).tobytes() for x in (base, *xs)))
    size = base.numel() * base.element_size()
    inputs = tuple(Input("s", "k", code, shape, ByteRange(LocalFile(path), i * size, size)) for i in range(4))
    weights, densities, epsilons, lam = (0.7, 0.4, -0.3), (0.31, 0.5, 1.0), (0.2, 0.05, 0.1), 0.8
    torch.manual_seed(11)
    with stable_argsort(), one_thread():
        torch.bernoulli(torch.full((1000,), 0.5))  # 1000 draws before this tensor's: its offset
        deltas = torch.stack([della_magprune(x - base, d, e, RescaleNorm.l1)
                              for x, d, e in zip(xs, densities, epsilons)])
    w = torch.tensor(weights, dtype=dtype).view(-1, *[1] * len(shape))
    deltas.mul_(w)
    if ties:
        mask = get_mask(deltas, method="sum", mask_dtype=dtype)
        mixed, divisor = (deltas * mask).sum(dim=0), (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(dim=0), w.sum(dim=0)
    expected = _raw((base + mixed / divisor * lam).to(dtype))
    op = Della(weights, densities, epsilons, True, True, lam, ties, code, 11, 1000)
    reader = LocalFile(path).open()
    try:
        ours = np.concatenate(list(op.chunks(inputs, [reader] * 4, 1 << 20)))
    finally:
        reader.close()
    assert (ours != expected).sum() == 0


@pytest.mark.parametrize("case", ["della-bf16", "della-f32"])
def test_stock_mergekit_differs_only_where_magnitudes_tie(capsys, tmp_path, models, references, case):
    """Against stock mergekit (torch's argsort, unstable) a tensor differs only where some delta's
    magnitude repeats within a row: there torch ranks the equal ones in its own order, and so
    draws against other probabilities (the rescale factor spreads that over the tensor). bf16
    deltas repeat in every tensor of these models; float32 ones in few."""
    dtype, seed, make = CASES[case]
    theirs = read_all(mergekit(make(models[dtype]), tmp_path / "stock", seed))
    ours = read_all(references[case])
    sources = [read_all(models[dtype][n]) for n in ("base", *FINE_TUNES)]
    differing = tied = 0
    bits = torch.int16 if dtype == "bf16" else torch.int32
    for key in sorted(theirs):
        base = sources[0][key]
        rows = base.reshape(-1, base.shape[-1]) if base.dim() == 2 else base.reshape(1, -1)
        repeats = False
        for source in sources[1:]:
            s = (source[key].reshape(rows.shape) - rows).abs().sort(dim=1).values
            repeats |= bool((s[:, 1:] == s[:, :-1]).any())
        differ = int((theirs[key].view(bits) != ours[key].view(bits)).sum())
        assert repeats or not differ, key
        differing, tied = differing + differ, tied + repeats
    if dtype == "bf16":
        assert differing > 0  # torch orders some equal magnitudes otherwise than a stable sort
    else:
        assert tied < len(theirs) // 2


def test_yaml_spelling(tmp_path, models):
    """The mergekit YAML as users write it plans as the TOML does (the door reads epsilon)."""
    from tensorsurgery import api

    dtype, seed, make = CASES["della-bf16"]
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump(make(models[dtype]), sort_keys=False))
    plan = api.plan(path, output=tmp_path / "out", seed=seed)
    assert plan.merge is not None and plan.merge.method == "della" and plan.merge.seed == seed

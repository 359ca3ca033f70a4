"""DARE merges (issue 19): mergekit's ``dare_linear`` and ``dare_ties``, through both front doors,
bitwise equal to stock mergekit 0.1.5 run with one torch thread and the same seed.

The models are a tiny random Llama of 12 layers (so that mergekit's order of tensors by name,
``layers.10`` before ``layers.2``, is not the output's order) and three fine-tunes of it, bf16
and f32. mergekit runs in this process through its API with torch on one thread (its
``--num-threads 1``; the CLI's own ``set_num_interop_threads`` cannot run twice in a process), and
once as the stock ``mergekit-yaml`` command. The kernels (torch's sum order, torch's random
stream) are checked against torch itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import yaml
from test_merges import assert_bitwise_equal, config_differences, read_all, toml_manifest
from torch_helpers import no_network
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from cli_helpers import differences, error_line, run

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")

FINE_TUNES = ("ft0", "ft1", "ft2")


@pytest.fixture(scope="module", autouse=True)
def offline():
    with no_network("a DARE test"):
        yield


def _family(root: Path, names: tuple[str, ...], *, layers: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """A base and fine-tunes of it (the base's weights plus noise), in several shards."""
    config = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(dtype)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"], max_shard_size="40KB")
    for i, name in enumerate(names):
        torch.manual_seed(i + 1)
        model = LlamaForCausalLM(config).to(dtype)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        paths[name] = root / name
        model.save_pretrained(paths[name], max_shard_size="40KB")
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("dare-models")
    return {"bf16": _family(root / "bf16", FINE_TUNES, layers=12),
            "f32": _family(root / "f32", FINE_TUNES, layers=12, dtype=torch.float32)}


@contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mergekit(config: dict[str, Any], out: Path, seed: int) -> Path:
    """Stock mergekit 0.1.5's merge of ``config`` on the CPU, torch on one thread, seeded."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    with one_thread():
        run_merge(MergeConfiguration.model_validate(config), str(out), options=MergeOptions(
            device="cpu", copy_tokenizer=False, write_model_card=False, lazy_unpickle=False, clone_tensors=True,
            quiet=True, random_seed=seed))
    return out


def _models(paths: dict[str, Path], parameters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"model": str(paths[name]), "parameters": p} for name, p in zip(FINE_TUNES, parameters)]


GRADIENT = [{"weight": 0.5, "density": 0.6}, {"weight": 0.3, "density": [0.2, 0.9, 0.5]},
            {"weight": 0.7, "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.45}]}]
#: case -> (models' dtype, seed, config without the models' paths)
CASES = {
    "dare_linear-bf16": ("bf16", 7, lambda p: {"merge_method": "dare_linear", "base_model": str(p["base"]),
                                               "models": _models(p, GRADIENT)}),
    "dare_linear-f32-seed2": ("f32", 12345, lambda p: {"merge_method": "dare_linear", "base_model": str(p["base"]),
                                                       "models": _models(p, GRADIENT)}),
    "dare_ties-bf16-seed2": ("bf16", 12345, lambda p: {"merge_method": "dare_ties", "base_model": str(p["base"]),
                                                       "models": _models(p, GRADIENT)}),
    "dare_ties-f32": ("f32", 7, lambda p: {"merge_method": "dare_ties", "base_model": str(p["base"]),
                                           "models": _models(p, GRADIENT)}),
    "dare_ties-f16-normalize-lambda-negative": ("bf16", 3, lambda p: {
        "merge_method": "dare_ties", "base_model": str(p["base"]), "dtype": "float16", "out_dtype": "bfloat16",
        "parameters": {"normalize": True, "lambda": 0.7},
        "models": _models(p, [{"weight": 0.5, "density": 1.0}, {"weight": -0.3, "density": 0.5},
                              {"weight": 0.7, "density": 0.0}])}),
    "dare_linear-no-rescale-normalize": ("bf16", 5, lambda p: {
        "merge_method": "dare_linear", "base_model": str(p["base"]),
        "parameters": {"rescale": False, "normalize": True},
        "models": _models(p, GRADIENT)}),
}


@pytest.fixture(scope="module")
def references(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dare-mergekit")
    return {case: mergekit(make(models[dtype]), root / case, seed) for case, (dtype, seed, make) in CASES.items()}


def _manifest(tmp_path: Path, config: dict[str, Any], door: str, output: Path, seed: int) -> tuple[Path, list]:
    """The manifest of ``config`` and the arguments that give it its seed."""
    if door == "yaml":
        path = tmp_path / "m.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path, ["--random-seed", seed]
    path = tmp_path / "m.toml"
    path.write_text(toml_manifest(config, output).replace("[merge]\n", f"[merge]\nseed = {seed}\n"))
    return path, []


@pytest.mark.parametrize("door", ["yaml", "toml"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_dare_equals_mergekit(capsys, tmp_path, models, references, case, door):
    dtype, seed, make = CASES[case]
    ours = tmp_path / "ours"
    manifest, seeded = _manifest(tmp_path, make(models[dtype]), door, ours, seed)
    code, out, err = run(capsys, "apply", manifest, "--output", ours, "--no-progress", *seeded)
    assert code == 0, out + err
    assert_bitwise_equal(read_all(references[case]), read_all(ours))
    assert config_differences(references[case], ours) == {}
    code, out, err = run(capsys, "verify", manifest, ours, "--no-progress", *seeded)
    assert code == 0 and "every byte matches" in out, out + err


def test_stock_mergekit_command_line(tmp_path, models, references):
    """The stock command line, as the issue runs it, gives the bytes the API run gave."""
    dtype, seed, make = CASES["dare_ties-bf16-seed2"]
    config = tmp_path / "m.yml"
    config.write_text(yaml.safe_dump(make(models[dtype]), sort_keys=False))
    out = tmp_path / "stock"
    cli = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(cli), str(config), str(out), "--device", "cpu", "--no-copy-tokenizer",
                    "--no-write-model-card", "--quiet", "--random-seed", str(seed), "--num-threads", "1"],
                   check=True, capture_output=True, timeout=300)
    assert_bitwise_equal(read_all(references["dare_ties-bf16-seed2"]), read_all(out))


def test_threads_record_verify_and_load(capsys, tmp_path, models, references):
    """The bytes do not depend on --threads; verify (with the manifest and the seed, or the output
    alone: its record holds the seed) finds one flipped byte; transformers loads the output and
    computes mergekit's logits."""
    dtype, seed, make = CASES["dare_ties-bf16-seed2"]
    manifest, seeded = _manifest(tmp_path, make(models[dtype]), "yaml", tmp_path / "unused", seed)
    outputs = []
    for threads in (1, 3):
        out = tmp_path / f"t{threads}"
        assert run(capsys, "apply", manifest, "--output", out, "--threads", threads, "--no-progress", *seeded)[0] == 0
        outputs.append(read_all(out))
    assert_bitwise_equal(*outputs)
    ours = tmp_path / "t3"
    record = json.loads((ours / "tensorsurgery.json").read_text())
    assert record["merge"]["seed"] == seed and record["merge"]["method"] == "dare_ties"
    q = record["tensors"]["model.layers.2.self_attn.q_proj.weight"]["operation"]
    assert q["name"] == "dare" and q["seed"] == seed and q["ties"] and q["offset"] > 0
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(f).eval()(ids).logits
                  for f in (ours, references["dare_ties-bf16-seed2"])]
    assert torch.equal(*logits)
    shard = ours / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1000] ^= 1
    shard.write_bytes(bytes(data))
    for argv in (("verify", manifest, ours, *seeded), ("verify", ours)):
        found = differences(*run(capsys, *argv, "--no-progress"))
        assert len(found) == 1 and "(transform: dare)" in found[0], found
    # another seed is another output
    found = differences(*run(capsys, "verify", manifest, tmp_path / "t1", "--random-seed", seed + 1, "--no-progress"))
    assert len(found) > 10


def test_refusals_are_one_line(capsys, tmp_path, models):
    paths = models["bf16"]
    out = tmp_path / "out"
    config = {"merge_method": "dare_linear", "base_model": str(paths["base"]), "models": _models(paths, GRADIENT)}
    manifest, _ = _manifest(tmp_path, config, "yaml", out, 1)
    message = error_line(*run(capsys, "apply", manifest, "--output", out))
    assert "dare_linear keeps random parts of each delta and needs a seed: set seed = N in [merge], or give " \
           "--random-seed N" in message, message
    message = error_line(*run(capsys, "apply", manifest, "--output", out, "--random-seed", -1))
    assert "--random-seed: expected an integer from 0 to 4294967295" in message, message
    bad = {**config, "models": _models(paths, [{"weight": 1, "density": -0.5}, *GRADIENT[1:]])}
    manifest, _ = _manifest(tmp_path, bad, "yaml", out, 1)
    message = error_line(*run(capsys, "apply", manifest, "--output", out, "--random-seed", 1))
    assert "density -0.5 is below 0" in message, message
    toml = tmp_path / "m.toml"
    toml.write_text(toml_manifest(config, out).replace("[merge]\n", "[merge]\nseed = \"x\"\n"))
    message = error_line(*run(capsys, "apply", toml))
    assert "merge.seed: expected an integer from 0 to 4294967295" in message, message
    assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sums_are_torchs_one_thread_sums(dtype):
    """``tensor.sum()`` and ``tensor.sum(dim=0)`` in torch's order, fed in chunks, on sizes around
    every vector, row and level boundary."""
    from tensorsurgery.ops.torch_sums import CascadeSum, model_sum

    code = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    rng = np.random.default_rng(0)
    sizes = [1, 3, 15, 16, 17, 31, 33, 100, 3840, 4097, 65613, 300001, (1 << 22) + 5]
    sizes += [int(x) for x in rng.integers(1, 200000, 20)]
    with one_thread():
        for n in sizes:
            x = torch.from_numpy(np.abs(rng.standard_normal(n)).astype(np.float32)).to(dtype)
            total = CascadeSum(n, code)
            values = x.float().numpy()
            for start in range(0, n, total.unit * 3):
                total.add(values[start:start + total.unit * 3])
            assert torch.equal(torch.tensor(total.value()).to(dtype), x.sum()), n
        vector = 8 if dtype == torch.float32 else 16
        for m in (1, 2, 3, 4, 5, 8, 17):
            for n in (3, 15, 17, 48, 63, 3853):
                x = torch.from_numpy(rng.standard_normal((m, n)).astype(np.float32)).to(dtype)
                terms = [t.float().numpy() for t in x]
                ours = np.concatenate([model_sum([t[a:a + 7] for t in terms], a, n, vector) for a in range(0, n, 7)])
                assert torch.equal(torch.from_numpy(ours).to(dtype), x.sum(dim=0)), (m, n)


def test_stream_is_torchs_bernoulli_from_anywhere():
    """numpy's legacy-seeded MT19937 draws torch.bernoulli's masks, and a stream taken up at any
    offset (from the seed, or from a remembered state) continues the same sequence."""
    from tensorsurgery.ops.mt_stream import Stream, keep_threshold

    torch.manual_seed(99)
    masks = [torch.bernoulli(torch.full((n,), p, dtype=dt)).float().numpy().astype(bool)
             for n, p, dt in ((1000, 0.3, torch.bfloat16), (777, 0.7, torch.float32), (5, 1 / 3, torch.float32))]
    stream = Stream(99, 0)
    for (mask, p) in zip(masks, (torch.tensor(0.3, dtype=torch.bfloat16).item(), 0.7, 1 / 3)):
        assert np.array_equal(stream.low24(mask.size) < keep_threshold(np.float32(p)), mask)
    whole = Stream(5, 0).low24(3000)
    for offset in (0, 1, 999, 2000, 1500):
        assert np.array_equal(Stream(5, offset).low24(1000), whole[offset:offset + 1000])
    later = Stream(5, 1200)
    later.remember()
    assert np.array_equal(Stream(5, 1700).low24(10), whole[1700:1710])


def test_resume_keeps_the_shards_that_verify(capsys, tmp_path, models):
    """An interrupted run's finished shards are checked by making their tensors again (in the
    output's order, from a fresh table of generator states): a good one is kept, a damaged one
    made again, and the output is the uninterrupted one."""
    from tensorsurgery.ops import mt_stream
    from tensorsurgery.output.target import TMP_MARKER, temp_path

    dtype, seed, make = CASES["dare_linear-bf16"]
    whole = tmp_path / "whole"
    manifest, _ = _manifest(tmp_path, make(models[dtype]), "toml", whole, seed)
    manifest.write_text(manifest.read_text().replace("[output]\n", '[output]\nmax_shard_size = "100KB"\n'))
    assert run(capsys, "apply", manifest, "--no-progress")[0] == 0
    shards = sorted(whole.glob("model-*.safetensors"))
    assert len(shards) >= 3
    out = tmp_path / "resumed"
    tmp = temp_path(out)
    tmp.mkdir()
    (tmp / TMP_MARKER).write_text("")
    (tmp / shards[2].name).write_bytes(shards[2].read_bytes())  # a shard late in the stream
    damaged = bytearray(shards[0].read_bytes())
    damaged[-10] ^= 1
    (tmp / shards[0].name).write_bytes(bytes(damaged))
    mt_stream._states.clear()
    code, out_text, err = run(capsys, "apply", manifest, "--output", out, "--resume", "--no-progress")
    assert code == 0, out_text + err
    assert f"--resume: kept 1 of {len(shards)} shard(s)" in out_text + err
    assert_bitwise_equal(read_all(whole), read_all(out))

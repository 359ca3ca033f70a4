"""Merges of parts of models (mergekit's ``slices`` with a merge method, a "merged frankenmerge"):
each slice merges a layer range of each of its sources, slices stack, gradients run over the layers
of their slice, the embeddings come from the first slice's sources and the final norm and lm_head
from the last's. Compared with stock mergekit 0.1.5 run on the same config (ties with a stable
argsort, slerp by its tolerance rule), through both front doors.

The models are test_merges' tiny random Llama family with 6 layers, so that ranges differ.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_merges import (
    _family,
    _toml_value,
    _ulps,
    assert_bitwise_equal,
    config_differences,
    mergekit,
    read_all,
    stable_argsort,
)
from torch_helpers import no_network

from cli_helpers import differences, error_line, run

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def offline():
    with no_network("a merge test"):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return _family(tmp_path_factory.mktemp("models"), ("ft0", "ft1", "ft2"), layers=6)


def _src(p: dict[str, Path], name: str, a: int, b: int, **parameters: Any) -> dict[str, Any]:
    return {"model": str(p[name]), "layer_range": [a, b], **({"parameters": parameters} if parameters else {})}


FILTERED = [{"filter": "self_attn", "value": 0.7}, {"filter": "mlp", "value": 0.1}, {"value": 0.4}]

#: (case, config): three slices of different ranges, gradients within slices, every precedence level.
CASES = {
    # the last slice has one source: a linear merge of one model (mergekit computes it: x * w / w)
    "linear": lambda p: {"merge_method": "linear", "parameters": {"weight": 0.25}, "slices": [
        {"sources": [_src(p, "ft0", 0, 2, weight=0.3), _src(p, "ft1", 2, 4, weight=[0.1, 0.9])]},
        {"sources": [_src(p, "ft2", 1, 4, weight=[0.2, 0.9, 0.5]), _src(p, "ft0", 3, 6),
                     _src(p, "ft1", 0, 3, weight=FILTERED)], "parameters": {"weight": 0.6, "normalize": False}},
        {"sources": [_src(p, "ft1", 5, 6, weight=0.8)]}]},
    "linear-f32-to-f16": lambda p: {"merge_method": "linear", "dtype": "float32", "out_dtype": "float16", "slices": [
        {"sources": [_src(p, "ft2", 2, 6, weight=1), _src(p, "ft0", 0, 4, weight=2)]},
        {"sources": [_src(p, "ft1", 1, 3, weight=[1, 3]), _src(p, "ft2", 4, 6, weight=1)]}]},
    # the last slice is the base alone: the task-arithmetic family returns it
    "ties": lambda p: {"merge_method": "ties", "base_model": str(p["base"]), "dtype": "bfloat16",
                       "parameters": {"lambda": 0.9, "density": 0.5}, "slices": [
        {"sources": [_src(p, "base", 0, 3), _src(p, "ft0", 0, 3, weight=0.7, density=[0.3, 0.9]),
                     _src(p, "ft1", 1, 4, weight=0.4)], "parameters": {"density": 0.6}},
        {"sources": [_src(p, "ft2", 2, 6, weight=[1, 0.2], density=[{"filter": "mlp", "value": 0.2}]),
                     _src(p, "base", 1, 5), _src(p, "ft0", 2, 6, weight=-0.3)],
         "parameters": {"lambda": 1.2}},
        {"sources": [_src(p, "base", 4, 6)]}]},
    "ties-f16": lambda p: {"merge_method": "ties", "base_model": str(p["base"]), "dtype": "float16", "slices": [
        {"sources": [_src(p, "base", 0, 4), _src(p, "ft1", 0, 4, weight=0.5, density=0.3),
                     _src(p, "ft2", 2, 6, weight=0.5, density=0.7)]},
        {"sources": [_src(p, "base", 2, 4), _src(p, "ft0", 4, 6, weight=1, density=0.5)]}]},
}

SLERP_CASES = {
    "slerp": lambda p: {"merge_method": "slerp", "base_model": str(p["base"]), "dtype": "bfloat16",
                        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]},
                        "slices": [
        {"sources": [_src(p, "base", 0, 3), _src(p, "ft1", 0, 3)], "parameters": {"t": [0.1, 0.9]}},
        {"sources": [_src(p, "ft0", 1, 5), _src(p, "base", 2, 6)]},
        {"sources": [_src(p, "base", 5, 6), _src(p, "ft2", 3, 4)]}]},
}


def toml_manifest(config: dict[str, Any], output: Path) -> str:
    """The ``[merge]`` TOML manifest with ``[[merge.slices]]`` that says what the mergekit ``config`` says."""
    base = config.get("base_model")
    order = list(dict.fromkeys(([base] if base else []) + [s["model"] for part in config["slices"]
                                                             for s in part["sources"]]))
    name = {m: Path(m).name for m in order}
    lines = [f'[sources.{name[m]}]\nmodel = "{m}"' for m in order]
    lines.append(f'[merge]\nmethod = "{config["merge_method"]}"')
    if base:
        lines.append(f'base = "{name[base]}"')
    if "dtype" in config:
        lines.append(f'dtype = "{config["dtype"]}"')
    if config.get("parameters"):
        lines.append(f"parameters = {_toml_value(config['parameters'])}")
    for part in config["slices"]:
        lines.append("[[merge.slices]]")
        if part.get("parameters"):
            lines.append(f"parameters = {_toml_value(part['parameters'])}")
        lines.append("sources = [" + ", ".join(_toml_value(
            {"source": name[s["model"]], "layers": s["layer_range"], **({"parameters": s["parameters"]}
                                                                         if "parameters" in s else {})})
            for s in part["sources"]) + "]")
    lines.append(f'[output]\npath = "{output}"' + (f'\ndtype = "{config["out_dtype"]}"' if "out_dtype" in config
                                                    else ""))
    return "\n".join(lines) + "\n"


def _manifest(tmp_path: Path, config: dict[str, Any], door: str = "yaml") -> Path:
    path = tmp_path / f"m.{'yml' if door == 'yaml' else 'toml'}"
    path.write_text(yaml.safe_dump(config, sort_keys=False) if door == "yaml"
                    else toml_manifest(config, tmp_path / "ours"))
    return path


def _apply(capsys, manifest: Path, out: Path, *argv: Any) -> None:
    code, stdout, err = run(capsys, "apply", manifest, "--output", out, "--no-progress", *argv)
    assert code == 0, stdout + err


@pytest.fixture(scope="module")
def references(models, tmp_path_factory) -> dict[str, Path]:
    """mergekit's output of every case (ties with a stable argsort), made once."""
    root = tmp_path_factory.mktemp("mergekit")
    with stable_argsort():
        return {case: mergekit(make(models), root / case) for case, make in {**CASES, **SLERP_CASES}.items()}


@pytest.mark.parametrize("door", ["yaml", "toml"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_slices_equal_mergekit(capsys, tmp_path, models, references, case, door):
    """linear bitwise stock mergekit's; ties bitwise mergekit's with a stable argsort."""
    config = CASES[case](models)
    theirs = references[case]
    manifest = _manifest(tmp_path, config, door)
    _apply(capsys, manifest, tmp_path / "ours")
    assert_bitwise_equal(read_all(theirs), read_all(tmp_path / "ours"))
    assert config_differences(theirs, tmp_path / "ours") == {}
    code, out, err = run(capsys, "verify", manifest, tmp_path / "ours", "--no-progress")
    assert code == 0 and "every byte matches" in out, out + err


@pytest.mark.parametrize("door", ["yaml", "toml"])
def test_slerp_slices_are_mergekit_to_a_unit(capsys, tmp_path, models, references, door):
    """slerp over slices, by test_merges' slerp rule: a tensor interpolated linearly (|cos| >
    0.9995) is bitwise mergekit's, the others at most one unit of the merge dtype off, in under
    0.1% of their elements. Each output layer is compared with the layers its slice merges."""
    config = SLERP_CASES["slerp"](models)
    theirs = read_all(references["slerp"])
    manifest = _manifest(tmp_path, config, door)
    _apply(capsys, manifest, tmp_path / "ours")
    ours, base, ft = read_all(tmp_path / "ours"), read_all(models["base"]), {
        n: read_all(models[n]) for n in ("ft0", "ft1", "ft2")}
    assert ours.keys() == theirs.keys()
    # output layer -> (base layer, other model, its layer)
    layers = [(0, "ft1", 0), (1, "ft1", 1), (2, "ft1", 2), (2, "ft0", 1), (3, "ft0", 2), (4, "ft0", 3),
              (5, "ft0", 4), (5, "ft2", 3)]
    linear = differing = elements = 0
    for key in sorted(theirs):
        a, b = theirs[key], ours[key]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), key
        parts = key.split(".")
        if parts[1] == "layers":
            i, other, j = layers[int(parts[2])]
            x = base[".".join([*parts[:2], str(i), *parts[3:]])]
            y = ft[other][".".join([*parts[:2], str(j), *parts[3:]])]
        else:
            x, y = base[key], ft["ft1" if "embed" in key else "ft2"][key]
        x, y = x.double().flatten(), y.double().flatten()
        ulps = _ulps(a, b)
        if abs(float(x @ y / (x.norm() * y.norm()))) > 0.9996:
            linear += 1
            assert int(ulps.max()) == 0, f"{key}: interpolated linearly, yet {int((ulps != 0).sum())} differ"
        else:
            assert int(ulps.max()) <= 1, f"{key}: {int(ulps.max())} units from mergekit's"
            differing += int((ulps != 0).sum())
            elements += a.numel()
    assert linear >= 13 and elements > 0  # the norms, and the rest
    assert differing <= elements / 1000, f"{differing} of {elements} elements differ"
    assert config_differences(references["slerp"], tmp_path / "ours") == {}
    code, out, err = run(capsys, "verify", manifest, tmp_path / "ours", "--no-progress")
    assert code == 0 and "every byte matches" in out, out + err


@pytest.mark.parametrize("case", ["ties", "slerp"])
def test_slices_do_not_depend_on_threads_and_verify_catches_a_flipped_byte(capsys, tmp_path, models, case):
    config = {**CASES, **SLERP_CASES}[case](models)
    manifest = _manifest(tmp_path, config)
    for threads in (1, 3):
        _apply(capsys, manifest, tmp_path / f"t{threads}", "--threads", threads)
    assert_bitwise_equal(read_all(tmp_path / "t1"), read_all(tmp_path / "t3"))
    # a byte of a merged layer (slice 1's), then one of a layer copied from the base alone (ties' slice 2)
    flipped = [("model.layers.4.mlp.up_proj.weight", case)] + ([("model.layers.8.mlp.up_proj.weight", "none")]
                                                              if case == "ties" else [])
    for name, transform in flipped:
        _flip(tmp_path / "t3" / "model.safetensors", name)
        for argv in (("verify", manifest, tmp_path / "t3"), ("verify", tmp_path / "t3")):
            found = differences(*run(capsys, *argv, "--no-progress"))
            assert len(found) == 1 and found[0].startswith(name) and f"(transform: {transform}" in found[0], found
        _flip(tmp_path / "t3" / "model.safetensors", name)


def _flip(shard: Path, name: str) -> None:
    """Flip one bit in the middle of tensor ``name`` of a safetensors file."""
    data = bytearray(shard.read_bytes())
    size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + size])[name]["data_offsets"]
    data[8 + size + (start + end) // 2] ^= 4
    shard.write_bytes(bytes(data))


def test_refusals_are_one_line_and_write_nothing(capsys, tmp_path, models):
    p = models
    ties = {"merge_method": "ties", "base_model": str(p["base"])}
    two = [_src(p, "base", 0, 2), _src(p, "ft0", 0, 2, weight=1)]
    cases = [
        ({**ties, "slices": [{"sources": [_src(p, "base", 0, 3), _src(p, "ft0", 0, 2, weight=1)]}]},
         "slices[0].sources[1].layer_range: 2 layers, but the slice's first source gives 3"),
        ({**ties, "slices": [{"sources": two}, {"sources": [_src(p, "ft0", 2, 4, weight=1)]}]},
         "slices[1].sources: no base model; ties merges each slice onto the base"),
        ({**ties, "slices": [{"sources": two}, {"sources": [_src(p, "base", 2, 4), _src(p, "ft1", 4, 7, weight=1)]}]},
         "slices[1].sources[1].layer_range: 3 layers"),
        ({**ties, "slices": [{"sources": two}, {"sources": [_src(p, "base", 3, 6), _src(p, "ft1", 4, 7, weight=1)]}]},
         "slices[1]: layers 4..6 of source 'ft1', which has 6 layers (0..5)"),
        ({**ties, "merge_method": "dare_ties", "slices": [{"sources": two}]},
         "slices: dare_ties over slices is not built yet"),
        ({**ties, "slices": [{"sources": two}, {"sources": [_src(p, "base", 2, 4), _src(p, "ft0", 2, 4, weight=1),
                                                            _src(p, "ft1", 2, 4, weight=1)]}]},
         "slices[1]: 3 sources, more than the first slice's 2: mergekit would merge the final norm and lm_head"),
        ({**ties, "merge_method": "slerp", "parameters": {"t": 0.5},
          "slices": [{"sources": two}, {"sources": [_src(p, "base", 2, 4)]}]},
         "slices[1].sources: 0 models besides the base; slerp needs at least 1"),
        ({**ties, "slices": [{"sources": [*two, _src(p, "ft0", 2, 4, weight=1)]}]},
         "slices[0].sources[2]: source 'ft0' is listed twice in the slice"),
        ({**ties, "slices": [{"sources": [_src(p, "base", 0, 2), _src(p, "ft0", 0, 2)]}]},
         "slices[0].sources[1]: missing weight; ties needs a weight for every model"),
        ({**ties, "merge_method": "slerp", "slices": [{"sources": two}]}, "slices[0].parameters: missing t"),
        ({**ties, "slices": [{"sources": two, "base_model": str(p["ft1"])}]},
         "slices[0].base_model: unknown key; expected one of: sources, parameters"),
        ({**ties, "dtype": "float16", "out_dtype": "bfloat16", "slices": [{"sources": two},
                                                                          {"sources": [_src(p, "base", 2, 6)]}]},
         "tensor 'lm_head.weight' is the base's alone, which mergekit rounds to F16 and then to BF16"),
        ({**ties, "slices": [{"sources": [{**two[0], "parameters": {"weight": 1, "sharpness": 2}}, two[1]]}]},
         "slices[0].sources[0].parameters.sharpness: unknown parameter; ties takes"),
    ]
    out = tmp_path / "out"
    for config, expected in cases:
        message = error_line(*run(capsys, "apply", _manifest(tmp_path, config), "--output", out))
        assert expected in message, message
        assert not out.exists()


def test_toml_refusals(capsys, tmp_path, models):
    config = CASES["ties-f16"](models)
    text = toml_manifest(config, tmp_path / "out")
    cases = [
        (text.replace("[output]", "[layers]\nplan = \"keep\"\n[output]"),
         "layers: given with [[merge.slices]]: the slices say which layers are merged"),
        (text.replace("[[merge.slices]]", "[merge.models.ft1]\nweight = 1\n[[merge.slices]]", 1),
         "merge.models: given with [[merge.slices]]"),
        (text.replace('source = "ft1"', 'source = "nope"'), "merge.slices[0].sources[1].source: expected one of"),
        (text.replace("layers = [2, 6]", "layers = [6, 2]"),
         "merge.slices[0].sources[2].layers: expected [start, stop]"),
        (text.replace("[[merge.slices]]", "[[merge.slices]]\nlayers = 3", 1),
         "merge.slices[0].layers: unknown key; expected one of: sources, parameters"),
    ]
    manifest = tmp_path / "m.toml"
    for text_, expected in cases:
        assert text_ != text
        manifest.write_text(text_)
        message = error_line(*run(capsys, "apply", manifest))
        assert expected in message, message
        assert not (tmp_path / "out").exists()


def test_plan_record_and_card_say_what_each_slice_merges(capsys, tmp_path, models):
    manifest = _manifest(tmp_path, CASES["ties"](models))
    code, out, err = run(capsys, "plan", manifest)
    assert code == 0, err
    assert "merge: ties of ft0, ft1, ft2 onto base, computed in BF16, in 3 slices of 9 layers" in out
    assert "out      3..6  <-  ft2 2..5 + base 1..4 + ft0 2..5" in out and "out      7..8  <-  base 4..5" in out
    _apply(capsys, manifest, tmp_path / "ours")
    record = json.loads((tmp_path / "ours" / "tensorsurgery.json").read_text())
    assert [s["layers"] for s in record["merge"]["slices"]] == [3, 4, 2]
    # output layer 4 is slice 1's second layer: base 2, ft2 3, ft0 3, in that order (the base first)
    q4 = record["tensors"]["model.layers.4.self_attn.q_proj.weight"]
    assert [(i["source"], i["source_key"]) for i in q4["inputs"]] == [
        ("base", "model.layers.2.self_attn.q_proj.weight"), ("ft2", "model.layers.3.self_attn.q_proj.weight"),
        ("ft0", "model.layers.3.self_attn.q_proj.weight")]
    # ft2's weight gradient [1, 0.2] at t = 1/3 of its slice; its density: the global 0.5 (its mlp filter
    # does not match, the slice sets none); ft0's the global too; the slice's lambda
    assert q4["operation"]["weights"] == [pytest.approx(1 - 0.8 / 3, abs=1e-6), -0.3]
    assert q4["operation"]["densities"] == [0.5, 0.5] and q4["operation"]["lam"] == 1.2
    up0 = record["tensors"]["model.layers.0.mlp.up_proj.weight"]["operation"]
    assert up0["densities"] == [0.3, 0.6]  # ft0's gradient at t = 0; ft1 takes the slice's
    assert record["tensors"]["model.layers.8.mlp.up_proj.weight"]["source_key"] == \
        "model.layers.5.mlp.up_proj.weight"
    assert "in 3 slices of 9 layers" in (tmp_path / "ours" / "README.md").read_text()

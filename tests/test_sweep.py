"""Every decoder-only causal-LM family the pinned transformers ships, through keep + float16, a DUS
and an iDUS whose overlap breaks the layers' parity (a period-2 or period-4 pattern cannot survive
by luck): each case is exact (the output loads with the keys the source loads with, and its logits
equal, by torch.equal, those of the same surgery done in memory on the loaded source model), or
refused with one line. A family that is neither fails, so a transformers release that adds a family
shows up here as a red test, not as a silent wrong model.

The tiny models come from each family's own config class (:mod:`sweep_models`); families it cannot
build are listed in :data:`NOT_BUILT` with the reason. The default run sweeps :data:`QUICK`; the
whole list runs with ``pytest --sweep tests/test_sweep.py`` (see the README), and
``TENSORSURGERY_SWEEP_TABLE=FILE`` writes the family x case table as JSON lines.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import sweep_models as sm  # noqa: E402

from tensorsurgery import api  # noqa: E402
from tensorsurgery.errors import TensorSurgeryError  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet_transformers")

#: Families the generic tiny builder (or the in-memory reference) does not make a working model of
#: (the reason, as transformers says it). Not swept; the ``--sweep`` run checks that each still fails.
_MAMBA = "the tiny Mamba mixer's head state does not match intermediate_size (its validator refuses)"
NOT_BUILT: dict[str, str] = {
    "bamba": _MAMBA, "falcon_h1": _MAMBA, "granitemoehybrid": _MAMBA,
    "mamba2": "hidden_size * expand must equal num_heads * head_dim at this size",
    "zamba2": "its layer_types validator refuses the shrunk hybrid pattern",
    "zamba": "its shared transformer block's tie_weights_keys do not match a 6-layer model",
    "dory": "its config validator refuses the shrunk architecture",
    "kolibri1_1": "its config validator refuses the shrunk architecture",
    "zaya": "ZAYA supports num_experts_per_tok=1 only",
    "gpt_neo": "attention_layers (from attention_types) keep the default 24 layers",
    "dots3_note_text": "its config validator refuses the shrunk architecture",
    "cohere_compass_text": "rope_parameters must be keyed by layer type (KeyError 'full_attention')",
    "gemma3n": "the layers producing a KV cache differ from those using it at 6 layers",
    "gemma3n_text": "the layers producing a KV cache differ from those using it at 6 layers",
    "gemma4_assistant": "hidden_size_per_layer_input must be 0 for the assistant model",
    "gemma4_unified_assistant": "the layers producing a KV cache differ from those using it",
    "inkling2_text": "loading the tiny model makes a tensor of negative size (-199930 rows)",
    "inkling2_loop_text": "loading the tiny model makes a tensor of negative size (-199930 rows)",
    "dbrx": "its attn_config sub-config has no rope_theta when built from defaults; a registry family, "
            "tested by logits in test_families_e2e.py with a config of its own",
    "cpmant": "its decoder is cpmant.encoder.layers: the in-memory reference does not take an encoder's layers",
    "git": "its text decoder is git.encoder.layer: the in-memory reference does not take an encoder's layers",
}

#: The default run: registry families and generic ones of each shape (sliding windows, MoE with
#: dense layers, hybrids, other layer naming, recurrent models).
QUICK = ("llama", "qwen2_moe", "cohere2", "olmoe", "jamba", "falcon", "gpt_neox", "lfm2", "nemotron_h",
         "recurrent_gemma", "exaone4", "afmoe", "granitemoe", "mamba", "diffllama", "beam", "minicpm3", "deepseek_v3")

FAMILIES = {t: c for t, c in sm.sweep_families().items() if t not in NOT_BUILT}
N = sm.LAYERS
#: case -> ([layers] table, arrangement, [output] extra). DUS takes layers 0-3 then 1-5 (position 4
#: is layer 1: parity broken); iDUS interleaves 0-4 and 1-5 one layer at a time (position 2 is layer 1).
CASES = {
    "keep+float16": ('plan = "keep"', list(range(N)), 'dtype = "float16"'),
    "dus": ('plan = "explicit"\narrangement = [[0, 4], [1, 6]]', [0, 1, 2, 3, 1, 2, 3, 4, 5], ""),
    "idus": ('plan = "idus"\noverlap = 1\ngroup = 1', [0, 1, 1, 2, 2, 3, 3, 4, 4, 5], ""),
}


def _params():
    out = []
    for model_type in FAMILIES:
        marks = () if model_type in QUICK else (pytest.mark.sweep,)
        out += [pytest.param(model_type, case, id=f"{model_type}-{case}", marks=marks) for case in CASES]
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """``(folder, class name, loaded source model, its loading info)`` of a family, built once."""
    cache: dict[str, tuple] = {}

    def get(model_type: str):
        if model_type not in cache:
            cls = FAMILIES[model_type]
            folder = sm.build_tiny(model_type, cls, tmp_path_factory.mktemp(model_type) / "src",
                                   seed=zlib.crc32(model_type.encode()) % 1000)
            model, info = sm.load(folder, cls)
            cache[model_type] = (folder, cls, model, info)
        return cache[model_type]
    return get


@pytest.fixture(scope="module")
def table():
    rows: list[dict] = []
    yield rows
    path = os.environ.get("TENSORSURGERY_SWEEP_TABLE")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def manifest(src: Path, out: Path, layers: str, extra: str) -> str:
    return f'[source]\nmodel = "{src}"\n[layers]\n{layers}\n[output]\npath = "{out}"\nmax_shard_size = "40KB"\n{extra}'


@pytest.mark.parametrize("model_type, case", _params())
def test_family_is_exact_or_refused(source, table, tmp_path, model_type, case):
    src, cls, model, info = source(model_type)
    layers, arrangement, extra = CASES[case]
    out = tmp_path / "out"
    try:
        api.apply(manifest(src, out, layers, extra))
    except TensorSurgeryError as e:
        message = str(e)
        assert message and "\n" not in message
        table.append({"family": model_type, "case": case, "result": "refused", "message": message})
        return
    assert api.verify(out).ok
    got, got_info = sm.load(out, cls)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert sorted(map(str, got_info[key])) == sorted(map(str, info[key])), key
    reference = sm.in_memory_surgery(model, arrangement, float16="float16" in case)
    inputs = sm.inputs_for(model.config)
    assert torch.equal(sm.logits_of(got, inputs), sm.logits_of(reference, inputs))
    table.append({"family": model_type, "case": case, "result": "exact"})


@pytest.mark.sweep
@pytest.mark.parametrize("model_type", sorted(NOT_BUILT))
def test_families_listed_as_not_built_still_fail_to_build(tmp_path, model_type):
    cls = sm.sweep_families()[model_type]
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises for that config
        folder = sm.build_tiny(model_type, cls, tmp_path / "src")
        model, _ = sm.load(folder, cls)
        sm.logits_of(model, sm.inputs_for(model.config))
        sm.in_memory_surgery(model, CASES["dus"][1])


def test_the_sweep_covers_the_mapping():
    """A family added to transformers' causal-LM mapping is swept or listed, never silently left out."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    swept = set(sm.sweep_families())
    classes = {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[t] for t in swept}
    for model_type, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        assert model_type in swept or model_type in sm.NOT_DECODER_ONLY or cls in classes, model_type
    assert set(QUICK) <= set(FAMILIES)

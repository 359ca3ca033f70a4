"""Reference layer surgery done in memory, the way the seed's transformers script does it.

Deliberately independent of ``tensorsurgery`` (no import from it, arrangements written out
here): the tool's output files are checked against what this module builds with safetensors'
``safe_open`` and transformers' ``LlamaForCausalLM``.

* :func:`reference_state_dict`: output layer ``i`` is source layer ``arrangement[i]`` (tensor names
  ``model.layers.{src}.*`` renamed ``model.layers.{i}.*``), every other tensor copied as is.
* :func:`reference_model`: the Mistral config relabelled as Llama (model_type ``llama``,
  architectures ``["LlamaForCausalLM"]``, ``sliding_window`` removed and used as
  ``max_position_embeddings`` when set, ``attention_bias``/``mlp_bias`` false,
  ``num_hidden_layers = len(arrangement)``), a ``LlamaForCausalLM`` with that state dict loaded
  strictly, in eval mode.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

#: Layer arrangements of a 32-layer source, spelled out.
ARRANGEMENTS: dict[str, list[int]] = {
    # Mistral-7B relabelled as Llama, layers untouched.
    "llama2-init-mistral": list(range(32)),
    # SOLAR depth up-scaling: the first 24 layers, then the last 24 (48 layers).
    "solar-dus": list(range(0, 24)) + list(range(8, 32)),
    # Interleaved DUS, 1 layer at a time: 0, 8, 1, 9, ..., 23, 31.
    "idus-1layer": [layer for i in range(24) for layer in (i, i + 8)],
    # Interleaved DUS, 8 layers at a time.
    "idus-8layer": [
        *range(0, 8), *range(8, 16),
        *range(8, 16), *range(16, 24),
        *range(16, 24), *range(24, 32),
    ],
}
assert [len(a) for a in ARRANGEMENTS.values()] == [32, 48, 48, 48]
assert ARRANGEMENTS["idus-1layer"][:4] == [0, 8, 1, 9] and ARRANGEMENTS["idus-1layer"][-2:] == [23, 31]

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def load_source_state_dict(src_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``src_dir`` (sharded with an index, or one file)."""
    src_dir = Path(src_dir)
    index = src_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(src_dir / name, framework="pt") as f:
            for key in f.keys():
                if key in state:
                    raise ValueError(f"tensor {key!r} appears in more than one file of {src_dir}")
                state[key] = f.get_tensor(key)
    return state


def reference_state_dict(
    src_dir: str | Path, arrangement: list[int], dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The rearranged state dict: non-layer tensors copied, layer ``i`` = source ``arrangement[i]``.

    ``dtype`` casts every tensor (``None`` keeps the source dtype). Duplicated source layers give
    independent tensors (clones), so the result is safe to mutate or save.
    """
    source = load_source_state_dict(src_dir)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        m = _LAYER_KEY.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
        else:
            out[key] = tensor
    if sorted(layers) != list(range(len(layers))):
        raise ValueError(f"source layers of {src_dir} are not numbered 0..n-1: {sorted(layers)}")
    for i, src in enumerate(arrangement):
        if not 0 <= src < len(layers):
            raise ValueError(f"arrangement[{i}] = {src}: the source has layers 0..{len(layers) - 1}")
        for suffix, tensor in sorted(layers[src].items()):
            out[f"model.layers.{i}.{suffix}"] = tensor.clone()
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return out


def reference_config_dict(src_dir: str | Path, num_layers: int) -> dict:
    """The source ``config.json`` relabelled from Mistral to Llama with ``num_layers`` layers."""
    cfg = json.loads((Path(src_dir) / "config.json").read_text())
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    sliding_window = cfg.pop("sliding_window", None)
    if sliding_window is not None:
        cfg["max_position_embeddings"] = sliding_window
    cfg["attention_bias"] = False
    cfg["mlp_bias"] = False
    cfg["num_hidden_layers"] = num_layers
    return cfg


def reference_model(
    src_dir: str | Path, arrangement: list[int], dtype: torch.dtype | None = None,
):
    """A ``LlamaForCausalLM`` holding :func:`reference_state_dict`, in eval mode.

    The parameters have ``dtype`` (``None``: the source's dtype, e.g. bf16); pass
    ``torch.float32`` to compare logits in full precision.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    state = reference_state_dict(src_dir, arrangement, dtype)
    config = LlamaConfig.from_dict(reference_config_dict(src_dir, len(arrangement)))
    model_dtype = dtype or state["model.embed_tokens.weight"].dtype
    config.dtype = model_dtype
    model = LlamaForCausalLM(config).to(model_dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()

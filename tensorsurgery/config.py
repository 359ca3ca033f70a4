"""Pure rewrite of config.json for a plan: preset relabel, layer count, per-layer lists,
dtype, then the manifest's ``[config]`` overrides (which win)."""
from __future__ import annotations

from typing import Any, Mapping

from .dtypes import TORCH_NAMES
from .errors import PlanError
from .layers import LayerRef
from .rules import Preset

#: Lists that are never per-layer even when their length happens to equal the layer count.
_NOT_PER_LAYER = frozenset({"architectures", "bos_token_id", "eos_token_id", "pad_token_id"})


def build_config(configs: Mapping[str, Mapping[str, Any]], base: str, arrangement: tuple[LayerRef, ...],
                 *, preset: Preset | None, dtype: str | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """config.json of the output.

    Args:
        configs: each source's config by source name; ``base`` is the one the output starts from.
        arrangement: the source layer of every output layer.
        preset: the rename preset whose config relabel applies, if any.
        dtype: the output safetensors dtype when casting (``"F16"``), else None.
        overrides: the manifest's ``[config]`` table.

    Raises:
        PlanError: the base config has no ``num_hidden_layers`` to rewrite.
    """
    cfg = dict(configs[base])
    if "num_hidden_layers" not in cfg:
        raise PlanError("config.json of the base source has no num_hidden_layers; the layer count "
                        "cannot be rewritten (add it to the source's config.json)")
    if preset is not None:
        for dst, src in preset.config_copy.items():
            if cfg.get(src) is not None:
                cfg[dst] = cfg[src]
        for key in preset.config_drop:
            cfg.pop(key, None)
        cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in preset.config_set.items()})
    for key, value in configs[base].items():
        if _is_per_layer(key, value, configs[base]["num_hidden_layers"]) and key in cfg and key not in overrides:
            cfg[key] = [_layer_value(configs, key, ref) for ref in arrangement]
    cfg["num_hidden_layers"] = len(arrangement)
    if dtype is not None:
        keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
        for key in keys:
            cfg[key] = TORCH_NAMES[dtype]
    cfg.update(overrides)
    return cfg


def _layer_value(configs: Mapping[str, Mapping[str, Any]], key: str, ref: LayerRef) -> Any:
    """``configs[ref.source][key][ref.layer]``; a source whose config lacks the list (or that
    entry) is a PlanError, not a KeyError."""
    values = configs[ref.source].get(key)
    if not isinstance(values, list) or not 0 <= ref.layer < len(values):
        raise PlanError(f"config.json of source {ref.source!r} has no {key}[{ref.layer}] for the per-layer "
                        f"list {key!r}; set {key} in the manifest's [config] table")
    return values[ref.layer]


def _is_per_layer(key: str, value: Any, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and key not in _NOT_PER_LAYER

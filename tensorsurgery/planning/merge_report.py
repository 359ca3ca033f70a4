"""What ``plan`` says of a merge layer by layer: which parameters each output layer's tensors were
resolved to (a gradient moves them from layer to layer, a filter sets ``self_attn`` apart from
``mlp``). Pure: reads the planned recipes' operations."""
from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from tensorsurgery.planning.planner import Plan
    from tensorsurgery.planning.table import OutputTensor

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.([^.]+)")
#: Fields of a merge operation that are not parameters a user gave (the merge dtype, DARE's place
#: in the random stream and its seed, which ``describe`` already says).
_NOT_PARAMETERS = frozenset({"dtype", "offset", "seed"})


def _parameters(op: Any) -> str:
    values = [(f.name, getattr(op, f.name)) for f in fields(op) if f.name not in _NOT_PARAMETERS] \
        if is_dataclass(op) else []
    return " ".join(f"{name}={_value(v)}" for name, v in values) or "(none)"


def _value(v: Any) -> str:
    return ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else str(v)


def _groups(tensors: Iterable[OutputTensor]) -> dict[int | None, dict[str, list[str]]]:
    """Output layer (None: not in a layer) -> parameters -> the modules (``self_attn``, ``mlp``,
    ``input_layernorm``...; a tensor's own name outside layers) merged with them."""
    out: dict[int | None, dict[str, list[str]]] = {}
    for t in tensors:
        if len({i.source for i in t.inputs}) < 2:  # not merged (a LoRA's or a dequantization's inputs are one source's)
            continue
        m = _LAYER.search(t.name)
        layer, module = (int(m.group(1)), m.group(2)) if m else (None, t.name)
        modules = out.setdefault(layer, {}).setdefault(_parameters(t.op), [])
        if module not in modules:
            modules.append(module)
    return out


def merge_parameter_lines(plan: Plan) -> list[str]:
    """``plan``'s lines for a merge: the parameters each output layer's tensors were resolved
    to, runs of layers with the same ones joined (``layers 0..3``), then the tensors outside
    layers. Tuples are per model, in the order ``merge:`` names them."""
    if plan.merge is None:
        return []
    groups = _groups(t for s in plan.shards for t in s.tensors)
    layers = sorted(k for k in groups if k is not None)
    runs: list[tuple[int, int, dict[str, list[str]]]] = []
    for layer in layers:
        if runs and runs[-1][1] == layer - 1 and runs[-1][2] == groups[layer]:
            runs[-1] = (runs[-1][0], layer, runs[-1][2])
        else:
            runs.append((layer, layer, groups[layer]))
    order = ("in the order each slice lists its models" if plan.merge.slices  # the models differ by slice
             else ", ".join(m.source for m in plan.merge.models))
    lines = [f"merge parameters (per model: {order}):"]
    for a, b, sets in runs:
        where = f"layer {a}" if a == b else f"layers {a}..{b}"
        lines += [f"  {where if i == 0 else '':>13}  {', '.join(modules)}: {params}"
                  for i, (params, modules) in enumerate(sets.items())]
    for params, modules in groups.get(None, {}).items():
        lines.append(f"  {'other':>13}  {', '.join(modules)}: {params}")
    return lines

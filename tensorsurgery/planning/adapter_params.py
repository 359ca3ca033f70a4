"""LoRA on parameters (peft's ``target_parameters``, its ``ParamWrapper``): the 3-D expert weights
of MoE models (``mlp.experts.gate_up_proj`` ``[experts, 2 * intermediate, hidden]``), which are not
the ``weight`` of a module.

peft saves such a LoRA under the module that holds the parameter; several parameters of one
module are nested wrappers, the first the module registers innermost:
``experts.base_layer.lora_A.weight`` is ``gate_up_proj``'s and ``experts.lora_A.weight``
``down_proj``'s. The file does not say which parameter a depth is (nor in what order the model
registers them), so each depth is given the one parameter its factors fit (:func:`assign`);
factors that fit two ways are refused. Whether a model stores its experts ``[experts, in, out]``
(transformers' ``is_transposed``, which a checkpoint does not record either) is known by its
``model_type`` (:data:`TRANSPOSED_EXPERTS`).

Most MoE checkpoints on disk hold each expert apart (``experts.3.gate_proj.weight``, or Mixtral's
``block_sparse_moe.experts.3.w1.weight``) and transformers fuses them on loading; a LoRA on the
fused ``gate_up_proj`` is merged into those pieces (:func:`parameter`, :data:`UNFUSED`). Pure.
"""
from __future__ import annotations

from itertools import permutations
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from tensorsurgery.errors import AdapterError

#: The ``model_type`` of the models transformers 5.25 stores experts ``[experts, in, out]`` in
#: (``use_experts_implementation(is_transposed=True)``; checked against transformers' sources by
#: tests/test_adapter_experts.py). Every other model stores them ``[experts, out, in]``.
TRANSPOSED_EXPERTS = frozenset({"aria", "aria_text", "ergo", "gpt_oss", "openai_privacy_filter"})
#: How checkpoints that store each expert apart name the pieces of a fused expert parameter
#: (transformers 5.25's ``conversion_mapping``: ``qwen2_moe``'s, which some 30 MoE models share,
#: and ``mixtral``'s): ``(the module's name in memory, its name on disk, {parameter: its pieces,
#: whose rows make each expert's rows in that order})``.
UNFUSED = (
    (".mlp.experts", ".mlp.experts", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
    (".mlp.experts", ".block_sparse_moe.experts", {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}),
)
#: What peft adds to a wrapped module's name for each wrapper around it.
_WRAPPER = ".base_layer"


def experts_transposed(config: Mapping[str, Any]) -> bool:
    """Whether the model of ``config`` (config.json, or its ``text_config``) stores its experts
    ``[experts, in, out]``."""
    text = config.get("text_config")
    types = {config.get("model_type"), text.get("model_type") if isinstance(text, Mapping) else None}
    return bool(types & TRANSPOSED_EXPERTS)


def owner(module: str) -> tuple[str, int]:
    """The module a (possibly nested) wrapper's factors belong to, and its depth (the number of
    wrappers inside it)."""
    depth = 0
    while module.endswith(_WRAPPER):
        module, depth = module.removesuffix(_WRAPPER), depth + 1
    return module, depth


def targeted(config: Mapping[str, Any], module: str) -> list[str]:
    """The keys of ``module``'s parameters that the adapter's ``target_parameters`` name (as peft
    matches them: the key itself or a suffix after a dot), whether or not the model has them."""
    names = []
    for target in config.get("target_parameters") or ():
        name = module + "." + str(target).rpartition(".")[2]
        if name == target or name.endswith("." + str(target)):
            names.append(name)
    return list(dict.fromkeys(names))


class Parameter(NamedTuple):
    """A parameter peft's LoRA targets, as the source holds it: its name in memory (peft's), its
    shape there, and the source tensors that hold it, each with the first of the parameter's rows
    it holds (its rows seen as ``experts * rows``): the parameter itself from row 0, or each
    expert's pieces."""

    key: str
    shape: tuple[int, ...]
    pieces: tuple[tuple[str, int], ...]

    @property
    def fused(self) -> bool:
        """The source holds the parameter as one tensor."""
        return self.pieces == ((self.key, 0),)


def parameter(key: str, shapes: Mapping[str, Sequence[int]]) -> Parameter | None:
    """Parameter ``key`` of the source whose tensors have ``shapes``, as one tensor or in the
    pieces of :data:`UNFUSED` (every expert from 0 on, pieces of one shape); None when it has
    neither."""
    if key in shapes:
        return Parameter(key, tuple(shapes[key]), ((key, 0),))
    module, _, name = key.rpartition(".")
    for memory, disk, table in UNFUSED:
        if not module.endswith(memory) or name not in table:
            continue
        stem = module.removesuffix(memory) + disk
        names = table[name]
        experts = 0
        while all(f"{stem}.{experts}.{n}.weight" in shapes for n in names):
            experts += 1
        found = {tuple(shapes[f"{stem}.{e}.{n}.weight"]) for e in range(experts) for n in names}
        if experts == 0 or len(found) != 1 or len(next(iter(found))) != 2:
            continue
        rows, cols = next(iter(found))
        pieces = tuple((f"{stem}.{e}.{n}.weight", (e * len(names) + j) * rows)
                       for e in range(experts) for j, n in enumerate(names))
        return Parameter(key, (experts, rows * len(names), cols), pieces)
    return None


def piece_keys(key: str, experts: int) -> set[str]:
    """The source keys parameter ``key`` of ``experts`` experts may be held in (for reading
    their headers' entries before :func:`parameter` is asked)."""
    module, _, name = key.rpartition(".")
    keys = {key}
    for memory, disk, table in UNFUSED:
        if module.endswith(memory) and name in table:
            stem = module.removesuffix(memory) + disk
            keys |= {f"{stem}.{e}.{n}.weight" for e in range(experts) for n in table[name]}
    return keys


def is_wrapper(config: Mapping[str, Any], module: str, shapes: Mapping[str, Sequence[int]] | None) -> bool:
    """Whether the factors saved under ``module`` are a parameter's (a ``ParamWrapper``'s) rather
    than a module's ``weight``: a nested wrapper's, or the module holds a parameter the
    ``target_parameters`` name (of the source's tensor ``shapes``; any, for None: what may be)."""
    parent, depth = owner(module)
    names = targeted(config, parent)
    return depth > 0 or any(shapes is None or parameter(k, shapes) is not None for k in names)


def fits(shape: Sequence[int], a: Sequence[int], b: Sequence[int], r: int, transposed: bool) -> bool:
    """Whether factors ``A`` and ``B`` of rank ``r`` fit a parameter of ``shape`` as peft lays them
    out (module docstring of :mod:`tensorsurgery.ops.lora_experts`)."""
    if len(a) != 2 or len(b) != 2:
        return False
    if len(shape) == 2:  # peft's 2-D parameter: a Linear's layout
        rows, cols = shape
        return tuple(a) == (r, cols) and tuple(b) == (rows, r)
    if len(shape) != 3:
        return False
    experts, rows, cols = shape
    into, out = (rows, cols) if transposed else (cols, rows)
    return tuple(a) == (experts * r, into) and tuple(b) == (out, r * experts)


def assign(where: str, depths: Mapping[int, tuple[Sequence[int], Sequence[int]]],
           params: Mapping[str, tuple[Sequence[int], int]], transposed: bool) -> dict[int, str]:
    """The parameter each wrapper depth of one module is: ``depths`` maps a depth to its factors'
    shapes ``(A, B)``, ``params`` a targeted parameter's key to its shape and rank.

    Raises:
        AdapterError: depths missing, more depths than targeted parameters, factors that fit no
            parameter or that fit in two ways.
    """
    if sorted(depths) != list(range(len(depths))) or len(depths) > len(params):
        raise AdapterError(f"{where}: the adapter has {len(depths)} nested LoRA wrappers here, and the source has "
                           f"{len(params)} parameter(s) its target_parameters name ({', '.join(params) or 'none'}); "
                           f"the adapter was trained for another model")
    ways = [dict(zip(sorted(depths), chosen)) for chosen in permutations(params, len(depths))
            if all(fits(params[p][0], *depths[d], params[p][1], transposed) for d, p in zip(sorted(depths), chosen))]
    if len(ways) != 1:
        shapes = "; ".join(f"A {list(a)}, B {list(b)}" for a, b in (depths[d] for d in sorted(depths)))
        targets = ", ".join(f"{p} {list(s)} (rank {r})" for p, (s, r) in params.items())
        raise AdapterError(f"{where}: the adapter's factors ({shapes}) fit the parameters {targets} "
                           f"{'in no way' if not ways else 'in more than one way'}; the adapter was trained for "
                           f"another model (or its rank_pattern is wrong)")
    return ways[0]


def owners(config: Mapping[str, Any], modules: Iterable[str],
           shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, dict[int, str]]:
    """The wrapped modules of ``modules`` (the names factors are saved under), by the module
    that holds the parameters: depth -> the saved name (``shapes``: as :func:`is_wrapper`)."""
    out: dict[str, dict[int, str]] = {}
    for module in modules:
        if is_wrapper(config, module, shapes):
            parent, depth = owner(module)
            out.setdefault(parent, {})[depth] = module
    return out

"""Planning a merge (pure): each output tensor of a ``[merge]`` manifest becomes a recipe of the
same tensor of every merged source and one merge operation, its parameters resolved for that
tensor (:mod:`tensorsurgery.manifest.merges`)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from math import prod
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from tensorsurgery.errors import PlanError
from tensorsurgery.formats.dtypes import is_castable
from tensorsurgery.manifest.merge_slices import locate
from tensorsurgery.manifest.merges import METHODS, RANDOM_METHODS, MergeSpec, MissingParameter, Resolved, resolve
from tensorsurgery.ops import (
    COPY,
    ArceeFusion,
    Breadcrumbs,
    Karcher,
    Linear,
    ModelStock,
    Multislerp,
    NearSwap,
    Nuslerp,
    Operation,
    Ram,
    RamPlus,
    Sce,
    Slerp,
    TaskArithmetic,
    Ties,
)
from tensorsurgery.ops.arcee_fusion import SAMPLE
from tensorsurgery.ops.base import ByteRange, Input
from tensorsurgery.planning.dare import dare_operation, stream_offsets
from tensorsurgery.planning.della import della_operation
from tensorsurgery.planning.quantized import DEQUANTIZE_FIRST
from tensorsurgery.sources.checkpoint import Checkpoint

#: Methods whose value at an element needs that element of each model alone (no statistic over a
#: tensor, no random draw): their values do not depend on how a tensor's elements are stored.
LAYOUT_FREE = frozenset({"linear", "task_arithmetic", "nearswap", "ram"})
#: One expert's tensor of a MoE layer stored one expert at a time (Mixtral's ``experts.3.w1``).
_EXPERT = re.compile(r"\.experts\.\d+\.")


def promoted(dtypes: tuple[str, ...]) -> str:
    """torch's promoted dtype of float tensors (mergekit's merge dtype when none is given): the
    one dtype, else float32 (bfloat16 and float16 promote to it)."""
    return dtypes[0] if len(set(dtypes)) == 1 else "F32"


def _weights(values: Resolved) -> tuple[float, ...]:
    return tuple(float(p["weight"]) for p in values.per_model)


class NotBuilt(Exception):
    """A setting of a built method that is not built yet (for a message that says so)."""


def _sparsified(method: str) -> Callable[[Resolved, str], Operation]:
    """ties, breadcrumbs or breadcrumbs_ties from a tensor's parameters."""
    def make(values: Resolved, md: str) -> Operation:
        weights, densities = _weights(values), tuple(float(p["density"]) for p in values.per_model)
        normalize, lam = bool(values.shared["normalize"]), float(values.shared["lambda"])
        rescale = bool(values.shared["rescale"])
        if method == "ties":
            return Ties(weights, densities, normalize, lam, md, rescale)
        return Breadcrumbs(weights, densities, tuple(float(p["gamma"]) for p in values.per_model),
                           method == "breadcrumbs_ties", normalize, lam, md, rescale)
    return make


def _interpolation(weights: tuple[float, ...]) -> float:
    """nuslerp's ``t`` from its two models' weights, as mergekit's (Python floats): the second's
    share, 0.5 when they sum to (almost) 0."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _model_stock(values: Resolved, md: str) -> Operation:
    if values.shared["filter_wise"]:
        raise NotBuilt("model_stock with filter_wise = true (a ratio per row) is not built yet; remove it, or use "
                       "mergekit")
    return ModelStock(md)


def _karcher(values: Resolved, md: str) -> Operation:
    steps = float(values.shared["max_iter"])
    if not steps.is_integer() or steps < 0:
        raise NotBuilt(f"karcher: max_iter is the number of steps (a whole number, 0 or more), found {steps:g}")
    return Karcher(int(steps), float(values.shared["tol"]), md)


#: Each method's operation from one tensor's resolved parameters and the merge dtype.
OPERATION: Mapping[str, Callable[[Resolved, str], Operation]] = MappingProxyType({
    "linear": lambda v, md: Linear(_weights(v), bool(v.shared["normalize"]), md),
    "task_arithmetic": lambda v, md: TaskArithmetic(_weights(v), bool(v.shared["normalize"]),
                                                    float(v.shared["lambda"]), md),
    **{method: _sparsified(method) for method in ("ties", "breadcrumbs", "breadcrumbs_ties")},
    "slerp": lambda v, md: Slerp(float(v.shared["t"]), md),
    "model_stock": lambda v, md: _model_stock(v, md),
    "nuslerp": lambda v, md: Nuslerp(_interpolation(_weights(v)), bool(v.shared["nuslerp_row_wise"]),
                                     bool(v.shared["nuslerp_flatten"]), v.base, md),
    "multislerp": lambda v, md: Multislerp(_weights(v), bool(v.shared["normalize_weights"]), float(v.shared["eps"]),
                                           v.base, md),
    "sce": lambda v, md: Sce(float(v.shared["select_topk"]), md),
    "nearswap": lambda v, md: NearSwap(float(v.shared["t"]), md),
    "ram": lambda v, md: Ram(float(v.shared["epsilon"]), md),
    "ramplus_tl": lambda v, md: RamPlus(float(v.shared["r"]), float(v.shared["alpha"]), float(v.shared["epsilon"]),
                                        md),
    "karcher": _karcher,
})


@dataclass(frozen=True, slots=True)
class Merger:
    """Makes the merged recipe of each output tensor: ``layers`` output layers (for gradients),
    ``where`` the manifest (for messages)."""

    spec: MergeSpec
    checkpoints: Mapping[str, Checkpoint]
    layers: int
    where: str
    #: Each tensor's first random draw (DARE: :mod:`tensorsurgery.planning.dare`), by source tensor name.
    offsets: Mapping[str, int] | None = None
    #: The output dtype (None: the merge dtype), for a slice of the base alone (a copy).
    out_dtype: str | None = None
    #: Inputs made first, by (source, source key): a dequantized FP8 weight, a tensor a LoRA
    #: adapter changes (:mod:`tensorsurgery.planning.made_inputs`).
    made: Mapping[tuple[str, str], Input] = field(default_factory=lambda: MappingProxyType({}))

    def with_draws(self, tensors: Iterable[tuple[str, tuple[int, ...], int | None]]) -> Merger:
        """This merger knowing where each tensor's draws start, for a method that draws: from
        ``(key, shape, position)`` of every merged tensor (itself for the other methods).

        Raises:
            PlanError: no seed, or a tensor without a weight or density.
        """
        if self.spec.method == "arcee_fusion":
            return replace(self, offsets=self._samples(tensors))
        if self.spec.method not in RANDOM_METHODS:
            return self
        if self.spec.seed is None:
            raise PlanError(f"{self.where}: merge: {self.spec.method} keeps random parts of each delta and needs a "
                            f"seed: set seed = N in [merge], or give --random-seed N as mergekit takes it (its YAML "
                            f"has no seed); without one mergekit draws differently every run")
        try:
            offsets = stream_offsets(self.spec, ((key, prod(shape), self.t(position))
                                                 for key, shape, position in tensors))
        except MissingParameter as e:
            raise PlanError(f"{self.where}: merge: {e}") from None
        return replace(self, offsets=offsets)

    def _samples(self, tensors: Iterable[tuple[str, tuple[int, ...], int | None]]) -> dict[str, int]:
        """arcee_fusion's draws: each tensor of more than :data:`~tensorsurgery.ops.arcee_fusion.SAMPLE`
        elements draws that many indices from torch's generator (``randint``), in mergekit's order
        of the tensors (their names' string order, as DARE's); where each tensor's draws start.

        Raises:
            PlanError: such a tensor, and no seed.
        """
        offsets, at = {}, 0
        for key, shape, _ in sorted(tensors):
            offsets[key] = at
            if prod(shape) > SAMPLE:
                if self.spec.seed is None:
                    raise PlanError(f"{self.where}: merge: arcee_fusion takes the quartiles of tensor {key!r} "
                                    f"({prod(shape):,} elements) from {SAMPLE:,} importances drawn at random and "
                                    f"needs a seed: set seed = N in [merge], or give --random-seed N as mergekit "
                                    f"takes it; without one mergekit draws differently every run")
                at += SAMPLE
        return offsets

    def t(self, position: int | None) -> float:
        """Where a tensor lies across the layers, as mergekit's gradients see it: 0 outside them
        (embeddings, final norm, lm_head), ``i / (n - 1)`` for layer ``i`` (1 for a single layer)."""
        if position is None:
            return 0.0
        return position / (self.layers - 1) if self.layers > 1 else 1.0

    def recipe(self, first: Input, position: int | None,
               name: str | None = None) -> tuple[tuple[Input, ...], Operation, str]:
        """The inputs (tensor ``first.key`` of every merged source, the base first; in a merge of
        slices, each source's own layer of the slice), the operation and the merge dtype of the
        output tensor ``name`` (default ``first.key``) planned from ``first``.

        Raises:
            PlanError: a source lacks the tensor or has it in another shape, it is not a float
                tensor, or a required parameter has no value for it.
        """
        key, name = first.key, name or first.key
        if self.spec.method not in LAYOUT_FREE and _EXPERT.search(key):
            raise PlanError(f"{self.where}: merge: tensor {key!r} is one expert of a MoE layer stored one expert at "
                            f"a time; mergekit 0.1.5 merges the experts fused (transformers' conversion mapping), so "
                            f"{self.spec.method}'s statistics or draws would be over other elements than its own; "
                            f"merging them is not built yet: use {', '.join(sorted(LAYOUT_FREE))}, or mergekit")
        if first.part is not None:
            raise PlanError(f"{self.where}: tensor {key!r} is a part of a fused tensor; merging parts is not "
                            f"supported: merge models whose tensors are not split")
        part, t = None, self.t(position)
        sources, keys = self.spec.sources, (key,) * len(self.spec.sources)
        if self.spec.slices:
            part, offset, t = locate(self.spec, position, name)
            sources = part.sources(self.spec.base, METHODS[self.spec.method].takes_base(self.spec.base))
            keys = tuple(key if offset is None else
                         self.checkpoints[s].family.layers.with_index(key, part.starts[s] + offset) for s in sources)
        inputs = tuple(self._input(source, k, first.shape) for source, k in zip(sources, keys))
        md = self.spec.dtype or promoted(tuple(i.dtype for i in inputs))
        if part is not None and not part.models:  # the base alone: mergekit returns it, in the merge dtype
            return inputs, self._base_alone(inputs[0], md, name), md
        try:
            values = resolve(self.spec, name, t, part, keys[len(keys) - len(part.models):] if part else ())
            if self.spec.method in RANDOM_METHODS:
                assert self.offsets is not None, "with_draws first"
                if self.spec.method.startswith("della"):
                    return inputs, della_operation(self.spec, values, md, self.offsets[key], first.shape), md
                return inputs, dare_operation(self.spec, values, md, self.offsets[key]), md
            if self.spec.method == "arcee_fusion":
                assert self.offsets is not None, "with_draws first"
                sampled = prod(first.shape) > SAMPLE
                if sampled and self.spec.slices:
                    raise NotBuilt(f"arcee_fusion over slices samples the importances of tensor {key!r} from "
                                   f"torch's random stream in an order not built yet; merge whole models, or use "
                                   f"mergekit")
                return inputs, ArceeFusion(md, self.spec.seed if sampled else None,
                                           self.offsets[key] if sampled else 0), md
            return inputs, OPERATION[self.spec.method](values, md), md
        except (MissingParameter, NotBuilt) as e:
            raise PlanError(f"{self.where}: merge: {e}") from None
        except ValueError as e:  # a density below 0, della's density and epsilon or shape
            raise PlanError(f"{self.where}: merge: tensor {key!r}: {e}") from None

    def _base_alone(self, base: Input, md: str, name: str) -> Operation:
        """A copy of the base's tensor (cast once to the output dtype when planned): mergekit rounds
        it to the merge dtype, then to the output's, the same bytes when the first rounding loses
        nothing (the merge dtype is the base's or float32) or the output is in the merge dtype."""
        out = self.out_dtype or md
        if md not in (base.dtype, "F32") and out != md:
            raise PlanError(f"{self.where}: merge: tensor {name!r} is the base's alone, which mergekit rounds to "
                            f"{md} and then to {out}; tensorsurgery casts once: set the output dtype to the merge "
                            f"dtype, or give the slice another model")
        return COPY

    def _input(self, source: str, key: str, shape: tuple[int, ...]) -> Input:
        ckpt = self.checkpoints[source]
        made = self.made.get((source, key))
        if made is not None and made.shape == shape:
            return made
        shard = ckpt.weight_map.get(key)
        if shard is None:
            raise PlanError(f"{self.where}: merge: source {source!r} ({ckpt.root}) has no tensor {key!r}; merge "
                            f"models of one architecture and size")
        header = ckpt.headers[shard]
        entry = header.tensors[key]
        where = f"{ckpt.root / shard}: tensor {key!r}"
        if entry.shape != shape:
            raise PlanError(f"{where}: shape {list(entry.shape)}, but the first source's is {list(shape)}; merge "
                            f"models of one architecture and size")
        if not is_castable(entry.dtype):
            fix = f"; {DEQUANTIZE_FIRST}" if entry.dtype.startswith("F8_") or entry.dtype == "U8" else ""
            raise PlanError(f"{where}: {entry.dtype} is not a float dtype a merge computes with (F16, BF16, F32)"
                            f"{fix}")
        return Input(source, key, entry.dtype, shape,
                     ByteRange(header.source, header.data_start + entry.start, entry.nbytes))

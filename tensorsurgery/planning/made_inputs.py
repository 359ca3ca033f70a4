"""Which inputs of a merge are tensors made first (pure, part of planning): a source's FP8 weights
dequantized (when the output has a dtype) and the tensors its LoRA adapter changes, merged into
them as mergekit merges a ``model+adapter`` (peft's ``merge_and_unload`` first, in the base's
dtype). Each becomes an input whose byte range is a :class:`~tensorsurgery.ops.derived.Derived`
byte source, so the merge reads it as it reads a file and the recipe stays one operation.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from types import MappingProxyType
from typing import Mapping, Sequence

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.ops import LoraBias, LoraMerge
from tensorsurgery.ops.base import ByteRange, Input, Operation
from tensorsurgery.ops.derived import Derived, derivable
from tensorsurgery.planning.adapters import Recipe, source_inputs
from tensorsurgery.planning.quantized import dequant_recipe
from tensorsurgery.sources.checkpoint import Checkpoint


@dataclass(frozen=True, slots=True)
class MadeInputs:
    """The made inputs of a merge by ``(source, source key)``, and the tensors only a derivation
    reads (an FP8 weight's scale: not merged, not written)."""

    inputs: Mapping[tuple[str, str], Input]
    consumed: frozenset[tuple[str, str]]


def made_inputs(sources: Sequence[str], checkpoints: Mapping[str, Checkpoint], fp8: Mapping[str, tuple[int, int]],
                dtype: str | None, adapted: Mapping[str, Mapping[str, Recipe]]) -> MadeInputs:
    """The made inputs of the merged ``sources``: every FP8 weight of a source in ``fp8`` (its block
    size) dequantized to ``dtype``, every tensor of a source in ``adapted`` (its adapter's
    recipes by base key) as the adapter makes it.

    Raises:
        QuantizationError: an FP8 weight without its scale, or of another FP8 format.
    """
    inputs: dict[tuple[str, str], Input] = {}
    consumed: set[tuple[str, str]] = set()
    for source in sources:
        ckpt = checkpoints[source]
        if source in fp8 and dtype is not None:
            quantized = [k for k, shard in ckpt.weight_map.items()
                         if ckpt.headers[shard].tensors[k].dtype.startswith("F8_")]
            for key, raw in source_inputs(ckpt.weight_map, ckpt.headers, source, quantized).items():
                pair, dequant = dequant_recipe(raw, ckpt, fp8[source], dtype)
                consumed.add((source, pair[1].key))
                inputs[source, key] = _made(source, key, dtype, raw.shape, pair, dequant)
        recipes = adapted.get(source, {})
        for key, base in source_inputs(ckpt.weight_map, ckpt.headers, source, recipes).items():
            recipe, op = recipes[key]
            # every recipe an adapter makes is rowwise or elementwise: read in any order
            assert derivable(op), op.label
            # peft's merged model is in the base's dtype, modules_to_save too (loaded into the base's
            # module); mergekit reads it as saved
            made = (op.dtype if isinstance(op, LoraMerge) else op.merge_dtype if isinstance(op, LoraBias)
                    else base.dtype)
            inputs[source, key] = _made(source, key, made, base.shape, recipe, op)
    return MadeInputs(MappingProxyType(inputs), frozenset(consumed))


def _made(source: str, key: str, dtype: str, shape: tuple[int, ...], recipe: Sequence[Input],
          op: Operation) -> Input:
    """Tensor ``key`` of ``source`` as ``op`` makes it of ``recipe``, an input of ``dtype``."""
    nbytes = prod(shape) * element_size(dtype)
    derived = Derived(source, key, dtype, tuple(shape), nbytes, tuple(recipe), op)
    return Input(source, key, dtype, tuple(shape), ByteRange(derived, 0, nbytes))

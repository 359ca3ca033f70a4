"""Planning DARE merges (pure): where each tensor's random draws start, and its operation.

mergekit's ``dare_linear`` and ``dare_ties`` draw one number per element of each model whose
density is below 1 from torch's one CPU generator (:mod:`tensorsurgery.ops.mt_stream`). mergekit
computes the tensors in the plain string order of their names (its schedule sorts its tasks by
tensor name: ``layers.10`` before ``layers.2``), the models in config order, so a tensor's first
draw is the sum of the element counts of what draws before it: planned here from the headers,
whatever order the writer later makes the tensors in.
"""
from __future__ import annotations

from typing import Iterable

from tensorsurgery.manifest.merges import MergeSpec, Resolved, resolve
from tensorsurgery.ops import Dare


def draws(method: str, values: Resolved) -> int:
    """How many models draw for a tensor: those of density below 1 (mergekit keeps the others),
    and for della above 0 too (it zeroes those)."""
    low = 0.0 if method.startswith("della") else float("-inf")
    return sum(1 for p in values.per_model if low < float(p["density"]) < 1)


def stream_offsets(spec: MergeSpec, tensors: Iterable[tuple[str, int, float]]) -> dict[str, int]:
    """Each tensor's first draw, by name, from ``(name, elements, t)`` of every merged tensor.

    Raises:
        MissingParameter: a tensor has no weight or density (see :func:`tensorsurgery.manifest.merges.resolve`).
    """
    offsets: dict[str, int] = {}
    at = 0
    for name, elements, t in sorted(tensors):
        offsets[name] = at
        at += elements * draws(spec.method, resolve(spec, name, t))
    return offsets


def dare_operation(spec: MergeSpec, values: Resolved, merge_dtype: str, offset: int) -> Dare:
    """The operation of one tensor.

    Raises:
        ValueError: a density below 0 (torch's bernoulli takes 0..1).
    """
    assert spec.seed is not None
    densities = tuple(float(p["density"]) for p in values.per_model)
    for model, d in zip(spec.models, densities):
        if d < 0:
            raise ValueError(f"model {model.source!r}: density {d} is below 0; a density is the share of each delta "
                             f"kept, 0..1")
    shared = values.shared
    return Dare(tuple(float(p["weight"]) for p in values.per_model), densities, bool(shared["normalize"]),
                bool(shared["rescale"]), float(shared["lambda"]), spec.method == "dare_ties", merge_dtype,
                spec.seed, offset)

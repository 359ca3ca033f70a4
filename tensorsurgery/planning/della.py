"""Planning DELLA merges (pure): mergekit's ``della`` and ``della_linear``, each tensor's
operation from its resolved parameters, checked as mergekit checks them.

Their draws come from torch's one CPU generator as DARE's do (:mod:`tensorsurgery.planning.dare` plans
where each tensor's start); a model of density in (0, 1) draws once per element.
"""
from __future__ import annotations

from tensorsurgery.manifest.merges import MergeSpec, Resolved
from tensorsurgery.ops import Della
from tensorsurgery.ops.della import row_length


def della_operation(spec: MergeSpec, values: Resolved, merge_dtype: str, offset: int,
                    shape: tuple[int, ...]) -> Della:
    """The operation of one tensor of ``shape``.

    Raises:
        ValueError: a density and epsilon mergekit refuses (``density +/- epsilon`` outside
            (0, 1) where the density prunes), a tensor of more than two dimensions, or rows of
            one element (mergekit's rank scaling divides 0 by 0 there, and torch's bernoulli fails).
    """
    assert spec.seed is not None
    densities = tuple(float(p["density"]) for p in values.per_model)
    epsilons = tuple(float(p["epsilon"]) for p in values.per_model)
    pruning = [(m.source, d, e) for m, d, e in zip(spec.models, densities, epsilons) if 0 < d < 1]
    for model, d, e in pruning:
        if d + e >= 1 or d - e <= 0:
            raise ValueError(f"model {model!r}: density {d} and epsilon {e}: density - epsilon and density + "
                             f"epsilon must lie in (0, 1), as mergekit's della requires; lower epsilon")
    if pruning and len(shape) > 2:
        raise ValueError(f"shape {list(shape)}: della of a tensor of {len(shape)} dimensions (mergekit ranks "
                         f"along its second) is not built yet; merge it with mergekit")
    if pruning and row_length(shape) < 2:
        raise ValueError(f"shape {list(shape)}: rows of one element, which mergekit's della cannot rank (0/0: "
                         f"torch's bernoulli fails); give this tensor density 1 with a filter")
    shared = values.shared
    return Della(tuple(float(p["weight"]) for p in values.per_model), densities, epsilons,
                 bool(shared["normalize"]), bool(shared["rescale"]), float(shared["lambda"]),
                 spec.method == "della", merge_dtype, spec.seed, offset)

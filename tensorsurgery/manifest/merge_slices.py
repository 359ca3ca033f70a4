"""A merge of parts of models (mergekit's ``slices`` with a merge method: a "merged
frankenmerge"), pure: the slices checked into a :class:`~tensorsurgery.manifest.merges.MergeSpec`, and for
each output tensor the slice it belongs to, the layer of each source it merges, and its ``t``.

What mergekit 0.1.5 does (``plan.py``: ``plan_module``, ``plan_slice``, ``plan_layer``), and so do we:

* a slice lists sources ``{model, layer_range: [a, b], parameters}``, all of one length ``n``;
  output layer ``i`` of the slice is the merge of layer ``a_k + i`` of each source ``k``, in the
  order the sources are listed. Slices stack in order.
* a gradient is interpolated over the layers of its slice: ``t = i / (n - 1)`` (1 when ``n = 1``).
* precedence: a source's parameters in the slice > the slice's > the global ones. A model's own
  parameters are filtered by its input's name (its own layer), the shared ones by the output's.
* the embeddings are merged from the first slice's sources, the final norm and ``lm_head`` from
  the last slice's (mergekit's pre and post weights), at ``t = 0`` with that slice's parameters.
  mergekit pairs the last slice's sources with as many inputs as the first slice has, so a last
  slice with more sources than the first loses some for these tensors: refused.
* a method that takes a base needs it among every slice's sources (mergekit refuses otherwise).
  A slice of the base alone is the base's layers for the task-arithmetic family (mergekit's
  ``merge_group`` returns the base when nothing else is merged), rounded to the merge dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from tensorsurgery.manifest.merges import (
    RANDOM_METHODS,
    ErrorAt,
    MergeModel,
    MergeSlice,
    MergeSpec,
    check_method,
    check_settings,
)

#: The methods whose slice may hold the base alone (their result is then the base).
BASE_ONLY = frozenset({"task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"})


@dataclass(frozen=True, slots=True)
class SliceSource:
    """A source of a slice as given: its source name, ``[start, stop)`` layers, raw parameters and
    its key path (for messages)."""

    source: str
    start: int
    stop: int
    parameters: Mapping[str, Any]
    where: str


@dataclass(frozen=True, slots=True)
class RawSlice:
    """A slice as given: its sources, raw parameters and key path."""

    sources: tuple[SliceSource, ...]
    parameters: Mapping[str, Any]
    where: str


def sliced_spec(error: ErrorAt, method: Any, slices: Sequence[RawSlice], base: str | None,
                parameters: Mapping[str, Any], dtype: str | None, where: str = "merge") -> MergeSpec:
    """The :class:`MergeSpec` of a merge given as ``slices``: its ``models`` every merged model in
    the order first named (with no parameters of their own: those are the slices'), ``slices``
    each slice checked.

    Raises:
        whatever ``error`` makes: an unknown method or parameter, a method that draws at random,
        sources of one slice of different lengths or named twice, the base missing from a slice, a
        missing required parameter, too few or too many models in a slice.
    """
    spec = check_method(error, method, where)
    if spec.name in RANDOM_METHODS:
        raise error(f"{where}.slices", f"{spec.name} over slices is not built yet (its random draws run through "
                                       f"the input tensors by name); merge whole models, or use mergekit")
    ignored: list[str] = []
    shared = check_settings(error, spec, parameters, f"{where}.parameters", False, ignored)
    if spec.needs_base and base is None:
        raise error(f"{where}.base", f"missing; {spec.name} adds the models' differences from a base model")
    parts = [_slice(error, spec.name, s, base, shared, ignored) for s in slices]
    named = [s.source for part in slices for s in part.sources]
    if not spec.takes_base(base) and base is not None and base not in named:
        raise error(f"{where}.base", f"{base!r} is in no slice; {spec.name} takes no base of its own: list it in "
                                     f"the slices, or remove base")
    if len(slices[-1].sources) > len(slices[0].sources):
        raise error(slices[-1].where, f"{len(slices[-1].sources)} sources, more than the first slice's "
                                      f"{len(slices[0].sources)}: mergekit would merge the final norm and lm_head "
                                      f"from only the first {len(slices[0].sources)} of them; give the first slice "
                                      f"at least as many sources")
    models = tuple(MergeModel(s, MappingProxyType({})) for s in dict.fromkeys(named)
                   if s != base or not spec.takes_base(base))
    return MergeSpec(spec.name, models, base, MappingProxyType(shared), dtype, tuple(dict.fromkeys(ignored)),
                     slices=tuple(parts))


def _slice(error: ErrorAt, method: str, raw: RawSlice, base: str | None, shared: Mapping[str, Any],
           ignored: list[str]) -> MergeSlice:
    spec = check_method(error, method)
    if not raw.sources:
        raise error(f"{raw.where}.sources", "no sources; list the models whose layers this slice merges")
    first = raw.sources[0]
    seen: set[str] = set()
    for s in raw.sources:
        if s.source in seen:
            raise error(s.where, f"source {s.source!r} is listed twice in the slice; list each model once")
        seen.add(s.source)
        if s.stop - s.start != first.stop - first.start:
            raise error(f"{s.where}.layer_range", f"{s.stop - s.start} layers, but the slice's first source gives "
                                                  f"{first.stop - first.start}; every source of a slice gives as "
                                                  f"many layers")
    own = check_settings(error, spec, raw.parameters, f"{raw.where}.parameters", False, ignored)
    for p in spec.parameters:
        if not p.per_model and p.default is None and p.name not in own and p.name not in shared:
            raise error(f"{raw.where}.parameters", f"missing {p.name}; {method} needs one (a number, a gradient "
                                                   f"[a, b, ...] or filtered values)")
    has_base = base is not None and base in seen
    if spec.takes_base(base) and not has_base:
        raise error(f"{raw.where}.sources", f"no base model; {method} merges each slice onto the base: list it "
                                            f"among the sources of every slice, with its layer_range")
    models = []
    for s in raw.sources:
        mine = check_settings(error, spec, s.parameters, f"{s.where}.parameters", True, ignored)
        if spec.takes_base(base) and s.source == base:  # checked, but the base takes no per-model parameter
            continue
        for p in spec.parameters:
            if p.per_model and p.default is None and not {p.name} & (mine.keys() | own.keys() | shared.keys()):
                raise error(s.where, f"missing {p.name}; {method} needs a {p.name} for every model (or one in "
                                     f"the slice's or the global parameters)")
        models.append(MergeModel(s.source, MappingProxyType(mine)))
    alone = spec.takes_base(base) and not models and method in BASE_ONLY
    if len(models) < spec.min_models and not alone:
        raise error(f"{raw.where}.sources", f"{len(models)} model{'s' if len(models) != 1 else ''} besides the "
                                            f"base; {method} needs at least {spec.min_models}")
    if spec.max_models is not None and len(models) > spec.max_models:
        raise error(f"{raw.where}.sources", f"{len(models)} models besides the base; {method} interpolates the "
                                            f"base towards exactly {spec.max_models}")
    return MergeSlice(tuple(models), MappingProxyType({s.source: s.start for s in raw.sources}),
                      first.stop - first.start, MappingProxyType(own), has_base)


def arrangement(spec: MergeSpec, first: str) -> tuple[tuple[str, int, int], ...]:
    """The layers the output is planned from, as ``(source, start, stop)`` segments: in each slice
    the ``first`` source's (config.json's) where it is among the sources, else the slice's first
    model's; the other sources' tensor names follow them."""
    out = []
    for part in spec.slices:
        source = first if first in part.starts else part.models[0].source
        assert source is not None
        start = part.starts[source]
        out.append((source, start, start + part.length))
    return tuple(out)


#: The non-layer tensors mergekit merges after the layers (its post weights: the final norm and the
#: head), by the last segment of their module path; the others (the embeddings) come before them.
_POST_MODULES = frozenset({"lm_head", "norm", "final_layernorm", "final_norm", "ln_f", "embed_out"})


def locate(spec: MergeSpec, position: int | None, name: str) -> tuple[MergeSlice, int | None, float]:
    """The slice output tensor ``name`` is merged in, its layer within the slice (None outside the
    layers) and its ``t``: a layer tensor's slice; the last slice for the final norm and lm_head,
    the first for the others (the embeddings), at ``t = 0``."""
    if position is None:
        parts = name.split(".")
        post = parts[0] == "lm_head" or (len(parts) >= 2 and parts[-2] in _POST_MODULES)
        return spec.slices[-1] if post else spec.slices[0], None, 0.0
    for part in spec.slices:
        if position < part.length:
            return part, position, position / (part.length - 1) if part.length > 1 else 1.0
        position -= part.length
    raise ValueError(f"output layer past the slices' {sum(p.length for p in spec.slices)} layers")


def range_problem(spec: MergeSpec, layer_counts: Mapping[str, int]) -> str | None:
    """What is wrong with the slices' layer ranges given each source's layer count, or None."""
    for i, part in enumerate(spec.slices):
        for source, start in part.starts.items():
            have = layer_counts[source]
            if start + part.length > have:
                return (f"slices[{i}]: layers {start}..{start + part.length - 1} of source {source!r}, which has "
                        f"{have} layers (0..{have - 1})")
    return None


def toml_slices(error: ErrorAt, value: Any, names: Sequence[str], where: str = "merge.slices") -> tuple[RawSlice, ...]:
    """The ``[[merge.slices]]`` tables of a TOML manifest, each ``sources = [{ source = NAME,
    layers = [start, stop], parameters = { ... } }, ...]`` and an optional ``parameters`` table.

    Raises:
        whatever ``error`` makes: not an array of tables, an unknown key or source, a bad range.
    """
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise error(where, "expected [[merge.slices]] tables, each with sources = [{ source, layers }, ...]")
    out = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        _known(error, at, item, ("sources", "parameters"))
        sources = item.get("sources")
        if not isinstance(sources, list) or not sources or not all(isinstance(s, dict) for s in sources):
            raise error(f"{at}.sources", "expected an array of { source = NAME, layers = [start, stop] } tables")
        given = []
        for j, s in enumerate(sources):
            sat = f"{at}.sources[{j}]"
            _known(error, sat, s, ("source", "layers", "parameters"))
            if s.get("source") not in names:
                raise error(f"{sat}.source", f"expected one of the sources ({', '.join(names)}), found "
                                             f"{s.get('source')!r:.60}")
            rng = s.get("layers")
            if not (isinstance(rng, list) and len(rng) == 2 and all(type(x) is int for x in rng)
                    and 0 <= rng[0] < rng[1]):
                raise error(f"{sat}.layers", f"expected [start, stop] with 0 <= start < stop (stop excluded), "
                                             f"found {rng!r:.60}")
            given.append(SliceSource(s["source"], rng[0], rng[1], s.get("parameters", {}), sat))
        out.append(RawSlice(tuple(given), item.get("parameters", {}), at))
    return tuple(out)


def _known(error: ErrorAt, where: str, table: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in table:
        if key not in allowed:
            raise error(f"{where}.{key}", f"unknown key; expected one of: {', '.join(allowed)}")


def merged_runs(spec: MergeSpec) -> list[str]:
    """The output layers of each slice and the layers of each source they merge, for ``plan``:
    ``out 3..6  <-  base 1..4 + ft0 2..5``."""
    def span(a: int, n: int) -> str:
        return f"{a}..{a + n - 1}" if n > 1 else str(a)

    lines, at = [], 0
    for part in spec.slices:
        lines.append(f"  out {span(at, part.length):>9}  <-  "
                     + " + ".join(f"{s} {span(a, part.length)}" for s, a in part.starts.items()))
        at += part.length
    return lines

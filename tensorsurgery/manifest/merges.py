"""Merge methods as data (pure): what a ``[merge]`` table or a mergekit YAML asks for, checked, and
each tensor's parameters resolved from it the way mergekit 0.1.5 resolves them.

A parameter's setting is a scalar, a gradient (a list of numbers, interpolated over the layers at
``t``) or a list of :class:`Conditional` values (the first whose ``filter`` is missing, ``"*"`` or
a substring of the tensor name applies). A model's own setting wins over the global one.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence, Union, cast

#: The methods that draw random numbers, and so need a seed (della's: :mod:`tensorsurgery.planning.della`).
RANDOM_METHODS = frozenset({"dare_linear", "dare_ties", "della", "della_linear"})
#: torch takes any 64-bit seed, but transformers.set_seed (mergekit's --random-seed) also seeds
#: numpy, which takes 0..2**32-1 only.
MAX_SEED = (1 << 32) - 1


def check_seed(error: Callable[[str], Exception], value: Any) -> int:
    """``value`` as a seed mergekit takes (an integer 0..2**32-1).

    Raises:
        whatever ``error(message)`` makes.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise error(f"expected an integer from 0 to {MAX_SEED} (mergekit's --random-seed), found {value!r:.60}")
    return value


Scalar = Union[bool, int, float, str]


@dataclass(frozen=True, slots=True)
class Conditional:
    """``value`` where ``filter`` (a substring of the tensor name; None or ``"*"``: any) matches."""

    value: Setting
    filter: str | None = None


Setting = Union[Scalar, tuple[Scalar, ...], tuple[Conditional, ...]]


@dataclass(frozen=True, slots=True)
class Parameter:
    """A parameter a method takes: ``kind`` float or bool; ``per_model`` ones are set per model
    (mergekit's input scope), the others once (shared); ``default`` None means required."""

    name: str
    kind: type
    per_model: bool
    default: float | bool | None = None
    #: Taken, as mergekit takes it, but it changes no byte for this method (density without
    #: sparsification, int8_mask).
    inert: bool = False


@dataclass(frozen=True, slots=True)
class Method:
    """A merge method: its parameters, and whether it takes a base model apart from the others."""

    name: str
    parameters: tuple[Parameter, ...]
    needs_base: bool
    #: How many models it merges besides the base (None: any number).
    max_models: int | None = None
    min_models: int = 1
    #: Takes a base when one is given, and merges the models alone when not (nuslerp: their
    #: differences from the base, or the models themselves).
    optional_base: bool = False

    def takes_base(self, base: str | None) -> bool:
        """Whether a merge with ``base`` (None: none given) treats it as a base apart from the models."""
        return base is not None and (self.needs_base or self.optional_base)

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)


_WEIGHT = Parameter("weight", float, True)
#: mergekit's registry: dare_linear and dare_ties take the same parameters, normalize off and
#: rescale on by default.
_DARE = (_WEIGHT, Parameter("density", float, True, 1.0), Parameter("normalize", bool, False, False),
         Parameter("rescale", bool, False, True), Parameter("lambda", float, False, 1.0),
         Parameter("int8_mask", bool, False, False, inert=True))
METHODS: Mapping[str, Method] = MappingProxyType({
    "linear": Method("linear", (_WEIGHT, Parameter("normalize", bool, False, True)), needs_base=False),
    "task_arithmetic": Method("task_arithmetic", (
        _WEIGHT, Parameter("normalize", bool, False, False), Parameter("lambda", float, False, 1.0),
        Parameter("density", float, True, 1.0, inert=True), Parameter("rescale", bool, False, False, inert=True),
        Parameter("int8_mask", bool, False, False, inert=True)), needs_base=True),
    "ties": Method("ties", (
        _WEIGHT, Parameter("density", float, True, 1.0), Parameter("normalize", bool, False, True),
        Parameter("lambda", float, False, 1.0), Parameter("rescale", bool, False, False),
        Parameter("int8_mask", bool, False, False, inert=True)), needs_base=True),
    **{name: Method(name, (
        _WEIGHT, Parameter("density", float, True, 1.0), Parameter("gamma", float, True, 0.01),
        Parameter("normalize", bool, False, False), Parameter("lambda", float, False, 1.0),
        Parameter("rescale", bool, False, False), Parameter("int8_mask", bool, False, False, inert=True)),
        needs_base=True) for name in ("breadcrumbs", "breadcrumbs_ties")},
    "slerp": Method("slerp", (Parameter("t", float, False),), needs_base=True, max_models=1),
    "model_stock": Method("model_stock", (Parameter("filter_wise", bool, False, False),), needs_base=True,
                          min_models=2),
    **{name: Method(name, _DARE, needs_base=True) for name in ("dare_linear", "dare_ties")},
    "nuslerp": Method("nuslerp", (_WEIGHT, Parameter("nuslerp_row_wise", bool, False, False),
                                  Parameter("nuslerp_flatten", bool, False, True)),
                      needs_base=False, optional_base=True, min_models=2, max_models=2),
    "multislerp": Method("multislerp", (_WEIGHT, Parameter("normalize_weights", bool, False, True),
                                        Parameter("eps", float, False, 1e-8)),
                         needs_base=False, optional_base=True),
    **{name: Method(name, (
        _WEIGHT, Parameter("density", float, True, 1.0), Parameter("epsilon", float, True, 0.15),
        Parameter("normalize", bool, False, name == "della"), Parameter("rescale", bool, False, True),
        Parameter("lambda", float, False, 1.0), Parameter("int8_mask", bool, False, False, inert=True)),
        needs_base=True) for name in ("della", "della_linear")},
    "sce": Method("sce", (Parameter("select_topk", float, False, 1.0),
                          Parameter("int8_mask", bool, False, False, inert=True)), needs_base=True),
    "nearswap": Method("nearswap", (Parameter("t", float, False),), needs_base=True, max_models=1),
    "ram": Method("ram", (Parameter("epsilon", float, False, 1e-5),), needs_base=True),
    "ramplus_tl": Method("ramplus_tl", (Parameter("r", float, False, 0.1), Parameter("alpha", float, False, 0.2),
                                        Parameter("epsilon", float, False, 1e-5)), needs_base=True),
    "arcee_fusion": Method("arcee_fusion", (), needs_base=True, max_models=1),
    "karcher": Method("karcher", (Parameter("max_iter", float, False, 10), Parameter("tol", float, False, 1e-5)),
                      needs_base=False),
})
#: The methods whose result torch promotes to float32 (by a float32 factor or mask): mergekit writes
#: it so unless ``out_dtype`` says otherwise, so the merge dtype does not cast their output.
FLOAT32_RESULTS = frozenset({"ramplus_tl", "arcee_fusion"})
#: The parameters of mergekit's other methods: a config written for one may carry them, and
#: mergekit ignores those a method does not take; so do we (a name outside this list is a typo).
MERGEKIT_PARAMETERS = ("weight", "density", "epsilon", "gamma", "lambda", "normalize", "rescale", "t", "int8_mask",
                       "filter_wise", "select_topk", "nuslerp_flatten", "nuslerp_row_wise", "k", "lambda_",
                       "normalize_weights", "eps", "r", "alpha", "max_iter", "tol")


@dataclass(frozen=True, slots=True)
class MergeModel:
    """A model in the merge: a source name and its own parameter settings."""

    source: str
    parameters: Mapping[str, Setting]


@dataclass(frozen=True, slots=True)
class MergeSlice:
    """A slice of a merge of parts of models (mergekit's ``slices``): ``length`` output layers,
    output layer ``i`` of it the merge of layer ``starts[s] + i`` of each source ``s``. ``models``
    are its merged models in the order given (the base not among them for a method that takes
    one), each with its own parameters (a source's in the slice); ``parameters`` the slice's."""

    models: tuple[MergeModel, ...]
    starts: Mapping[str, int]
    length: int
    parameters: Mapping[str, Setting]
    #: Whether the merge's base is among the slice's sources (a method that takes one needs it).
    has_base: bool = False

    def sources(self, base: str | None, takes_base: bool) -> tuple[str, ...]:
        """The sources read for each of its tensors, in input order: the base first (when the
        method takes it apart from the models)."""
        return ((base,) if base and takes_base and self.has_base else ()) + tuple(m.source for m in self.models)


@dataclass(frozen=True, slots=True)
class MergeSpec:
    """A checked merge: ``method``; ``models`` in order (the base not among them for a method that
    takes one); ``base`` its source; global ``parameters``; the merge ``dtype`` (safetensors code;
    None: the inputs' promoted dtype)."""

    method: str
    models: tuple[MergeModel, ...]
    base: str | None
    parameters: Mapping[str, Setting]
    dtype: str | None = None
    #: Parameter names given that this method ignores (as mergekit does), for ``plan`` to say so.
    ignored: tuple[str, ...] = ()
    #: The slices of a merge of parts of models, in output order (:mod:`tensorsurgery.manifest.merge_slices`);
    #: empty when the models are merged whole.
    slices: tuple[MergeSlice, ...] = ()
    #: The seed of torch's random generator (mergekit's ``--random-seed``), for the methods that
    #: draw (DARE); None: not given.
    seed: int | None = None
    #: mergekit's ``tokenizer_source``: ``"base"``, ``"union"`` or a merged source's name (its
    #: tokenizer files are the output's); None: not given (:mod:`tensorsurgery.planning.vocabulary`).
    tokenizer_source: str | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        """The sources read for every merged tensor, in input order: the base first."""
        return ((self.base,) if self.base is not None and METHODS[self.method].takes_base(self.base) else ()) + \
            tuple(m.source for m in self.models)


#: Makes the one-line error for ``where`` (a key path) and a message.
ErrorAt = Callable[[str, str], Exception]


def check_method(error: ErrorAt, method: Any, where: str = "merge") -> Method:
    """The method called ``method``.

    Raises:
        whatever ``error`` makes: an unknown method (every method of mergekit 0.1.5 that needs no
            forward pass is built).
    """
    if not isinstance(method, str) or method not in METHODS:
        raise error(f"{where}.method", f"expected one of: {', '.join(METHODS)}, found {method!r:.60}")
    return METHODS[method]


def merge_spec(error: ErrorAt, method: Any, models: Sequence[tuple[str, Mapping[str, Any], str]],
               base: str | None, parameters: Mapping[str, Any], dtype: str | None,
               where: str = "merge") -> MergeSpec:
    """A :class:`MergeSpec` from raw values (TOML or YAML), checked; ``models`` are (source, raw
    parameters, key path) in order; ``error(where, message)`` makes the exception raised.

    Raises:
        whatever ``error`` makes: an unknown method, a parameter it does not know or of the wrong
        type, a missing required weight, a base missing or given where it is not taken.
    """
    spec = check_method(error, method, where)
    if not models:
        raise error(f"{where}.models", f"no models to merge; {method} needs at least one")
    ignored: list[str] = []
    shared = _settings(error, spec, parameters, f"{where}.parameters", False, ignored)
    for p in spec.parameters:
        if not p.per_model and p.default is None and p.name not in shared:
            raise error(f"{where}.parameters", f"missing {p.name}; {method} needs one (a number, a gradient "
                                               f"[a, b, ...] or filtered values)")
    if spec.needs_base and base is None:
        raise error(f"{where}.base", f"missing; {method} adds the models' differences from a base model")
    if spec.takes_base(base):
        models = [m for m in models if m[0] != base]
        if not models:
            raise error(f"{where}.models", f"only the base; {method} needs another model")
    elif base is not None and base not in [m[0] for m in models]:
        raise error(f"{where}.base", f"{base!r} is not among the models; {method} takes no base of its own: list it "
                                     f"with its weight, or remove base")
    if len(models) < spec.min_models:
        raise error(f"{where}.models", f"{len(models)} model besides the base; {method} needs at least "
                                       f"{spec.min_models}")
    if spec.max_models == 1 and len(models) > 1:
        raise error(f"{where}.models", f"{len(models)} models besides the base; {method} interpolates the base "
                                       f"towards exactly 1: list the base and one other model")
    if spec.max_models is not None and len(models) > spec.max_models:
        raise error(f"{where}.models", f"{len(models)} models besides the base; {method} merges at most "
                                       f"{spec.max_models}")
    merged = []
    for source, raw, at in models:
        own = _settings(error, spec, raw, at, True, ignored)
        for p in spec.parameters:
            if p.per_model and p.default is None and p.name not in own and p.name not in shared:
                raise error(at, f"missing {p.name}; {method} needs a {p.name} for every model (or one in "
                                f"{where}.parameters)")
        merged.append(MergeModel(source, MappingProxyType(own)))
    return MergeSpec(method, tuple(merged), base, MappingProxyType(shared), dtype, tuple(dict.fromkeys(ignored)))


def check_settings(error: ErrorAt, spec: Method, raw: Mapping[str, Any], where: str, per_model: bool,
                   ignored: list[str]) -> dict[str, Setting]:
    """The parameter settings ``raw`` (at key path ``where``) checked for method ``spec``: a
    model's own (``per_model``) or shared ones; names ``spec`` does not take but mergekit knows
    are added to ``ignored``.

    Raises:
        whatever ``error`` makes: an unknown parameter, a value of the wrong type, a shared
        parameter set per model.
    """
    return _settings(error, spec, raw, where, per_model, ignored)


def _settings(error: ErrorAt, spec: Method, raw: Mapping[str, Any], where: str, per_model: bool,
              ignored: list[str]) -> dict[str, Setting]:
    if not isinstance(raw, Mapping):
        raise error(where, f"expected a table of parameters, found {raw!r:.60}")
    out: dict[str, Setting] = {}
    for name, value in raw.items():
        p = spec.parameter(name)
        if p is None:
            if name not in MERGEKIT_PARAMETERS:
                raise error(f"{where}.{name}", f"unknown parameter; {spec.name} takes: "
                                               f"{', '.join(q.name for q in spec.parameters)}")
            ignored.append(name)
            continue
        if per_model and not p.per_model:
            raise error(f"{where}.{name}", "is set once for the merge, not per model (mergekit ignores it "
                                           "here); move it to the global parameters")
        out[name] = _setting(error, f"{where}.{name}", value, p.kind)
    return out


def _setting(error: ErrorAt, where: str, value: Any, kind: type) -> Setting:
    """A raw value as a :data:`Setting`, its scalars checked against ``kind``."""
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, (list, tuple)):
        if not value:
            raise error(where, "is an empty list; give a value, a gradient [a, b, ...] or filtered values")
        if all(isinstance(v, Mapping) for v in value):
            conds = []
            for i, v in enumerate(value):
                extra = set(v) - {"value", "filter"}
                if extra or "value" not in v:
                    raise error(f"{where}[{i}]", "expected { filter = \"self_attn\", value = ... } (filter optional)")
                f = v.get("filter")
                if f is not None and not isinstance(f, str):
                    raise error(f"{where}[{i}].filter", f"expected a string, found {f!r:.60}")
                conds.append(Conditional(_setting(error, f"{where}[{i}].value", v["value"], kind), f))
            return tuple(conds)
        if any(isinstance(v, (Mapping, list, tuple)) for v in value):
            raise error(where, "mixes values and filtered values; give a gradient of numbers or a list of "
                               "{ filter, value } tables")
        return tuple(_scalar(error, f"{where}[{i}]", v, kind) for i, v in enumerate(value))
    return _scalar(error, where, value, kind)


def _scalar(error: ErrorAt, where: str, value: Any, kind: type) -> Scalar:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise error(where, f"expected true or false, found {value!r:.60}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise error(where, f"expected a number, found {value!r:.60}")
    try:
        number = float(value)  # mergekit takes "1e-3" (YAML reads it as a string) as a number
    except ValueError:
        raise error(where, f"expected a number, found {value!r:.60}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise error(where, f"expected a finite number, found {value!r:.60}")
    return number


def evaluate(setting: Setting, tensor_name: str, t: float, kind: type) -> float | bool | None:
    """The value of ``setting`` for tensor ``tensor_name`` at ``t`` (0..1 across a slice's layers),
    as mergekit's ``evaluate_setting``: filters first match, numeric gradients interpolated
    linearly between neighbouring entries, booleans of a list picked by position; None when no
    filter matches."""
    if isinstance(setting, Conditional):
        setting = (setting,)
    if not isinstance(setting, tuple):
        return _valid(setting, kind)
    if all(not isinstance(e, Conditional) for e in setting):
        values = [_valid(e, kind) for e in setting]  # type: ignore[arg-type]
        if kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return float((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        assert isinstance(cond, Conditional)
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return evaluate(cond.value, tensor_name, t, kind)
    return None


def _valid(value: Scalar, kind: type) -> float | bool:
    return cast(bool, value) if kind is bool else float(value)  # a bool setting was checked to be one


@dataclass(frozen=True, slots=True)
class Resolved:
    """One tensor's parameters: the shared ones by name, and each model's own, in model order."""

    shared: Mapping[str, float | bool]
    per_model: tuple[Mapping[str, float | bool], ...]
    #: A base is among the inputs (the first), apart from the models: for a method whose base is
    #: optional (nuslerp).
    base: bool = False


class MissingParameter(Exception):
    """A required parameter has no value for a tensor (no filter matched)."""


def resolve(spec: MergeSpec, tensor_name: str, t: float, part: MergeSlice | None = None,
            names: Sequence[str] = ()) -> Resolved:
    """Each parameter of ``spec``'s method for ``tensor_name`` at ``t``: a model's own setting
    (a source's in the slice ``part``), then the slice's, then the global one, then the default
    (mergekit's precedence). A model's own parameters are filtered by the name of its input
    (``names``, in model order; default ``tensor_name``), as mergekit filters them: in a slice
    that is its own layer's name.

    Raises:
        MissingParameter: a required parameter that no setting gives for this tensor.
    """
    method = METHODS[spec.method]
    models = part.models if part is not None else spec.models
    around = (part.parameters, spec.parameters) if part is not None else (spec.parameters,)

    def one(p: Parameter, scopes: Sequence[Mapping[str, Setting]], model: str | None,
            name: str = tensor_name) -> float | bool:
        for scope in scopes:
            if p.name in scope:
                value = evaluate(scope[p.name], name, t, p.kind)
                if value is not None:
                    return value
        if p.default is None:
            who = f"model {model!r}, " if model else ""
            raise MissingParameter(f"{who}tensor {tensor_name!r}: no {p.name} applies (no filter matches); "
                                   f"add a value without a filter")
        return p.default

    shared = {p.name: one(p, around, None) for p in method.parameters if not p.per_model}
    names = names or (tensor_name,) * len(models)
    per_model = tuple(MappingProxyType({p.name: one(p, (m.parameters, *around), m.source, name)
                                        for p in method.parameters if p.per_model})
                      for m, name in zip(models, names, strict=True))
    return Resolved(MappingProxyType(shared), per_model, method.takes_base(spec.base))


def setting_data(setting: Setting) -> Any:
    """A setting as JSON-ready data, as written: a scalar, a gradient list, or a list of
    ``{"filter", "value"}`` objects."""
    if isinstance(setting, tuple):
        return [{"filter": s.filter, "value": setting_data(s.value)} if isinstance(s, Conditional) else s
                for s in setting]
    return setting


def spec_data(spec: MergeSpec) -> dict[str, Any]:
    """The merge as JSON-ready data (for the record and ``plan --json``)."""
    return {"method": spec.method, "base": spec.base, "dtype": spec.dtype,
            "parameters": {k: setting_data(v) for k, v in spec.parameters.items()},
            "models": [{"source": m.source, "parameters": {k: setting_data(v) for k, v in m.parameters.items()}}
                       for m in spec.models],
            "ignored": list(spec.ignored), **({"seed": spec.seed} if spec.seed is not None else {}),
            **({"slices": [_slice_data(s) for s in spec.slices]} if spec.slices else {}),
            **({"tokenizer_source": spec.tokenizer_source} if spec.tokenizer_source is not None else {})}


def _slice_data(part: MergeSlice) -> dict[str, Any]:
    return {"layers": part.length, "starts": dict(part.starts),
            "parameters": {k: setting_data(v) for k, v in part.parameters.items()},
            "models": [{"source": m.source, "parameters": {k: setting_data(v) for k, v in m.parameters.items()}}
                       for m in part.models]}


def describe(spec: MergeSpec) -> str:
    """The merge in one line, as ``plan`` and the model card say it."""
    onto = f" onto {spec.base}" if METHODS[spec.method].takes_base(spec.base) else ""
    dtype = f", computed in {spec.dtype}" if spec.dtype else ""
    dtype += f", seed {spec.seed}" if spec.seed is not None else ""
    dtype += f", tokenizer from {spec.tokenizer_source}" if spec.tokenizer_source is not None else ""
    ignored = f"; ignored (not {spec.method}'s): {', '.join(spec.ignored)}" if spec.ignored else ""
    dtype += f", in {len(spec.slices)} slices of {sum(s.length for s in spec.slices)} layers" if spec.slices else ""
    return f"{spec.method} of {', '.join(m.source for m in spec.models)}{onto}{dtype}{ignored}"


def check_tokenizer_source(error: ErrorAt, value: Any, sources: Mapping[str, str], where: str) -> str | None:
    """mergekit's ``tokenizer_source`` checked: ``base``, ``union``, or a merged model, given as
    the key of ``sources`` (its source name the value), the way the manifest names models.

    Raises:
        whatever ``error`` makes: another value.
    """
    if value is None or value in ("base", "union"):
        return None if value is None else str(value)
    if isinstance(value, str) and value in sources:
        return sources[value]
    raise error(where, f"{value!r} is not base, union or one of the merged models ({', '.join(sources)})")

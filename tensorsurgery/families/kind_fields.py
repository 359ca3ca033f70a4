"""Config fields that say which layers are of a kind by a rule rather than one value per layer
(pure data and arithmetic; :mod:`tensorsurgery.planning.config` applies them).

Each field reads, from a source's config, whether each of its layers is of ``kind`` (:meth:`decode`),
and writes, for the output's layers (each as its source layer), the values of its config keys that
say the same (:meth:`encode`), or says why none can (:class:`Unexpressible`):

* :class:`PeriodOffset`: layer ``i`` is of the kind when ``i % period == offset`` (Jamba's
  ``attn_layer_period`` / ``attn_layer_offset``, ``expert_layer_period`` / ``expert_layer_offset``):
  kept when they still describe the output, else another period and offset that do, else refused.
* :class:`KindIndices`: a list of the indices of the layers of the kind (Bamba's
  ``attn_layer_indices``, LFM2's ``full_attn_idxs``, Zamba2's ``hybrid_layer_ids``): a new list.
* :class:`PatternString`: one letter per layer (Nemotron-H's ``hybrid_override_pattern``), or a
  string repeated over the layers (EXAONE 4's ``sliding_window_pattern`` ``"LLLG"``): the same string
  when it still describes the output, else one letter per output layer.
* :class:`SpanInterval`: layer ``i`` is of the kind when ``start <= i <= end`` and
  ``(i + 1) % interval == 0`` (ERNIE 4.5 MoE's ``moe_layer_*``): kept, else the values that do
  (there is one best choice: see :meth:`SpanInterval.encode`), else refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from tensorsurgery.families.layers import LayerRef


class Unexpressible(Exception):
    """No values of a field describe the output's layers: ``layer`` is the first output layer the
    field's kept values describe wrongly, ``rule`` says what those values can say, ``said`` what
    they say of that layer (None: they say nothing of it), ``why`` why no other values do."""

    def __init__(self, layer: int, rule: str, why: str, said: Any = None) -> None:
        super().__init__(rule)
        self.layer, self.rule, self.why, self.said = layer, rule, why, said


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _every(n: int) -> str:
    """``"every layer"``, ``"every 4th layer"``."""
    return "every layer" if n == 1 else f"every {_ordinal(n)} layer"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _first_wrong(said: Sequence[bool], kinds: Sequence[bool]) -> int:
    return next(i for i, (a, b) in enumerate(zip(said, kinds)) if a != b)


def _positions(kinds: Sequence[bool]) -> str:
    """``[F, T, T, F, T]`` -> ``"1-2, 4"`` (``"none"`` when empty)."""
    runs: list[list[int]] = []
    for i, k in enumerate(kinds):
        if not k:
            continue
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


@dataclass(frozen=True, slots=True)
class PeriodOffset:
    """Layer ``i`` is ``kind`` (else ``other``) when ``i % period == offset``; config keys ``key``
    (the period) and ``offset_key``, transformers' defaults when absent."""

    key: str
    offset_key: str
    kind: str
    other: str
    default_period: int
    default_offset: int

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key, self.offset_key)

    def present(self, text: Mapping[str, Any]) -> bool:
        return True  # absent keys are transformers' defaults: they describe layers all the same

    def _values(self, text: Mapping[str, Any]) -> tuple[Any, Any]:
        return text.get(self.key, self.default_period), text.get(self.offset_key, self.default_offset)

    def decode(self, text: Mapping[str, Any], n: int) -> list[bool] | None:
        period, offset = self._values(text)
        if not (_int(period) and _int(offset)) or period <= 0:
            return None
        return [i % period == offset for i in range(n)]

    def encode(self, text: Mapping[str, Any], kinds: Sequence[Any], refs: Sequence[LayerRef]) -> dict[str, Any]:
        n = len(kinds)
        kept = self.decode(text, n)
        if kept == list(kinds):
            return {}
        found = _period_offset(kinds)
        if found is not None:
            return {self.key: found[0], self.offset_key: found[1]}
        period, offset = self._values(text)
        rule = (f"{_every(period)} from {offset} is {self.kind} ({self.key} = {period}, "
                f"{self.offset_key} = {offset})")
        at = _first_wrong(kept or [False] * n, kinds)
        raise Unexpressible(at, rule, f"no period and offset make layers {_positions(kinds)} of {n} the "
                                      f"{self.kind} layers", said=not kinds[at])


def _period_offset(kinds: Sequence[bool]) -> tuple[int, int] | None:
    """The period and offset (offset < period, as transformers requires) whose layers of the kind
    are exactly ``kinds``, or None."""
    n = len(kinds)
    at = [i for i, k in enumerate(kinds) if k]
    if not at:
        return n + 1, n  # offset past the last layer: no layer of the kind
    if len(at) == 1:
        return max(at[0] + 1, n - at[0]), at[0]
    period = at[1] - at[0]
    if any(b - a != period for a, b in zip(at, at[1:])) or at[0] >= period or at[-1] + period < n:
        return None
    return period, at[0]


@dataclass(frozen=True, slots=True)
class KindIndices:
    """A config list of the indices of the layers of ``kind``. ``of``: a per-layer list and its
    value for the kind (``("layers_block_type", "hybrid")``) that says the same and that
    transformers reads first (the layers are read from it when a config has it). With ``in_order``,
    the layers of the kind may move but not repeat or change order (``why`` says what ties them:
    Zamba2's hybrid layers share transformer blocks whose adapters are numbered by hybrid layer)."""

    key: str
    kind: str
    of: tuple[str, str] | None = None
    in_order: bool = False
    why: str = ""

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def present(self, text: Mapping[str, Any]) -> bool:
        return isinstance(text.get(self.key), list) or (self.of is not None and isinstance(text.get(self.of[0]), list))

    def decode(self, text: Mapping[str, Any], n: int) -> list[bool] | None:
        if self.of is not None and isinstance(text.get(self.of[0]), list):
            values = text[self.of[0]]
            return [v == self.of[1] for v in values] if len(values) == n else None
        value = text.get(self.key)
        if value is None:
            return [False] * n  # transformers: no list, no layer of the kind
        if not isinstance(value, list) or not all(_int(i) for i in value):
            return None
        return [i in value for i in range(n)]

    def encode(self, text: Mapping[str, Any], kinds: Sequence[Any], refs: Sequence[LayerRef]) -> dict[str, Any]:
        if self.in_order:
            _check_in_order(self, kinds, refs)
        # Written where config.json has the list (LFM2's full_attn_idxs may be null beside layer_types).
        return {self.key: [i for i, k in enumerate(kinds) if k]} if isinstance(text.get(self.key), list) else {}


def _check_in_order(field: KindIndices, kinds: Sequence[Any], refs: Sequence[LayerRef]) -> None:
    seen: dict[LayerRef, int] = {}
    last: LayerRef | None = None
    for i, (k, ref) in enumerate(zip(kinds, refs)):
        if not k:
            continue
        if ref in seen or (last is not None and (last.source != ref.source or last.layer > ref.layer)):
            what = (f"it is output layer {seen[ref]} already" if ref in seen or last is None else
                    f"it follows {field.kind} layer {last.layer} of source {last.source!r}, which comes after it")
            rule = f"its {field.kind} layers appear once each, in their order"
            raise Unexpressible(i, rule, f"{what} ({field.why})")
        seen[ref], last = i, ref


@dataclass(frozen=True, slots=True)
class PatternString:
    """A config string with one letter per layer (``repeats``: the string is repeated over the
    layers, layer ``i`` is letter ``i % len``). ``kind`` is not one kind but the letter itself."""

    key: str
    repeats: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def present(self, text: Mapping[str, Any]) -> bool:
        return isinstance(text.get(self.key), str) and bool(text[self.key])

    def decode(self, text: Mapping[str, Any], n: int) -> list[str] | None:
        value = text.get(self.key)
        if not isinstance(value, str) or not value or (not self.repeats and len(value) != n):
            return None
        return [value[i % len(value)] for i in range(n)]

    def encode(self, text: Mapping[str, Any], kinds: Sequence[Any], refs: Sequence[LayerRef]) -> dict[str, Any]:
        if self.decode(text, len(kinds)) == list(kinds):
            return {}
        return {self.key: "".join(kinds)}


@dataclass(frozen=True, slots=True)
class SpanInterval:
    """Layer ``i`` is ``kind`` (else ``other``) when ``start <= i <= end`` and ``(i + 1) % interval
    == 0``; ``end`` -1 is the last layer. Keys ``start_key``, ``end_key``, ``key`` (the interval)."""

    key: str
    start_key: str
    end_key: str
    kind: str
    other: str
    defaults: tuple[int, int, int]  # start, end, interval

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.start_key, self.end_key, self.key)

    def present(self, text: Mapping[str, Any]) -> bool:
        return True

    def _values(self, text: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        start, end, interval = self.defaults
        return text.get(self.start_key, start), text.get(self.end_key, end), text.get(self.key, interval)

    def decode(self, text: Mapping[str, Any], n: int) -> list[bool] | None:
        start, end, interval = self._values(text)
        if not all(_int(v) for v in (start, end, interval)) or interval <= 0:
            return None
        end = n - 1 if end == -1 else end
        return [start <= i <= end and (i + 1) % interval == 0 for i in range(n)]

    def encode(self, text: Mapping[str, Any], kinds: Sequence[Any], refs: Sequence[LayerRef]) -> dict[str, Any]:
        n = len(kinds)
        kept = self.decode(text, n)
        if kept == list(kinds):
            return {}
        start, end, interval = self._values(text)
        at = [i for i, k in enumerate(kinds) if k]
        if not at:
            return {self.start_key: n, self.end_key: -1 if end == -1 else n}
        # The interval divides every (i + 1) of the kind, so it divides their gcd g; a smaller one
        # only adds layers between the first and the last: if g fails, every interval does.
        g = math.gcd(*(i + 1 for i in at))
        if [at[0] <= i <= at[-1] and (i + 1) % g == 0 for i in range(n)] == list(kinds):
            last = -1 if end == -1 and at[-1] == n - 1 else at[-1]
            return {self.start_key: at[0], self.end_key: last, self.key: g}
        rule = (f"{_every(interval)} from {start} to "
                f"{'the last' if end == -1 else end} is {self.kind} ({self.start_key} = {start}, "
                f"{self.end_key} = {end}, {self.key} = {interval})")
        wrong = _first_wrong(kept or [False] * n, kinds)
        raise Unexpressible(wrong, rule, f"no start, end and interval make layers {_positions(kinds)} of {n} the "
                                         f"{self.kind} layers", said=not kinds[wrong])


KindField = Union[PeriodOffset, KindIndices, PatternString, SpanInterval]


def kind_name(field: KindField, value: Any) -> str:
    """What a decoded value says of a layer, for messages."""
    if isinstance(field, PatternString):
        return repr(value)
    if isinstance(field, KindIndices):
        return field.kind if value else f"not {field.kind}"
    return field.kind if value else field.other

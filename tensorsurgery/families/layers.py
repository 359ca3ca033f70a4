"""Layer arrangements and the ``layers.N`` segment of tensor names.

An arrangement is the list of (source, layer) pairs that become output layers 0, 1, 2, ...
The general DUS/iDUS rule (SOLAR, arXiv 2312.15166): copy A is layers ``0..n-m-1``, copy B is
layers ``m..n-1``; both are cut into groups of ``g`` and interleaved A1, B1, A2, B2, ...
DUS is ``g = n - m``; iDUS-1 is ``g = 1``; iDUS-8 is ``g = 8``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class LayerScheme:
    """Where a model's decoder layers live in tensor names.

    ``prefixes`` are the dotted paths of the layer lists (``("model.layers",)``, or
    ``("model.language_model.layers",)`` for a multimodal model whose vision tower has layers of
    its own); ``None`` is the generic rule: the first ``layers.N`` segment anywhere in a name.
    """

    prefixes: tuple[str, ...] | None = None
    #: The prefixes with their dot, longest first (so ``transformer.h.`` wins over ``h.``).
    _heads: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        heads = sorted(self.prefixes or (), key=len, reverse=True)
        object.__setattr__(self, "_heads", tuple(p + "." for p in heads))

    def split(self, name: str) -> tuple[str, int, str] | None:
        """``(head, index, tail)`` of a decoder layer tensor's name (``("model.layers.", 12,
        ".mlp.up_proj.weight")``), or None outside the decoder layers. String operations, not a
        regex: planning splits every name, 1.7M of them in the largest headers."""
        if self.prefixes is None:
            start = 0
            while (i := name.find("layers.", start)) >= 0:
                if i == 0 or name[i - 1] == ".":
                    found = _index_at(name, i + 7)
                    if found is not None:
                        return name[:i + 7], found[0], name[found[1]:]
                start = i + 1
            return None
        for head in self._heads:
            if name.startswith(head):  # _index_at inlined: this runs for every tensor of a plan
                start = len(head)
                end = name.find(".", start)
                digits = name[start:] if end < 0 else name[start:end]
                return (head, int(digits), name[start + len(digits):]) if digits.isdecimal() else None
        return None

    def index(self, name: str) -> int | None:
        """The decoder layer index in ``name`` (``model.layers.12.mlp...`` -> 12), or None."""
        parts = self.split(name)
        return parts[1] if parts else None

    def suffix(self, name: str) -> str | None:
        """``name`` after its layer index (``model.layers.3.mlp.up_proj.weight`` -> ``mlp.up_proj.weight``),
        or None outside the decoder layers."""
        parts = self.split(name)
        return parts[2][1:] if parts else None

    def with_index(self, name: str, index: int) -> str:
        """``name`` with its decoder layer index set to ``index``.

        Raises:
            ValueError: ``name`` is not a decoder layer tensor (a programming error, not user input).
        """
        parts = self.split(name)
        if parts is None:
            raise ValueError(f"{name!r} has no decoder layer index")
        return f"{parts[0]}{index}{parts[2]}"


def _index_at(name: str, start: int) -> tuple[int, int] | None:
    """``(index, end)`` of the layer index at ``start`` of ``name``: a whole dotted segment of
    decimal digits, so "layers.1." never matches inside "layers.11." and
    "model.layers.3.mlp.experts.1.w" has one decoder index, 3. None if the segment is not one."""
    end = name.find(".", start)
    if end < 0:
        end = len(name)
    digits = name[start:end]
    return (int(digits), end) if digits.isdecimal() else None


GENERIC_LAYERS = LayerScheme()


@dataclass(frozen=True, slots=True)
class LayerRef:
    """Output layer taken from ``layer`` of the source called ``source``."""

    source: str
    layer: int


def keep(n: int) -> tuple[int, ...]:
    """Every layer once, in order: ``0..n-1``."""
    return tuple(range(n))


def interlock(n: int, overlap: int, group: int) -> tuple[int, ...]:
    """Source layer for each output layer of a (interlocked) depth up-scale.

    Args:
        n: layers in the source.
        overlap: ``m``, layers cut from the end of copy A and from the start of copy B.
        group: ``g``, layers per group; ``n - overlap`` gives plain DUS.

    Example:
        >>> interlock(8, 2, 2)
        (0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7)
    """
    a = range(0, n - overlap)
    b = range(overlap, n)
    out: list[int] = []
    for i in range(0, len(a), group):
        out += a[i:i + group]
        out += b[i:i + group]
    return tuple(out)


def dus(n: int, overlap: int) -> tuple[int, ...]:
    """SOLAR depth up-scaling: ``0..n-m-1`` then ``m..n-1`` (n=32, m=8: 48 layers)."""
    return interlock(n, overlap, n - overlap)


def seams(arrangement: tuple[LayerRef, ...]) -> tuple[tuple[int, int], ...]:
    """Positions where the source does not continue from the previous output layer.

    Returns ``(position, jump)`` pairs: output layer ``position`` takes a layer ``jump`` away from
    ``previous + 1`` (negative when it goes back; a change of source counts with the raw
    difference). The 'layer distance' DUS and iDUS are about.
    """
    out = []
    for pos in range(1, len(arrangement)):
        prev, cur = arrangement[pos - 1], arrangement[pos]
        if cur.source != prev.source or cur.layer != prev.layer + 1:
            out.append((pos, cur.layer - (prev.layer + 1)))
    return tuple(out)


def layer_runs(layers: tuple[LayerRef, ...]) -> list[tuple[int, int, str, int, int]]:
    """Maximal runs where the source continues: ``(out_start, out_end, source, src_start, src_end)``,
    inclusive bounds."""
    runs: list[list[Any]] = []
    for pos, ref in enumerate(layers):
        if runs and runs[-1][2] == ref.source and runs[-1][4] + 1 == ref.layer:
            runs[-1][1], runs[-1][4] = pos, ref.layer
        else:
            runs.append([pos, pos, ref.source, ref.layer, ref.layer])
    return [tuple(r) for r in runs]


def span(a: int, b: int) -> str:
    """``a..b``, or ``a`` when they are equal."""
    return f"{a}" if a == b else f"{a}..{b}"

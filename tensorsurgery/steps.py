"""The typed steps that turn source bytes into output bytes, as planning records them (pure data;
:mod:`tensorsurgery.transforms` applies them to bounded chunks while bytes stream):

* :class:`RowSlice`: a contiguous row range of a fused tensor (Phi-3's ``qkv_proj``), which is a
  byte range, so it costs nothing at run time;
* :class:`PermuteRotary`: the rotary row permutation of Mistral's native format, one head at a time;
* :class:`Cast`: a dtype cast;
* :class:`Zeros`: a tensor the source lacks (a bias the target architecture needs), all zero bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Union


@dataclass(frozen=True, slots=True)
class RowSlice:
    """Rows ``start..stop-1`` of a source tensor of ``rows`` rows (its byte range is narrowed)."""

    start: int
    stop: int
    rows: int
    label: ClassVar[str] = "slice"


@dataclass(frozen=True, slots=True)
class PermuteRotary:
    """Mistral/Meta interleaved rotary pairs to Hugging Face's half-split rows, per head of
    ``rows / heads`` rows (see :func:`rotary_row_order`)."""

    heads: int
    label: ClassVar[str] = "permute"


@dataclass(frozen=True, slots=True)
class Cast:
    """Elements of safetensors dtype ``source`` to ``target`` (bitwise as torch's ``.to()``)."""

    source: str
    target: str
    label: ClassVar[str] = "cast"


@dataclass(frozen=True, slots=True)
class Zeros:
    """No source: every byte of the tensor is zero."""

    label: ClassVar[str] = "zeros"


Step = Union[RowSlice, PermuteRotary, Cast, Zeros]


@lru_cache(maxsize=256)
def describe(steps: tuple[Step, ...]) -> str:
    """The steps as one word each, in order (``"permute+cast"``); ``"none"`` for a verbatim copy."""
    return "+".join(step.label for step in steps) or "none"


def rotary_row_order(rows: int, heads: int) -> tuple[int, ...]:
    """Source row of each output row when converting Mistral/Meta interleaved rotary pairs to
    Hugging Face's half-split layout (transformers' ``permute`` in its conversion scripts):
    within each head, even rows first, then odd rows.

    Raises:
        ValueError: rows do not split into ``heads`` heads of even size.
    """
    if heads <= 0 or rows % heads or (rows // heads) % 2:
        raise ValueError(f"{rows} rows do not split into {heads} heads of an even size")
    d = rows // heads
    return tuple(h * d + 2 * i + j for h in range(heads) for j in (0, 1) for i in range(d // 2))

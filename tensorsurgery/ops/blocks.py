"""The inputs of a two-pass operation read in fixed blocks of elements, for its statistic."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from tensorsurgery.formats.dtypes import element_size
from tensorsurgery.io.byte_source import Reader
from tensorsurgery.ops.base import Input

#: Elements a statistic reads at a time: fixed, so a float sum over the blocks rounds the same way
#: whoever reads it (the writer, verify, --resume) and whatever their chunk size.
STAT_BLOCK = 1 << 16


def input_blocks(inputs: Sequence[Input], readers: Sequence[Reader], block: int = STAT_BLOCK
                 ) -> Iterator[tuple[int, list[np.ndarray]]]:
    """``(start, raws)`` for each block of ``block`` elements in order: ``raws`` the raw bytes
    (uint8) of elements ``start..`` of each input (read by ``readers``). The buffers are reused: each
    is valid until the next block is asked for."""
    sizes = [element_size(i.dtype) for i in inputs]
    count = inputs[0].range.length // sizes[0]
    buffers = [np.empty(min(block, count) * k, np.uint8) for k in sizes]
    for start in range(0, count, block):
        n = min(block, count - start)
        raws = []
        for i, reader, k, buf in zip(inputs, readers, sizes, buffers):
            raw = buf[:n * k]
            reader.read_into(raw.data, i.range.offset + start * k)
            raws.append(raw)
        yield start, raws

"""Per-thread scratch buffers for the chunks that bytes go through on their way (casts, heads,
inputs of computed tensors)."""
from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def scratch(n: int, slot: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """This thread's scratch buffers number ``slot``: ``n`` bytes for source bytes, ``2n`` for
    what is made of them. Reused across tensors: fresh multi-MB arrays per tensor make glibc raise
    its mmap threshold and keep the freed memory resident, which shows as creeping peak RSS.

    Each slot's buffers are valid until the next call for that slot on the same thread.
    """
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    have = buffers.get(slot)
    if have is None or have[0].size < n:
        have = buffers[slot] = (np.empty(n, np.uint8), np.empty(2 * n, np.uint8))
    return have[0][:n], have[1][:2 * n]

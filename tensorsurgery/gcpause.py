"""Pausing Python's cyclic garbage collector while a million small objects are made.

Parsing a header and planning make a few tuples and strings per tensor and free almost none of
them, and they hold no reference cycles. The collector does not know that: each time allocations
pass its threshold it walks the growing heap and finds nothing, which was a third of the time of
planning a million-tensor header. Reference counting still frees everything as usual.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector for the block (or decorated function), then restore its state,
    whatever happens; nested uses leave it as the outermost found it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

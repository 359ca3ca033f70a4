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
            if not gc.get_freeze_count():
                # The objects made while paused count as new, so the first allocation after
                # enable() would walk them all (half a second for a million tensors). Moving them
                # to the oldest generation (freeze, then unfreeze: no walk) leaves them to the
                # next full collection, as if they had survived the young ones. Skipped if the
                # program froze objects itself: unfreeze() would release them.
                gc.freeze()
                gc.unfreeze()
            gc.enable()

"""Which of the links a plan made with ``--link`` can be made: a reflink and a hard link both stay
inside one filesystem, so a shard planned as a link to a source file on another filesystem than
the output is copied instead (:func:`tensorsurgery.output.writer.execute_plan` falls back to copying
whenever a link fails). Counted before anything is written, so ``plan``'s "disk needed",
``apply``'s free-space check and its progress bar count those bytes as written, not as free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from tensorsurgery.io.fsio import existing_ancestor
from tensorsurgery.planning.planner import Plan
from tensorsurgery.units import format_bytes


@dataclass(frozen=True, slots=True)
class CopiedLinks:
    """Shards planned as links to the files of the source folder ``source`` that sit on another
    filesystem than the output: they are copied, ``nbytes`` in all."""

    source: Path
    shards: tuple[str, ...]
    nbytes: int

    @property
    def note(self) -> str:
        """One line for ``plan`` and ``apply``."""
        return f"links are not possible from {self.source} (another filesystem): {format_bytes(self.nbytes)} copied"


def copied_links(plan: Plan, devices: Mapping[Path, int], output_device: int) -> tuple[CopiedLinks, ...]:
    """The planned links that cannot be made (pure), by source folder in the plan's order.

    Args:
        devices: ``st_dev`` of each linked source file (a file missing from it is left out: it
            cannot be read at all, which apply reports by itself).
        output_device: ``st_dev`` of the folder the output's temporary folder is made in.
    """
    found: dict[Path, list[tuple[str, int]]] = {}
    for shard in plan.shards:
        if shard.link is None or devices.get(shard.link, output_device) == output_device:
            continue
        root = next((s.root for s in plan.sources if shard.link.is_relative_to(s.root)), shard.link.parent)
        found.setdefault(root, []).append((shard.filename, shard.nbytes))
    return tuple(CopiedLinks(root, tuple(n for n, _ in shards), sum(b for _, b in shards))
                 for root, shards in found.items())


def find_copied_links(plan: Plan) -> tuple[CopiedLinks, ...]:
    """:func:`copied_links` with the devices looked up on disk (``os.stat``, following the links
    of a Hub snapshot into its blobs, as linking does); the output's is that of the nearest
    existing folder above it."""
    linked = [s.link for s in plan.shards if s.link is not None]
    if not linked:
        return ()
    devices = {}
    for path in linked:
        try:
            devices[path] = os.stat(path).st_dev
        except OSError:
            pass
    target = Path(os.path.abspath(plan.output.expanduser()))
    return copied_links(plan, devices, os.stat(existing_ancestor(target.parent)).st_dev)


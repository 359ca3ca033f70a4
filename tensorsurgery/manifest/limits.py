"""What a manifest may ask for: bounds far above any real model, checked while the manifest is
read and before anything is expanded, so a small hostile file (a 60 kB mergekit YAML whose
aliases repeat a slice, 28 kB of TOML ranges) is one line instead of a plan of 384,032 layers and
a ``MemoryError``.

The largest released models have a few hundred decoder layers (frankenmerges of them too), a
handful of sources and a few dozen rename rules; each bound leaves a margin of ten or more.
"""
from __future__ import annotations

from pathlib import Path

from tensorsurgery.errors import ManifestError

#: Output layers a manifest may ask for (an arrangement item or a mergekit slice is at least one).
MAX_OUTPUT_LAYERS = 4096
#: Sources a manifest may name (``[sources.NAME]`` tables, distinct mergekit models).
MAX_SOURCES = 256
#: Rename rules and drop patterns together (each is matched against every tensor name).
MAX_RENAME_PATTERNS = 1024
#: Values of a mergekit YAML with every alias expanded (a real config has a few hundred).
MAX_YAML_NODES = 100_000


def check_count(path: Path, where: str, what: str, found: int, limit: int) -> None:
    """Raise when ``found`` ``what`` (at ``where`` of the manifest ``path``) is more than ``limit``.

    Raises:
        ManifestError: one line naming the file, the key, the count and the bound.
    """
    if found > limit:
        raise ManifestError(f"{path}: {where}: asks for {found:,} {what}, more than the {limit:,} a manifest may "
                            f"ask for (real models need far fewer); check the manifest")

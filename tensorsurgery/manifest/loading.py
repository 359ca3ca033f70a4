"""Read a manifest from a file or from text, whatever its format: TOML (the manifest reference in
the README) or a mergekit passthrough YAML, told apart by the file's suffix (or, for text, by its
content)."""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Mapping

from tensorsurgery.errors import ManifestError
from tensorsurgery.manifest.mergekit import manifest_from_mergekit
from tensorsurgery.manifest.toml import Manifest, apply_overrides, parse_manifest

_YAML_SUFFIXES = (".yml", ".yaml")
#: Largest manifest read (TOML or YAML); real ones are a few kB.
MANIFEST_LIMIT = 1 << 20
#: A mergekit config names its method at the top level; a TOML manifest never has that line.
_MERGEKIT = re.compile(r"^merge_method\s*:", re.MULTILINE)


def load_manifest(path: str | os.PathLike[str], *, sources: Mapping[str, str] | None = None,
                  output: str | None = None) -> Manifest:
    """Read the manifest at ``path``.

    Args:
        path: a TOML manifest (or a mergekit passthrough YAML, by suffix).
        sources: overrides of source models by source name (``""`` means the only source),
            as given with ``--source``.
        output: override of ``output.path`` (``--output``).

    Raises:
        ManifestError: unreadable file, unknown key, wrong type or value; the message names the
            file and key.

    Example:
        >>> load_manifest("manifests/solar-dus.toml").layers.plan
        'dus'
    """
    path = Path(path)
    try:
        # Bounded: a manifest is a few kB; /dev/zero or a model file given by mistake must not be
        # read to the end. Not only regular files: `apply <(generate-manifest)` reads a pipe.
        with open(path, "rb") as f:
            raw = f.read(MANIFEST_LIMIT + 1)
        if len(raw) > MANIFEST_LIMIT:
            raise ManifestError(f"{path}: cannot read the manifest: it holds more than {MANIFEST_LIMIT:,} bytes; "
                                f"is this the manifest?")
        text = raw.decode("utf-8")
    except IsADirectoryError:
        raise ManifestError(folder_given(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read the manifest: {e}") from e
    return apply_overrides(manifest_from_text(text, path), sources or {}, output)


def folder_given(path: Path) -> str:
    """The message for a folder ``path`` given where a manifest file is expected, with what to do
    instead: what the folder holds says which command was meant (an output: verify it; a
    checkpoint: inspect it) or which manifest (the one manifest file in it)."""
    what = f"{path}: is a folder, not a manifest file; "
    if (path / "tensorsurgery.json").is_file():
        return what + f"it is a tensorsurgery output: to check it against its record, run: tensorsurgery verify {path}"
    if (path / "config.json").is_file() or any(path.glob("*.safetensors")):
        return what + (f"it holds a checkpoint: to see it, run: tensorsurgery inspect {path}; to use it, name it "
                       f"as a source in a manifest")
    try:
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in (".toml", *_YAML_SUFFIXES) and p.is_file())
    except OSError:  # unreadable: nothing to suggest
        found = []
    if len(found) == 1:
        return what + f"did you mean {found[0]}?"
    return what + "give the manifest TOML (or mergekit passthrough YAML) file"


def manifest_from_text(text: str, path: str | os.PathLike[str] | None = None) -> Manifest:
    """Parse manifest ``text``, as read from ``path`` (which names it in messages and picks the
    format by suffix; without one, a text with a top-level ``merge_method:`` is a mergekit YAML).

    Raises:
        ManifestError: see :func:`load_manifest`.
    """
    is_yaml = (Path(path).suffix.lower() in _YAML_SUFFIXES if path is not None
               else _MERGEKIT.search(text) is not None)
    path = Path(path) if path is not None else Path("manifest.yaml" if is_yaml else "manifest.toml")
    if is_yaml:
        return manifest_from_mergekit(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{path}: not valid TOML: {e}") from e
    except RecursionError:
        raise ManifestError(f"{path}: not valid TOML for a manifest: arrays or tables nested too deeply "
                            f"(hundreds of levels); a manifest is a few levels deep") from None
    return parse_manifest(path, text, data)

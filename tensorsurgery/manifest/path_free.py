"""Manifest text that names no local path: what the model card shows and what push uploads in the
record (where a source or the output lives, /home/alice/secret-project/..., is nobody's business
on the Hub).

A string value of the manifest that is a path leading out of the folder it is run from (absolute,
``~``, a Windows drive or share, or going up with ``..``) is replaced, wherever its text appears in
the manifest (comments too), by the name of the folder it names:
``model = "/home/alice/secret-project/Mistral-7B"`` becomes ``model = "Mistral-7B"``. A relative
path inside the project (the shipped manifests' ``examples/tiny-mistral``) and a repo id are kept.
Pure: text in, text out; idempotent, so a card rebuilt from the path-free text is the card apply
wrote.
"""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Callable

import yaml

from tensorsurgery.errors import PlanError

_DRIVE = re.compile(r"[A-Za-z]:[\\/]")
#: A path's text is replaced only where it is not part of a longer word or path ("/" alone must
#: not eat the slash of a repo id).
_BEFORE = r"(?<![\w.\-/\\~])"
_AFTER = r"(?![\w.\-/\\])"


def is_local_path(value: str) -> bool:
    """Whether ``value`` is spelled as a path that leads out of the current folder: absolute, in a
    home folder (``~``), on a Windows drive or share, or going up (``..``)."""
    if value.startswith(("/", "~", "\\\\")) or _DRIVE.match(value):
        return True
    return ".." in re.split(r"[\\/]", value)


def folder_name(path: str) -> str:
    """The last part of ``path`` (``/a/b/Mistral-7B/`` -> ``Mistral-7B``), or ``local`` for a
    path that has none (``/``, ``~``, ``..``)."""
    name = PureWindowsPath(path.rstrip("/\\")).name if "\\" in path else PurePosixPath(path.rstrip("/")).name
    return name if name and name not in (".", "..", "~") else "local"


def path_free_manifest(text: str) -> str:
    """``text`` (a TOML manifest or a mergekit YAML) with every local path value replaced by its
    folder's name (see the module's docstring); ``text`` itself when it names none.

    Raises:
        PlanError: a local path whose spelling in the text could not be found and replaced, or a
            replacement that would change another value of the manifest.
    """
    load = _loader(text)
    if load is None:
        return text  # not parseable here: the manifest reader reports that, not this
    data = load(text)
    paths = sorted({v for v in _strings(data) if is_local_path(v)}, key=len, reverse=True)
    if not paths:
        return text
    out = text
    for path in paths:
        name = folder_name(path)
        # As written, without its final slash (a comment naming the folder), or with the escapes
        # a TOML basic / YAML double-quoted string uses for \ and ".
        bare = path.rstrip("/\\") or path
        for spelling in dict.fromkeys((path, bare, json.dumps(path, ensure_ascii=False)[1:-1])):
            # The name as a template with its backslashes escaped: taken as it is.
            out = re.sub(_BEFORE + re.escape(spelling) + _AFTER, name.replace("\\", "\\\\"), out)
    try:
        after = load(out)
    except (tomllib.TOMLDecodeError, yaml.YAMLError):
        after = None
    # Only the path values may change, each into its folder's name.
    if after is None or after != _renamed(data):
        left = [v for v in _strings(after) if is_local_path(v)] if after is not None else paths
        raise PlanError(f"the manifest names the local path {(left or paths)[0]!r} in a way tensorsurgery cannot "
                        f"take out of the copy it publishes (README.md, and tensorsurgery.json on the Hub); "
                        f"write it without escapes, or give it with --source / --output instead")
    return out


def _loader(text: str) -> Callable[[str], Any] | None:
    try:
        tomllib.loads(text)
        return tomllib.loads
    except tomllib.TOMLDecodeError:
        pass
    try:
        yaml.safe_load(text)
        return yaml.safe_load
    except yaml.YAMLError:
        return None


def _renamed(data: Any) -> Any:
    """``data`` with each local-path string replaced by its folder's name (what the replaced text
    must parse to). Without recursion: a manifest can nest deep."""
    def one(item: Any) -> Any:
        if not isinstance(item, str):
            return item
        if is_local_path(item):
            return folder_name(item)
        return "+".join(folder_name(p) if is_local_path(p) else p for p in item.split("+"))
    root: list[Any] = [data]
    stack: list[tuple[Any, Any]] = [(root, 0)]
    while stack:
        parent, key = stack.pop()
        item = parent[key]
        if isinstance(item, dict):
            copy = {one(k): v for k, v in item.items()}
            parent[key] = copy
            stack += [(copy, k) for k in copy]
        elif isinstance(item, list):
            copy_list = list(item)
            parent[key] = copy_list
            stack += [(copy_list, i) for i in range(len(copy_list))]
        else:
            parent[key] = one(item)
    return root[0]


def _strings(data: Any) -> list[str]:
    """Every string in ``data`` (keys and values), walked without recursion (a manifest can nest)."""
    found: list[str] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
            if "+" in item and not is_local_path(item):  # mergekit's MODEL+ADAPTER: each part
                found += item.split("+")
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            stack += list(item)
    return found

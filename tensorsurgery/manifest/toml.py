"""Read a manifest (TOML, see the README's reference) into a frozen :class:`Manifest`.

Every key is checked: unknown keys and wrong types are :class:`ManifestError` messages that name
the file and the key path (``solar.toml: layers.arrangement[5]: ...``), the way tomllib names a
line and column.
"""
from __future__ import annotations

import datetime
import math
import re
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from tensorsurgery.errors import ManifestError
from tensorsurgery.families.rules import PRESETS, RenameRule, RenameSpec
from tensorsurgery.formats.dtypes import CAST_DTYPES
from tensorsurgery.manifest.limits import MAX_OUTPUT_LAYERS, MAX_RENAME_PATTERNS, MAX_SOURCES, check_count
from tensorsurgery.manifest.merge_slices import arrangement, sliced_spec, toml_slices
from tensorsurgery.manifest.merges import (
    FLOAT32_RESULTS,
    METHODS,
    MergeSpec,
    check_seed,
    check_tokenizer_source,
    merge_spec,
)
from tensorsurgery.manifest.repo_id import is_push_target

PLANS = ("keep", "dus", "idus", "explicit")
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
#: Suffixes of single-file formats (weights, configs, archives): an output path ending in one names a
#: file, but the output is a folder of safetensors shards, so such a path is a mistake, not a name.
FILE_SUFFIXES = (".safetensors", ".gguf", ".ggml", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack",
                 ".pkl", ".pickle", ".npy", ".npz", ".json", ".toml", ".yaml", ".yml", ".txt", ".zip", ".tar",
                 ".gz", ".tgz", ".xz", ".zst")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A source model: a local folder or a Hugging Face repo id, called ``name`` in the manifest."""

    name: str
    model: str
    revision: str | None = None
    #: A peft LoRA merged into the model, a local folder or a Hub repo id
    #: (:mod:`tensorsurgery.planning.adapters`).
    adapter: str | None = None
    #: The Hub adapter's branch, tag or commit (default: its main branch).
    adapter_revision: str | None = None


@dataclass(frozen=True, slots=True)
class Segment:
    """Layers ``start..stop-1`` of source ``source`` (``None``: the first source)."""

    source: str | None
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class LayersSpec:
    """How output layers are arranged (``plan``: keep | dus | idus | explicit)."""

    plan: str = "keep"
    overlap: int | None = None
    group: int | None = None
    arrangement: tuple[Segment, ...] = ()


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """Where and how the output is written; ``push_to_hub`` is a repo id to upload it to (after
    apply and verify), created ``private`` unless that is false."""

    path: str
    dtype: str | None = None
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    push_to_hub: str | None = None
    private: bool = True


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed manifest. ``text`` is kept verbatim for the provenance record."""

    path: Path
    text: str
    sources: tuple[SourceSpec, ...]
    rename: RenameSpec
    layers: LayersSpec
    config: Mapping[str, Any]
    output: OutputSpec
    #: Output name of a non-layer tensor -> the source it comes from; any other non-layer tensor
    #: comes from the first source. Set by mergekit YAMLs (first slice's embeddings, last slice's
    #: final norm and lm_head); TOML has no syntax for it yet.
    tensor_sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: Weight arithmetic over several sources (``[merge]``, or a mergekit YAML's merge method):
    #: every output tensor is computed from the same tensor of each merged source.
    merge: MergeSpec | None = None


def parse_size(value: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units like Hugging Face; KiB/MiB/GiB binary).

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as \"5GB\", found {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"expected a size such as \"5GB\" or \"500MB\", found {value!r}")
        # Decimal, not float: float("2.01") * 10**6 is 2009999.9999999998, which int() truncates.
        n = int(Decimal(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"size must be positive, found {value!r}")
    return n


class _Reader:
    """Walks a TOML table, checking types and remembering the key path for messages."""

    def __init__(self, file: Path, table: Mapping[str, Any], path: str = ""):
        self.file, self.table, self.path = file, table, path

    def error(self, key: str | None, message: str) -> ManifestError:
        where = f"{self.path}.{key}" if self.path and key else (key or self.path)
        return ManifestError(f"{self.file}: {where}: {message}" if where else f"{self.file}: {message}")

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for key in self.table:
            if key not in allowed:
                raise self.error(key, f"unknown key; expected one of: {', '.join(allowed)}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if key not in self.table:
            if required:
                raise self.error(key, "missing; it is required")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int subclass; TOML true must not pass for a layer count.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(key, f"expected {names}, found {_describe(value)}")
        return value

    def sub(self, key: str, required: bool = False) -> _Reader:
        table = self.get(key, dict, {}, required)
        return _Reader(self.file, table, f"{self.path}.{key}" if self.path else key)


_TYPE_NAMES = {str: "a string", int: "an integer", dict: "a table", list: "an array", bool: "a boolean"}


def _describe(value: Any) -> str:
    return f"{_TYPE_NAMES.get(type(value), type(value).__name__)} {value!r:.60}"


def parse_manifest(path: Path, text: str, data: Mapping[str, Any]) -> Manifest:
    """Build a :class:`Manifest` from already-parsed TOML ``data`` (pure).

    Raises:
        ManifestError: an unknown key, a wrong type or value; the message names the file and key.
    """
    root = _Reader(path, data)
    root.check_keys(("source", "sources", "rename", "layers", "config", "output", "merge"))
    srcs = _parse_sources(root)
    names = tuple(s.name for s in srcs)
    rename = _parse_rename(root.sub("rename"))
    layers = _parse_layers(root.sub("layers"), names)
    config = _parse_config(root.sub("config"))
    output = _parse_output(root.sub("output", required=True))
    merge = _parse_merge(root.sub("merge"), names) if "merge" in root.table else None
    if merge is not None:
        if merge.slices and "layers" in root.table:
            raise root.error("layers", "given with [[merge.slices]]: the slices say which layers are merged; "
                                       "remove [layers]")
        if merge.slices:
            if not any(names[0] in part.starts for part in merge.slices):
                raise root.error(f"sources.{names[0]}", "is in no slice of [[merge.slices]]; config.json comes from "
                                                        "the first source: list a merged model first")
            layers = LayersSpec(plan="explicit", arrangement=tuple(Segment(*s) for s in arrangement(merge, names[0])))
        elif layers.plan != "keep":
            raise root.error("layers.plan", f"{layers.plan!r} with [merge]: a merge keeps the layers as they are; "
                                            f"to merge parts of models, give [[merge.slices]]")
        # the merged values are in the merge dtype (but float32 where torch promotes them)
        if output.dtype is None and merge.dtype is not None and merge.method not in FLOAT32_RESULTS:
            output = replace(output, dtype=next(k for k, v in CAST_DTYPES.items() if v == merge.dtype))
    return Manifest(
        path=path, text=text, sources=srcs, rename=rename, layers=layers, config=config, output=output, merge=merge,
    )


def _parse_merge(r: _Reader, names: tuple[str, ...]) -> MergeSpec:
    """``[merge]``: ``method``, ``base`` (a source; default the first), ``dtype`` (the merge
    dtype), ``[merge.parameters]`` and one ``[merge.models.SOURCE]`` table of parameters per merged
    model, in order; ``seed`` the random seed of the methods that draw (DARE); ``tokenizer_source``
    mergekit's (``base``, ``union`` or a merged source)."""
    r.check_keys(("method", "base", "dtype", "parameters", "models", "seed", "tokenizer_source", "slices"))
    dtype = r.get("dtype", str)
    if dtype is not None and dtype not in CAST_DTYPES:
        raise r.error("dtype", f"unsupported dtype {dtype!r}; expected one of: {', '.join(CAST_DTYPES)}")
    base = r.get("base", str)
    if base is not None and base not in names:
        raise r.error("base", f"unknown source {base!r}; sources are: {', '.join(names)}")
    models = r.sub("models")
    for name in models.table:
        if name not in names:
            raise models.error(name, f"unknown source {name!r}; sources are: {', '.join(names)}")
    method = r.get("method", str, required=True)
    if base is None and method in METHODS and METHODS[method].needs_base:
        base = names[0]
    if base is not None and base != names[0]:
        raise r.error("base", f"{base!r} is not the first source; list [sources.{base}] first: config.json and the "
                              f"tokenizer files come from the first source, as mergekit takes them from the base")
    seed = check_seed(lambda message: r.error("seed", message), r.table["seed"]) if "seed" in r.table else None
    error = lambda where, message: ManifestError(f"{r.file}: {where}: {message}")  # noqa: E731
    if "slices" in r.table:
        if models.table:
            raise r.error("models", "given with [[merge.slices]]: give each model's parameters in the slices")
        spec = sliced_spec(error, method, toml_slices(error, r.table["slices"], names), base,
                           r.sub("parameters").table, CAST_DTYPES[dtype] if dtype else None)
    else:
        spec = merge_spec(error, method, [(name, models.sub(name).table, f"merge.models.{name}")
                                          for name in models.table],
                          base, r.sub("parameters").table, CAST_DTYPES[dtype] if dtype else None)
    merged = {name: name for name in spec.sources}
    tokenizer = check_tokenizer_source(r.error, r.table.get("tokenizer_source"), merged, "tokenizer_source")
    return replace(spec, seed=seed, tokenizer_source=tokenizer)


def _parse_sources(root: _Reader) -> tuple[SourceSpec, ...]:
    if ("source" in root.table) == ("sources" in root.table):
        raise root.error(None, "give exactly one of [source] or [sources.NAME] tables")
    if "source" in root.table:
        return (_parse_source(root.sub("source"), "source"),)
    table = root.sub("sources")
    if not table.table:
        raise table.error(None, "no sources; add a [sources.NAME] table with a model")
    check_count(root.file, "sources", "sources", len(table.table), MAX_SOURCES)
    return tuple(_parse_source(table.sub(name), name) for name in table.table)


def _parse_source(r: _Reader, name: str) -> SourceSpec:
    r.check_keys(("model", "revision", "adapter", "adapter_revision"))
    model = r.get("model", str, required=True)
    if not model.strip():
        raise r.error("model", "is empty; give a local folder or a Hugging Face repo id")
    adapter = r.get("adapter", str)
    if adapter is not None and not adapter.strip():
        raise r.error("adapter", "is empty; give the folder of a peft LoRA adapter (adapter_config.json and "
                                 "adapter_model.safetensors)")
    adapter_revision = r.get("adapter_revision", str)
    if adapter_revision is not None and (adapter is None or not adapter_revision.strip()):
        raise r.error("adapter_revision", "is empty; give a branch, tag or commit of the adapter's Hub repo"
                      if adapter is not None else "is set without an adapter; add adapter = \"org/name\" or drop it")
    return SourceSpec(name=name, model=model, revision=r.get("revision", str), adapter=adapter,
                      adapter_revision=adapter_revision)


def _parse_config(r: _Reader) -> Mapping[str, Any]:
    """``[config]``: values that config.json can hold. A TOML date or time has no JSON form and
    NaN or infinity no JSON spelling; either would make an output that can never verify."""
    def check(value: Any, where: str) -> None:
        if isinstance(value, (datetime.date, datetime.time)):
            raise r.error(where, f"a TOML date/time ({value}) has no JSON form; write it as a string")
        if isinstance(value, float) and not math.isfinite(value):
            raise r.error(where, f"{value} is not a JSON number; config.json cannot hold it")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            check(item, f"{where}[{key}]" if isinstance(value, list) else f"{where}.{key}")
    for key, value in r.table.items():
        check(value, key)
    return MappingProxyType(dict(r.table))


def _parse_rename(r: _Reader) -> RenameSpec:
    r.check_keys(("preset", "rules", "drop"))
    rules, drop = [], r.get("drop", list, [])
    given = r.get("rules", list, [])
    check_count(r.file, r.path, "rename rules and drop patterns", len(given) + len(drop), MAX_RENAME_PATTERNS)
    for i, item in enumerate(given):
        rr = _Reader(r.file, item if isinstance(item, dict) else {}, f"{r.path}.rules[{i}]")
        if not isinstance(item, dict):
            raise rr.error(None, f"expected a table {{ match = '...', replace = '...' }}, found {_describe(item)}")
        rr.check_keys(("match", "replace"))
        rules.append(RenameRule(_regex(rr, "match"), rr.get("replace", str, required=True)))
    for i, pattern in enumerate(drop):
        _regex(_Reader(r.file, {f"drop[{i}]": pattern}, r.path), f"drop[{i}]")
    preset = r.get("preset", str)
    if preset is not None and preset not in PRESETS:
        raise r.error("preset", f"unknown preset {preset!r}; built-in presets: {', '.join(PRESETS)}")
    return RenameSpec(preset=preset, rules=tuple(rules), drop=tuple(drop))


def _regex(r: _Reader, key: str) -> str:
    pattern: str = r.get(key, str, required=True)
    try:
        re.compile(pattern)
    except re.error as e:
        raise r.error(key, f"invalid regular expression {pattern!r}: {e}") from None
    return pattern


def _parse_layers(r: _Reader, names: tuple[str, ...]) -> LayersSpec:
    r.check_keys(("plan", "overlap", "group", "arrangement"))
    plan = r.get("plan", str, "keep")
    if plan not in PLANS:
        raise r.error("plan", f"unknown plan {plan!r}; expected one of: {', '.join(PLANS)}")
    overlap, group = r.get("overlap", int), r.get("group", int)
    needs = {"keep": (), "dus": ("overlap",), "idus": ("overlap", "group"), "explicit": ("arrangement",)}[plan]
    for key in ("overlap", "group", "arrangement"):
        if key in r.table and key not in needs:
            raise r.error(key, f"does not apply to plan {plan!r}")
        if key in needs and key not in r.table:
            raise r.error(key, f"missing; plan {plan!r} needs it")
    for key, value, low in (("overlap", overlap, 0), ("group", group, 1)):
        if value is not None and value < low:
            raise r.error(key, f"must be >= {low}, found {value}")
    arrangement = _parse_arrangement(r, names) if plan == "explicit" else ()
    return LayersSpec(plan=plan, overlap=overlap, group=group, arrangement=arrangement)


def _parse_arrangement(r: _Reader, names: tuple[str, ...]) -> tuple[Segment, ...]:
    items = r.get("arrangement", list)
    if not items:
        raise r.error("arrangement", "is empty; list layer ranges such as [0, 24] or indices")
    where = f"{r.path}.arrangement"
    # Each item is at least one layer: a list past the bound is refused before it is parsed.
    check_count(r.file, where, "arrangement entries", len(items), MAX_OUTPUT_LAYERS)
    out = []
    for i, item in enumerate(items):
        item_r = _Reader(r.file, {}, f"{r.path}.arrangement[{i}]")
        source = None
        if isinstance(item, dict):
            item_r = _Reader(r.file, item, item_r.path)
            item_r.check_keys(("source", "layers"))
            source = item_r.get("source", str, required=True)
            if source not in names:
                raise item_r.error("source", f"unknown source {source!r}; sources are: {', '.join(names)}")
            item = item_r.get("layers", (int, list), required=True)
        out.append(_segment(item_r, item, source))
    check_arrangement_size(r.file, where, out)
    return tuple(out)


def check_arrangement_size(path: Path, where: str, segments: Sequence[Segment]) -> None:
    """Refuse an arrangement of more than :data:`~tensorsurgery.manifest.limits.MAX_OUTPUT_LAYERS` layers,
    counted from the ranges without expanding them.

    Raises:
        ManifestError: naming ``where`` in the manifest ``path``.
    """
    check_count(path, where, "output layers", sum(s.stop - s.start for s in segments), MAX_OUTPUT_LAYERS)


def _segment(r: _Reader, item: Any, source: str | None) -> Segment:
    if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
        return Segment(source, item, item + 1)
    if (isinstance(item, list) and len(item) == 2 and all(type(x) is int for x in item)
            and 0 <= item[0] < item[1]):
        return Segment(source, item[0], item[1])
    raise r.error(None, f"expected a layer index or a half-open range [start, stop] with "
                        f"0 <= start < stop, found {item!r:.60}")


def _parse_output(r: _Reader) -> OutputSpec:
    r.check_keys(("path", "dtype", "max_shard_size", "push_to_hub", "private"))
    dtype = r.get("dtype", str)
    if dtype is not None and dtype not in CAST_DTYPES:
        raise r.error("dtype", f"unsupported dtype {dtype!r}; expected one of: {', '.join(CAST_DTYPES)}")
    size = r.get("max_shard_size", (int, str), DEFAULT_MAX_SHARD_SIZE)
    try:
        size = parse_size(size)
    except ValueError as e:
        raise r.error("max_shard_size", str(e)) from None
    push = r.get("push_to_hub", str)
    if push is not None and not is_push_target(push):
        raise r.error("push_to_hub", f"{push!r} is not a Hugging Face repo id; use \"org/name\"")
    path = r.get("path", str, required=True)
    if not path.strip():
        raise r.error("path", "is empty; give the folder to write the output to")
    problem = file_name_problem(path)
    if problem:
        raise r.error("path", problem)
    return OutputSpec(path=path, dtype=dtype, max_shard_size=size, push_to_hub=push,
                      private=r.get("private", bool, True))


def file_name_problem(path: str) -> str | None:
    """Why ``path`` cannot be an output folder (it ends in a file format's suffix, as
    ``out/m.gguf``), or None. Said after the option or key that gave it.

    Example:
        >>> file_name_problem("out/m.gguf").split(";")[0]
        '"out/m.gguf" names a file'
    """
    folder = Path(path)
    if folder.suffix.lower() not in FILE_SUFFIXES:
        return None
    while folder.suffix.lower() in FILE_SUFFIXES:  # out/m.tar.gz -> out/m
        folder = folder.with_suffix("")
    return (f'"{path}" names a file; tensorsurgery writes a folder of safetensors shards with config.json: '
            f'give a folder name such as "{folder}"')


def apply_overrides(manifest: Manifest, sources: Mapping[str, str], output: str | None,
                    seed: int | None = None) -> Manifest:
    """Replace source models (``--source [NAME=]PATH``), ``output.path`` (``--output``) and the
    merge's seed (``--random-seed``: mergekit's YAML has no seed field; ignored without a merge,
    as mergekit ignores it for a method that does not draw).

    Raises:
        ManifestError: an override names no source, or a bare override with several sources.
    """
    new_sources = list(manifest.sources)
    for name, model in sources.items():
        if not name:
            if len(new_sources) != 1:
                raise ManifestError(f"{manifest.path}: --source PATH is ambiguous with "
                                    f"{len(new_sources)} sources; use --source NAME=PATH")
            new_sources[0] = replace(new_sources[0], model=model, revision=None)
            continue
        idx = next((i for i, s in enumerate(new_sources) if s.name == name), None)
        if idx is None:
            known = ", ".join(s.name for s in new_sources)
            raise ManifestError(f"{manifest.path}: --source {name}=...: no source called {name!r}; "
                                f"sources are: {known}")
        new_sources[idx] = replace(new_sources[idx], model=model, revision=None)
    if output:
        problem = file_name_problem(output)
        if problem:
            raise ManifestError(f"--output {problem}")
    out = replace(manifest.output, path=output) if output else manifest.output
    merge = manifest.merge
    if seed is not None and merge is not None:
        merge = replace(merge, seed=check_seed(lambda message: ManifestError(f"--random-seed: {message}"), seed))
    return replace(manifest, sources=tuple(new_sources), output=out, merge=merge)

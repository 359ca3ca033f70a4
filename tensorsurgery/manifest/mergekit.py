"""Read a mergekit YAML that uses ``merge_method: passthrough`` into a :class:`Manifest`.

Passthrough copies layers unchanged, so it is byte ranges like any manifest. What mergekit does
with the tensors, and how it maps here (checked against mergekit's ``plan.py`` and ``merge.py``):

* each slice's one source ``{model, layer_range: [a, b]}`` gives layers ``a..b-1`` of that model,
  in slice order: an explicit arrangement. Each distinct model (path and ``@revision``) is one
  source, named after its folder or repo name.
* the embeddings come from the first slice's model, the final norm and ``lm_head`` from the last
  slice's model (mergekit's ``pre_weights`` / ``post_weights`` of the Llama-family architectures);
  config.json and the tokenizer files come from ``base_model``, else the first slice's model.
* ``dtype`` (and ``out_dtype``, which wins) casts the output; mergekit's names, ``torch.`` prefix
  allowed. config.json is ours: layer count and per-layer lists follow the arrangement.
* the architecture is kept, as mergekit keeps it: no rename preset, so a Mistral stays a
  MistralForCausalLM (use a TOML manifest with ``preset = "mistral-to-llama"`` to relabel). A
  native Mistral checkpoint still gets Hugging Face names (see :mod:`tensorsurgery.families.rules`).
* ``model: BASE+ADAPTER`` merges the local peft LoRA folder ADAPTER into BASE, as mergekit (and
  peft's ``merge_and_unload``) does: a source with an adapter (:mod:`tensorsurgery.planning.adapters`).
* mergekit has no output path: it is ``out/<file stem>``, and ``--output`` overrides it.

A merge method (:func:`_merge_manifest`) takes ``models``, or ``slices`` of parts of models
(:mod:`tensorsurgery.manifest.merge_slices`). In a passthrough, what would change tensor values (several
sources in a slice, ``parameters`` such as ``scale``, tokenizer building) is a
:class:`ManifestError` naming the file and the key path.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from tensorsurgery.errors import ManifestError
from tensorsurgery.families.rules import RenameSpec
from tensorsurgery.formats.dtypes import CAST_DTYPES
from tensorsurgery.manifest.limits import MAX_OUTPUT_LAYERS, MAX_SOURCES, MAX_YAML_NODES, check_count
from tensorsurgery.manifest.merge_slices import RawSlice, SliceSource, arrangement, sliced_spec
from tensorsurgery.manifest.merges import (
    FLOAT32_RESULTS,
    METHODS,
    MergeSpec,
    check_method,
    check_tokenizer_source,
    merge_spec,
)
from tensorsurgery.manifest.toml import LayersSpec, Manifest, OutputSpec, Segment, SourceSpec, check_arrangement_size

_KEYS = ("merge_method", "slices", "dtype", "out_dtype", "base_model", "tokenizer_source")
#: The keys of a config with a merge method (:func:`_merge_manifest`).
_MERGE_KEYS = ("merge_method", "models", "parameters", "dtype", "out_dtype", "base_model", "tokenizer_source")
#: Keys mergekit knows that passthrough (or a merge, where not allowed) cannot honour, and why.
_UNSUPPORTED = MappingProxyType({
    "models": "list the layers to copy as slices with a layer_range instead",
    "modules": "list the layers (or models) as top-level slices (or models) instead",
    "parameters": "parameters such as scale change tensor values; only a byte-exact passthrough is supported",
    "residual_weight": "it changes tensor values; only a byte-exact passthrough is supported",
    "tokenizer": "building a tokenizer is not supported; the base model's tokenizer files are copied",
    "chat_template": "it is not supported; the base model's tokenizer files are copied as they are",
})
#: mergekit's pre_weights (from the first slice) and post_weights (from the last slice).
_FIRST_SLICE_TENSORS = ("model.embed_tokens.weight",)
_LAST_SLICE_TENSORS = ("model.norm.weight", "lm_head.weight")


def manifest_from_mergekit(path: Path, text: str) -> Manifest:
    """The manifest equivalent to the mergekit passthrough config ``text`` read from ``path``.

    Raises:
        ManifestError: not YAML, another merge method, a missing or malformed key, or a feature
            that would change tensor values; the message names the file and the key path.

    Example:
        >>> m = manifest_from_mergekit(Path("dus.yml"), "merge_method: passthrough\\nslices:\\n"
        ...     "  - sources: [{model: m7b, layer_range: [0, 24]}]\\n"
        ...     "  - sources: [{model: m7b, layer_range: [8, 32]}]\\n")
        >>> [(s.source, s.start, s.stop) for s in m.layers.arrangement], m.output.path
        ([('m7b', 0, 24), ('m7b', 8, 32)], 'out/dus')
    """
    data = _load_yaml(path, text)
    method = data.get("merge_method")
    if method is None:
        raise ManifestError(f"{path}: merge_method: missing; give passthrough (slices of layers) or a merge method "
                            f"({', '.join(METHODS)})")
    if method != "passthrough":
        return _merge_manifest(path, text, data, method)
    _check_keys(path, "", data, _KEYS)
    given = _slices(path, data)
    check_count(path, "slices", "slices", len(given), MAX_OUTPUT_LAYERS)  # a slice is at least one layer
    slices = [_slice(path, i, s) for i, s in enumerate(given)]
    check_arrangement_size(path, "slices", [Segment(None, a, b) for _, a, b in slices])
    base = _model(path, "base_model", data["base_model"]) if data.get("base_model") is not None else None
    tokenizer_source = data.get("tokenizer_source")
    if tokenizer_source not in (None, "base"):
        raise ManifestError(f"{path}: tokenizer_source: {tokenizer_source!r} is not supported; the base "
                            f"model's tokenizer files are copied (remove it or use base)")
    models = list(dict.fromkeys(([base] if base else []) + [model for model, _, _ in slices]))
    check_count(path, "slices", "different models", len(models), MAX_SOURCES)
    names = dict(zip(models, _source_names(models)))
    first, last = names[slices[0][0]], names[slices[-1][0]]
    owners = {t: first for t in _FIRST_SLICE_TENSORS} | {t: last for t in _LAST_SLICE_TENSORS}
    return Manifest(
        path=path, text=text,
        sources=tuple(SourceSpec(names[m], m[0], m[1], *_adapter_ref(m[2])) for m in models),
        rename=RenameSpec(),
        layers=LayersSpec(plan="explicit", arrangement=tuple(Segment(names[m], a, b) for m, a, b in slices)),
        config=MappingProxyType({}),
        output=OutputSpec(path=f"out/{path.stem}", dtype=_dtype(path, data)),
        tensor_sources=MappingProxyType({t: s for t, s in owners.items() if s != names[models[0]]}),
    )


def _merge_manifest(path: Path, text: str, data: dict[str, Any], method: Any) -> Manifest:
    """The manifest of a mergekit config with a merge method: ``models`` (each ``{model,
    parameters}``), ``base_model``, ``parameters``, ``dtype`` (the merge dtype), ``out_dtype``.
    Sources are the base first (config.json and the tokenizer files come from it, as mergekit
    takes them), then the models in order."""
    error = lambda where, message: ManifestError(f"{path}: {_yaml_key(where)}: {message}")  # noqa: E731
    check_method(error, method)
    _check_keys(path, "", data, (*_MERGE_KEYS, "slices"))
    if "slices" in data:
        return _sliced_manifest(path, text, data, method)
    given = data.get("models")
    if not isinstance(given, list) or not given:
        found = "missing" if given is None else f"expected a non-empty list, found {_describe(given)}"
        raise ManifestError(f"{path}: models: {found}; list the models to merge, e.g. "
                            f"- model: PATH, parameters: {{weight: 0.5}}")
    check_count(path, "models", "models", len(given), MAX_SOURCES)
    entries = []
    for i, item in enumerate(given):
        where = f"models[{i}]"
        if not isinstance(item, dict):
            raise ManifestError(f"{path}: {where}: expected a mapping with model and parameters, "
                                f"found {_describe(item)}")
        _check_keys(path, where, item, ("model", "parameters"))
        if "model" not in item:
            raise ManifestError(f"{path}: {where}.model: missing; give a local folder or a Hugging Face repo id")
        model = _model(path, f"{where}.model", item["model"])
        entries.append((model, item.get("parameters") or {}, where))
    base = _model(path, "base_model", data["base_model"]) if data.get("base_model") is not None else None
    models = list(dict.fromkeys(([base] if base else []) + [model for model, _, _ in entries]))
    if len(models) < len(entries) + (base is not None and base not in [m for m, _, _ in entries]):
        raise ManifestError(f"{path}: models: a model is listed twice; list each model once")
    names = dict(zip(models, _source_names(models)))
    dtype, out = (_dtype_name(path, key, data.get(key)) for key in ("dtype", "out_dtype"))
    spec = merge_spec(error, method,
                      [(names[m], raw, where) for m, raw, where in entries], names[base] if base else None,
                      data.get("parameters") or {}, CAST_DTYPES[dtype] if dtype else None)
    # A model is named as models and base_model name it (a model+adapter by its model).
    by_path = {m[0] if m[1] is None else f"{m[0]}@{m[1]}": names[m] for m in models}
    spec = replace(spec, tokenizer_source=check_tokenizer_source(
        error, data.get("tokenizer_source"), by_path, "tokenizer_source"))
    return Manifest(
        path=path, text=text,
        sources=tuple(SourceSpec(names[m], m[0], m[1], *_adapter_ref(m[2])) for m in models),
        rename=RenameSpec(), layers=LayersSpec(plan="keep"), config=MappingProxyType({}),
        output=OutputSpec(path=f"out/{path.stem}", dtype=_output_dtype(spec, dtype, out)), merge=spec,
    )


def _sliced_manifest(path: Path, text: str, data: dict[str, Any], method: Any) -> Manifest:
    """The manifest of a merge of parts of models (``slices`` with a merge method, see
    :mod:`tensorsurgery.manifest.merge_slices`). Sources are the base first, then the models in the order
    the slices first name them; the layers are planned from each slice's first merged model."""
    error = lambda where, message: ManifestError(f"{path}: {_yaml_key(where)}: {message}")  # noqa: E731
    if "models" in data:
        raise ManifestError(f"{path}: slices: given with models; list the models either way, not both")
    given = _slices(path, data)
    check_count(path, "slices", "slices", len(given), MAX_OUTPUT_LAYERS)
    raw = [_merge_slice(path, i, item) for i, item in enumerate(given)]
    base = _model(path, "base_model", data["base_model"]) if data.get("base_model") is not None else None
    models = list(dict.fromkeys(([base] if base else []) + [m for _, sources in raw for m, *_ in sources]))
    check_count(path, "slices", "different models", len(models), MAX_SOURCES)
    names = dict(zip(models, _source_names(models)))
    slices = tuple(RawSlice(tuple(SliceSource(names[m], a, b, params, at) for m, a, b, params, at in sources),
                            item.get("parameters") or {}, f"slices[{i}]")
                   for i, ((item, sources)) in enumerate(raw))
    check_arrangement_size(path, "slices", [Segment(None, s.sources[0].start, s.sources[0].stop) for s in slices])
    dtype, out = (_dtype_name(path, key, data.get(key)) for key in ("dtype", "out_dtype"))
    spec = sliced_spec(error, method, slices, names[base] if base else None, data.get("parameters") or {},
                       CAST_DTYPES[dtype] if dtype else None)
    by_path = {m[0] if m[1] is None else f"{m[0]}@{m[1]}": names[m] for m in models}
    spec = replace(spec, tokenizer_source=check_tokenizer_source(
        error, data.get("tokenizer_source"), by_path, "tokenizer_source"))
    return Manifest(
        path=path, text=text,
        sources=tuple(SourceSpec(names[m], m[0], m[1], *_adapter_ref(m[2])) for m in models),
        rename=RenameSpec(),
        layers=LayersSpec(plan="explicit",
                          arrangement=tuple(Segment(*seg) for seg in arrangement(spec, names[models[0]]))),
        config=MappingProxyType({}),
        output=OutputSpec(path=f"out/{path.stem}", dtype=_output_dtype(spec, dtype, out)), merge=spec,
    )


def _merge_slice(path: Path, i: int, item: Any) -> tuple[dict[str, Any], list[tuple[Any, int, int, Any, str]]]:
    """Slice ``i`` of a merge: the slice, and each source's ``(model, start, stop, parameters, key path)``."""
    where = f"slices[{i}]"
    if not isinstance(item, dict) or not isinstance(item.get("sources"), list) or not item["sources"]:
        raise ManifestError(f"{path}: {where}: expected a mapping with sources: [{{model, layer_range}}, ...], "
                            f"found {_describe(item)}")
    _check_keys(path, where, item, ("sources", "parameters"))
    sources = []
    for j, source in enumerate(item["sources"]):
        at = f"{where}.sources[{j}]"
        if not isinstance(source, dict):
            raise ManifestError(f"{path}: {at}: expected a mapping with model and layer_range, "
                                f"found {_describe(source)}")
        _check_keys(path, at, source, ("model", "layer_range", "parameters"))
        if "model" not in source:
            raise ManifestError(f"{path}: {at}.model: missing; give a local folder or a Hugging Face repo id")
        model = _model(path, f"{at}.model", source["model"])
        rng = source.get("layer_range")
        if not (isinstance(rng, list) and len(rng) == 2 and all(type(x) is int for x in rng) and 0 <= rng[0] < rng[1]):
            raise ManifestError(f"{path}: {at}.layer_range: expected [start, stop] with 0 <= start < stop "
                                f"(stop excluded), found {_describe(rng)}")
        sources.append((model, rng[0], rng[1], source.get("parameters") or {}, at))
    return item, sources


#: The TOML manifest's ``[merge]`` keys (in merge_spec's messages) as mergekit's YAML names them.
_YAML_KEYS = (("merge.method", "merge_method"), ("merge.base", "base_model"), ("merge.models", "models"),
              ("merge.parameters", "parameters"), ("merge.slices", "slices"))


def _yaml_key(where: str) -> str:
    for toml, yaml in _YAML_KEYS:
        if where.startswith(toml):
            return yaml + where[len(toml):]
    return where


def _load_yaml(path: Path, text: str) -> dict[str, Any]:
    """``yaml.safe_load(text)``, refusing before it is built a document whose aliases expand to
    more than :data:`MAX_YAML_NODES` values (a "billion laughs") or that holds itself, and a
    nesting deeper than Python's parser recursion."""
    import yaml
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(path, node) > MAX_YAML_NODES:
            raise ManifestError(f"{path}: its aliases (*name) expand to more than {MAX_YAML_NODES:,} values, more "
                                f"than a manifest may hold (a mergekit config has a few hundred); write the "
                                f"slices out instead of repeating aliases")
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (at line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ManifestError(f"{path}: not valid YAML: {problem}{where}") from None
    except RecursionError:
        raise ManifestError(f"{path}: not valid YAML for a manifest: lists or mappings nested too deeply "
                            f"(hundreds of levels); a mergekit config is a few levels deep") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mergekit config (a YAML mapping with merge_method and "
                            f"slices), found {_describe(data)}")
    return data


def _expanded_size(path: Path, root: Any) -> int:
    """Values in the composed YAML document ``root`` with every alias expanded (an alias is its
    anchored node again), counted once per distinct node, without recursion; capped just past
    :data:`MAX_YAML_NODES` so the counts stay small.

    Raises:
        ManifestError: an alias inside the node it refers to (a structure that holds itself).
    """
    import yaml
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            sizes[id(node)] = min(MAX_YAML_NODES + 1, 1 + sum(sizes[id(c)] for c in children))
            open_nodes.discard(id(node))
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:  # reached again from inside itself
            mark = node.start_mark
            raise ManifestError(f"{path}: not valid YAML for a manifest: the alias at line {mark.line + 1} is "
                                f"inside the node it refers to (a structure that holds itself); write it out")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack += [(c, False) for c in children if id(c) not in sizes]
    return sizes[id(root)]


def _check_keys(path: Path, where: str, table: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in table:
        at = f"{where}.{key}" if where else str(key)
        if key in _UNSUPPORTED and key not in allowed:
            raise ManifestError(f"{path}: {at}: {_UNSUPPORTED[key]}")
        if key not in allowed:
            raise ManifestError(f"{path}: {at}: unknown key; expected one of: {', '.join(allowed)}")


def _slices(path: Path, data: dict[str, Any]) -> list[Any]:
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        found = "missing" if slices is None else f"expected a non-empty list, found {_describe(slices)}"
        raise ManifestError(f"{path}: slices: {found}; list the layers to copy, e.g. "
                            f"- sources: [{{model: PATH, layer_range: [0, 24]}}]")
    return slices


def _slice(path: Path, i: int, item: Any) -> tuple[tuple[str, str | None, str | None], int, int]:
    where = f"slices[{i}]"
    if not isinstance(item, dict):
        raise ManifestError(f"{path}: {where}: expected a mapping with sources, found {_describe(item)}")
    _check_keys(path, where, item, ("sources",))
    sources = item.get("sources")
    if not isinstance(sources, list) or len(sources) != 1:
        found = (f"{len(sources)} sources: combining models in one slice is a merge, not passthrough"
                 if isinstance(sources, list) and sources else f"found {_describe(sources)}")
        raise ManifestError(f"{path}: {where}.sources: {found}; give each slice exactly one source")
    source, where = sources[0], f"{where}.sources[0]"
    if not isinstance(source, dict):
        raise ManifestError(f"{path}: {where}: expected a mapping with model and layer_range, "
                            f"found {_describe(source)}")
    _check_keys(path, where, source, ("model", "layer_range"))
    if "model" not in source:
        raise ManifestError(f"{path}: {where}.model: missing; give a local folder or a Hugging Face repo id")
    model = _model(path, f"{where}.model", source["model"])
    rng = source.get("layer_range")
    if not (isinstance(rng, list) and len(rng) == 2 and all(type(x) is int for x in rng)
            and 0 <= rng[0] < rng[1]):
        raise ManifestError(f"{path}: {where}.layer_range: expected [start, stop] with 0 <= start < stop "
                            f"(stop excluded), found {_describe(rng)}")
    return model, rng[0], rng[1]


def _model(path: Path, where: str, value: Any) -> tuple[str, str | None, str | None]:
    """``(model, revision, adapter)`` of a mergekit model reference ``path[@revision][+adapter]``
    (the adapter a local peft LoRA folder, merged into the model: :mod:`tensorsurgery.planning.adapters`)."""
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{path}: {where}: expected a local folder or a Hugging Face repo id, "
                            f"found {_describe(value)}")
    ref, plus, adapter = value.partition("+")
    if plus and (not adapter.strip() or "+" in adapter):
        raise ManifestError(f"{path}: {where}: {value!r} is not a model reference; use PATH+ADAPTER_FOLDER "
                            f"for a LoRA adapter")
    model, at, revision = ref.partition("@")
    if "@" in revision or not model or (at and not revision):
        raise ManifestError(f"{path}: {where}: {value!r} is not a model reference; use PATH or REPO@REVISION")
    return model, revision or None, adapter or None


def _adapter_ref(adapter: str | None) -> tuple[str | None, str | None]:
    """``(adapter, revision)`` of the ``ADAPTER[@REVISION]`` after a model's ``+``, split at its
    ``@`` as mergekit splits it."""
    if adapter is None:
        return None, None
    name, _, revision = adapter.partition("@")
    return name, revision or None


def _source_names(models: list[tuple[str, str | None, str | None]]) -> list[str]:
    """Short unique source names: each model's folder or repo name, sanitized for --source NAME=PATH."""
    names: list[str] = []
    for model, *_ in models:
        stem = re.sub(r"[^\w.-]+", "_", PurePosixPath(model.replace("\\", "/").rstrip("/")).name) or "model"
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def _dtype(path: Path, data: dict[str, Any]) -> str | None:
    dtype, out = (_dtype_name(path, key, data.get(key)) for key in ("dtype", "out_dtype"))
    # mergekit casts to dtype when reading and to out_dtype when saving; we cast once, which
    # gives the same bytes only when the first cast loses nothing.
    if dtype and out and dtype not in (out, "float32"):
        raise ManifestError(f"{path}: dtype: {dtype} then out_dtype {out} rounds every tensor twice; "
                            f"tensorsurgery casts once: remove dtype or set it to {out} or float32")
    return out or dtype


def _output_dtype(spec: MergeSpec, dtype: str | None, out: str | None) -> str | None:
    """The output's dtype: ``out_dtype``, else the merge dtype (mergekit's results are in it), but
    for a method whose result torch promotes to float32 (mergekit writes that)."""
    return out or (None if spec.method in FLOAT32_RESULTS else dtype)


def _dtype_name(path: Path, key: str, value: Any) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in CAST_DTYPES:
        raise ManifestError(f"{path}: {key}: unsupported dtype {_describe(value)}; expected one of: "
                            f"{', '.join(CAST_DTYPES)}")
    return name


def _describe(value: Any) -> str:
    kinds = {dict: "a mapping", list: "a list", str: "a string", int: "an integer", bool: "a boolean",
             float: "a number", type(None): "nothing"}
    return f"{kinds.get(type(value), type(value).__name__)} {value!r:.60}" if value is not None else "nothing"

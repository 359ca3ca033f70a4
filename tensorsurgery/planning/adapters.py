"""LoRA adapters merged into their source (``[sources.NAME] adapter = PATH``, mergekit's
``BASE+ADAPTER``): which output tensors become ``W + scaling * (B @ A)`` (:class:`~tensorsurgery.ops.LoraMerge`)
(their biases ``b + scaling * lora_B.bias`` with ``lora_bias``: :class:`~tensorsurgery.ops.LoraBias`)
and which are replaced by the adapter's own copy (peft's ``modules_to_save``).

:func:`read_adapter` reads a peft folder, local or a Hub repo's in the Hugging Face cache
(``adapter_config.json`` and the header of ``adapter_model.safetensors``, no tensor data);
:func:`adapted` is pure: it turns the planned tensors of the adapted source into their
recipes, as peft's ``merge_and_unload`` computes them.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from tensorsurgery.errors import AdapterError, HeaderError, SourceError
from tensorsurgery.formats.safetensors import Header, read_header
from tensorsurgery.io.fsio import read_json
from tensorsurgery.manifest.repo_id import is_repo_id
from tensorsurgery.ops import COPY, LoraBias, LoraExperts, LoraMerge, Operation
from tensorsurgery.ops.base import ByteRange, Input
from tensorsurgery.planning.adapter_params import assign, owners, parameter, piece_keys, targeted
from tensorsurgery.planning.quantized import DEQUANTIZE_FIRST
from tensorsurgery.sources.hub import hub_files

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: peft's prefix of every key it saves (the adapter name is stripped on save).
_PREFIX = "base_model.model."
_FLOATS = ("F32", "BF16", "F16")

#: The suffix of a DoRA module's magnitude vector (peft saves it without ``.weight``).
_MAGNITUDE = ".lora_magnitude_vector"
#: The suffix of ``lora_B``'s bias (``lora_bias``).
_BIAS = ".lora_B.bias"
#: The suffixes of a module's two factors in an adapter file, and whether it is an embedding's.
_FACTORS = ((".lora_A.weight", ".lora_B.weight", False), (".lora_embedding_A", ".lora_embedding_B", True))
#: Bytes read at a time when hashing the adapter files.
_HASH_CHUNK = 1 << 20


def _advice(dtype: str) -> str:
    """What to do about a base tensor of ``dtype`` that is not a float a LoRA merges: a quantized
    model (FP8 blocks, MXFP4's U8) can be dequantized first."""
    return "" if dtype in _FLOATS else f" ({dtype}: a quantized model); {DEQUANTIZE_FIRST}"


@dataclass(frozen=True, slots=True)
class Adapter:
    """A peft LoRA adapter read from ``root``: its config, its weights' header, and the sha256 of
    both files (for the record)."""

    source: str
    root: Path
    config: Mapping[str, Any]
    header: Header
    hashes: tuple[tuple[str, int, str], ...]  # (file name, size, sha256)
    #: ``(repo id, commit)`` of an adapter read from the Hugging Face cache; None for a local folder.
    hub: tuple[str, str] | None = None


class AdapterInfo(NamedTuple):
    """An adapter as the plan records it: its source, folder, files and each module's scaling."""

    source: str
    path: str
    files: tuple[tuple[str, int, str], ...]
    scalings: tuple[tuple[str, float], ...]
    hub: tuple[str, str] | None = None  # (repo id, commit) of a Hub adapter


def read_adapter(source: str, path: str, revision: str | None = None) -> Adapter:
    """The adapter of source ``source``: the local peft folder ``path``, or the Hub repo ``path``
    at ``revision`` (default: its main branch) through the Hugging Face cache.

    Raises:
        AdapterError: not a folder with both files, not a LoRA, a malformed config, a revision
            for a local folder.
    """
    root = Path(path).expanduser()
    where = f"sources.{source}: adapter {path!r}"
    hub: tuple[str, str] | None = None
    if root.exists() and revision is not None:
        raise AdapterError(f"{where} is a local folder, and adapter_revision {revision!r} is for a Hub repo id; "
                           f"drop the revision, or give the repo id")
    if not root.exists() and is_repo_id(path):  # a local folder first, as for a source's model
        try:
            root, commit = hub_files(path, (CONFIG_FILE, WEIGHTS_FILE), what=f"sources.{source}: adapter",
                                     revision=revision)
        except SourceError as e:
            raise AdapterError(str(e)) from None
        hub = (path, commit)
    if not (root / CONFIG_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{where}: not a peft adapter folder (it needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                           f"give the folder save_pretrained wrote, or its Hub repo id")
    try:
        config = read_json(root / CONFIG_FILE)
        header = read_header(root / WEIGHTS_FILE, keep_raw=False)
    except (SourceError, HeaderError) as e:
        raise AdapterError(f"{where}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: {CONFIG_FILE} is not a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"{where}: peft_type is {kind!r}; only LoRA adapters (peft_type LORA) can be merged")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise AdapterError(f"{where}: {CONFIG_FILE} has no positive {key!r}")
    return Adapter(source, root, config, header, tuple(_hash(root / f) for f in (CONFIG_FILE, WEIGHTS_FILE)), hub)


def _hash(path: Path) -> tuple[str, int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_CHUNK):
            h.update(block)
    return path.name, path.stat().st_size, h.hexdigest()


def scaling(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """The rank and scaling peft gives ``module``: ``alpha / r`` (``alpha / sqrt(r)`` with
    ``use_rslora``), ``r`` and ``alpha`` from the first key of ``rank_pattern`` / ``alpha_pattern``
    that matches the module's name as ``(.*\\.)?(KEY)$``."""
    r = _pattern(config.get("rank_pattern"), module, config["r"])
    alpha = _pattern(config.get("alpha_pattern"), module, config["lora_alpha"])
    return int(r), (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def _pattern(patterns: Any, module: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class _Module(NamedTuple):
    a: str
    b: str
    embedding: bool
    magnitude: str | None = None  # DoRA's lora_magnitude_vector key
    bias: str | None = None  # lora_bias's lora_B.bias key


def _modules(adapter: Adapter) -> tuple[dict[str, _Module], dict[str, str], dict[str, str]]:
    """The adapter file's keys: LoRA modules (by module name), replaced tensors (``modules_to_save``,
    by base key) and base weights it carries (``<module>.base_layer.weight``, by base key).

    Raises:
        AdapterError: a key peft's LoRA does not save (a magnitude without ``use_dora``, a
            ``lora_B.bias`` without ``lora_bias`` or with DoRA), a lone factor, a DoRA module
            without its magnitude.
    """
    modules: dict[str, _Module] = {}
    saved: dict[str, str] = {}
    bases: dict[str, str] = {}
    keys = adapter.header.tensors
    dora = bool(adapter.config.get("use_dora"))
    lora_bias = bool(adapter.config.get("lora_bias"))
    for key in keys:
        name = key.removeprefix(_PREFIX)
        for a, b, emb in _FACTORS:
            if name.endswith(a):
                module = name.removesuffix(a)
                if key.removesuffix(a) + b not in keys:
                    raise AdapterError(f"{adapter.root / WEIGHTS_FILE}: {key!r} has no {b.lstrip('.')!r}; the adapter "
                                       f"file is incomplete")
                magnitude = key.removesuffix(a) + _MAGNITUDE
                if dora and magnitude not in keys:
                    raise AdapterError(f"{adapter.root / WEIGHTS_FILE}: {key!r} has no {_MAGNITUDE.lstrip('.')!r}; "
                                       f"the DoRA adapter file (use_dora) is incomplete")
                bias = key.removesuffix(a) + _BIAS
                modules[module] = _Module(key, key.removesuffix(a) + b, emb, magnitude if dora else None,
                                          bias if bias in keys and lora_bias and not dora else None)
                break
        else:
            if name.endswith((".lora_B.weight", ".lora_embedding_B")) or (dora and name.endswith(_MAGNITUDE)):
                continue
            if name.endswith(_BIAS) and lora_bias and not dora and key.removesuffix(_BIAS) + ".lora_A.weight" in keys:
                continue  # the bias of a module read above
            if name.endswith(".base_layer.weight"):
                bases[name.removesuffix(".base_layer.weight") + ".weight"] = key
            elif ".lora_" in name:
                raise AdapterError(f"{adapter.root / WEIGHTS_FILE}: {key!r} is not merged by tensorsurgery (LoRA "
                                   f"A/B factors, embeddings and modules_to_save only); merge with peft instead")
            else:
                saved[name] = key
    return modules, saved, bases


def _input(adapter: Adapter, key: str) -> Input:
    e = adapter.header.tensors[key]
    return Input(adapter.source, key, e.dtype, e.shape,
                 ByteRange(adapter.header.source, adapter.header.data_start + e.start, e.nbytes))


class Recipe(NamedTuple):
    """A replacement recipe for an output tensor of the adapted source."""

    inputs: tuple[Input, ...]
    op: Operation


def adapter_recipes(adapter: Adapter, base_keys: Mapping[str, Input],
                    transposed_experts: bool = False) -> tuple[dict[str, Recipe], AdapterInfo]:
    """Every base tensor ``adapter`` changes, by source key, with the recipe that makes it
    (``dtype`` filled in later by :func:`with_dtype`: the output's); ``base_keys`` are the source's
    tensors (key -> its input); ``transposed_experts``: the model stores its experts
    ``[experts, in, out]`` (:func:`~tensorsurgery.planning.adapter_params.experts_transposed`). Pure.

    Raises:
        AdapterError: a module with no base tensor, shapes that do not fit, a factor not a float.
    """
    modules, saved, bases = _modules(adapter)
    where = f"sources.{adapter.source}: adapter {adapter.root}"
    recipes: dict[str, Recipe] = {}
    scalings = []
    fan = bool(adapter.config.get("fan_in_fan_out"))
    shapes = {k: i.shape for k, i in base_keys.items()}
    groups = owners(adapter.config, modules, shapes)
    for parent, depths in groups.items():
        made, scaled = _parameter_recipes(adapter, parent, {d: modules[n] for d, n in depths.items()}, base_keys,
                                          shapes, transposed_experts)
        recipes.update(made)
        scalings += scaled
    wrapped = {n for depths in groups.values() for n in depths.values()}
    for module, m in modules.items():
        if module in wrapped:
            continue
        key = module + ".weight"
        base = base_keys.get(key)
        if base is None:
            raise AdapterError(f"{where}: module {module!r} has no base tensor {key!r} in the source; the adapter "
                               f"was trained for another model")
        w = _input(adapter, bases[key]) if key in bases else base
        a, b = _input(adapter, m.a), _input(adapter, m.b)
        r, s = scaling(adapter.config, module)
        transposed = m.embedding or fan
        if len(w.shape) != 2 or not _fits(w.shape, a.shape, b.shape, r, transposed) or w.shape != base.shape:
            raise AdapterError(f"{where}: module {module!r}: A {list(a.shape)} and B {list(b.shape)} (rank {r}) do "
                               f"not fit its base tensor {list(base.shape)}; the adapter was trained for another "
                               f"model (or its rank_pattern is wrong)")
        if any(i.dtype not in _FLOATS for i in (w, a, b)) or base.dtype not in _FLOATS:
            raise AdapterError(f"{where}: module {module!r}: its tensors are {w.dtype}, {a.dtype}, {b.dtype}; "
                               f"LoRA merges float tensors only{_advice(w.dtype)}")
        if m.magnitude is None:
            recipes[key] = Recipe((w, a, b), LoraMerge(s, transposed, m.embedding, base.dtype, base.dtype))
        else:
            recipes[key] = Recipe((w, a, b, _magnitude(adapter, module, m, transposed, w.shape[0])),
                                  LoraMerge(s, False, False, base.dtype, base.dtype, dora=True))
        if m.bias is not None:
            recipes[module + ".bias"] = _bias(adapter, module, m.bias, base_keys.get(module + ".bias"), s)
        scalings.append((module, s))
    for key, saved_key in saved.items():
        base = base_keys.get(key)
        i = _input(adapter, saved_key)
        if base is None or base.shape != i.shape:
            raise AdapterError(f"{where}: {saved_key!r} (modules_to_save) replaces no tensor of the source's "
                               f"shape {list(i.shape)}; the adapter was trained for another model")
        recipes[key] = Recipe((i,), COPY)
    return recipes, AdapterInfo(adapter.source, str(adapter.root), adapter.hashes, tuple(sorted(scalings)),
                              adapter.hub)


def _parameter_recipes(adapter: Adapter, parent: str, depths: Mapping[int, _Module], base_keys: Mapping[str, Input],
                       shapes: Mapping[str, Sequence[int]],
                       transposed: bool) -> tuple[dict[str, Recipe], list[tuple[str, float]]]:
    """The recipes of the parameters of module ``parent`` a ``target_parameters`` LoRA changes
    (:mod:`tensorsurgery.planning.adapter_params`), by source key, and each parameter's scaling;
    ``depths`` are the module's wrappers' factors by depth, ``shapes`` the base tensors' shapes.

    Raises:
        AdapterError: options peft's ParamWrapper refuses, factors that fit no parameter (or two
            ways), tensors not float.
    """
    where = f"sources.{adapter.source}: adapter {adapter.root}: module {parent!r}"
    refused = [k for k in ("use_dora", "lora_bias", "fan_in_fan_out") if adapter.config.get(k)]
    if refused:
        raise AdapterError(f"{where}: {', '.join(refused)} with target_parameters: peft's ParamWrapper refuses it, "
                           f"so no adapter peft makes has it; the adapter config is wrong")
    factors = {d: (_input(adapter, m.a), _input(adapter, m.b)) for d, m in depths.items()}
    params = {k: p for k in targeted(adapter.config, parent) if (p := parameter(k, shapes)) is not None}
    chosen = assign(where, {d: (a.shape, b.shape) for d, (a, b) in factors.items()},
                    {k: (p.shape, scaling(adapter.config, k)[0]) for k, p in params.items()}, transposed)
    out, scalings = {}, []
    for d, key in chosen.items():
        p, (a, b) = params[key], factors[d]
        s = scaling(adapter.config, key)[1]
        scalings.append((key, s))
        if transposed and not p.fused:
            raise AdapterError(f"{where}: parameter {key!r} is stored one expert at a time, and this model's "
                               f"experts are [experts, in, out]: tensorsurgery does not know how its pieces make "
                               f"the parameter; merge it with peft")
        for piece, row0 in p.pieces:
            base = base_keys[piece]
            if any(i.dtype not in _FLOATS for i in (base, a, b)):
                raise AdapterError(f"{where}: parameter {key!r}: its tensors are {base.dtype}, {a.dtype}, "
                                   f"{b.dtype}; LoRA merges float tensors only{_advice(base.dtype)}")
            # peft casts a parameter's scaled delta to the weight's dtype before the add (round_delta)
            op: Operation = (LoraMerge(s, False, True, base.dtype, base.dtype) if len(p.shape) == 2 else
                             LoraExperts(s, transposed, True, base.dtype, base.dtype, experts=p.shape[0],
                                         expert_rows=p.shape[1], row0=row0))
            out[piece] = Recipe((base, a, b), op)
    return out, scalings


def _bias(adapter: Adapter, module: str, key: str, base: Input | None, s: float) -> Recipe:
    """The recipe of a ``lora_bias`` module's merged bias: the base layer's plus ``lora_B``'s.

    Raises:
        AdapterError: the base layer has no bias (peft cannot merge it either), shapes or dtypes
            that do not fit.
    """
    where = f"sources.{adapter.source}: adapter {adapter.root}: module {module!r}"
    if base is None:
        raise AdapterError(f"{where}: the adapter has a lora_B bias (lora_bias) but its base layer has no bias "
                           f"{module + '.bias'!r}; peft cannot merge it either (its merge raises)")
    i = _input(adapter, key)
    if i.shape != base.shape or len(i.shape) != 1 or i.dtype not in _FLOATS or base.dtype not in _FLOATS:
        raise AdapterError(f"{where}: its lora_B bias is {i.dtype} {list(i.shape)}, its base bias {base.dtype} "
                           f"{list(base.shape)}; they do not fit: the adapter was trained for another model")
    return Recipe((base, i), LoraBias(s, base.dtype))


def _magnitude(adapter: Adapter, module: str, m: _Module, transposed: bool, rows: int) -> Input:
    """A DoRA module's magnitude vector (one value per output row), as the fourth input.

    Raises:
        AdapterError: an embedding's or a ``fan_in_fan_out`` layer's DoRA (peft's norm is over a
            column of the stored tensor there, which needs every row first), a magnitude that
            does not fit.
    """
    where = f"sources.{adapter.source}: adapter {adapter.root}: module {module!r}"
    if transposed:
        kind = "an embedding" if m.embedding else "a fan_in_fan_out layer"
        raise AdapterError(f"{where}: DoRA on {kind} (its norm runs over the stored tensor's columns) is not "
                           f"merged by tensorsurgery; merge it with peft's merge_and_unload")
    assert m.magnitude is not None
    i = _input(adapter, m.magnitude)
    if tuple(i.shape) != (rows,) or i.dtype not in _FLOATS:
        raise AdapterError(f"{where}: its lora_magnitude_vector is {i.dtype} {list(i.shape)}; DoRA needs one float "
                           f"per output row ({rows}): the adapter was trained for another model")
    return i


def _fits(w: Sequence[int], a: Sequence[int], b: Sequence[int], r: int, transposed: bool) -> bool:
    rows, cols = w
    if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
        return False
    return (a[1], b[0]) == ((rows, cols) if transposed else (cols, rows))


def source_inputs(weight_map: Mapping[str, str], headers: Mapping[str, Header], source: str,
                  keys: Iterable[str]) -> dict[str, Input]:
    """The inputs of a source's tensors ``keys`` (those it has)."""
    out = {}
    for key in keys:
        shard = weight_map.get(key)
        if shard is None:
            continue
        h = headers[shard]
        e = h.tensors[key]
        out[key] = Input(source, key, e.dtype, e.shape, ByteRange(h.source, h.data_start + e.start, e.nbytes))
    return out


def adapter_keys(adapter: Adapter) -> set[str]:
    """The base keys an adapter's file refers to (its modules' weights and modules_to_save)."""
    modules, saved, _ = _modules(adapter)
    biases = {name + ".bias" for name, m in modules.items() if m.bias is not None}
    # what may be a parameter's LoRA (the source's keys tell at planning), and the module weights
    params = set()
    for parent, depths in owners(adapter.config, modules).items():
        for key in targeted(adapter.config, parent):
            r = scaling(adapter.config, key)[0]
            experts = max(adapter.header.tensors[modules[n].a].shape[0] // r for n in depths.values())
            params |= piece_keys(key, experts)
    return {m + ".weight" for m in modules} | set(saved) | biases | params

"""The pure planning step: (Manifest, Checkpoints) -> Plan. No disk or network.

Every output tensor is a recipe (:mod:`tensorsurgery.ops.recipe`): its inputs, byte ranges of
source shards, and one operation. Shard files, config.json, the index and everything the model card
says (:mod:`tensorsurgery.output.card` renders it) are decided here, so ``plan`` and ``--dry-run``
show exactly what ``apply`` will write and ``verify`` knows exactly what to expect.
"""
from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field, replace
from operator import attrgetter
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping

from tensorsurgery.errors import AdapterError, ConsistencyError, PlanError
from tensorsurgery.families.consistency import differing_sources, output_findings
from tensorsurgery.families.layers import LayerRef, seams
from tensorsurgery.families.rules import get_preset
from tensorsurgery.formats.dtypes import CAST_DTYPES, element_size, is_castable
from tensorsurgery.formats.output_format import OutputFormat
from tensorsurgery.formats.safetensors import Header
from tensorsurgery.formats.safetensors_output import SAFETENSORS
from tensorsurgery.io.gcpause import paused_gc
from tensorsurgery.manifest.merge_slices import range_problem
from tensorsurgery.manifest.merges import MergeSpec
from tensorsurgery.manifest.toml import Manifest
from tensorsurgery.ops import (
    COPY,
    ZEROS,
    DequantFP8,
    DequantMXFP4,
    LoraMerge,
    Operation,
    PermuteRotary,
    rotary_row_order,
)
from tensorsurgery.ops.base import ByteRange, Input, RowSlice
from tensorsurgery.ops.recipe import label
from tensorsurgery.planning.adapter_params import experts_transposed
from tensorsurgery.planning.adapters import AdapterInfo, adapter_keys, adapter_recipes, read_adapter, source_inputs
from tensorsurgery.planning.adapters import Recipe as AdapterRecipe
from tensorsurgery.planning.config import build_config
from tensorsurgery.planning.made_inputs import made_inputs
from tensorsurgery.planning.merging import Merger
from tensorsurgery.planning.quantized import (
    MXFP4_BLOCKS,
    dequant_recipe,
    fp8_sources,
    mxfp4_recipe,
    mxfp4_sources,
    without_quantization,
)
from tensorsurgery.planning.selection import Pick, natural_order, select
from tensorsurgery.planning.table import OutputTensor, PlanTensors, TableBuilder, TensorTable
from tensorsurgery.planning.vocabulary import copied_files, tokenizer_donor
from tensorsurgery.sources.checkpoint import Checkpoint


def output_tensor(name: str, dtype: str, shape: tuple[int, ...], offset: int, nbytes: int,
                  inputs: tuple[Input, ...], op: Operation = COPY) -> OutputTensor:
    """An :class:`OutputTensor` with its transform label (for plans made by hand: tests, tools)."""
    first = inputs[0].dtype if inputs else None
    return OutputTensor(name, dtype, shape, offset, nbytes, inputs, op,
                        label(any(i.part is not None for i in inputs), op, first, dtype))


@dataclass(frozen=True, slots=True)
class Shard:
    """An output file: its encoded header and its tensors in data order, in columns (a shard may
    hold 100k tensors: :mod:`tensorsurgery.planning.table`; given as a tuple, they are stored so).
    ``link`` names a source file that is byte-identical to this shard (planned with ``link=True``):
    it may be hard-linked or reflinked instead of written."""

    filename: str
    header: bytes
    tensors: TensorTable
    link: Path | None = None
    data_size: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, TensorTable):
            object.__setattr__(self, "tensors", TensorTable.of(self.tensors))
        if self.data_size < 0:  # summed once: plans ask for it often, and a shard may hold 100k tensors
            object.__setattr__(self, "data_size", sum(self.tensors.nbytes))

    @property
    def nbytes(self) -> int:
        return len(self.header) + self.data_size


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """A source as the plan records it (for provenance and display). ``inside`` is the folder its
    files must really be in; ``files`` its weight files."""

    name: str
    model: str
    root: Path
    layout: str
    revision: str | None
    files: tuple[str, ...]
    repo_id: str | None = None
    inside: Path | None = None


@dataclass(frozen=True, slots=True)
class CopyFile:
    """A small file copied byte for byte from a source folder into the output."""

    source: Path
    name: str
    inside: Path


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything ``apply`` will write, computed from headers alone. ``card_meta`` is the front
    matter it carries over from the base source's card; ``family`` the
    :mod:`tensorsurgery.families.registry` entry whose rules were used (``generic`` when the base's
    model_type is not in the registry); ``kinds`` a label of each output layer's kind."""

    output: Path
    sources: tuple[SourceInfo, ...]
    layers: tuple[LayerRef, ...]
    seams: tuple[tuple[int, int], ...]
    shards: tuple[Shard, ...]
    config: Mapping[str, Any]
    copy_files: tuple[CopyFile, ...]
    manifest_text: str
    manifest_name: str = "manifest.toml"
    card_meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    family: str = "generic"
    kinds: tuple[str, ...] = ()
    #: The LoRA adapters merged into their sources (:mod:`tensorsurgery.planning.adapters`).
    adapters: tuple[AdapterInfo, ...] = ()
    #: The merge every tensor is computed by (``[merge]``, a mergekit merge method), or None.
    merge: MergeSpec | None = None
    #: The container of its shards: their names, headers and index.
    output_format: OutputFormat = SAFETENSORS

    @property
    def index(self) -> Mapping[str, Any] | None:
        """The index file's content (:meth:`OutputFormat.index`); None when the output needs none
        (a single shard). Made when asked (90k entries for DeepSeek-V3)."""
        return self.output_format.index([(s.filename, s.data_size, s.tensors.names) for s in self.shards])

    @property
    def total_size(self) -> int:
        """Tensor bytes (``metadata.total_size`` of the index)."""
        return sum(s.data_size for s in self.shards)

    @property
    def nbytes(self) -> int:
        """Bytes of all shard files, headers included."""
        return sum(s.nbytes for s in self.shards)

    @property
    def written_nbytes(self) -> int:
        """Bytes of the shard files ``apply`` writes (linked shards excluded)."""
        return sum(s.nbytes for s in self.shards if s.link is None)

    @property
    def tensors(self) -> PlanTensors:
        """Every output tensor, shard by shard, each made when asked for (see
        :mod:`tensorsurgery.planning.table`: keep none, loop again)."""
        return PlanTensors([s.tensors for s in self.shards])

    @property
    def tensor_count(self) -> int:
        """How many output tensors (without building :attr:`tensors`)."""
        return sum(len(s.tensors) for s in self.shards)

    @property
    def transform_counts(self) -> Mapping[str, int]:
        """How many output tensors each transform makes (``{"none": 280, "cast": 11}``), sorted by
        transform. Counted in C (a plan may hold 1.7M tensors)."""
        counts: Counter[str] = Counter()
        for shard in self.shards:
            counts.update(shard.tensors.transforms)
        return dict(sorted(counts.items()))


@paused_gc()  # a few objects per tensor, no cycles: see gcpause
def build_plan(manifest: Manifest, checkpoints: Mapping[str, Checkpoint], *, link: bool = False,
               output_format: OutputFormat = SAFETENSORS) -> Plan:
    """Plan the output of ``manifest`` applied to ``checkpoints`` (keyed by source name), its
    shards in the container ``output_format``.

    With ``link``, every shard of the first source whose tensors all pass through unchanged
    (same names, dtypes and bytes) becomes an output shard of its own, byte-identical to that
    source file (its header reused), whatever ``max_shard_size`` says; the writer can then link
    it instead of copying. The other tensors are sharded as usual.

    Raises:
        PlanError: a layer out of range (naming the arrangement position), two tensors renamed
            to one name, a renamed layer tensor without its layer index, layers whose shapes
            cannot stack, a permutation that does not fit the head count, an output with no
            tensors or a layer with none.
        ManifestError: an unknown preset, a name no preset rule maps, an invalid replacement.

    Example:
        >>> plan = build_plan(load_manifest("manifests/solar-dus.toml"), {"source": ckpt})  # doctest: +SKIP
        >>> len(plan.layers)                                                              # doctest: +SKIP
        48
    """
    base = manifest.sources[0].name
    if manifest.merge and manifest.merge.slices:
        problem = range_problem(manifest.merge, {name: c.num_layers for name, c in checkpoints.items()})
        if problem:
            raise PlanError(f"{manifest.path}: {problem}")
    chosen = select(manifest, checkpoints)
    arrangement, moe, kinds = chosen.arrangement, chosen.moe, chosen.kinds
    dtype = CAST_DTYPES[manifest.output.dtype] if manifest.output.dtype else None
    # The layers saved after the counted ones (MTP) that the output keeps: rename.drop may drop them.
    held = checkpoints[base].found_layers > checkpoints[base].num_layers
    extra = len({p.position for p in chosen.picks if p.position is not None and p.position >= len(arrangement)}) \
        if held else None
    picks = sorted(chosen.picks, key=_ORDER)
    del chosen  # from here on each tensor is held once: picks, then specs, then placed tensors
    positions = {p.out: p.position for p in picks} if manifest.merge else None
    specs = _specs(picks, checkpoints, dtype)
    del picks  # emptied by _specs
    # Quantized sources (FP8 blocks, MXFP4), dequantized when a dtype is asked for.
    fp8, mxfp4 = fp8_sources(checkpoints, dtype), mxfp4_sources(checkpoints, dtype)
    if manifest.merge and positions is not None:
        # A merged source's dequantized or adapted tensors are made inputs of the merge.
        recipes, adapters = _adapter_recipes(manifest, checkpoints)
        made = made_inputs([s.name for s in manifest.sources], checkpoints, fp8, dtype, recipes)
        specs = _merged(specs, positions, Merger(manifest.merge, checkpoints, len(arrangement), str(manifest.path),
                                                 out_dtype=dtype, made=made.inputs), dtype, made.consumed)
    else:
        if (fp8 or mxfp4) and dtype:
            specs = _dequantized(specs, checkpoints, fp8, mxfp4, dtype)
        specs, adapters = _adapted(specs, manifest, checkpoints)
    linked = _identical_source_shards(specs, checkpoints[base]) if link else []
    taken = {name for _, group in linked for name in group.names}
    groups: list[tuple[Header | None, TensorTable]] = [*linked]
    groups += [(None, group) for group in _cut(TensorTable.of(s for s in specs if s.name not in taken)
                                               if taken else specs, manifest.output.max_shard_size)]
    del specs
    shards = _name_shards(groups, output_format)
    base_ckpt = checkpoints[base]
    donor = base
    if manifest.merge and manifest.merge.tokenizer_source is not None:
        donor = tokenizer_donor(manifest.merge.tokenizer_source, manifest.merge.sources, base, checkpoints,
                                str(manifest.path))
    preset = get_preset(manifest.rename.preset) if manifest.rename.preset else None
    # config.json says the merge dtype, as mergekit's, also where the tensors are float32 (ramplus_tl)
    said = dtype or (manifest.merge.dtype if manifest.merge else None)
    config = build_config({n: c.config for n, c in checkpoints.items()}, base, arrangement,
                          family=base_ckpt.family, moe=moe, preset=preset, dtype=said,
                          overrides=manifest.config, where=f"{manifest.path}: layers", extra_layers=extra)
    if fp8 or mxfp4:
        without_quantization(config, manifest.config)
    _check_consistency(manifest, checkpoints, arrangement, config, shards)
    return Plan(
        output=Path(manifest.output.path),
        sources=tuple(_source_info(s.name, s.model, checkpoints[s.name]) for s in manifest.sources),
        layers=arrangement, seams=seams(arrangement), shards=shards,
        config=MappingProxyType(config),
        copy_files=tuple(CopyFile(c.root / f, f, c.inside) for c, f in copied_files(base_ckpt, checkpoints[donor])),
        manifest_text=manifest.text, manifest_name=manifest.path.name,
        card_meta=base_ckpt.card_meta, family=base_ckpt.family.name, kinds=kinds, adapters=adapters,
        merge=manifest.merge, output_format=output_format,
    )


def _check_consistency(manifest: Manifest, checkpoints: Mapping[str, Checkpoint], arrangement: tuple[LayerRef, ...],
                       config: Mapping[str, Any], shards: tuple[Shard, ...]) -> None:
    """Refuse an output whose config.json and tensors disagree (:mod:`tensorsurgery.families.consistency`),
    or whose layers come from a source that computes them otherwise."""
    base = checkpoints[manifest.sources[0].name]
    texts = {name: base.family.text_config(c.config) for name, c in checkpoints.items()}
    for finding in differing_sources(texts, manifest.sources[0].name, arrangement, base.family):
        raise ConsistencyError(f"{manifest.path}: layers: {finding}; take them from a source whose config agrees")
    found = output_findings(config, (t for s in shards for t in s.tensors.signatures()), base.config,
                            (e for h in base.headers.values() for e in h.entries), base.family)
    if found:
        raise ConsistencyError(f"{manifest.path}: the output's config.json and tensors would disagree: {found[0]}; "
                               f"change [config] (or the renames) so that both describe the same model")


#: The output order: natural order of names (``layers.2`` before ``layers.10``), then the names.
_ORDER = attrgetter("order", "out")  # by name: Pick is selection's


def _source_info(name: str, model: str, ckpt: Checkpoint) -> SourceInfo:
    return SourceInfo(name, model, ckpt.root, ckpt.layout, ckpt.revision, tuple(sorted(ckpt.headers)),
                      repo_id=ckpt.repo_id, inside=ckpt.inside)


def _unplaced(name: str, dtype: str, shape: tuple[int, ...], nbytes: int, inputs: tuple[Input, ...],
              op: Operation, transform: str) -> OutputTensor:
    """An output tensor before sharding places it (offset 0)."""
    return _new(OutputTensor, (name, dtype, shape, 0, nbytes, inputs, op, transform))


#: A plain tuple's constructor, used for the NamedTuples made per tensor: theirs costs 3x.
_new = tuple.__new__


def _specs(picks: list[Pick], checkpoints: Mapping[str, Checkpoint], dtype: str | None) -> TensorTable:
    """The output tensor of each pick (:func:`_spec`), unplaced, verbatim copies inline: they are
    most tensors of most plans, and the loop runs for every tensor of a 1.7M-tensor plan. Empties
    ``picks`` (each is freed as its tensor is added, so the two never both hold every tensor)."""
    sources = {name: (c.weight_map, c.headers) for name, c in checkpoints.items()}
    specs = TableBuilder()
    add_copy, append = specs.add_copy, specs.append
    picks.reverse()
    pop = picks.pop
    for _ in range(len(picks)):
        p = pop()
        out, source, key, permute, rows, _, zeros, _ = p
        weight_map, headers = sources[source]
        header = headers[weight_map[key]]
        _, e_dtype, shape, start, end = header.tensors[key]
        if rows is None and permute is None and not zeros and (
                not dtype or e_dtype == dtype or not is_castable(e_dtype)):
            add_copy(out, e_dtype, shape, end - start, source, key, header.source, header.data_start + start)
        else:
            append(_spec(p, checkpoints, dtype))
    return specs.build()


def _merged(specs: TensorTable, positions: Mapping[str, int | None], merger: Merger,
            dtype: str | None, consumed: frozenset[tuple[str, str]] = frozenset()) -> TensorTable:
    """Each output tensor as the merge of the same tensor of every merged source (in a merge of
    slices, each source's layer of the slice: :class:`~tensorsurgery.planning.merging.Merger`), in the
    output ``dtype`` (default: the merge dtype); the source tensors in ``consumed`` (read by a made
    input: an FP8 weight's scale) are not output tensors."""
    merged = TableBuilder()

    def kept() -> Iterator[OutputTensor]:  # twice over the table, each tensor made as it goes
        return (s for s in specs if not (s.inputs and (s.inputs[0].source, s.inputs[0].key) in consumed))

    merger = merger.with_draws((s.inputs[0].key, s.shape, positions[s.name]) for s in kept() if s.inputs)
    for s in kept():
        if s.op is not COPY or not s.inputs:
            raise PlanError(f"{merger.where}: tensor {s.name!r} is planned as {s.transform!r}, which a merge cannot "
                            f"combine with; merge models that need no rename that permutes or fills tensors")
        inputs, op, md = merger.recipe(s.inputs[0], positions[s.name], s.name)
        # The merge dtype, but ramplus_tl's float32 promotion; a copied base-only slice stays in it.
        out = dtype or (md if op is COPY else op.result_dtype(inputs))
        nbytes = s.nbytes // element_size(s.dtype) * element_size(out)  # s is planned in the output dtype
        merged.add(s.name, out, s.shape, 0, nbytes, inputs, op, label(False, op, inputs[0].dtype, out))
    return merged.build()


def _spec(p: Pick, checkpoints: Mapping[str, Checkpoint], dtype: str | None) -> OutputTensor:
    """The output tensor of pick ``p``: its recipe, of one input (none for zeros)."""
    ckpt = checkpoints[p.source]
    shard = ckpt.weight_map[p.key]
    header = ckpt.headers[shard]
    entry = header.tensors[p.key]
    out_dtype = dtype if dtype and is_castable(entry.dtype) else entry.dtype
    if p.zeros:
        shape = entry.shape[:1]
        nbytes = (shape[0] if shape else 1) * element_size(out_dtype)
        return _unplaced(p.out, out_dtype, shape, nbytes, (), ZEROS, label(False, ZEROS, None, out_dtype))
    shape, source = entry.shape, ByteRange(header.source, header.data_start + entry.start, entry.nbytes)
    part = None
    if p.rows is not None:
        start, stop, total = _rows(p, ckpt.family.text_config(ckpt.config), _where(ckpt, shard, p.key))
        if not shape or shape[0] != total:
            raise PlanError(f"{_where(ckpt, shard, p.key)}: has {shape[0] if shape else 0} rows, but config.json "
                            f"makes the fused parts {total} rows; the config does not describe these weights")
        row_bytes = entry.nbytes // total
        shape = (stop - start, *shape[1:])
        source = ByteRange(source.file, source.offset + start * row_bytes, (stop - start) * row_bytes)
        part = RowSlice(start, stop, total)
    op: Operation = COPY
    if p.permute:
        heads = ckpt.config.get(p.permute)
        try:
            rotary_row_order(shape[0] if shape else 0, heads if isinstance(heads, int) else 0)
        except ValueError as e:
            raise PlanError(f"{_where(ckpt, shard, p.key)}: cannot permute for rotary: {e} "
                            f"({p.permute} = {heads!r})") from None
        assert isinstance(heads, int)
        op = PermuteRotary(heads)
    nbytes = source.length // element_size(entry.dtype) * element_size(out_dtype)
    inputs = (Input(p.source, p.key, entry.dtype, shape, source, part),)
    return _unplaced(p.out, out_dtype, shape, nbytes, inputs, op, label(part is not None, op, entry.dtype, out_dtype))


def _where(ckpt: Checkpoint, shard: str, key: str) -> str:
    return f"{ckpt.root / shard}: tensor {key!r}"


def _rows(p: Pick, config: Mapping[str, Any], where: str) -> tuple[int, int, int]:
    assert p.rows is not None
    try:
        return p.rows.rows(config)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise PlanError(f"{where}: config.json lacks what splitting the fused tensor needs ({e}); add it "
                        f"in [config]") from None


def _identical_source_shards(specs: TensorTable, ckpt: Checkpoint) -> list[tuple[Header, TensorTable]]:
    """Source shards whose every tensor is an output tensor of the same name, taken verbatim:
    each with its tensors placed where the source file has them."""
    by_name = {name: i for i, name in enumerate(specs.names)}
    found = []
    for _, header in sorted(ckpt.headers.items()):
        group = TableBuilder()
        for e in header.entries:
            i = by_name.get(e.name)
            spec = None if i is None else specs[i]
            if (spec is None or spec.transform != "none" or spec.inputs[0].key != e.name
                    or spec.inputs[0].range.file != header.source):
                break
            group.append(spec._replace(offset=e.start))
        else:
            if len(group) and header.raw:
                found.append((header, group.build()))
    return found


#: Header bytes a shard of our own may take (safetensors readers refuse headers over 100 MB):
#: ``max_shard_size`` bounds data bytes, this bounds the tensor count of shards of tiny tensors.
MAX_SHARD_HEADER = 50_000_000


def _cut(specs: TensorTable, max_size: int) -> list[TensorTable]:
    """Greedy in-order sharding, each tensor placed at its offset in its shard: a new shard starts
    when the next tensor would pass ``max_size`` (or the header :data:`MAX_SHARD_HEADER`). Not
    optimal (no bin packing, so order stays natural); a tensor larger than ``max_size`` gets a shard
    of its own, as Hugging Face does. The shards are slices of one table (``specs`` placed)."""
    offsets = array("q")
    starts: list[int] = []
    size = header = 0
    for i, (name, shape, nbytes) in enumerate(zip(specs.names, specs.shapes, specs.nbytes)):
        # An upper bound of the tensor's entry in the JSON header.
        entry = (len(name) if name.isascii() else len(name.encode("utf-8"))) + 100 + 24 * len(shape)
        if not starts or (i > starts[-1] and (size + nbytes > max_size or header + entry > MAX_SHARD_HEADER)):
            starts.append(i)
            size = header = 0
        offsets.append(size)
        size += nbytes
        header += entry
    placed = specs.with_offsets(offsets)
    return [placed.slice(a, b) for a, b in zip(starts, [*starts[1:], len(placed)])]


def _name_shards(groups: list[tuple[Header | None, TensorTable]], fmt: OutputFormat) -> tuple[Shard, ...]:
    """Name shards and lay out each one's header as the container ``fmt`` does; a group with a
    source header is that source file, reproduced as is."""
    n = len(groups)
    shards = []
    for i, (source, group) in enumerate(groups):
        name = fmt.shard_name(i, n)
        if source is not None:
            shards.append(Shard(name, source.raw, group, link=source.path))
            continue
        shards.append(Shard(name, fmt.encode_header(group.header_items()), group))
    return tuple(shards)


def _dequantized(specs: TensorTable, checkpoints: Mapping[str, Checkpoint], blocks: Mapping[str, tuple[int, int]],
                 mxfp4: frozenset[str], dtype: str) -> TensorTable:
    """``specs`` with every FP8 weight of a source in ``blocks`` (its block size) and every MXFP4
    tensor of a source in ``mxfp4`` dequantized to ``dtype`` (:mod:`tensorsurgery.planning.quantized`),
    and the scale tensors these read left out."""
    scales: set[tuple[str, str]] = set()
    out: list[OutputTensor] = []
    op: Operation
    for s in specs:
        first = s.inputs[0] if len(s.inputs) == 1 else None
        if first is not None and first.source in blocks and first.dtype.startswith("F8_"):
            inputs, op = dequant_recipe(first, checkpoints[first.source], blocks[first.source], dtype, s.op is not COPY)
            name, shape = s.name, s.shape
        elif (first is not None and first.source in mxfp4 and first.key.endswith(MXFP4_BLOCKS)
              and s.name.endswith(MXFP4_BLOCKS)):
            suffix, shape, inputs, op = mxfp4_recipe(first, checkpoints[first.source], dtype, s.op is not COPY)
            name = s.name[:-len(suffix)]
        else:
            out.append(s)
            continue
        scales.add((inputs[1].source, inputs[1].key))
        nbytes = element_size(dtype) * (first.range.length if isinstance(op, DequantFP8) else 2 * first.range.length)
        out.append(_unplaced(name, dtype, shape, nbytes, inputs, op, label(False, op, first.dtype, dtype)))
    kept = [s for s in out if len(s.inputs) != 1 or (s.inputs[0].source, s.inputs[0].key) not in scales]
    if any(isinstance(s.op, DequantMXFP4) for s in kept):  # renamed (P_blocks -> P): back to the output order
        kept.sort(key=lambda s: natural_order(s.name))
    return TensorTable.of(kept)


def _adapted(specs: TensorTable, manifest: Manifest, checkpoints: Mapping[str, Checkpoint]
             ) -> tuple[TensorTable, tuple[AdapterInfo, ...]]:
    """``specs`` with each source's LoRA adapter merged in (:mod:`tensorsurgery.planning.adapters`):
    every output tensor made of a tensor it changes gets the adapter's recipe. Returns them and
    what the record says of each adapter (reads the adapter folders: their configs, headers and
    hashes)."""
    every, infos = _adapter_recipes(manifest, checkpoints)
    for spec in manifest.sources:
        if spec.name not in every:
            continue
        recipes = every[spec.name]
        adapted = TableBuilder()
        for s in specs:
            first = s.inputs[0] if len(s.inputs) == 1 else None
            if first is None or first.source != spec.name or first.key not in recipes:
                adapted.append(s)
                continue
            if s.op is not COPY or first.part is not None:
                raise AdapterError(f"sources.{spec.name}: tensor {first.key!r} is permuted or sliced on its way to "
                                   f"{s.name!r}, and an adapter cannot be merged into it; drop the rename that "
                                   f"transforms it")
            inputs, op = recipes[first.key]
            if isinstance(op, LoraMerge):
                op = replace(op, dtype=s.dtype)
            adapted.add(s.name, s.dtype, s.shape, 0, s.nbytes, inputs, op,
                        label(False, op, inputs[0].dtype if op is COPY else first.dtype, s.dtype))
        specs = adapted.build()
    return specs, infos


def _adapter_recipes(manifest: Manifest, checkpoints: Mapping[str, Checkpoint]
                     ) -> tuple[dict[str, dict[str, AdapterRecipe]], tuple[AdapterInfo, ...]]:
    """Each source's LoRA adapter as the recipes of the tensors it changes (by source name, then
    base key), and what the record says of each adapter (reads the adapter folders: their
    configs, headers and hashes)."""
    recipes: dict[str, dict[str, AdapterRecipe]] = {}
    infos = []
    for spec in manifest.sources:
        if spec.adapter is None:
            continue
        adapter = read_adapter(spec.name, spec.adapter, spec.adapter_revision)
        ckpt = checkpoints[spec.name]
        recipes[spec.name], info = adapter_recipes(adapter, source_inputs(ckpt.weight_map, ckpt.headers, spec.name,
                                                                          adapter_keys(adapter)),
                                                   experts_transposed(ckpt.config))
        infos.append(info)
    return recipes, tuple(infos)

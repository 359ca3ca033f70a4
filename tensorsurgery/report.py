"""Text and JSON views of plans and checkpoints, for ``plan``, ``apply --dry-run`` and ``inspect``.
Pure: returns strings and dicts; :mod:`tensorsurgery.cli` prints them."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from tensorsurgery.families.layers import layer_runs, span
from tensorsurgery.manifest.merge_slices import merged_runs
from tensorsurgery.manifest.merges import describe, spec_data
from tensorsurgery.ops.derived import Derived
from tensorsurgery.ops.recipe import dequantized, inputs_data
from tensorsurgery.planning.merge_report import merge_parameter_lines
from tensorsurgery.units import format_bytes

if TYPE_CHECKING:  # views of these
    from tensorsurgery.formats.safetensors import Header
    from tensorsurgery.output.linking import CopiedLinks
    from tensorsurgery.planning.planner import Plan
    from tensorsurgery.sources.checkpoint import Checkpoint
    from tensorsurgery.verification.verifier import VerifyReport


def _dequant_line(plan: Plan) -> str:
    """What is dequantized: the FP8 weights (their block sizes) and MXFP4 tensors, their output
    dtypes, and how many scale tensors (the recipes' second inputs) leave the output."""
    kinds: Counter[str] = Counter()
    scales = set()
    for t in (t for s in plan.shards for t in s.tensors):
        if (op := dequantized(t)) is not None:
            kinds[f"{op.quantization()} -> {t.dtype}"] += 1
            scales.add((t.inputs[1].source, t.inputs[1].key))
    made = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return f"dequantized: {made}; {len(scales)} scale tensors left out"


#: What each operation that makes a merge's input does, in ``plan``'s words.
_MADE = {"dequant": "FP8 weights dequantized", "lora": "weights with the LoRA merged in",
         "lora_experts": "expert parameters with the LoRA merged in", "lora_bias": "biases with lora_bias added",
         "copy": "tensors the adapter replaces (modules_to_save)"}


def _made_line(plan: Plan) -> str | None:
    """What the merge reads made first (:mod:`tensorsurgery.planning.made_inputs`), by source: how
    many dequantized weights, LoRA-merged ones...; None when it reads the sources as they are."""
    made: dict[str, Counter[str]] = {}
    seen = set()
    for t in (t for s in plan.shards for t in s.tensors):
        for i in t.inputs:
            f = i.range.file
            if isinstance(f, Derived) and f not in seen:
                seen.add(f)
                made.setdefault(f.source, Counter())[f.op.label] += 1
    if not made:
        return None
    return "made before merging: " + "; ".join(
        f"{source}: " + ", ".join(f"{n} {_MADE.get(label, label)}" for label, n in sorted(counts.items()))
        for source, counts in made.items())


def format_plan(plan: Plan, *, free: int | None = None, copied: Sequence[CopiedLinks] = ()) -> str:
    """The plan as a screen of text: sources, layer map with seams, shards, bytes, disk
    (``copied``: planned links that cannot be made, whose shards are copied and need the disk)."""
    lines = ["sources:"]
    for s in plan.sources:
        rev = f" @ {s.revision}" if s.revision else ""
        lines.append(f"  {s.name}: {s.model}{rev} ({s.layout} layout, {len(s.files)} file(s))")
    rules = "generic rules (its model_type is not in the registry)" if plan.family == "generic" else "registry entry"
    lines.append(f"family: {plan.family} ({rules})")
    if plan.merge:
        lines.append(f"merge: {describe(plan.merge)}")
    lines.append(f"layers: {len(plan.layers)}")
    seams = dict(plan.seams)
    runs = [] if plan.merge and plan.merge.slices else layer_runs(plan.layers)
    lines += merged_runs(plan.merge) if plan.merge and plan.merge.slices else []
    for a, b, src, x, y in runs:
        seam = f"   <- seam: jump {seams[a]:+d}" if a in seams else ""
        if seam and plan.kinds and plan.kinds[a - 1] != plan.kinds[a]:
            seam += f"; kinds differ: {plan.kinds[a - 1]} | {plan.kinds[a]}"
        lines.append(f"  out {span(a, b):>9}  <-  {src} {span(x, y)}{seam}")
    if plan.seams:
        lines.append(f"seams: {len(plan.seams)}, largest layer distance {max(abs(j) for _, j in plan.seams)}")
    else:
        lines.append("seams: none")
    if any(plan.kinds):
        counts = Counter(plan.kinds)
        lines.append("layer kinds: " + ", ".join(f"{k or 'plain'} x{n}" for k, n in counts.items())
                     + "  (" + " ".join(_kind_runs(plan.kinds)) + ")")
    lines += merge_parameter_lines(plan)
    lines.append("tensors: " + ", ".join(f"{n} {k}" for k, n in plan.transform_counts.items()))
    if "dequant" in plan.transform_counts or "dequant-mxfp4" in plan.transform_counts:
        lines.append(_dequant_line(plan))
    if plan.merge and (made := _made_line(plan)):
        lines.append(made)
    lines.append(f"shards: {len(plan.shards)}")
    unlinkable = {name for c in copied for name in c.shards}
    for shard in plan.shards:
        link = ""
        if shard.link is not None:
            link = f"  {'copied from' if shard.filename in unlinkable else 'linked to'} {shard.link}" + (
                " (another filesystem)" if shard.filename in unlinkable else " (not written)")
        lines.append(f"  {shard.filename}  {format_bytes(shard.nbytes):>10}  {len(shard.tensors)} tensors{link}")
    lines += [c.note for c in copied]
    written = disk_needed(plan, copied)
    need = f"disk needed: {format_bytes(written)}"
    if written != plan.nbytes:
        need += f" ({format_bytes(plan.nbytes - written)} of linked shards take no space)"
    if free is not None:
        need += f" (free: {format_bytes(free)}{'; NOT ENOUGH' if free < written else ''})"
    lines += [f"output: {plan.output}", f"total: {format_bytes(plan.total_size)} of tensors; {need}"]
    return "\n".join(lines)


def _kind_runs(kinds: tuple[str, ...]) -> list[str]:
    """``kind@a..b`` for each run of output layers of one kind."""
    runs: list[list[Any]] = []
    for i, kind in enumerate(kinds):
        if runs and runs[-1][0] == kind:
            runs[-1][2] = i
        else:
            runs.append([kind, i, i])
    return [f"{k or 'plain'}@{span(a, b)}" for k, a, b in runs]


def disk_needed(plan: Plan, copied: Sequence[CopiedLinks] = ()) -> int:
    """Bytes of the shard files apply writes: all but the linked shards, counting as written those
    whose link cannot be made (``copied``)."""
    return plan.written_nbytes + sum(c.nbytes for c in copied)


def plan_as_dict(plan: Plan, copied: Sequence[CopiedLinks] = ()) -> dict[str, Any]:
    """The plan as JSON-ready data (``plan --json``); ``copied`` as in :func:`format_plan`."""
    return {
        "output": str(plan.output),
        "sources": [{"name": s.name, "model": s.model, "root": str(s.root), "layout": s.layout,
                     "revision": s.revision, "files": list(s.files)} for s in plan.sources],
        "family": plan.family,
        "merge": spec_data(plan.merge) if plan.merge else None,
        "layers": [{"source": r.source, "layer": r.layer, "kind": plan.kinds[i] if plan.kinds else ""}
                   for i, r in enumerate(plan.layers)],
        "seams": [{"position": p, "jump": j,
                   "kinds_differ": bool(plan.kinds) and plan.kinds[p - 1] != plan.kinds[p]} for p, j in plan.seams],
        "shards": [{"filename": s.filename, "nbytes": s.nbytes, "link": str(s.link) if s.link else None, "tensors": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes,
             "source": t.source_name, "source_key": t.source_key,
             "source_file": t.source.file.location if t.source else None,
             "source_offset": t.source.offset if t.source else None, "transform": t.transform,
             **inputs_data(t, with_offsets=True)} for t in s.tensors]}
            for s in plan.shards],
        "total_size": plan.total_size,
        "disk_needed": disk_needed(plan, copied),
        "links_copied": [{"source": str(c.source), "shards": list(c.shards), "nbytes": c.nbytes} for c in copied],
        "config": dict(plan.config),
    }


def checkpoint_as_dict(ckpt: Checkpoint) -> dict[str, Any]:
    """A checkpoint's summary as JSON-ready data (``inspect --json``)."""
    return {
        "root": str(ckpt.root), "layout": ckpt.layout, "layers": ckpt.num_layers,
        "shards": [{"file": f, "tensors": len(h.entries), "nbytes": h.file_size} for f, h in ckpt.headers.items()],
        "dtypes": dict(Counter(h.tensors[n].dtype for n, f in ckpt.weight_map.items() for h in [ckpt.headers[f]])),
        "tensors": len(ckpt.weight_map),
        "nbytes": sum(h.file_size for h in ckpt.headers.values()),
        "model_type": ckpt.config.get("model_type"),
    }


def format_checkpoint(ckpt: Checkpoint) -> str:
    """A checkpoint's summary as text (``inspect``)."""
    d = checkpoint_as_dict(ckpt)
    lines = [f"{d['root']}: {d['layout']} layout, model_type {d['model_type']}, {d['layers']} layers, "
             f"{d['tensors']} tensors, {format_bytes(d['nbytes'])}"]
    lines += [f"  {s['file']}  {s['tensors']} tensors  {format_bytes(s['nbytes'])}" for s in d["shards"]]
    lines.append("  dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(d["dtypes"].items())))
    return "\n".join(lines)


def header_as_dict(header: Header) -> dict[str, Any]:
    """One safetensors file's tensors as JSON-ready data (``inspect FILE --json``)."""
    return {"file": str(header.path), "tensors": [
        {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "nbytes": e.nbytes} for e in header.entries]}


def format_header(header: Header) -> str:
    """One safetensors file's tensors as text (``inspect FILE``)."""
    lines = [f"{e.name:60s} {e.dtype:6s} {str(list(e.shape)):20s} {format_bytes(e.nbytes)}" for e in header.entries]
    lines.append(f"{len(header.entries)} tensors, {format_bytes(header.data_size)}")
    return "\n".join(lines)


def iter_differences(report: VerifyReport) -> Iterator[str]:
    """One line per difference, for printing. A file or tensor name that is not printable (a
    newline in a name could forge a line of the report) is shown as a Python literal."""
    for d in report.differences:
        yield f"{printable(d.where)}: {printable(d.what)}"


def printable(text: str) -> str:
    """``text``, or its Python literal when it is not printable (a newline could forge a line)."""
    return text if text.isprintable() else repr(text)


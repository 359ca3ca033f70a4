"""The output's model card (README.md with Hub front matter). Pure: text in, text out.

The card says what was built and how: Hub metadata (``base_model``, ``library_name``, ``tags``,
the source's ``license``), the layer arrangement as a table with its seams, the manifest, and a
provenance summary (the full record is ``tensorsurgery.json``). The source's own card is not
copied: it describes another model; only its license is carried over. It names no local path
(:mod:`tensorsurgery.manifest.path_free`).
"""
from __future__ import annotations

import re
import tomllib
from collections import Counter
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import yaml

from tensorsurgery._version import __version__
from tensorsurgery.families.layers import layer_runs, span
from tensorsurgery.manifest.merges import RANDOM_METHODS, describe
from tensorsurgery.manifest.path_free import path_free_manifest
from tensorsurgery.manifest.repo_id import is_repo_id
from tensorsurgery.units import format_bytes

if TYPE_CHECKING:  # the card is made from a plan: planning.py imports this module
    from tensorsurgery.planning.planner import Plan, SourceInfo

_TRANSFORMS = {"none": "copied byte for byte", "cast": "cast", "permute": "rows permuted",
               "permute+cast": "rows permuted and cast", "slice": "a row range of a fused tensor",
               "zeros": "zeros (the source has no such tensor)", "dequant": "dequantized from FP8 blocks",
               "lora": "a LoRA adapter merged in", "lora_bias": "a LoRA bias (lora_bias) merged in",
               "linear": "a weighted average (linear)",
               "task_arithmetic": "a base plus weighted differences (task_arithmetic)"}


def model_card(plan: Plan) -> str:
    """README.md for the output of ``plan`` (pure: everything it says is in the plan).

    Example:
        >>> print(model_card(plan).splitlines()[1])  # doctest: +SKIP
        base_model: mistralai/Mistral-7B-v0.1
    """
    meta = card_metadata(plan)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    parts = [f"---\n{front}---", _summary(plan), _merge(plan) if plan.merge else _arrangement(plan),
             _manifest(plan), _provenance(plan)]
    return "\n\n".join(parts) + "\n"


def card_metadata(plan: Plan) -> dict[str, Any]:
    """The card's front matter as a dict (see :func:`model_card`): ``base_model``, library,
    the licence keys of the base source's card, tags."""
    meta: dict[str, Any] = {}
    declared = declared_models(plan.manifest_text)
    bases = [b for b in (base_model(s, declared.get(s.name)) for s in plan.sources) if b]
    bases = list(dict.fromkeys(bases))
    if bases:
        meta["base_model"] = bases[0] if len(bases) == 1 else bases
    meta["library_name"] = "transformers"
    meta.update(plan.card_meta)
    tags = ["tensorsurgery"]
    if is_depth_up_scaled(plan):
        tags.append("depth-up-scaling")
    if len(plan.sources) > 1:
        tags.append("merge")
    meta["tags"] = tags
    return meta


def base_model(source: SourceInfo, declared: str | None = None) -> str | None:
    """The Hub repo id a source stands for, or None.

    A source resolved from the Hub is its repo id. A local folder is never a repo id itself (the
    Hub rejects paths in ``base_model``, and ``examples/tiny-mistral`` only looks like one); but
    when ``--source`` replaced the manifest's ``declared`` repo id with a local copy, the card
    names the declared repo, as the manifest does.
    """
    if source.repo_id is not None:
        return source.repo_id
    if declared and declared != source.model and is_repo_id(declared):
        return declared
    return None


def declared_models(manifest_text: str) -> dict[str, str]:
    """Source name -> model as written in a TOML manifest (before ``--source`` overrides);
    {} for a mergekit YAML."""
    try:
        data = tomllib.loads(manifest_text)
    except tomllib.TOMLDecodeError:
        return {}
    tables = {"source": data["source"]} if isinstance(data.get("source"), dict) else data.get("sources", {})
    if not isinstance(tables, dict):
        return {}
    return {name: t["model"] for name, t in tables.items()
            if isinstance(t, dict) and isinstance(t.get("model"), str)}


def is_depth_up_scaled(plan: Plan) -> bool:
    """True when the output stacks layers: it has more layers than any one source contributes
    distinct layers (DUS, iDUS, frankenmerges). Keeping, reordering or dropping layers is not."""
    distinct = Counter(ref.source for ref in set(plan.layers))
    return bool(distinct) and len(plan.layers) > max(distinct.values())


def source_label(plan: Plan, source: SourceInfo) -> str:
    """How the card names a source: its repo id (from the Hub, or as the manifest declares it
    when ``--source`` gave a local copy), else its folder's name. Never a local path: the card is
    published, and an output copied elsewhere must still hold the card its plan describes."""
    declared = declared_models(plan.manifest_text).get(source.name)
    return (source.repo_id or (declared if declared and is_repo_id(declared) else None)
            or PurePosixPath(source.model.rstrip("/")).name or source.model)


def _summary(plan: Plan) -> str:
    sources = ", ".join(f"`{source_label(plan, s)}`" for s in plan.sources)
    arch = plan.config.get("architectures")
    arch = f" ({', '.join(arch)})" if isinstance(arch, (list, tuple)) and arch else ""
    # The title names the base model, not the output folder: an output moved or renamed must
    # still hold exactly the card its plan describes.
    base = PurePosixPath(source_label(plan, plan.sources[0])).name
    if plan.merge:
        return (f"# {base}, merged ({plan.merge.method}): {len(plan.layers)} layers\n\n"
                f"{len(plan.layers)} decoder layers{arch} merged from {sources} with tensorsurgery {__version__}: "
                f"every tensor is computed from the same tensor of each source by the manifest below, "
                f"without training.")
    what = "depth up-scaled" if is_depth_up_scaled(plan) else "rebuilt"
    return (f"# {base}, {what}: {len(plan.layers)} layers\n\n"
            f"{len(plan.layers)} decoder layers{arch} built from {sources} with "
            f"tensorsurgery {__version__}: every tensor is a byte "
            f"copy of a source tensor (or a transform of one: cast, row permutation, row slice, zeros), placed "
            f"by the manifest below, without training.")


def _arrangement(plan: Plan) -> str:
    seams = dict(plan.seams)
    rows = ["## Layer arrangement", "",
            "Each output layer is a source layer. A seam is where the source layer index jumps; its "
            "size is the layer distance between the two layers that now meet.", "",
            "| output layers | source | source layers | seam |", "|---|---|---|---|"]
    for out_start, out_end, source, src_start, src_end in layer_runs(plan.layers):
        seam = f"jump {seams[out_start]:+d}" if out_start in seams else ""
        rows.append(f"| {span(out_start, out_end)} | {source} | {span(src_start, src_end)} | {seam} |")
    return "\n".join(rows)


def _merge(plan: Plan) -> str:
    assert plan.merge is not None
    how = "bitwise, as mergekit run with that seed and one torch thread" if plan.merge.method in RANDOM_METHODS \
        else "bitwise"
    if plan.merge.method.startswith("della"):
        how += " and its argsort made stable"
    return (f"## Merge\n\n{describe(plan.merge)}, as mergekit's `{plan.merge.method}` method computes it "
            f"({how}). Each tensor's inputs and resolved parameters are in `tensorsurgery.json`.")


def _manifest(plan: Plan) -> str:
    # The card is published: the manifest's local paths (sources, output) become folder names,
    # and a card rebuilt from that path-free text (a pulled copy's record) is this card again.
    text = path_free_manifest(plan.manifest_text).rstrip("\n")
    try:
        tomllib.loads(text)
        lang = "toml"
    except tomllib.TOMLDecodeError:
        lang = "yaml"  # a mergekit config
    # A fence longer than any backtick run inside, so the manifest cannot close it.
    fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))
    return f"## Manifest\n\n{fence}{lang}\n{text}\n{fence}"


def _provenance(plan: Plan) -> str:
    lines = ["## Provenance", ""]
    for s in plan.sources:
        rev = f" at commit `{s.revision}`" if s.revision else ""
        lines.append(f"- source `{s.name}`: `{source_label(plan, s)}`{rev}, {s.layout} layout, "
                     f"{len(s.files)} weight file(s)")
    lines += [
        f"- output: {plan.tensor_count} tensors ("
        + ", ".join(f"{n} {_TRANSFORMS.get(k, k)}" for k, n in plan.transform_counts.items())
        + f") in {len(plan.shards)} shard(s), {format_bytes(plan.total_size)}",
        f"- tool: tensorsurgery {__version__}",
        "",
        "`tensorsurgery.json` records the manifest, the source revisions and, for every output tensor, its "
        "source file, key, transform and sha256. `tensorsurgery verify` checks the files against it.",
    ]
    return "\n".join(lines)

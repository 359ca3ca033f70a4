"""The output's model card (README.md with Hub front matter). Pure: text in, text out.

The card says what was built and how: Hub metadata (``base_model``, ``library_name``, ``tags``,
the source's ``license``), the layer arrangement as a table with its seams, the manifest, and a
provenance summary (the full record is ``tensorsurgery.json``). The source's own card is not
copied: it describes another model; only its license is carried over.
"""
from __future__ import annotations

import re
import tomllib
from collections import Counter
from typing import Any

import yaml

from . import __version__
from .plan import Plan, SourceInfo
from .report import format_bytes, layer_runs

#: Front matter keys carried from the source's card (``license: other`` needs the other two).
LICENSE_KEYS = ("license", "license_name", "license_link")
_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.DOTALL)
_REPO_ID = re.compile(r"[\w][\w.-]*/[\w.-]+")
_HEX40 = re.compile(r"[0-9a-f]{40}")
_TRANSFORMS = {"none": "copied byte for byte", "cast": "cast", "permute": "rows permuted",
               "permute+cast": "rows permuted and cast"}


def model_card(plan: Plan, source_readme: str | None) -> str | None:
    """README.md for the output of ``plan``.

    Args:
        plan: the plan being written.
        source_readme: the base source's README.md (None when it has none); only the license
            keys of its front matter are used.

    Returns:
        The card's text (never None today; None would mean "write no card").

    Example:
        >>> print(model_card(plan, None).splitlines()[1])  # doctest: +SKIP
        base_model: mistralai/Mistral-7B-v0.1
    """
    meta = card_metadata(plan, source_readme)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    declared = declared_models(plan.manifest_text)
    parts = [f"---\n{front}---", _summary(plan), _arrangement(plan), _manifest(plan, declared), _provenance(plan)]
    return "\n\n".join(parts) + "\n"


def card_metadata(plan: Plan, source_readme: str | None) -> dict[str, Any]:
    """The card's front matter as a dict (see :func:`model_card`)."""
    meta: dict[str, Any] = {}
    declared = declared_models(plan.manifest_text)
    bases = [b for b in (base_model(s, declared.get(s.name)) for s in plan.sources) if b]
    bases = list(dict.fromkeys(bases))
    if bases:
        meta["base_model"] = bases[0] if len(bases) == 1 else bases
    meta["library_name"] = "transformers"
    source_meta = front_matter(source_readme)
    for key in LICENSE_KEYS:
        if isinstance(source_meta.get(key), (str, list)):
            meta[key] = source_meta[key]
    tags = ["tensorsurgery"]
    if is_depth_up_scaled(plan):
        tags.append("depth-up-scaling")
    if len(plan.sources) > 1:
        tags.append("merge")
    meta["tags"] = tags
    return meta


def front_matter(readme: str | None) -> dict[str, Any]:
    """The YAML front matter of a card, or {} when there is none or it is not valid YAML (a
    broken source card must not stop the write: it only loses its license)."""
    m = _FRONT_MATTER.match(readme or "")
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_model(source: SourceInfo, declared: str | None = None) -> str | None:
    """The Hub repo id a source stands for, or None.

    A source resolved from the Hub (a 40-hex commit, its root in the cache's ``snapshots/``)
    is its model string, the repo id. A local folder is never a repo id itself (the Hub rejects
    paths in ``base_model``, and ``examples/tiny-mistral`` only looks like one); but when
    ``--source`` replaced the manifest's ``declared`` repo id with a local copy, the card names
    the declared repo, as the manifest does.
    """
    from_hub = (source.revision is not None and _HEX40.fullmatch(source.revision) is not None
                and source.root.parent.name == "snapshots")
    if from_hub:
        return source.model if _REPO_ID.fullmatch(source.model) else None
    if declared and declared != source.model and _REPO_ID.fullmatch(declared):
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


def _summary(plan: Plan) -> str:
    sources = ", ".join(f"`{s.model}`" for s in plan.sources)
    arch = plan.config.get("architectures")
    arch = f" ({', '.join(arch)})" if isinstance(arch, (list, tuple)) and arch else ""
    return (f"# {plan.output.name}\n\n"
            f"{len(plan.layers)} decoder layers{arch} built from {sources} with "
            f"tensorsurgery {__version__}: every tensor is a byte "
            f"copy of a source tensor (or a dtype cast / rotary row permutation of one), placed by the "
            f"manifest below, without training.")


def _arrangement(plan: Plan) -> str:
    seams = dict(plan.seams)
    rows = ["## Layer arrangement", "",
            "Each output layer is a source layer. A seam is where the source layer index jumps; its "
            "size is the layer distance between the two layers that now meet.", "",
            "| output layers | source | source layers | seam |", "|---|---|---|---|"]
    for out_start, out_end, source, src_start, src_end in layer_runs(plan.layers):
        seam = f"jump {seams[out_start]:+d}" if out_start in seams else ""
        rows.append(f"| {_span(out_start, out_end)} | {source} | {_span(src_start, src_end)} | {seam} |")
    return "\n".join(rows)


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}..{b}"


def _manifest(plan: Plan, declared: dict[str, str]) -> str:
    text = plan.manifest_text.rstrip("\n")
    try:
        tomllib.loads(text)
        lang = "toml"
    except tomllib.TOMLDecodeError:
        lang = "yaml"  # a mergekit passthrough config
    # A fence longer than any backtick run inside, so the manifest cannot close it.
    fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))
    overrides = [f"`--source {s.name}={s.model}`" for s in plan.sources
                 if s.name in declared and declared[s.name] != s.model]
    note = f"\n\nRun with {', '.join(overrides)}." if overrides else ""
    return f"## Manifest\n\n{fence}{lang}\n{text}\n{fence}{note}"


def _provenance(plan: Plan) -> str:
    lines = ["## Provenance", ""]
    for s in plan.sources:
        rev = f" at commit `{s.revision}`" if s.revision else ""
        lines.append(f"- source `{s.name}`: `{s.model}`{rev}, {s.layout} layout, {len(s.files)} weight file(s)")
    transforms = Counter(t.transform for t in plan.tensors)
    lines += [
        f"- output: {len(plan.tensors)} tensors ("
        + ", ".join(f"{n} {_TRANSFORMS.get(k, k)}" for k, n in sorted(transforms.items()))
        + f") in {len(plan.shards)} shard(s), {format_bytes(plan.total_size)}",
        f"- tool: tensorsurgery {__version__}",
        "",
        "`tensorsurgery.json` records the manifest, the source revisions and, for every output tensor, its "
        "source file, key, transform and sha256. `tensorsurgery verify` checks the files against it.",
    ]
    return "\n".join(lines)

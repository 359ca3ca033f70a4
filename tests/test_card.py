"""The output's model card (:mod:`tensorsurgery.output.card`): plans from synthetic checkpoints (no
files), and one end-to-end apply that writes README.md."""
from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from helpers import decoder_config, decoder_specs, make_checkpoint, manifest_from_text, split_in_two
from tensorsurgery import __version__
from tensorsurgery.cli import main
from tensorsurgery.families.layers import layer_runs
from tensorsurgery.output.card import is_depth_up_scaled, model_card
from tensorsurgery.planning.planner import build_plan
from tensorsurgery.sources.checkpoint import card_licence, front_matter

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_ROOT = Path("/cache/hub/models--org--base/snapshots") / COMMIT
APACHE = "---\nlicense: apache-2.0\nlanguage:\n- en\npipeline_tag: text-generation\n---\n# Base\nBase card text.\n"


def manifest_text(layers: str, model: str = "org/base", sources: str | None = None) -> str:
    src = sources or f'[source]\nmodel = "{model}"\n'
    return f'{src}\n[layers]\n{layers}\n\n[output]\npath = "/out/base-dus"\n'


def hub_checkpoint(n_layers: int = 4, root: Path = HUB_ROOT, revision: str | None = COMMIT, repo_id="org/base",
                   readme: str | None = None):
    ckpt = make_checkpoint(root, split_in_two(decoder_specs(n_layers)), decoder_config(n_layers))
    return replace(ckpt, revision=revision, repo_id=repo_id, card_meta=card_licence(readme))


def plan_for(layers: str, readme: str | None = None, **kw):
    text = manifest_text(layers, **{k: v for k, v in kw.items() if k in ("model", "sources")})
    checkpoints = kw.get("checkpoints") or {"source": hub_checkpoint(readme=readme)}
    return build_plan(manifest_from_text(text), checkpoints)


def split_card(card: str) -> tuple[dict, str]:
    m = re.match(r"---\n(.*?)\n---\n(.*)", card, re.DOTALL)
    assert m, card[:200]
    return yaml.safe_load(m.group(1)), m.group(2)


def table_rows(body: str) -> list[list[str]]:
    section = body.split("## Layer arrangement", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[:2] == ["| output layers | source | source layers | seam |", "|---|---|---|---|"]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_front_matter_of_a_dus_card_from_a_hub_source():
    meta, _ = split_card(model_card(plan_for('plan = "dus"\noverlap = 1', APACHE)))
    assert meta == {"base_model": "org/base", "library_name": "transformers", "license": "apache-2.0",
                    "tags": ["tensorsurgery", "depth-up-scaling"]}


def test_other_license_carries_its_name_and_link():
    readme = "---\nlicense: other\nlicense_name: llama2\nlicense_link: LICENSE\n---\n"
    meta, _ = split_card(model_card(plan_for('plan = "keep"', readme)))
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "llama2", "LICENSE")


@pytest.mark.parametrize("readme", [None, "# No front matter\n", "---\nlicense: [unclosed\n---\n",
                                    "---\n- a list\n---\n"])
def test_no_license_without_usable_front_matter(readme):
    meta, _ = split_card(model_card(plan_for('plan = "keep"', readme)))
    assert "license" not in meta and meta["library_name"] == "transformers"


def test_front_matter_parser():
    assert front_matter(APACHE) == {"license": "apache-2.0", "language": ["en"], "pipeline_tag": "text-generation"}
    assert front_matter("---\r\nlicense: mit\r\n---\r\nx") == {"license": "mit"}
    assert front_matter("text\n---\nlicense: mit\n---\n") == {}


@pytest.mark.parametrize("layers, tagged", [
    ('plan = "keep"', False),
    ('plan = "dus"\noverlap = 1', True),
    ('plan = "idus"\noverlap = 1\ngroup = 1', True),
    ('plan = "explicit"\narrangement = [[0, 2]]', False),                  # pruned
    ('plan = "explicit"\narrangement = [3, 2, 1, 0]', False),              # reordered, same depth
    ('plan = "explicit"\narrangement = [[0, 4], 3]', True),                # a layer repeated
])
def test_depth_up_scaling_tag_only_when_layers_are_stacked(layers, tagged):
    plan = plan_for(layers)
    meta, _ = split_card(model_card(plan))
    assert ("depth-up-scaling" in meta["tags"]) is tagged is is_depth_up_scaled(plan)


def test_table_rows_follow_the_arrangement_and_its_seams():
    plan = plan_for('plan = "idus"\noverlap = 1\ngroup = 2')
    assert [(r.source, r.layer) for r in plan.layers] == [("source", i) for i in (0, 1, 1, 2, 2, 3)]
    _, body = split_card(model_card(plan))
    assert table_rows(body) == [["0..1", "source", "0..1", ""], ["2..3", "source", "1..2", "jump -1"],
                                ["4..5", "source", "2..3", "jump -1"]]
    assert len(table_rows(body)) == len(layer_runs(plan.layers))


def test_table_rows_of_two_sources():
    sources = '[sources.a]\nmodel = "org/a"\n[sources.b]\nmodel = "org/b"\n'
    layers = ('plan = "explicit"\narrangement = [{ source = "a", layers = [0, 3] }, '
              '{ source = "b", layers = [1, 4] }]')
    ckpts = {"a": hub_checkpoint(root=Path("/c/models--org--a/snapshots") / COMMIT, repo_id="org/a"),
             "b": hub_checkpoint(root=Path("/c/models--org--b/snapshots") / COMMIT, repo_id="org/b")}
    plan = plan_for(layers, sources=sources, checkpoints=ckpts)
    meta, body = split_card(model_card(plan))
    assert meta["base_model"] == ["org/a", "org/b"]
    assert meta["tags"] == ["tensorsurgery", "depth-up-scaling", "merge"]
    rows = table_rows(body)
    assert rows == [["0..2", "a", "0..2", ""], ["3..5", "b", "1..3", f"jump {dict(plan.seams)[3]:+d}"]]


def test_local_sources_are_not_named_as_base_model():
    local = hub_checkpoint(root=Path("/data/models/base"), revision=None, repo_id=None)
    meta, body = split_card(model_card(plan_for('plan = "keep"', model="models/base",
                                                checkpoints={"source": local})))
    assert "base_model" not in meta  # "models/base" is a folder here, not a repo id
    assert "Run with" not in body


def test_a_local_copy_of_a_declared_repo_is_named_by_the_repo():
    from tensorsurgery.manifest.toml import apply_overrides
    local = hub_checkpoint(root=Path("/data/copy"), revision=None, repo_id=None)
    m = apply_overrides(manifest_from_text(manifest_text('plan = "keep"', model="org/base")),
                        {"": "/data/copy"}, None)
    meta, body = split_card(model_card(build_plan(m, {"source": local})))
    assert meta["base_model"] == "org/base"
    assert "/data/copy" not in body  # a local path means nothing on the Hub


def test_manifest_and_provenance_in_the_body():
    plan = plan_for('plan = "dus"\noverlap = 1')
    _, body = split_card(model_card(plan))
    # The manifest as written, but its local paths (the output's here) are folder names.
    assert f"```toml\n{plan.manifest_text.rstrip().replace('/out/base-dus', 'base-dus')}\n```" in body
    assert "/out/" not in body
    assert f"- source `source`: `org/base` at commit `{COMMIT}`, hf layout, 2 weight file(s)" in body
    assert f"- tool: tensorsurgery {__version__}" in body
    assert f"{len(plan.tensors)} tensors ({len(plan.tensors)} copied byte for byte)" in body
    assert "Base card text." not in body


def test_a_manifest_with_backticks_cannot_close_the_fence():
    text = manifest_text('plan = "keep"') + "# ```` four backticks\n"
    plan = build_plan(manifest_from_text(text), {"source": hub_checkpoint()})
    _, body = split_card(model_card(plan))
    assert "`````toml\n" in body and body.rstrip().count("`````") == 2


def test_apply_writes_the_card_and_not_the_sources(tiny_mistral, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny_mistral, src)
    (src / "README.md").write_text(APACHE)
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'[source]\nmodel = "{src}"\n[rename]\npreset = "mistral-to-llama"\n'
                        f'[layers]\nplan = "dus"\noverlap = 8\n[output]\npath = "{tmp_path / "out"}"\n')
    assert main(["apply", str(manifest), "--no-progress"]) == 0
    meta, body = split_card((tmp_path / "out" / "README.md").read_text())
    assert meta["license"] == "apache-2.0" and "depth-up-scaling" in meta["tags"]
    assert "base_model" not in meta  # a local folder
    assert table_rows(body) == [["0..23", "source", "0..23", ""], ["24..47", "source", "8..31", "jump -16"]]
    assert "Base card text." not in body and (src / "README.md").read_text() == APACHE

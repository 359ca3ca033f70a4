"""The README's merge examples: every mergekit YAML and every ``[merge]`` TOML it shows is read
without error, and where a YAML is shown "and in TOML" the two say the same merge (method, base,
models and their parameters, global parameters, dtype), so a user can copy either door."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tensorsurgery.manifest.loading import manifest_from_text
from tensorsurgery.manifest.mergekit import manifest_from_mergekit
from tensorsurgery.manifest.merges import METHODS, MergeSpec
from tensorsurgery.manifest.toml import Manifest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"```(yaml|toml)\n(.*?)```", re.S)


def _examples() -> list[tuple[int, str, str]]:
    """(line, kind, text) of each README block that is a merge: a YAML with ``merge_method`` or
    a TOML with a ``[merge]`` table."""
    text = README.read_text()
    found = []
    for m in _BLOCK.finditer(text):
        kind, body = m.group(1), m.group(2)
        if (kind == "yaml" and "merge_method:" in body) or (kind == "toml" and "\n[merge]\n" in "\n" + body):
            found.append((text.count("\n", 0, m.start()) + 1, kind, body))
    return found


#: The README's source names and their folders (a TOML that shows only its ``[merge]`` tables says
#: to add these).
_FOLDERS = {"base": "./Mistral-7B-v0.1", "math": "./mistral-math", "code": "./mistral-code",
            "chat": "./mistral-chat"}
_NAMED = re.compile(r'^(?:base = "(\w+)"|\[merge\.models\.(\w+)\])', re.M)


def _completed(body: str) -> str:
    """A TOML example that gives only its ``[merge]`` tables, with the ``[sources.NAME]`` tables
    the README says to add (the base first) and an ``[output]``."""
    if "[sources." in body:
        return body
    names = dict.fromkeys(a or b for a, b in _NAMED.findall(body))
    sources = "".join(f'[sources.{n}]\nmodel = "{_FOLDERS[n]}"\n' for n in names)
    return f'{sources}\n{body}\n[output]\npath = "out/merged"\n'


def _read(kind: str, body: str, tmp: Path) -> Manifest:
    if kind == "yaml":
        return manifest_from_mergekit(tmp / "merge.yml", body)
    return manifest_from_text(_completed(body), tmp / "merge.toml")


def _by_path(manifest: Manifest) -> dict[str, str]:
    return {s.name: s.model.removeprefix("./") for s in manifest.sources}


def _said(manifest: Manifest) -> dict[str, Any]:
    """What a merge says, with each source named by its model's path (the doors name sources
    differently: YAML by the path, TOML by the table's name). The seed is left out: mergekit's
    YAML has no field for it (``--random-seed`` on its command line)."""
    spec = manifest.merge
    assert isinstance(spec, MergeSpec)
    path = _by_path(manifest)
    return {
        "method": spec.method,
        "base": path.get(spec.base) if spec.base else None,
        "parameters": dict(spec.parameters),
        "dtype": spec.dtype,
        "models": [(path[m.source], dict(m.parameters)) for m in spec.models],
        "slices": [([(path[m.source], dict(m.parameters)) for m in s.models],
                    {path[k]: v for k, v in s.starts.items()}) for s in spec.slices],
    }


EXAMPLES = _examples()


def test_the_readme_shows_merges_in_both_doors() -> None:
    kinds = [kind for _, kind, _ in EXAMPLES]
    assert kinds.count("yaml") >= 9 and kinds.count("toml") >= 9, kinds


@pytest.mark.parametrize(("line", "kind", "body"), EXAMPLES, ids=[f"README:{n}" for n, _, _ in EXAMPLES])
def test_each_merge_example_is_read(line: int, kind: str, body: str, tmp_path: Path) -> None:
    manifest = _read(kind, body, tmp_path)
    if "merge_method: passthrough" in body:  # a stack of layers, not arithmetic
        assert manifest.merge is None and manifest.sources, f"README line {line}"
    else:
        assert isinstance(manifest.merge, MergeSpec), f"README line {line}"


def _pairs() -> list[tuple[int, str, str]]:
    """(line of the YAML, YAML, TOML) for each YAML example followed directly by a TOML one."""
    return [(line, body, EXAMPLES[i + 1][2]) for i, (line, kind, body) in enumerate(EXAMPLES[:-1])
            if kind == "yaml" and EXAMPLES[i + 1][1] == "toml"]


PAIRS = _pairs()


@pytest.mark.parametrize(("line", "yaml_text", "toml_text"), PAIRS, ids=[f"README:{n}" for n, _, _ in PAIRS])
def test_yaml_and_toml_examples_say_the_same_merge(line: int, yaml_text: str, toml_text: str,
                                                    tmp_path: Path) -> None:
    assert _said(_read("yaml", yaml_text, tmp_path)) == _said(_read("toml", toml_text, tmp_path)), \
        f"README line {line}: the YAML and the TOML after it differ"


def test_pairs_cover_the_methods_shown() -> None:
    methods = {_said(_read("yaml", y, Path("/nonexistent")))["method"] for _, y, _ in PAIRS}
    # every method but the ones a table row names with a sibling's example (ram beside
    # ramplus_tl, breadcrumbs beside breadcrumbs_ties)
    assert set(METHODS) - {"ram", "breadcrumbs"} <= methods, sorted(set(METHODS) - methods)

"""The package's layout shows the flow: one subpackage per stage, imports only from a stage to an
earlier one (or within one), no import circle of any kind (type-only and function-level imports
count), the command line reaching the stages through the API alone, and the README's Layout
section naming every module where it is."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import tensorsurgery

PACKAGE = Path(tensorsurgery.__file__).parent
README = PACKAGE.parent / "README.md"

#: The stages, first to last: a module may import from its own entry or an earlier one. The
#: leaves (errors, the version, units) and the shared layers (io, formats, families, ops) come
#: first; the views, the API facade and the command line last.
ORDER = ("errors", "_version", "units", "io", "formats", "families", "manifest", "sources", "ops", "planning",
         "output", "verification", "publish", "report", "api", "cli", "__init__", "__main__")
#: All the command line may import of the package.
CLI_IMPORTS = {"api", "errors", "_version", "report", "units"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports() -> dict[str, set[str]]:
    """Every module (dotted, without ``tensorsurgery.``) -> the package's modules it imports,
    wherever the import is (top level, ``TYPE_CHECKING``, inside a function)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: a relative import (the package imports absolutely)"
                targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("tensorsurgery."):
                    dotted = target.removeprefix("tensorsurgery.")
                    if dotted in paths:  # a module (``from tensorsurgery.io import fsio`` too)
                        found.add(dotted)
                    elif dotted.rpartition(".")[0] in paths:
                        found.add(dotted.rpartition(".")[0])  # a name imported from a module
                    elif "." not in dotted:
                        found.add("__init__")  # a name of the facade
        graph[name] = found - {name}
    return graph


def _stage(module: str) -> int:
    return ORDER.index(module.split(".")[0])


def test_no_import_circle_of_any_kind():
    graph = _imports()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for dep in sorted(graph.get(node, ())):
            visit(dep, path + [node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    assert len(done) == len(graph) > 90


def test_every_import_goes_to_the_same_or_an_earlier_stage():
    graph = _imports()
    against = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if _stage(b) > _stage(a))
    assert not against, against
    assert {m.split(".")[0] for m in graph} == set(ORDER) - {"__init__"} | {"__init__"}  # no stage unlisted


def test_the_command_line_reaches_the_stages_through_the_api_alone():
    imported = _imports()["cli"]
    assert "api" in imported
    assert imported <= CLI_IMPORTS, sorted(imported - CLI_IMPORTS)


def test_the_readme_layout_names_every_module_in_its_subpackage():
    text = README.read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```\ntensorsurgery/\n") + 4:]
    block = block[:block.index("```")]
    listed: set[str] = set()
    package = ""
    for line in block.splitlines()[1:]:
        indent = len(line) - len(line.lstrip())
        words = line.split()
        if not words:
            continue
        if indent == 2 and words[0].endswith("/"):
            package = words[0].rstrip("/") + "."
            listed.add(package.rstrip("."))
        elif indent == 2:
            package = ""
        if indent in (2, 4):
            names = [w for w in words if re.fullmatch(r"\w+\.py", w)]
            listed |= {package + n.removesuffix(".py") for n in names}
    # a subpackage's __init__ is its package's line (ops' also lists it: it holds the registry)
    listed = {m.removesuffix(".__init__") for m in listed}
    every = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    assert listed == every, (sorted(every - listed), sorted(listed - every))

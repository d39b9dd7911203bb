"""The package's import arrows point down: the MoE core and the metrics import nothing else of
the project, no two modules import each other (directly or round a circle), and the models
know nothing of the factory, the trainer or the commands above them. Read from the source
with ``ast``, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "limoe"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The project modules ``path`` imports (relative imports resolved), by dotted name."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m == "limoe" or m.startswith("limoe.")}


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def resolved(imported: str) -> str | None:
    """The module an imported name lives in (``limoe.moe.MoELayer`` -> ``limoe.moe``)."""
    while imported and imported not in GRAPH:
        imported = imported.rpartition(".")[0]
    return imported or None


EDGES = {m: {resolved(i) for i in found} - {None, m} for m, found in GRAPH.items()}


@pytest.mark.parametrize("core", ["limoe.moe", "limoe.eval"])
def test_the_core_imports_nothing_else_of_the_project(core):
    outside = {
        (m, i)
        for m, found in EDGES.items()
        if m == core or m.startswith(core + ".")
        for i in found
        if not (i == core or i.startswith(core + "."))
    }
    assert not outside


def test_the_models_know_nothing_of_what_is_built_on_them():
    above = ("limoe.factory", "limoe.lit", "limoe.train", "limoe.cli", "limoe.bench")
    up = {(m, i) for m, found in EDGES.items() if m.startswith("limoe.models")
          for i in found if i.startswith(above)}  # fmt: skip
    assert not up


def test_no_modules_import_each_other():
    """No circle among modules; a package's ``__init__`` re-exporting its own modules is not
    one (the modules never import their package's ``__init__`` back)."""
    seen, path = set(), []

    def visit(m: str) -> None:
        if m in path:
            raise AssertionError(" -> ".join([*path[path.index(m) :], m]))
        if m in seen:
            return
        path.append(m)
        for i in EDGES[m]:
            if not m.startswith(i + "."):  # a module importing from its own package's __init__
                visit(i)
        path.pop()
        seen.add(m)

    for m in sorted(EDGES):
        visit(m)


def test_the_graph_sees_the_imports_it_judges():
    """The reader resolves relative imports: ``layer.py`` imports ``routing.py``."""
    assert "limoe.moe.routing" in EDGES["limoe.moe.layer"]
    assert "limoe.moe" in EDGES["limoe.models.limoe"]

"""The package's folders are its architecture: subpackages in layers, each importing only its own layer and those
below it, no import circle anywhere, and the entry points imported by nobody (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

from pipeline import project_root

PACKAGE = project_root() / "pipeline"
# lowest first: a subpackage may import those before it, never one after it
LAYERS = ("core", "data", "models", "tracking", "inference", "evaluation", "training")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """The pipeline modules a module imports, at its top or inside a function (a late import is still a dependency):
    `from pipeline.a import b` is pipeline.a.b where b is a module, else pipeline.a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "pipeline":
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                      for a in node.names}
    return found


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def layer(module: str) -> str | None:
    """The subpackage a module belongs to; None for the package's root (entry points and pipeline/__init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_every_subpackage_is_a_layer_and_says_what_it_owns():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(LAYERS)
    for name in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) <= 3, f"pipeline/{name}/__init__.py: two lines on what it owns"


def test_nothing_imports_upward_or_an_entry_point():
    entry_points = {m for m in MODULES if layer(m) is None and m != "pipeline"}
    upward = []
    for module, deps in GRAPH.items():
        if (own := layer(module)) is None and module != "pipeline":
            continue  # an entry point may import any layer
        for dep in deps:
            assert dep not in entry_points, f"{module} imports the entry point {dep}"
            if module == "pipeline":  # the package's __init__: the console fallback of core.logs only
                assert layer(dep) == "core", f"pipeline/__init__.py imports {dep}"
            elif (theirs := layer(dep)) is not None and LAYERS.index(theirs) > LAYERS.index(own):
                upward.append(f"{module} -> {dep}")
    assert not upward, "upward imports: " + ", ".join(upward)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm): each is an import circle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert circles(GRAPH) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, []),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert sorted(circles(graph)) == expected


def test_the_import_reader_sees_late_and_module_imports():
    source = PACKAGE / "tracking" / "sweep.py"
    assert "pipeline.tracking.runs" in GRAPH["pipeline.tracking.sweep"]  # imported inside a method
    assert "pipeline.data.sources" in imports(source)
    assert GRAPH["pipeline.train"] >= {"pipeline.training.run"}

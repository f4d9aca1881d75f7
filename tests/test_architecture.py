"""The layer rules of docs/architecture.md, checked on the source: every import (including the lazy
ones inside functions) points down the layer stack, and no modules import each other in a circle."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Layer -> the layers it may import (itself included). ``base`` is the package's own foundation:
# errors, files, paths, registry, config and the package docstring.
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "moe": {"base", "moe"},
    "edge": {"base", "edge"},
    "train": {"base", "moe", "edge", "train"},
    "collab": {"base", "moe", "edge", "collab"},
    "serving": {"base", "moe", "edge", "collab", "serving", "testing"},
    "testing": {"base", "moe", "edge", "collab", "serving", "testing"},
    "report": {"base", "moe", "edge", "train", "collab", "report"},
    "experiments": {"base", "moe", "edge", "train", "collab", "serving", "testing", "report", "experiments"},
    "cli": {"base", "moe", "edge", "train", "collab", "serving", "testing", "report", "experiments", "cli"},
}
# Third-party packages a layer must not import.
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "base": {"torch", "matplotlib"},
    "moe": {"numpy", "matplotlib"},  # pure PyTorch
    "edge": {"torch", "matplotlib"},  # pure numpy
    "train": {"matplotlib"},
    "collab": {"matplotlib"},
    "serving": {"matplotlib"},
}
# Circles that exist today and are being removed; an entry that no longer matches fails the test
# below, so the list only shrinks.
KNOWN_CIRCLES: list[set[str]] = []


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ALLOWED:
        return parts[1]
    return "cli" if module == "edgemoe.__main__" else "base"


def _is_type_checking(node: ast.AST) -> bool:
    """An ``if TYPE_CHECKING:`` block (imports for annotations only, never executed)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def collect_imports(src: Path = SRC) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> edgemoe modules it imports, module -> top-level third-party packages it imports)."""
    files = {module_name(p, src): p for p in src.joinpath("edgemoe").rglob("*.py")}
    internal: dict[str, set[str]] = defaultdict(set)
    external: dict[str, set[str]] = defaultdict(set)
    for module, path in files.items():
        internal[module] = set()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for n in ast.walk(block)}
        for node in ast.walk(tree):  # lazy imports included; ``if TYPE_CHECKING:`` ones are not run
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from pkg import submodule`` imports the submodule; ``from mod import name`` the module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != "edgemoe":
                    external[module].add(target.split(".")[0])
                    continue
                while target not in files and "." in target:
                    target = target.rpartition(".")[0]
                if target != module:
                    internal[module].add(target)
    return internal, external


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


INTERNAL, EXTERNAL = collect_imports()


def test_the_source_tree_is_found():
    assert {"edgemoe.moe.layer", "edgemoe.edge.spec", "edgemoe.cli"} <= set(INTERNAL)


def upward_imports(internal: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{src} ({layer_of(src)}) imports {dst} ({layer_of(dst)})"
        for src, targets in internal.items()
        for dst in targets
        if layer_of(dst) not in ALLOWED[layer_of(src)]
    )


def test_no_import_crosses_a_layer_upward():
    upward = upward_imports(INTERNAL)
    assert not upward, "imports that cross a layer upward (see docs/architecture.md):\n" + "\n".join(upward)


def test_layers_keep_to_their_third_party_dependencies():
    bad = sorted(
        f"{module} ({layer_of(module)}) imports {pkg}"
        for module, pkgs in EXTERNAL.items()
        for pkg in pkgs & FORBIDDEN_THIRD_PARTY.get(layer_of(module), set())
    )
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    found = circles(INTERNAL)
    new = [sorted(c) for c in found if c not in KNOWN_CIRCLES]
    assert not new, f"modules that import each other in a circle: {new}"
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in found]
    assert not gone, f"remove these from KNOWN_CIRCLES, they are fixed: {gone}"


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [{"a", "b"}]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}, [{"a", "b", "c"}]),
    ],
)
def test_circle_finder(graph, expected):
    assert circles(graph) == expected


def test_an_upward_import_inside_a_function_is_caught(tmp_path):
    """A deferred import is still an import: the check parses function bodies too."""
    for rel, text in {
        "edgemoe/__init__.py": "",
        "edgemoe/edge/__init__.py": "",
        "edgemoe/edge/sim.py": "def plot():\n    from ..report import net\n    import torch\n",
        "edgemoe/report/__init__.py": "",
        "edgemoe/report/net.py": "from edgemoe.edge.sim import plot\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    internal, external = collect_imports(tmp_path)
    assert upward_imports(internal) == ["edgemoe.edge.sim (edge) imports edgemoe.report.net (report)"]
    assert external["edgemoe.edge.sim"] == {"torch"}
    assert circles(internal) == [{"edgemoe.edge.sim", "edgemoe.report.net"}]

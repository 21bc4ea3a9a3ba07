"""The import layering of `cloudless/` (ARCHITECTURE.md, "Layers").

Every import counts — module-level, inside functions and under
`TYPE_CHECKING` — because each is a real dependency: an in-function import
only hides a cycle until the function runs. A package may import its own
modules and anything in a lower layer; packages in the same layer are
independent of each other. The module graph must also be acyclic, within a
package as well as across packages.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import cloudless

ROOT = Path(cloudless.__file__).parent

# Top to bottom. A package's modules may import only its own package and lower layers.
LAYERS: list[set[str]] = [
    {"__main__"},
    {"cli"},
    {"node"},
    {"api"},
    {"agent", "coordinator", "testing"},
    {"ports"},
    {"scheduler"},
    {"state"},
    {"raft", "gossip", "blobs", "sandbox"},
    {"transport", "authz"},
    {"pki"},
    {"wire", "observability", "durable", "duration", "selfexec"},
    {"errors"},
]


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["cloudless", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, source: str | None = None) -> list[tuple[str, int, bool]]:
    """(imported cloudless module, line, inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import sub` depends on pkg.sub when that is a module, else on pkg.
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
            for name in names:
                target = _resolve(name) if name.startswith("cloudless") else None
                if target is not None and target != module:
                    found.append((target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return ""
    return parts[1]


def _layer_of(package: str) -> int:
    for index, layer in enumerate(LAYERS):
        if package in layer:
            return index
    raise AssertionError(f"package cloudless.{package} is in no layer of tests/unit/test_layering.py")


GRAPH: dict[str, list[tuple[str, int, bool]]] = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_package_has_a_layer() -> None:
    for module in MODULES:
        if module != "cloudless":
            _layer_of(_package(module))


def test_imports_go_down_the_layers_only() -> None:
    bad: list[str] = []
    for module, imports in GRAPH.items():
        if module == "cloudless":
            continue
        here = _package(module)
        for target, line, _ in imports:
            there = _package(target)
            if there == here or target == "cloudless":
                continue
            if _layer_of(there) <= _layer_of(here):
                bad.append(f"{module}:{line} imports {target} ({here} may not depend on {there})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_module_graph_has_no_cycles() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, imports in GRAPH.items():
        for target, _, _ in imports:
            # A package's __init__ re-exporting its modules is not a cycle with them.
            if module.startswith(target + "."):
                continue
            edges[module].add(target)
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _unexplained_function_imports(source: str) -> list[int]:
    """Lines of imports inside functions with no comment saying why (on the
    import group's lines or the line just above the group)."""
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for stmt in node.body:
            if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
                continue
            first = stmt.lineno - 1
            while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                first -= 1
            group = lines[first : stmt.end_lineno]
            above = lines[first - 1].strip() if first > 0 else ""
            if not above.startswith("#") and not any("#" in line for line in group):
                out.append(stmt.lineno)
    return out


def test_function_level_imports_are_deliberate_and_say_why() -> None:
    """An import inside a function hides a dependency: allowed only where the
    laziness is the point, with a comment saying why. The CLI is exempt: its
    commands import what they need when they run, so that `cloudless --help`
    and every other command start fast."""
    unexplained = [
        f"{module}:{line}"
        for module, path in MODULES.items()
        if _package(module) not in ("cli", "__main__")
        for line in _unexplained_function_imports(path.read_text())
    ]
    assert not unexplained, "imports inside functions without a comment saying why:\n" + "\n".join(unexplained)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(set(MODULES) | set(edges)):
        if v not in index:
            connect(v)
    return out


def test_the_checker_sees_cycles_and_function_level_imports() -> None:
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    lazy = "def f():\n    # why\n    import a\n    import b\n\ndef g():\n    import c\n"
    assert _unexplained_function_imports(lazy) == [7]
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import errors\n"
        "if TYPE_CHECKING:\n"
        "    from cloudless.node.process import Node\n"
        "def f():\n"
        "    from cloudless.raft import core\n"
    )
    found = _imports("cloudless.wire.framing", ROOT / "wire" / "framing.py", source)
    assert found == [
        ("cloudless.wire.errors", 2, False),
        ("cloudless.node.process", 4, False),
        ("cloudless.raft.core", 6, True),
    ]

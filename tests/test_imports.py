"""The package has no import cycles, not even through imports placed inside functions.

Every `import` statement of every module counts, wherever it sits. `from alignkit.x import name`
depends on the module `alignkit.x.name` when that is a module, else on `alignkit.x` itself (its
`__init__` must have run to provide `name`). The parent packages Python initialises on the way are
not counted: a package `__init__` that imports its own submodules is the normal layout, and the
submodules see the package object before its `__init__` ends. A cycle found here is a layering
mistake: the helper both sides need belongs in a lower module (DESIGN.md, "Lower layers never
import upper ones")."""

import ast
from pathlib import Path

import alignkit

ROOT = Path(alignkit.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (ROOT.parent / Path(*name.split(".")) / "__init__.py").is_file()


def known(name: str, modules: set) -> str | None:
    """The alignkit module `name` refers to (a module, or the package holding the attribute)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    graph = {m: set() for m in modules}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            target = known(t, modules) if t.startswith("alignkit") else None
            if target and target != mod:
                graph[mod].add(target)
    return graph


def find_cycle(graph: dict) -> list | None:
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = import_graph()
    assert "alignkit.train.checkpoint" in graph["alignkit.train.loop"]  # a module-level import
    assert "alignkit.config" in graph["alignkit.cli"]  # an import inside a function

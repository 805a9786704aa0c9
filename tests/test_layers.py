"""The layers of docs/architecture.md hold: every module is placed, and no import (function-level
included) points from a lower layer to a higher one. `import alignkit.errors` / `alignkit.config`
load no torch."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_imports import import_graph

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def layers() -> list:
    """[(layer name, [patterns])] in order, bottom first."""
    text = DOC.read_text()
    block = text[text.index("<!-- layers:begin -->") : text.index("<!-- layers:end -->")]
    out = []
    for line in block.splitlines():
        m = re.match(r"- \*\*(\w+)\*\*: (.*)", line)
        if m:
            out.append((m.group(1), re.findall(r"`([\w/]+)`", m.group(2).split(" (")[0])))
    return out


def layer_of(module: str, spec: list) -> int | None:
    """The index of the layer placing `alignkit.<...>` module (a package pattern `x/` places x and
    everything under it; `__init__` is the package root)."""
    rel = module.removeprefix("alignkit").lstrip(".").replace(".", "/") or "__init__"
    found = None
    for i, (_, patterns) in enumerate(spec):
        for p in patterns:
            if (p.endswith("/") and (rel == p[:-1] or rel.startswith(p))) or rel == p:
                assert found is None or found == i, f"{module} is placed twice"
                found = i
    return found


def test_the_doc_lists_layers():
    names = [n for n, _ in layers()]
    assert names[:3] == ["base", "registries", "config"] and names[-1] == "entry" and len(names) >= 10


def test_every_module_is_placed_and_imports_point_down():
    spec, graph = layers(), import_graph()
    unplaced = sorted(m for m in graph if layer_of(m, spec) is None)
    assert not unplaced, f"modules docs/architecture.md does not place: {unplaced}"
    upward = []
    for mod, targets in graph.items():
        mine = layer_of(mod, spec)
        for t in targets:
            theirs = layer_of(t, spec)
            if theirs > mine:
                upward.append(f"{mod} ({spec[mine][0]}) imports {t} ({spec[theirs][0]})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


@pytest.mark.parametrize("module", ["alignkit.errors", "alignkit.config", "alignkit.registries.recipes"])
def test_the_bottom_layers_import_without_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"], f"{module} imported torch or transformers"


def test_no_class_hierarchy_under_train_is_deeper_than_two_levels():
    """Recipes vary by composition: a class under alignkit.train derives from at most one other
    alignkit class, which derives from none (docs/architecture.md, "Recipes")."""
    import importlib
    import inspect
    import pkgutil

    package = importlib.import_module("alignkit.train")  # the package (`alignkit.train` the attribute is the function)
    deep = []
    for info in pkgutil.walk_packages(package.__path__, "alignkit.train."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or issubclass(cls, BaseException):  # error types may nest
                continue
            chain = [c for c in cls.__mro__ if c.__module__.startswith("alignkit")]
            if len(chain) > 2:
                deep.append(" -> ".join(c.__qualname__ for c in chain))
    assert not deep, deep

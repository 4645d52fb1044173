"""The package layout: every module imports, and imports point one way (DESIGN.md, "Layout").

Imports are read from the source (module level and inside functions alike: a lazy
import is still a dependency), so a cycle hidden behind a function-level import is found.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import networkx as nx
import pytest

import hiercluster
import quant

ROOT = Path(hiercluster.__file__).resolve().parent.parent

# hiercluster's layers, lowest first: a module may import its own layer and the ones before it.
# "base" is the package root's small modules (errors, interrupt, limits, yamlio); "cli" sits on top.
LAYERS = ("base", "data", "models", "hierarchy", "evaluation", "run", "report", "cli")


def _modules(package: object) -> list[str]:
    return [package.__name__] + [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


def _source(name: str) -> Path:
    path = ROOT / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(name: str) -> set[str]:
    """The project modules ``name`` imports anywhere in its source."""
    tree = ast.parse(_source(name).read_text())
    found: set[str] = set()
    is_package = _source(name).name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            # `from hiercluster.report import plots` imports the submodule hiercluster.report.plots
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


ALL = _modules(hiercluster) + _modules(quant)


def _graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    known = set(ALL)
    for name in ALL:
        graph.add_node(name)
        for target in _imports(name):
            if target in known and target != name and not name.startswith(target + "."):
                graph.add_edge(name, target)
    return graph


def _layer(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "quant":
        return "quant"
    if len(parts) == 1 or parts[1] in ("errors", "interrupt", "limits", "yamlio"):
        return "base"
    return parts[1]


@pytest.mark.parametrize("name", ALL)
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_the_module_graph_has_no_cycle() -> None:
    graph = _graph()
    # The package roots re-export names lazily (on attribute access), which is not an import cycle.
    graph.remove_nodes_from(["hiercluster", "quant"])
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_subpackages_import_only_lower_layers() -> None:
    wrong = []
    for a, b in _graph().edges:
        la, lb = _layer(a), _layer(b)
        if la == "quant":
            if b.startswith("hiercluster"):
                wrong.append((a, b))  # quant stands on its own
            continue
        if lb == "quant" or a == "hiercluster":
            continue
        if LAYERS.index(lb) > LAYERS.index(la):
            wrong.append((a, b))
    assert not wrong, f"imports pointing up the layers {LAYERS}: {wrong}"


def test_the_layering_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The checks above would fail on a cycle: run them on a made-up graph."""
    graph = nx.DiGraph([("hiercluster.run.pipeline", "hiercluster.report.markdown"),
                        ("hiercluster.report.markdown", "hiercluster.run.store")])
    assert not list(nx.simple_cycles(graph))
    graph.add_edge("hiercluster.run.store", "hiercluster.report.markdown")
    assert list(nx.simple_cycles(graph))
    assert LAYERS.index(_layer("hiercluster.report.markdown")) > LAYERS.index(_layer("hiercluster.run.pipeline"))


def test_relative_and_lazy_imports_are_read() -> None:
    """A function-level import is a dependency too: the report's lazy import of the run layer is seen."""
    assert "hiercluster.run.rundir" in _imports("hiercluster.report.markdown")

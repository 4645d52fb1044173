"""The examples in quant's docstrings run and print what they claim."""

import doctest
import importlib
import pkgutil

import pytest

import quant

MODULES = ["quant"] + [f"quant.{m.name}" for m in pkgutil.iter_modules(quant.__path__)]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_quant_does_not_import_hiercluster():
    import ast
    from pathlib import Path

    for path in Path(quant.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "hiercluster" for n in names), path.name

"""The package's shape: imports point down the pipeline (the import-linter contract in pyproject.toml), no
module imports itself back through others, and our own modules are imported at the top of a file."""

from __future__ import annotations

import ast
import shutil
import subprocess

import grimp
import pytest

from helpers import ROOT


def test_the_layers_contract_is_kept():
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (pip install 'aira-opt[test]')")
    result = subprocess.run(["lint-imports", "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_the_import_graph_has_no_cycle():
    graph = grimp.build_graph("aira_opt", include_external_packages=False)
    modules = sorted(graph.modules)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in modules:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_our_modules_are_imported_at_the_top_of_each_file():
    late = []
    for path in sorted((ROOT / "aira_opt").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if any(n == "aira_opt" or n.startswith("aira_opt.") for n in names):
                    late.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert late == []

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
    """Except the package's own __init__, which imports the API on first use so `import aira_opt` stays light
    (the serving path runs without PyTorch)."""
    late = []
    for path in sorted((ROOT / "aira_opt").rglob("*.py")):
        if path == ROOT / "aira_opt" / "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if any(n == "aira_opt" or n.startswith("aira_opt.") for n in names):
                    late.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert late == []


def test_no_module_but_the_variant_records_compares_a_precision_name():
    """Every decision about a precision reads its Variant record (precision/variants.py); a module that tests a
    precision's name (`precision == "fp16"`, `in ("int4", ...)`) is how genai_config.json once gave the CUDA
    graphs a CPU provider."""
    from aira_opt.precision.variants import VARIANTS

    names = set(VARIANTS)
    found = []
    for path in sorted((ROOT / "aira_opt").rglob("*.py")):
        if path.name == "variants.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            constants = [c.value for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)]
            if names & {c for c in constants if isinstance(c, str)}:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []

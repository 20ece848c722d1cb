"""Specs for the package layout (ARCHITECTURE.md): the rules between subsystems hold in the code itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "orchestrator"
DRIVER_SIDE = ("orchestrator.config", "orchestrator.tune", "orchestrator.lifecycle", "orchestrator.cluster",
               "orchestrator.cli", "orchestrator.budget", "orchestrator.tracking")


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """Every orchestrator module that ``path`` imports when it runs: at module level or inside functions,
    but not under ``if TYPE_CHECKING:`` (never executed)."""
    me = _module_name(path)
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target in _imports(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def test_importing_the_config_loads_no_torch() -> None:
    code = "import sys, orchestrator.config, orchestrator.config.retrain; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "False"


def test_driver_code_reaches_the_workers_only_through_their_entry_point() -> None:
    graph = _graph()
    offending = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith(DRIVER_SIDE)
        for target in targets
        if target.startswith("orchestrator.train.")
    }
    assert offending == set()
    assert "orchestrator.train" in graph["orchestrator.cluster.launcher"]  # train_loop_per_worker


def test_no_import_cycles_lazy_imports_included() -> None:
    graph = _graph()
    cycles = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(path + [start])
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert cycles == []


def test_no_two_modules_share_a_name_and_test_helpers_stay_with_the_tests() -> None:
    names = [p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
    production = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    assert "ORCHESTRATOR_FAULT" not in production
    assert "make_tiny_model" not in production

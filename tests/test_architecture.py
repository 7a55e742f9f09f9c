"""Architecture checks that fail CI: the import-linter layers contract (pyproject.toml,
[tool.importlinter]), no import cycles anywhere in the project, and no private API of a
dependency or of CPython.

Layers do not see a cycle between two modules of one layer (both sit in, say,
``roadshift.registry``), so the cycle check runs on grimp's module graph itself. grimp reads
every import statement, function-level ones included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
from importlinter.api import read_configuration

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ROOT_PACKAGES = ("roadshift", "flows", "tasks")


def project_files() -> list[Path]:
    return sorted(p for root in ROOT_PACKAGES for p in (PROJECT_ROOT / root).rglob("*.py"))


# --- the import-linter contract ---------------------------------------------------------------


def test_the_import_linter_contracts_are_kept():
    """What ``make lint`` runs: a broken contract prints the offending import chains."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_top_level_module_sits_in_a_layer():
    """A new subpackage outside the layers list would escape the contract unnoticed."""
    options = read_configuration(str(PROJECT_ROOT / "pyproject.toml"))
    assert list(options["session_options"]["root_packages"]) == list(ROOT_PACKAGES)
    [layers] = [c for c in options["contracts_options"] if c["type"] == "layers"]
    layered = {
        name.strip()
        for layer in layers["layers"]
        for name in layer.replace(":", "|").split("|")
        if name.strip()
    }
    top_level = set(ROOT_PACKAGES) - {"roadshift"}
    for path in (PROJECT_ROOT / "roadshift").iterdir():
        if path.suffix == ".py" and path.stem != "__init__":
            top_level.add(f"roadshift.{path.stem}")
        elif path.is_dir() and (path / "__init__.py").is_file():
            top_level.add(f"roadshift.{path.name}")
    assert not top_level - layered, f"add to [tool.importlinter] layers: {top_level - layered}"
    assert not layered - top_level, f"layers name no module: {layered - top_level}"


# --- import cycles ----------------------------------------------------------------------------


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module are cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    found.append(sorted(component))
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    return sorted(c for c in strongly_connected_components(graph) if len(c) > 1)


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}, "f": {"f"}}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles_between_project_modules():
    graph = grimp.build_graph(*ROOT_PACKAGES, cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles = import_cycles(edges)
    described = []
    for cycle in cycles:
        members = set(cycle)
        imports = sorted(
            f"{importer}:{detail['line_number']} imports {imported}"
            for importer in cycle
            for imported in edges[importer] & members
            for detail in graph.get_import_details(importer=importer, imported=imported)
        )
        described.append(" <-> ".join(cycle) + " (" + "; ".join(imports) + ")")
    assert not cycles, "import cycles:\n  " + "\n  ".join(described)


# --- private APIs -----------------------------------------------------------------------------


def is_private(name: str) -> bool:
    """``_x`` and ``__x`` are private; dunders such as ``__version__`` are not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_project(module: str) -> bool:
    return module.split(".")[0] in ROOT_PACKAGES


class PrivateUseFinder(ast.NodeVisitor):
    """Private names of other people's modules, Prefect's internal env variables, ctypes."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.external: dict[str, str] = {}  # local name -> the non-project thing it is bound to
        self.ours: set[str] = set()  # names defined here or imported from the project
        self.found: list[tuple[int, str]] = []

    def report(self, node: ast.AST, what: str) -> None:
        self.found.append((getattr(node, "lineno", 0), what))

    def absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = self.package.split(".")
        base = parts[: len(parts) - node.level + 1]
        return ".".join([*base, node.module] if node.module else base)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.check_module(node, alias.name)
            if is_project(alias.name):
                self.ours.add(alias.asname or alias.name.split(".")[0])
            else:
                local = alias.asname or alias.name.split(".")[0]
                self.external[local] = alias.name if alias.asname else local

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = self.absolute(node)
        self.check_module(node, module)
        for alias in node.names:
            if is_project(module):
                self.ours.add(alias.asname or alias.name)
                continue
            if is_private(alias.name):
                self.report(node, f"from {module} import {alias.name}")
            self.external[alias.asname or alias.name] = f"{module}.{alias.name}"

    def check_module(self, node: ast.AST, module: str) -> None:
        if is_project(module):
            return
        if module.split(".")[0] == "ctypes":
            self.report(node, f"import of {module} (raw C calls: use a library's public API)")
        elif any(is_private(part) for part in module.split(".")):
            self.report(node, f"import of {module}")

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.ours.add(node.name)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.ours.add(node.name)
        self.generic_visit(node)

    def dotted(self, node: ast.AST) -> list[str] | None:
        """``a.b.c`` as ``["a", "b", "c"]``; None for anything not rooted in a plain name."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        return [node.id, *reversed(parts)]

    def visit_Attribute(self, node: ast.Attribute) -> None:
        parts = self.dotted(node)
        if parts and parts[0] in self.external:
            private = [p for p in parts[1:] if is_private(p)]
            if private:
                self.report(node, f"{'.'.join([self.external[parts[0]], *parts[1:]])}")
                return  # one report per chain, not one per prefix
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        # getattr(torch, "_C") is torch._C too
        if (
            isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "setattr", "hasattr", "delattr"}
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and is_private(node.args[1].value)
        ):
            target = self.dotted(node.args[0])
            if target and target[0] in self.external:
                self.report(node, f"{node.func.id}({'.'.join(target)}, {node.args[1].value!r})")
        private_keywords = [k.arg for k in node.keywords if k.arg and is_private(k.arg)]
        if private_keywords:
            callee = self.dotted(node.func)
            ours = (
                callee
                and callee[0] not in self.external
                and (callee[0] in self.ours or callee[0] in {"self", "cls"})
            )
            if not ours:
                callee_name = ".".join(callee) if callee else "a call"
                for keyword in private_keywords:
                    self.report(node, f"private keyword {keyword}= in {callee_name}(...)")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and "PREFECT__" in node.value:
            self.report(node, f"Prefect's internal setting {node.value!r} (use prefect.settings)")


def private_uses(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    finder = PrivateUseFinder(module, is_package)
    tree = ast.parse(source)
    # bind every module-level and nested def first, so a call before its def is still ours
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            finder.ours.add(node.name)
    finder.visit(tree)
    return sorted(finder.found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import torch\ntorch._C._set_deterministic(True)", "torch._C._set_deterministic"),
        ("import threading\nthreading._shutdown()", "threading._shutdown"),
        ("import atexit as a\na._run_exitfuncs()", "atexit._run_exitfuncs"),
        ("from mlflow.tracking import _tracking_service", "_tracking_service"),
        ("import mlflow.tracking._tracking_service", "mlflow.tracking._tracking_service"),
        ("from mlflow import tracking\ntracking._tracking_service.x", "_tracking_service"),
        ("import filelock\nfilelock.FileLock(p, _wait_for_lock=False)", "_wait_for_lock="),
        ("lock = make()\nlock.acquire(_wait_for_lock=False)", "_wait_for_lock="),
        ("import os\nos.environ['PREFECT__SERVER_X'] = '1'", "PREFECT__SERVER_X"),
        ("import ctypes", "ctypes"),
        ("from ctypes import CDLL", "ctypes"),
        ("import sys\ngetattr(sys, '_getframe')", "_getframe"),
    ],
)
def test_the_private_use_finder_sees(source, expected):
    found = private_uses(source, "roadshift.example")
    assert any(expected in what for _, what in found), found


@pytest.mark.parametrize(
    "source",
    [
        "import torch\nprint(torch.__version__, __name__)",
        "from roadshift.config import _helper\n_helper(_flag=True)",
        "from . import _helper\nfrom .sibling import _other",
        "def _mine(_quiet=False):\n    pass\n_mine(_quiet=True)",
        "class Model:\n    def run(self):\n        return self._step(_n=1)",
        "x = something()\nx._cache = None",  # an object of unknown origin, not a module
        "import os\nos.environ['PREFECT_API_URL'] = 'x'",
    ],
)
def test_the_private_use_finder_lets_pass(source):
    assert private_uses(source, "roadshift.example", is_package=False) == []


def test_no_private_api_of_dependencies_or_cpython():
    problems = []
    for path in project_files():
        relative = path.relative_to(PROJECT_ROOT)
        parts = list(relative.with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        for line, what in private_uses(path.read_text(), module, is_package):
            problems.append(f"{relative}:{line}: {what}")
    assert not problems, "private APIs (they break on any upgrade):\n  " + "\n  ".join(problems)

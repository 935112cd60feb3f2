"""The dependency direction of the library (ARCHITECTURE.md), checked on the source's import statements.

- `kernels/` is a leaf: it imports nothing of ours.
- `tasks/` needs only the small base of the core: registry, config, the head base (`heads`: `Head`, `HeadConfig`,
  `FeatureInfo`, `Features`) and the output-kind base (`outputs`).
- The core (everything in `multitask_peft/` but the package entry point, the CLI, run configs, run directories,
  sweeps, reports, the ensemble analysis, training and the integrations) never imports `tasks/` or `serving/`;
  only the CLI reaches into `serving/`.
- No import circle among the library's modules.

Imports are read with `ast`, function-level (lazy) imports included, `if TYPE_CHECKING:` blocks left out; importing a
package's parent implicitly (Python does) is not an edge.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> the package it installs as (pyproject.toml's package-dir mapping).
SOURCES = {
    "multitask_peft": "multitask_peft",
    "tasks": "multitask_peft.tasks",
    "kernels": "multitask_peft.kernels",
    "serving": "multitask_peft.serving",
}
TASKS_MAY_USE = {
    "multitask_peft.registry",
    "multitask_peft.config",
    "multitask_peft.heads",
    "multitask_peft.outputs",
}
#: Modules on top of the core, allowed to import `tasks/` (the package entry point registers the heads).
ABOVE_CORE = (
    "multitask_peft",
    "multitask_peft.cli",
    "multitask_peft.ensemble_analysis",
    "multitask_peft.peft_cli",
    "multitask_peft.report",
    "multitask_peft.robustness",
    "multitask_peft.run",
    "multitask_peft.run_config",
    "multitask_peft.rundir",
    "multitask_peft.sweep",
    "multitask_peft.wise",
)
ABOVE_CORE_PACKAGES = ("multitask_peft.training", "multitask_peft.integrations")


def _modules(sources: dict[str, str], root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of the source folders."""
    modules = {}
    for folder, package in sources.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of our modules."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in modules:
            return candidate
    return None


def import_graph(sources: dict[str, str], root: Path) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports."""
    modules = _modules(sources, root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            edges |= {m for t in targets if (m := _known(t, modules)) is not None and m != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the dependency direction."""
    bad = []
    for module, imports in sorted(graph.items()):
        for target in sorted(imports):
            if _in(module, "multitask_peft.kernels") and not _in(target, "multitask_peft.kernels"):
                bad.append(f"{module} -> {target}: kernels/ is a leaf")
            elif _in(module, "multitask_peft.tasks") and not _in(target, "multitask_peft.tasks"):
                if target not in TASKS_MAY_USE:
                    bad.append(f"{module} -> {target}: tasks/ may use only {sorted(TASKS_MAY_USE)}")
            elif _in(target, "multitask_peft.serving") and not _in(module, "multitask_peft.serving"):
                if module != "multitask_peft.cli":
                    bad.append(f"{module} -> {target}: only the CLI reaches into serving/")
            elif (
                _in(target, "multitask_peft.tasks")
                and not _in(module, "multitask_peft.tasks")
                and not _in(module, "multitask_peft.serving")
                and module not in ABOVE_CORE
                and not any(_in(module, p) for p in ABOVE_CORE_PACKAGES)
            ):
                bad.append(f"{module} -> {target}: the core never imports tasks/")
    return bad


def test_library_dependency_direction() -> None:
    graph = import_graph(SOURCES, ROOT)
    assert len(graph) > 50 and "multitask_peft.executor" in graph and "multitask_peft.tasks.detection" in graph
    assert violations(graph) == []


def test_library_has_no_import_circle() -> None:
    assert cycles(import_graph(SOURCES, ROOT)) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"tasks/a.py": "from multitask_peft.model import MultiTaskModel\n"}, "tasks/ may use only"),
        ({"tasks/a.py": "def f():\n    from multitask_peft import executor\n"}, "tasks/ may use only"),
        ({"multitask_peft/model.py": "from .tasks import Classification\n"}, "the core never imports tasks/"),
        ({"multitask_peft/export/graph.py": "from ..serving import app\n"}, "only the CLI reaches into serving/"),
        ({"kernels/ops.py": "import multitask_peft.routing\n"}, "kernels/ is a leaf"),
    ],
)
def test_checker_catches_layering_breaks(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    """The checker itself: each planted import breaks a rule (so the tests above can fail)."""
    base = {
        "multitask_peft/__init__.py": "from . import tasks\n",
        "multitask_peft/model.py": "",
        "multitask_peft/routing.py": "",
        "multitask_peft/executor.py": "",
        "multitask_peft/heads.py": "",
        "multitask_peft/export/__init__.py": "",
        "multitask_peft/export/graph.py": "",
        "tasks/__init__.py": "from multitask_peft.heads import Head\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from multitask_peft.model import MultiTaskModel\n",
        "tasks/a.py": "",
        "tasks/detection.py": "",
        "kernels/__init__.py": "",
        "kernels/ops.py": "",
        "serving/__init__.py": "",
        "serving/app.py": "",
    }
    _write(tmp_path, base)
    assert violations(import_graph(SOURCES, tmp_path)) == []  # TYPE_CHECKING imports do not count
    _write(tmp_path, files)
    assert any(expected in v for v in violations(import_graph(SOURCES, tmp_path)))


def test_checker_finds_circles(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "multitask_peft/__init__.py": "",
            "multitask_peft/model.py": "def save():\n    from .task_io import write\n",
            "multitask_peft/task_io.py": "from .model import MultiTaskModel\n",
            "multitask_peft/heads.py": "",
        },
    )
    assert cycles(import_graph({"multitask_peft": "multitask_peft"}, tmp_path)) == [
        ["multitask_peft.model", "multitask_peft.task_io"]
    ]

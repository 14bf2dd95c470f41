"""The code keeps its shape: layers import downward only, no import cycles, no function over 60 lines.

Imports are read from the source (function-level imports included, `if TYPE_CHECKING:` blocks left out), so a
cycle dodged by an import inside a function still fails here.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "tui")
MAX_FUNCTION_LINES = 60

LAYERS: tuple[tuple[str, ...], ...] = (
    # foundations: settings, events, atomic files, what a string names
    ("engine", "engine.config", "engine.events", "engine.fsio", "engine.presets", "engine.sources", "engine.sampling"),
    # run folders, processes of a run, where events go
    ("engine.parallel", "engine.runs", "engine.sinks", "engine.views", "engine.preflight", "engine.library_logs"),
    ("engine.notify", "engine.run_diff"),
    # models and data
    (
        "engine.architecture",
        "engine.models",
        "engine.cache",
        "engine.freeze_map",
        "engine.data",
        "engine.generation",
        "engine.devices",
    ),
    ("engine.model_card", "engine.data_report", "engine.environment"),
    ("engine.strategies", "engine.strategies.*"),
    ("engine.training", "engine.training.*"),
    ("engine.inference", "engine.inference.*"),
    ("engine.launch", "engine.launch.*"),
    # the front doors
    ("engine.api", "engine.inspect", "engine.cli"),
    # the app: plain parts, the live run, widgets, screens, the app, the console script
    ("tui", "tui.form", "tui.heavy", "tui.history", "tui.presets", "tui.messages", "tui.sink", "tui.alerts"),
    ("tui.session",),
    ("tui.widgets", "tui.widgets.*"),
    ("tui.screens", "tui.screens.*"),
    ("tui.app",),
    ("tui.launcher",),
)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


MODULES = project_modules()


def _type_checking_blocks(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks (they never run)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    return skipped


def _resolve(name: str) -> str | None:
    """The project module an imported name belongs to (`engine.runs.StopRequest` -> `engine.runs`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The project modules `module` imports anywhere in its body."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_blocks(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        # `from engine import cache` names the module engine.cache; `from engine.runs import X` only engine.runs
        found.update(target for target in map(_resolve, names) if target is not None and target != module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def layer_of(module: str) -> int:
    for index, patterns in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}")


def test_every_module_belongs_to_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_from_a_higher_layer() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_function_level_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("folder", ["engine", "tui", "tests"])
def test_no_function_is_longer_than_60_lines(folder: str) -> None:
    long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "\n".join(long)

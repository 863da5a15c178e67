"""The package's structure, checked by reading its sources (ast): no import cycles, kernels import nothing from
calm_engine, the C++ extension is imported in one place, the engine imports no backend, and no file is too long."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# Module name -> source file: calm_engine/ as it is, kernels/ as it installs (calm_engine.kernels, setup.py).
PACKAGE_DIRS = {"calm_engine": REPO_ROOT / "calm_engine", "calm_engine.kernels": REPO_ROOT / "kernels"}
EXTENSIONS = {"calm_engine._calm_cpu"}  # compiled from csrc/ (setup.py): a module without a .py source
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGE_DIRS.items():
        for path in sorted(root.rglob("*.py")):
            parts = [*package.split("."), *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = modules()
KNOWN = set(MODULES) | EXTENSIONS


def imports_of(name: str, path: Path) -> set[str]:
    """The package modules `name` imports anywhere in its source (module level, in functions, in any branch).

    `from a.b import c` counts as importing a.b.c when that is a module, else a.b. The package __init__ files Python
    runs on the way to a submodule are not edges: they are the mechanism, not a dependency the code states."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in KNOWN else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in KNOWN and target != name}
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (the first repeated at the end), or None."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_function_level_imports_and_finds_cycles(tmp_path):
    assert "calm_engine.kernels.rms_norm" in GRAPH["calm_engine.kernels.fused_linear"]  # a relative import
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    if True:\n        from calm_engine.engine import noise\n")
    assert imports_of("probe", probe) == {"calm_engine.engine.noise"}


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_import_nothing_from_calm_engine():
    for name, targets in GRAPH.items():
        if name.startswith("calm_engine.kernels"):
            outside = {t for t in targets if not t.startswith("calm_engine.kernels")}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_the_extension_is_imported_in_one_place():
    importers = sorted(name for name, targets in GRAPH.items() if targets & EXTENSIONS)
    assert importers == ["calm_engine.native"]


def test_the_engine_imports_no_backend():
    """llm_engine.py asks the policy for a backend and calls the StepBackend interface; it names no backend."""
    backends = {
        "calm_engine.engine.step.torch_step", "calm_engine.engine.step.token_step",
        "calm_engine.engine.step.graph_step", "calm_engine.engine.step.native_step", "calm_engine.engine.step.ops",
    }  # fmt: skip
    assert not GRAPH["calm_engine.engine.llm_engine"] & backends


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_too_long(name):
    lines = MODULES[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(REPO_ROOT)} has {lines} lines: split it by concern"

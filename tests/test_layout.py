"""The package's shape: one subpackage per stage of the data flow, each importable on its own,
imports that only point back along the flow, no import cycle, and short functions."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The data flow, in order; a module may import from its own stage or an earlier one. The base
# modules (errors, files, log) serve every stage and import none.
STAGES = ("data", "model", "train", "export", "cli")
BASE = {"kolm", "kolm.errors", "kolm.files", "kolm.log"}
ENTRY = "kolm.__main__"  # `python -m kolm`: the command line, after every stage
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _kolm_imports(path: Path) -> set[str]:
    """Every kolm module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kolm"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kolm"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if (REPO / node.module.replace(".", "/") / f"{a.name}.py").is_file())
    return found


def _rank(module: str) -> int:
    """-1 for the base modules, else the position of the module's stage in the flow."""
    if module in BASE:
        return -1
    if module == ENTRY:
        return len(STAGES)
    return STAGES.index(module.split(".")[1])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((REPO / "kolm").rglob("*.py"))}


@pytest.mark.unit
def test_every_module_belongs_to_a_stage_or_the_base():
    for name in _modules():
        assert name in BASE or name == ENTRY or name.split(".")[1] in STAGES, f"{name} is outside the stages"


@pytest.mark.unit
def test_nothing_imports_upward_along_the_data_flow():
    upward = []
    for name, path in _modules().items():
        for imported in _kolm_imports(path):
            if _rank(imported) > _rank(name):
                upward.append(f"{name} imports {imported}")
    assert not upward, "\n".join(upward)


@pytest.mark.unit
def test_no_import_cycle():
    modules = _modules()
    graph = {name: {i for i in _kolm_imports(path) if i in modules and i != name} for name, path in modules.items()}
    for package in {n for n in modules if (modules[n].name == "__init__.py")}:
        for name in graph:  # importing a package's module runs the package's __init__ first
            graph[name].discard(package)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.unit
def test_launchers_only_start_training_and_evaluation():
    for path in (REPO / "launch").rglob("*.py"):
        imported = {i for i in _kolm_imports(path) if i not in BASE}
        assert all(i.startswith(("kolm.train", "kolm.export.harness")) for i in imported), f"{path}: {sorted(imported)}"


@pytest.mark.unit
def test_functions_are_short():
    long = []
    for folder in ("kolm", "launch", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if "out" in path.relative_to(REPO / folder).parts:  # benchmark scratch, not ours
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)


@pytest.mark.cli
@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_imports_on_its_own(stage):
    proc = subprocess.run([sys.executable, "-c", f"import kolm.{stage}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _layout_rows() -> dict[str, str]:
    """The README's layout table: folder -> what it says the folder holds."""
    text = (REPO / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([^`]+)` \| (.*) \|$", text, re.M)}


@pytest.mark.unit
def test_the_readme_layout_names_every_module_and_script():
    rows = _layout_rows()
    missing = []
    for stage in STAGES:
        for path in sorted((REPO / "kolm" / stage).glob("*.py")):
            if path.stem not in ("__init__", "__main__") and f"`{path.stem}`" not in rows[f"kolm/{stage}/"]:
                missing.append(f"kolm/{stage}/{path.name}")
    for folder in ("slurm", "tools"):
        for path in sorted((REPO / folder).iterdir()):
            if f"`{path.name}`" not in rows[f"{folder}/"] and f"`{path.stem}`" not in rows[f"{folder}/"]:
                missing.append(f"{folder}/{path.name}")
    assert not missing, f"README.md's layout table does not name: {', '.join(missing)}"

"""The code's layout keeps its promises: imports go one way, files stay readable.

Every import statement is read from the source (top-level, inside functions, under
``TYPE_CHECKING`` or ``try``), so a lazy import cannot dodge the direction
``tools -> {planning, inference} -> training -> checkpoint -> model -> parallel``, with
``data`` needing only rank facts (`trident.parallel.topology`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> the trident folders its modules may import (besides itself and trident.errors)
ALLOWED: dict[str, set[str]] = {
    "parallel": set(),
    "model": {"parallel"},
    "data": {"parallel.topology"},
    "checkpoint": {"model", "parallel", "data"},
    "training": {"checkpoint", "model", "parallel", "data"},
    "inference": {"training", "checkpoint", "model", "parallel", "data"},
    "planning": {"training", "checkpoint", "model", "parallel", "data"},
}


def _trident_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `trident.*` import in a file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("trident.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trident"):
            if node.module == "trident":  # from trident import x: x is a folder
                found += [(node.lineno, f"trident.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def _allowed(folder: str, module: str) -> bool:
    target = module.removeprefix("trident.")
    if target == "errors" or target == folder or target.startswith(folder + "."):
        return True
    return any(target == a or target.startswith(a + ".") for a in ALLOWED[folder])


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_follow_the_design_direction(folder):
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, module in _trident_imports(path)
        if not _allowed(folder, module)
    ]
    assert not bad, "imports against the direction:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_no_lazy_trident_imports_outside_tools(folder):
    """Only the command-line layer imports inside functions (to start fast); a library
    module that did would be hiding a dependency, or a cycle, from its header."""
    lazy = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [
                    f"{path.relative_to(ROOT)}:{node.lineno}"
                    for node in ast.walk(fn)
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trident")
                ]
    assert not lazy, "imports inside functions:\n" + "\n".join(lazy)


def test_the_pipeline_executor_does_not_know_the_model():
    imports = [m for _, m in _trident_imports(ROOT / "parallel" / "pipeline" / "executor.py")]
    assert imports and not [m for m in imports if m.startswith("trident.model")]


def test_no_file_over_400_lines():
    long = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in sorted(ROOT.rglob("*.py"))
        if ".git" not in p.parts and (n := len(p.read_text().splitlines())) > 400
    ]
    assert not long, "files over 400 lines:\n" + "\n".join(long)


def test_the_parameter_flags_are_declared_once():
    """The flag names live in parallel/tensor/sharding.py; everyone else uses its helpers."""
    names = ('"tp_partial_grad"', '"pipeline_tied"', '"pipeline_duplicate"')
    owners = {
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if ".git" not in p.parts and p.parent.name != "tests" and any(n in p.read_text() for n in names)
    }
    assert owners == {"parallel/tensor/sharding.py"}


def test_every_package_folder_is_installed():
    """A folder with an __init__.py that pyproject.toml does not list would be missing from
    a non-editable install (the context-parallel package once was)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"trident"} | {
        "trident." + ".".join(p.parent.relative_to(root).parts)
        for p in root.glob("*/**/__init__.py")
        if not {"tests", ".git", "build"} & set(p.parts) and "egg-info" not in str(p)
    }
    assert found == listed, (sorted(found - listed), sorted(listed - found))

"""The package reads bottom-up: no module imports a module of a higher floor (function-level imports
included). Floors follow the data flow of DESIGN.md."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = [
    ("kvdiag.errors", "kvdiag.runs", "kvdiag.attention"),
    ("kvdiag.quant",),
    ("kvdiag.kernels", "kvdiag.tasks"),
    ("kvdiag.models",),
    ("kvdiag.capture",),
    ("kvdiag.methods",),
    ("kvdiag.offload",),
    ("kvdiag.analysis",),
    ("kvdiag.eval",),
    ("kvdiag.plots",),
    ("kvdiag.study",),
    ("kvdiag.bench", "kvdiag.tools"),
    ("kvdiag.cli", "kvdiag.__main__"),
]


def floor_of(module: str) -> int | None:
    for level, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def modules():
    for path in sorted((ROOT / "kvdiag").rglob("*.py")):
        if "kernels" in path.relative_to(ROOT / "kvdiag").parts[:1]:
            continue  # the symlink some worktrees have; kernels/ is checked below
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        yield name, path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield "kvdiag.kernels." + path.stem if path.stem != "__init__" else "kvdiag.kernels", path


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {m for m in out if m.startswith("kvdiag")}


def test_no_module_imports_upward():
    upward = []
    for name, path in modules():
        mine = floor_of(name)
        if mine is None:
            continue  # kvdiag/__init__
        for target in imports(path):
            theirs = floor_of(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{name} (floor {mine}) imports {target} (floor {theirs})")
    assert not upward, "\n".join(upward)


def test_every_module_has_a_floor():
    assert [name for name, _ in modules() if floor_of(name) is None] == ["kvdiag"]

"""The backend kit's structure (issue 14): every backend is its own module or package and
imports no other backend; a backend uses raysync only through its declared modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
BUILTINS = PLUGINS / "raysync_builtins"


def backends() -> dict[str, list[Path]]:
    """Backend name → its source files (a module, or every file of a package)."""
    found: dict[str, list[Path]] = {}
    for p in sorted(BUILTINS.iterdir()):
        if p.suffix == ".py" and p.name != "__init__.py":
            found[p.stem] = [p]
        elif p.is_dir() and (p / "__init__.py").exists():
            found[p.name] = sorted(p.rglob("*.py"))
    found["raysync_zip"] = sorted((PLUGINS / "raysync-zip" / "raysync_zip").rglob("*.py"))
    return found


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_every_builtin_backend_is_found() -> None:
    assert {"local", "value", "blob", "rsync", "host", "raysync_zip"} <= set(backends())


@pytest.mark.parametrize("name", sorted(backends()))
def test_no_backend_imports_another_backend(name: str) -> None:
    others = set(backends()) - {name}
    bad = []
    for path in backends()[name]:
        for module in imported(path):
            parts = module.split(".")
            if parts[0] == "raysync_zip" and name != "raysync_zip":
                bad.append((path.name, module))
            if parts[0] == "raysync_builtins" and (len(parts) < 2 or parts[1] in others):
                bad.append((path.name, module))
    assert bad == [], f"{name} imports another backend: {bad}"

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


ROOT = PLUGINS.parent


def test_every_module_of_the_core_and_the_plugins_is_under_500_lines() -> None:
    files = [*(ROOT / "raysync").rglob("*.py"), *PLUGINS.rglob("*.py")]
    long = {
        str(p.relative_to(ROOT)): n
        for p in files
        if "tests" not in p.parts and (n := len(p.read_text().splitlines())) >= 500
    }
    assert len(files) > 40
    assert long == {}, f"split these modules by concern: {long}"


def test_the_core_the_decorator_imports_names_no_scheme_of_the_bench() -> None:
    """The bench's scheme knowledge (S3 servers, s3fs, boto3) lives in raysync/bench/ only."""
    core = [p for p in (ROOT / "raysync").glob("*.py")]
    bad = [
        p.name for p in core if {"boto3", "s3fs", "moto"} & {m.split(".")[0] for m in imported(p)}
    ]
    assert bad == []


def _raysync_modules(path: Path) -> set[str]:
    """The raysync modules a file imports (``from raysync import rules`` is raysync.rules)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "raysync"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "raysync":
                for a in node.names:
                    sub = f"raysync.{a.name}"
                    is_module = (ROOT / "raysync" / f"{a.name}.py").exists()
                    names.add(sub if is_module else "raysync")
            elif node.module.split(".")[0] == "raysync":
                names.add(node.module)
    return names


@pytest.mark.parametrize("name", sorted(backends()))
def test_every_backend_uses_raysync_only_through_the_declared_kit(name: str) -> None:
    from raysync.hookspecs import KIT_MODULES

    used = set().union(*(_raysync_modules(p) for p in backends()[name]))
    assert used, f"{name} imports nothing of raysync: is the scan broken?"
    assert used - set(KIT_MODULES) == set(), (
        f"{name} imports core modules outside the kit; add what it needs to the kit "
        "(raysync.hookspecs.KIT_MODULES and docs/plugins.md) or use a kit module"
    )


def test_docs_plugins_names_every_kit_module() -> None:
    from raysync.hookspecs import KIT_MODULES

    text = (ROOT / "docs" / "plugins.md").read_text()
    missing = [m for m in KIT_MODULES if m != "raysync" and f"`{m}" not in text]
    assert missing == []

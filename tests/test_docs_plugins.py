"""docs/plugins.md documents every hook of raysync/hookspecs.py, and its example backend works."""

from __future__ import annotations

import ast
import re
import types
from pathlib import Path

import pytest

import raysync.hookspecs
from raysync.registry import get_registry
from raysync.testing import BackendConformance, ConformanceTarget

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def hook_names() -> set[str]:
    """The pluggy hookspecs, every member of the ExportBackend protocol, and the optional
    hooks named in its comments."""
    source = Path(raysync.hookspecs.__file__).read_text()
    tree = ast.parse(source)
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
            isinstance(d, ast.Name) and d.id == "hookspec" for d in node.decorator_list
        ):
            names.add(node.name)
        if isinstance(node, ast.ClassDef) and node.name == "ExportBackend":
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
    names |= set(re.findall(r"``(accepts_\w+|list_runs|open_run)", source))
    return names


def test_the_plugin_guide_documents_every_hook() -> None:
    guide = GUIDE.read_text()
    names = hook_names()
    assert {"raysync_register_backends", "check", "prepare", "export", "materialize"} <= names
    assert {"name", "schemes", "default", "capabilities", "accepts_scheme", "open_run"} <= names
    missing = sorted(n for n in names if f"`{n}" not in guide)
    assert missing == [], f"docs/plugins.md does not document {missing}"


def guide_example() -> types.ModuleType:
    code = re.search(r"```python\n(# raysync_mydir/__init__.py\n.*?)```", GUIDE.read_text(), re.S)
    assert code is not None, "the guide's example backend is gone"
    module = types.ModuleType("raysync_mydir_from_the_guide")
    exec(compile(code.group(1), str(GUIDE), "exec"), module.__dict__)  # noqa: S102 - our docs
    return module


class TestTheGuidesExampleBackend(BackendConformance):
    backend_name = "mydir"

    @pytest.fixture
    def conformance_target(self, tmp_path: Path) -> ConformanceTarget:
        registry = get_registry()
        try:
            registry.by_name("mydir")
        except Exception:  # noqa: BLE001 - not registered yet in this process
            registry.register_plugin(guide_example(), name="mydir-guide", source="docs")
        return ConformanceTarget(uri=f"mydir://{tmp_path}/runs/{{run}}")

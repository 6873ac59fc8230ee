"""docs/plugins.md documents every hook of raysync/hookspecs.py, and its example backend works."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

import raysync.hookspecs
from raysync.registry import get_registry
from raysync.testing import BackendConformance, ConformanceTarget

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


#: The backend protocols: the required one and every optional hook.
PROTOCOLS = (
    raysync.hookspecs.ExportBackend,
    raysync.hookspecs.FallbackBackend,
    raysync.hookspecs.ListsRuns,
    raysync.hookspecs.OpensRuns,
)


def hook_names() -> set[str]:
    """The pluggy hookspecs and every member of every backend protocol."""
    names = {
        name
        for name, value in vars(raysync.hookspecs).items()
        if callable(value) and hasattr(value, "raysync_spec")
    }
    for proto in PROTOCOLS:
        names |= set(proto.__annotations__)  # attributes
        names |= {n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")}
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

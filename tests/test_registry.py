"""Backend registry: entry points, conflicts, overrides, the plugin filter (no Ray needed)."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import types
from dataclasses import dataclass, field

import pytest

import raysync
from raysync.backend import Capabilities
from raysync.errors import BackendConflictError, BackendNotFoundError, PluginError
from raysync.registry import Registry


@dataclass
class Fake:
    name: str
    schemes: tuple[str, ...]
    default: bool = False
    capabilities: Capabilities = field(default_factory=Capabilities)

    def check(self, target: object) -> None: ...
    def prepare(self, target: object) -> dict[str, str]:
        return {}

    def export(self, request: object) -> None: ...
    def materialize(self, result: object, dest: object, *, overwrite: bool = False) -> None: ...


def test_builtin_backends_are_registered_through_the_raysync_entry_point_group() -> None:
    eps = {ep.name: ep for ep in md.entry_points(group="raysync")}
    assert eps["local"].value == "raysync_builtins.local"
    assert eps["value"].value == "raysync_builtins.value"
    reg = Registry()
    names = {i.backend.name: i for i in reg.backends()}
    assert names["local"].source == "raysync" and names["local"].version == raysync.__version__
    assert reg.for_scheme("file").name == "local"
    assert reg.for_scheme("FILE").name == "local"
    assert reg.default().name == "value"


def test_two_backends_claiming_one_scheme_is_an_error_naming_both() -> None:
    reg = Registry(load_entry_points=False)
    reg.register_backend(Fake("a", ("s3",)), source="pkg-a")
    with pytest.raises(BackendConflictError) as info:
        reg.register_backend(Fake("b", ("s3",)), source="pkg-b")
    assert "a from pkg-a" in str(info.value) and "b from pkg-b" in str(info.value)
    reg.register_backend(Fake("b", ("s3",)), source="pkg-b", override=True)
    assert reg.for_scheme("s3").name == "b"


def test_two_default_backends_conflict() -> None:
    reg = Registry(load_entry_points=False)
    reg.register_backend(Fake("a", ("x",), default=True))
    with pytest.raises(BackendConflictError, match="default backend"):
        reg.register_backend(Fake("b", ("y",), default=True))


def test_a_plugin_without_the_hook_or_a_backend_missing_hooks_is_a_plugin_error() -> None:
    reg = Registry(load_entry_points=False)
    with pytest.raises(PluginError, match="has no raysync_register_backends"):
        reg.register_plugin(types.ModuleType("empty"), name="empty")
    with pytest.raises(PluginError, match="lacks"):
        reg.register_backend(object())  # type: ignore[arg-type]


def test_a_plugin_with_a_bad_hook_signature_is_named_in_the_error() -> None:
    mod = types.ModuleType("bad")

    @raysync.hookimpl
    def raysync_register_backends(register: object, extra: object) -> None: ...

    mod.raysync_register_backends = raysync_register_backends  # type: ignore[attr-defined]
    reg = Registry(load_entry_points=False)
    with pytest.raises(PluginError, match="plugin 'bad'"):
        reg.register_plugin(mod, name="bad")


def test_lookup_errors_list_what_is_installed() -> None:
    reg = Registry(load_entry_points=False)
    reg.register_backend(Fake("a", ("x",)))
    with pytest.raises(BackendNotFoundError, match=r"installed backends: a \(x://\)"):
        reg.for_scheme("y")
    with pytest.raises(BackendNotFoundError, match="no default backend"):
        reg.default()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("local", ["local"]), ("", []), ("all", ["fsspec", "host", "local", "rsync", "value"])],
)
def test_raysync_plugins_env_var_restricts_which_entry_points_load(
    value: str, expected: list[str]
) -> None:
    code = (
        "import raysync; print(sorted(i.backend.name for i in raysync.get_registry().backends()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"RAYSYNC_PLUGINS": value, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.strip() == repr(expected)

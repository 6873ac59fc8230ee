"""Backend registry: loads plugins from the ``raysync`` entry-point group and maps schemes and
names to backends.

``RAYSYNC_PLUGINS`` restricts which entry points load: a comma-separated list of entry-point
names (``local,value``); unset or ``all`` loads every one, an empty string loads none (tests
and embedders then register backends explicitly with :func:`register_backend`).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import threading
import warnings
from dataclasses import dataclass
from types import ModuleType

import pluggy

from raysync import hookspecs
from raysync.errors import BackendConflictError, BackendNotFoundError, PluginError
from raysync.hookspecs import ExportBackend, FallbackBackend

ENTRY_POINT_GROUP = "raysync"
PLUGINS_ENV = "RAYSYNC_PLUGINS"
_REQUIRED = (
    "name",
    "schemes",
    "default",
    "capabilities",
    "check",
    "prepare",
    "export",
    "materialize",
)


@dataclass(frozen=True)
class BackendInfo:
    """A registered backend and where it came from (for ``raysync backends``)."""

    backend: ExportBackend
    source: str
    version: str


class Registry:
    """Scheme → backend and name → backend maps, filled from pluggy plugins."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._by_name: dict[str, BackendInfo] = {}
        self._by_scheme: dict[str, BackendInfo] = {}
        self._default: BackendInfo | None = None
        # Backends with an ``accepts_scheme(scheme)`` method serve schemes no backend claims.
        self._fallbacks: list[BackendInfo] = []
        self._lock = threading.RLock()
        if load_entry_points:
            self._load_entry_points()

    # -- loading -------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        wanted = os.environ.get(PLUGINS_ENV)
        allow = (
            None
            if wanted is None or wanted.strip() == "all"
            else {n.strip() for n in wanted.split(",") if n.strip()}
        )
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            if allow is not None and ep.name not in allow:
                continue
            dist = ep.dist
            source = dist.metadata["Name"] if dist else ep.value
            version = dist.version if dist else "?"
            try:
                self.register_plugin(ep.load(), name=ep.name, source=source, version=version)
            except Exception as e:  # noqa: BLE001 - one broken plugin must not break the others
                said = " ".join(str(e).split())  # one line, whatever the error's layout
                warnings.warn(
                    f"raysync: plugin {ep.name!r} from distribution {source} {version} "
                    f"could not be loaded and is skipped: {type(e).__name__}: {said}",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def register_plugin(
        self, plugin: ModuleType | object, *, name: str, source: str = "", version: str = "?"
    ) -> None:
        """Register a pluggy plugin (a module or object with ``raysync_register_backends``)."""
        with self._lock:
            try:
                self._pm.register(plugin, name=name)
            except pluggy.PluginValidationError as e:
                raise PluginError(f"plugin {name!r} ({source}) is invalid: {e}") from e
            hook = getattr(plugin, "raysync_register_backends", None)
            if hook is None:
                raise PluginError(
                    f"plugin {name!r} ({source}) has no raysync_register_backends hook",
                    hint="decorate a raysync_register_backends(register) function with "
                    "@raysync.hookimpl",
                )

            def register(backend: ExportBackend, *, override: bool = False) -> None:
                self.register_backend(
                    backend, override=override, source=source or name, version=version
                )

            hook(register=register)

    def register_backend(
        self,
        backend: ExportBackend,
        *,
        override: bool = False,
        source: str = "explicit",
        version: str = "?",
    ) -> None:
        """Register one backend object. Clashing schemes or names raise unless ``override``."""
        missing = [a for a in _REQUIRED if not hasattr(backend, a)]
        if missing:
            raise PluginError(
                f"backend {backend!r} from {source} lacks {', '.join(missing)}",
                hint="see raysync.hookspecs.ExportBackend for what a backend must define",
            )
        info = BackendInfo(backend, source, version)
        with self._lock:
            keys: list[tuple[dict[str, BackendInfo], str, str]] = [
                (self._by_name, backend.name, f"name {backend.name}")
            ]
            keys += [(self._by_scheme, s.lower(), f"scheme {s}://") for s in backend.schemes]
            for table, key, label in keys:
                old = table.get(key)
                if old is not None and old.backend.name != backend.name and not override:
                    raise BackendConflictError(label, _describe(old), _describe(info))
            if (
                backend.default
                and self._default is not None
                and not override
                and (self._default.backend.name != backend.name)
            ):
                raise BackendConflictError(
                    "output_uri=None (the default backend)",
                    _describe(self._default),
                    _describe(info),
                )
            for table, key, _ in keys:
                table[key] = info
            if backend.default:
                self._default = info
            if isinstance(backend, FallbackBackend):
                self._fallbacks = [f for f in self._fallbacks if f.backend.name != backend.name]
                self._fallbacks.append(info)

    # -- lookups -------------------------------------------------------------------------
    def for_scheme(self, scheme: str) -> ExportBackend:
        info = self._by_scheme.get(scheme.lower())
        if info is None:
            for fb in self._fallbacks:
                if isinstance(fb.backend, FallbackBackend) and fb.backend.accepts_scheme(
                    scheme.lower()
                ):
                    return fb.backend
            raise BackendNotFoundError(f"scheme {scheme + '://'!r}", installed=self._labels())
        return info.backend

    def by_name(self, name: str) -> ExportBackend:
        info = self._by_name.get(name)
        if info is None:
            raise BackendNotFoundError(f"backend name {name!r}", installed=self._labels())
        return info.backend

    def default(self) -> ExportBackend:
        if self._default is None:
            raise BackendNotFoundError(
                "output_uri=None (no default backend is installed)", installed=self._labels()
            )
        return self._default.backend

    def backends(self) -> list[BackendInfo]:
        return sorted(self._by_name.values(), key=lambda i: i.backend.name)

    def _labels(self) -> list[str]:
        return [f"{i.backend.name} ({scheme_label(i.backend)})" for i in self.backends()]


def scheme_label(backend: ExportBackend) -> str:
    """``file://`` or, for a fallback backend, ``memory://, ... + any it accepts``."""
    label = ", ".join(s + "://" for s in backend.schemes)
    if isinstance(backend, FallbackBackend):
        extra = backend.accepts_description
        label = f"{label}, {extra}" if label else extra
    return label


def _describe(info: BackendInfo) -> str:
    return f"{info.backend.name} from {info.source}"


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = Registry()
        return _registry


def register_backend(backend: ExportBackend, *, override: bool = False) -> None:
    """Register a backend in this process, for tests and embedding.

    Ray workers are separate processes: register at import time of a module the workers also
    import, or pass the backend object itself with ``isolated_export(backend=obj)``.
    """
    get_registry().register_backend(backend, override=override)

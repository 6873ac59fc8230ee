"""raysync: per-call isolated workspaces for Ray tasks and actors, exported atomically.

Public API::

    from raysync import isolated_export, ExportResult, collect, current_workspace, runtime_env
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from raysync import driver as _driver
from raysync.backend import Capabilities, ExportOutcome, ExportRequest
from raysync.checkpoints import Checkpoint, checkpoint
from raysync.decorator import isolated_export
from raysync.errors import RaySyncError
from raysync.hookspecs import ExportBackend, hookimpl
from raysync.manifest import FileEntry, Manifest
from raysync.project import runtime_env
from raysync.registry import get_registry, register_backend
from raysync.result import ExportResult, ExportStats, collect
from raysync.resuming import ResumedFrom
from raysync.target import Target
from raysync.waiting import wait_run
from raysync.workspace import Workspace, current_workspace

try:
    __version__ = version("raysync")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

#: The type of the ``register`` callback a plugin's ``raysync_register_backends`` receives.
RegisterBackend = Callable[..., None]

_driver.install_init_hook()

__all__ = [
    "Capabilities",
    "Checkpoint",
    "ExportBackend",
    "ExportOutcome",
    "ExportRequest",
    "ExportResult",
    "ExportStats",
    "FileEntry",
    "Manifest",
    "RaySyncError",
    "RegisterBackend",
    "ResumedFrom",
    "Target",
    "Workspace",
    "__version__",
    "checkpoint",
    "collect",
    "current_workspace",
    "get_registry",
    "hookimpl",
    "isolated_export",
    "register_backend",
    "runtime_env",
    "wait_run",
]

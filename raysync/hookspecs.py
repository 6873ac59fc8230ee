"""The ExportBackend hook specification: how a backend plugs into raysync.

A backend plugin is a module (or object) registered with pluggy under the project name
``"raysync"``. It implements one pluggy hook, :func:`raysync_register_backends`, and registers
one or more objects that follow the :class:`ExportBackend` protocol: the *backend hooks*
raysync calls on the driver and on the worker.

Built-in backends live in ``plugins/raysync_builtins`` and register through the same
``raysync`` entry-point group a third-party package uses::

    [project.entry-points.raysync]
    mybackend = "raysync_mybackend"

A minimal plugin module::

    import raysync

    class MyBackend:
        name = "mine"
        schemes = ("mine",)
        default = False
        capabilities = raysync.Capabilities(read_back=True)
        def check(self, target): ...
        def prepare(self, target): return {}
        def export(self, request): ...
        def materialize(self, result, dest, *, overwrite=False): ...

    @raysync.hookimpl
    def raysync_register_backends(register):
        register(MyBackend())
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pluggy

if TYPE_CHECKING:
    from raysync.backend import (
        Capabilities,
        ExportOutcome,
        ExportRequest,
        Leftover,
        RunInfo,
        RunReader,
    )
    from raysync.result import ExportResult
    from raysync.target import Target

PROJECT_NAME = "raysync"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Decorate your plugin's hook implementations with this marker.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: The backend kit: the modules of raysync a backend may import (docs/plugins.md lists what
#: each offers). The built-ins and ``plugins/raysync-zip`` import nothing else of raysync
#: (``tests/test_kit.py``); the other modules are the core's own and may change.
KIT_MODULES = (
    "raysync",  # hookimpl, RegisterBackend, the public API
    "raysync.backend",
    "raysync.checksum",
    "raysync.copy",
    "raysync.dirrun",
    "raysync.errors",
    "raysync.exporting",
    "raysync.fsops",
    "raysync.hookspecs",
    "raysync.manifest",
    "raysync.redaction",
    "raysync.result",
    "raysync.retry",
    "raysync.rules",
    "raysync.shards",
    "raysync.dirshards",
    "raysync.dirgc",
    "raysync.direxport",
    "raysync.target",
    "raysync.testing",
)


@hookspec
def raysync_register_backends(register: Callable[..., None]) -> None:
    """Register the export backends this plugin provides.

    Called once per process, the first time raysync needs a backend (on the driver when a
    function is decorated, and again in each Ray worker process).

    :param register: call ``register(backend, override=False)`` once per backend. ``backend``
        follows :class:`ExportBackend`. ``override=True`` lets this backend take schemes (or the
        name) another backend already claims; without it such a clash is a
        :class:`raysync.errors.BackendConflictError` naming both.

    Receiving a callback rather than returning a list lets raysync add keyword arguments to
    ``register`` later without breaking existing plugins.
    """


@runtime_checkable
class ExportBackend(Protocol):
    """What a backend is: a name, the URI schemes it serves, what it can do, and four hooks.

    The core calls the hooks in this order for one decorated function:

    1. :meth:`check` on the driver at decoration time (no I/O);
    2. :meth:`prepare` on the driver once Ray is up, when ``capabilities.needs_driver``;
    3. :meth:`export` in the worker after every call;
    4. :meth:`materialize` wherever the user asks for the files (usually the driver).
    """

    #: Unique backend name, used by ``isolated_export(backend="name")``.
    name: str
    #: URI schemes served (``"file"`` also serves plain paths without a scheme).
    schemes: tuple[str, ...]
    #: True for the one backend that serves ``output_uri=None``.
    default: bool
    #: What the backend can do; the core and ``raysync backends`` read it.
    capabilities: Capabilities

    # Optional hooks are the protocols below (FallbackBackend, ListsRuns, OpensRuns): a
    # backend has them by defining their members; the registry and the CLI test for them
    # with isinstance.

    def check(self, target: Target) -> None:
        """Validate a target on the driver at decoration time, without I/O.

        Raise a :class:`raysync.errors.ConfigError` subclass for anything wrong with the URI
        or the options (unknown option, bad value). ``target.uri`` may still hold
        ``{field}`` placeholders.
        """

    def prepare(self, target: Target) -> Mapping[str, str]:
        """Prepare the destination on the driver; return facts the worker needs.

        Called on the driver after ``ray.init`` (only when ``capabilities.needs_driver``), with
        ``target.base_dir`` set to the driver's cwd. The returned strings are published through
        Ray's internal KV store and handed to :meth:`export` as ``request.prepared``. Use this
        to prove visibility (e.g. write a token into the destination root that the worker
        must find). Return ``{}`` when there is nothing to publish.
        """

    def export(self, request: ExportRequest) -> ExportOutcome:
        """Persist one call's files; runs in the Ray worker after the call.

        Copy every ``request.files`` entry (fill in its ``digest`` while copying, with
        :func:`raysync.copy.copy_files`, :func:`raysync.copy.copy_and_hash`,
        :func:`raysync.copy.read_and_hash`, or ``request.new_hash()``), then commit:
        write ``request.manifest`` last, or rename a staged directory into place, so that a
        reader never sees a half-written run. Honour ``request.conflict``. On failure raise
        a :class:`raysync.errors.RaySyncError`; never delete the workspace files.
        """

    def materialize(
        self, result: ExportResult[Any], dest: Path, *, overwrite: bool = False
    ) -> None:
        """Bring a committed run's files to ``dest`` on this machine, atomically.

        Files land at their manifest paths under ``dest``; an existing file with other contents
        is an error unless ``overwrite``. :func:`raysync.result.place_files` does all of this.
        Refuse any manifest path that would land outside ``dest``
        (:class:`raysync.errors.UnsafePathError`); verify checksums; raise
        :class:`raysync.errors.MaterializeError` when the run cannot be read from here.
        """


# -- optional hooks --------------------------------------------------------------------------


@runtime_checkable
class FallbackBackend(Protocol):
    """Optional: a backend that also serves schemes no backend claims in ``schemes``.

    The fsspec backend serves every fsspec protocol this way. The registry asks the fallbacks
    in the order they registered, after no backend claimed the scheme.
    """

    #: Which schemes it accepts, for ``raysync backends`` and error messages.
    accepts_description: str

    def accepts_scheme(self, scheme: str) -> bool:
        """True when this backend serves ``scheme`` (lower case, without ``://``)."""


@runtime_checkable
class ListsRuns(Protocol):
    """Optional, for ``raysync ls``: the runs below a destination (committed or not)."""

    def list_runs(self, target: Target) -> list[RunInfo]:
        """One :class:`raysync.backend.RunInfo` per run under ``target.uri``, newest first
        or in any stable order; a run whose manifest is damaged is listed as such."""


@runtime_checkable
class OpensRuns(Protocol):
    """Optional, for ``raysync verify`` and ``raysync pull``: read one committed run."""

    def open_run(self, target: Target) -> RunReader:
        """A :class:`raysync.backend.RunReader` over the run at ``target.uri``."""


@runtime_checkable
class ResumesRuns(Protocol):
    """Optional, for ``isolated_export(resume=True)``: read the run a call resumes from.

    Called in the Ray worker when a call starts (where :meth:`ExportBackend.export` runs, with
    the same ``prepared`` facts), so it must prove, as ``export`` does, that the destination it
    reads is the one the driver meant. A backend without this hook refuses ``resume=True`` at
    decoration."""

    def resume_reader(self, target: Target, prepared: Mapping[str, str]) -> RunReader:
        """A :class:`raysync.backend.RunReader` over the run at ``target.uri``, from this
        worker: ``manifest()`` is ``None`` when no run is there."""


@runtime_checkable
class DeletesRuns(Protocol):
    """Optional, for ``raysync rm``, ``raysync gc`` and ``isolated_export(keep_last=N)``."""

    def delete_run(self, target: Target) -> int:
        """Delete the committed run at ``target.uri`` and return the bytes freed.

        The run vanishes whole first (its manifest is removed, or its directory renamed
        aside), so a reader sees it whole or not at all; then its files. Only a raysync run is
        deleted: no manifest, files the manifest does not list, or an export writing the run
        right now is a :class:`raysync.errors.RunExistsError` (or ``DestinationError``), and
        nothing is touched (DESIGN invariant 7)."""


@runtime_checkable
class CleansLeftovers(Protocol):
    """Optional, for ``raysync gc``: what dead exports left under a prefix."""

    def list_leftovers(self, target: Target) -> list[Leftover]:
        """The leftovers under ``target.uri`` of exports that are no longer running (an
        export in progress is never listed, whatever its age)."""

    def delete_leftover(self, target: Target, leftover: Leftover) -> None:
        """Remove one leftover that :meth:`list_leftovers` returned (checked again first)."""


@runtime_checkable
class KeepsCredentials(Protocol):
    """Optional: a backend whose options can keep the store's credentials on the driver
    (the fsspec backend's ``credentials="driver"``)."""

    def worker_target(self, target: Target) -> Target | None:
        """On the driver at decoration: ``target`` as it may travel to workers and results
        (no credential in its options), or ``None`` when its options do not ask for that.

        With a worker target, the core ships only that one with the calls, gives the full
        target to :meth:`ExportBackend.prepare` on the driver (which is then called whatever
        ``capabilities.needs_driver`` says) and never puts it in a Ray task, result or KV
        record."""

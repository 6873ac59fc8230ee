"""Every error raysync raises on purpose.

Each exception carries the context a user needs (backend, URI, path) and says how to fix the
problem. They all derive from :class:`RaySyncError`, so ``except RaySyncError`` catches any of them.
"""

from __future__ import annotations

from collections.abc import Iterable


class RaySyncError(Exception):
    """Base class of every raysync error.

    ``hint`` says how to fix the problem; it is appended to the message.
    """

    #: Where the call's artifacts are kept when an export failed (set by the core).
    workspace: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message + (f"\n  fix: {hint}" if hint else ""))

    def kept_in(self, workspace: str) -> RaySyncError:
        """Record (and say in the message) where the call's artifacts are still kept."""
        if self.workspace is None:
            self.workspace = workspace
            first = str(self.args[0]) if self.args else self.message
            self.args = (f"{first}\n  the artifacts are kept in {workspace}", *self.args[1:])
        return self

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only constructors do not survive the default pickling, and these errors
        # travel from Ray workers to the driver.
        return (_rebuild, (type(self), self.__dict__.copy(), self.args))


def _rebuild(
    cls: type[RaySyncError], state: dict[str, object], args: tuple[object, ...]
) -> RaySyncError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class ConfigError(RaySyncError):
    """The decorator's arguments are invalid (bad tree name, bad option value...)."""


class TemplateError(ConfigError):
    """An ``output_uri`` template names a field the call does not have, or renders unsafely."""

    def __init__(
        self,
        message: str,
        *,
        template: str,
        available: Iterable[str] = (),
        hint: str | None = None,
    ) -> None:
        self.template = template
        self.available = sorted(available)
        if hint is None and self.available:
            hint = "use one of the available fields: " + ", ".join(
                "{" + f + "}" for f in self.available
            )
        super().__init__(f"{message} (template {template!r})", hint=hint)


class BackendNotFoundError(ConfigError):
    """No installed backend serves the requested URI scheme or backend name."""

    def __init__(self, what: str, *, installed: Iterable[str]) -> None:
        self.installed = sorted(installed)
        super().__init__(
            f"no backend for {what}; installed backends: {', '.join(self.installed) or 'none'}",
            hint="install the package that provides it, or check RAYSYNC_PLUGINS "
            "(`raysync backends` lists what is installed)",
        )


class BackendConflictError(ConfigError):
    """Two backends claim the same scheme (or name) and neither overrides explicitly."""

    def __init__(self, key: str, first: str, second: str) -> None:
        self.key, self.first, self.second = key, first, second
        super().__init__(
            f"backends {first!r} and {second!r} both claim {key!r}",
            hint="uninstall one of them, restrict loading with RAYSYNC_PLUGINS, "
            "or register the one you want with override=True",
        )


class MissingDependencyError(ConfigError):
    """A backend needs an optional package that is not installed."""

    def __init__(
        self,
        what: str,
        *,
        extra: str | None = None,
        package: str | None = None,
        install: str | None = None,
    ) -> None:
        if install:
            hint = install
        elif extra:
            hint = f"pip install 'raysync[{extra}]'"
        elif package:
            hint = f"pip install {package}"
        else:
            hint = "install the package that implements this protocol"
        super().__init__(f"{what} needs an optional dependency that is not installed", hint=hint)


class ValidationError(RaySyncError):
    """The decorator's ``validate`` function refused a call's output: nothing was committed
    as ``succeeded``."""


class PluginError(RaySyncError):
    """A plugin module is broken (import error, bad hook signature, invalid backend)."""


class UnsafePathError(RaySyncError):
    """A path from a tree, manifest, payload or symlink would land outside its destination."""

    def __init__(self, message: str, *, path: str, hint: str | None = None) -> None:
        self.path = path
        super().__init__(f"{message}: {path!r}", hint=hint)


class TreeError(RaySyncError):
    """An output tree cannot be exported as asked (e.g. the tree path is a file)."""


class DestinationError(RaySyncError):
    """The destination cannot take this run (not visible here, exists already, read-only...)."""

    def __init__(self, message: str, *, uri: str, hint: str | None = None) -> None:
        self.uri = uri
        super().__init__(f"{message} (destination {uri})", hint=hint)


class DestinationNotVisibleError(DestinationError):
    """The worker cannot prove the destination is the one the driver meant (DESIGN invariant 2)."""


class RunExistsError(DestinationError):
    """A committed run already exists at the destination and the conflict policy is ``error``."""


class ExportError(RaySyncError):
    """Exporting a call's trees failed. ``workspace`` is where the artifacts still are."""

    def __init__(
        self,
        message: str,
        *,
        backend: str,
        uri: str,
        workspace: str | None,
        hint: str | None = None,
    ) -> None:
        self.backend, self.uri, self.workspace = backend, uri, workspace
        where = f"; the artifacts are kept in {workspace}" if workspace else ""
        super().__init__(f"export by {backend!r} to {uri} failed: {message}{where}", hint=hint)


class PayloadTooLargeError(ExportError):
    """A return-by-value export is larger than the configured limit."""


class IntegrityError(RaySyncError):
    """Files do not match their manifest (checksum or size mismatch, missing files)."""

    def __init__(self, message: str, *, uri: str, bad: Iterable[str]) -> None:
        self.uri = uri
        self.bad = sorted(bad)
        listed = ", ".join(self.bad[:20]) + (" ..." if len(self.bad) > 20 else "")
        super().__init__(f"{message} in {uri}: {listed}")


class MaterializeError(RaySyncError):
    """The files of a result cannot be brought to the requested destination."""


class ShardClashError(RunExistsError):
    """Two shards of one run wrote the same path: nothing is committed. ``shards`` names
    both, ``path`` one of the paths they share."""

    def __init__(self, message: str, *, uri: str, shards: tuple[str, str], path: str) -> None:
        super().__init__(
            message,
            uri=uri,
            hint="give each shard its own paths, e.g. export/shard-{rank}/...",
        )
        self.shards = shards
        self.path = path


class RunTimeoutError(RaySyncError):
    """:func:`raysync.wait_run` timed out before the run was committed."""


class LeaseHeldError(RunExistsError):
    """Another live call holds the run's lease (``resume=True``, checkpoints): it is writing
    this run right now."""

"""Types exchanged between the core and backends (see :mod:`raysync.hookspecs`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raysync import checksum as checksum_mod
from raysync.manifest import FileEntry, Manifest
from raysync.target import Target

#: What to do when a committed run already exists at the destination.
Conflict = Literal["error", "overwrite"]
CONFLICT_POLICIES: tuple[str, ...] = ("error", "overwrite")


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the core picks behaviour from it and ``raysync backends`` shows it."""

    #: Commits by renaming a staged directory into place (filesystems).
    atomic_rename: bool = False
    #: Commits with a conditional write (e.g. S3 ``If-None-Match``) so two attempts cannot race.
    conditional_put: bool = False
    #: Uploads large files in parts.
    multipart: bool = False
    #: :meth:`ExportBackend.materialize` can read committed runs back.
    read_back: bool = False
    #: :meth:`ExportBackend.prepare` must run on the driver before workers export.
    needs_driver: bool = False
    #: The files travel back in the result: there is no destination to commit to more than
    #: once, so ``sync_every`` checkpoints are refused.
    by_value: bool = False
    #: Many calls may export shards of one run (``isolated_export(shard=..., shards=N)``);
    #: the run is committed once all have (:mod:`raysync.shards`).
    shards: bool = False

    def names(self) -> list[str]:
        return [k for k, v in self.__dict__.items() if v]


@dataclass(frozen=True)
class Shard:
    """This export is one shard of a run that many calls write (:mod:`raysync.shards`).

    ``name`` is the rendered ``shard`` template, ``count`` how many shards the run has,
    ``set_id`` what the shards of one run share (a hash of the Ray session, the job and the
    function): shards of another job never complete this job's run."""

    name: str
    count: int
    set_id: str

    @property
    def key(self) -> str:
        """The shard's name as a short, file-name-safe key (a hash of the name)."""
        import hashlib

        return hashlib.sha256(self.name.encode()).hexdigest()[:16]


@dataclass
class ExportRequest:
    """Everything a backend's ``export`` hook gets for one call."""

    #: The rendered destination (relative paths resolve against ``target.base_dir``).
    target: Target
    #: The files to export, unhashed; the backend sets each ``digest`` while copying (with
    #: :meth:`new_hash`, or the helpers in :mod:`raysync.copy`).
    files: list[FileEntry]
    #: The manifest to commit last (its ``files`` are ``files``).
    manifest: Manifest
    #: The call's private workspace (the artifacts stay here if the export fails).
    workspace: Path
    #: ``"error"`` or ``"overwrite"`` when a committed run exists.
    conflict: Conflict
    #: The Ray task id of this call: a run committed by the same task id is an earlier attempt.
    task_id: str
    #: What the backend's ``prepare`` returned on the driver.
    prepared: Mapping[str, str] = field(default_factory=dict)
    #: When the call is one shard of a run (``capabilities.shards``): which one.
    shard: Shard | None = None

    @property
    def checksum(self) -> str:
        """The manifest's checksum algorithm (``xxh3-128`` unless the user chose another)."""
        return self.manifest.checksum

    def new_hash(self) -> checksum_mod.Hasher:
        """A fresh hasher of the manifest's algorithm: ``update(bytes)``, ``hexdigest()``."""
        return checksum_mod.new(self.manifest.checksum)


@dataclass(frozen=True)
class Location:
    """Where a committed run lives, for reading it back (an :class:`ExportOutcome` payload).

    ``options`` are the storage_options the run was written with; they may hold credentials,
    so they are kept out of the repr (DESIGN invariant 5).
    """

    uri: str
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ExportOutcome:
    """What ``export`` returns: the committed URI, and for by-value backends the payload."""

    uri: str
    payload: Any = None
    extra_stats: dict[str, Any] = field(default_factory=dict)
    #: False when this export was one shard and another shard committed the run (or it is
    #: not complete yet).
    committed: bool = True


@dataclass(frozen=True)
class RunInfo:
    """One run found under a prefix (``raysync ls``).

    ``status``: ``committed`` (a manifest of a call that succeeded), ``failed`` (a manifest of
    a call that raised, exported with ``export_on_failure``), ``checkpoint`` (a ``sync_every``
    checkpoint of a call still running, or one that died before its final export), or
    ``incomplete`` (data or a staging area without a manifest: an export that is running or
    died), or ``damaged`` (a manifest that cannot be read: ``reason`` says why).
    """

    uri: str
    status: str
    files: int | None = None
    bytes: int | None = None
    ended_at: str | None = None
    task_id: str | None = None
    reason: str | None = None
    #: An incomplete sharded run: ``"k/N"`` shards exported.
    shards: str | None = None
    #: The function that wrote the run (``keep_last`` prunes only its own function's runs).
    function: str | None = None

    @classmethod
    def from_manifest(cls, uri: str, manifest: Manifest) -> RunInfo:
        return cls(
            uri=uri,
            status={"failed": "failed", "running": "checkpoint"}.get(manifest.status, "committed"),
            files=len(manifest.files),
            bytes=manifest.total_bytes,
            ended_at=_text(manifest.run.get("ended_at")),
            task_id=_text(manifest.run.get("task_id")),
            function=_text(manifest.run.get("function")),
        )


@dataclass(frozen=True)
class Leftover:
    """What a dead export left behind (``raysync gc``): a staging directory, a lock and the
    objects it guarded, a shard area, an incomplete multipart upload.

    ``uri`` says where, ``kind`` what, ``bytes`` what removing it frees, ``age`` seconds since
    it last changed, and ``ref`` is the backend's own handle for :meth:`delete_leftover`."""

    uri: str
    kind: str
    bytes: int
    age: float
    ref: str = field(default="", repr=False)


def _text(value: Any) -> str | None:
    """A manifest's free-form ``run`` field for a listing: a string, or ``None`` when a
    damaged or foreign manifest holds something else there."""
    return value if isinstance(value, str) else None


class RunReader:
    """Reads one run back by URI (``raysync verify`` and ``pull``); backends subclass it.

    ``manifest()`` is ``None`` when there is no committed run at the URI; ``read(entry)``
    streams one file's bytes.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def manifest(self) -> Manifest | None:
        raise NotImplementedError

    def read(self, entry: FileEntry) -> Iterator[bytes]:
        raise NotImplementedError

    def prefetch(self, entries: Sequence[FileEntry]) -> None:
        """``entries`` will be read next, in this order: a reader may start fetching them
        (within a memory bound) so that :meth:`read` finds them ready. Optional."""

    def close(self) -> None:
        """Stop what :meth:`prefetch` started. Optional."""

"""What a decorated call returns, and bringing its files to the caller's machine."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, overload

from raysync import checksum as checksum_mod
from raysync.errors import IntegrityError, MaterializeError
from raysync.fsops import makedirs, remove_tree
from raysync.manifest import MANIFEST_NAME, FileEntry, Manifest, safe_join, same_document
from raysync.rules import placed_mode

#: What the decorated function returned (``ExportResult.value``).
T = TypeVar("T")


@dataclass(frozen=True)
class ExportStats:
    """How big the export was and how fast it went."""

    files: int
    bytes: int
    seconds: float
    run_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        """Export throughput in MB/s (10^6 bytes)."""
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ExportResult(Generic[T]):
    """The result of a call decorated with :func:`raysync.isolated_export`.

    ``value`` is what the function returned, ``uri`` where the committed run lives,
    ``manifest`` every file with its size, mode and digest.
    """

    value: T
    uri: str
    backend: str
    manifest: Manifest
    stats: ExportStats
    payload: Any = field(default=None, repr=False)
    _backend_obj: Any = field(default=None, repr=False, compare=False)
    #: ``isolated_export(shard=...)``: the shard this call exported, and whether this call
    #: committed the run (the last shard to finish does; :func:`raysync.wait_run` waits).
    shard: str | None = None
    committed_run: bool = True

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as a tuple of its fields (its manifest as tuples too): it crosses Ray once
        per call, and cloudpickle handles a tuple far faster than a dataclass tree."""
        return (
            _unpickle_result,
            (
                type(self),
                self.value,
                self.uri,
                self.backend,
                self.manifest,
                self.stats,
                self.payload,
                self._backend_obj,
                self.shard,
                self.committed_run,
            ),
        )

    def materialize(
        self,
        dest: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        with_manifest: bool = False,
    ) -> Path:
        """Write this run's files under ``dest`` on this machine and verify them.

        Files land at their manifest paths (``dest/export/...``); existing files with other
        contents are an error unless ``overwrite``. With ``with_manifest`` the manifest is
        written too (``dest/raysync-manifest.json``), making ``dest`` a run that
        ``raysync verify`` and ``raysync ls`` understand. Returns ``dest`` as a :class:`Path`.
        """
        backend = self._backend_obj
        if backend is None or not backend.capabilities.read_back:
            raise MaterializeError(
                f"backend {self.backend!r} cannot read runs back",
                hint="read the files from the destination with the backend's own tools",
            )
        out = Path(dest).absolute()
        manifest_path = out / MANIFEST_NAME
        data = self.manifest.to_bytes()
        if with_manifest and manifest_path.exists() and not overwrite:
            if not same_document(manifest_path.read_bytes(), self.manifest):
                raise MaterializeError(
                    f"{manifest_path} already holds another run's manifest",
                    hint="materialize into an empty directory or pass overwrite=True",
                )
        backend.materialize(self, out, overwrite=overwrite)
        if with_manifest:
            tmp = out / f".{MANIFEST_NAME}.{uuid.uuid4().hex[:8]}"
            tmp.write_bytes(data)
            os.replace(tmp, manifest_path)
        return out


def _unpickle_result(cls: type[ExportResult[Any]], *fields: Any) -> ExportResult[Any]:
    return cls(*fields)


def collect(
    results: Iterable[Any], dest: str | os.PathLike[str], *, overwrite: bool = False
) -> list[ExportResult[Any]]:
    """Materialize many results (``ExportResult`` objects or Ray ``ObjectRef``s) into ``dest``.

    Runs on the driver; files of different runs merge into one tree, and two runs that wrote
    the same path with different contents are an error unless ``overwrite``.
    """
    import ray

    items = list(results)
    refs = [i for i in items if isinstance(i, ray.ObjectRef)]
    got = dict(zip(refs, ray.get(refs), strict=True)) if refs else {}
    out: list[ExportResult[Any]] = []
    for item in items:
        res = got[item] if isinstance(item, ray.ObjectRef) else item
        if not isinstance(res, ExportResult):
            raise MaterializeError(
                f"collect() got {type(res).__name__}, not an ExportResult",
                hint="pass the ObjectRefs of calls decorated with @isolated_export",
            )
        res.materialize(dest, overwrite=overwrite)
        out.append(res)
    return out


def place_run(
    dest: Path,
    manifest: Manifest,
    read: Callable[[FileEntry], Iterator[bytes | memoryview]],
    *,
    uri: str,
    overwrite: bool = False,
) -> None:
    """:func:`place_files` for every file of a run's ``manifest`` (with its algorithm)."""
    place_files(
        dest, manifest.files, read, uri=uri, checksum=manifest.checksum, overwrite=overwrite
    )


def place_files(
    dest: Path,
    files: Sequence[FileEntry],
    read: Callable[[FileEntry], Iterator[bytes | memoryview]],
    *,
    uri: str,
    checksum: str,
    overwrite: bool = False,
) -> None:
    """Write ``files`` under ``dest``: all or nothing, each checked against its digest
    (algorithm ``checksum``).

    Every target is checked before anything is written (no escapes; no file, link or
    directory in the way of a directory; no directory where a file goes; no existing file with
    other contents unless ``overwrite``), and every clash is reported at once. The files are
    then staged in a hidden directory inside ``dest`` and verified; only then are they renamed
    into place. On any failure the staging directory is removed and ``dest`` is as before.
    Modes are the manifest's ``rwx`` bits less the umask (never setuid or setgid).
    """
    targets = [safe_join(dest, f.path) for f in files]
    clashes = _clashes(dest, files, targets, checksum=checksum, overwrite=overwrite)
    if clashes:
        raise MaterializeError(
            f"{len(clashes)} file(s) cannot be placed in {dest}; nothing was written: "
            + "; ".join(clashes[:10])
            + (" ..." if len(clashes) > 10 else ""),
            hint="materialize into an empty directory, or pass overwrite=True to replace "
            "files with other contents",
        )
    makedirs(dest)
    staging = dest / f".raysync-staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        staged = []
        bad = []
        for i, f in enumerate(files):
            tmp = staging / str(i)
            h = checksum_mod.new(checksum)
            with open(tmp, "xb") as out:
                for chunk in read(f):
                    h.update(chunk)
                    out.write(chunk)
            os.chmod(tmp, placed_mode(f.mode))
            if h.hexdigest() != f.digest:
                bad.append(f.path)
            staged.append(tmp)
        if bad:
            raise IntegrityError("files do not match the manifest", uri=uri, bad=bad)
        for tmp, target in zip(staged, targets, strict=True):
            makedirs(target.parent)
            os.replace(tmp, target)
    finally:
        remove_tree(staging)


def _clashes(
    dest: Path,
    files: Sequence[FileEntry],
    targets: Sequence[Path],
    *,
    checksum: str,
    overwrite: bool,
) -> list[str]:
    """What stands in the way of placing ``files`` at ``targets`` (empty: nothing)."""
    out: list[str] = []
    if os.path.lexists(dest) and not dest.is_dir():
        return [f"{dest} is not a directory"]
    good_dirs: set[str] = set()
    for f, t in zip(files, targets, strict=True):
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            rel = "/".join(parts[:i])
            if rel in good_dirs:
                continue
            try:
                st = os.lstat(os.path.join(dest, rel))
            except FileNotFoundError:
                good_dirs.add(rel)  # made when placing
                continue
            if stat.S_ISLNK(st.st_mode):
                out.append(f"{rel!r} is a symbolic link where {f.path!r} needs a directory")
                break
            if not stat.S_ISDIR(st.st_mode):
                out.append(f"{rel!r} is a file where {f.path!r} needs a directory")
                break
            good_dirs.add(rel)
        else:
            try:
                st = os.lstat(t)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                out.append(f"{f.path!r} is a directory here")
            elif overwrite:
                continue
            elif not stat.S_ISREG(st.st_mode):
                out.append(f"{f.path!r} exists and is not a regular file")
            elif st.st_size != f.size or checksum_mod.of_file(t, checksum) != f.digest:
                out.append(f"{f.path!r} exists with other contents")
    return out


def read_path_chunks(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Stream a file in chunks (for :func:`place_files`)."""
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(chunk), b"")


P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound=type)


class IsolatedExport(Protocol):
    """What :func:`isolated_export` returns: a decorator under which a call returns
    ``ExportResult[R]`` where the function returned ``R`` (its ``.value``), with the same
    parameters; an ``async def`` stays a coroutine function; a class keeps its type (each
    public method of it is wrapped)."""

    @overload
    def __call__(self, obj: C, /) -> C: ...

    @overload
    def __call__(  # type: ignore[overload-overlap]  # an async def matches both; this first
        self, obj: Callable[P, Coroutine[Any, Any, R]], /
    ) -> Callable[P, Coroutine[Any, Any, ExportResult[R]]]: ...

    @overload
    def __call__(self, obj: Callable[P, R], /) -> Callable[P, ExportResult[R]]: ...

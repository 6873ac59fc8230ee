"""local-copy backend: ``file://`` URIs and plain paths, committed by an atomic rename.

Relative paths resolve against the **driver's** cwd. The driver writes a visibility token into
the destination root (``.raysync-visible``); a worker that does not find that exact token is on
a node that does not mount the driver's path, and refuses to export there rather than quietly
writing to its own disk (DESIGN invariant 2).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import raysync
from raysync.backend import Capabilities, ExportOutcome, ExportRequest, RunInfo, RunReader
from raysync.copy import copy_files, plan_reuse
from raysync.errors import (
    ConfigError,
    DestinationError,
    DestinationNotVisibleError,
    IntegrityError,
    MaterializeError,
    RunExistsError,
)
from raysync.manifest import MANIFEST_NAME, FileEntry, Manifest, check_relpath, safe_join
from raysync.result import ExportResult, place_files, read_path_chunks
from raysync.target import Target, split_scheme

TOKEN_NAME = ".raysync-visible"  # noqa: S105 - a file name, not a secret


def _run_dir(uri: str) -> Path:
    return Path(split_scheme(uri)[1])


def read_committed(run_dir: Path, *, uri: str) -> Manifest | None:
    """The manifest of a committed run at ``run_dir``, or ``None`` when there is none."""
    try:
        data = (run_dir / MANIFEST_NAME).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Manifest.from_bytes(data, uri=uri)


STAGING_MARK = ".raysync-staging-"


def list_dir_runs(root: Path, to_uri: Callable[[Path], str], *, depth: int = 8) -> list[RunInfo]:
    """Runs under ``root`` on this machine: directories holding a manifest (not descended
    into), and staging directories without a committed run (incomplete)."""
    runs: list[RunInfo] = []
    if not root.is_dir():
        return runs
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if MANIFEST_NAME in filenames:
            manifest = read_committed(here, uri=to_uri(here))
            if manifest is not None:
                runs.append(RunInfo.from_manifest(to_uri(here), manifest))
            dirnames.clear()
            continue
        for d in list(dirnames):
            if d.startswith(".") and STAGING_MARK in d:
                name = d[1:].split(STAGING_MARK, 1)[0]
                if not (here / name / MANIFEST_NAME).exists():
                    runs.append(RunInfo(uri=to_uri(here / name), status="incomplete"))
                dirnames.remove(d)
            elif d.startswith(".raysync") or (d.startswith(".") and ".raysync-old-" in d):
                dirnames.remove(d)
        if len(here.parts) - base >= depth:
            dirnames.clear()
    return sorted(runs, key=lambda r: r.uri)


class DirReader(RunReader):
    """Reads a run from a directory on this machine."""

    def __init__(self, uri: str, path: Path) -> None:
        super().__init__(uri)
        self.path = path

    def manifest(self) -> Manifest | None:
        return read_committed(self.path, uri=self.uri)

    def read(self, entry: FileEntry) -> Iterator[bytes]:
        return read_path_chunks(safe_join(self.path, entry.path))


def prepare_root(root: Path) -> dict[str, str]:
    """On the driver: create ``root`` and its visibility token; the facts a worker checks."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        token_file = root / TOKEN_NAME
        try:
            with open(token_file, "x") as f:
                f.write(secrets.token_hex(16))
        except FileExistsError:
            pass
        token = token_file.read_text().strip()
    except OSError as e:
        raise DestinationError(
            f"cannot prepare the destination root {root}: {e}",
            uri=str(root),
            hint="check the path and its permissions",
        ) from e
    return {"root": str(root), "token": token}


def check_visible(prepared: Mapping[str, str], dest: Path, uri: str) -> None:
    """On the worker: refuse a destination whose root does not hold the driver's token."""
    root = Path(prepared.get("root", ""))
    token = prepared.get("token")
    try:
        found = (root / TOKEN_NAME).read_text().strip()
    except OSError:
        found = None
    if not token or found != token:
        raise DestinationNotVisibleError(
            f"the driver's destination root {root} is not visible on this node (its "
            "visibility token is missing or different), so exporting here would write to "
            "this node's own disk",
            uri=uri,
            hint="mount the same filesystem at the same path on every node, or use a "
            "backend that reaches the driver (return-by-value, an object store)",
        )
    if not dest.is_relative_to(root):
        raise DestinationNotVisibleError(f"{dest} is outside the prepared root {root}", uri=uri)


def check_conflict(
    dest: Path, *, task_id: str, conflict: str, uri: str
) -> tuple[bool, Manifest | None]:
    """Apply the conflict policy to a directory destination: (replacing a run?, the manifest
    of the committed run there, if any — what an incremental export may reuse)."""
    existing = read_committed(dest, uri=uri)
    if existing is not None:
        if existing.run.get("task_id") == task_id:
            return True, existing  # an earlier attempt of this very Ray task: a retry
        if conflict == "overwrite":
            return True, existing
        raise RunExistsError(
            "a committed run already exists here",
            uri=uri,
            hint="use another output_uri (e.g. add {task_id}) or conflict='overwrite'",
        )
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        if conflict != "overwrite":
            raise RunExistsError(
                "the destination exists and is not a raysync run",
                uri=uri,
                hint="choose an empty or new directory, or conflict='overwrite'",
            )
        return True, None
    return False, None


def commit_dir(staging: Path, dest: Path, *, replace: bool, uri: str) -> None:
    """Rename a complete staged run into place (the commit)."""
    if not replace:
        try:
            # rename() onto a missing or empty directory is atomic; onto a non-empty one
            # it fails, which is how a concurrent commit to the same run is detected.
            os.rename(staging, dest)
        except OSError as e:
            if dest.exists():
                raise RunExistsError(
                    "another call committed this run first",
                    uri=uri,
                    hint="give each call its own output_uri (e.g. add {task_id})",
                ) from e
            raise
        return
    old = dest.parent / f".{dest.name}.raysync-old-{uuid.uuid4().hex[:12]}"
    os.rename(dest, old)
    os.rename(staging, dest)
    shutil.rmtree(old, ignore_errors=True)


def link_committed(committed: Path, entry: FileEntry, out: Path) -> bool:
    """Hard-link a file of the run being replaced into the staging directory (incremental
    export); False when that is not possible (not a plain file of the right size, or a file
    system without hard links), and the file is copied instead."""
    try:
        st = committed.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            return False
        os.link(committed, out)
    except OSError:
        return False
    return True


def destination_error(e: OSError, where: Path, request: ExportRequest, uri: str) -> Exception:
    """A clear error for a destination that is full, read-only or not writable; other OS
    errors are returned unchanged."""
    if e.errno == errno.ENOSPC:
        try:
            free = f"{shutil.disk_usage(where).free:,} bytes are free there"
        except OSError:
            free = "its free space is unknown"
        return DestinationError(
            f"the destination is full: this run needs {request.manifest.total_bytes:,} bytes "
            f"({len(request.files)} files) and {free}; nothing was committed",
            uri=uri,
            hint="free space on the destination or export to a larger one",
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = "read-only" if e.errno == errno.EROFS else "not writable by this user"
        return DestinationError(
            f"the destination is {what} ({e.strerror}: {e.filename}); nothing was committed",
            uri=uri,
            hint="mount it read-write on every node, or fix its permissions",
        )
    return e


def materialize_dir(
    src: Path, result: ExportResult, dest: Path, *, overwrite: bool, hint: str
) -> None:
    """Bring the run committed in directory ``src`` to ``dest``: it must be the run
    ``result`` describes (same task); files verified, all or nothing."""
    committed = read_committed(src, uri=result.uri)
    if committed is None:
        raise MaterializeError(f"no committed run at {src} on this machine", hint=hint)
    if committed.run.get("task_id") != result.manifest.run.get("task_id"):
        raise IntegrityError(
            "the run at this path was replaced by another call",
            uri=result.uri,
            bad=[MANIFEST_NAME],
        )
    if src.resolve() == dest.resolve():
        return
    place_files(
        dest,
        committed.files,
        lambda f: read_path_chunks(safe_join(src, f.path)),
        uri=result.uri,
        overwrite=overwrite,
        checksum=committed.checksum,
    )


class LocalCopyBackend:
    """Copies a call's trees to a directory the worker and the driver both see."""

    name = "local"
    schemes = ("file",)
    default = False
    capabilities = Capabilities(atomic_rename=True, read_back=True, needs_driver=True)

    def check(self, target: Target) -> None:
        if target.options:
            raise ConfigError(
                f"the local backend takes no storage_options, got {sorted(target.options)}",
                hint="remove storage_options for local paths",
            )
        if not target.path.strip():
            raise ConfigError(
                "the local destination path is empty",
                hint="e.g. output_uri='artifacts/runs/{run_id}'",
            )

    def prepare(self, target: Target) -> Mapping[str, str]:
        return prepare_root(Path(target.local_path(target.root or ".")))

    def export(self, request: ExportRequest) -> ExportOutcome:
        dest = Path(request.target.local_path())
        uri = f"file://{dest}"
        check_visible(request.prepared, dest, uri)
        replace, previous = check_conflict(
            dest, task_id=request.task_id, conflict=request.conflict, uri=uri
        )
        # Incremental: files the run being replaced already holds are linked, not copied.
        reuse = plan_reuse(request.files, previous, request.checksum)
        staging = dest.parent / f".{dest.name}.raysync-staging-{uuid.uuid4().hex[:12]}"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
        except OSError as e:
            raise destination_error(e, dest.parent, request, uri) from e
        try:
            # Plain string paths: this loop runs once per file (Path objects cost more here
            # than the copy of a small file).
            base = os.fspath(staging)
            made: set[str] = {base}
            jobs: list[tuple[FileEntry, str | Path]] = []
            reused = [0, 0]
            for entry in request.files:
                out = os.path.join(base, check_relpath(entry.path))
                parent = os.path.dirname(out)
                if parent not in made:
                    os.makedirs(parent, exist_ok=True)
                    made.add(parent)
                if entry.path in reuse and link_committed(
                    safe_join(dest, entry.path), entry, Path(out)
                ):
                    reused[0] += 1
                    reused[1] += entry.size
                    continue
                jobs.append((entry, out))
            copy_files(jobs, request.checksum, dest_fs=staging)
            # The manifest is written last: a directory holding one is a complete run.
            (staging / MANIFEST_NAME).write_bytes(request.manifest.to_bytes())
            commit_dir(staging, dest, replace=replace, uri=uri)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise destination_error(e, dest.parent, request, uri) from e
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return ExportOutcome(
            uri=uri, extra_stats={"reused_files": reused[0], "reused_bytes": reused[1]}
        )

    def list_runs(self, target: Target) -> list[RunInfo]:
        return list_dir_runs(Path(target.local_path()), lambda p: f"file://{p}")

    def open_run(self, target: Target) -> RunReader:
        path = Path(target.local_path())
        return DirReader(f"file://{path}", path)

    def materialize(self, result: ExportResult, dest: Path, *, overwrite: bool = False) -> None:
        materialize_dir(
            _run_dir(result.uri),
            result,
            dest,
            overwrite=overwrite,
            hint="materialize on a node that mounts the destination",
        )


@raysync.hookimpl
def raysync_register_backends(register: raysync.RegisterBackend) -> None:
    register(LocalCopyBackend())

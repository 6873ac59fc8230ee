"""The directory-run protocol, for every backend that commits a run as a directory (local-copy,
rsync to a mount, host-sync's sink).

- **Visibility.** The driver writes a token into the destination root (``.raysync-visible``);
  a worker that does not find that exact token is on a node that does not mount the driver's
  path, and refuses rather than writing to its own disk (DESIGN invariant 2).
- **Conflicts.** :func:`check_conflict` applies :func:`raysync.rules.decide` to a directory:
  a non-empty directory that holds no manifest is never written into or replaced.
- **Staging and commit.** Files are staged in a hidden sibling directory; the manifest is
  written last into it; :func:`commit_dir` renames it into place. Replacing a run renames the
  old one aside first and proves it is a run this call may replace before anything is
  deleted (DESIGN invariant 7).
- **Reuse.** :func:`link_reused` hard-links the unchanged files of the run being replaced into
  the staging directory and re-hashes each one: a file damaged at the destination is copied
  again, never committed under a digest it does not match (DESIGN invariant 8).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from raysync.backend import ExportRequest, RunInfo, RunReader
from raysync.copy import hash_entry, map_batched
from raysync.errors import (
    DestinationError,
    DestinationNotVisibleError,
    IntegrityError,
    MaterializeError,
    RaySyncError,
    RunExistsError,
)
from raysync.fsops import iter_files, remove_tree
from raysync.manifest import MANIFEST_NAME, FileEntry, Manifest, safe_join
from raysync.result import ExportResult, place_run, read_path_chunks
from raysync.rules import Decision, decide, may_replace, same_commit

TOKEN_NAME = ".raysync-visible"  # noqa: S105 - a file name, not a secret
STAGING_MARK = ".raysync-staging-"
OLD_MARK = ".raysync-old-"
SHARDS_MARK = ".raysync-shards-"  # a shard area (raysync.dirshards)


def read_committed(run_dir: Path, *, uri: str) -> Manifest | None:
    """The manifest of a committed run at ``run_dir``, or ``None`` when there is none."""
    try:
        data = (run_dir / MANIFEST_NAME).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Manifest.from_bytes(data, uri=uri)


def staging_dir(dest: Path, tag: str | None = None) -> Path:
    """A hidden staging directory next to ``dest`` (``tag`` names it; default: random)."""
    return dest.parent / f".{dest.name}{STAGING_MARK}{tag or uuid.uuid4().hex[:12]}"


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
            try:
                manifest = read_committed(here, uri=to_uri(here))
            except IntegrityError as e:  # one bad manifest never hides the good runs
                runs.append(RunInfo(uri=to_uri(here), status="damaged", reason=e.message))
                manifest = None
            if manifest is not None:
                runs.append(RunInfo.from_manifest(to_uri(here), manifest))
            dirnames.clear()
            continue
        for d in list(dirnames):
            if d.startswith(".") and SHARDS_MARK in d:
                from raysync.dirshards import incomplete

                name, shards = incomplete(here / d) or (d, None)
                if not (here / name / MANIFEST_NAME).exists():
                    runs.append(
                        RunInfo(uri=to_uri(here / name), status="incomplete", shards=shards)
                    )
                dirnames.remove(d)
            elif d.startswith(".") and STAGING_MARK in d:
                name = d[1:].split(STAGING_MARK, 1)[0]
                if not (here / name / MANIFEST_NAME).exists():
                    runs.append(RunInfo(uri=to_uri(here / name), status="incomplete"))
                dirnames.remove(d)
            elif d.startswith(".raysync") or (d.startswith(".") and OLD_MARK in d):
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
        if not token_file.exists():
            # Publish the token whole (write aside, then link): two drivers preparing one
            # root at once must both read the one token that won, never an empty file.
            draft = root / f"{TOKEN_NAME}.{secrets.token_hex(8)}.tmp"
            draft.write_text(secrets.token_hex(16))
            try:
                os.link(draft, token_file)
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links: exclusive create instead
                with contextlib.suppress(FileExistsError), open(token_file, "x") as f:
                    f.write(draft.read_text())
            finally:
                draft.unlink()
        token = token_file.read_text().strip()
    except OSError as e:
        raise DestinationError(
            f"cannot prepare the destination root {root}: {e}",
            uri=str(root),
            hint="check the path and its permissions",
        ) from e
    return {"root": str(root), "token": token}


def check_visible(prepared: Mapping[str, str], dest: Path, uri: str) -> None:
    """On the worker: refuse a destination whose root does not hold the driver's token, and a
    run that is not strictly inside that root (the root itself holds every sibling run)."""
    root = Path(prepared.get("root", ""))
    token = prepared.get("token")
    if not token or not _holds_token(os.path.join(root, TOKEN_NAME), token):
        raise DestinationNotVisibleError(
            f"the driver's destination root {root} is not visible on this node (its "
            "visibility token is missing or different), so exporting here would write to "
            "this node's own disk",
            uri=uri,
            hint="mount the same filesystem at the same path on every node, or use a "
            "backend that reaches the driver (return-by-value, an object store)",
        )
    check_inside(root, dest, uri)


#: Token files read and found right, by (path, token): their identity (device, inode, size,
#: modification and change times) and when they were read (monotonic seconds).
_SEEN_TOKENS: dict[tuple[str, str], tuple[tuple[int, ...], float]] = {}
#: A token file is read again at least this often (a network file system's attribute cache
#: may answer ``stat`` from memory; opening the file revalidates it).
TOKEN_TRUST_SECONDS = 5.0


def _holds_token(path: str, token: str) -> bool:
    """Whether the file at ``path`` holds ``token``. Read, then for a few seconds trusted by
    its identity (one ``stat`` per call): a different mount, a rewritten or a replaced file
    has another device, inode or change time (``utime`` cannot set the change time), and is
    read again."""
    try:
        st = os.stat(path)
        seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = _SEEN_TOKENS.get((path, token))
        now = time.monotonic()
        if known is not None and known[0] == seen and now - known[1] < TOKEN_TRUST_SECONDS:
            return True
        with open(path, encoding="utf-8") as f:
            found = f.read().strip()
    except (OSError, ValueError):
        return False
    if found != token:
        return False
    if len(_SEEN_TOKENS) > 1024:
        _SEEN_TOKENS.clear()
    _SEEN_TOKENS[(path, token)] = (seen, now)
    return True


def check_inside(root: Path, dest: Path, uri: str) -> None:
    """``dest`` must be strictly below ``root`` (both normalised). A root written with ``..``
    is refused: the token was proven through the file system (links followed), containment
    is decided on the names, and the two could differ."""
    normal = os.path.normpath(dest)
    top = os.path.normpath(root)
    if (
        normal == top
        or not normal.startswith(top if top.endswith("/") else top + "/")
        or ".." in os.fspath(root).split("/")
    ):
        raise DestinationError(
            f"{dest} is not a run inside the destination root {root}",
            uri=uri,
            hint="give each run its own name below the root, e.g. 'runs/{name}'",
        )


def check_conflict(dest: Path, *, run: Mapping[str, Any], conflict: str, uri: str) -> Decision:
    """The conflict decision (:func:`raysync.rules.decide`) for a directory destination.

    A committed run in any directory above ``dest`` (up to the filesystem root, as object
    stores check up to the bucket) refuses the export: a run is never nested in another. A
    committed run at ``dest`` holding files its manifest does not list is never replaced."""
    inside = None
    anc = os.path.dirname(os.path.normpath(os.path.abspath(dest)))
    while True:
        try:  # as Path.is_file: "no such file" is no, any other error is raised
            found = stat.S_ISREG(os.stat(os.path.join(anc, MANIFEST_NAME)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            found = False
        if found:
            inside = anc
            break
        up = os.path.dirname(anc)
        if up == anc:
            break
        anc = up
    existing = read_committed(dest, uri=uri)
    unlisted: list[str] = []
    if existing is not None:
        listed = {f.path for f in existing.files} | {MANIFEST_NAME}
        unlisted = [p for p in iter_files(dest) if p not in listed]
    occupied = False
    if existing is None:
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            with os.scandir(dest) as it:
                occupied = any(True for _ in it)
        elif st is not None:
            occupied = True  # a file or a symlink where the run would go
    return decide(
        existing=existing,
        occupied=occupied,
        run=run,
        conflict=conflict,
        uri=uri,
        inside=inside,
        unlisted=unlisted,
    )


def commit_dir(
    staging: Path,
    dest: Path,
    decision: Decision,
    *,
    run: Mapping[str, Any],
    conflict: str,
    uri: str,
) -> None:
    """Rename a complete staged run into place (the commit).

    A new run: ``rename`` onto a missing or empty directory is atomic, and fails onto a
    non-empty one, which is how a concurrent commit to the same run is detected. Replacing a
    run: the old one is renamed aside, then proven to be a run this call may replace (it may
    have changed since the decision), and only then deleted."""
    if not decision.replace:
        try:
            os.rename(staging, dest)
        except OSError as e:
            if os.path.lexists(dest):
                raise RunExistsError(
                    "another call committed this run first",
                    uri=uri,
                    hint="give each call its own output_uri (e.g. add {call_id})",
                ) from e
            raise
        return
    old = dest.parent / f".{dest.name}{OLD_MARK}{uuid.uuid4().hex[:12]}"
    try:
        os.rename(dest, old)
    except FileNotFoundError as e:
        raise RunExistsError(
            "another call is replacing this run at this moment",
            uri=uri,
            hint="give each call its own output_uri (e.g. add {call_id})",
        ) from e
    try:
        moved = read_committed(old, uri=uri)
    except RaySyncError:
        moved = None
    if moved is None or not may_replace(moved, run, conflict):
        os.rename(old, dest)  # not ours to replace: put it back untouched
        raise RunExistsError(
            "the run at the destination changed while this call exported, and is not one "
            "this call may replace",
            uri=uri,
            hint="give each call its own output_uri (e.g. add {call_id})",
        )
    try:
        os.rename(staging, dest)
    except OSError as e:
        raise DestinationError(
            f"could not move the new run into place ({e}); the run it replaces is kept at {old}",
            uri=uri,
            hint="move it back by hand if you need it",
        ) from e
    remove_tree(old)


def link_reused(
    pairs: Sequence[tuple[FileEntry, Path, str]], algorithm: str, *, threads: int | None = None
) -> set[str]:
    """Incremental export: hard-link each ``(entry, committed file, staged path)`` and re-hash
    the linked file; the manifest paths that were linked and match ``entry.digest``.

    A file that cannot be linked (not a regular file of the right size, no hard links on this
    file system) or whose bytes no longer match its digest (damaged at the destination) is not
    linked: the caller copies it like any other file."""

    def one(item: tuple[FileEntry, Path, str]) -> str | None:
        entry, committed, out = item
        try:
            st = committed.lstat()
            if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
                return None
            os.link(committed, out)
        except OSError:
            return None
        probe = FileEntry(entry.path, entry.size, entry.mode, source=out)
        try:
            hash_entry(probe, algorithm)
        except (OSError, RaySyncError):
            probe.digest = None
        if probe.digest != entry.digest:
            os.unlink(out)
            return None
        return entry.path

    got = map_batched(one, pairs, threads=threads, batch=16)
    return {path for path in got if path is not None}


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
    src: Path, result: ExportResult[Any], dest: Path, *, overwrite: bool, hint: str
) -> None:
    """Bring the run committed in directory ``src`` to ``dest``: it must be the run
    ``result`` describes (same call); files verified, all or nothing."""
    committed = read_committed(src, uri=result.uri)
    if committed is None:
        raise MaterializeError(f"no committed run at {src} on this machine", hint=hint)
    if not same_commit(committed.run, result.manifest.run):
        raise IntegrityError(
            "the run at this path was replaced by another call",
            uri=result.uri,
            bad=[MANIFEST_NAME],
        )
    if src.resolve() == dest.resolve():
        return
    place_run(
        dest,
        committed,
        lambda f: read_path_chunks(safe_join(src, f.path)),
        uri=result.uri,
        overwrite=overwrite,
    )

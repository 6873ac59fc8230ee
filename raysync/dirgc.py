"""Removing directory runs and what dead exports left (``raysync rm``, ``raysync gc``,
``keep_last``) for local-copy, rsync to a mount and host-sync.

- **Busy marks.** An export holds a shared ``flock`` on the directory it stages in
  (:func:`busy`) from its creation until its commit or its clean-up; the kernel drops it when
  the process dies. :func:`in_use` tries an exclusive lock: a staging directory whose export
  is alive is never a leftover, whatever its age.
- **Leftovers** (:func:`dir_leftovers`): staging directories (``.<run>.raysync-staging-*``)
  and shard areas (``.<run>.raysync-shards-*``) whose exports are gone, and runs set aside
  by a replacement that did not finish (``.<run>.raysync-old-*``) when the run that replaced
  them is in place. A set-aside run whose replacement is missing is the only copy of that run:
  it is listed as ``set-aside`` and never removed.
- **Deleting a run** (:func:`delete_dir_run`): the run directory is renamed aside first (a
  reader sees it whole or not at all), proven to be a raysync run that holds nothing its
  manifest does not list, then removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from raysync.backend import Leftover
from raysync.dirrun import OLD_MARK, SHARDS_MARK, STAGING_MARK, read_committed
from raysync.errors import ConfigError, DestinationError, RaySyncError, RunExistsError
from raysync.fsops import iter_files, remove_tree
from raysync.manifest import MANIFEST_NAME

_MARKS = {STAGING_MARK: "staging", SHARDS_MARK: "shard area", OLD_MARK: "set-aside run"}
#: Exactly the names raysync gives: ``.<run>.raysync-staging-<12 or 16 hex>``, ... A directory
#: that only looks like one (``.x.raysync-staging-mine``) is never a leftover.
_NAMES = re.compile(
    r"\.(?P<run>.+)(?P<mark>\.raysync-staging-|\.raysync-old-|\.raysync-shards-)"
    r"(?P<tag>[0-9a-f]{12}|[0-9a-f]{16})"
)
#: A leftover younger than this is never removed, whatever the grace asked: the moment
#: between a staging directory's creation and its busy mark (microseconds; a second is wide).
MIN_AGE = 1.0


@contextlib.contextmanager
def busy(path: Path) -> Iterator[None]:
    """Mark ``path`` (a directory this process stages in) as in use while the block runs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield  # nothing to mark (it is gone already): gc judges it by age alone
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def mark(path: Path) -> int:
    """:func:`busy` for a directory held across calls (a sink's session): the descriptor to
    :func:`os.close` when done (-1 when there is nothing to mark)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return -1
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def in_use(path: Path) -> bool:
    """True when a live export holds :func:`busy` on ``path`` (or on a directory in it, for
    a shard area)."""
    paths = [path]
    if SHARDS_MARK in path.name:
        with contextlib.suppress(OSError):
            paths += [p for p in path.iterdir() if p.name.startswith(".tmp-")]
        paths.append(path / ".lock")  # held while a shard is swapped in or the run committed
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
        finally:
            os.close(fd)
    return False


def _size_and_age(path: Path) -> tuple[int, float]:
    total, newest = 0, 0.0
    for dirpath, _dirs, files in os.walk(path):
        with contextlib.suppress(OSError):
            newest = max(newest, os.lstat(dirpath).st_mtime)
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                total += st.st_size
                newest = max(newest, st.st_mtime)
    return total, max(0.0, time.time() - newest)


def _kind(name: str) -> str | None:
    m = _NAMES.fullmatch(name)
    if m is None:
        return None
    kind = _MARKS[m["mark"]]
    if kind == "shard area" and len(m["tag"]) != 16:
        return None
    return kind


def _run_name(name: str) -> str:
    m = _NAMES.fullmatch(name)
    return m["run"] if m is not None else name


def check_root(root: Path, uri: str) -> None:
    """gc's prefix: an existing directory, not the file system's root."""
    if os.path.realpath(root) == "/" or not root.is_dir() or root.is_symlink():
        raise ConfigError(
            f"{root} is not a directory gc can clean (a directory of runs, not / or a file)",
            hint="give the directory that holds the runs, e.g. artifacts/runs",
        )


def dir_leftovers(root: Path, to_uri: Callable[[Path], str], *, depth: int = 8) -> list[Leftover]:
    """The leftovers of dead exports under ``root`` (not descending into runs, symbolic
    links or other file systems). Runs set aside by a replacement that died are never
    listed: one may be the only copy of its run (``raysync ls`` shows the run missing)."""
    out: list[Leftover] = []
    check_root(root, str(root))
    device = os.stat(root).st_dev
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if MANIFEST_NAME in filenames:
            dirnames.clear()
            continue
        for d in list(dirnames):
            path = here / d
            try:
                st = os.lstat(path)
            except OSError:
                dirnames.remove(d)
                continue
            if stat.S_ISLNK(st.st_mode) or st.st_dev != device:
                dirnames.remove(d)  # never followed, never another file system
                continue
            kind = _kind(d)
            if kind is None:
                if d.startswith(".raysync"):
                    dirnames.remove(d)
                continue
            dirnames.remove(d)
            if kind == "set-aside run" or in_use(path):
                continue
            size, age = _size_and_age(path)
            if age < MIN_AGE:
                continue
            run = here / _run_name(d)
            out.append(Leftover(uri=to_uri(run), kind=kind, bytes=size, age=age, ref=str(path)))
        if len(here.parts) - base >= depth:
            dirnames.clear()
    return sorted(out, key=lambda x: x.ref)


def delete_dir_leftover(leftover: Leftover) -> None:
    """Remove one leftover :func:`dir_leftovers` listed, checked again first."""
    path = Path(leftover.ref)
    kind = _kind(path.name)
    if kind is None or leftover.kind != kind or kind == "set-aside run" or path.is_symlink():
        raise DestinationError(f"{path} is not a leftover raysync removes", uri=leftover.uri)
    # Held exclusively while it goes: an export (a retry reusing the name) waits or fails.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return  # gone already
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise RunExistsError(
                "an export is using this staging directory again", uri=leftover.uri
            ) from e
        if kind == "shard area" and in_use(path):
            raise RunExistsError("a shard of this run is being written", uri=leftover.uri)
        remove_tree(path)
    finally:
        os.close(fd)


def delete_dir_run(path: Path, uri: str) -> int:
    """Delete the committed run at ``path``; the bytes freed."""
    if path.is_symlink():
        raise DestinationError(
            "this is a symbolic link to a run; raysync removes runs by their own path",
            uri=uri,
            hint="give the run's real path",
        )
    manifest = read_committed(path, uri=uri)
    if manifest is None:
        raise DestinationError(
            "there is no committed raysync run here; raysync deletes only its own runs",
            uri=uri,
            hint="raysync ls lists the runs under a path",
        )
    listed = {f.path for f in manifest.files} | {MANIFEST_NAME}
    unlisted = [p for p in iter_files(path) if p not in listed]
    parents = {"/".join(p.split("/")[:i]) for p in listed for i in range(1, p.count("/") + 1)}
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            rel = os.path.relpath(os.path.join(dirpath, d), path).replace(os.sep, "/")
            if rel not in parents:
                unlisted.append(rel + "/")  # a directory of its own (empty, or a link)
    if unlisted:
        raise RunExistsError(
            f"the run holds {unlisted[0]!r}"
            + (f" and {len(unlisted) - 1} more files" if len(unlisted) > 1 else "")
            + ", which its manifest does not list; raysync never deletes them",
            uri=uri,
            hint="move them out of the run, then remove it",
        )
    aside = path.parent / f".{path.name}{OLD_MARK}{uuid.uuid4().hex[:12]}"
    try:
        os.rename(path, aside)  # the run vanishes whole
    except OSError as e:
        raise DestinationError(f"cannot remove the run: {e}", uri=uri) from e
    moved = read_committed(aside, uri=uri)
    if moved is None or moved.run != manifest.run:
        os.rename(aside, path)  # replaced in between: not the run we proved ours
        raise RunExistsError("the run changed while it was being removed", uri=uri)
    try:
        remove_tree(aside)
    except (OSError, RaySyncError) as e:
        raise DestinationError(
            f"the run is gone, but {aside} could not be removed: {e}", uri=uri
        ) from e
    return manifest.total_bytes

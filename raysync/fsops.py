"""File system operations that hold for any tree a user can make: 1,000 levels deep, names
with any byte, symlinks where directories were.

``os.makedirs`` and (before Python 3.12) ``shutil.rmtree`` recurse once per level, so a deep
tree raises ``RecursionError``; these loops do not.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def makedirs(path: str | Path) -> None:
    """``os.makedirs(path, exist_ok=True)`` without recursion."""
    p = os.fspath(path)
    missing: list[str] = []
    while p and not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            if not os.path.isdir(d):
                raise


def remove_tree(path: str | Path) -> None:
    """Delete ``path`` and everything under it, never following a symlink (a link is removed,
    not what it points to); missing is fine; errors are ignored as ``rmtree`` would with
    ``ignore_errors``, so call it only on directories raysync made."""
    top = os.fspath(path)
    try:
        if not stat.S_ISDIR(os.lstat(top).st_mode):
            os.unlink(top)
            return
    except OSError:
        return
    # Depth-first without recursion: a directory is removed once it has been emptied.
    stack: list[tuple[str, bool]] = [(top, False)]
    while stack:
        d, emptied = stack.pop()
        if emptied:
            try:
                os.rmdir(d)
            except OSError:
                pass
            continue
        stack.append((d, True))
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                stack.append((e.path, False))
            else:
                try:
                    os.unlink(e.path)
                except OSError:
                    pass


def iter_files(root: str | Path, *, skip_dirs: frozenset[str] = frozenset()) -> Iterator[str]:
    """The relative ``/``-joined paths of everything under ``root`` that is not a directory,
    without recursion and without following symlinks; directories named in ``skip_dirs`` are
    not entered."""
    top = os.fspath(root)
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(top, rel) if rel else top) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            path = f"{rel}/{e.name}" if rel else e.name
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                if e.name not in skip_dirs:
                    stack.append(path)
            else:
                yield path


@contextmanager
def temporary_dir(prefix: str, dir: str | Path | None = None) -> Iterator[Path]:
    """``tempfile.TemporaryDirectory`` whose clean-up holds for a 1,000-deep tree."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    try:
        yield path
    finally:
        remove_tree(path)


class TemporaryDir:
    """A temporary directory removed by :meth:`cleanup`, or when garbage-collected."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self._finalizer = weakref.finalize(self, remove_tree, self.path)

    def cleanup(self) -> None:
        self._finalizer()


_FS_TYPES: dict[tuple[int, str], str] = {}


def fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (``""`` when unknown); remembered
    per device and directory (reading the mount table costs more than a small file's copy)."""
    try:
        key = (os.stat(path).st_dev, os.path.dirname(os.path.realpath(path)))
    except OSError:
        return _fs_type(path)
    found = _FS_TYPES.get(key)
    if found is None:
        found = _FS_TYPES[key] = _fs_type(path)
    return found


def _fs_type(path: Path) -> str:
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return ""
    best, kind = "", ""
    target = str(path.resolve())
    for fields in mounts:
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def write_replacing(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write ``path`` whole, atomically: ``data`` goes to a fresh file created exclusively
    beside it (never through a link someone put there), then is renamed over ``path`` (a
    link at ``path`` itself is replaced, not followed). ``mode`` is masked by the umask, as
    for any new file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask (read from /proc without changing it, where there is one)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old

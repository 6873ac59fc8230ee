"""The manifest: what a run holds, file by file, and how to scan trees into one.

The JSON schema is documented in ``docs/manifest.md``. The manifest is the commit marker:
backends write it last, and a run without one is incomplete.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysync import checksum as checksum_mod
from raysync.errors import ConfigError, IntegrityError, TreeError, UnsafePathError

FORMAT = "raysync.manifest"
VERSION = 2
#: Versions this raysync reads: version 1 recorded a ``sha256`` per file.
READS = (1, 2)
#: File name of the manifest at the root of every committed run.
MANIFEST_NAME = "raysync-manifest.json"


@dataclass
class FileEntry:
    """One exported file. ``digest`` is its checksum (the manifest's algorithm, hex);
    ``source`` is where it is on the worker and ``pack`` where a packed file lies inside an
    archive (``{"object": ..., "offset": ...}``); ``source`` is not serialised, and is a
    plain string when :func:`scan` made the entry (a Path per file costs more than copying
    a small file; ``open`` and ``os`` functions take either)."""

    path: str
    size: int
    mode: int
    digest: str | None = None
    source: str | Path | None = field(default=None, repr=False, compare=False)
    pack: dict[str, Any] | None = field(default=None, compare=False)
    #: The object store's tag of the committed object (S3's ETag) when the backend records
    #: one: a later incremental export trusts the object only while the store still shows it.
    etag: str | None = field(default=None, compare=False)
    #: (size, mtime_ns, ctime_ns, inode, device) of ``source`` when scanned (not serialised):
    #: an unchanged fingerprint lets a later export of the same call skip re-hashing it.
    fingerprint: tuple[int, ...] | None = field(default=None, repr=False, compare=False)
    #: In a run many calls wrote (``isolated_export(shard=...)``): the shard that wrote it.
    shard: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "size": self.size,
            "mode": self.mode,
            "digest": self.digest,
        }
        if self.pack is not None:
            out["pack"] = self.pack
        if self.etag is not None:
            out["etag"] = self.etag
        if self.shard is not None:
            out["shard"] = self.shard
        return out


def same_document(data: bytes, manifest: Manifest) -> bool:
    """Whether ``data`` (a manifest file found on disk) says what ``manifest`` says. The file's
    layout changed between versions (an older raysync indented it): compare what it says,
    never its bytes, or a run pulled again after an upgrade would look like another run."""
    try:
        return Manifest.from_bytes(data) == manifest
    except IntegrityError:
        return False


def _unpickle_manifest(
    cls: type[Manifest],
    files: list[tuple[Any, ...]],
    run: dict[str, Any],
    trees: list[str],
    checksum: str,
) -> Manifest:
    return cls([FileEntry(*f) for f in files], run, trees, checksum)


def _entry_json(e: FileEntry) -> str | None:
    """A plain entry's line, exactly as ``json.dumps(e.to_json(), sort_keys=True)`` writes it,
    built without the encoder's per-call set-up (a tenth of a small call's export); ``None``
    for an entry with optional fields or unusual types (the encoder writes those)."""
    if (
        e.pack is not None
        or e.etag is not None
        or e.shard is not None
        or type(e.size) is not int
        or type(e.mode) is not int
        or type(e.digest) is not str
        or type(e.path) is not str
    ):
        return None
    return (
        f'{{"digest": {_quote(e.digest)}, "mode": {int.__repr__(e.mode)}, '
        f'"path": {_quote(e.path)}, "size": {int.__repr__(e.size)}}}'
    )


_quote = json.encoder.encode_basestring_ascii


@dataclass
class Manifest:
    """A run's manifest: its files and metadata. ``run`` holds function, task id, status..."""

    files: list[FileEntry]
    run: dict[str, Any]
    trees: list[str]
    #: The algorithm of every ``digest`` (see :mod:`raysync.checksum`).
    checksum: str = checksum_mod.DEFAULT

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def status(self) -> str:
        return str(self.run.get("status", "unknown"))

    def to_json(self) -> dict[str, Any]:
        return {**self._head(), "files": [f.to_json() for f in self.files]}

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as tuples: every call's result carries its manifest through Ray, and
        cloudpickle visits each object of a dataclass tree in Python (30 µs for ten files,
        3 µs as tuples)."""
        files = [
            (f.path, f.size, f.mode, f.digest, f.source, f.pack, f.etag, f.fingerprint, f.shard)
            for f in self.files
        ]
        return (_unpickle_manifest, (type(self), files, self.run, self.trees, self.checksum))

    def _head(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "checksum": self.checksum,
            "run": self.run,
            "trees": self.trees,
            "totals": {"files": len(self.files), "bytes": self.total_bytes},
        }

    def to_bytes(self) -> bytes:
        missing = [f.path for f in self.files if f.digest is None]
        if missing:
            # A backend that forgot to hash would publish a manifest that cannot verify.
            raise IntegrityError("files were not hashed before commit", uri="-", bad=missing)
        # A line per key of the head and per file, every value through the C encoder (an
        # indented dump runs in pure Python: slower than a small file's copy).
        encode = json.JSONEncoder(sort_keys=True).encode
        head = "".join(f"\n {_quote(k)}: {encode(v)}," for k, v in sorted(self._head().items()))
        lines = ",\n  ".join(_entry_json(e) or encode(e.to_json()) for e in self.files)
        inner = f"[\n  {lines}\n ]" if self.files else "[]"
        return f'{{{head}\n "files": {inner}\n}}\n'.encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, uri: str = "-") -> Manifest:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise IntegrityError(f"manifest is not JSON ({e})", uri=uri, bad=[MANIFEST_NAME]) from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise IntegrityError("not a raysync manifest", uri=uri, bad=[MANIFEST_NAME])
        version = doc.get("version")
        if isinstance(version, bool) or version not in READS:
            raise IntegrityError(
                f"manifest version {version!r} is not supported by this raysync "
                f"(reads versions {', '.join(map(str, READS))}); upgrade raysync",
                uri=uri,
                bad=[MANIFEST_NAME],
            )
        # Version 1 recorded sha256 digests under the key "sha256".
        key = "sha256" if version == 1 else "digest"
        algorithm = "sha256" if version == 1 else doc.get("checksum")
        if algorithm not in checksum_mod.ALGORITHMS:
            raise _damaged(uri, f"checksum {algorithm!r} is not one of {checksum_mod.ALGORITHMS}")
        raw_files, run, trees = doc.get("files"), doc.get("run"), doc.get("trees")
        if not isinstance(raw_files, list):
            raise _damaged(uri, "'files' is not a list")
        if not isinstance(run, dict):
            raise _damaged(uri, "'run' is not an object")
        if not isinstance(trees, list) or not all(isinstance(t, str) for t in trees):
            raise _damaged(uri, "'trees' is not a list of names")
        files = [_entry(f, i, key, uri) for i, f in enumerate(raw_files)]
        _check_layout(files, uri)
        return cls(files=files, run=dict(run), trees=list(trees), checksum=str(algorithm))


def _damaged(uri: str, why: str) -> IntegrityError:
    return IntegrityError(f"the manifest is damaged: {why}", uri=uri, bad=[MANIFEST_NAME])


def _entry(f: Any, i: int, key: str, uri: str) -> FileEntry:
    """One ``files`` item of a manifest, every field checked: a damaged or hostile manifest is
    an :class:`IntegrityError` naming the field, never a ``KeyError`` or an overflow."""
    if not isinstance(f, dict):
        raise _damaged(uri, f"files[{i}] is not an object")
    path, size, mode, digest = f.get("path"), f.get("size"), f.get("mode"), f.get(key)
    if not isinstance(path, str):
        raise _damaged(uri, f"files[{i}].path is not a string")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63:
        raise _damaged(uri, f"files[{i}].size of {path!r} is not a file size: {size!r}")
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
        raise _damaged(uri, f"files[{i}].mode of {path!r} is not a file mode: {mode!r}")
    if not isinstance(digest, str) or not digest or not _HEX.issuperset(digest):
        raise _damaged(uri, f"files[{i}].{key} of {path!r} is not a hex digest")
    pack = f.get("pack")
    if pack is not None and not isinstance(pack, dict):
        raise _damaged(uri, f"files[{i}].pack of {path!r} is not an object")
    etag = f.get("etag")
    if etag is not None and not isinstance(etag, str):
        raise _damaged(uri, f"files[{i}].etag of {path!r} is not a string")
    shard = f.get("shard")
    if shard is not None and not isinstance(shard, str):
        raise _damaged(uri, f"files[{i}].shard of {path!r} is not a string")
    return FileEntry(
        path=check_relpath(path),
        size=size,
        mode=mode,
        digest=digest,
        pack=dict(pack) if pack is not None else None,
        etag=etag,
        shard=shard,
    )


_HEX = frozenset("0123456789abcdef")


def _check_layout(files: list[FileEntry], uri: str) -> None:
    """No path twice, and no path that is also a directory of another: such a manifest cannot
    be placed as files."""
    paths: set[str] = set()
    dirs: set[str] = set()
    for f in files:
        if f.path in paths:
            raise _damaged(uri, f"{f.path!r} is listed twice")
        paths.add(f.path)
        parts = f.path.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    both = paths & dirs
    if both:
        raise _damaged(uri, f"{sorted(both)[0]!r} is listed as a file and as a directory")


def check_relpath(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path; raise otherwise (zip-slip guard).

    Safe: not empty, not absolute, no ``.``/``..``/empty segment (so no ``//`` and no trailing
    ``/``), no backslash, no NUL — i.e. exactly its own normal form. String checks only: this
    runs once per file of every export."""
    if (
        not path
        or path[0] == "/"
        or "\\" in path
        or "\x00" in path
        or not _BAD_PARTS.isdisjoint(path.split("/"))
    ):
        raise UnsafePathError(
            "refusing a path that is absolute, empty or contains '..'",
            path=path,
            hint="manifest and payload paths must be plain relative POSIX paths",
        )
    return path


_BAD_PARTS = frozenset({"", ".", ".."})


def safe_join(root: Path, relpath: str) -> Path:
    """``root / relpath`` after checking the result cannot escape ``root``."""
    return Path(os.path.join(root, check_relpath(relpath)))


def check_tree_name(tree: str) -> str:
    """Validate a tree name given to the decorator (``"export"``, ``"artifacts/summaries"``)."""
    try:
        return check_relpath(tree.rstrip("/") if tree != "/" else "")
    except UnsafePathError as e:
        raise ConfigError(
            f"tree {tree!r} must be a relative path inside the workspace",
            hint="use names such as 'export', 'data' or 'artifacts'",
        ) from e


def _walk(root: str, base: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Yield (path, stat) for files under root, not following directory symlinks. Paths are
    strings joined with ``/`` onto ``root`` (cheaper than Path objects per file)."""
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            st = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                stack.append(e.path)
            elif stat.S_ISREG(st.st_mode):
                yield e.path, st
            elif stat.S_ISLNK(st.st_mode):
                yield e.path, _resolve_link(Path(e.path), base)
            else:
                raise TreeError(
                    f"{Path(e.path).relative_to(base).as_posix()!r} is not a regular file "
                    "(FIFO, socket or device); raysync exports regular files only",
                    hint="remove it from the output tree or write its contents to a file",
                )


def _resolve_link(link: Path, base: Path) -> os.stat_result:
    """A symlink is exported as the file it points to, if that stays inside the workspace."""
    rel = link.relative_to(base).as_posix()
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise UnsafePathError(
            "symlink is dangling or loops", path=rel, hint="remove the link or point it at a file"
        ) from e
    real_base = base.resolve()
    if not target.is_relative_to(real_base):
        raise UnsafePathError(
            f"symlink points outside the workspace (to {target})",
            path=rel,
            hint="copy the file into the tree instead of linking to it",
        )
    st = target.stat()
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(
            "symlink points to a directory or a special file; only links to files are exported",
            path=rel,
            hint="copy the directory into the tree instead of linking to it",
        )
    return st


def scan(workspace: Path, trees: Sequence[str]) -> list[FileEntry]:
    """Walk the output trees of a workspace into manifest entries (not yet hashed).

    A missing tree is simply empty. A tree that is a file is a :class:`TreeError`; symlinks
    escaping the workspace are an :class:`UnsafePathError`.
    """
    entries: list[FileEntry] = []
    base = os.fspath(workspace)
    cut = len(base) + (0 if base.endswith("/") else 1)
    for tree in trees:
        # Every component of the tree's path, not only the last: with trees=["a/b"] and "a"
        # a link to a directory elsewhere, the walk would export files outside the workspace.
        parts = tree.split("/")
        for i in range(1, len(parts)):
            head = workspace.joinpath(*parts[:i])
            if head.is_symlink():
                raise UnsafePathError(
                    f"output tree {tree!r} lies under a symbolic link ({'/'.join(parts[:i])!r}); "
                    "the files there may be outside the workspace",
                    path=tree,
                    hint="write the tree into a real directory of the workspace",
                )
        root = os.path.join(base, tree)
        try:  # one lstat: a missing tree is empty; a link or a file is refused
            kind = os.lstat(root).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISDIR(kind):
            raise TreeError(
                f"output tree {tree!r} is not a directory in {workspace}",
                hint=f"write files under {tree}/ rather than creating a file or link named {tree}",
            )
        for path, st in _walk(root, workspace):
            entries.append(
                FileEntry(
                    path=path[cut:],
                    size=st.st_size,
                    mode=st.st_mode & 0o777,  # never setuid, setgid or sticky
                    source=path,
                    fingerprint=(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev),
                )
            )
    return entries


def verify_files(manifest: Manifest, root: Path, *, uri: str) -> None:
    """Re-hash every file of ``manifest`` under ``root``; raise :class:`IntegrityError` naming
    the ones that are missing or differ."""
    bad: list[str] = []
    for f in manifest.files:
        p = safe_join(root, f.path)
        try:
            if p.stat().st_size != f.size or checksum_mod.of_file(p, manifest.checksum) != f.digest:
                bad.append(f.path)
        except FileNotFoundError:
            bad.append(f.path)
    if bad:
        raise IntegrityError("files do not match the manifest", uri=uri, bad=bad)


def tree_names(trees: Iterable[str]) -> list[str]:
    names = [check_tree_name(t) for t in trees]
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "/"):
                raise ConfigError(f"trees {a!r} and {b!r} overlap", hint="list each tree once")
    return names

"""What an rsync export does with files: the source dir of links, staging, hashing,
claims' owners, reading a run back."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from raysync import redaction, rules
from raysync.backend import ExportRequest, RunReader
from raysync.copy import hash_entry, map_batched, open_source
from raysync.dirrun import (
    DirReader,
)
from raysync.errors import (
    MaterializeError,
    TreeError,
)
from raysync.fsops import TemporaryDir, iter_files, makedirs, remove_tree
from raysync.manifest import FileEntry, Manifest, check_relpath
from raysync_builtins.rsync.command import (
    CLAIM_NAME,
    PARTIAL_DIR,
    Remote,
    Rsync,
    RsyncFailed,
)

log = redaction.logger("raysync.rsync")


@contextlib.contextmanager
def source_dir(files: list[FileEntry], near: Path) -> Iterator[Path]:
    """A private directory of symlinks to ``files`` at their manifest paths (sent with
    ``--copy-links``): exactly the manifest's files, and no name on rsync's command line.

    The paths were checked when the trees were scanned (relative, no ``..``), so plain string
    joins are safe here, and fast for tens of thousands of files."""
    root = tempfile.mkdtemp(prefix=".raysync-rsync-", dir=near)
    try:
        made = {root}
        for entry in files:
            assert entry.source is not None
            link = os.path.join(root, check_relpath(entry.path))
            parent = os.path.dirname(link)
            if parent not in made:
                makedirs(parent)
                made.add(parent)
            os.symlink(os.path.abspath(entry.source), link)
        yield Path(root)
    finally:
        remove_tree(root)


def _prune(staging: Path, keep: set[str]) -> None:
    """Remove files under ``staging`` whose paths are not in ``keep`` (rsync's partial dirs
    stay: a resumed transfer needs them)."""
    for path in list(iter_files(staging, skip_dirs=frozenset({PARTIAL_DIR}))):
        if path not in keep:
            os.remove(os.path.join(staging, path))


def _remove_partial_dirs(root: Path) -> None:
    """Remove every rsync partial dir under ``root`` (rsync keeps one per destination
    directory; a killed transfer leaves them): a committed run holds only its files."""
    stack = [os.fspath(root)]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                subdirs = [e.path for e in it if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for sub in subdirs:
            if os.path.basename(sub) == PARTIAL_DIR:
                remove_tree(sub)
            else:
                stack.append(sub)


def _rsync_internal(path: str) -> bool:
    """A path rsync itself keeps in a run directory (a partial dir, --delay-updates' temp
    dir): left by a killed transfer, it is not anyone's data."""
    return any(p in (PARTIAL_DIR, ".~tmp~") for p in path.split("/"))


def hash_entries(files: list[FileEntry], algorithm: str) -> None:
    """Set every entry's digest (read once, in parallel with rsync reading the same pages)."""
    for entry in files:
        hash_entry(entry, algorithm)


def _hash_staged(staging: Path, files: list[FileEntry], algorithm: str) -> None:
    """Set each entry's digest from its staged copy: the bytes that are committed. An entry
    whose digest was known (hashed by an earlier export of this call, or for reuse) must
    match it."""
    base = os.fspath(staging)

    def one(entry: FileEntry) -> None:
        probe = FileEntry(entry.path, entry.size, entry.mode, source=os.path.join(base, entry.path))
        hash_entry(probe, algorithm)  # also checks the size
        if entry.digest is not None and entry.digest != probe.digest:
            raise TreeError(
                f"{entry.path!r} changed while it was exported (its bytes differ from when "
                "it was hashed); nothing was committed",
                hint="make sure nothing still writes to the output trees when the call returns",
            )
        entry.digest = probe.digest

    map_batched(one, files)


def unchanged_since_scan(files: list[FileEntry]) -> None:
    """Every source still has the size, times and identity the scan saw: a file rewritten
    while rsync and the hashing read it is an error, not a commit."""
    for entry in files:
        if entry.fingerprint is None or entry.source is None:
            continue
        try:
            st = os.stat(entry.source)
            now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        except OSError:
            now = None
        if now != entry.fingerprint:
            raise TreeError(
                f"{entry.path!r} changed while it was exported; nothing was committed",
                hint="make sure nothing still writes to the output trees when the call returns",
            )


class _Contended(Exception):
    """Another call holds a claim on the run right now: withdraw, wait and look again."""


class _Hold(Exception):
    """Another call claimed at the same moment and will withdraw: keep the claim, look
    again."""


def _parents(path: str) -> list[str]:
    """``a/b/c`` → ``["a", "a/b"]``: the directories a manifest path implies."""
    parts = path.split("/")
    return ["/".join(parts[:n]) for n in range(1, len(parts))]


def _claim_owner(data: bytes | None) -> dict[str, Any] | None:
    """The call a claim names; a claim that cannot be read names no call (not ours)."""
    if data is None:
        return None
    try:
        owner = json.loads(data)
    except ValueError:
        return {"task_id": "unreadable claim"}
    return owner if isinstance(owner, dict) else {"task_id": "unreadable claim"}


def _staging_tag(run: Mapping[str, Any]) -> str:
    # Named after the call (session, job and task), so that a retried attempt resumes the
    # same staging directory, and a call on another cluster with the same task id does not.
    key = "\0".join(str(run.get(k)) for k in rules.IDENTITY_KEYS)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class _PulledReader(RunReader):
    """A remote run, copied to a temporary directory once, then read from there."""

    def __init__(self, uri: str, rsync: Rsync, remote: Remote) -> None:
        super().__init__(uri)
        self._tmp = TemporaryDir(prefix="raysync-read-")
        try:
            rsync.run_with_retries(["-a", "--", remote.url() + "/", f"{self._tmp.path}/"], "pull")
        except RsyncFailed as e:
            self._tmp.cleanup()
            if e.code == 23 and "No such file" in e.stderr:
                self._dir = None
                return
            raise MaterializeError(f"cannot read {uri}: {e}") from None
        self._dir = DirReader(uri, self._tmp.path)

    def manifest(self) -> Manifest | None:
        return None if self._dir is None else self._dir.manifest()

    def read(self, entry: FileEntry) -> Iterator[bytes]:
        assert self._dir is not None
        return self._dir.read(entry)

    def close(self) -> None:
        self._tmp.cleanup()


def transfer(
    request: ExportRequest,
    rsync: Rsync,
    dest: str,
    *,
    daemon: bool = False,
    files: list[FileEntry] | None = None,
    hash_sources: bool = True,
) -> None:
    """rsync ``files`` (default: all of the request's) to ``dest``; with ``hash_sources``,
    set their digests meanwhile (from a read of the sources in parallel with rsync's)."""
    files = request.files if files is None else files
    for entry in files:
        # Every source readable, and the file the scan saw, before rsync reads it: an
        # unreadable file is the tree's problem (TreeError), not the destination's.
        os.close(open_source(entry))
    args = [
        "-a",
        "--copy-links",  # the source dir holds symlinks to the workspace files
        # Never trust size + mtime: a retried call may write different bytes of the same
        # size within the same second. Files already there are delta-transferred.
        "--ignore-times",
        f"--partial-dir={PARTIAL_DIR}",
    ]
    if daemon:
        # The run is updated in place: remove what the new manifest does not list.
        args += [
            "--delete",
            "--delete-before",
            "--delay-updates",
            f"--filter=P /{CLAIM_NAME}-*",
        ]
    else:
        # Local copies default to --whole-file; without it a retried attempt resumes a
        # killed file from its partial copy instead of copying it again.
        args.append("--no-whole-file")
    errors: list[BaseException] = []

    def hash_all() -> None:
        try:
            hash_entries([e for e in files if e.digest is None], request.checksum)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)

    with source_dir(files, Path(request.workspace)) as src:
        hasher = threading.Thread(target=hash_all if hash_sources else lambda: None)
        hasher.start()
        try:
            rsync.run_with_retries([*args, "--", f"{src}/", dest], "data", record=True)
        finally:
            hasher.join()
    if errors:
        raise errors[0]

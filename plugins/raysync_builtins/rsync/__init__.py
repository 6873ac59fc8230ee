"""rsync backend: the real ``rsync`` binary, to a mounted path, an rsync daemon, or over ssh.

Targets (docs/backends.md):

- ``rsync:///mnt/nfs/runs/{run_id}`` — a path every node mounts (NFS, Lustre, SMB...). The
  driver writes a visibility token into the static root, as the local backend does; rsync
  transfers into a staging directory next to the run, which is renamed into place (the
  commit). A node without the mount is refused, never written to.
- ``rsync://[user@]host[:port]/module/path/{run_id}`` — an rsync daemon. There is no rename
  over the rsync protocol, so the commit is the manifest: data first (``--delay-updates``,
  ``--delete-before`` so an old manifest is gone before any data changes), then the
  manifest in a second transfer. A run without a manifest is incomplete.
- ``rsync+ssh://[user@]host[:port]/path/{run_id}`` — the same protocol over ssh.

rsync is always run from an argument list, never a shell. The files it sends are symlinks
in a private directory built from the manifest (sent with ``--copy-links``), so rsync's
arguments are only raysync's own paths: no file name ever reaches its command line, and the
set of files sent is exactly the manifest's. A killed transfer resumes on the next attempt:
the staging directory is named after the Ray task, and ``--partial-dir`` keeps partial files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import raysync
from raysync import dirshards, redaction
from raysync.backend import (
    Capabilities,
    ExportOutcome,
    ExportRequest,
    Leftover,
    Location,
    RunInfo,
    RunReader,
)
from raysync.copy import plan_reuse
from raysync.dirgc import busy, delete_dir_leftover, delete_dir_run, dir_leftovers
from raysync.dirrun import (
    DirReader,
    check_conflict,
    check_visible,
    commit_dir,
    link_reused,
    list_dir_runs,
    materialize_dir,
    prepare_root,
    staging_dir,
)
from raysync.errors import (
    ConfigError,
    DestinationError,
    ExportError,
    MaterializeError,
    RaySyncError,
)
from raysync.fsops import makedirs, remove_tree, temporary_dir
from raysync.manifest import MANIFEST_NAME, FileEntry, safe_join
from raysync.result import ExportResult
from raysync.target import Target, redact
from raysync_builtins.rsync.claims import RemoteRuns
from raysync_builtins.rsync.command import (
    CLAIM_NAME,
    INSTALL_HINT,
    PARTIAL_DIR,
    Options,
    Remote,
    Rsync,
    RsyncFailed,
)
from raysync_builtins.rsync.files import (
    _hash_staged,
    _prune,
    _PulledReader,
    _remove_partial_dirs,
    _staging_tag,
    transfer,
    unchanged_since_scan,
)

log = redaction.logger("raysync.rsync")

__all__ = [
    "CLAIM_NAME",
    "INSTALL_HINT",
    "PARTIAL_DIR",
    "Options",
    "Remote",
    "Rsync",
    "RsyncBackend",
    "RsyncFailed",
]


class RsyncBackend(RemoteRuns):
    """Exports with the rsync binary."""

    name = "rsync"
    schemes = ("rsync", "rsync+ssh")
    default = False
    capabilities = Capabilities(atomic_rename=True, read_back=True, needs_driver=True, shards=True)

    def check(self, target: Target) -> None:
        Options.parse(target.options)
        Remote.parse(target.uri.replace("{", "x").replace("}", "x"))

    def prepare(self, target: Target) -> Mapping[str, str]:
        remote = Remote.parse(target.uri.replace("{", "x").replace("}", "x"))
        if remote.mode != "mount":
            return {}
        return prepare_root(Path(target.root or "/"))

    # -- export ----------------------------------------------------------------------------
    def export(self, request: ExportRequest) -> ExportOutcome:
        opts = Options.parse(request.target.options)
        remote = Remote.parse(request.target.uri)
        uri = request.target.uri
        try:
            rsync = Rsync(opts, remote)
            reused: list[FileEntry] = []
            committed = True
            if request.shard is not None:
                committed = self._export_shard(request, rsync, remote, uri)
            elif remote.mode == "mount":
                reused = self._export_mount(request, rsync, remote, uri)
            else:
                self._export_remote(request, rsync, remote, uri)
        except RsyncFailed as e:
            raise self._error(e, request, uri) from None
        stats = rsync.stats.as_dict()
        stats["reused_files"] = len(reused)
        stats["reused_bytes"] = sum(e.size for e in reused)
        return ExportOutcome(
            uri=uri,
            payload=Location(uri, dict(request.target.options)),
            extra_stats=stats,
            committed=committed,
        )

    def check_shards(self, target: Target) -> None:
        """Shards are committed by a rename: only a mounted destination has one."""
        remote = Remote.parse(target.uri.replace("{", "x").replace("}", "x"))
        if remote.mode != "mount":
            raise ConfigError(
                "shards need a rename to commit the run, which an rsync daemon or ssh "
                "destination does not offer",
                hint="mount the destination (rsync:///path) or export shards to s3:// or host://",
            )

    def _export_shard(self, request: ExportRequest, rsync: Rsync, remote: Remote, uri: str) -> bool:
        """One shard of a run many calls write, staged with rsync (:mod:`raysync.dirshards`)."""
        assert request.shard is not None
        dest = Path(remote.path)
        check_visible(request.prepared, dest, uri)
        if not dirshards.check_dest(dest, request.manifest.run, uri, request.shard):
            return False  # a retry after the commit: its shard is in the run
        staged = dirshards.stage_dir(dest, request.shard)
        with busy(staged):
            try:
                transfer(request, rsync, str(staged) + "/", files=request.files, hash_sources=False)
                _remove_partial_dirs(staged)
                _hash_staged(staged, request.files, request.checksum)
                unchanged_since_scan(request.files)
            except BaseException:
                remove_tree(staged)
                raise
            return dirshards.commit_shard(staged, dest, request.manifest, request.shard, uri)

    def _error(self, e: RsyncFailed, request: ExportRequest, uri: str) -> RaySyncError:
        said = e.stderr.strip()
        if "[sender]" in said and ("Permission denied" in said or "failed to open" in said):
            hint = "a file of the output trees cannot be read by the worker's user; fix it"
        elif "read only" in said or "Read-only" in said or "Permission denied" in said:
            hint = "the destination is read-only or not writable by this user; check it"
        elif "Unknown module" in said:
            hint = "check the module name in the URI against the daemon's rsyncd.conf"
        elif e.code in (5, 10, 35) or "Connection refused" in said:
            hint = "check that the rsync daemon (or sshd) runs and is reachable from this node"
        elif "No space left" in said:
            hint = "the destination is full; free space and retry"
        else:
            hint = "see rsync's message above"
        return ExportError(
            f"rsync exited with code {e.code}"
            + (" (killed by a signal)" if e.code < 0 else "")
            + f": {said[-800:] or 'no message'}; nothing was committed",
            backend=self.name,
            uri=uri,
            workspace=str(request.workspace),
            hint=hint,
        )

    def _export_mount(
        self, request: ExportRequest, rsync: Rsync, remote: Remote, uri: str
    ) -> list[FileEntry]:
        """Stage with rsync next to the run, then rename; returns the files reused from the
        run being replaced (hard-linked into the staging directory and re-hashed, not sent).

        The digests are those of the staged copies, the bytes that are committed (DESIGN
        invariant 8); a file whose size or identity changed since the scan fails the export.
        """
        dest = Path(remote.path)
        run = request.manifest.run
        check_visible(request.prepared, dest, uri)
        decision = check_conflict(dest, run=run, conflict=request.conflict, uri=uri)
        reuse = plan_reuse(request.files, decision.previous, request.checksum)
        staging = staging_dir(dest, _staging_tag(run))
        try:
            makedirs(staging)
        except OSError as e:
            raise DestinationError(
                f"cannot create the staging directory next to the run: {e}",
                uri=uri,
                hint="check that the destination is mounted read-write on this node",
            ) from e
        with busy(staging):
            try:
                # A killed attempt of this call may have left files here (the staging dir is
                # named after the call): drop those the manifest does not list, keep the rest for
                # rsync to resume, and link the files the replaced run already holds.
                _prune(staging, {e.path for e in request.files})
                pairs = []
                for entry in request.files:
                    if entry.path in reuse:
                        out = safe_join(staging, entry.path)
                        makedirs(out.parent)
                        with contextlib.suppress(FileNotFoundError):
                            out.unlink()
                        pairs.append((entry, safe_join(dest, entry.path), str(out)))
                linked = link_reused(pairs, request.checksum)
                send = [e for e in request.files if e.path not in linked]
                transfer(request, rsync, str(staging) + "/", files=send, hash_sources=False)
                # rsync removes its emptied partial dirs; check anyway, then hash what was staged.
                _remove_partial_dirs(staging)
                _hash_staged(staging, send, request.checksum)
                unchanged_since_scan(send)
                (staging / MANIFEST_NAME).write_bytes(request.manifest.to_bytes())
                commit_dir(staging, dest, decision, run=run, conflict=request.conflict, uri=uri)
                return [e for e in request.files if e.path in linked]
            except BaseException:
                # A failure this process sees is final for this attempt: leave nothing on the
                # mount. (A worker killed mid-transfer cannot clean up; its Ray retry resumes
                # from the staging dir, which is named after the call.)
                remove_tree(staging)
                raise

    # -- read back ---------------------------------------------------------------------------
    def list_runs(self, target: Target) -> list[RunInfo]:
        remote = Remote.parse(target.uri)
        if remote.mode != "mount":
            raise ConfigError(
                "listing runs on an rsync daemon or over ssh is not supported yet",
                hint="list the destination's directory on the storage host, or use "
                "raysync verify/pull on one run",
            )
        return list_dir_runs(Path(remote.path), lambda p: f"rsync://{p}")

    def open_run(self, target: Target) -> RunReader:
        remote = Remote.parse(target.uri)
        if remote.mode == "mount":
            return DirReader(target.uri, Path(remote.path))
        return _PulledReader(target.uri, Rsync(Options.parse(target.options), remote), remote)

    def _mount(self, target: Target, what: str) -> Path:
        remote = Remote.parse(target.uri)
        if remote.mode != "mount":
            raise ConfigError(
                f"{what} on an rsync daemon or over ssh is not supported yet",
                hint="do it on the storage host, or mount the destination (rsync:///path)",
            )
        return Path(remote.path)

    def check_keep_last(self, target: Target) -> None:
        """keep_last deletes runs: only on a mount (refused at decoration otherwise)."""
        self._mount(target.with_uri(target.uri.replace("{", "x").replace("}", "x")), "keep_last")

    def delete_run(self, target: Target) -> int:
        path = self._mount(target, "removing runs")
        return delete_dir_run(path, f"rsync://{path}")

    def list_leftovers(self, target: Target) -> list[Leftover]:
        return dir_leftovers(self._mount(target, "cleaning up"), lambda p: f"rsync://{p}")

    def delete_leftover(self, target: Target, leftover: Leftover) -> None:
        delete_dir_leftover(leftover)

    def location(self, target: Target) -> str:
        """A mount's run directory, resolved; a remote's URI, redacted."""
        remote = Remote.parse(target.uri)
        if remote.mode == "mount":
            return "file://" + os.path.realpath(remote.path)
        return redact(target.uri)

    def resume_reader(self, target: Target, prepared: Mapping[str, str]) -> RunReader:
        """In the worker: a mount once the driver's visibility token proves it; a daemon or
        ssh remote is pulled to a temporary directory (the worker reaches it as it exports)."""
        remote = Remote.parse(target.uri)
        if remote.mode == "mount":
            check_visible(prepared, Path(remote.path), target.uri)
        return self.open_run(target)

    def materialize(
        self, result: ExportResult[Any], dest: Path, *, overwrite: bool = False
    ) -> None:
        loc = result.payload
        if not isinstance(loc, Location):
            raise MaterializeError("this result does not say where its run is stored")
        remote = Remote.parse(loc.uri)
        if remote.mode == "mount":
            self._materialize_from(Path(remote.path), result, dest, overwrite=overwrite)
            return
        rsync = Rsync(Options.parse(loc.options), remote)
        with temporary_dir("raysync-pull-", dir=dest.parent) as tmp:
            try:
                rsync.run_with_retries(["-a", "--", remote.url() + "/", f"{tmp}/"], "pull")
            except RsyncFailed as e:
                raise MaterializeError(f"cannot read {loc.uri} back: {e}") from None
            self._materialize_from(tmp, result, dest, overwrite=overwrite)

    @staticmethod
    def _materialize_from(
        src: Path, result: ExportResult[Any], dest: Path, *, overwrite: bool
    ) -> None:
        hint = "materialize on a node that mounts the destination"
        materialize_dir(src, result, dest, overwrite=overwrite, hint=hint)


@raysync.hookimpl
def raysync_register_backends(register: raysync.RegisterBackend) -> None:
    register(RsyncBackend())

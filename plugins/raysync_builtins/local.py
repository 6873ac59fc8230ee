"""local-copy backend: ``file://`` URIs and plain paths, committed by an atomic rename.

Relative paths resolve against the **driver's** cwd. The directory-run protocol (visibility
token, conflicts, staging, commit, verified reuse) is :mod:`raysync.dirrun`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import raysync
from raysync import dirshards
from raysync.backend import (
    Capabilities,
    ExportOutcome,
    ExportRequest,
    Leftover,
    RunInfo,
    RunReader,
)
from raysync.copy import copy_files, plan_reuse
from raysync.dirgc import busy, delete_dir_leftover, delete_dir_run, dir_leftovers
from raysync.dirrun import (
    DirReader,
    check_conflict,
    check_visible,
    commit_dir,
    destination_error,
    link_reused,
    list_dir_runs,
    materialize_dir,
    prepare_root,
    staging_dir,
)
from raysync.errors import ConfigError
from raysync.fsops import makedirs, remove_tree
from raysync.manifest import MANIFEST_NAME, FileEntry, check_relpath, safe_join
from raysync.result import ExportResult
from raysync.target import Target, split_scheme


def _run_dir(uri: str) -> Path:
    return Path(split_scheme(uri)[1])


class LocalCopyBackend:
    """Copies a call's trees to a directory the worker and the driver both see."""

    name = "local"
    schemes = ("file",)
    default = False
    capabilities = Capabilities(atomic_rename=True, read_back=True, needs_driver=True, shards=True)

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
        run = request.manifest.run
        check_visible(request.prepared, dest, uri)
        if request.shard is not None:
            return self._export_shard(request, dest, uri)
        decision = check_conflict(dest, run=run, conflict=request.conflict, uri=uri)
        # Incremental: files the run being replaced already holds are linked (and re-hashed),
        # not copied.
        reuse = plan_reuse(request.files, decision.previous, request.checksum)
        staging = staging_dir(dest)
        try:
            makedirs(dest.parent)
            staging.mkdir()
        except OSError as e:
            raise destination_error(e, dest.parent, request, uri) from e
        with busy(staging):
            try:
                # Plain string paths: this loop runs once per file (Path objects cost more here
                # than the copy of a small file).
                base = os.fspath(staging)
                made: set[str] = {base}
                outs: list[tuple[FileEntry, str]] = []
                for entry in request.files:
                    out = os.path.join(base, check_relpath(entry.path))
                    parent = os.path.dirname(out)
                    if parent not in made:
                        makedirs(parent)
                        made.add(parent)
                    outs.append((entry, out))
                linked = link_reused(
                    [(e, safe_join(dest, e.path), o) for e, o in outs if e.path in reuse],
                    request.checksum,
                )
                jobs: list[tuple[FileEntry, str | Path]] = [
                    (e, o) for e, o in outs if e.path not in linked
                ]
                copy_files(jobs, request.checksum, dest_fs=staging)
                # The manifest is written last: a directory holding one is a complete run.
                (staging / MANIFEST_NAME).write_bytes(request.manifest.to_bytes())
                commit_dir(staging, dest, decision, run=run, conflict=request.conflict, uri=uri)
            except OSError as e:
                remove_tree(staging)
                raise destination_error(e, dest.parent, request, uri) from e
            except BaseException:
                remove_tree(staging)
                raise
        reused = [e for e in request.files if e.path in linked]
        return ExportOutcome(
            uri=uri,
            extra_stats={"reused_files": len(reused), "reused_bytes": sum(e.size for e in reused)},
        )

    def _export_shard(self, request: ExportRequest, dest: Path, uri: str) -> ExportOutcome:
        """One shard of a run many calls write (:mod:`raysync.dirshards`)."""
        assert request.shard is not None
        if not dirshards.check_dest(dest, request.manifest.run, uri, request.shard):
            return ExportOutcome(uri=uri, committed=False)  # a retry after the commit
        try:
            staged = dirshards.stage_dir(dest, request.shard)
        except OSError as e:
            raise destination_error(e, dest.parent, request, uri) from e
        with busy(staged):
            try:
                jobs: list[tuple[FileEntry, str | Path]] = []
                for entry in request.files:
                    out = safe_join(staged, check_relpath(entry.path))
                    makedirs(out.parent)
                    jobs.append((entry, out))
                copy_files(jobs, request.checksum, dest_fs=staged)
            except BaseException as e:
                remove_tree(staged)
                if isinstance(e, OSError):
                    raise destination_error(e, dest.parent, request, uri) from e
                raise
            shard = request.shard
            committed = dirshards.commit_shard(staged, dest, request.manifest, shard, uri)
        return ExportOutcome(uri=uri, committed=committed)

    def list_runs(self, target: Target) -> list[RunInfo]:
        return list_dir_runs(Path(target.local_path()), lambda p: f"file://{p}")

    def open_run(self, target: Target) -> RunReader:
        path = Path(target.local_path())
        return DirReader(f"file://{path}", path)

    def delete_run(self, target: Target) -> int:
        path = Path(target.local_path())
        return delete_dir_run(path, f"file://{path}")

    def list_leftovers(self, target: Target) -> list[Leftover]:
        return dir_leftovers(Path(target.local_path()), lambda p: f"file://{p}")

    def delete_leftover(self, target: Target, leftover: Leftover) -> None:
        delete_dir_leftover(leftover)

    def location(self, target: Target) -> str:
        """The run's directory, resolved: two spellings of one directory are one run."""
        return "file://" + os.path.realpath(target.local_path())

    def resume_reader(self, target: Target, prepared: Mapping[str, str]) -> RunReader:
        """In the worker: the run, once the driver's visibility token proves the path."""
        path = Path(target.local_path())
        check_visible(prepared, path, f"file://{path}")
        return DirReader(f"file://{path}", path)

    def materialize(
        self, result: ExportResult[Any], dest: Path, *, overwrite: bool = False
    ) -> None:
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

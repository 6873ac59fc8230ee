"""One export into a directory run, whole: the directory-run protocol (:mod:`raysync.dirrun`)
and shards (:mod:`raysync.dirshards`) put together, for backends whose destination is a
directory the worker can write (local-copy; host-sync from a worker on the driver's
machine).

The worker proves the destination first (``dirrun.check_visible``), then calls
:func:`export_dir`: the conflict decision, the staging directory next to the run (marked busy
for ``raysync gc``), files copied and hashed (or linked from the run being replaced, re-hashed),
the manifest last, the rename that commits. A file system error is a
:class:`raysync.errors.DestinationError` naming the place (full, read-only, ...), and the
staging directory is removed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raysync import dirshards
from raysync.backend import ExportOutcome, ExportRequest
from raysync.copy import copy_files, plan_reuse
from raysync.dirgc import busy
from raysync.dirrun import (
    check_conflict,
    commit_dir,
    destination_error,
    link_reused,
    staging_dir,
)
from raysync.fsops import makedirs, remove_tree
from raysync.manifest import MANIFEST_NAME, FileEntry, check_relpath, safe_join


def export_dir(request: ExportRequest, dest: Path, uri: str, payload: Any = None) -> ExportOutcome:
    """Export ``request`` as the run at ``dest`` (or one shard of it); ``payload`` goes into
    the outcome (what ``materialize`` reads)."""
    if request.shard is not None:
        return _export_shard(request, dest, uri, payload)
    run = request.manifest.run
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
            outs = _targets(request, os.fspath(staging))
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
        payload=payload,
        extra_stats={"reused_files": len(reused), "reused_bytes": sum(e.size for e in reused)},
    )


def _targets(request: ExportRequest, base: str) -> list[tuple[FileEntry, str]]:
    """Where each file goes under ``base``, its directories made. Plain string paths: this
    loop runs once per file (Path objects cost more here than the copy of a small file)."""
    made: set[str] = {base}
    outs: list[tuple[FileEntry, str]] = []
    for entry in request.files:
        out = os.path.join(base, check_relpath(entry.path))
        parent = os.path.dirname(out)
        if parent not in made:
            makedirs(parent)
            made.add(parent)
        outs.append((entry, out))
    return outs


def _export_shard(request: ExportRequest, dest: Path, uri: str, payload: Any) -> ExportOutcome:
    """One shard of a run many calls write (:mod:`raysync.dirshards`)."""
    assert request.shard is not None
    if not dirshards.check_dest(dest, request.manifest.run, uri, request.shard):
        return ExportOutcome(uri=uri, payload=payload, committed=False)  # a retry after commit
    try:
        staged = dirshards.stage_dir(dest, request.shard)
    except OSError as e:
        raise destination_error(e, dest.parent, request, uri) from e
    with busy(staged):
        try:
            jobs: list[tuple[FileEntry, str | Path]] = list(_targets(request, os.fspath(staged)))
            copy_files(jobs, request.checksum, dest_fs=staged)
        except BaseException as e:
            remove_tree(staged)
            if isinstance(e, OSError):
                raise destination_error(e, dest.parent, request, uri) from e
            raise
        committed = dirshards.commit_shard(staged, dest, request.manifest, request.shard, uri)
    return ExportOutcome(uri=uri, payload=payload, committed=committed)

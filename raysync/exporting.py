"""One call's export, the way the core does it: the one implementation the decorator, the
conformance suite (:mod:`raysync.testing`) and the bench use.

On the driver, :func:`prepare` runs the backend's ``prepare`` hook (when it needs the driver);
in the worker, :func:`export_once` scans the trees (unless the files are given), builds the
manifest and hands the backend one :class:`~raysync.backend.ExportRequest`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from raysync import checksum as checksum_mod
from raysync.backend import Conflict, ExportOutcome, ExportRequest
from raysync.copy import KnownDigests
from raysync.hookspecs import ExportBackend
from raysync.manifest import FileEntry, Manifest, scan
from raysync.target import Target


def prepare(backend: ExportBackend, target: Target) -> dict[str, str]:
    """What the driver publishes for ``target``: the backend's ``prepare`` when it needs the
    driver, else nothing."""
    return dict(backend.prepare(target)) if backend.capabilities.needs_driver else {}


def export_once(
    backend: ExportBackend,
    target: Target,
    workspace: Path,
    run: dict[str, Any],
    *,
    trees: Sequence[str],
    conflict: str = "error",
    prepared: Mapping[str, str] | None = None,
    files: list[FileEntry] | None = None,
    checksum: str = checksum_mod.DEFAULT,
    known: KnownDigests | None = None,
) -> tuple[list[FileEntry], Manifest, ExportOutcome]:
    """Export the trees of ``workspace`` once to the rendered ``target``.

    :param run: the manifest's ``run`` record (the call's identity and facts).
    :param prepared: what :func:`prepare` returned on the driver (``{}`` when nothing).
    :param files: the entries to export; default, a fresh scan of ``trees``.
    :param known: digests an earlier export of this call computed: reused for files whose
        fingerprint has not changed (so an incremental export need not read them), and
        updated from this export.
    """
    began_ns = time.time_ns()
    if files is None:
        files = scan(workspace, list(trees))
    if known is not None:
        known.apply(files)
    manifest = Manifest(files=files, run=run, trees=list(trees), checksum=checksum)
    outcome = backend.export(
        ExportRequest(
            target=target,
            files=files,
            manifest=manifest,
            workspace=workspace,
            conflict=cast(Conflict, conflict),
            task_id=str(run.get("task_id", "")),
            prepared=dict(prepared or {}),
        )
    )
    if known is not None:
        known.remember(files, began_ns)
    return files, manifest, outcome

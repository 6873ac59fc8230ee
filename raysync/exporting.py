"""One call's export, the way the core does it: the one implementation the decorator, the
conformance suite (:mod:`raysync.testing`) and the bench use.

On the driver, :func:`prepare` runs the backend's ``prepare`` hook (when it needs the driver);
in the worker, :func:`export_once` scans the trees (unless the files are given), builds the
manifest and hands the backend one :class:`~raysync.backend.ExportRequest`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from raysync import checksum as checksum_mod
from raysync import metrics, rayshim
from raysync.backend import Conflict, ExportOutcome, ExportRequest, Shard
from raysync.copy import KnownDigests, reporting
from raysync.hookspecs import ExportBackend
from raysync.manifest import FileEntry, Manifest, scan
from raysync.target import Target, redact


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
    shard: Shard | None = None,
) -> tuple[list[FileEntry], Manifest, ExportOutcome]:
    """Export the trees of ``workspace`` once to the rendered ``target``.

    :param run: the manifest's ``run`` record (the call's identity and facts).
    :param prepared: what :func:`prepare` returned on the driver (``{}`` when nothing).
    :param files: the entries to export; default, a fresh scan of ``trees``.
    :param known: digests an earlier export of this call computed: reused for files whose
        fingerprint has not changed (so an incremental export need not read them), and
        updated from this export.
    :param shard: the call is this shard of the run (``capabilities.shards``).
    """
    began_ns = time.time_ns()
    if files is None:
        files = scan(workspace, list(trees))
    if known is not None:
        known.apply(files)
    manifest = Manifest(files=files, run=run, trees=list(trees), checksum=checksum)
    request = ExportRequest(
        target=target,
        files=files,
        manifest=manifest,
        workspace=workspace,
        conflict=cast(Conflict, conflict),
        task_id=str(run.get("task_id", "")),
        prepared=dict(prepared or {}),
        shard=shard,
    )
    status = str(run.get("status") or "succeeded")
    token = metrics.backend_var.set(backend.name)
    total = manifest.total_bytes
    metrics.in_flight(backend.name, total)
    t0 = time.perf_counter()
    try:
        with _progress_bar(total, target) as sink, reporting(sink):
            outcome = backend.export(request)
    except BaseException:
        metrics.failed(backend.name)
        raise
    finally:
        metrics.in_flight(backend.name, -total)
        metrics.backend_var.reset(token)
    metrics.exported(
        backend.name,
        "checkpoint" if status == "running" else status,
        len(files),
        total,
        time.perf_counter() - t0,
    )
    if known is not None:
        known.remember(files, began_ns)
    return files, manifest, outcome


#: Exports of at least this many bytes show a progress bar in the driver's terminal
#: (``RAYSYNC_PROGRESS_MIN_BYTES`` changes it; 0 turns it off).
PROGRESS_MIN_BYTES = 256 * 1024 * 1024


@contextlib.contextmanager
def _progress_bar(total: int, target: Target) -> Iterator[Callable[[int], None] | None]:
    """A bar for a long export in a Ray task or actor, drawn in the driver's terminal by
    Ray's ``tqdm_ray`` (it needs no tqdm); elsewhere, or for a small export, nothing."""
    try:
        threshold = int(os.environ.get("RAYSYNC_PROGRESS_MIN_BYTES", PROGRESS_MIN_BYTES))
    except ValueError:
        threshold = PROGRESS_MIN_BYTES
    bar = None
    if threshold > 0 and total >= threshold and not rayshim.is_driver():
        from ray.experimental import tqdm_ray

        bar = tqdm_ray.tqdm(desc=f"raysync export to {redact(target.uri)}", total=total, unit="B")
    try:
        yield bar.update if bar is not None else None
    finally:
        if bar is not None:
            bar.close()

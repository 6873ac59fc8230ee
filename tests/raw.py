"""Export through a backend's hooks directly, as the core does, with a request the core would
never build: to prove that each backend applies the run rules itself (defence in depth)."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raysync.backend import ExportOutcome
from raysync.exporting import export_once, prepare
from raysync.manifest import FileEntry
from raysync.registry import get_registry
from raysync.target import Target
from raysync.testing import conformance_run
from tests.destinations import Dest


def workspace(files: Mapping[str, bytes]) -> Path:
    ws = Path(tempfile.mkdtemp(prefix="raysync-raw-ws-"))
    for rel, data in files.items():
        p = ws / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return ws


def raw_export(
    dest: Dest,
    uri: str,
    files: Mapping[str, bytes] | None = None,
    *,
    conflict: str = "error",
    template: str | None = None,
    run: dict[str, Any] | None = None,
    entries: list[FileEntry] | None = None,
    ws: Path | None = None,
) -> ExportOutcome:
    """Prepare (driver, for ``template``: default, the parent of ``uri`` and a field) and
    export (worker) ``files`` to the rendered ``uri``."""
    target = Target.parse(uri, dest.options)
    target = Target(target.uri, target.scheme, target.options, os.getcwd())
    backend = get_registry().for_scheme(target.scheme)
    template = template or uri.rsplit("/", 1)[0] + "/{run}"
    root = Target(template, target.scheme, target.options, os.getcwd())
    if ws is None:
        ws = workspace(files or {})
    _, _, outcome = export_once(
        backend,
        target,
        ws,
        run or conformance_run(f"raw-{uuid.uuid4().hex[:8]}"),
        trees=["export", "data", "artifacts"],
        conflict=conflict,
        prepared=prepare(backend, root),
        files=entries,
    )
    return outcome

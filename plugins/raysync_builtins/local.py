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
from raysync.backend import (
    Capabilities,
    ExportOutcome,
    ExportRequest,
    Leftover,
    RunInfo,
    RunReader,
)
from raysync.direxport import export_dir
from raysync.dirgc import delete_dir_leftover, delete_dir_run, dir_leftovers
from raysync.dirrun import (
    DirReader,
    check_visible,
    list_dir_runs,
    materialize_dir,
    prepare_root,
)
from raysync.errors import ConfigError
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
        check_visible(request.prepared, dest, uri)
        return export_dir(request, dest, uri)

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

"""The contenders: raysync per backend through the core's own export path, and the tools a
user would otherwise run (cp, rsync, s3fs, boto3), with the S3 server the bench starts."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raysync.bench.measure import run_child
from raysync.copy import KnownDigests
from raysync.manifest import scan


def _export(
    root: Path,
    scheme: str,
    uri: str,
    options: dict[str, Any],
    *,
    prepare_uri: str | None = None,
    files: list[Any] | None = None,
    conflict: str = "error",
    task_id: str = "bench",
) -> list[Any]:
    """One call's export through the registry, as the core does it: the driver's
    ``prepare`` (cheap, repeated here) and the worker's ``export``."""
    from raysync.exporting import export_once, prepare
    from raysync.registry import get_registry
    from raysync.rules import run_record
    from raysync.target import Target

    backend = get_registry().for_scheme(scheme)
    files, _, _ = export_once(
        backend,
        Target(uri, scheme, options),
        root,
        run_record("raysync.bench", task_id),
        trees=["export"],
        conflict=conflict,
        prepared=prepare(backend, Target(prepare_uri or uri, scheme, options)),
        files=files,
    )
    return files


class DirBench:
    """Backends that write a directory (local-copy, rsync to a mount) against the tools a
    user would otherwise run: ``cp -a``, ``shutil.copytree``, fsspec ``put``, ``rsync -a``."""

    def __init__(self, base: Path, *, own: bool = True) -> None:
        self.rsync = shutil.which("rsync")
        self.cp = shutil.which("cp")
        self.base = Path(tempfile.mkdtemp(prefix="mount-", dir=base)) if own else base
        self.base.mkdir(parents=True, exist_ok=True)

    def dest(self) -> Path:
        return self.base / f"run-{uuid.uuid4().hex[:10]}"

    def clear(self) -> None:
        """Between timings: remove earlier copies (memory, when the mount is a tmpfs)."""
        for p in self.base.glob("run-*"):
            shutil.rmtree(p)

    def cp_a(self, root: Path) -> None:
        assert self.cp is not None
        run_child([self.cp, "-a", f"{root}/export", str(self.dest())])

    def copytree(self, root: Path) -> None:
        shutil.copytree(root / "export", self.dest())

    def fsspec_put(self, root: Path) -> None:
        import fsspec

        fsspec.filesystem("file").put(f"{root}/export", str(self.dest()), recursive=True)

    def rsync_a(self, root: Path) -> None:
        assert self.rsync is not None
        run_child([self.rsync, "-a", f"{root}/export/", str(self.dest())])

    def raysync_local(self, root: Path) -> None:
        _export(root, "file", str(self.dest()), {}, prepare_uri=f"{self.base}/{{run}}")

    def raysync_rsync(self, root: Path) -> None:
        _export(
            root, "rsync", f"rsync://{self.dest()}", {}, prepare_uri=f"rsync://{self.base}/{{run}}"
        )


class Reexport:
    """Re-exporting an unchanged tree, against exporting it in full."""

    def __init__(self, scheme: str, new_uri: Callable[[], str], options: dict[str, Any]) -> None:
        self.scheme, self.new_uri, self.options = scheme, new_uri, options
        self.same_call_uri = self.retry_uri = ""
        self.known = KnownDigests()

    def setup(self, root: Path) -> None:
        """Commit the tree once to each re-export destination (not timed)."""
        self.same_call_uri, self.retry_uri = self.new_uri(), self.new_uri()
        began = time.time_ns() + KnownDigests.RACY_NS * 2  # the tree is older than this
        files = _export(root, self.scheme, self.same_call_uri, self.options)
        self.known.remember(files, began)
        _export(root, self.scheme, self.retry_uri, self.options)

    def full(self, root: Path) -> None:
        _export(root, self.scheme, self.new_uri(), self.options)

    def same_call(self, root: Path) -> None:
        files = scan(root, ["export"])
        self.known.apply(files)
        _export(
            root, self.scheme, self.same_call_uri, self.options, files=files, conflict="overwrite"
        )

    def retried_task(self, root: Path) -> None:
        _export(root, self.scheme, self.retry_uri, self.options, conflict="overwrite")


# -- running -------------------------------------------------------------------------------

"""Every backend's destination, seen the same way by the data-safety tests.

A :class:`Dest` knows, for one backend, the ``output_uri`` of a run under a fresh root, its
storage_options, and how to plant and read files at that root *behind raysync's back* (on
disk for local, rsync and host; with boto3 or fsspec for the object stores), so a test can
put a user's data where raysync must not touch it and check afterwards that it is intact.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import s3_options

#: Every backend with a destination, as the ``dest`` fixture's params.
BACKENDS = ["local", "memory", "s3", "rsync-mount", "rsync-daemon", "rsync-ssh", "host"]
#: The directory-run backends (a run is a directory committed by rename).
DIR_BACKENDS = ["local", "rsync-mount", "host"]
#: The backends where the rsync protocol is the commit (no rename).
REMOTE_RSYNC = ["rsync-daemon", "rsync-ssh"]


@dataclass
class Dest:
    """One backend's destination root: ``uri(tail)`` is an output_uri below it."""

    backend: str
    prefix: str  # the root as a URI (no trailing slash)
    options: dict[str, Any] | None = None
    disk: Path | None = None  # the root on this machine's disk, when there is one
    fs: Any = field(default=None, repr=False)  # fsspec file system (object stores)
    fs_root: str = ""  # the root as an fsspec path

    def uri(self, tail: str) -> str:
        return f"{self.prefix}/{tail}"

    def plant(self, rel: str, data: bytes) -> None:
        """Write a file at ``root/rel`` directly, as someone else would."""
        if self.disk is not None:
            p = self.disk / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        else:
            self.fs.pipe_file(f"{self.fs_root}/{rel}", data)

    def read(self, rel: str) -> bytes | None:
        """The bytes at ``root/rel``, or ``None`` when there is no such file."""
        if self.disk is not None:
            p = self.disk / rel
            return p.read_bytes() if p.is_file() else None
        try:
            self.fs.invalidate_cache()
            return bytes(self.fs.cat_file(f"{self.fs_root}/{rel}"))
        except FileNotFoundError:
            return None

    def files(self, rel: str = "") -> dict[str, bytes]:
        """Every file under ``root/rel`` (relative to it) with its bytes."""
        if self.disk is not None:
            base = self.disk / rel
            return {
                p.relative_to(base).as_posix(): p.read_bytes()
                for p in sorted(base.rglob("*"))
                if p.is_file() and not p.is_symlink()
            }
        base = f"{self.fs_root}/{rel}".rstrip("/")
        self.fs.invalidate_cache()
        try:
            keys = self.fs.find(base)
        except FileNotFoundError:
            return {}
        return {k[len(base) + 1 :]: bytes(self.fs.cat_file(k)) for k in keys}

    def run_uri(self, rel: str) -> str:
        """The URI the CLI reads a run at ``root/rel`` by."""
        if self.backend in ("local",):
            assert self.disk is not None
            return str(self.disk / rel)
        if self.backend == "host":
            assert self.disk is not None
            return f"host://{self.disk / rel}"
        return f"{self.prefix}/{rel}"

    def verify(self, rel: str) -> int:
        """``raysync verify`` on the run at ``root/rel``: 0 when every file matches."""
        from raysync.cli import main

        argv = ["verify", self.run_uri(rel)]
        if self.options:
            import json

            argv += ["--storage-options", json.dumps(self.options)]
        return main(argv)


def make_dest(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Dest:
    """The destination for ``backend`` under a fresh root (starts what it needs)."""
    root = tmp_path / f"dest-{uuid.uuid4().hex[:6]}"
    if backend == "local":
        root.mkdir()
        return Dest(backend, str(root), disk=root)
    if backend == "host":
        request.getfixturevalue("ray_wd")
        root.mkdir()
        return Dest(backend, f"host://{root}", disk=root)
    if backend == "rsync-mount":
        root.mkdir()
        return Dest(backend, f"rsync://{root}", {"retries": 0}, disk=root)
    if backend == "rsync-daemon":
        daemon = request.getfixturevalue("rsync_daemon")
        name = root.name
        disk = daemon.root / "runs" / name
        disk.mkdir()
        return Dest(backend, f"{daemon.url}/runs/{name}", {"retries": 0}, disk=disk)
    if backend == "rsync-ssh":
        sshd = request.getfixturevalue("sshd")
        root.mkdir()
        return Dest(
            backend,
            f"rsync+ssh://{sshd.user}@127.0.0.1:{sshd.port}{root}",
            {"ssh_command": sshd.ssh_command, "retries": 0},
            disk=root,
        )
    if backend == "memory":
        import fsspec

        fs = fsspec.filesystem("memory")
        name = f"safety-{uuid.uuid4().hex[:8]}"
        return Dest(backend, f"memory://{name}", fs=fs, fs_root=f"/{name}")
    if backend == "s3":
        import s3fs

        endpoint = request.getfixturevalue("moto_endpoint")
        bucket = request.getfixturevalue("bucket")
        opts = s3_options(endpoint, upload_retries=1, upload_retry_base_delay=0.01)
        fs = s3fs.S3FileSystem(
            key=opts["key"],
            secret=opts["secret"],
            client_kwargs=opts["client_kwargs"],
            skip_instance_cache=True,
        )
        return Dest(backend, f"s3://{bucket}", opts, fs=fs, fs_root=bucket)
    raise AssertionError(backend)

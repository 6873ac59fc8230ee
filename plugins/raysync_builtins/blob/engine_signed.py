"""The signed engine (``credentials="driver"``): object calls from a worker that holds no
credentials. Data objects go straight to the store over presigned URLs (one PUT each, or the
parts of a multipart upload); everything else (listings, deletes, the lock and the manifest)
is asked of the driver's signer (:mod:`raysync_builtins.blob.signer`).

A URL is used until shortly before it expires; a store that answers 403 "expired" gets the
request again with a freshly signed URL (a transient error to the retry policy)."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from raysync.manifest import FileEntry
from raysync_builtins.blob.signer import CONTROL, SignerClient
from raysync_builtins.blob.store import (
    ByteBudget,
    Options,
    is_transient,
    part_size_for,
    send_in_parts,
    with_retries,
)


class StoreRefused(OSError):
    """The store answered a presigned request with an error status."""

    def __init__(self, status: int, method: str, body: bytes) -> None:
        text = body.decode("utf-8", "replace")
        code = text.split("<Code>", 1)[1].split("</Code>", 1)[0] if "<Code>" in text else ""
        super().__init__(f"the store answered {method} with HTTP {status} {code}".rstrip())
        self.status, self.code = status, code
        # A URL past its expiry (403 "Request has expired"), or signed with temporary
        # credentials that have expired since (400/403 ExpiredToken): signed again.
        self.expired = status in (400, 403) and (
            code == "ExpiredToken" or "expired" in text.lower()
        )


_POOLS: dict[Any, Any] = {}


def _pool(verify: bool | str = True) -> Any:
    """One connection pool per process and TLS setting (thread-safe): connections outlive
    one export. ``verify``: check the store's certificate (``False``: do not; a path: with
    that CA bundle), as ``client_kwargs={"verify": ...}`` says for the driver's client."""
    pool = _POOLS.get(verify)
    if pool is None:
        import urllib3

        tls: dict[str, Any] = {}
        if verify is False:
            tls["cert_reqs"] = "CERT_NONE"
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        elif isinstance(verify, str):
            tls["ca_certs"] = verify
        pool = _POOLS[verify] = urllib3.PoolManager(
            maxsize=32, retries=False, timeout=urllib3.Timeout(30, 300), **tls
        )
    return pool


class SignedEngine:
    """Object calls over presigned URLs and the driver's signer."""

    name = "signed"

    def __init__(self, tid: str, opts: Options, verify: bool | str = True) -> None:
        self.client = SignerClient(tid)
        self.opts = opts
        self.http = _pool(verify)
        self._urls: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()
        # A URL is used while more than this much of its life is left.
        self._margin = min(60.0, opts.upload_url_seconds / 4)

    # -- URLs ----------------------------------------------------------------------------
    def sign_ahead(self, method: str, paths: list[str]) -> None:
        """Sign URLs for many objects in one call to the signer (before they are sent)."""
        for i in range(0, len(paths), 1000):
            batch = paths[i : i + 1000]
            got = self.client.call("presign", method, batch)
            until = time.monotonic() + self.opts.upload_url_seconds - self._margin
            with self._lock:
                for p, url in got.items():
                    self._urls[(method, p)] = (url, until)

    def _url(self, method: str, path: str) -> str:
        with self._lock:
            found = self._urls.get((method, path))
        if found is None or found[1] <= time.monotonic():
            self.sign_ahead(method, [path])
            with self._lock:
                found = self._urls[(method, path)]
        return found[0]

    def _forget(self, method: str, path: str) -> None:
        with self._lock:
            self._urls.pop((method, path), None)

    def _send(self, method: str, url: str, body: Any = None, stream: bool = False) -> Any:
        resp = self.http.request(method, url, body=body, preload_content=not stream)
        if resp.status >= 300:
            data = resp.data
            resp.release_conn()
            raise StoreRefused(resp.status, method, data)
        return resp

    def _presigned(self, method: str, path: str, body: Any = None, stream: bool = False) -> Any:
        url = self._url(method, path)
        try:
            return self._send(method, url, body, stream)
        except StoreRefused as e:
            if e.expired:
                self._forget(method, path)  # a retry signs the request again
            raise

    # -- the Engine protocol -------------------------------------------------------------
    def literal_problem(self, path: str) -> str | None:
        _, _, key = path.partition("/")
        if any(ord(c) < 32 or ord(c) == 127 for c in key):
            return "a control character"
        if len(key.encode("utf-8", "surrogateescape")) > 1024:
            return "longer than S3's 1,024 bytes"
        return None

    def put(self, path: str, data: bytes | bytearray | memoryview, *, create: bool) -> str | None:
        if path.rsplit("/", 1)[-1] in CONTROL:
            got: str | None = self.client.call("put_control", path, bytes(data), create)
            return got
        resp = self._presigned("PUT", path, bytes(data))
        return _etag(resp)

    def get(self, path: str) -> bytes:
        if path.rsplit("/", 1)[-1] in CONTROL:
            try:
                data: bytes = self.client.call("get", path)
            except Exception as e:
                if _missing(e):
                    raise FileNotFoundError(path) from None
                raise
            return data
        try:
            return bytes(self._presigned("GET", path).data)
        except StoreRefused as e:
            if e.status == 404:
                raise FileNotFoundError(path) from None
            raise

    def get_many(self, paths: list[str]) -> dict[str, bytes]:
        data = [p for p in paths if p.rsplit("/", 1)[-1] not in CONTROL]
        if data:
            self.sign_ahead("GET", data)
        with ThreadPoolExecutor(max_workers=16, thread_name_prefix="raysync-get") as pool:
            return dict(zip(paths, pool.map(self.get, paths), strict=True))

    def exists(self, path: str) -> bool:
        return path in self.listing(path)

    def listing(self, prefix: str) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = self.client.call("listing", prefix.rstrip("/"))
        return found

    def delete(self, paths: Iterable[str]) -> None:
        todo = list(paths)
        if todo:
            self.client.call("delete", todo)

    def read_chunks(self, path: str, block_size: int) -> Iterator[bytes]:
        try:
            resp = self._presigned("GET", path, stream=True)
        except StoreRefused as e:
            if e.status == 404:
                raise FileNotFoundError(path) from None
            raise
        try:
            yield from resp.stream(block_size)
        finally:
            resp.release_conn()

    def is_transient(self, e: BaseException) -> bool:
        if isinstance(e, StoreRefused):
            # 403 "expired": signed again on the retry; 5xx and throttling: try again.
            return e.status >= 500 or e.status == 429 or e.expired
        name = type(e).__name__
        if name in ("RayActorError", "ActorDiedError", "ActorUnavailableError"):
            return False  # the driver's signer is gone (the driver ended): no retry helps
        if name == "SSLError" or isinstance(getattr(e, "reason", None), ssl.SSLError):
            return False  # a certificate the worker does not trust: sending again won't help
        if name in ("MaxRetryError", "ProtocolError", "NewConnectionError", "ReadTimeoutError"):
            return True
        return is_transient(e)

    def upload_file(
        self, path: str, entry: FileEntry, algorithm: str, opts: Options, budget: ByteBudget
    ) -> str | None:
        """A multipart upload the signer starts and completes; the parts go over presigned
        URLs, several in flight within ``budget``, each hashed as it is read."""
        upload_id: str = with_retries(
            f"starting the upload of {entry.path}",
            lambda: self.client.call("start_multipart", path),
            opts,
            self.is_transient,
        )
        part_size = part_size_for(entry.size, opts)
        count = max(1, -(-entry.size // part_size))
        urls: dict[int, tuple[str, float]] = {}
        guard = threading.Lock()
        life = opts.upload_url_seconds - self._margin

        def part_url(n: int, fresh: bool = False) -> str:
            with guard:  # the part threads share the URLs; a stale one is signed again
                found = urls.get(n)
                if fresh or found is None or found[1] <= time.monotonic():
                    batch = list(range(n, min(count, n + 99) + 1))
                    got = self.client.call("presign_parts", path, upload_id, batch)
                    until = time.monotonic() + life
                    urls.update({int(k): (v, until) for k, v in got.items()})
                    found = urls[n]
                return found[0]

        def send(number: int, body: bytes) -> dict[str, Any]:
            fresh = [False]

            def once() -> Any:
                url = part_url(number, fresh[0])
                try:
                    return self._send("PUT", url, body)
                except StoreRefused as e:
                    fresh[0] = e.expired
                    raise

            what = f"uploading part {number} of {entry.path}"
            resp = with_retries(what, once, opts, self.is_transient)
            return {"PartNumber": number, "ETag": resp.headers.get("ETag", "")}

        def complete(done: list[dict[str, Any]]) -> str | None:
            etag: str | None = with_retries(
                f"completing the upload of {entry.path}",
                lambda: self.client.call("finish_multipart", path, upload_id, done),
                opts,
                self.is_transient,
            )
            return etag

        return send_in_parts(
            entry,
            algorithm,
            opts,
            budget,
            part_size,
            send,
            complete,
            lambda: self.client.call("finish_multipart", path, upload_id, None),
        )


def _etag(resp: Any) -> str | None:
    tag = resp.headers.get("ETag")
    return str(tag).strip('"') if tag else None


def _missing(e: BaseException) -> bool:
    cause = getattr(e, "cause", None) or e.__cause__
    return isinstance(e, FileNotFoundError) or isinstance(cause, FileNotFoundError)

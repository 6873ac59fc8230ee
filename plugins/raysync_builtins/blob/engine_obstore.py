"""The obstore engine: object calls through obstore (Rust's ``object_store``), for ``s3://``.

Requests run on obstore's own Tokio runtime with the GIL released, so many uploads are in
flight at once with little Python work each; a large file is one multipart upload fed by a
generator that reads and hashes it once. obstore keeps every key literal (no globs, no
versions) and refuses control characters; its client retries 5xx answers, throttling and
dropped connections per request (and per part), with backoff and jitter, as many times as
``upload_retries`` says; when those run out, raysync's retry policy (the fsspec engine's)
applies on top, logging each retry.

The s3fs-style storage_options mean the same here (:func:`s3_config`); options this engine does
not understand make ``engine="auto"`` use fsspec instead (and ``engine="obstore"`` fail).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from raysync.copy import hashed_source
from raysync.errors import ConfigError, TreeError
from raysync.manifest import FileEntry
from raysync_builtins.blob.store import ByteBudget, Options, etag_of, part_size_for, with_retries

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config

#: fsspec options about fsspec's own caches: no meaning for obstore, safely ignored.
_IGNORED = frozenset(
    {
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
        "default_block_size",
        "default_fill_cache",
        "default_cache_type",
        "cache_regions",
        "asynchronous",
        "loop",
    }
)
_CREDENTIALS = {
    "key": "access_key_id",
    "aws_access_key_id": "access_key_id",
    "secret": "secret_access_key",
    "aws_secret_access_key": "secret_access_key",
    "token": "session_token",
    "aws_session_token": "session_token",
}
_CLIENT_KWARGS = {"endpoint_url", "region_name", "verify", "aws_access_key_id"}


#: What a retryable failure says: a 5xx answer, throttling, a timeout, a dropped connection.
_TRANSIENT = re.compile(
    r"status code: 5\d\d|SlowDown|timed out|timeout|error sending request|connection",
    re.IGNORECASE,
)
_CLIENT_ERROR = re.compile(r"status code: 4\d\d")
_CONTROL = re.compile("[\x00-\x1f\x7f]")


class Unsupported(Exception):
    """storage_options this engine cannot honour (``engine="auto"`` then uses fsspec)."""


def s3_config(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """s3fs-style storage_options → (S3Store config, client options, credential provider).

    ``key``/``secret``/``token``, ``anon``, ``endpoint_url``, ``profile`` and
    ``client_kwargs={"endpoint_url", "region_name", "verify"}`` mean what they mean to s3fs;
    the AWS environment variables are read as boto3 reads them. Anything else raises
    :class:`Unsupported`."""
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    provider = None
    for k, v in options.items():
        if k in _IGNORED:
            continue
        if k in _CREDENTIALS:
            if v is not None:
                config[_CREDENTIALS[k]] = str(v)
        elif k == "anon":
            if v:
                config["skip_signature"] = True
        elif k == "endpoint_url":
            config["endpoint"] = str(v)
        elif k == "profile":
            provider = _profile_provider(str(v))
        elif k == "client_kwargs" and isinstance(v, Mapping):
            unknown = sorted(set(v) - _CLIENT_KWARGS)
            if unknown:
                raise Unsupported(f"client_kwargs {unknown}")
            if v.get("endpoint_url"):
                config["endpoint"] = str(v["endpoint_url"])
            if v.get("region_name"):
                config["region"] = str(v["region_name"])
            if v.get("aws_access_key_id"):
                config["access_key_id"] = str(v["aws_access_key_id"])
            verify = v.get("verify", True)
            if verify is False:
                client["allow_invalid_certificates"] = True
            elif isinstance(verify, str):
                client["root_certificate"] = _pem(verify)
        else:
            raise Unsupported(f"storage_options[{k!r}]")
    endpoint = config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3") or ""
    if endpoint.startswith("http://"):
        client["allow_http"] = True
    if endpoint:
        # A custom endpoint (MinIO, moto, rclone, R2...) serves buckets by path.
        config.setdefault("virtual_hosted_style_request", False)
    elif not (
        config.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    ):
        # s3fs finds a bucket's region by itself; object_store does not (a wrong region is
        # a redirect error), so without one the fsspec engine is the safe choice.
        raise Unsupported("no region (set client_kwargs={'region_name': ...} or AWS_REGION)")
    bundle = os.environ.get("AWS_CA_BUNDLE")
    if bundle and "root_certificate" not in client and not client.get("allow_invalid_certificates"):
        client["root_certificate"] = _pem(bundle)
    return config, client, provider


def _pem(path: str) -> bytes:
    """A CA bundle's certificates (botocore takes a path; obstore takes the PEM text)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the CA bundle {path!r}: {e.strerror}") from None


def _profile_provider(profile: str) -> Any:
    """Credentials of a named AWS profile, resolved (and refreshed) by botocore."""
    try:
        import botocore.session
    except ImportError as e:
        raise Unsupported("profile= needs botocore") from e
    session = botocore.session.Session(profile=profile)

    def provide() -> dict[str, Any]:
        creds = session.get_credentials()
        if creds is None:
            raise ConfigError(f"the AWS profile {profile!r} has no credentials")
        frozen = creds.get_frozen_credentials()
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": None,
        }

    return provide


_STORES: dict[tuple[Any, ...], Any] = {}
_STORES_LOCK = threading.Lock()


def _store(bucket: str, options: Mapping[str, Any], opts: Options) -> Any:
    """One S3Store per bucket and options in this process: its connection pool is reused by
    every export (a new TLS connection per export would cost more than a small file)."""
    from obstore.store import S3Store

    config, client, provider = s3_config(options)
    key = (
        bucket,
        tuple(sorted(config.items())),
        tuple(sorted(client.items())),
        opts.upload_retries,
        opts.upload_retry_base_delay,
        opts.upload_retry_max_delay,
        repr(options.get("profile")),
    )
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            retry = {
                "max_retries": opts.upload_retries,
                "backoff": {
                    "init_backoff": timedelta(seconds=opts.upload_retry_base_delay),
                    "max_backoff": timedelta(seconds=opts.upload_retry_max_delay),
                    "base": 2,
                },
                "retry_timeout": timedelta(minutes=10),
            }
            client = {"pool_max_idle_per_host": "256", **client}
            store = S3Store(
                bucket,
                config=cast("S3Config", config),
                client_options=cast("ClientConfig", client),
                retry_config=cast("RetryConfig", retry),
                credential_provider=provider,
            )
            if len(_STORES) > 32:
                _STORES.clear()
            _STORES[key] = store
        return store


class ObstoreEngine:
    """Object calls through obstore against one S3 bucket; paths are ``bucket/key``."""

    name = "obstore"

    def __init__(self, bucket: str, options: Mapping[str, Any], opts: Options) -> None:
        import obstore

        self.obstore = obstore
        self.bucket = bucket
        self.store = _store(bucket, options, opts)
        self.concurrency = opts.upload_concurrency
        self.part_concurrency = opts.upload_part_concurrency

    def _key(self, path: str) -> str:
        bucket, _, key = path.partition("/")
        if bucket != self.bucket or not key:
            raise TreeError(f"{path!r} is not an object in the bucket {self.bucket!r}")
        return key

    def literal_problem(self, path: str) -> str | None:
        _, _, key = path.partition("/")
        if _CONTROL.search(key):
            return "object_store refuses control characters in names"
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            return "object_store refuses empty, '.' and '..' path segments"
        return None

    def put(self, path: str, data: bytes | bytearray | memoryview, *, create: bool) -> str | None:
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            out = self.obstore.put(
                self.store,
                self._key(path),
                data,
                mode="create" if create else "overwrite",
                use_multipart=False,
            )
        except (AlreadyExistsError, PreconditionError) as e:
            raise FileExistsError(path) from e
        except ValueError as e:  # the name: refused before anything was sent
            raise TreeError(f"{path!r} cannot be an object name on this store: {e}") from None
        return etag_of(out)

    def get(self, path: str) -> bytes:
        return bytes(self.obstore.get(self.store, self._key(path)).bytes())

    def get_many(self, paths: list[str]) -> dict[str, bytes]:
        if len(paths) <= 1:
            return {p: self.get(p) for p in paths}
        with ThreadPoolExecutor(
            max_workers=min(self.concurrency, len(paths)), thread_name_prefix="raysync-get"
        ) as pool:
            return dict(zip(paths, pool.map(self.get, paths), strict=True))

    def exists(self, path: str) -> bool:
        try:
            self.obstore.head(self.store, self._key(path))
        except FileNotFoundError:
            return False
        return True

    def listing(self, prefix: str) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for chunk in self.obstore.list(self.store, prefix=self._key(prefix)):
            for meta in chunk:
                modified = meta.get("last_modified")
                found[f"{self.bucket}/{meta['path']}"] = {
                    "size": meta["size"],
                    "etag": etag_of(meta),
                    "modified": modified.timestamp() if modified is not None else None,
                }
        return found

    def delete(self, paths: Iterable[str]) -> None:
        keys = [self._key(p) for p in paths]
        for i in range(0, len(keys), 1000):
            self.obstore.delete(self.store, keys[i : i + 1000])

    def read_chunks(self, path: str, block_size: int) -> Iterator[bytes]:
        result = self.obstore.get(self.store, self._key(path))
        for chunk in result.stream(min_chunk_size=block_size):
            yield bytes(chunk)

    def is_transient(self, e: BaseException) -> bool:
        """obstore's client retries 5xx answers, throttling and dropped connections itself;
        when its retries run out, or a write times out (which it leaves to its caller), the
        same policy as the fsspec engine's applies once more on top: a burst of throttling
        longer than one request's backoff is ridden out, and each such retry is logged."""
        from obstore.exceptions import GenericError

        if not isinstance(e, GenericError):
            return False
        text = str(e)
        return bool(_TRANSIENT.search(text)) and not _CLIENT_ERROR.search(text)

    def upload_file(
        self, path: str, entry: FileEntry, algorithm: str, opts: Options, budget: ByteBudget
    ) -> str | None:
        """One multipart upload fed by a generator that reads and hashes the file once; at
        most ``parts`` parts are buffered or in flight, half the bytes budget, so that two
        large files upload at once (one file at a time left the link idle at each file's
        end: 0.8x obstore's own put of the files against rclone, 1.0x with two). Each part is
        retried by obstore's client; a file whose part runs out of retries has its upload
        aborted by obstore, and is sent again whole under the retry policy."""
        part = part_size_for(entry.size, opts)
        parts = max(1, min(opts.upload_part_concurrency, budget.limit // (2 * part) - 1))
        held = budget.acquire(part * (parts + 1))

        def body() -> Iterator[bytes]:
            with hashed_source(entry, algorithm) as src:
                while True:
                    chunk = src.read(part)
                    if not chunk:
                        return
                    yield chunk

        try:
            out = with_retries(
                f"uploading {entry.path}",
                lambda: self.obstore.put(
                    self.store,
                    self._key(path),
                    body(),
                    chunk_size=part,
                    max_concurrency=parts,
                    mode="overwrite",
                ),
                opts,
                self.is_transient,
            )
        finally:
            budget.release(held)
        return etag_of(out)

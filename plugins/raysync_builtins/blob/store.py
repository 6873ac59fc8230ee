"""The fsspec-blob backend's store primitives: options, retries, a bytes budget, and the
:class:`Engine` protocol: the object calls, made by fsspec (``engine_fsspec``) or by obstore
(``engine_obstore``), each taking every name literally."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from raysync import redaction
from raysync.errors import ConfigError, RaySyncError, TreeError
from raysync.manifest import FileEntry
from raysync.retry import RetryPolicy

log = redaction.logger("raysync.blob")


def etag_of(info: Any) -> str | None:
    """The ETag in an object's info or a PUT response (``None`` when the store has none)."""
    if not isinstance(info, Mapping):
        return None
    tag = info.get("ETag") or info.get("etag") or info.get("e_tag")
    return str(tag).strip('"') if tag else None


class Engine(Protocol):
    """The object calls the backend makes, whichever client makes them (fsspec, obstore).

    Paths are ``bucket/key`` (or a protocol's own path) strings, taken literally: never a
    pattern, a version or a rewritten name. ``FileNotFoundError`` means no object;
    ``FileExistsError`` means a ``create`` put found one."""

    #: The engine's name, reported in the export's stats ("fsspec", "obstore").
    name: str

    def literal_problem(self, path: str) -> str | None:
        """Why the client would not keep ``path`` as written (``None``: it would)."""

    def put(self, path: str, data: bytes | bytearray | memoryview, *, create: bool) -> str | None:
        """Write one object (``create``: refuse an existing one); its ETag when known."""

    def get(self, path: str) -> bytes: ...

    def get_many(self, paths: list[str]) -> dict[str, bytes]:
        """The bytes of exactly ``paths``, fetched concurrently."""

    def exists(self, path: str) -> bool: ...

    def listing(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every object under ``prefix/`` with its info (``size``, ``etag``), read from the
        store (never from a cache)."""

    def delete(self, paths: Iterable[str]) -> None:
        """Delete exactly ``paths``; missing ones are fine."""

    def upload_file(
        self, path: str, entry: FileEntry, algorithm: str, opts: Options, budget: ByteBudget
    ) -> str | None:
        """Send a large file, read once and hashed as it is read (``entry.digest`` set);
        parts in flight within ``budget``; an unfinished multipart upload aborted on failure.
        Returns the ETag."""

    def read_chunks(self, path: str, block_size: int) -> Iterator[bytes]:
        """An object's bytes, streamed."""

    def is_transient(self, e: BaseException) -> bool:
        """Worth retrying once the client's own retries gave up."""


def check_literal(engine: Engine, path: str, name: str) -> None:
    """Refuse a key the store would not keep as written (:meth:`Engine.literal_problem`)."""
    problem = engine.literal_problem(path)
    if problem:
        raise TreeError(
            f"{name!r} cannot be an object name on this store: {problem}",
            hint="rename the file (e.g. without '?versionId=')",
        )


ENGINES = ("auto", "obstore", "fsspec")


@dataclass(frozen=True)
class Options:
    """raysync's own upload options (``upload_*`` in storage_options); every other
    storage_option goes to the fsspec filesystem unchanged."""

    upload_concurrency: int = 16
    upload_part_concurrency: int = 10
    upload_bytes_in_flight: int = 64 * 1024 * 1024
    upload_part_size: int = 8 * 1024 * 1024
    #: Packing mode: files smaller than this many bytes go into tar archives of about
    #: ``upload_pack_size`` bytes instead of one object each (0: off).
    upload_pack_below: int = 0
    upload_pack_size: int = 16 * 1024 * 1024
    upload_retries: int = 6
    upload_retry_base_delay: float = 0.2
    upload_retry_max_delay: float = 10.0
    #: How long a presigned URL lasts (``credentials="driver"``), in seconds.
    upload_url_seconds: int = 900
    #: Which client makes the object calls: "auto" (obstore for s3:// when it is installed
    #: and understands every option, else fsspec), "obstore" or "fsspec".
    engine: str = "auto"
    #: "worker" (the workers hold what the options give) or "driver": the credentials stay
    #: on the driver and workers upload with presigned URLs (``blob.signer``).
    credentials: str = "worker"
    #: With ``credentials="driver"``: which of the driver's destinations this is.
    signer_target: str = ""

    @classmethod
    def split(cls, options: Mapping[str, Any]) -> tuple[Options, dict[str, Any]]:
        ours = {k: options[k] for k in cls.__dataclass_fields__ if k in options}
        rest = {k: v for k, v in options.items() if k not in ours}
        unknown = [k for k in rest if k.startswith("upload_")]
        if unknown:
            raise ConfigError(
                f"unknown storage_options {unknown}; raysync's upload options "
                f"are {sorted(cls.__dataclass_fields__)}"
            )
        engine = ours.pop("engine", "auto")
        mode = str(ours.pop("credentials", "worker"))
        signer = str(ours.pop("signer_target", ""))
        if engine not in ENGINES:
            raise ConfigError(
                f"storage_options['engine'] must be one of {list(ENGINES)}, not {engine!r}"
            )
        for k, v in ours.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ConfigError(
                    f"storage_options[{k!r}] must be a non-negative number, not {v!r}"
                )
        opts = cls(**ours, engine=engine, credentials=mode, signer_target=signer)
        if (
            opts.upload_concurrency < 1
            or opts.upload_part_concurrency < 1
            or opts.upload_part_size < 5 * 1024 * 1024
        ):
            raise ConfigError(
                "upload_concurrency and upload_part_concurrency must be ≥ 1 and "
                "upload_part_size ≥ 5 MiB "
                "(S3's smallest multipart part)"
            )
        return opts, rest


class ByteBudget:
    """Bounds the bytes held in memory by uploads in flight (back-pressure, not a queue)."""

    def __init__(self, limit: int) -> None:
        self._limit, self._used = limit, 0
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        return self._limit

    def acquire(self, n: int) -> int:
        n = min(n, self._limit)  # one item larger than the budget still runs, alone
        with self._cond:
            self._cond.wait_for(lambda: self._used + n <= self._limit)
            self._used += n
        return n

    def release(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()


_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    NotImplementedError,
    RaySyncError,
)
#: Client-side errors of store libraries (botocore and others), by class name: the request
#: was never valid, so sending it again cannot help.
_PERMANENT_NAMES = frozenset(
    {
        "ParamValidationError",
        "NoCredentialsError",
        "PartialCredentialsError",
        "NoRegionError",
        "InvalidRegionError",
        "UnknownSignatureVersionError",
        "UnknownServiceError",
        "InvalidConfigError",
        "ProfileNotFound",
        "ConfigNotFound",
        "DefaultCredentialsError",
        "ClientAuthenticationError",
    }
)


def is_transient(e: BaseException) -> bool:
    """Worth retrying: 5xx, throttling, resets and timeouts; not missing buckets, denials or
    requests the client itself found invalid."""
    if isinstance(e, _PERMANENT):
        return False
    if any(c.__name__ in _PERMANENT_NAMES for c in type(e).__mro__):
        return False
    return not (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS))


def with_retries(
    what: str,
    fn: Callable[[], Any],
    opts: Options,
    transient: Callable[[BaseException], bool] = is_transient,
) -> Any:
    """Call ``fn`` under the kit's retry policy, retrying the errors ``transient`` accepts."""
    policy = RetryPolicy(
        opts.upload_retries, opts.upload_retry_base_delay, opts.upload_retry_max_delay
    )
    return policy.call(what, fn, transient=transient)


#: S3 allows at most this many parts in one multipart upload.
MAX_PARTS = 10_000


def part_size_for(size: int, opts: Options) -> int:
    """The part size for a file of ``size`` bytes: ``upload_part_size``, or larger (in whole
    MiB) so that the file takes at most 9,000 parts (S3 allows 10,000: room to spare)."""
    mib = 1024 * 1024
    need = -(-size // 9_000)
    return max(opts.upload_part_size, -(-need // mib) * mib)


def modified_of(info: Mapping[str, Any]) -> float | None:
    """When an object last changed (epoch seconds), from a listing's details, whatever the
    client calls it (``LastModified``, ``last_modified``, ``mtime``, ``created``)."""
    for name in ("modified", "LastModified", "last_modified", "mtime", "created"):
        value = info.get(name)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def send_in_parts(
    entry: FileEntry,
    algorithm: str,
    opts: Options,
    budget: ByteBudget,
    part_size: int,
    send_part: Callable[[int, bytes], dict[str, Any]],
    complete: Callable[[list[dict[str, Any]]], str | None],
    abort: Callable[[], None],
) -> str | None:
    """The body of a multipart upload, whoever makes the calls: ``entry`` read once in parts
    of ``part_size`` (each hashed as it is read), ``send_part(number, body)`` for up to
    ``upload_part_concurrency`` parts at once within ``budget``, then ``complete(parts)``
    (its ETag); on any failure the parts in flight are cancelled and ``abort()`` is called."""
    from concurrent.futures import ThreadPoolExecutor, wait

    from raysync.copy import hashed_source

    def send(number: int, body: bytes, held: int) -> dict[str, Any]:
        try:
            return send_part(number, body)
        finally:
            budget.release(held)

    pending = []
    with ThreadPoolExecutor(
        max_workers=opts.upload_part_concurrency, thread_name_prefix="raysync-part"
    ) as parts:
        try:
            with hashed_source(entry, algorithm) as src:
                number = 0
                while True:
                    held = budget.acquire(part_size)
                    body = src.read(part_size)
                    if not body:
                        budget.release(held)
                        break
                    number += 1
                    pending.append(parts.submit(send, number, body, held))
                    del body
            return complete([f.result() for f in pending])
        except BaseException:
            for f in pending:
                f.cancel()
            wait(pending)
            try:
                abort()
            except Exception as e:  # noqa: BLE001 - the real error is the one raised below
                log.warning("raysync: could not abort the upload of %s: %s", entry.path, e)
            raise

"""The fsspec-blob backend's store primitives: options, retries, a bytes budget, and object
operations that take every name literally.

fsspec expands ``*``, ``?`` and ``[`` in the paths given to ``rm`` and ``cat`` as globs, and
s3fs reads ``?versionId=`` in a key as a version. A run named ``exp?`` would then delete the
files of ``exp1``, and a file named ``page?versionId=3`` would be uploaded over ``page``. So
every multi-path call here sends names with glob characters one by one through the
single-object calls (which are literal), and a key the store's client would not keep as
written is refused before anything is sent.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from raysync import redaction
from raysync.errors import ConfigError, RaySyncError, TreeError
from raysync.retry import RetryPolicy

log = redaction.logger("raysync.blob")

#: Characters fsspec's ``expand_path`` treats as a glob.
_MAGIC = frozenset("*?[")


def put(fs: Any, path: str, data: bytes, *, create: bool) -> str | None:
    """Write one small object; ``create`` asks the store to refuse an existing one. Returns
    the store's tag of what it stored (S3's ETag), when the client reports one."""
    out = fs.pipe_file(path, data, mode="create") if create else fs.pipe_file(path, data)
    return etag_of(out)


def etag_of(info: Any) -> str | None:
    """The ETag in an object's info or a PUT response (``None`` when the store has none)."""
    if not isinstance(info, Mapping):
        return None
    tag = info.get("ETag") or info.get("etag")
    return str(tag).strip('"') if tag else None


def literal_problem(fs: Any, path: str) -> str | None:
    """Why the store's client would not write ``path`` as written (``None``: it would)."""
    try:
        stripped = fs._strip_protocol(path)
    except Exception as e:  # noqa: BLE001 - any failure means: not literal
        return f"the store's client cannot parse it ({type(e).__name__})"
    if stripped.rstrip("/") != path.rstrip("/"):
        return f"the store's client reads it as {stripped!r}"
    split = getattr(fs, "split_path", None)
    if callable(split):
        bucket, key, version = split(path)
        if version is not None or f"{bucket}/{key}".rstrip("/") != path.lstrip("/").rstrip("/"):
            return "the store's client reads part of it as an object version"
    return None


def check_literal(fs: Any, path: str, name: str) -> None:
    """Refuse a key the store would not keep as written (:func:`literal_problem`)."""
    problem = literal_problem(fs, path)
    if problem:
        raise TreeError(
            f"{name!r} cannot be an object name on this store: {problem}",
            hint="rename the file (e.g. without '?versionId=')",
        )


def _has_magic(path: str) -> bool:
    return not _MAGIC.isdisjoint(path)


def _literal_single(fs: Any, method: str) -> Callable[[str], Any]:
    """The single-object call ``method`` (``rm_file``, ``cat_file``), refusing a file system
    whose implementation would expand globs in it."""
    from fsspec.asyn import AsyncFileSystem

    if method == "rm_file" and getattr(type(fs), "_rm_file", None) is AsyncFileSystem._rm_file:
        raise TreeError(
            f"this store's fsspec client ({type(fs).__name__}) deletes names with '*', '?' or "
            "'[' as patterns, so raysync cannot delete such a file there safely",
            hint="rename the files and runs without '*', '?' and '['",
        )
    fn: Callable[[str], Any] = getattr(fs, method)
    return fn


def rm_literal(fs: Any, paths: Iterable[str]) -> None:
    """Delete exactly ``paths`` (missing ones are fine), never a pattern's matches."""
    plain: list[str] = []
    magic: list[str] = []
    for p in paths:
        (magic if _has_magic(p) else plain).append(p)
    if plain:
        try:
            fs.rm(plain)
        except FileNotFoundError:
            for p in plain:
                try:
                    fs.rm_file(p)
                except FileNotFoundError:
                    pass
    if magic:
        rm_file = _literal_single(fs, "rm_file")
        for p in magic:
            try:
                rm_file(p)
            except FileNotFoundError:
                pass


def cat_literal(fs: Any, paths: list[str]) -> dict[str, bytes]:
    """The bytes of exactly ``paths`` (concurrently where the client can), never a pattern's."""
    plain = [p for p in paths if not _has_magic(p)]
    out: dict[str, bytes] = dict(fs.cat(plain)) if plain else {}
    for p in paths:
        if _has_magic(p):
            out[p] = fs.cat_file(p)
    return out


def listing(fs: Any, run: str) -> dict[str, dict[str, Any]]:
    """Every object under the run prefix, with its info (size, ETag), read from the store
    (not from the client's listing cache)."""
    fs.invalidate_cache(run)
    try:
        found = fs.find(run, detail=True)
    except FileNotFoundError:
        return {}
    return {k.rstrip("/"): v for k, v in found.items() if v.get("type", "file") != "directory"}


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
        for k, v in ours.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ConfigError(
                    f"storage_options[{k!r}] must be a non-negative number, not {v!r}"
                )
        opts = cls(**ours)
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


def with_retries(what: str, fn: Callable[[], Any], opts: Options) -> Any:
    """Call ``fn`` under the kit's retry policy, retrying the errors :func:`is_transient`
    accepts."""
    policy = RetryPolicy(
        opts.upload_retries, opts.upload_retry_base_delay, opts.upload_retry_max_delay
    )
    return policy.call(what, fn, transient=is_transient)

"""The fsspec engine: object calls through any fsspec filesystem (s3fs, gcsfs, adlfs,
memory, ...).

fsspec expands ``*``, ``?`` and ``[`` in the paths given to ``rm`` and ``cat`` as globs, and
s3fs reads ``?versionId=`` in a key as a version. A run named ``exp?`` would then delete the
files of ``exp1``, and a file named ``page?versionId=3`` would be uploaded over ``page``. So
every multi-path call here sends names with glob characters one by one through the
single-object calls (which are literal), and a key the store's client would not keep as
written is refused before anything is sent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from raysync.copy import hashed_source
from raysync.errors import TreeError
from raysync.manifest import FileEntry
from raysync_builtins.blob.store import (
    ByteBudget,
    Options,
    etag_of,
    is_transient,
    modified_of,
    part_size_for,
    send_in_parts,
    with_retries,
)

#: Characters fsspec's ``expand_path`` treats as a glob.
_MAGIC = frozenset("*?[")


def _has_magic(path: str) -> bool:
    return not _MAGIC.isdisjoint(path)


class FsspecEngine:
    """Object calls through an fsspec filesystem."""

    name = "fsspec"

    def __init__(self, fs: Any, part_concurrency: int = 10) -> None:
        self.fs = fs
        self.part_concurrency = part_concurrency

    def literal_problem(self, path: str) -> str | None:
        fs = self.fs
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

    def put(self, path: str, data: bytes | bytearray | memoryview, *, create: bool) -> str | None:
        fs = self.fs
        out = fs.pipe_file(path, data, mode="create") if create else fs.pipe_file(path, data)
        return etag_of(out)

    def get(self, path: str) -> bytes:
        data: bytes = self.fs.cat_file(path)
        return data

    def get_many(self, paths: list[str]) -> dict[str, bytes]:
        plain = [p for p in paths if not _has_magic(p)]
        out: dict[str, bytes] = dict(self.fs.cat(plain)) if plain else {}
        for p in paths:
            if _has_magic(p):
                out[p] = self.fs.cat_file(p)
        return out

    def exists(self, path: str) -> bool:
        parent = path.rsplit("/", 1)[0]
        self.fs.invalidate_cache(parent)
        return bool(self.fs.exists(path))

    def listing(self, prefix: str) -> dict[str, dict[str, Any]]:
        fs = self.fs
        fs.invalidate_cache(prefix)
        try:
            found = fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        return {
            k.rstrip("/"): {**v, "etag": etag_of(v), "modified": modified_of(v)}
            for k, v in found.items()
            if v.get("type", "file") != "directory"
        }

    def _literal_single(self, method: str) -> Callable[[str], Any]:
        """The single-object call ``method``, refusing a file system whose implementation
        would expand globs in it."""
        from fsspec.asyn import AsyncFileSystem

        fs = self.fs
        if method == "rm_file" and getattr(type(fs), "_rm_file", None) is AsyncFileSystem._rm_file:
            raise TreeError(
                f"this store's fsspec client ({type(fs).__name__}) deletes names with '*', '?' "
                "or '[' as patterns, so raysync cannot delete such a file there safely",
                hint="rename the files and runs without '*', '?' and '['",
            )
        fn: Callable[[str], Any] = getattr(fs, method)
        return fn

    def delete(self, paths: Iterable[str]) -> None:
        plain: list[str] = []
        magic: list[str] = []
        for p in paths:
            (magic if _has_magic(p) else plain).append(p)
        if plain:
            try:
                self.fs.rm(plain)
            except FileNotFoundError:
                for p in plain:
                    try:
                        self.fs.rm_file(p)
                    except FileNotFoundError:
                        pass
        if magic:
            rm_file = self._literal_single("rm_file")
            for p in magic:
                try:
                    rm_file(p)
                except FileNotFoundError:
                    pass

    def read_chunks(self, path: str, block_size: int) -> Iterator[bytes]:
        with self.fs.open(path, "rb", block_size=block_size) as f:
            yield from iter(lambda: f.read(block_size), b"")

    def is_transient(self, e: BaseException) -> bool:
        return is_transient(e)

    def upload_file(
        self, path: str, entry: FileEntry, algorithm: str, opts: Options, budget: ByteBudget
    ) -> str | None:
        if callable(getattr(self.fs, "call_s3", None)):
            return self._upload_parts_s3(path, entry, algorithm, opts, budget)
        # Other stores: streamed through fs.open in parts, hashed from the bytes sent; a retry
        # starts the file over.
        held = budget.acquire(2 * opts.upload_part_size)
        try:

            def stream() -> None:
                with (
                    hashed_source(entry, algorithm) as src,
                    self.fs.open(path, "wb", block_size=opts.upload_part_size) as out,
                ):
                    for chunk in src.chunks():
                        out.write(chunk)

            with_retries(f"uploading {entry.path}", stream, opts)
        finally:
            budget.release(held)
        return None

    def _upload_parts_s3(
        self, dest: str, entry: FileEntry, algorithm: str, opts: Options, budget: ByteBudget
    ) -> str | None:
        """S3 multipart upload with several parts in flight (as boto3's transfer manager
        does), read once: each part is hashed as it is read, then sent from the part pool.

        Memory: the parts in flight, bounded by the shared bytes-in-flight budget. A failed
        part is retried on its own; when its retries run out the upload is aborted.
        """
        assert entry.source is not None
        fs = self.fs
        bucket, key, _ = fs.split_path(dest)
        call = fs.call_s3
        mpu = with_retries(
            f"starting the upload of {entry.path}",
            lambda: call("create_multipart_upload", Bucket=bucket, Key=key, **_wire_checksum()),
            opts,
        )
        upload_id = mpu["UploadId"]
        part_size = part_size_for(entry.size, opts)
        checksum = _wire_checksum()

        def send(number: int, body: bytes) -> dict[str, Any]:
            out = with_retries(
                f"uploading part {number} of {entry.path}",
                lambda: call(
                    "upload_part",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    **checksum,
                ),
                opts,
            )
            part = {"PartNumber": number, "ETag": out["ETag"]}
            if out.get("ChecksumCRC32"):
                part["ChecksumCRC32"] = out["ChecksumCRC32"]
            return part

        def complete(done: list[dict[str, Any]]) -> str | None:
            completed = with_retries(
                f"completing the upload of {entry.path}",
                lambda: call(
                    "complete_multipart_upload",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": done},
                ),
                opts,
            )
            fs.invalidate_cache(dest)
            return etag_of(completed)

        return send_in_parts(
            entry,
            algorithm,
            opts,
            budget,
            part_size,
            send,
            complete,
            lambda: call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id),
        )


def _wire_checksum() -> dict[str, str]:
    """A CRC32 of every part, checked by S3 on arrival; not when the user's botocore
    configuration asks for checksums only where required (some S3-compatible servers take no
    aws-chunked bodies)."""
    setting = os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION", "").lower()
    return {} if setting == "when_required" else {"ChecksumAlgorithm": "CRC32"}

"""Uploading a run's files: one object each, S3 multipart with parts in flight, packs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from typing import Any

from raysync.backend import ExportRequest
from raysync.copy import (
    hashed_source,
    read_and_hash,
)
from raysync.errors import (
    ExportError,
    RaySyncError,
)
from raysync.manifest import FileEntry
from raysync.target import redact
from raysync_builtins.blob.packing import tar_packs
from raysync_builtins.blob.store import (
    ByteBudget,
    Options,
    etag_of,
    log,
    with_retries,
)


class Uploads:
    """The upload half of :class:`raysync_builtins.blob.BlobBackend`."""

    name: str

    def _upload_all(
        self,
        fs: Any,
        run: str,
        request: ExportRequest,
        opts: Options,
        shown: str,
        *,
        skip: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        budget = ByteBudget(opts.upload_bytes_in_flight)
        failed: dict[str, BaseException] = {}
        # Large files on S3 send several parts at once, from a pool of their own (a file's
        # thread waits for its parts, so they must not queue behind it in the same pool).
        with (
            ThreadPoolExecutor(
                max_workers=opts.upload_concurrency, thread_name_prefix="raysync-upload"
            ) as pool,
            ThreadPoolExecutor(
                max_workers=opts.upload_part_concurrency, thread_name_prefix="raysync-part"
            ) as parts,
        ):
            todo = [e for e in request.files if e.path not in skip]
            packed = [e for e in todo if e.size < opts.upload_pack_below]
            futures = {
                pool.submit(
                    self._upload_one,
                    fs,
                    f"{run}/{e.path}",
                    e,
                    opts,
                    budget,
                    parts,
                    request.checksum,
                ): e.path
                for e in todo
                if e.size >= opts.upload_pack_below
            }
            # Packs are built here (each file read and hashed once) while earlier packs and
            # the large files upload; the bytes budget holds back a pack when too much is
            # in flight.
            try:
                for name, body, held in tar_packs(packed, opts, budget, request.checksum):
                    key = f"{run}/{name}"
                    job = pool.submit(self._upload_pack, fs, key, body, held, budget, opts)
                    futures[job] = name
            except BaseException as e:  # noqa: BLE001 - reported with the upload failures
                failed["(packing small files)"] = e
            for fut in as_completed(futures):
                exc = fut.exception()
                if exc is not None:
                    failed[futures[fut]] = exc
        if failed:
            first = next(iter(failed.values()))
            if len(failed) == 1 and isinstance(first, RaySyncError):
                raise first
            names = sorted(failed)
            raise ExportError(
                f"{len(failed)} of {len(request.files)} file(s) could not be uploaded after "
                f"{opts.upload_retries} retries: {', '.join(names[:20])}"
                + (" ..." if len(names) > 20 else "")
                + f" (first error: {type(first).__name__}: {redact(str(first))[:300]})",
                backend=self.name,
                uri=shown,
                workspace=str(request.workspace),
                hint="check the endpoint, credentials and bucket; nothing was committed",
            )

    @classmethod
    def _upload_one(
        cls,
        fs: Any,
        dest: str,
        entry: FileEntry,
        opts: Options,
        budget: ByteBudget,
        parts: ThreadPoolExecutor,
        algorithm: str,
    ) -> None:
        if entry.size <= opts.upload_part_size:
            held = budget.acquire(entry.size)
            try:
                buf = bytearray(entry.size)
                read_and_hash(entry, memoryview(buf), algorithm)
                entry.etag = etag_of(
                    with_retries(f"uploading {entry.path}", lambda: fs.pipe_file(dest, buf), opts)
                )
            finally:
                budget.release(held)
            return
        if callable(getattr(fs, "call_s3", None)):
            cls._upload_parts_s3(fs, dest, entry, opts, budget, parts, algorithm)
            return
        # Other stores: streamed through fs.open in parts, hashed from the bytes sent; a retry
        # starts the file over.
        held = budget.acquire(2 * opts.upload_part_size)
        try:

            def stream() -> None:
                with (
                    hashed_source(entry, algorithm) as src,
                    fs.open(dest, "wb", block_size=opts.upload_part_size) as out,
                ):
                    for chunk in src.chunks():
                        out.write(chunk)

            with_retries(f"uploading {entry.path}", stream, opts)
        finally:
            budget.release(held)

    @staticmethod
    def _upload_pack(
        fs: Any, dest: str, body: bytearray, held: int, budget: ByteBudget, opts: Options
    ) -> None:
        try:
            name = dest.rsplit("/", 1)[-1]
            with_retries(f"uploading {name}", lambda: fs.pipe_file(dest, body), opts)
        finally:
            budget.release(held)

    @staticmethod
    def _upload_parts_s3(
        fs: Any,
        dest: str,
        entry: FileEntry,
        opts: Options,
        budget: ByteBudget,
        parts: ThreadPoolExecutor,
        algorithm: str,
    ) -> None:
        """S3 multipart upload with several parts in flight (as boto3's transfer manager
        does), read once: each part is hashed as it is read, then sent from the part pool.

        Memory: the parts in flight, bounded by the shared bytes-in-flight budget. A failed
        part is retried on its own; when its retries run out the upload is aborted.
        """
        assert entry.source is not None
        bucket, key, _ = fs.split_path(dest)
        call = fs.call_s3
        mpu = with_retries(
            f"starting the upload of {entry.path}",
            lambda: call(
                "create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32"
            ),
            opts,
        )
        upload_id = mpu["UploadId"]

        def send(number: int, body: bytes, held: int) -> dict[str, Any]:
            try:
                out = with_retries(
                    f"uploading part {number} of {entry.path}",
                    lambda: call(
                        "upload_part",
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,
                        ChecksumAlgorithm="CRC32",
                    ),
                    opts,
                )
                part = {"PartNumber": number, "ETag": out["ETag"]}
                if out.get("ChecksumCRC32"):
                    part["ChecksumCRC32"] = out["ChecksumCRC32"]
                return part
            finally:
                budget.release(held)

        pending = []
        try:
            with hashed_source(entry, algorithm) as src:
                number = 0
                while True:
                    held = budget.acquire(opts.upload_part_size)
                    body = src.read(opts.upload_part_size)
                    if not body:
                        budget.release(held)
                        break
                    number += 1
                    pending.append(parts.submit(send, number, body, held))
                    del body
            done = [f.result() for f in pending]
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
            entry.etag = etag_of(completed)
        except BaseException:
            for f in pending:
                f.cancel()
            wait(pending)
            try:
                call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception as e:  # noqa: BLE001 - the real error is the one raised below
                log.warning("raysync: could not abort the multipart upload of %s: %s", key, e)
            raise

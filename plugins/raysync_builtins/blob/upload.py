"""Uploading a run's files: one object each (large ones through the engine's multipart
upload), or small ones in packs; all within one bytes-in-flight budget."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed

from raysync.backend import ExportRequest
from raysync.copy import read_hashed
from raysync.errors import (
    ExportError,
    RaySyncError,
)
from raysync.manifest import FileEntry
from raysync.target import redact
from raysync_builtins.blob.packing import tar_packs
from raysync_builtins.blob.store import (
    ByteBudget,
    Engine,
    Options,
    with_retries,
)


class Uploads:
    """The upload half of :class:`raysync_builtins.blob.BlobBackend`."""

    name: str

    def _upload_all(
        self,
        engine: Engine,
        run: str,
        request: ExportRequest,
        opts: Options,
        shown: str,
        *,
        skip: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        budget = ByteBudget(opts.upload_bytes_in_flight)
        failed: dict[str, BaseException] = {}
        with ThreadPoolExecutor(
            max_workers=opts.upload_concurrency, thread_name_prefix="raysync-upload"
        ) as pool:
            todo = [e for e in request.files if e.path not in skip]
            packed = [e for e in todo if e.size < opts.upload_pack_below]
            sign_ahead = getattr(engine, "sign_ahead", None)
            if callable(sign_ahead):  # presigned URLs: one call to the signer for them all
                single = [e for e in todo if opts.upload_pack_below <= e.size]
                sign_ahead(
                    "PUT", [f"{run}/{e.path}" for e in single if e.size <= opts.upload_part_size]
                )
            futures = {
                pool.submit(
                    self._upload_one, engine, f"{run}/{e.path}", e, opts, budget, request.checksum
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
                    job = pool.submit(self._upload_pack, engine, key, body, held, budget, opts)
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

    @staticmethod
    def _upload_one(
        engine: Engine,
        dest: str,
        entry: FileEntry,
        opts: Options,
        budget: ByteBudget,
        algorithm: str,
    ) -> None:
        if entry.size > opts.upload_part_size:
            entry.etag = engine.upload_file(dest, entry, algorithm, opts, budget)
            return
        held = budget.acquire(entry.size)
        try:
            buf = read_hashed(entry, algorithm)
            entry.etag = with_retries(
                f"uploading {entry.path}",
                lambda: engine.put(dest, buf, create=False),
                opts,
                engine.is_transient,
            )
        finally:
            budget.release(held)

    @staticmethod
    def _upload_pack(
        engine: Engine, dest: str, body: bytearray, held: int, budget: ByteBudget, opts: Options
    ) -> None:
        try:
            name = dest.rsplit("/", 1)[-1]
            with_retries(
                f"uploading {name}",
                lambda: engine.put(dest, body, create=False),
                opts,
                engine.is_transient,
            )
        finally:
            budget.release(held)

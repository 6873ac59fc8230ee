"""fsspec-blob backend: any fsspec protocol no other backend claims (``s3://``, ``gs://``,
``az://``, ``memory://``...), with parallel uploads, retries and a manifest-last commit.

Commit protocol (docs/backends.md):

1. a lock object ``<run>/.raysync-lock`` is created with an exclusive write (S3
   ``If-None-Match: *``) so that two different calls cannot write the same run at once; an
   earlier attempt of the same Ray task may take its lock over;
2. the data objects are uploaded in parallel, each hashed from the bytes sent;
3. the manifest ``<run>/raysync-manifest.json`` is written last: a prefix without it is
   incomplete, and every raysync reader treats it so;
4. objects under the run that the manifest does not list (left by a dead attempt) and the lock
   are deleted.
"""

from __future__ import annotations

import functools
import json
import tarfile
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import raysync
from raysync import checksum, rules
from raysync.backend import Capabilities, ExportOutcome, ExportRequest, Location, RunInfo, RunReader
from raysync.copy import (
    CHUNK,
    hashed_source,
    plan_reuse,
    read_and_hash,
)
from raysync.errors import (
    ConfigError,
    ExportError,
    IntegrityError,
    MaterializeError,
    MissingDependencyError,
    RaySyncError,
    RunExistsError,
    TreeError,
)
from raysync.manifest import MANIFEST_NAME, FileEntry, Manifest, check_relpath
from raysync.result import ExportResult, place_files
from raysync.target import Target, redact, split_scheme
from raysync_builtins.blob.store import (
    ByteBudget,
    Options,
    cat_literal,
    check_literal,
    etag_of,
    listing,
    literal_problem,
    log,
    put,
    rm_literal,
    with_retries,
)

LOCK_NAME = ".raysync-lock"
#: Protocols whose optional package is one of raysync's extras.
EXTRAS = {"s3": "s3", "s3a": "s3"}
#: Protocols where an exclusive create is known to be enforced by the store.
CONDITIONAL = {"s3", "s3a", "memory"}
#: fsspec protocols that are not storage a run can be written to.
NOT_STORAGE = {
    "file",
    "local",
    "return",
    "http",
    "https",
    "data",
    "reference",
    "cached",
    "blockcache",
    "filecache",
    "simplecache",
    "zip",
    "tar",
    "libarchive",
    "dir",
    "generic",
    "async_wrapper",
    "asyncwrapper",
    "asynclocal",
    "github",
    "git",
    "gist",
}


#: Packs are named ``.raysync-pack-<export id>-<n>.tar`` at the run's root.
PACK_PREFIX = ".raysync-pack-"
_TAR_BLOCK = 512


def tar_packs(
    entries: list[FileEntry], opts: Options, budget: ByteBudget, algorithm: str
) -> Iterator[tuple[str, bytearray, int]]:
    """Pack ``entries`` into POSIX (pax) tar archives of about ``upload_pack_size`` bytes:
    yields (object name, archive bytes, budget held). Each file is read and hashed once;
    ``entry.pack`` records the archive and the offset of the file's bytes in it, so a reader
    fetches one file with a ranged read, or a whole archive with one GET (and ``tar x``
    works on it too)."""
    if not entries:
        return
    export_id = uuid.uuid4().hex[:10]
    number = 0
    held = budget.acquire(opts.upload_pack_size)
    buf = bytearray()
    name = f"{PACK_PREFIX}{export_id}-{number:06d}.tar"
    for entry in entries:
        info = tarfile.TarInfo(entry.path)
        info.size, info.mode, info.mtime = entry.size, entry.mode, int(time.time())
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        data = bytearray(entry.size)
        read_and_hash(entry, memoryview(data), algorithm)
        buf += header
        entry.pack = {"object": name, "offset": len(buf)}
        buf += data
        buf += bytes(-len(buf) % _TAR_BLOCK)
        if len(buf) >= opts.upload_pack_size:
            buf += bytes(2 * _TAR_BLOCK)  # end of archive
            yield name, buf, held
            number += 1
            held = budget.acquire(opts.upload_pack_size)
            buf = bytearray()
            name = f"{PACK_PREFIX}{export_id}-{number:06d}.tar"
    if buf:
        buf += bytes(2 * _TAR_BLOCK)
        yield name, buf, held
    else:
        budget.release(held)


def read_packed(
    fs: Any, run: str, entry: FileEntry, cache: dict[str, bytes], opts: Options
) -> bytes:
    """A packed file's bytes. Its archive is fetched with one GET and kept (one archive at a
    time) for the files after it, which the manifest lists in archive order."""
    assert entry.pack is not None
    obj, offset = entry.pack.get("object"), entry.pack.get("offset")
    if (
        not isinstance(obj, str)
        or not obj.startswith(PACK_PREFIX)
        or "/" in obj
        or not isinstance(offset, int)
        or offset < 0
    ):
        raise IntegrityError(
            f"the manifest's pack reference of {entry.path!r} is malformed: {entry.pack!r}",
            uri=run,
            bad=[entry.path],
        )
    key = f"{run}/{check_relpath(obj)}"
    data = cache.get(key)
    if data is None:
        cache.clear()
        data = cache[key] = with_retries(f"downloading {obj}", lambda: fs.cat_file(key), opts)
    return data[offset : offset + entry.size]


@dataclass(frozen=True)
class _Claim:
    """What the claim found: the conflict decision and the run's objects (with ETags)."""

    decision: rules.Decision
    listing: dict[str, dict[str, Any]]


class BlobBackend:
    """Exports to any fsspec filesystem."""

    name = "fsspec"
    schemes = ("memory",)
    default = False
    capabilities = Capabilities(conditional_put=True, multipart=True, read_back=True)
    accepts_description = "any other fsspec protocol (s3://, gs://, az://, ...)"

    def accepts_scheme(self, scheme: str) -> bool:
        import fsspec

        return scheme not in NOT_STORAGE and scheme in fsspec.available_protocols()

    def check(self, target: Target) -> None:
        Options.split(target.options)
        self._fs_class(target.scheme)
        if not target.path.strip("/"):
            raise ConfigError(
                f"{target.scheme}:// needs a bucket and a path",
                hint=f"e.g. {target.scheme}://bucket/runs/{{run_id}}",
            )

    @staticmethod
    def _fs_class(scheme: str) -> type:
        import fsspec

        try:
            cls: type = fsspec.get_filesystem_class(scheme)
        except ImportError as e:
            package = str(e).split("'")[1] if "'" in str(e) else None
            raise MissingDependencyError(
                f"{scheme}://", extra=EXTRAS.get(scheme), package=package
            ) from e
        except ValueError as e:
            raise ConfigError(f"fsspec does not know the protocol {scheme}://") from e
        return cls

    def prepare(self, target: Target) -> Mapping[str, str]:
        return {}

    @staticmethod
    def _open(uri: str, options: Mapping[str, Any]) -> tuple[Any, str, Options]:
        import fsspec

        opts, fs_options = Options.split(options)
        fs, path = fsspec.core.url_to_fs(uri, **fs_options)
        path = path.rstrip("/")
        # The run is exactly the path the URI names: never a chained URL's inner path, a
        # version of an object, or a path the client rewrote (DESIGN invariant 7).
        scheme, rest = split_scheme(uri)
        try:
            literal = fs._strip_protocol(f"{scheme}://{rest}").rstrip("/")
        except Exception:  # noqa: BLE001 - a client that cannot parse it: refused below
            literal = None
        problem = literal_problem(fs, path)
        if literal != path or problem:
            raise ConfigError(
                f"{redact(uri)} does not name one literal location on this store "
                f"({problem or f'the store reads it as {path!r}'})",
                hint="write the run's URI without '::', '?' or '#' parts",
            )
        return fs, path, opts

    # -- export ----------------------------------------------------------------------------
    def export(self, request: ExportRequest) -> ExportOutcome:
        uri = request.target.uri
        fs, run, opts = self._open(uri, request.target.options)
        shown = redact(uri)
        for e in request.files:
            check_relpath(e.path)  # never a key outside the run (zip-slip)
            try:
                e.path.encode("utf-8")
            except UnicodeEncodeError:
                raise TreeError(
                    f"{e.path!r} is not a valid UTF-8 name, which object store keys must be",
                    hint="rename the file (its name holds bytes that are not UTF-8)",
                ) from None
            check_literal(fs, f"{run}/{e.path}", e.path)
        conditional = request.target.scheme in CONDITIONAL
        claim = self._claim(fs, run, request, opts, conditional=conditional, shown=shown)
        manifest_path = f"{run}/{MANIFEST_NAME}"
        previous = claim.decision.previous
        old_gone = previous is None
        try:
            # Incremental: objects the run being replaced holds, unchanged, are not sent again.
            reuse = self._verified_reuse(fs, run, request, claim, opts)
            if previous is not None:
                # The replaced run disappears whole before any of its objects change: a
                # reader sees it, then no run, then the new one (never a mix).
                with_retries(
                    "removing the replaced run's manifest",
                    lambda: rm_literal(fs, [manifest_path]),
                    opts,
                )
                old_gone = True
            self._upload_all(fs, run, request, opts, shown, skip=reuse)
            data = request.manifest.to_bytes()
            with_retries(
                "writing the manifest",
                lambda: put(fs, manifest_path, data, create=conditional),
                opts,
            )
        except FileExistsError as e:
            self._release(fs, run, opts, remove_data=False)
            raise RunExistsError(
                "another call committed this run first",
                uri=shown,
                hint="give each call its own output_uri (e.g. add {call_id})",
            ) from e
        except BaseException:
            # Nothing was committed: give the run back (what is under it, which the claim
            # proved ours, and the lock), so that a retry or another call can take it. A
            # replaced run whose manifest is still there is left as it is; only the lock goes.
            self._release(fs, run, opts, remove_data=old_gone)
            raise
        self._clean(fs, run, request.manifest, opts)
        reused = [e for e in request.files if e.path in reuse]
        return ExportOutcome(
            uri=uri,
            payload=Location(uri, dict(request.target.options)),
            extra_stats={"reused_files": len(reused), "reused_bytes": sum(e.size for e in reused)},
        )

    def _claim(
        self,
        fs: Any,
        run: str,
        request: ExportRequest,
        opts: Options,
        *,
        conditional: bool,
        shown: str,
    ) -> _Claim:
        """Take the run's lock and decide (:func:`raysync.rules.decide`) while holding it.

        The run is looked at before the lock is written (nothing is written under a prefix
        that is not ours to write) and again once the lock is held (the decision that counts:
        another call may have committed in between). A lock held by another call refuses the
        export, whatever the conflict policy: two calls never write one run at once. A lock
        left by an earlier attempt of this call is taken over."""
        run_record = request.manifest.run
        body = json.dumps(rules.claim_record(run_record)).encode()
        lock_path = f"{run}/{LOCK_NAME}"
        self._look(fs, run, request, opts, shown)  # refuse before writing anything
        for _ in range(3):
            try:
                with_retries(
                    "taking the run lock",
                    lambda: put(fs, lock_path, body, create=conditional),
                    opts,
                )
            except FileExistsError:
                holder = self._holder(fs, lock_path, opts)
                if holder is None:
                    continue  # released between our write and our read: look again
                rules.decide(
                    existing=None,
                    occupied=True,
                    run=run_record,
                    conflict=request.conflict,
                    uri=shown,
                    leftover_owner=holder,
                )
                # An earlier attempt of this very call died holding the lock: take it over.
                with_retries(
                    "taking the run lock", lambda: put(fs, lock_path, body, create=False), opts
                )
            try:
                return self._look(fs, run, request, opts, shown)
            except BaseException:
                self._release(fs, run, opts, remove_data=False)
                raise
        raise RunExistsError(
            "other calls keep taking and releasing this run's lock",
            uri=shown,
            hint="give each call its own output_uri (e.g. add {call_id})",
        )

    def _look(self, fs: Any, run: str, request: ExportRequest, opts: Options, shown: str) -> _Claim:
        """List the run and apply the conflict decision to what is there."""
        found = with_retries("listing the run", lambda: listing(fs, run), opts)
        lock_path, manifest_path = f"{run}/{LOCK_NAME}", f"{run}/{MANIFEST_NAME}"
        holder = self._holder(fs, lock_path, opts) if lock_path in found else None
        existing = self._read_manifest(fs, run, shown, opts) if manifest_path in found else None
        others = [k for k in found if k not in (lock_path, manifest_path)]
        nested = [k for k in others if k.rsplit("/", 1)[-1] in (MANIFEST_NAME, LOCK_NAME)]
        own_lock = holder is not None and rules.same_call(holder, request.manifest.run)
        unlisted: list[str] = []
        if existing is not None:
            listed = {f"{run}/{f.path}" for f in existing.files}
            listed |= {f"{run}/{f.pack['object']}" for f in existing.files if f.pack is not None}
            unlisted = [k[len(run) + 1 :] for k in others if k not in listed]
            if own_lock:  # what a dead attempt of this call uploaded is ours; runs are not
                unlisted = [p for p in unlisted if p.endswith(f"/{MANIFEST_NAME}")]
        decision = rules.decide(
            existing=existing,
            occupied=bool(others) and not own_lock,
            run=request.manifest.run,
            conflict=request.conflict,
            uri=shown,
            leftover_owner=holder if existing is None and not own_lock else None,
            inside=self._enclosing_run(fs, run, opts),
            unlisted=unlisted,
            nested=[k[len(run) + 1 :] for k in nested],
        )
        if existing is not None and holder is not None and not own_lock:
            # A committed run that another call is replacing right now.
            rules.decide(
                existing=None,
                occupied=True,
                run=request.manifest.run,
                conflict=request.conflict,
                uri=shown,
                leftover_owner=holder,
            )
        return _Claim(decision, found)

    @staticmethod
    def _enclosing_run(fs: Any, run: str, opts: Options) -> str | None:
        """A run (committed, or being written: its lock) in a prefix above ``run`` (up to
        the bucket), if there is one."""
        parts = run.split("/")
        for n in range(len(parts) - 1, 0, -1):
            prefix = "/".join(parts[:n])
            if not prefix.strip("/"):
                break
            fs.invalidate_cache(prefix)
            for name in (MANIFEST_NAME, LOCK_NAME):
                look = functools.partial(fs.exists, f"{prefix}/{name}")
                if with_retries("looking for an enclosing run", look, opts):
                    return prefix
        return None

    @staticmethod
    def _holder(fs: Any, lock_path: str, opts: Options) -> dict[str, Any] | None:
        """Who holds the lock (``None``: no lock any more)."""
        try:
            data = with_retries("reading the run lock", lambda: fs.cat_file(lock_path), opts)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data or b"{}")
        except ValueError:
            holder = None
        return holder if isinstance(holder, dict) else {"task_id": "unreadable lock"}

    @staticmethod
    def _verified_reuse(
        fs: Any, run: str, request: ExportRequest, claim: _Claim, opts: Options
    ) -> set[str]:
        """The files the run being replaced holds unchanged, proven so: the store still shows
        the ETag recorded when the object was written, or (stores without ETags) the object's
        bytes hash to the digest. Anything else is uploaded again (DESIGN invariant 8)."""
        previous = claim.decision.previous
        reuse = plan_reuse(request.files, previous, request.checksum)
        if previous is None or not reuse:
            return set()
        recorded = {f.path: f.etag for f in previous.files}
        ok: set[str] = set()
        for e in request.files:
            if e.path not in reuse:
                continue
            key = f"{run}/{e.path}"
            info = claim.listing.get(key)
            if info is None or info.get("size") != e.size:
                continue
            tag, was = etag_of(info), recorded.get(e.path)
            if tag and was:
                if tag == was:
                    e.etag = was
                    ok.add(e.path)
                continue
            try:
                read = functools.partial(fs.cat_file, key)
                data = with_retries(f"reading {e.path} back", read, opts)
            except FileNotFoundError:
                continue
            if checksum.of_bytes(data, request.checksum) == e.digest:
                ok.add(e.path)
        return ok

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

    @staticmethod
    def _release(fs: Any, run: str, opts: Options, *, remove_data: bool) -> None:
        """After a failed export: delete what is under the run (the claim proved it ours)
        when ``remove_data``, and the lock, last."""
        lock = f"{run}/{LOCK_NAME}"
        try:
            if remove_data:
                found = listing(fs, run)
                paths = [p for p in found if p not in (lock, f"{run}/{MANIFEST_NAME}")]
                if paths:
                    with_retries("releasing the run", lambda: rm_literal(fs, paths), opts)
            with_retries("releasing the run lock", lambda: rm_literal(fs, [lock]), opts)
        except Exception as e:  # noqa: BLE001 - the export's own error is the one to raise
            log.warning(
                "raysync: could not release the run after a failed export (%s); delete %s "
                "under it before retrying with another task",
                e,
                LOCK_NAME,
            )

    @staticmethod
    def _clean(fs: Any, run: str, manifest: Manifest, opts: Options) -> None:
        """After the commit: remove objects the manifest does not list (a replaced run's or a
        dead attempt's), then the lock."""
        lock = f"{run}/{LOCK_NAME}"
        keep = {f"{run}/{f.path}" for f in manifest.files} | {f"{run}/{MANIFEST_NAME}", lock}
        keep |= {f"{run}/{f.pack['object']}" for f in manifest.files if f.pack is not None}
        try:
            stale = [p for p in listing(fs, run) if p not in keep]
            if stale:
                with_retries("removing stale objects", lambda: rm_literal(fs, stale), opts)
            with_retries("releasing the run lock", lambda: rm_literal(fs, [lock]), opts)
        except Exception as e:  # noqa: BLE001 - the run is committed; leftovers are harmless
            log.warning("raysync: could not remove stale objects under the run: %s", e)

    @staticmethod
    def _read_manifest(fs: Any, run: str, shown: str, opts: Options) -> Manifest | None:
        try:
            data = with_retries(
                "reading the manifest", lambda: fs.cat_file(f"{run}/{MANIFEST_NAME}"), opts
            )
        except FileNotFoundError:
            return None
        return Manifest.from_bytes(data, uri=shown)

    # -- read back ---------------------------------------------------------------------------
    def list_runs(self, target: Target) -> list[RunInfo]:
        """Runs under a prefix: each manifest is a run; a lock without one is incomplete."""
        fs, prefix, opts = self._open(target.uri, target.options)
        scheme = target.scheme
        keys = with_retries("listing the prefix", lambda: fs.find(prefix), opts)
        manifests = [k for k in keys if k.endswith("/" + MANIFEST_NAME) or k == MANIFEST_NAME]
        locks = [k for k in keys if k.endswith("/" + LOCK_NAME)]
        got = (
            with_retries("reading manifests", lambda: cat_literal(fs, manifests), opts)
            if manifests
            else {}
        )
        runs = []
        for key, data in sorted(got.items()):
            run = key.rsplit("/", 1)[0]
            uri = f"{scheme}://{run}"
            runs.append(RunInfo.from_manifest(uri, Manifest.from_bytes(data, uri=uri)))
        done = {k.rsplit("/", 1)[0] for k in manifests}
        for key in locks:
            run = key.rsplit("/", 1)[0]
            if run not in done:
                runs.append(RunInfo(uri=f"{scheme}://{run}", status="incomplete"))
        return sorted(runs, key=lambda r: r.uri)

    def open_run(self, target: Target) -> RunReader:
        fs, run, opts = self._open(target.uri, target.options)
        return _BlobReader(redact(target.uri), fs, run, opts)

    def materialize(self, result: ExportResult, dest: Path, *, overwrite: bool = False) -> None:
        loc = result.payload
        if not isinstance(loc, Location):
            raise MaterializeError("this result does not say where its run is stored")
        fs, run, opts = self._open(loc.uri, loc.options)
        shown = redact(loc.uri)
        committed = self._read_manifest(fs, run, shown, opts)
        if committed is None:
            raise MaterializeError(f"{shown} has no manifest: the run is incomplete or gone")
        if not rules.same_commit(committed.run, result.manifest.run):
            raise IntegrityError(
                "the run at this URI was replaced by another call", uri=shown, bad=[MANIFEST_NAME]
            )

        small = [f for f in committed.files if f.size <= opts.upload_part_size and f.pack is None]
        packs: dict[str, bytes] = {}
        position = {f.path: i for i, f in enumerate(small)}
        fetched: dict[str, bytes] = {}

        def fetch_batch(start: int) -> None:
            # Small files are fetched many at a time (fs.cat runs the GETs concurrently),
            # at most upload_bytes_in_flight bytes per batch.
            batch: list[str] = []
            size = 0
            for f in small[start:]:
                if batch and size + f.size > opts.upload_bytes_in_flight:
                    break
                batch.append(f"{run}/{f.path}")
                size += f.size
            got = with_retries("downloading files", lambda: cat_literal(fs, batch), opts)
            fetched.clear()
            fetched.update({p.removeprefix(run + "/"): data for p, data in got.items()})

        def read(entry: FileEntry) -> Iterator[bytes]:
            if entry.pack is not None:
                yield read_packed(fs, run, entry, packs, opts)
                return
            if entry.path in position:
                if entry.path not in fetched:
                    fetch_batch(position[entry.path])
                yield fetched.pop(entry.path)
                return
            with fs.open(f"{run}/{entry.path}", "rb", block_size=opts.upload_part_size) as f:
                yield from iter(lambda: f.read(CHUNK), b"")

        place_files(
            dest,
            committed.files,
            read,
            uri=shown,
            overwrite=overwrite,
            checksum=committed.checksum,
        )


class _BlobReader(RunReader):
    def __init__(self, uri: str, fs: Any, run: str, opts: Options) -> None:
        super().__init__(uri)
        self.fs, self.run, self.opts = fs, run, opts
        self._pack_cache: dict[str, bytes] = {}

    def manifest(self) -> Manifest | None:
        return BlobBackend._read_manifest(self.fs, self.run, self.uri, self.opts)

    def read(self, entry: FileEntry) -> Iterator[bytes]:
        if entry.pack is not None:
            yield read_packed(self.fs, self.run, entry, self._pack_cache, self.opts)
            return
        with self.fs.open(f"{self.run}/{check_relpath(entry.path)}", "rb") as f:
            yield from iter(lambda: f.read(CHUNK), b"")


@raysync.hookimpl
def raysync_register_backends(register: raysync.RegisterBackend) -> None:
    register(BlobBackend())

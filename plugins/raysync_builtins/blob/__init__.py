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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import raysync
from raysync import checksum, rules
from raysync.backend import Capabilities, ExportOutcome, ExportRequest, Location, RunInfo, RunReader
from raysync.copy import (
    CHUNK,
    plan_reuse,
)
from raysync.errors import (
    ConfigError,
    IntegrityError,
    MaterializeError,
    MissingDependencyError,
    RunExistsError,
    TreeError,
)
from raysync.manifest import MANIFEST_NAME, FileEntry, Manifest, check_relpath
from raysync.result import ExportResult, place_run
from raysync.target import Target, redact, split_scheme
from raysync_builtins.blob.consts import CONDITIONAL, EXTRAS, LOCK_NAME, NOT_STORAGE
from raysync_builtins.blob.lock import RunLock, _Claim
from raysync_builtins.blob.packing import read_packed, tar_packs
from raysync_builtins.blob.store import (
    Options,
    cat_literal,
    check_literal,
    etag_of,
    literal_problem,
    put,
    rm_literal,
    with_retries,
)
from raysync_builtins.blob.upload import Uploads

__all__ = ["LOCK_NAME", "BlobBackend", "read_packed", "tar_packs"]


class BlobBackend(RunLock, Uploads):
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

        place_run(dest, committed, read, uri=shown, overwrite=overwrite)


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

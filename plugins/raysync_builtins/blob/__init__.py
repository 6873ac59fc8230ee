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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import raysync
from raysync import checksum, rules
from raysync.backend import Capabilities, ExportOutcome, ExportRequest, Location, RunInfo, RunReader
from raysync.copy import plan_reuse
from raysync.errors import (
    ConfigError,
    IntegrityError,
    MaterializeError,
    MissingDependencyError,
    RunExistsError,
    TreeError,
)
from raysync.manifest import MANIFEST_NAME, Manifest, check_relpath
from raysync.result import ExportResult, place_run
from raysync.target import Target, redact, split_scheme
from raysync_builtins.blob import signer
from raysync_builtins.blob.consts import CONDITIONAL, EXTRAS, KEY_LIMIT, LOCK_NAME, NOT_STORAGE
from raysync_builtins.blob.engine_fsspec import FsspecEngine
from raysync_builtins.blob.gc import BlobGc, Heartbeat
from raysync_builtins.blob.lock import RunLock, _Claim
from raysync_builtins.blob.packing import read_packed, tar_packs
from raysync_builtins.blob.reading import BlobReader, read_manifest
from raysync_builtins.blob.select import choose, obstore_engine
from raysync_builtins.blob.shards import ShardExports, incomplete_runs
from raysync_builtins.blob.store import Engine, Options, check_literal, etag_of, with_retries
from raysync_builtins.blob.upload import Uploads

__all__ = ["LOCK_NAME", "BlobBackend", "read_packed", "tar_packs"]


class BlobBackend(RunLock, Uploads, ShardExports, BlobGc):
    """Exports to any fsspec filesystem."""

    name = "fsspec"
    schemes = ("memory",)
    default = False
    capabilities = Capabilities(conditional_put=True, multipart=True, read_back=True, shards=True)
    accepts_description = "any other fsspec protocol (s3://, gs://, az://, ...)"

    def accepts_scheme(self, scheme: str) -> bool:
        import fsspec

        return scheme not in NOT_STORAGE and scheme in fsspec.available_protocols()

    def check(self, target: Target) -> None:
        signer.check_mode(target.scheme, target.options)
        opts, fs_options = Options.split(target.options)
        if choose(target.scheme, fs_options, opts) == "fsspec":
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
            # fsspec's own words name the package ("Please install gcsfs to access ...").
            said = str(e).strip()
            extra = EXTRAS.get(scheme)
            install = f"pip install 'raysync[{extra}]'" if extra else None
            raise MissingDependencyError(
                f"{scheme}://",
                install=f"{install} (fsspec says: {said})" if install else f"fsspec says: {said}",
            ) from e
        except ValueError as e:
            raise ConfigError(f"fsspec does not know the protocol {scheme}://") from e
        return cls

    def prepare(self, target: Target) -> Mapping[str, str]:
        if target.options.get(signer.MODE_KEY) == "driver":
            return signer.prepare(self._root_uri(target), target.options)
        return {}

    def worker_target(self, target: Target) -> Target | None:
        """With ``credentials="driver"``: the target without credentials (workers upload
        with the driver's presigned URLs, :mod:`raysync_builtins.blob.signer`)."""
        if target.options.get(signer.MODE_KEY) != "driver":
            return None
        options = signer.worker_options(self._root_uri(target), target.options)
        return Target(target.uri, target.scheme, options, target.base_dir)

    @staticmethod
    def _root_uri(target: Target) -> str:
        return f"{target.scheme}://{target.root}"

    @staticmethod
    def _open(uri: str, options: Mapping[str, Any]) -> tuple[Engine, str, Options]:
        """The engine for this URI and options, the run's path (``bucket/key...``), and
        raysync's own options."""
        opts, fs_options = Options.split(options)
        scheme, rest = split_scheme(uri)
        if opts.credentials == "driver" and opts.signer_target:
            # A worker's (or a result's) options: no credentials, the driver's signer.
            from raysync_builtins.blob.engine_signed import SignedEngine

            verify = fs_options.get(signer.TLS_KEY, True)
            return SignedEngine(opts.signer_target, opts, verify), rest.rstrip("/"), opts
        engine = obstore_engine(scheme, rest, fs_options, opts)
        if engine is not None:
            path = rest.rstrip("/")
            problem = engine.literal_problem(path) if path.strip("/") == path else "a leading '/'"
            if problem:
                raise ConfigError(
                    f"{redact(uri)} does not name one literal location on this store ({problem})",
                    hint="write the run's URI without '::', '?' or '#' parts",
                )
            return engine, path, opts
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri, **fs_options)
        path = path.rstrip("/")
        # The run is exactly the path the URI names: never a chained URL's inner path, a
        # version of an object, or a path the client rewrote (DESIGN invariant 7).
        try:
            literal = fs._strip_protocol(f"{scheme}://{rest}").rstrip("/")
        except Exception:  # noqa: BLE001 - a client that cannot parse it: refused below
            literal = None
        fs_engine = FsspecEngine(fs)
        problem = fs_engine.literal_problem(path)
        if literal != path or problem:
            raise ConfigError(
                f"{redact(uri)} does not name one literal location on this store "
                f"({problem or f'the store reads it as {path!r}'})",
                hint="write the run's URI without '::', '?' or '#' parts",
            )
        return fs_engine, path, opts

    # -- export ----------------------------------------------------------------------------
    def export(self, request: ExportRequest) -> ExportOutcome:
        uri = request.target.uri
        engine, run, opts = self._open(uri, request.target.options)
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
            check_literal(engine, f"{run}/{e.path}", e.path)
            key = len(run.partition("/")[2].encode()) + 1 + len(e.path.encode())
            if request.target.scheme in KEY_LIMIT and key > KEY_LIMIT[request.target.scheme]:
                limit = KEY_LIMIT[request.target.scheme]
                raise TreeError(
                    f"{e.path[:60]!r}... would be an object key of {key:,} bytes under this "
                    f"run; {request.target.scheme}:// allows {limit:,}",
                    hint="shorten the file's path (or the run's prefix); nothing was uploaded",
                )
        conditional = request.target.scheme in CONDITIONAL
        if request.shard is not None:
            whole = self._export_shard(engine, run, request, opts, shown, conditional=conditional)
            return ExportOutcome(
                uri=uri,
                payload=Location(uri, dict(request.target.options)),
                extra_stats={"engine": engine.name},
                committed=whole,
            )
        claim = self._claim(engine, run, request, opts, conditional=conditional, shown=shown)
        manifest_path = f"{run}/{MANIFEST_NAME}"
        previous = claim.decision.previous
        old_gone = previous is None
        # While the export runs, its lock stays fresh: gc tells a live export from a dead one.
        lock_body = json.dumps(rules.claim_record(request.manifest.run)).encode()
        beat = Heartbeat(engine, f"{run}/{LOCK_NAME}", lock_body)
        try:
            # Incremental: objects the run being replaced holds, unchanged, are not sent again.
            reuse = self._verified_reuse(engine, run, request, claim, opts)
            if previous is not None:
                # The replaced run disappears whole before any of its objects change: a
                # reader sees it, then no run, then the new one (never a mix).
                with_retries(
                    "removing the replaced run's manifest",
                    lambda: engine.delete([manifest_path]),
                    opts,
                    engine.is_transient,
                )
                old_gone = True
            self._upload_all(engine, run, request, opts, shown, skip=reuse)
            data = request.manifest.to_bytes()
            with_retries(
                "writing the manifest",
                lambda: engine.put(manifest_path, data, create=conditional),
                opts,
                engine.is_transient,
            )
        except FileExistsError as e:
            beat.stop()
            self._release(engine, run, opts, remove_data=False)
            raise RunExistsError(
                "another call committed this run first",
                uri=shown,
                hint="give each call its own output_uri (e.g. add {call_id})",
            ) from e
        except BaseException:
            # Nothing was committed: give the run back (what is under it, which the claim
            # proved ours, and the lock), so that a retry or another call can take it. A
            # replaced run whose manifest is still there is left as it is; only the lock goes.
            beat.stop()
            self._release(engine, run, opts, remove_data=old_gone)
            raise
        beat.stop()  # before the lock goes: a late beat would write it again
        self._clean(engine, run, request.manifest, opts, claim)
        reused = [e for e in request.files if e.path in reuse]
        return ExportOutcome(
            uri=uri,
            payload=Location(uri, dict(request.target.options)),
            extra_stats={
                "reused_files": len(reused),
                "reused_bytes": sum(e.size for e in reused),
                "engine": engine.name,
            },
        )

    @staticmethod
    def _verified_reuse(
        engine: Engine, run: str, request: ExportRequest, claim: _Claim, opts: Options
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
                read = functools.partial(engine.get, key)
                data = with_retries(f"reading {e.path} back", read, opts, engine.is_transient)
            except FileNotFoundError:
                continue
            if checksum.of_bytes(data, request.checksum) == e.digest:
                ok.add(e.path)
        return ok

    def list_runs(self, target: Target) -> list[RunInfo]:
        """Runs under a prefix: each manifest is a run; a lock without one is incomplete."""
        engine, prefix, opts = self._open(target.uri, target.options)
        scheme = target.scheme
        keys = list(
            with_retries(
                "listing the prefix", lambda: engine.listing(prefix), opts, engine.is_transient
            )
        )
        manifests = [k for k in keys if k.endswith("/" + MANIFEST_NAME) or k == MANIFEST_NAME]
        locks = [k for k in keys if k.endswith("/" + LOCK_NAME)]
        got = (
            with_retries(
                "reading manifests", lambda: engine.get_many(manifests), opts, engine.is_transient
            )
            if manifests
            else {}
        )
        runs = []
        for key, data in sorted(got.items()):
            run = key.rsplit("/", 1)[0]
            uri = f"{scheme}://{run}"
            try:
                runs.append(RunInfo.from_manifest(uri, Manifest.from_bytes(data, uri=uri)))
            except IntegrityError as e:  # one bad manifest never hides the good runs
                runs.append(RunInfo(uri=uri, status="damaged", reason=e.message))
        done = {k.rsplit("/", 1)[0] for k in manifests}
        for key in locks:
            run = key.rsplit("/", 1)[0]
            if run not in done:
                runs.append(RunInfo(uri=f"{scheme}://{run}", status="incomplete"))
        for run, shards in incomplete_runs(keys, done, engine, opts).items():
            runs.append(RunInfo(uri=f"{scheme}://{run}", status="incomplete", shards=shards))
        return sorted(runs, key=lambda r: r.uri)

    def open_run(self, target: Target) -> RunReader:
        engine, run, opts = self._open(target.uri, target.options)
        return BlobReader(redact(target.uri), engine, run, opts)

    def resume_reader(self, target: Target, prepared: Mapping[str, str]) -> RunReader:
        """In the worker, with the same storage options the export uses."""
        return self.open_run(target)

    def materialize(
        self, result: ExportResult[Any], dest: Path, *, overwrite: bool = False
    ) -> None:
        loc = result.payload
        if not isinstance(loc, Location):
            raise MaterializeError("this result does not say where its run is stored")
        engine, run, opts = self._open(loc.uri, loc.options)
        shown = redact(loc.uri)
        committed = read_manifest(engine, run, shown, opts)
        if committed is None:
            raise MaterializeError(f"{shown} has no manifest: the run is incomplete or gone")
        if not rules.same_commit(committed.run, result.manifest.run):
            raise IntegrityError(
                "the run at this URI was replaced by another call", uri=shown, bad=[MANIFEST_NAME]
            )

        reader = BlobReader(shown, engine, run, opts)
        reader.prefetch(committed.files)
        try:
            place_run(dest, committed, reader.read, uri=shown, overwrite=overwrite)
        finally:
            reader.close()


@raysync.hookimpl
def raysync_register_backends(register: raysync.RegisterBackend) -> None:
    register(BlobBackend())

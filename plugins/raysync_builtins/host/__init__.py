"""host-sync backend: bring a call's files home to the driver's machine, with no shared storage.

``host://artifacts/runs/{run_id}`` (relative to the driver's cwd) or ``host:///abs/path/{run_id}``
(absolute on the driver's machine). The worker streams its trees through the Ray object store
to a *sink* actor pinned to the driver's node (node-affinity scheduling, hard), which writes
them into a staging directory next to the run, checks every file's size and digest against
the worker's manifest, writes the manifest and renames the staging directory into place.

Memory: the worker keeps at most ``window`` chunks of ``chunk_size`` bytes in flight; each sink
holds at most ``sink_slots`` chunks at once, whatever the number of senders (write calls
carry object refs, which the sink fetches only when a slot is free). A job has ``sinks`` sinks
(4 by default), processes on the driver's node that receive in parallel; a run always goes to
the same one. So the sinks' data in memory is bounded by ``sinks * sink_slots * chunk_size``
(128 MiB by default), and a sender by ``window * chunk_size`` (32 MiB): back-pressure, not
unbounded queues.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ray

import raysync
from raysync import checksum
from raysync.backend import (
    Capabilities,
    ExportOutcome,
    ExportRequest,
    Leftover,
    Location,
    RunInfo,
    RunReader,
)
from raysync.copy import hashed_source, plan_reuse
from raysync.direxport import export_dir
from raysync.dirgc import delete_dir_leftover, delete_dir_run, dir_leftovers
from raysync.dirrun import (
    DirReader,
    check_visible,
    list_dir_runs,
    materialize_dir,
    prepare_root,
)
from raysync.errors import ConfigError, DestinationError, ExportError, RaySyncError
from raysync.manifest import FileEntry, Manifest
from raysync.result import ExportResult
from raysync.target import Target
from raysync_builtins.host.sink import (
    Options,
    get_or_create_sink,
    sink_index,
    sink_key,
    sink_name,
)


def chunks(
    files: list[FileEntry], chunk_size: int, algorithm: str = checksum.DEFAULT
) -> Iterator[tuple[list[tuple[str, int, int]], bytes]]:
    """Pack files into messages of at most ``chunk_size`` bytes, hashing them as they are read.

    Small files share a message; a large file spans several. Each file is read once.
    """
    items: list[tuple[str, int, int]] = []
    buf = bytearray()
    for entry in files:
        with hashed_source(entry, algorithm) as f:
            while True:
                offset = f.seen
                data = f.read(chunk_size - len(buf))
                if data:
                    items.append((entry.path, offset, len(data)))
                    buf += data
                if len(buf) >= chunk_size:
                    yield items, bytes(buf)
                    items, buf = [], bytearray()
                    continue
                if not data:
                    break
    if items:
        yield items, bytes(buf)


#: A run at most this large goes to the sink in one call, its bytes inline (the sink holds at
#: most max_concurrency of them: 1,000 x 256 KiB per sink in the worst case).
SMALL_RUN = 256 * 1024


class HostSyncBackend:
    """Streams each call's files through the object store to the driver's machine."""

    name = "host"
    #: Its runs are listed and deleted on the driver's machine, not from a worker.
    prunes_in_worker = False
    schemes = ("host",)
    default = False
    capabilities = Capabilities(atomic_rename=True, read_back=True, needs_driver=True, shards=True)

    def check(self, target: Target) -> None:
        Options.parse(target.options)
        if not target.path.strip("/"):
            raise ConfigError("host:// needs a path", hint="e.g. host://artifacts/runs/{run_id}")

    def prepare(self, target: Target) -> Mapping[str, str]:
        opts = Options.parse(target.options)
        root = Path(target.local_path(target.root or "."))
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DestinationError(f"cannot create {root}: {e}", uri=f"host://{root}") from e
        if not ray.is_initialized():
            return {"root": str(root)}
        ctx = ray.get_runtime_context()
        allowed = []
        for index in range(opts.sinks):
            sink = get_or_create_sink(opts, index)
            key = sink_key((ctx.gcs_address, sink_name(ctx.get_job_id(), opts, index)))
            allowed.append(sink.allow.remote(os.path.normpath(root), key))
        ray.get(allowed)
        return {
            **prepare_root(root),  # a worker on this very machine writes directly
            "sink": sink_name(ctx.get_job_id(), opts),
            "sinks": str(opts.sinks),
            "namespace": ctx.namespace,
            "node": ctx.get_node_id(),
        }

    def export(self, request: ExportRequest) -> ExportOutcome:
        opts = Options.parse(request.target.options)
        dest = Path(request.target.local_path())
        uri = f"host://{dest}"
        name = request.prepared.get("sink")
        if not name or not ray.is_initialized():
            raise DestinationError(
                "host:// needs Ray: the driver's sink actor receives the files",
                uri=uri,
                hint="call ray.init() before decorating or calling the function",
            )
        if opts.direct and _on_drivers_machine(request.prepared, dest, uri):
            return _export_here(request, dest, uri)
        try:
            sink = _sink_for(request.prepared, str(dest))
        except ValueError as e:
            raise self._gone(request, uri) from e
        sid = None
        reused: list[FileEntry] = []
        small = request.shard is None and request.manifest.total_bytes <= SMALL_RUN
        try:
            job_id = ray.get_runtime_context().get_job_id()
            run = dict(request.manifest.run)
            if small:  # one round trip: most calls write a few small files
                packed = list(chunks(request.files, opts.chunk_size, request.manifest.checksum))
                items = packed[0][0] if packed else []
                refs = [packed[0][1]] if packed else []  # inline: smaller than a put
                del packed
                committed = ray.get(
                    sink.put_small.remote(
                        str(dest), run, request.conflict, job_id, items, refs,
                        request.manifest.to_bytes(),
                    )
                )  # fmt: skip
                return ExportOutcome(uri=f"host://{committed}", payload=Location(committed))
            sid, committed_bytes = ray.get(
                sink.open.remote(str(dest), run, request.conflict, job_id, request.shard)
            )
            if not sid:  # a shard's retry after the run was committed with its shard
                return ExportOutcome(uri=uri, payload=Location(str(dest)), committed=False)
            # Incremental: the sink links what the replaced run already holds.
            send = request.files
            if committed_bytes is not None:
                previous = Manifest.from_bytes(committed_bytes, uri=uri)
                reuse = plan_reuse(request.files, previous, request.checksum)
                unlinked = (
                    set(ray.get(sink.link.remote(sid, sorted(reuse), request.checksum)))
                    if reuse
                    else set()
                )
                reused = [e for e in request.files if e.path in reuse - unlinked]
                send = [e for e in request.files if e.path not in reuse or e.path in unlinked]
            in_flight: deque[Any] = deque()
            for items, data in chunks(send, opts.chunk_size, request.manifest.checksum):
                in_flight.append(sink.write.remote(sid, items, [ray.put(data)]))
                del data
                if len(in_flight) >= opts.window:
                    ray.get(in_flight.popleft())
            ray.get(list(in_flight))
            data = request.manifest.to_bytes()
            if request.shard is not None:
                committed, whole = ray.get(sink.commit_shard.remote(sid, data))
            else:
                committed, whole = ray.get(sink.commit.remote(sid, data)), True
        except ray.exceptions.RayTaskError as e:
            if sid is not None:
                sink.abort.remote(sid)
            if isinstance(e.cause, RaySyncError):
                raise e.cause from None
            raise
        except ray.exceptions.RayActorError as e:
            _HANDLES.clear()
            raise self._gone(request, uri) from e
        except BaseException:
            if sid is not None:
                sink.abort.remote(sid)
            raise
        return ExportOutcome(
            uri=f"host://{committed}",
            payload=Location(committed),
            extra_stats={"reused_files": len(reused), "reused_bytes": sum(e.size for e in reused)},
            committed=whole,
        )

    def _gone(self, request: ExportRequest, uri: str) -> ExportError:
        return ExportError(
            "the driver's sink actor is gone (did the driver exit?)",
            backend=self.name,
            uri=uri,
            workspace=str(request.workspace),
            hint="keep the driver running until its tasks finish; the files are kept on this node",
        )

    def list_runs(self, target: Target) -> list[RunInfo]:
        """Runs under a path on this machine (run it on the driver's machine)."""
        return list_dir_runs(Path(target.local_path()), lambda p: f"host://{p}")

    def open_run(self, target: Target) -> RunReader:
        path = Path(target.local_path())
        return DirReader(f"host://{path}", path)

    def delete_run(self, target: Target) -> int:
        """On the driver's machine, like :meth:`list_runs`."""
        path = Path(target.local_path())
        return delete_dir_run(path, f"host://{path}")

    def list_leftovers(self, target: Target) -> list[Leftover]:
        return dir_leftovers(Path(target.local_path()), lambda p: f"host://{p}")

    def delete_leftover(self, target: Target, leftover: Leftover) -> None:
        delete_dir_leftover(leftover)

    def location(self, target: Target) -> str:
        """The run's path on the driver's machine (normalised: it may not exist here)."""
        return "file://" + os.path.normpath(target.local_path())

    def resume_reader(self, target: Target, prepared: Mapping[str, str]) -> RunReader:
        """In the worker: the run on the driver's machine, read through the sink actor."""
        dest = Path(target.local_path())
        uri = f"host://{dest}"
        name = prepared.get("sink")
        if not name or not ray.is_initialized():
            raise DestinationError("host:// needs Ray: the driver's sink serves the run", uri=uri)
        try:
            sink = _sink_for(prepared, str(dest))
        except ValueError as e:
            raise DestinationError(
                "the driver's sink actor is gone (did the driver exit?)", uri=uri
            ) from e
        opts = Options.parse(target.options)
        return SinkReader(uri, sink, str(dest), opts)

    def materialize(
        self, result: ExportResult[Any], dest: Path, *, overwrite: bool = False
    ) -> None:
        loc = result.payload
        src = Path(loc.uri) if isinstance(loc, Location) else Path(result.uri[len("host://") :])
        materialize_dir(
            src,
            result,
            dest,
            overwrite=overwrite,
            hint="host:// runs live on the driver's machine: materialize there",
        )


def _on_drivers_machine(prepared: Mapping[str, str], dest: Path, uri: str) -> bool:
    """This worker runs on the driver's node and sees the driver's root (its token): it can
    commit the run itself, as local-copy does, without the round trip through a sink."""
    if not prepared.get("token") or prepared.get("node") != ray.get_runtime_context().get_node_id():
        return False
    try:
        check_visible(prepared, dest, uri)
    except DestinationError:
        return False
    return True


def _export_here(request: ExportRequest, dest: Path, uri: str) -> ExportOutcome:
    """The directory-run protocol, from a worker on the driver's machine."""
    return export_dir(request, dest, uri, payload=Location(str(dest)))


#: Sink handles this worker looked up (a lookup is a round trip to the GCS per call).
_HANDLES: dict[tuple[str | None, str], Any] = {}


def _sink_for(prepared: Mapping[str, str], dest: str) -> Any:
    """The sink that serves the run at ``dest`` (a hash of the path picks one of the job's
    sinks, so a run and its retries always meet the same one)."""
    base, namespace = prepared["sink"], prepared.get("namespace")
    index = sink_index(dest, int(prepared.get("sinks", "1")))
    name = base if index == 0 else f"{base}-{index}"
    handle = _HANDLES.get((namespace, name))
    if handle is None:
        handle = _HANDLES[(namespace, name)] = ray.get_actor(name, namespace=namespace)
    return handle


class SinkReader(RunReader):
    """Reads a run on the driver's machine from a worker, chunk by chunk through the sink
    (at most ``window`` chunks of ``chunk_size`` bytes in flight)."""

    def __init__(self, uri: str, sink: Any, dest: str, opts: Options) -> None:
        super().__init__(uri)
        self.sink, self.dest, self.opts = sink, dest, opts
        self.job_id = ray.get_runtime_context().get_job_id()

    def _get(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RaySyncError):
                raise e.cause from None
            raise

    def manifest(self) -> Manifest | None:
        data = self._get(self.sink.read_manifest.remote(self.dest, self.job_id))
        return None if data is None else Manifest.from_bytes(data, uri=self.uri)

    def read(self, entry: FileEntry) -> Iterator[bytes]:
        size = self.opts.chunk_size
        offsets = iter(range(0, entry.size, size))
        in_flight: deque[Any] = deque()
        for offset in offsets:
            in_flight.append(
                self.sink.read.remote(self.dest, self.job_id, entry.path, offset, size)
            )
            if len(in_flight) >= self.opts.window:
                yield self._get(in_flight.popleft())
        while in_flight:
            yield self._get(in_flight.popleft())


@raysync.hookimpl
def raysync_register_backends(register: raysync.RegisterBackend) -> None:
    register(HostSyncBackend())


__all__ = ["HostSyncBackend", "Options", "chunks", "get_or_create_sink", "sink_name"]

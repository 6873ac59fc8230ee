"""The host-sync sink: the actor on the driver's node that receives, checks and commits runs,
and how the driver creates it (one per job and sink settings, pinned to its node)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import secrets
import stat
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from raysync import checksum, dirgc, dirshards, rules
from raysync.backend import Shard
from raysync.dirrun import (
    check_conflict,
    check_inside,
    commit_dir,
    link_reused,
    staging_dir,
)
from raysync.errors import (
    ConfigError,
    DestinationError,
    ExportError,
    IntegrityError,
)
from raysync.fsops import makedirs, remove_tree
from raysync.manifest import MANIFEST_NAME, Manifest, check_relpath, safe_join
from raysync.shards import set_id

MIB = 1024 * 1024
SINK_PREFIX = "raysync-host-sink"


@dataclass(frozen=True)
class Options:
    """The host-sync backend's storage_options."""

    #: Bytes per message from a worker to the sink (small files are packed together).
    chunk_size: int = 8 * MIB
    #: Messages a worker keeps in flight (its memory bound is window * chunk_size).
    window: int = 4
    #: Chunks the sink holds at once, all senders together (targets with the same sink
    #: settings share one sink per job).
    sink_slots: int = 4
    #: Seconds a session may stay silent before the sink drops it (its worker died).
    idle_timeout: float = 600.0
    #: Sink actors per job and settings, each a process on the driver's node receiving in
    #: parallel; a run always goes to the same one (chosen by a hash of its path).
    sinks: int = 4
    #: A worker on the driver's node commits the run itself (as local-copy does), without the
    #: round trip through a sink; ``False`` sends every run through a sink.
    direct: bool = True

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> Options:
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"unknown storage_options {unknown} for the host backend",
                hint=f"its options are {sorted(cls.__dataclass_fields__)}",
            )
        for k, v in options.items():
            if k == "direct":
                if not isinstance(v, bool):
                    raise ConfigError(f"storage_options['direct'] must be True or False, not {v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                raise ConfigError(f"storage_options[{k!r}] must be a positive number, not {v!r}")
        opts = cls(**options)
        if opts.sinks != int(opts.sinks) or not 1 <= opts.sinks <= 64:
            raise ConfigError("storage_options['sinks'] must be a whole number from 1 to 64")
        if opts.chunk_size < 64 * 1024:
            raise ConfigError("storage_options['chunk_size'] must be at least 64 KiB")
        return opts


@dataclass
class _Session:
    dest: Path
    staging: Path
    #: The sending call's manifest ``run`` (its identity and function).
    run: dict[str, Any]
    conflict: str
    decision: rules.Decision
    #: Files hard-linked from the run being replaced (incremental), verified when linked:
    #: those are not sent.
    linked: set[str] = field(default_factory=set)
    last: float = field(default_factory=time.monotonic)
    #: One shard of a run many calls write (:mod:`raysync.dirshards`).
    shard: Shard | None = None
    #: The busy mark on the staging directory (:func:`raysync.dirgc.mark`).
    mark: int = -1


class HostSink:
    """The actor on the driver's node that receives and commits runs (async: many senders).

    It writes only under the roots its own driver allowed: :meth:`allow` takes the key the
    driver created the sink with (kept in the driver's memory), and :meth:`open` only calls of
    the sink's own job. Ray authenticates no caller inside a cluster, so this keeps other
    jobs' code from widening where the sink writes, by mistake or by design."""

    def __init__(self, sink_slots: int, idle_timeout: float, job_id: str, key: str) -> None:
        self.roots: set[Path] = set()
        self.sessions: dict[str, _Session] = {}
        self.slots = asyncio.Semaphore(sink_slots)
        self.idle_timeout = idle_timeout
        self.job_id = job_id
        self._key = key
        #: The largest chunk a reader gets in one call.
        self.chunk_cap = 64 * MIB
        self.held = 0
        self.peak_held = 0
        self.start_rss = _rss_peak()
        self.received = 0

    async def allow(self, root: str, key: str) -> None:
        """The driver allows writes under ``root`` (the static part of a target's path)."""
        if not secrets.compare_digest(key, self._key):
            raise DestinationError(
                "only the driver that created this sink may allow a destination root",
                uri=f"host://{root}",
            )
        path = Path(root)
        if not path.is_absolute() or os.path.normpath(root) != root or root == "/":
            raise DestinationError("a sink root must be a normal absolute path", uri=root)
        self.roots.add(path)

    async def open(
        self,
        dest: str,
        run: dict[str, Any],
        conflict: str,
        job_id: str,
        shard: Shard | None = None,
    ) -> tuple[str, bytes | None]:
        """Start a transfer: (session id, the manifest of the run it replaces, if any — the
        worker sends only files that run does not already hold)."""
        self._sweep()
        uri = f"host://{dest}"
        path = self._allowed(dest, job_id)
        # An earlier attempt of the same call (its worker died) is dropped: a retry replaces.
        for sid, s in list(self.sessions.items()):
            if s.dest == path and rules.same_call(s.run, run):
                self._drop(sid)
        sid = uuid.uuid4().hex
        if shard is not None:
            # Never a set id or a name as sent: the area is derived here (a worker's
            # Shard could otherwise name a directory outside every root).
            shard = Shard(str(shard.name), shard.count, set_id(run))
            if not dirshards.check_dest(path, run, uri, shard):
                return "", None  # a retry after the commit: its shard is in the run
            staged = dirshards.stage_dir(path, shard)
            check_inside(root_of(self.roots, path), staged, uri)
            self.sessions[sid] = _Session(
                path, staged, dict(run), conflict, rules.Decision(False), shard=shard
            )
            self.sessions[sid].mark = dirgc.mark(staged)
            return sid, None
        decision = check_conflict(path, run=run, conflict=conflict, uri=uri)
        staging = staging_dir(path)
        makedirs(staging.parent)
        staging.mkdir()
        self.sessions[sid] = _Session(path, staging, dict(run), conflict, decision)
        self.sessions[sid].mark = dirgc.mark(staging)
        previous = decision.previous
        return sid, (previous.to_bytes() if previous is not None else None)

    def _allowed(self, dest: str, job_id: str) -> Path:
        """``dest`` as a run path this sink serves: its own job's, strictly inside a root
        the driver allowed."""
        uri = f"host://{dest}"
        if job_id != self.job_id:
            raise DestinationError(f"this sink serves job {self.job_id} only", uri=uri)
        if not os.path.isabs(dest) or os.path.normpath(dest) != dest:
            raise DestinationError("a run path must be a normal absolute path", uri=uri)
        path = Path(dest)
        root = next((r for r in self.roots if path.is_relative_to(r)), None)
        if root is None:
            raise DestinationError("this path is outside every root the driver prepared", uri=uri)
        check_inside(root, path, uri)
        return path

    def _readable(self, dest: str, job_id: str) -> Path:
        """:meth:`_allowed`, and no symbolic link between the root and the run."""
        path = self._allowed(dest, job_id)
        root = next(r for r in self.roots if path.is_relative_to(r))
        if not os.path.realpath(path).startswith(os.path.realpath(root) + os.sep):
            raise DestinationError("this run is reached through a link", uri=f"host://{dest}")
        return path

    async def read_manifest(self, dest: str, job_id: str) -> bytes | None:
        """The manifest of the run at ``dest`` (``resume=True`` reads it from a worker)."""
        path = self._readable(dest, job_id)
        async with self.slots:
            try:
                return await asyncio.to_thread(_read_listed, path, MANIFEST_NAME, 0, None)
            except (FileNotFoundError, NotADirectoryError):
                return None

    async def read(self, dest: str, job_id: str, rel: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of a file the manifest of the run at ``dest`` lists
        (one of the sink's slots while read: the memory bound holds for readers too)."""
        path = self._readable(dest, job_id)
        uri = f"host://{dest}"
        async with self.slots:
            try:
                data = await asyncio.to_thread(_read_listed, path, MANIFEST_NAME, 0, None)
                listed = {f.path: f.size for f in Manifest.from_bytes(data, uri=uri).files}
                if check_relpath(rel) not in listed:
                    raise DestinationError(f"{rel!r} is not a file of this run", uri=uri)
                size = max(0, min(size, listed[rel] - offset, self.chunk_cap))
                return await asyncio.to_thread(_read_listed, path, rel, offset, size)
            except OSError as e:
                raise DestinationError(f"cannot read {rel!r} of this run: {e}", uri=uri) from None

    async def link(self, sid: str, paths: list[str], algorithm: str) -> list[str]:
        """Hard-link ``paths`` from the run being replaced into the staging directory, each
        re-hashed against its digest; the paths that were not linked (the worker sends
        those)."""
        session = self._session(sid)
        previous = session.decision.previous
        entries = {f.path: f for f in previous.files} if previous is not None else {}

        def link_all() -> list[str]:
            pairs = []
            for path in paths:
                entry = entries.get(path)
                if entry is None:
                    continue
                out = safe_join(session.staging, path)
                makedirs(out.parent)
                pairs.append((entry, safe_join(session.dest, path), str(out)))
            linked = link_reused(pairs, algorithm)
            session.linked |= linked
            return [p for p in paths if p not in linked]

        session.last = time.monotonic()
        return await asyncio.to_thread(link_all)

    async def write(self, sid: str, items: list[tuple[str, int, int]], refs: list[Any]) -> int:
        """Write one chunk: ``items`` are (path, offset in file, length) slices of the chunk,
        whose bytes are the object ``refs[0]`` (nested in a list, so Ray does not fetch it
        before a slot is free)."""
        session = self._session(sid)
        async with self.slots:
            data = await refs[0]
            self.held += len(data)
            self.peak_held = max(self.peak_held, self.held)
            try:
                await asyncio.to_thread(_write_items, session.staging, items, data)
            finally:
                self.held -= len(data)
        session.last = time.monotonic()
        self.received += len(data)
        return len(data)

    async def commit(self, sid: str, manifest_bytes: bytes) -> str:
        session = self._session(sid)
        manifest = Manifest.from_bytes(manifest_bytes, uri=f"host://{session.dest}")
        try:
            await asyncio.to_thread(
                _check_staged, session.staging, manifest, session.dest, session.linked
            )
            (session.staging / MANIFEST_NAME).write_bytes(manifest_bytes)
            commit_dir(
                session.staging,
                session.dest,
                session.decision,
                run=session.run,
                conflict=session.conflict,
                uri=f"host://{session.dest}",
            )
        except BaseException:
            self._drop(sid)
            raise
        self._end(sid)
        return str(session.dest)

    async def commit_shard(self, sid: str, manifest_bytes: bytes) -> tuple[str, bool]:
        """Make the session's staged files its shard; commit the run when the set is
        complete. (the run's path, whether this shard committed it)."""
        session = self._session(sid)
        uri = f"host://{session.dest}"
        manifest = Manifest.from_bytes(manifest_bytes, uri=uri)
        assert session.shard is not None
        try:
            await asyncio.to_thread(
                _check_staged, session.staging, manifest, session.dest, session.linked
            )
            committed = await asyncio.to_thread(
                dirshards.commit_shard, session.staging, session.dest, manifest, session.shard, uri
            )
        except BaseException:
            self._drop(sid)
            raise
        self._end(sid)
        return str(session.dest), committed

    async def put_small(
        self,
        dest: str,
        run: dict[str, Any],
        conflict: str,
        job_id: str,
        items: list[tuple[str, int, int]],
        refs: list[Any],
        manifest_bytes: bytes,
    ) -> str:
        """A run that fits in one chunk, in one call: :meth:`open`, :meth:`write` and
        :meth:`commit` (three round trips are most of a small run's cost). The chunk is still
        fetched only once a slot is free."""
        sid, _ = await self.open(dest, run, conflict, job_id)
        try:
            if items:
                session = self._session(sid)
                async with self.slots:
                    data = refs[0] if isinstance(refs[0], bytes) else await refs[0]
                    self.held += len(data)
                    self.peak_held = max(self.peak_held, self.held)
                    try:
                        _write_items(session.staging, items, data)
                    finally:
                        self.held -= len(data)
                self.received += len(data)
        except BaseException:
            self._drop(sid)
            raise
        return await self.commit(sid, manifest_bytes)

    async def abort(self, sid: str) -> None:
        self._drop(sid)

    async def stats(self) -> dict[str, int]:
        """Bytes held now and at most, and the process's peak RSS growth (for tests)."""
        return {
            "held": self.held,
            "peak_held": self.peak_held,
            "received": self.received,
            "sessions": len(self.sessions),
            "rss_growth": max(0, _rss_peak() - self.start_rss),
        }

    def _session(self, sid: str) -> _Session:
        try:
            return self.sessions[sid]
        except KeyError:
            raise ExportError(
                "the sink dropped this transfer (idle too long, or replaced by a retry)",
                backend="host",
                uri="host://",
                workspace=None,
            ) from None

    def _end(self, sid: str) -> _Session | None:
        s = self.sessions.pop(sid, None)
        if s is not None and s.mark >= 0:
            os.close(s.mark)
            s.mark = -1
        return s

    def _drop(self, sid: str) -> None:
        s = self._end(sid)
        if s is not None:
            remove_tree(s.staging)

    def _sweep(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if now - s.last > self.idle_timeout:
                self._drop(sid)


def root_of(roots: set[Path], path: Path) -> Path:
    return next(r for r in roots if path.is_relative_to(r))


def _read_listed(run: Path, rel: str, offset: int, size: int | None) -> bytes:
    """Read a regular file of the run directory ``run``, refusing a symbolic link anywhere
    from the run directory down (each component opened without following links)."""
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in check_relpath(rel).split("/"):
            nxt = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
            os.close(fd)
            fd = nxt
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(f"{rel} is not a regular file")
        if size is None:
            if st.st_size > 64 * MIB:
                raise FileNotFoundError(f"{rel} is too large for a manifest")
            size = st.st_size
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _write_items(staging: Path, items: list[tuple[str, int, int]], data: bytes) -> None:
    view = memoryview(data)
    pos = 0
    for path, offset, length in items:
        out = safe_join(staging, check_relpath(path))
        makedirs(out.parent)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.pwrite(fd, view[pos : pos + length], offset)
        finally:
            os.close(fd)
        pos += length


def _check_staged(staging: Path, manifest: Manifest, dest: Path, linked: set[str]) -> None:
    """Every file arrived whole: size and digest against the worker's manifest; modes set.
    Files linked from the replaced run were re-hashed when linked; they are checked by size."""
    bad = []
    for f in manifest.files:
        p = safe_join(staging, f.path)
        if f.path in linked:
            if p.stat().st_size != f.size:
                bad.append(f.path)
            continue
        if not p.exists() and f.size == 0:
            makedirs(p.parent)
            p.touch()
        try:
            if p.stat().st_size != f.size or checksum.of_file(p, manifest.checksum) != f.digest:
                bad.append(f.path)
            os.chmod(p, f.mode & 0o777)
        except FileNotFoundError:
            bad.append(f.path)
    if bad:
        raise IntegrityError("files arrived damaged or incomplete", uri=f"host://{dest}", bad=bad)


def sink_name(job_id: str, opts: Options, index: int = 0) -> str:
    """Sink ``index`` of a job and sink settings (targets with other settings get their own)."""
    base = f"{SINK_PREFIX}-{job_id}-{opts.sink_slots}-{opts.idle_timeout:g}"
    return base if index == 0 else f"{base}-{index}"


def sink_index(dest: str, sinks: int) -> int:
    """Which of ``sinks`` sinks serves the run at ``dest`` (always the same one)."""
    return int(hashlib.sha256(dest.encode()).hexdigest()[:8], 16) % max(1, sinks)


#: The driver keeps a handle on each sink it creates: an actor whose handles are all gone is
#: destroyed, and the sink must live as long as the driver (and no longer).
_SINKS: dict[tuple[str, str], Any] = {}


def get_or_create_sink(opts: Options, index: int = 0) -> Any:
    """On the driver: sink ``index`` for these settings, pinned to this node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ctx = ray.get_runtime_context()
    key = (ctx.gcs_address, sink_name(ctx.get_job_id(), opts, index))
    sink = _SINKS.get(key)
    if sink is None:
        sink = _SINKS[key] = (
            ray.remote(HostSink)
            .options(
                name=key[1],
                namespace=ctx.namespace,
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=1000,
                scheduling_strategy=NodeAffinitySchedulingStrategy(ctx.get_node_id(), soft=False),
            )
            .remote(opts.sink_slots, opts.idle_timeout, ctx.get_job_id(), sink_key(key))
        )
    return sink


#: The key each sink this driver created was given: :meth:`HostSink.allow` needs it.
_SINK_KEYS: dict[tuple[str, str], str] = {}


def sink_key(key: tuple[str, str]) -> str:
    return _SINK_KEYS.setdefault(key, secrets.token_hex(16))

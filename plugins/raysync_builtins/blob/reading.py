"""Reading a run back (``materialize``, ``raysync pull`` and ``verify``): files fetched many
at a time, in the order they will be read, within a bytes budget."""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from raysync.backend import RunReader
from raysync.manifest import MANIFEST_NAME, FileEntry, Manifest, check_relpath
from raysync_builtins.blob.packing import read_packed
from raysync_builtins.blob.store import Engine, Options, with_retries


def read_manifest(engine: Engine, run: str, shown: str, opts: Options) -> Manifest | None:
    try:
        data = with_retries(
            "reading the manifest",
            lambda: engine.get(f"{run}/{MANIFEST_NAME}"),
            opts,
            engine.is_transient,
        )
    except FileNotFoundError:
        return None
    return Manifest.from_bytes(data, uri=shown)


class _Job:
    """One file being fetched: its chunks, in order, until ``done``."""

    def __init__(self, entry: FileEntry) -> None:
        self.entry = entry
        self.chunks: deque[bytes] = deque()
        self.done = False
        self.error: BaseException | None = None
        self.abandoned = False


class Prefetch:
    """Fetches ``entries`` in the order they will be read, ``upload_concurrency`` files at a
    time (a small file is one GET, a large one one streamed GET), holding at most
    ``upload_bytes_in_flight`` bytes fetched but not yet taken — except that the file being
    read (the head) may always take one more chunk, so the reader never waits on files
    behind it. :meth:`take` yields one file's bytes; a file taken out of order, or before
    its fetch began, is streamed by the reader itself."""

    def __init__(
        self, engine: Engine, run: str, entries: Sequence[FileEntry], opts: Options
    ) -> None:
        self.engine, self.run, self.opts = engine, run, opts
        self.limit, self.used = opts.upload_bytes_in_flight, 0
        self.cond = threading.Condition()
        self.closed = False
        self.head: str | None = None
        self.jobs: dict[str, _Job] = {}
        self.pool = ThreadPoolExecutor(
            max_workers=opts.upload_concurrency, thread_name_prefix="raysync-get"
        )
        for e in entries:
            self.jobs[e.path] = job = _Job(e)
            self.pool.submit(self._fetch, job)

    def _admit(self, job: _Job, n: int) -> bool:
        """Wait until ``n`` more bytes fit, or ``job`` is the head and its reader has nothing
        left to read; False: stop fetching (abandoned, closed)."""
        with self.cond:
            self.cond.wait_for(
                lambda: (
                    self.closed
                    or job.abandoned
                    or (self.head == job.entry.path and not job.chunks)
                    or self.used + n <= self.limit
                )
            )
            if self.closed or job.abandoned:
                return False
            self.used += n
            return True

    def _fetch(self, job: _Job) -> None:
        entry = job.entry
        key = f"{self.run}/{check_relpath(entry.path)}"
        part = self.opts.upload_part_size
        reserved = 0
        try:
            if entry.size <= part:
                if not self._admit(job, entry.size):
                    return
                reserved = entry.size
                data: bytes = with_retries(
                    f"downloading {entry.path}",
                    functools.partial(self.engine.get, key),
                    self.opts,
                    self.engine.is_transient,
                )
                self._put(job, data, reserved)
                reserved = 0
            else:
                # One streamed GET; its chunks wait for room in the budget (TCP holds the
                # rest of the object back meanwhile).
                if not self._admit(job, part):
                    return
                reserved = part
                for chunk in self.engine.read_chunks(key, part):
                    self._put(job, chunk, reserved)
                    reserved = 0
                    if not self._admit(job, part):
                        return
                    reserved = part
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
            with self.cond:
                job.error = e
        finally:
            with self.cond:
                self.used -= reserved
                job.done = True
                self.cond.notify_all()

    def _put(self, job: _Job, data: bytes, reserved: int) -> None:
        with self.cond:
            self.used += len(data) - reserved
            if job.abandoned or self.closed:
                self.used -= len(data)
            else:
                job.chunks.append(data)
            self.cond.notify_all()

    def _release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def take(self, entry: FileEntry) -> Iterator[bytes]:
        with self.cond:
            job = None
            if entry.path in self.jobs:
                # Files before this one that were not taken are skipped: stop their fetches
                # (a later take of one of them reads it directly).
                for skipped in self._before(entry.path):
                    self._abandon(self.jobs.pop(skipped))
                job = self.jobs.pop(entry.path)
            self.head = entry.path
            self.cond.notify_all()
        if job is None:  # not in the prefetch (or taken twice): read it directly
            key = f"{self.run}/{check_relpath(entry.path)}"
            yield from self.engine.read_chunks(key, self.opts.upload_part_size)
            return
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: job.chunks or job.done or self.closed)
                    if job.chunks:
                        data = job.chunks.popleft()
                        self.used -= len(data)
                        self.cond.notify_all()
                    elif job.error is not None:
                        raise job.error
                    elif job.done:
                        return
                    else:
                        raise RuntimeError("the prefetch was closed")
                yield data
        finally:
            # Stopped early (a failed read, a reader that gave up): drop the rest of the
            # file, so that it neither holds the budget nor is fetched further.
            with self.cond:
                self._abandon(job)

    def _before(self, path: str) -> list[str]:
        """Jobs queued before ``path`` (the files the reader skipped)."""
        out = []
        for p in self.jobs:
            if p == path:
                break
            out.append(p)
        return out

    def _abandon(self, job: _Job) -> None:
        job.abandoned = True
        self.used -= sum(len(c) for c in job.chunks)
        job.chunks.clear()
        self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for job in self.jobs.values():
                self._abandon(job)
        self.pool.shutdown(wait=True, cancel_futures=True)


class BlobReader(RunReader):
    """One run on an object store, read back."""

    def __init__(self, uri: str, engine: Engine, run: str, opts: Options) -> None:
        super().__init__(uri)
        self.engine, self.run, self.opts = engine, run, opts
        self._pack_cache: dict[str, bytes] = {}
        self._prefetch: Prefetch | None = None

    def manifest(self) -> Manifest | None:
        return read_manifest(self.engine, self.run, self.uri, self.opts)

    def prefetch(self, entries: Sequence[FileEntry]) -> None:
        unpacked = [e for e in entries if e.pack is None]
        if unpacked:
            self.close()
            self._prefetch = Prefetch(self.engine, self.run, unpacked, self.opts)

    def read(self, entry: FileEntry) -> Iterator[bytes]:
        if entry.pack is not None:
            yield read_packed(self.engine, self.run, entry, self._pack_cache, self.opts)
            return
        if self._prefetch is not None:
            yield from self._prefetch.take(entry)
            return
        key = f"{self.run}/{check_relpath(entry.path)}"
        yield from self.engine.read_chunks(key, self.opts.upload_part_size)

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

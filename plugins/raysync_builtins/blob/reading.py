"""Reading a run back (``materialize``, ``raysync pull`` and ``verify``): small files fetched
many at a time, in the order they will be read, within a bytes budget; large files streamed."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from raysync.backend import RunReader
from raysync.manifest import MANIFEST_NAME, FileEntry, Manifest, check_relpath
from raysync_builtins.blob.packing import read_packed
from raysync_builtins.blob.store import ByteBudget, Engine, Options, with_retries


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


class Prefetch:
    """Fetches ``entries`` (small files) in order, ``concurrency`` at a time, holding at most
    ``limit`` bytes fetched but not yet taken. :meth:`take` returns one file's bytes; taking
    them in the same order never waits on the budget (an entry not fetched yet is fetched by
    the caller itself)."""

    def __init__(
        self, engine: Engine, run: str, entries: Sequence[FileEntry], opts: Options
    ) -> None:
        self.engine, self.run, self.opts = engine, run, opts
        self.budget = ByteBudget(opts.upload_bytes_in_flight)
        self.futures: dict[str, tuple[Future[bytes], int]] = {}
        self.taken: set[str] = set()
        self.lock = threading.Lock()
        self.closed = False
        self.pool = ThreadPoolExecutor(
            max_workers=opts.upload_concurrency, thread_name_prefix="raysync-get"
        )
        self.feeder = threading.Thread(
            target=self._feed, args=(list(entries),), name="raysync-prefetch", daemon=True
        )
        self.feeder.start()

    def _get(self, path: str) -> bytes:
        key = f"{self.run}/{check_relpath(path)}"
        data: bytes = with_retries(
            f"downloading {path}", lambda: self.engine.get(key), self.opts, self.engine.is_transient
        )
        return data

    def _feed(self, entries: list[FileEntry]) -> None:
        for e in entries:
            held = self.budget.acquire(e.size)
            with self.lock:
                if self.closed or e.path in self.taken:
                    self.budget.release(held)
                    if self.closed:
                        return
                    continue
                self.futures[e.path] = (self.pool.submit(self._get, e.path), held)

    def take(self, entry: FileEntry) -> bytes:
        with self.lock:
            self.taken.add(entry.path)
            found = self.futures.pop(entry.path, None)
        if found is None:
            return self._get(entry.path)
        future, held = found
        try:
            return future.result()
        finally:
            self.budget.release(held)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            pending = list(self.futures.values())
            self.futures.clear()
        for future, held in pending:
            future.cancel()
            self.budget.release(held)
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
        small = [e for e in entries if e.pack is None and e.size <= self.opts.upload_part_size]
        if small:
            self.close()
            self._prefetch = Prefetch(self.engine, self.run, small, self.opts)

    def read(self, entry: FileEntry) -> Iterator[bytes]:
        if entry.pack is not None:
            yield read_packed(self.engine, self.run, entry, self._pack_cache, self.opts)
            return
        if self._prefetch is not None and entry.size <= self.opts.upload_part_size:
            yield self._prefetch.take(entry)
            return
        key = f"{self.run}/{check_relpath(entry.path)}"
        yield from self.engine.read_chunks(key, self.opts.upload_part_size)

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

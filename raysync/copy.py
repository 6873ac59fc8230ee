"""The copy engine backends share: read once, hash and write from the same buffer.

- **One pass.** Every byte is read once; the checksum is computed from the buffer that is
  written, so there is no second read to hash.
- **Streaming.** Large files go through a 1 MiB buffer per thread: memory stays bounded for
  any file size.
- **Parallel, sized to the machine and the destination.** Large files are spread over
  :func:`copy_threads` threads (reads, hashes and writes release the GIL). Small files, where
  the per-file system calls dominate, are split into a few batches — one thread hand-off per
  batch, not per file — on disks, where the threads overlap I/O waits, and copied on one
  thread on memory filesystems (tmpfs), where the work is CPU-bound and threads only contend.
- **Few system calls for small files.** A small file is read with one ``read``, created with
  ``O_EXCL`` and its mode in one ``open``, and written with one ``write``.

- **Reflinks where the file system offers them** (btrfs, XFS with reflink, bcachefs): a
  large file is cloned (``FICLONE``: no data is copied, no space used) and the clone is read
  once to hash it, so the digest describes exactly the bytes committed. Where cloning is
  refused (ext4, tmpfs, across file systems) the engine remembers that for the pair of
  devices and copies.

Why not ``copy_file_range``/``sendfile``: they move the bytes inside the kernel, so the
checksum would need a second read of every file. On ext4 and tmpfs the measured one-pass
loop was as fast as ``copy_file_range`` plus a hashing read; see docs/benchmarks.md.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from raysync import checksum

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None  # type: ignore[assignment]
from raysync.errors import TreeError
from raysync.fsops import fs_type
from raysync.manifest import FileEntry, Manifest

T = TypeVar("T")
R = TypeVar("R")

CHUNK = 1 << 20
#: Files from this size on are streamed in chunks by the thread pool; smaller ones are read
#: whole and copied in batches.
LARGE = CHUNK
#: File system types where copying is CPU-bound (no I/O wait to overlap).
MEMORY_FS = frozenset({"tmpfs", "ramfs", "devtmpfs"})


#: Where the export running in this process reports the bytes it reads (a stack: the
#: innermost :func:`reporting` wins). Set by ``exporting.export_once``.
_SINKS: list[Callable[[int], None]] = []


def progress(n: int) -> None:
    """Report ``n`` more bytes read by the export running in this process. The kit's copy and
    hash helpers call it; a backend that moves bytes its own way may too."""
    if _SINKS and n:
        _SINKS[-1](n)


@contextmanager
def reporting(sink: Callable[[int], None] | None) -> Iterator[None]:
    """While the block runs, :func:`progress` calls ``sink`` (``None``: leaves it as it is)."""
    if sink is None:
        yield
        return
    _SINKS.append(sink)
    try:
        yield
    finally:
        _SINKS.remove(sink)


def copy_threads() -> int:
    """Threads for large files: two per core, at least 2, at most 8."""
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


def map_batched(
    fn: Callable[[T], R], items: Sequence[T], *, threads: int | None = None, batch: int = 64
) -> list[R]:
    """``[fn(x) for x in items]`` on ``threads`` threads, handing each thread a batch of
    items at a time: one pool submit per item costs as much as hashing a small file."""
    n = threads or copy_threads()
    if len(items) < 2 or n < 2:
        return [fn(x) for x in items]
    size = max(1, min(batch, -(-len(items) // n)))
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    with ThreadPoolExecutor(min(n, len(chunks)), thread_name_prefix="raysync-batch") as pool:
        return [r for chunk in pool.map(lambda c: [fn(x) for x in c], chunks) for r in chunk]


def changed_error(entry: FileEntry, seen: int) -> TreeError:
    """The error for a file whose size changed between the scan and the copy."""
    return TreeError(
        f"{entry.path!r} changed size while it was exported ({entry.size} bytes when scanned, "
        f"{seen} read)",
        hint="make sure nothing still writes to the output trees when the call returns "
        "(wait for background threads and subprocesses)",
    )


_UMASK = os.umask(0)
os.umask(_UMASK)
_O_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


def open_source(entry: FileEntry) -> int:
    """Open a workspace file for reading (a file descriptor), proving it is the file the scan
    saw: the same inode on the same device. A directory of the tree swapped for a symlink
    after the scan would otherwise lead the read out of the workspace. An unreadable file is a
    :class:`TreeError` (a problem of the tree, not of the destination)."""
    assert entry.source is not None
    try:
        fd = os.open(entry.source, _O_READ)
    except OSError as e:
        raise TreeError(
            f"cannot read {entry.path!r} from the workspace: {e.strerror}",
            hint="make the output files readable by the worker's user",
        ) from None
    fp = entry.fingerprint
    if fp is not None:
        st = os.fstat(fd)
        if (st.st_ino, st.st_dev) != (fp[3], fp[4]):
            os.close(fd)
            raise TreeError(
                f"{entry.path!r} was replaced while it was exported (another file is at its "
                "path now: a directory swapped for a link?); nothing was committed",
                hint="make sure nothing changes the output trees when the call returns",
            )
    return fd


def open_source_file(entry: FileEntry) -> io.FileIO:
    """:func:`open_source` as a binary file object (unbuffered)."""
    return io.FileIO(open_source(entry), "rb", closefd=True)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _create(dst: str | Path, mode: int) -> int:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    if mode & _UMASK:
        os.fchmod(fd, mode)  # open() applied the umask
    return fd


def copy_small(
    entry: FileEntry,
    dst: str | Path,
    algorithm: str = checksum.DEFAULT,
    digest: Callable[[bytes | memoryview], str] | None = None,
) -> None:
    """Copy a small file with one read and one write; set ``entry.digest``."""
    fd = open_source(entry)
    try:
        data = os.read(fd, entry.size + 1)
        while len(data) < entry.size + 1:
            more = os.read(fd, entry.size + 1 - len(data))
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    if len(data) != entry.size:
        raise changed_error(entry, len(data))
    progress(len(data))
    out = _create(dst, entry.mode & 0o777)
    try:
        _write_all(out, data)
    finally:
        os.close(out)
    entry.digest = (digest or checksum.oneshot(algorithm))(data)


_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_CLONE_REFUSED = frozenset(
    getattr(errno, name)
    for name in ("EOPNOTSUPP", "ENOTSUP", "EXDEV", "EINVAL", "ENOTTY", "ENOSYS", "EPERM")
    if hasattr(errno, name)
)
#: (source device, destination device) pairs that refused a clone: not asked again.
_NO_CLONE: set[tuple[int, int]] = set()


def _clone(src: int, out: int) -> bool:
    """Reflink ``src`` into ``out`` (both open fds); False when the file system cannot."""
    if fcntl is None:
        return False
    key = (os.fstat(src).st_dev, os.fstat(out).st_dev)
    if key in _NO_CLONE:
        return False
    try:
        fcntl.ioctl(out, _FICLONE, src)
    except OSError as e:
        if e.errno in _CLONE_REFUSED:
            _NO_CLONE.add(key)
            return False
        raise
    return True


def copy_and_hash(entry: FileEntry, dst: str | Path, algorithm: str = checksum.DEFAULT) -> None:
    """Copy ``entry.source`` to ``dst`` (created, must not exist) and set ``entry.digest``.

    Streams in 1 MiB chunks, so memory stays bounded for any file size, and reads the
    source once: the checksum is computed from the bytes that were written. Where the file
    system can clone the file, it is cloned and the clone is read once to hash it.
    """
    assert entry.source is not None
    if entry.size < LARGE:
        copy_small(entry, dst, algorithm)
        return
    h = checksum.new(algorithm)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    seen = 0
    with open_source_file(entry) as src:
        out = _create(dst, entry.mode & 0o777)
        try:
            if _clone(src.fileno(), out):
                _hash_file_into(dst, entry, algorithm)  # the digest of what was committed
                return
            while n := src.readinto(buf):
                chunk = view[:n]
                h.update(chunk)
                _write_all(out, chunk)
                seen += n
                progress(n)
        finally:
            os.close(out)
    if seen != entry.size:
        raise changed_error(entry, seen)
    entry.digest = h.hexdigest()


def copy_files(
    jobs: Sequence[tuple[FileEntry, str | Path]],
    algorithm: str = checksum.DEFAULT,
    *,
    dest_fs: Path | None = None,
    threads: int | None = None,
) -> None:
    """Copy every ``(entry, dst)`` pair (parent directories must exist), setting digests.

    ``dest_fs`` is any path on the destination file system; it picks the small-file
    strategy (see the module docstring). The first error is raised once every thread has
    stopped.
    """
    large = [j for j in jobs if j[0].size >= LARGE]
    small = [j for j in jobs if j[0].size < LARGE]
    n = threads or copy_threads()
    many = len(small) >= 256  # fewer are copied on this thread, wherever they go
    parts = min(n, 4) if many and not (dest_fs is not None and fs_type(dest_fs) in MEMORY_FS) else 1
    batches = [small[i::parts] for i in range(parts)]

    digest = checksum.oneshot(algorithm)

    def run_batch(batch: list[tuple[FileEntry, str | Path]]) -> None:
        for entry, dst in batch:
            copy_small(entry, dst, algorithm, digest)

    if not large and parts == 1:
        run_batch(small)
        return
    with ThreadPoolExecutor(n, thread_name_prefix="raysync-copy") as pool:
        futures: list[Future[None]] = [
            pool.submit(copy_and_hash, e, d, algorithm) for e, d in large
        ]
        futures += [pool.submit(run_batch, b) for b in batches[1:]]
        try:
            run_batch(batches[0])
        finally:
            errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error


def hash_entry(entry: FileEntry, algorithm: str = checksum.DEFAULT) -> None:
    """Read ``entry.source`` once and set ``entry.digest`` (for backends that send the
    bytes some other way, e.g. rsync)."""
    assert entry.source is not None
    _hash_file_into(entry.source, entry, algorithm)


def _hash_file_into(path: str | Path, entry: FileEntry, algorithm: str) -> None:
    """Set ``entry.digest`` from the file at ``path``, which must be ``entry.size`` long
    (``entry.source`` itself is opened with :func:`open_source`'s checks)."""
    h = checksum.new(algorithm)
    seen = 0
    src = open_source_file(entry) if path is entry.source else io.FileIO(path, "rb")
    with src as f:
        if entry.size < CHUNK:  # one read (and one more to see the end): no chunk buffer
            data = f.read(entry.size + 1) or b""
            while len(data) <= entry.size and (more := f.read(entry.size + 1 - len(data))):
                data += more  # a short read (network file systems)
            h.update(data)
            seen = len(data)
            progress(seen)
        else:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
                seen += n
                progress(n)
    if seen != entry.size:
        raise changed_error(entry, seen)
    entry.digest = h.hexdigest()


def read_and_hash(entry: FileEntry, into: memoryview, algorithm: str = checksum.DEFAULT) -> None:
    """Read ``entry.source`` into ``into`` (exactly ``entry.size`` bytes) and set its digest."""
    seen = 0
    with open_source_file(entry) as src:
        while seen < entry.size:
            n = src.readinto(into[seen:])
            if not n:
                break
            seen += n
        extra = src.read(1)
    if seen != entry.size or extra:
        raise changed_error(entry, seen + len(extra))
    progress(seen)
    entry.digest = checksum.of_bytes(into, algorithm)


def read_hashed(entry: FileEntry, algorithm: str = checksum.DEFAULT) -> bytes:
    """``entry.source``'s bytes (exactly ``entry.size``), its digest set: for a file sent
    whole from memory (no zeroed buffer to fill, one copy)."""
    with open_source_file(entry) as src:
        data = src.read(entry.size + 1) or b""
        while len(data) <= entry.size and (more := src.read(entry.size + 1 - len(data))):
            data += more  # a short read (network file systems)
    if len(data) != entry.size:
        raise changed_error(entry, len(data))
    progress(len(data))
    entry.digest = checksum.of_bytes(data, algorithm)
    return data


class HashedSource:
    """A file's source being read once and hashed as it is read (see :func:`hashed_source`)."""

    def __init__(self, f: io.FileIO, h: checksum.Hasher) -> None:
        self._f, self._h, self.seen = f, h, 0

    def read(self, n: int = CHUNK) -> bytes:
        """Up to ``n`` bytes; ``b""`` at the end."""
        data = self._f.read(n) or b""
        self._h.update(data)
        self.seen += len(data)
        progress(len(data))
        return data

    def chunks(self, n: int = CHUNK) -> Iterator[bytes]:
        """The rest of the file in pieces of up to ``n`` bytes."""
        return iter(lambda: self.read(n), b"")

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@contextmanager
def hashed_source(entry: FileEntry, algorithm: str = checksum.DEFAULT) -> Iterator[HashedSource]:
    """Read ``entry.source`` once, for a backend that sends the bytes its own way (a zip
    member, an upload stream, a message): every byte read is hashed. When the block ends
    without an error, the file must have been read to its scanned size (else
    :func:`changed_error`) and ``entry.digest`` is set from exactly the bytes read::

        with hashed_source(entry, request.manifest.checksum) as src:
            for chunk in src.chunks():
                out.write(chunk)
    """
    with open_source_file(entry) as f:
        src = HashedSource(f, checksum.new(algorithm))
        yield src
        if src.seen == entry.size:
            src.seen += len(src.read(1))  # a file that grew since the scan
    if src.seen != entry.size:
        raise changed_error(entry, src.seen)
    entry.digest = src.hexdigest()


def hash_file(path: Path, algorithm: str = checksum.DEFAULT) -> str:
    """Hex digest of a file, streamed."""
    return checksum.of_file(path, algorithm)


def plan_reuse(
    entries: Sequence[FileEntry],
    previous: Manifest | None,
    algorithm: str,
    *,
    threads: int | None = None,
) -> set[str]:
    """Incremental export: the paths whose bytes ``previous`` (the run committed at the
    destination) already holds — same path, size, mode and digest, same algorithm.

    Entries whose digest is not known yet (no earlier export of this call hashed them) and
    that have a same-size counterpart are hashed here, in parallel: one read at hashing speed
    instead of a copy. Their ``digest`` is set, so a reused entry needs no further work.
    """
    if previous is None or previous.checksum != algorithm:
        return set()
    old = {f.path: f for f in previous.files if f.pack is None}

    def same_shape(e: FileEntry) -> bool:
        o = old.get(e.path)
        return o is not None and o.size == e.size and o.mode == e.mode

    candidates = [e for e in entries if same_shape(e)]
    unknown = [e for e in candidates if e.digest is None]
    if len(unknown) > 1:
        with ThreadPoolExecutor(threads or copy_threads(), thread_name_prefix="raysync-hash") as p:
            list(p.map(lambda e: hash_entry(e, algorithm), unknown))
    elif unknown:
        hash_entry(unknown[0], algorithm)
    return {e.path for e in candidates if e.digest == old[e.path].digest}


class KnownDigests:
    """Digests an earlier export of the same call computed, by path and fingerprint (size,
    mtime, ctime, inode, device): a file whose fingerprint is unchanged is not read again.

    A file changed less than :attr:`RACY_NS` before an export began could change again within
    the file system's timestamp granularity without changing its fingerprint, so it is not
    remembered (git's "racy" rule): it is hashed again next time.
    """

    RACY_NS = 50_000_000

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, ...], str]] = {}

    def apply(self, files: Sequence[FileEntry]) -> int:
        """Set the digest of every file whose fingerprint is unchanged; how many."""
        n = 0
        for f in files:
            seen = self._known.get(f.path)
            if seen is not None and seen[0] == f.fingerprint:
                f.digest = seen[1]
                n += 1
        return n

    def remember(self, files: Sequence[FileEntry], began_ns: int) -> None:
        """After an export that began at ``began_ns`` (``time.time_ns()``) committed."""
        self._known = {
            f.path: (f.fingerprint, f.digest)
            for f in files
            if f.fingerprint is not None
            and f.digest is not None
            and f.fingerprint[2] < began_ns - self.RACY_NS
        }

"""One-pass copy helpers backends share: read once, hash and write from the same buffer."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from raysync.errors import TreeError
from raysync.manifest import FileEntry

CHUNK = 1 << 20


def changed_error(entry: FileEntry, seen: int) -> TreeError:
    """The error for a file whose size changed between the scan and the copy."""
    return TreeError(
        f"{entry.path!r} changed size while it was exported ({entry.size} bytes when scanned, "
        f"{seen} read)",
        hint="make sure nothing still writes to the output trees when the call returns "
        "(wait for background threads and subprocesses)",
    )


def copy_and_hash(entry: FileEntry, dst: Path) -> None:
    """Copy ``entry.source`` to ``dst`` (created, must not exist) and set ``entry.sha256``.

    Streams in 1 MiB chunks, so memory stays bounded for any file size, and reads the
    source once: the checksum is computed from the bytes that were written.
    """
    assert entry.source is not None
    h = hashlib.sha256()
    buf = bytearray(min(CHUNK, max(entry.size, 1)))
    view = memoryview(buf)
    seen = 0
    with open(entry.source, "rb") as src, open(dst, "xb") as out:
        while True:
            n = src.readinto(buf)
            if not n:
                break
            chunk = view[:n]
            h.update(chunk)
            out.write(chunk)
            seen += n
    if seen != entry.size:
        raise changed_error(entry, seen)
    os.chmod(dst, entry.mode)
    entry.sha256 = h.hexdigest()


def read_and_hash(entry: FileEntry, into: memoryview) -> None:
    """Read ``entry.source`` into ``into`` (exactly ``entry.size`` bytes) and set its sha256."""
    assert entry.source is not None
    seen = 0
    with open(entry.source, "rb") as src:
        while seen < entry.size:
            n = src.readinto(into[seen:])
            if not n:
                break
            seen += n
        extra = src.read(1)
    if seen != entry.size or extra:
        raise changed_error(entry, seen + len(extra))
    entry.sha256 = hashlib.sha256(into).hexdigest()


def hash_file(path: Path) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()

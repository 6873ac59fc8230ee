"""Packing small files into tar objects, and reading one file back out of a pack."""

from __future__ import annotations

import tarfile
import time
import uuid
from collections.abc import Iterator

from raysync.copy import (
    read_and_hash,
)
from raysync.errors import (
    IntegrityError,
)
from raysync.manifest import FileEntry, check_relpath
from raysync_builtins.blob.consts import _TAR_BLOCK, PACK_PREFIX
from raysync_builtins.blob.store import ByteBudget, Engine, Options, with_retries


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
    engine: Engine, run: str, entry: FileEntry, cache: dict[str, bytes], opts: Options
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
        data = cache[key] = with_retries(
            f"downloading {obj}", lambda: engine.get(key), opts, engine.is_transient
        )
    return data[offset : offset + entry.size]

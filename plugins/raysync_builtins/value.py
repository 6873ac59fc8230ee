"""return-by-value backend: the files travel inside the task result (``output_uri=None``).

All files are read once into one contiguous buffer that is pickled *out of band*
(``pickle.PickleBuffer``), so Ray writes it straight into the object store and the driver
reads it zero-copy: no base64, no per-file ``bytes`` copies. For small data: above
``max_bytes`` (default 256 MiB) the export fails with a hint to use a path or an object store.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import raysync
from raysync.backend import Capabilities, ExportOutcome, ExportRequest
from raysync.copy import read_and_hash
from raysync.errors import ConfigError, MaterializeError, PayloadTooLargeError
from raysync.manifest import check_relpath
from raysync.result import ExportResult, place_run
from raysync.target import Target

DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class Payload:
    """Files packed in one buffer; ``index`` maps a manifest path to (offset, size)."""

    def __init__(self, buffer: Any, index: dict[str, tuple[int, int]]) -> None:
        self.buffer = memoryview(buffer).cast("B")
        self.index = index

    def view(self, path: str) -> memoryview:
        off, size = self.index[check_relpath(path)]
        return self.buffer[off : off + size]

    def __reduce__(self) -> tuple[Any, ...]:
        # Out of band: Ray's serializer hands the buffer to the object store without copying.
        return (_rebuild, (pickle.PickleBuffer(self.buffer), self.index))


def _rebuild(buffer: Any, index: dict[str, tuple[int, int]]) -> Payload:
    return Payload(buffer, index)


class ReturnByValueBackend:
    """Returns the files in the task result; the default when ``output_uri`` is ``None``."""

    name = "value"
    schemes = ("return",)
    default = True
    capabilities = Capabilities(read_back=True, by_value=True)

    def check(self, target: Target) -> None:
        unknown = set(target.options) - {"max_bytes"}
        if unknown:
            raise ConfigError(
                f"return-by-value takes only storage_options max_bytes, got {sorted(unknown)}"
            )
        limit = target.options.get("max_bytes", DEFAULT_MAX_BYTES)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise ConfigError(f"max_bytes must be a positive integer, not {limit!r}")

    def prepare(self, target: Target) -> Mapping[str, str]:
        return {}

    def export(self, request: ExportRequest) -> ExportOutcome:
        limit = int(request.target.options.get("max_bytes", DEFAULT_MAX_BYTES))
        total = request.manifest.total_bytes
        uri = f"return://{request.task_id}"
        if total > limit:
            raise PayloadTooLargeError(
                f"{total:,} bytes in {len(request.files)} files exceed the return-by-value "
                f"limit of {limit:,} bytes",
                backend=self.name,
                uri=uri,
                workspace=str(request.workspace),
                hint="export to a path or an object store instead, e.g. "
                "output_uri='s3://bucket/runs/{run_id}', or raise "
                "storage_options={'max_bytes': ...}",
            )
        buffer = bytearray(total)
        view = memoryview(buffer)
        index: dict[str, tuple[int, int]] = {}
        off = 0
        for entry in request.files:
            read_and_hash(entry, view[off : off + entry.size], request.checksum)
            index[entry.path] = (off, entry.size)
            off += entry.size
        request.manifest.to_bytes()  # checks every file was hashed
        return ExportOutcome(uri=uri, payload=Payload(buffer, index))

    def materialize(
        self, result: ExportResult[Any], dest: Path, *, overwrite: bool = False
    ) -> None:
        payload = result.payload
        if not isinstance(payload, Payload):
            raise MaterializeError(
                "this result carries no files",
                hint="was it produced by the return-by-value backend?",
            )

        def read(entry: Any) -> Iterator[memoryview]:
            yield payload.view(entry.path)

        place_run(dest, result.manifest, read, uri=result.uri, overwrite=overwrite)


@raysync.hookimpl
def raysync_register_backends(register: raysync.RegisterBackend) -> None:
    register(ReturnByValueBackend())

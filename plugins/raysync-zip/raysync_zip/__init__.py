"""raysync-zip: each run as one .zip archive at ``zip+<any fsspec URL>``.

An example of a third-party raysync backend: it lives in its own distribution and is found
through the ``raysync`` entry-point group (see its pyproject.toml). docs/plugins.md walks
through it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import raysync
from raysync import rules
from raysync.backend import (
    Capabilities,
    ExportOutcome,
    ExportRequest,
    Leftover,
    Location,
    RunReader,
)
from raysync.copy import CHUNK, hashed_source
from raysync.errors import (
    ConfigError,
    IntegrityError,
    MaterializeError,
    MissingDependencyError,
    RaySyncError,
)
from raysync.manifest import MANIFEST_NAME, FileEntry, Manifest, check_relpath
from raysync.result import ExportResult, place_run
from raysync.target import Target, redact

PREFIX = "zip+"
COMPRESSION = {"deflated": zipfile.ZIP_DEFLATED, "stored": zipfile.ZIP_STORED}
LOCAL = {"file", "local"}


def _split(uri: str, options: Mapping[str, Any]) -> tuple[str, int, dict[str, Any]]:
    """``zip+s3://b/k.zip`` → (``s3://b/k.zip``, compression, fsspec options)."""
    inner = uri[len(PREFIX) :]
    ours = {k: v for k, v in options.items() if k.startswith("zip_")}
    unknown = sorted(set(ours) - {"zip_compression"})
    if unknown:
        raise ConfigError(
            f"unknown storage_options {unknown} for the zip backend",
            hint="its own option is zip_compression; others go to fsspec",
        )
    name = ours.get("zip_compression", "deflated")
    if name not in COMPRESSION:
        raise ConfigError(f"zip_compression must be one of {sorted(COMPRESSION)}, not {name!r}")
    rest = {k: v for k, v in options.items() if not k.startswith("zip_")}
    return inner, COMPRESSION[name], rest


class ZipBackend:
    name = "zip"
    schemes: tuple[str, ...] = ()  # it serves a family of schemes, below
    default = False
    capabilities = Capabilities(read_back=True)
    accepts_description = "zip+<fsspec URL> (zip+s3://bucket/runs/{run_id}.zip, ...)"

    def accepts_scheme(self, scheme: str) -> bool:
        return scheme.startswith(PREFIX) and len(scheme) > len(PREFIX)

    def check(self, target: Target) -> None:
        import fsspec

        inner, _, _ = _split(target.uri, target.options)
        protocol = target.scheme[len(PREFIX) :]
        if protocol in LOCAL:
            raise ConfigError(
                "the zip backend does not write local paths (a worker cannot prove the path "
                "is the driver's)",
                hint="use a local path or rsync:// with raysync's built-in backends",
            )
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as e:
            raise MissingDependencyError(f"{protocol}://", package=str(e)) from e
        except ValueError as e:
            raise ConfigError(f"fsspec does not know the protocol in {inner!r}") from e

    def prepare(self, target: Target) -> Mapping[str, str]:
        return {}

    @staticmethod
    def _fs(inner: str, options: Mapping[str, Any]) -> tuple[Any, str]:
        import fsspec

        fs, path = fsspec.core.url_to_fs(inner, **options)
        return fs, path

    def _existing(self, fs: Any, path: str, shown: str) -> tuple[Manifest | None, bool]:
        """(the run archived at ``path``, whether something else is there)."""
        if not fs.exists(path):
            return None, False
        try:
            with fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf:
                return Manifest.from_bytes(zf.read(MANIFEST_NAME), uri=shown), False
        except (zipfile.BadZipFile, KeyError, IsADirectoryError, RaySyncError):
            return None, True  # not a raysync archive: never overwritten

    def export(self, request: ExportRequest) -> ExportOutcome:
        uri = request.target.uri
        inner, compression, options = _split(uri, request.target.options)
        shown = redact(uri)
        fs, path = self._fs(inner, options)
        existing, occupied = self._existing(fs, path, shown)
        rules.decide(
            existing=existing,
            occupied=occupied,
            run=request.manifest.run,
            conflict=request.conflict,
            uri=shown,
        )
        with tempfile.TemporaryFile(dir=Path(request.workspace).parent) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=compression) as zf:
                for entry in request.files:
                    self._add(zf, entry, request.manifest.checksum)
                # The manifest is the last member: an archive without one is not a run.
                zf.writestr(MANIFEST_NAME, request.manifest.to_bytes())
            tmp.seek(0)
            # One object: on object stores it appears whole or not at all.
            with fs.open(path, "wb") as out:
                shutil.copyfileobj(tmp, out, CHUNK)
        return ExportOutcome(uri=uri, payload=Location(uri, dict(request.target.options)))

    @staticmethod
    def _add(zf: zipfile.ZipFile, entry: FileEntry, algorithm: str) -> None:
        assert entry.source is not None
        info = zipfile.ZipInfo(check_relpath(entry.path), time.localtime()[:6])
        info.compress_type = zf.compression
        info.external_attr = (entry.mode & 0o777) << 16
        with hashed_source(entry, algorithm) as src, zf.open(info, "w", force_zip64=True) as dst:
            for chunk in src.chunks():
                dst.write(chunk)

    def open_run(self, target: Target) -> RunReader:
        inner, _, options = _split(target.uri, target.options)
        fs, path = self._fs(inner, options)
        return ZipReader(redact(target.uri), fs, path)

    def delete_run(self, target: Target) -> int:
        """Remove the archive, once it is proven a raysync run (it holds a manifest)."""
        inner, _, options = _split(target.uri, target.options)
        fs, path = self._fs(inner, options)
        shown = redact(target.uri)
        existing, occupied = self._existing(fs, path, shown)
        if existing is None:
            raise MaterializeError(
                f"{shown} is not a raysync archive" if occupied else f"{shown} does not exist"
            )
        size = int(fs.size(path))
        fs.rm_file(path)
        return size

    def list_leftovers(self, target: Target) -> list[Leftover]:
        """None: an archive is built in the worker's temporary directory and written as one
        object, so a dead export leaves nothing at the destination."""
        return []

    def delete_leftover(self, target: Target, leftover: Leftover) -> None:
        raise MaterializeError(f"the zip backend leaves no leftovers ({leftover.uri})")

    def resume_reader(self, target: Target, prepared: Mapping[str, str]) -> RunReader:
        return self.open_run(target)

    def materialize(
        self, result: ExportResult[Any], dest: Path, *, overwrite: bool = False
    ) -> None:
        loc = result.payload
        if not isinstance(loc, Location):
            raise MaterializeError("this result does not say where its archive is")
        inner, _, options = _split(loc.uri, loc.options)
        shown = redact(loc.uri)
        fs, path = self._fs(inner, options)
        if not fs.exists(path):
            raise MaterializeError(f"{shown} does not exist")
        with fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            committed = Manifest.from_bytes(zf.read(MANIFEST_NAME), uri=shown)
            if not rules.same_commit(committed.run, result.manifest.run):
                raise IntegrityError(
                    "the archive was replaced by another call", uri=shown, bad=[MANIFEST_NAME]
                )

            def read(entry: FileEntry) -> Iterator[bytes]:
                with zf.open(entry.path) as member:
                    yield from iter(lambda: member.read(CHUNK), b"")

            place_run(dest, committed, read, uri=shown, overwrite=overwrite)


class ZipReader(RunReader):
    """Reads a run from its archive (``raysync verify``/``pull``, and ``resume=True``)."""

    def __init__(self, uri: str, fs: Any, path: str) -> None:
        super().__init__(uri)
        self._file: Any = None
        self._zip: zipfile.ZipFile | None = None
        if fs.exists(path):
            self._file = fs.open(path, "rb")
            try:
                self._zip = zipfile.ZipFile(self._file)
            except zipfile.BadZipFile as e:
                self._file.close()
                raise IntegrityError(f"not a zip archive: {e}", uri=uri, bad=[path]) from None

    def manifest(self) -> Manifest | None:
        if self._zip is None:
            return None
        try:
            data = self._zip.read(MANIFEST_NAME)
        except KeyError:
            raise IntegrityError(
                "the archive holds no manifest", uri=self.uri, bad=[MANIFEST_NAME]
            ) from None
        return Manifest.from_bytes(data, uri=self.uri)

    def read(self, entry: FileEntry) -> Iterator[bytes]:
        assert self._zip is not None
        with self._zip.open(check_relpath(entry.path)) as member:
            yield from iter(lambda: member.read(CHUNK), b"")

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._file.close()
            self._zip = None


@raysync.hookimpl
def raysync_register_backends(register: raysync.RegisterBackend) -> None:
    register(ZipBackend())

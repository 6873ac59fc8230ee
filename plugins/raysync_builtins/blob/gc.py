"""Removing runs and what dead exports left on an object store (``raysync rm``/``gc``,
``keep_last``).

- **Heartbeat.** An export re-writes its run's lock every :func:`heartbeat` seconds
  (``RAYSYNC_HEARTBEAT_SECONDS``, 10 by default) while it runs (:class:`Heartbeat`); a lock
  that has not changed for three heartbeats belongs to a dead export. So does a shard area
  that has not changed for as long.
- **Leftovers**: a dead lock with the objects under its run that no manifest lists (what the
  dead export uploaded); the area of an incomplete sharded run with the objects its intents
  name; incomplete multipart uploads (S3) under the prefix whose run has no live lock.
- **Deleting a run**: its manifest first (a reader sees it whole or not at all), then the
  objects it lists. A run holding objects its manifest does not list, or a live lock, is
  never deleted.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from raysync.backend import Leftover
from raysync.errors import DestinationError, RunExistsError
from raysync.manifest import MANIFEST_NAME
from raysync.shards import AREA
from raysync.target import Target, redact
from raysync_builtins.blob.consts import LOCK_NAME, PACK_PREFIX
from raysync_builtins.blob.reading import read_manifest
from raysync_builtins.blob.store import Engine, Options, log, with_retries


def heartbeat() -> float:
    try:
        return max(0.2, float(os.environ.get("RAYSYNC_HEARTBEAT_SECONDS", 10)))
    except ValueError:
        return 10.0


class Heartbeat:
    """Re-writes ``key`` with ``body`` every :func:`heartbeat` seconds until :meth:`stop`."""

    def __init__(self, engine: Engine, key: str, body: bytes) -> None:
        self.engine, self.key, self.body = engine, key, body
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="raysync-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.done.wait(heartbeat()):
            try:
                self.engine.put(self.key, self.body, create=False)
            except Exception as e:  # noqa: BLE001 - the next beat tries again
                log.debug("raysync: heartbeat of %s failed: %s", self.key, e)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def _age(info: dict[str, Any], now: float) -> float:
    modified = info.get("modified")
    return now - modified if isinstance(modified, (int, float)) else float("inf")


class BlobGc:
    """The delete and clean-up half of :class:`raysync_builtins.blob.BlobBackend`."""

    @staticmethod
    def _open(uri: str, options: Any) -> tuple[Engine, str, Options]:  # pragma: no cover
        raise NotImplementedError

    def delete_run(self, target: Target) -> int:
        engine, run, opts = self._open(target.uri, target.options)
        shown = redact(target.uri)
        found = with_retries(
            "listing the run", lambda: engine.listing(run), opts, engine.is_transient
        )
        manifest_path, lock = f"{run}/{MANIFEST_NAME}", f"{run}/{LOCK_NAME}"
        if manifest_path not in found:
            raise DestinationError(
                "there is no committed raysync run here; raysync deletes only its own runs",
                uri=shown,
                hint="raysync ls lists the runs under a prefix",
            )
        if lock in found and _age(found[lock], time.time()) < 3 * heartbeat():
            raise RunExistsError("an export is writing this run right now", uri=shown)
        manifest = read_manifest(engine, run, shown, opts)
        assert manifest is not None
        listed = {f"{run}/{f.path}" for f in manifest.files}
        listed |= {f"{run}/{f.pack['object']}" for f in manifest.files if f.pack is not None}
        unlisted = [k for k in found if k not in listed and k not in (manifest_path, lock)]
        if unlisted:
            raise RunExistsError(
                f"the run holds {unlisted[0][len(run) + 1 :]!r} (and {len(unlisted) - 1} more), "
                "which its manifest does not list; raysync never deletes them",
                uri=shown,
                hint="move them out of the run, then remove it",
            )
        with_retries(
            "removing the manifest",
            lambda: engine.delete([manifest_path]),
            opts,
            engine.is_transient,
        )
        rest = [k for k in listed if k in found] + ([lock] if lock in found else [])
        if rest:
            with_retries("removing the run", lambda: engine.delete(rest), opts, engine.is_transient)
        return manifest.total_bytes

    def list_leftovers(self, target: Target) -> list[Leftover]:
        engine, prefix, opts = self._open(target.uri, target.options)
        scheme = target.scheme
        found = with_retries(
            "listing the prefix", lambda: engine.listing(prefix), opts, engine.is_transient
        )
        out = [*self._dead_locks(engine, found, scheme, opts), *self._dead_areas(found, scheme)]
        out += self._multipart(target, prefix, found)
        return sorted(out, key=lambda x: x.ref)

    def _dead_locks(
        self, engine: Engine, found: dict[str, Any], scheme: str, opts: Options
    ) -> list[Leftover]:
        now, out = time.time(), []
        for key, info in found.items():
            if not key.endswith("/" + LOCK_NAME):
                continue
            age = _age(info, now)
            if age < 3 * heartbeat():
                continue  # a live export
            run = key.rsplit("/", 1)[0]
            stale = self._unlisted(engine, run, found, opts)
            size = sum(int(found[k].get("size") or 0) for k in stale)
            out.append(
                Leftover(f"{scheme}://{run}", "dead export (lock)", size, age, ref=f"lock|{run}")
            )
        return out

    @staticmethod
    def _unlisted(engine: Engine, run: str, found: dict[str, Any], opts: Options) -> list[str]:
        """The objects directly under ``run`` that its manifest (if any) does not list, and
        the lock; never what lies under another run or a shard area below it."""
        manifest = (
            read_manifest(engine, run, redact(run), opts)
            if f"{run}/{MANIFEST_NAME}" in found
            else None
        )
        listed = {f"{run}/{MANIFEST_NAME}"}
        if manifest is not None:
            listed |= {f"{run}/{f.path}" for f in manifest.files}
            listed |= {f"{run}/{f.pack['object']}" for f in manifest.files if f.pack is not None}
        below = [k for k in found if k.startswith(run + "/") and k not in listed]
        inner_runs = {
            k.rsplit("/", 1)[0]
            for k in below
            if k.rsplit("/", 1)[-1] in (MANIFEST_NAME, LOCK_NAME) and k.rsplit("/", 1)[0] != run
        }
        return [
            k
            for k in below
            if f"/{AREA}/" not in k[len(run) :]
            and not any(k.startswith(r + "/") for r in inner_runs)
        ]

    @staticmethod
    def _dead_areas(found: dict[str, Any], scheme: str) -> list[Leftover]:
        now = time.time()
        areas: dict[str, list[str]] = {}
        marker = f"/{AREA}/"
        for key in found:
            if marker in key:
                areas.setdefault(key.split(marker, 1)[0], []).append(key)
        out = []
        for run, keys in areas.items():
            age = min(_age(found[k], now) for k in keys)
            if age < 3 * heartbeat():
                continue
            kind = (
                "shard area of a committed run"
                if f"{run}/{MANIFEST_NAME}" in found
                else "incomplete sharded run"
            )
            size = sum(int(found[k].get("size") or 0) for k in keys)
            out.append(Leftover(f"{scheme}://{run}", kind, size, age, ref=f"area|{run}"))
        return out

    @staticmethod
    def _multipart(target: Target, prefix: str, found: dict[str, Any]) -> list[Leftover]:
        """S3's incomplete multipart uploads under ``prefix`` whose run has no live lock."""
        if target.scheme not in ("s3", "s3a"):
            return []
        fs = _s3fs(target)
        bucket, _, key_prefix = prefix.partition("/")
        now, out = time.time(), []
        for up in fs.list_multipart_uploads(bucket):
            key = str(up.get("Key", ""))
            if not key.startswith(key_prefix):
                continue
            run = f"{bucket}/{key}".rsplit("/", 1)[0]
            lock = f"{run}/{LOCK_NAME}"
            if lock in found and _age(found[lock], now) < 3 * heartbeat():
                continue
            started = up.get("Initiated")
            age = now - started.timestamp() if hasattr(started, "timestamp") else float("inf")
            if age < 3 * heartbeat():
                continue
            ref = json.dumps({"mpu": [bucket, key, up.get("UploadId")]})
            out.append(
                Leftover(
                    f"{target.scheme}://{bucket}/{key}",
                    "incomplete multipart upload",
                    0,
                    age,
                    ref=ref,
                )
            )
        return out

    def delete_leftover(self, target: Target, leftover: Leftover) -> None:
        engine, prefix, opts = self._open(target.uri, target.options)
        if leftover.ref.startswith("{"):
            bucket, key, upload = json.loads(leftover.ref)["mpu"]
            _s3fs(target).call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
            return
        kind, run = leftover.ref.split("|", 1)
        if not run.startswith(prefix):
            raise DestinationError("this leftover is not under the prefix", uri=leftover.uri)
        found = with_retries(
            "listing the run", lambda: engine.listing(run), opts, engine.is_transient
        )
        if kind == "lock":
            lock = f"{run}/{LOCK_NAME}"
            if lock not in found:
                return  # gone since
            if _age(found[lock], time.time()) < 3 * heartbeat():
                raise RunExistsError(
                    "the export holding this lock is alive again", uri=leftover.uri
                )
            stale = self._unlisted(engine, run, found, opts)
            rest = [k for k in stale if k != lock]
            if rest:
                engine.delete(rest)
            engine.delete([lock])  # last: until then the leftover stays recognisable
            return
        area = [k for k in found if k.startswith(f"{run}/{AREA}/")]
        if area and min(_age(found[k], time.time()) for k in area) < 3 * heartbeat():
            raise RunExistsError("a shard of this run is being written again", uri=leftover.uri)
        doomed = list(area)
        if f"{run}/{MANIFEST_NAME}" not in found:  # what the intents name, never a run's files
            named: set[str] = set()
            for k in area:
                if k.endswith(".intent"):
                    try:
                        named |= {f"{run}/{p}" for p in json.loads(engine.get(k)).get("paths", [])}
                    except (FileNotFoundError, ValueError, AttributeError):
                        continue
            doomed += [k for k in found if k in named or k[len(run) + 1 :].startswith(PACK_PREFIX)]
        intents = [k for k in doomed if k.endswith(".intent")]
        others = [k for k in doomed if not k.endswith(".intent")]
        if others:
            engine.delete(others)
        if intents:
            engine.delete(intents)  # last: the area stays recognisable until the end


def _s3fs(target: Target) -> Any:
    import s3fs

    from raysync_builtins.blob.store import Options as _Options

    _, fs_options = _Options.split(target.options)
    fs_options = {k: v for k, v in fs_options.items() if k != "engine"}
    return s3fs.S3FileSystem(**fs_options)

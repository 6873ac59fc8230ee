"""Removing runs and what dead exports left on an object store (``raysync rm``/``gc``,
``keep_last``).

- **Heartbeat.** An export re-writes its run's lock every :func:`heartbeat` seconds
  (``RAYSYNC_HEARTBEAT_SECONDS``, 10 by default) while it runs (:class:`Heartbeat`); a lock
  unchanged for three heartbeats belongs to a dead export. Ages are measured on the store's
  clock (gc writes a probe object and reads its time), never this machine's: a skewed clock
  never makes a live export look dead. An object whose time the store does not give is
  taken as live.
- **Leftovers**: a dead lock, with the objects under its run that no manifest lists and that
  are not newer than the lock's last beat (what the dead export uploaded; a file put there
  later is kept); the area of an incomplete sharded run with the objects its intents name;
  S3's incomplete multipart uploads under a dead lock (never one under a live lock, and never
  one no raysync lock covers: a user's own upload).
- **Deleting a run**: under the run's lock (an exclusive create: no export writes it
  meanwhile), its manifest is read again and must be the one checked; then the manifest goes
  first (a reader sees the run whole or not at all), then the objects it lists, then the
  lock. A run holding objects its manifest does not list, or an export's live lock, is never
  deleted.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from typing import Any

from raysync.backend import Leftover
from raysync.errors import DestinationError, RunExistsError
from raysync.manifest import MANIFEST_NAME
from raysync.shards import AREA
from raysync.target import Target, redact
from raysync_builtins.blob.consts import CONDITIONAL, LOCK_NAME, PACK_PREFIX
from raysync_builtins.blob.reading import read_manifest
from raysync_builtins.blob.store import Engine, Options, log, modified_of, with_retries

LIVE = 0.0  # the age of an object whose time is unknown: live, never removed


def heartbeat() -> float:
    try:
        return max(0.2, float(os.environ.get("RAYSYNC_HEARTBEAT_SECONDS", 10)))
    except ValueError:
        return 10.0


# Stores give object times to the second (S3's listings do): an age read from them can be up
# to this much longer than the real one, so a live lock's age is only trusted beyond it.
TIME_RESOLUTION = 1.0


def grace() -> float:
    """How old a lock, shard area or upload must look before it counts as dead: three
    missed heartbeats, plus the store's time resolution."""
    return 3 * heartbeat() + TIME_RESOLUTION


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
    return max(0.0, now - modified) if isinstance(modified, (int, float)) else LIVE


def store_now(engine: Engine, prefix: str) -> float:
    """The store's clock: the time it gives a probe object written now (this machine's
    clock only when the store gives none)."""
    probe = f"{prefix}/.raysync-clock-{uuid.uuid4().hex[:12]}"
    try:
        engine.put(probe, b"", create=False)
        info = engine.listing(probe).get(probe) or {}
        engine.delete([probe])
    except Exception as e:  # noqa: BLE001 - a read-only store: removing nothing is safe
        raise DestinationError(
            f"gc cannot write a probe object to read the store's clock: {e}", uri=redact(prefix)
        ) from None
    modified = modified_of(info) if info else None
    return modified if modified is not None else time.time()


def _live(found: dict[str, Any], key: str, now: float) -> bool:
    return key in found and _age(found[key], now) < grace()


class BlobGc:
    """The delete and clean-up half of :class:`raysync_builtins.blob.BlobBackend`."""

    @staticmethod
    def _open(uri: str, options: Any) -> tuple[Engine, str, Options]:  # pragma: no cover
        raise NotImplementedError

    def delete_run(self, target: Target) -> int:
        engine, run, opts = self._open(target.uri, target.options)
        shown = redact(target.uri)
        retry = engine.is_transient
        found = with_retries("listing the run", lambda: engine.listing(run), opts, retry)
        manifest_path, lock = f"{run}/{MANIFEST_NAME}", f"{run}/{LOCK_NAME}"
        if manifest_path not in found:
            raise DestinationError(
                "there is no committed raysync run here; raysync deletes only its own runs",
                uri=shown,
                hint="raysync ls lists the runs under a prefix",
            )
        first = with_retries("reading the manifest", lambda: engine.get(manifest_path), opts, retry)
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
        # The run's lock, as an export takes it: no export writes the run meanwhile.
        body = json.dumps({"task_id": "raysync rm"}).encode()
        conditional = target.scheme in CONDITIONAL
        try:
            engine.put(lock, body, create=conditional)
        except FileExistsError:
            raise RunExistsError("an export is writing this run right now", uri=shown) from None
        try:
            again = engine.get(manifest_path)
            if again != first:
                raise RunExistsError("the run changed while it was being removed", uri=shown)
            with_retries(
                "removing the manifest", lambda: engine.delete([manifest_path]), opts, retry
            )
            rest = [k for k in listed if k in found]
            if rest:
                with_retries("removing the run", lambda: engine.delete(rest), opts, retry)
        finally:
            engine.delete([lock])
        return manifest.total_bytes

    def list_leftovers(self, target: Target) -> list[Leftover]:
        engine, prefix, opts = self._open(target.uri, target.options)
        scheme = target.scheme
        found = with_retries(
            "listing the prefix", lambda: engine.listing(prefix), opts, engine.is_transient
        )
        now = store_now(engine, prefix)
        found = {k: v for k, v in found.items() if "/.raysync-clock-" not in k}
        out = [
            *self._dead_locks(engine, found, scheme, opts, now),
            *self._dead_areas(found, scheme, now),
        ]
        out += self._multipart(target, prefix, found, now)
        return sorted(out, key=lambda x: x.ref)

    def _dead_locks(
        self, engine: Engine, found: dict[str, Any], scheme: str, opts: Options, now: float
    ) -> list[Leftover]:
        out = []
        for key, info in found.items():
            if not key.endswith("/" + LOCK_NAME) or _live(found, key, now):
                continue
            run = key.rsplit("/", 1)[0]
            stale = self._unlisted(engine, run, found, opts)
            size = sum(int(found[k].get("size") or 0) for k in stale)
            age = _age(info, now)
            out.append(
                Leftover(f"{scheme}://{run}", "dead export (lock)", size, age, ref=f"lock|{run}")
            )
        return out

    @staticmethod
    def _unlisted(engine: Engine, run: str, found: dict[str, Any], opts: Options) -> list[str]:
        """What the dead export at ``run`` uploaded: the objects directly under it that its
        manifest (if any) does not list and that are not newer than its lock's last beat
        (plus two beats: an upload in flight when it died); never what lies under another run
        or a shard area below it."""
        manifest = None
        if f"{run}/{MANIFEST_NAME}" in found:
            manifest = read_manifest(engine, run, redact(run), opts)
        lock = f"{run}/{LOCK_NAME}"
        listed = {f"{run}/{MANIFEST_NAME}", lock}
        if manifest is not None:
            listed |= {f"{run}/{f.path}" for f in manifest.files}
            listed |= {f"{run}/{f.pack['object']}" for f in manifest.files if f.pack is not None}
        beat = found.get(lock, {}).get("modified")
        below = [k for k in found if k.startswith(run + "/") and k not in listed]
        inner_runs = {
            k.rsplit("/", 1)[0]
            for k in below
            if k.rsplit("/", 1)[-1] in (MANIFEST_NAME, LOCK_NAME) and k.rsplit("/", 1)[0] != run
        }
        out = []
        for k in below:
            if f"/{AREA}/" in k[len(run) :] or any(k.startswith(r + "/") for r in inner_runs):
                continue
            when = found[k].get("modified")
            if not isinstance(beat, (int, float)) or not isinstance(when, (int, float)):
                continue  # no times to tell the export's objects from later ones: kept
            if when <= beat + 2 * heartbeat():
                out.append(k)
        return out + ([lock] if lock in found else [])

    @staticmethod
    def _dead_areas(found: dict[str, Any], scheme: str, now: float) -> list[Leftover]:
        areas: dict[str, list[str]] = {}
        marker = f"/{AREA}/"
        for key in found:
            if marker in key:
                areas.setdefault(key.split(marker, 1)[0], []).append(key)
        out = []
        for run, keys in areas.items():
            age = min(_age(found[k], now) for k in keys)
            if age < grace():
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
    def _multipart(
        target: Target, prefix: str, found: dict[str, Any], now: float
    ) -> list[Leftover]:
        """S3's incomplete multipart uploads under ``prefix`` that a dead raysync lock covers
        (the nearest run above the key that has a lock); never one under a live lock or
        under no lock at all."""
        if target.scheme not in ("s3", "s3a"):
            return []
        fs = _s3fs(target)
        bucket, _, key_prefix = prefix.partition("/")
        out = []
        for up in fs.list_multipart_uploads(bucket):
            key = str(up.get("Key", ""))
            if key_prefix and not key.startswith(key_prefix.rstrip("/") + "/"):
                continue
            full = f"{bucket}/{key}"
            parts = full.split("/")
            locks = ["/".join(parts[:n]) + "/" + LOCK_NAME for n in range(len(parts) - 1, 0, -1)]
            lock = next((lk for lk in locks if lk in found), None)
            if lock is None or _live(found, lock, now):
                continue
            started = up.get("Initiated")
            age = max(0.0, now - started.timestamp()) if hasattr(started, "timestamp") else LIVE
            if age < grace():
                continue
            ref = json.dumps({"mpu": [bucket, key, up.get("UploadId")], "lock": lock})
            where = f"{target.scheme}://{full}"
            out.append(Leftover(where, "incomplete multipart upload", 0, age, ref=ref))
        return out

    def delete_leftover(self, target: Target, leftover: Leftover) -> None:
        engine, prefix, opts = self._open(target.uri, target.options)
        retry = engine.is_transient
        if leftover.ref.startswith("{"):
            doc = json.loads(leftover.ref)
            bucket, key, upload = doc["mpu"]
            lock = doc["lock"]
            found = engine.listing(lock)
            if _live(found, lock, store_now(engine, prefix)):
                raise RunExistsError("the export of this upload is alive", uri=leftover.uri)
            _s3fs(target).call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
            return
        kind, run = leftover.ref.split("|", 1)
        if not (run == prefix or run.startswith(prefix.rstrip("/") + "/")):
            raise DestinationError("this leftover is not under the prefix", uri=leftover.uri)
        found = with_retries("listing the run", lambda: engine.listing(run), opts, retry)
        now = store_now(engine, prefix)
        if kind == "lock":
            lock = f"{run}/{LOCK_NAME}"
            if lock not in found:
                return  # gone since
            if _live(found, lock, now):
                raise RunExistsError("the export holding the lock is alive", uri=leftover.uri)
            stale = self._unlisted(engine, run, found, opts)
            rest = [k for k in stale if k != lock]
            if rest:
                engine.delete(rest)
            engine.delete([lock])  # last: until then the leftover stays recognisable
            return
        area = [k for k in found if k.startswith(f"{run}/{AREA}/")]
        if area and min(_age(found[k], now) for k in area) < grace():
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

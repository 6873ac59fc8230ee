"""Shards on an object store (:mod:`raysync.shards`): many calls, one run, committed once.

Under the run's prefix, a hidden area per shard set, ``<run>/.raysync-shards/<set id>/``:

1. a shard first writes its *intent* (``<key>.intent``: its name, its call, the paths it will
   write; an exclusive create where the store enforces one), refusing a shard name another
   call holds and paths another shard's intent names (:class:`ShardClashError`);
2. it uploads its files to their final keys (``<run>/<path>``: nothing is copied at the
   commit), then its shard manifest (``<key>.json``);
3. the shard that finds all ``N`` shard manifests merges them and writes the run's manifest
   with the store's conditional write (S3 ``If-None-Match``): of two shards finishing at
   once, one commits and the other sees the run committed. The area is removed after.

A reader sees no run until the manifest is written. A prefix holding objects that no intent
names (someone else's data) is never written into.
"""

from __future__ import annotations

import json
import re
from typing import Any

from raysync import rules
from raysync.backend import ExportRequest
from raysync.errors import IntegrityError, RunExistsError
from raysync.manifest import MANIFEST_NAME, Manifest
from raysync.shards import AREA, check_clash, merge
from raysync_builtins.blob.consts import LOCK_NAME, PACK_PREFIX
from raysync_builtins.blob.gc import Heartbeat
from raysync_builtins.blob.reading import read_manifest
from raysync_builtins.blob.store import Engine, Options, etag_of, log, with_retries

_SHARD_JSON = re.compile(r"[0-9a-f]{16}\.json")


class ShardExports:
    """The shard half of :class:`raysync_builtins.blob.BlobBackend`."""

    def _upload_all(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - Uploads
        raise NotImplementedError

    def _export_shard(
        self,
        engine: Engine,
        run: str,
        request: ExportRequest,
        opts: Options,
        shown: str,
        *,
        conditional: bool,
    ) -> bool:
        """Export one shard; True when this call committed the run."""
        shard = request.shard
        assert shard is not None
        record = request.manifest.run
        area = f"{run}/{AREA}/{shard.set_id}"

        def call(what: str, fn: Any) -> Any:
            return with_retries(what, fn, opts, engine.is_transient)

        found = call("listing the run", lambda: engine.listing(run))
        if f"{run}/{MANIFEST_NAME}" in found:
            committed = read_manifest(engine, run, shown, opts)
            calls = committed.run.get("shard_calls") if committed is not None else None
            mine = calls.get(shard.name) if isinstance(calls, dict) else None
            if isinstance(mine, dict) and rules.same_call(mine, record):
                return False  # a retry after the commit: this call's shard is in the run
            raise RunExistsError(
                "this sharded run is already committed; a shard never replaces a committed run",
                uri=shown,
                hint="write the next sharded run to a new output_uri",
            )
        enclosing = self._enclosing_run(engine, run, opts)  # type: ignore[attr-defined]
        nested = [
            k
            for k in found
            if k.rsplit("/", 1)[-1] in (MANIFEST_NAME, LOCK_NAME) and k != f"{run}/{LOCK_NAME}"
        ]
        if enclosing is not None or nested:
            where = f"around this one ({enclosing})" if enclosing else f"inside it ({nested[0]})"
            raise RunExistsError(
                f"a run lies {where}; runs never nest",
                uri=shown,
                hint="export next to that run, not around or inside it",
            )
        if f"{run}/{LOCK_NAME}" in found:
            raise RunExistsError("another call is writing this run (not as a shard)", uri=shown)
        others_sets = {
            k[len(run) + len(AREA) + 2 :].split("/", 1)[0]
            for k in found
            if k.startswith(f"{run}/{AREA}/") and not k.startswith(area + "/")
        }
        if others_sets:
            raise RunExistsError(
                "an incomplete sharded run of another job (or session) is here",
                uri=shown,
                hint="write this run to a new output_uri, or remove the incomplete one",
            )
        intents = {
            k: self._read_json(engine, k, opts)
            for k in found
            if k.startswith(area + "/") and k.endswith(".intent")
        }
        named = {p for i in intents.values() for p in i.get("paths", [])}
        foreign = [
            k
            for k in found
            if not k.startswith(f"{run}/{AREA}/")
            and k[len(run) + 1 :] not in named
            and not k[len(run) + 1 :].startswith(PACK_PREFIX)
        ]
        if foreign:
            rules.decide(existing=None, occupied=True, run=record, conflict="error", uri=shown)
        mine = f"{area}/{shard.key}.intent"
        paths = sorted(f.path for f in request.files)
        body = json.dumps(
            {"shard": shard.name, "owner": rules.claim_record(record), "paths": paths}
        ).encode()
        held = intents.get(mine)
        if held is not None and not rules.same_call(held.get("owner") or {}, record):
            self._taken(shard.name, held, shown)
        try:
            call("writing the shard's intent", lambda: engine.put(mine, body, create=conditional))
        except FileExistsError:
            now = self._read_json(engine, mine, opts)
            if not rules.same_call(now.get("owner") or {}, record):
                self._taken(shard.name, now, shown)
            call("writing the shard's intent", lambda: engine.put(mine, body, create=False))
        try:
            check_clash(
                shard.name,
                paths,
                (
                    (str(i.get("shard")), i.get("paths", []))
                    for k, i in intents.items()
                    if k != mine
                ),
                shown,
            )
        except RunExistsError:
            call("withdrawing the shard", lambda: engine.delete([mine]))
            raise
        # An earlier attempt's shard manifest goes before any of its objects change: no
        # committer pairs it with this attempt's bytes (the committer checks them too).
        call("replacing the shard", lambda: engine.delete([f"{area}/{shard.key}.json"]))
        beat = Heartbeat(engine, mine, body)  # gc tells a live shard from a dead one
        try:
            self._upload_all(engine, run, request, opts, shown)
        finally:
            beat.stop()
        data = request.manifest.to_bytes()
        call(
            "writing the shard manifest",
            lambda: engine.put(f"{area}/{shard.key}.json", data, create=False),
        )
        return self._try_commit(engine, run, area, request, opts, shown, conditional=conditional)

    def _try_commit(
        self,
        engine: Engine,
        run: str,
        area: str,
        request: ExportRequest,
        opts: Options,
        shown: str,
        *,
        conditional: bool,
    ) -> bool:
        shard = request.shard
        assert shard is not None
        retry = engine.is_transient
        listed = with_retries("listing the shards", lambda: engine.listing(area), opts, retry)
        keys = sorted(k for k in listed if _SHARD_JSON.fullmatch(k[len(area) + 1 :]))
        if len(keys) < shard.count:
            return False
        got = with_retries("reading the shards", lambda: engine.get_many(keys), opts, retry)
        parts = [Manifest.from_bytes(got[k], uri=shown) for k in keys]
        merged = merge(parts, request.manifest.run, shard, shown)
        # Every object is the one its shard uploaded (a retry may be re-uploading it now).
        now = with_retries("listing the run", lambda: engine.listing(run), opts, retry)
        for f in merged.files:
            key = f"{run}/{f.pack['object'] if f.pack is not None else f.path}"
            info = now.get(key)
            tag = etag_of(info) if info is not None else None
            size_ok = info is not None and (f.pack is not None or info.get("size") == f.size)
            if not size_ok or (f.etag and f.pack is None and tag and tag != f.etag):
                return False  # that shard is being replaced: its retry commits the run
        manifest_path = f"{run}/{MANIFEST_NAME}"
        data = merged.to_bytes()
        try:
            with_retries(
                "writing the manifest",
                lambda: engine.put(manifest_path, data, create=conditional),
                opts,
                retry,
            )
        except FileExistsError:
            return False  # another shard committed the run first
        try:  # committed: this set's area, and what its intents named that the run does not
            keep = {f"{run}/{f.path}" for f in merged.files} | {manifest_path}
            named: set[str] = set()
            for k in listed:
                if k.endswith(".intent"):
                    doc = self._read_json(engine, k, opts)
                    named |= {f"{run}/{p}" for p in doc.get("paths", []) if isinstance(p, str)}
            stale = [k for k in listed if k.startswith(area + "/")]
            stale += [k for k in named if k not in keep and k in now]
            if stale:
                engine.delete(stale)
        except Exception as e:  # noqa: BLE001 - the run is committed; leftovers are harmless
            log.warning("raysync: could not remove the shard area of %s: %s", shown, e)
        return True

    @staticmethod
    def _read_json(engine: Engine, key: str, opts: Options) -> dict[str, Any]:
        try:
            data = with_retries(
                "reading a shard intent", lambda: engine.get(key), opts, engine.is_transient
            )
            doc = json.loads(data)
        except (FileNotFoundError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    @staticmethod
    def _taken(name: str, held: dict[str, Any], shown: str) -> None:
        owner = held.get("owner") or {}
        raise RunExistsError(
            f"shard {name!r} of this run is exported by another call "
            f"(task {owner.get('task_id') if isinstance(owner, dict) else 'unknown'})",
            uri=shown,
            hint="give every call its own shard name (e.g. shard='{rank}')",
        )


def incomplete_runs(
    keys: list[str], done: set[str], engine: Engine, opts: Options
) -> dict[str, str]:
    """For ``raysync ls``: run prefix → ``"k/N"`` for the shard areas without a manifest."""
    marker = f"/{AREA}/"
    areas: dict[str, list[str]] = {}
    for k in keys:
        if marker in k and k.endswith(".json"):
            run = k.split(marker, 1)[0]
            if run not in done:
                areas.setdefault(run, []).append(k)
    out = {}
    for run, shard_keys in areas.items():
        try:
            first = Manifest.from_bytes(engine.get(shard_keys[0]))
            total: Any = first.run.get("shards", "?")
        except (FileNotFoundError, IntegrityError):
            total = "?"
        out[run] = f"{len(shard_keys)}/{total}"
    return out

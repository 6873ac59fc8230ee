"""The run's lock and the conflict decision taken while holding it; clean-up after a
failure or a commit."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from raysync import rules
from raysync.backend import ExportRequest
from raysync.errors import (
    RunExistsError,
)
from raysync.manifest import MANIFEST_NAME, Manifest
from raysync_builtins.blob.consts import LOCK_NAME
from raysync_builtins.blob.reading import read_manifest
from raysync_builtins.blob.store import Engine, Options, log, with_retries


@dataclass(frozen=True)
class _Claim:
    """What the claim found: the conflict decision and the run's objects (with ETags)."""

    decision: rules.Decision
    listing: dict[str, dict[str, Any]]


class RunLock:
    """The lock-then-decide half of :class:`raysync_builtins.blob.BlobBackend`."""

    def _claim(
        self,
        engine: Engine,
        run: str,
        request: ExportRequest,
        opts: Options,
        *,
        conditional: bool,
        shown: str,
    ) -> _Claim:
        """Take the run's lock and decide (:func:`raysync.rules.decide`) while holding it.

        The run is looked at before the lock is written (nothing is written under a prefix
        that is not ours to write) and again once the lock is held (the decision that counts:
        another call may have committed in between). A lock held by another call refuses the
        export, whatever the conflict policy: two calls never write one run at once. A lock
        left by an earlier attempt of this call is taken over."""
        run_record = request.manifest.run
        body = json.dumps(rules.claim_record(run_record)).encode()
        lock_path = f"{run}/{LOCK_NAME}"
        self._look(engine, run, request, opts, shown)  # refuse before writing anything
        for _ in range(3):
            try:
                with_retries(
                    "taking the run lock",
                    lambda: engine.put(lock_path, body, create=conditional),
                    opts,
                    engine.is_transient,
                )
            except FileExistsError:
                holder = self._holder(engine, lock_path, opts)
                if holder is None:
                    continue  # released between our write and our read: look again
                rules.decide(
                    existing=None,
                    occupied=True,
                    run=run_record,
                    conflict=request.conflict,
                    uri=shown,
                    leftover_owner=holder,
                )
                # An earlier attempt of this very call died holding the lock: take it over.
                with_retries(
                    "taking the run lock",
                    lambda: engine.put(lock_path, body, create=False),
                    opts,
                    engine.is_transient,
                )
            try:
                return self._look(engine, run, request, opts, shown, above=True)
            except BaseException:
                self._release(engine, run, opts, remove_data=False)
                raise
        raise RunExistsError(
            "other calls keep taking and releasing this run's lock",
            uri=shown,
            hint="give each call its own output_uri (e.g. add {call_id})",
        )

    def _look(
        self,
        engine: Engine,
        run: str,
        request: ExportRequest,
        opts: Options,
        shown: str,
        *,
        above: bool = False,
    ) -> _Claim:
        """List the run and apply the conflict decision to what is there; with ``above``
        (once the lock is held: the look that counts), also look for a run in every prefix
        above it (a HEAD per prefix and name, so not on the look before the lock too)."""
        found = with_retries(
            "listing the run", lambda: engine.listing(run), opts, engine.is_transient
        )
        lock_path, manifest_path = f"{run}/{LOCK_NAME}", f"{run}/{MANIFEST_NAME}"
        holder = self._holder(engine, lock_path, opts) if lock_path in found else None
        existing = read_manifest(engine, run, shown, opts) if manifest_path in found else None
        others = [k for k in found if k not in (lock_path, manifest_path)]
        nested = [k for k in others if k.rsplit("/", 1)[-1] in (MANIFEST_NAME, LOCK_NAME)]
        own_lock = holder is not None and rules.same_call(holder, request.manifest.run)
        unlisted: list[str] = []
        if existing is not None:
            listed = {f"{run}/{f.path}" for f in existing.files}
            listed |= {f"{run}/{f.pack['object']}" for f in existing.files if f.pack is not None}
            unlisted = [k[len(run) + 1 :] for k in others if k not in listed]
            if own_lock:  # what a dead attempt of this call uploaded is ours; runs are not
                unlisted = [p for p in unlisted if p.endswith(f"/{MANIFEST_NAME}")]
        decision = rules.decide(
            existing=existing,
            occupied=bool(others) and not own_lock,
            run=request.manifest.run,
            conflict=request.conflict,
            uri=shown,
            leftover_owner=holder if existing is None and not own_lock else None,
            inside=self._enclosing_run(engine, run, opts) if above else None,
            unlisted=unlisted,
            nested=[k[len(run) + 1 :] for k in nested],
        )
        if existing is not None and holder is not None and not own_lock:
            # A committed run that another call is replacing right now.
            rules.decide(
                existing=None,
                occupied=True,
                run=request.manifest.run,
                conflict=request.conflict,
                uri=shown,
                leftover_owner=holder,
            )
        return _Claim(decision, found)

    @staticmethod
    def _enclosing_run(engine: Engine, run: str, opts: Options) -> str | None:
        """A run (committed, or being written: its lock) in a prefix above ``run`` (up to
        the bucket), if there is one."""
        parts = run.split("/")
        for n in range(len(parts) - 1, 0, -1):
            prefix = "/".join(parts[:n])
            if not prefix.strip("/"):
                break
            for name in (MANIFEST_NAME, LOCK_NAME):
                look = functools.partial(engine.exists, f"{prefix}/{name}")
                if with_retries("looking for an enclosing run", look, opts, engine.is_transient):
                    return prefix
        return None

    @staticmethod
    def _holder(engine: Engine, lock_path: str, opts: Options) -> dict[str, Any] | None:
        """Who holds the lock (``None``: no lock any more)."""
        try:
            data = with_retries(
                "reading the run lock", lambda: engine.get(lock_path), opts, engine.is_transient
            )
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data or b"{}")
        except ValueError:
            holder = None
        return holder if isinstance(holder, dict) else {"task_id": "unreadable lock"}

    @staticmethod
    def _release(engine: Engine, run: str, opts: Options, *, remove_data: bool) -> None:
        """After a failed export: delete what is under the run (the claim proved it ours)
        when ``remove_data``, and the lock, last."""
        lock = f"{run}/{LOCK_NAME}"
        try:
            if remove_data:
                found = engine.listing(run)
                paths = [p for p in found if p not in (lock, f"{run}/{MANIFEST_NAME}")]
                if paths:
                    with_retries(
                        "releasing the run", lambda: engine.delete(paths), opts, engine.is_transient
                    )
            with_retries(
                "releasing the run lock", lambda: engine.delete([lock]), opts, engine.is_transient
            )
        except Exception as e:  # noqa: BLE001 - the export's own error is the one to raise
            log.warning(
                "raysync: could not release the run after a failed export (%s); delete %s "
                "under it before retrying with another task",
                e,
                LOCK_NAME,
            )

    @staticmethod
    def _clean(
        engine: Engine, run: str, manifest: Manifest, opts: Options, claimed: _Claim
    ) -> None:
        """After the commit: remove objects the manifest does not list (a replaced run's or a
        dead attempt's), then the lock. When the run held nothing but our lock once the lock
        was held, no other export wrote under it since (the lock keeps them out): nothing to
        list, only the lock to remove."""
        lock = f"{run}/{LOCK_NAME}"
        keep = {f"{run}/{f.path}" for f in manifest.files} | {f"{run}/{MANIFEST_NAME}", lock}
        keep |= {f"{run}/{f.pack['object']}" for f in manifest.files if f.pack is not None}
        try:
            fresh = set(claimed.listing) <= {lock}
            stale = [] if fresh else [p for p in engine.listing(run) if p not in keep]
            if stale:
                with_retries(
                    "removing stale objects",
                    lambda: engine.delete(stale),
                    opts,
                    engine.is_transient,
                )
            with_retries(
                "releasing the run lock", lambda: engine.delete([lock]), opts, engine.is_transient
            )
        except Exception as e:  # noqa: BLE001 - the run is committed; leftovers are harmless
            log.warning("raysync: could not remove stale objects under the run: %s", e)

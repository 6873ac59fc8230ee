"""``isolated_export(resume=True)``: a call starts from the checkpoint an earlier call left.

When a call starts, the run at its rendered URI is read through the backend's
:class:`~raysync.hookspecs.ResumesRuns` hook. It is resumed when it is a checkpoint (status
``running``) or a ``failed`` run of the same function, and the call that wrote it is no longer
running (:func:`abandoned`). Its files are copied into the new call's trees, each verified
against the manifest's digest, and the new call's manifest records ``resumed_from``: the
call it carries on, which lets it replace that run (:func:`raysync.rules.continues`).

"No longer running" is known, in this order:

1. an earlier attempt of the same Ray task (same cluster session, job, task and function):
   Ray retries a task only after its attempt ended (its worker or node died, or it raised);
2. a ``failed`` run: it is written once, after the call's function raised;
3. a checkpoint of another call in the same cluster session: the lease that call held
   (:mod:`raysync.leases`) has expired or was released;
4. a checkpoint from another cluster session (another ``ray.init``, yesterday's cluster) or
   from a direct call outside Ray: it is older than :func:`stale_after` seconds (no lease of
   another cluster can be seen from this one).

A ``succeeded`` run is never resumed: the call starts fresh and its export meets the usual
conflict rules (a retry of the same call replaces it; another call gets a conflict).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from raysync import redaction, rules
from raysync.errors import ConfigError, RunExistsError
from raysync.hookspecs import ExportBackend, ResumesRuns
from raysync.manifest import Manifest
from raysync.result import place_files
from raysync.target import Target, redact
from raysync.workspace import Workspace

log = redaction.logger("raysync")

#: A checkpoint from another cluster is taken as abandoned after this many seconds without
#: a newer one, at least (``RAYSYNC_RESUME_AFTER`` changes it; 3 x its ``sync_every`` when
#: that is longer).
STALE_AFTER = 3600.0


@dataclass(frozen=True)
class ResumedFrom:
    """What a resumed call started from (``raysync.current_workspace().resumed_from``)."""

    #: The run's URI (credentials redacted).
    uri: str
    #: The number of the checkpoint the files come from (0: a failed run with no checkpoint).
    checkpoint: int
    #: ``"running"`` (a checkpoint) or ``"failed"``.
    status: str
    #: The Ray task and attempt that wrote it.
    task_id: str
    attempt: int | None
    #: How many files and bytes were copied into the trees.
    files: int
    bytes: int


def check(backend: ExportBackend) -> None:
    """At decoration: ``resume=True`` needs a destination the backend can read back."""
    if backend.capabilities.by_value:
        raise ConfigError(
            f"resume=True needs a destination, but the {backend.name!r} backend returns the "
            "files by value when the call ends (nothing is left to resume from)",
            hint="give an output_uri (a path, s3://..., host://...) or drop resume",
        )
    if not isinstance(backend, ResumesRuns):
        raise ConfigError(
            f"the {backend.name!r} backend cannot read a run back into a call, so it cannot "
            "resume one",
            hint="use a backend with resume support (docs/backends.md) or drop resume",
        )


def stale_after(run: Mapping[str, Any]) -> float:
    try:
        base = float(os.environ.get("RAYSYNC_RESUME_AFTER", STALE_AFTER))
    except ValueError:
        base = STALE_AFTER
    every = run.get("sync_every")
    if "RAYSYNC_RESUME_AFTER" not in os.environ and isinstance(every, (int, float)):
        base = max(base, 3 * float(every))
    return base


def _age(run: Mapping[str, Any]) -> float | None:
    when = run.get("synced_at") or run.get("ended_at") or run.get("started_at")
    if not isinstance(when, str):
        return None
    try:
        then = datetime.fromisoformat(when)
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - then).total_seconds()


def abandoned(existing: Mapping[str, Any], run: Mapping[str, Any]) -> str | None:
    """Why the call that wrote ``existing`` is known to be over, or ``None`` when it may be
    running. The caller holds the URI's lease, so no other call of this cluster holds it."""
    if rules.same_call(existing, run):
        return "an earlier attempt of this task"
    if existing.get("status") == "failed":
        return "a call that failed"
    session = existing.get("session")
    if session == run.get("session") and session != "local":
        return "a call of this cluster that holds no lease any more"
    age = _age(existing)
    if age is not None and age >= stale_after(existing):
        return f"a checkpoint of another cluster, {age:.0f} s old"
    return None


def restore(
    backend: ExportBackend,
    target: Target,
    prepared: Mapping[str, str],
    ws: Workspace,
    run: dict[str, Any],
    conflict: str,
) -> Workspace:
    """Resume into ``ws`` when the run at ``target`` allows it; the workspace to use
    (``resumed_from`` set) and ``run`` updated (``resumed_from``, its checkpoint number).

    The caller holds the URI's lease: no other live call of this cluster holds it."""
    assert isinstance(backend, ResumesRuns)
    shown = redact(target.uri)
    reader = backend.resume_reader(target, prepared)
    try:
        existing = reader.manifest()
        if existing is None:
            return ws
        old = existing.run
        if existing.status not in ("running", "failed") or old.get("function") != run.get(
            "function"
        ):
            _refuse_early(existing, run, shown, conflict)
            return ws
        why = abandoned(old, run)
        if why is None:
            raise RunExistsError(
                f"the checkpoint here belongs to another call (task {old.get('task_id')}) "
                "that may still be running; resume never takes over a live call's run",
                uri=shown,
                hint="give each call its own output_uri (e.g. add {call_id}); if that call "
                "belongs to a cluster that is gone, set RAYSYNC_RESUME_AFTER=0 in the "
                "task's environment or delete that run",
            )
        mine = [f for f in existing.files if f.path.split("/", 1)[0] in _heads(ws)]
        dropped = len(existing.files) - len(mine)
        if dropped:
            log.warning(
                "raysync: %d file(s) of %s lie outside this call's trees and are not resumed",
                dropped,
                shown,
            )
        reader.prefetch(mine)
        place_files(ws.root, mine, reader.read, uri=shown, checksum=existing.checksum)
    finally:
        reader.close()
    number = old.get("checkpoint") or old.get("checkpoints") or 0
    number = number if isinstance(number, int) else 0
    resumed = ResumedFrom(
        uri=shown,
        checkpoint=number,
        status=existing.status,
        task_id=str(old.get("task_id")),
        attempt=old.get("attempt") if isinstance(old.get("attempt"), int) else None,
        files=len(mine),
        bytes=sum(f.size for f in mine),
    )
    run["resumed_from"] = {**rules.claim_record(old), "checkpoint": number, "reason": why}
    log.info("raysync: resumed %s from checkpoint %d of %s", shown, number, why)
    return dataclasses.replace(ws, resumed_from=resumed)


def _heads(ws: Workspace) -> set[str]:
    return {t.split("/", 1)[0] for t in ws.trees}


def _refuse_early(existing: Manifest, run: Mapping[str, Any], shown: str, conflict: str) -> None:
    """A run that is not resumed and that this call's export could never replace: the
    conflict now, before hours of work, rather than at the end."""
    if rules.same_call(existing.run, run):
        return
    if existing.run.get("function") != run.get("function") or existing.status == "succeeded":
        rules.decide(existing=existing, occupied=False, run=run, conflict=conflict, uri=shown)

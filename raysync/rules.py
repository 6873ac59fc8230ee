"""The rules every backend applies to a run, each in one place (DESIGN.md invariants 7 and 8).

- **Identity.** A run's manifest records the call that wrote it: the Ray cluster session, the
  job, the task and the function (:data:`IDENTITY_KEYS`), Ray's attempt number, and which call
  of that function the task attempt made (``call``: "1", "2" for a second call of the same
  function in one task). A call that resumed another call's checkpoint
  (``resume=True``) records it in ``run["resumed_from"]`` and carries that call on
  (:func:`continues`). Ray task ids repeat across clusters (the first task of every fresh
  ``ray.init()`` gets the same id), so a task id alone would take yesterday's run for a retry
  of today's call. :func:`same_call`: a run of an *earlier attempt* of the same task and
  function is this call's own (a retried task may make its calls in another order); within
  one attempt, only the same ``call``.
- **The conflict decision.** :func:`decide` is the one answer to "may this export write here?",
  with one wording for each refusal: a committed run is replaced only by a retry of the same
  call, or with ``conflict="overwrite"`` by a call of the *same function*; a destination that
  holds anything that is not a raysync run is never written into, deleted or replaced, whatever
  the policy; leftovers of an unfinished export are taken over only by that same call.
- **Same commit.** :func:`same_commit` tells whether the run found at a URI is still the one an
  :class:`~raysync.ExportResult` describes.
- **Modes.** :func:`placed_mode` is the mode a file gets when it is placed on a machine: never
  setuid, setgid or sticky, and never more than the umask allows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from raysync.errors import RunExistsError
from raysync.manifest import Manifest

#: The manifest ``run`` keys a call shares with every attempt of its task (all must match).
IDENTITY_KEYS = ("session", "job_id", "task_id", "function")
#: What a lock or a claim records of the call holding it (:func:`claim_record`).
CLAIM_KEYS = (*IDENTITY_KEYS, "call", "attempt")

HINT_OTHER_URI = "give each call its own output_uri (e.g. add {call_id}) or conflict='overwrite'"


def identity(run: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The call identity a manifest's ``run`` (or a lock) records; ``None`` when incomplete."""
    values = tuple(run.get(k) for k in IDENTITY_KEYS)
    if not all(isinstance(v, str) and v for v in values):
        return None
    return values  # type: ignore[return-value]  # checked: every item is a non-empty str


def run_record(
    function: str, task_id: str, *, session: str = "local", job_id: str = "local", **more: Any
) -> dict[str, Any]:
    """A manifest ``run`` record with a complete identity, for exports made outside a
    decorated call (the conformance suite, the bench): ``task_id`` names the call."""
    return {
        "function": function,
        "session": session,
        "job_id": job_id,
        "task_id": task_id,
        "call": "1",
        "attempt": 0,
        "status": "succeeded",
        **more,
    }


def claim_record(run: Mapping[str, Any]) -> dict[str, Any]:
    """What a lock or claim records of the call holding it (enough for :func:`same_call`)."""
    return {k: run.get(k) for k in CLAIM_KEYS}


def same_call(existing: Mapping[str, Any], run: Mapping[str, Any]) -> bool:
    """True when ``existing`` (a committed run's record, a lock, a claim) was written by the
    call ``run`` describes: by an earlier attempt of its task and function (whatever order a
    retry makes its calls in), or earlier in this same attempt by this same call (a
    ``sync_every`` checkpoint)."""
    ie = identity(existing)
    if ie is None:
        return False
    if continues(existing, run):
        return True
    if ie != identity(run):
        return False
    a, b = existing.get("attempt"), run.get("attempt")
    if isinstance(a, int) and isinstance(b, int) and a != b:
        return a < b  # a later attempt's run is never taken over by an older attempt
    return existing.get("call") == run.get("call")


def continues(existing: Mapping[str, Any], run: Mapping[str, Any]) -> bool:
    """True when the call ``run`` describes resumed (``resume=True``) from the checkpoint or
    failed run that ``existing`` (its manifest's ``run``, its lock, its claim) belongs to:
    it carries that call on and may replace what it left: the very checkpoint it resumed, or
    a lock that call left. A ``succeeded`` run, or a newer checkpoint, is never taken over
    this way."""
    resumed = run.get("resumed_from")
    if not (
        isinstance(resumed, Mapping)
        and identity(resumed) is not None
        and claim_record(resumed) == claim_record(existing)
    ):
        return False
    status = existing.get("status")
    if status is None:
        return True  # a lock or claim that call left when it died
    if status == "succeeded":
        return False
    # Only the very checkpoint it resumed from: not a newer one that call committed since
    # (it was alive after all), which this call never saw.
    number = existing.get("checkpoint") or existing.get("checkpoints") or 0
    return bool(number == resumed.get("checkpoint"))


def same_commit(committed: Mapping[str, Any], described: Mapping[str, Any]) -> bool:
    """True when the run committed at a URI is still the one an
    :class:`~raysync.ExportResult` describes (not replaced since, even by a retry). For a
    run many calls wrote as shards: the run whose shard ``described["shard"]`` that call
    wrote."""
    calls, name = committed.get("shard_calls"), described.get("shard")
    if isinstance(calls, Mapping) and isinstance(name, str):
        return calls.get(name) == claim_record(described)
    return (
        identity(committed) is not None
        and identity(committed) == identity(described)
        and committed.get("attempt") == described.get("attempt")
        and committed.get("call") == described.get("call")
    )


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` allows: ``replace`` when something of ours is at the destination
    (a committed run, or an unfinished export of this call) and will be replaced;
    ``previous`` is the committed run being replaced (an incremental export may reuse its
    files, once verified)."""

    replace: bool
    previous: Manifest | None = None


def may_replace(existing: Manifest, run: Mapping[str, Any], conflict: str) -> bool:
    """May the call described by ``run`` replace the committed run ``existing``?"""
    if same_call(existing.run, run):
        return True
    return conflict == "overwrite" and existing.run.get("function") == run.get("function")


def decide(
    *,
    existing: Manifest | None,
    occupied: bool,
    run: Mapping[str, Any],
    conflict: str,
    uri: str,
    leftover_owner: Mapping[str, Any] | None = None,
    inside: str | None = None,
    unlisted: Sequence[str] = (),
    nested: Sequence[str] = (),
) -> Decision:
    """The conflict decision for one export, the same for every backend.

    :param existing: the committed run at the destination (any status), if there is one.
    :param occupied: the destination holds something besides a committed run: files in a
        directory, objects under a prefix, an unfinished export's leftovers.
    :param run: the exporting call's manifest ``run`` (function, session, job_id, task_id).
    :param conflict: ``"error"`` or ``"overwrite"``.
    :param uri: the destination, for the error (already redacted).
    :param leftover_owner: when the destination holds an unfinished export that says which
        call made it (a lock, a claim), that call's identity record.
    :param inside: a committed run that holds the destination (in a parent directory or
        prefix): a run inside another would be deleted with it when that run is replaced.
    :param unlisted: what the committed run at the destination holds that its manifest does
        not list (another run inside it, files put there by hand): replacing the run would
        delete them.
    :param nested: runs (manifests, locks, claims) found *below* the destination: writing or
        replacing this run would delete them.
    :raises RunExistsError: with one wording per case, when the export may not write here.
    """
    if nested:
        raise RunExistsError(
            f"another run lies inside this destination ({sorted(nested)[0]!r}); writing "
            "this run here would delete it",
            uri=uri,
            hint="export next to that run, not around it, or move it out first",
        )
    if inside is not None:
        raise RunExistsError(
            f"this destination lies inside the committed run {inside}; a run inside another "
            "would be deleted when that run is replaced",
            uri=uri,
            hint="export next to that run, not into it (a field value without '/')",
        )
    if existing is not None and unlisted:
        shown = ", ".join(repr(p) for p in sorted(unlisted)[:3])
        more = f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else ""
        refusal = RunExistsError(
            f"the committed run here holds {shown}{more}, which its manifest does not list "
            "(another run inside it, or files put there by hand); raysync never deletes them",
            uri=uri,
            hint="move them out of the run, then export again",
        )
    else:
        refusal = None
    if existing is not None:
        if same_call(existing.run, run):
            if refusal is not None:
                raise refusal
            return Decision(True, existing)  # an earlier attempt of this very call: a retry
        if existing.run.get("function") != run.get("function"):
            raise RunExistsError(
                "a run of another function "
                f"({existing.run.get('function') or 'unknown'}) is committed here; raysync "
                "replaces only runs of the same function, whatever the conflict policy",
                uri=uri,
                hint="choose another output_uri, or delete that run yourself if you mean to",
            )
        if conflict == "overwrite":
            if refusal is not None:
                raise refusal
            return Decision(True, existing)
        raise RunExistsError("a committed run already exists here", uri=uri, hint=HINT_OTHER_URI)
    if leftover_owner is not None:
        if same_call(leftover_owner, run):
            return Decision(True, None)  # this call's own earlier attempt died mid-export
        raise RunExistsError(
            f"another call (task {leftover_owner.get('task_id') or 'unknown'}) is writing "
            "this run, or died while writing it",
            uri=uri,
            hint="give each call its own output_uri (e.g. add {call_id}); if that call died, "
            "delete its unfinished run first",
        )
    if occupied:
        raise RunExistsError(
            "the destination exists and holds data that is not a raysync run; raysync never "
            "writes into, replaces or deletes it, whatever the conflict policy",
            uri=uri,
            hint="choose a new or empty destination (e.g. a subdirectory), or move that "
            "data away yourself",
        )
    return Decision(False, None)


_UMASK = os.umask(0)
os.umask(_UMASK)


def placed_mode(mode: int) -> int:
    """The permission bits a file gets when raysync places it: the manifest's ``rwx`` bits
    only (no setuid, setgid or sticky bit, whatever a manifest says), less the umask."""
    return mode & 0o777 & ~_UMASK

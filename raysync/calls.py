"""One call of a decorated function on the worker: who it is (rendered from the call and
Ray's runtime context before the user's code runs) and what it holds while it runs."""

from __future__ import annotations

import inspect
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import ray

from raysync import driver, leases, rayshim, resuming, shards, workspace
from raysync.backend import Shard
from raysync.config import Config
from raysync.copy import KnownDigests
from raysync.errors import DestinationNotVisibleError, ExportError, LeaseHeldError, RaySyncError
from raysync.identity import call_id, ordinal_in_task
from raysync.redaction import redact_error
from raysync.target import Target, redact, render


@dataclass
class Call:
    cfg: Config
    target: Target
    task_id: str
    run: dict[str, Any]
    prepared: Mapping[str, str]
    ws: workspace.Workspace | None = None
    started: float = 0.0
    #: Digests of files an earlier export of this call hashed (checkpoints).
    known: KnownDigests = field(default_factory=KnownDigests)
    #: Checkpoints and the final export take turns.
    export_lock: threading.Lock = field(default_factory=threading.Lock)
    checkpoints: int = 0
    #: When the last checkpoint committed (``time.perf_counter``; the start before one).
    last_checkpoint: float = 0.0
    #: The URI's lease (:mod:`raysync.leases`), held from the first checkpoint (or the start,
    #: with ``sync_every`` or ``resume``) until the final export ends.
    lease: leases.Lease | None = None
    #: ``isolated_export(shard=...)``: which shard of the run this call exports.
    shard: Shard | None = None

    def hold_lease(self) -> None:
        """Take the run's lease (:mod:`raysync.leases`) unless held already. Another live
        call holding it is :class:`LeaseHeldError`; with ``conflict="overwrite"`` (where two
        calls may write one run) this call goes on without it."""
        if self.lease is None:
            where = leases.location(self.cfg.backend, self.target)
            lease = leases.Lease(leases.key(self.cfg.function, where), self.run, redact(where))
            try:
                lease.acquire()
            except LeaseHeldError:
                if self.cfg.conflict == "overwrite" and not self.cfg.resume:
                    return
                raise
            self.lease = lease

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


_SIGNATURES: dict[int, tuple[Callable[..., Any], inspect.Signature]] = {}


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature``, once per function (it costs more than the rest of ``begin``).
    Keyed by identity: a callable object need not be hashable."""
    found = _SIGNATURES.get(id(fn))
    if found is not None and found[0] is fn:
        return found[1]
    sig = inspect.signature(fn)
    if len(_SIGNATURES) < 256:
        _SIGNATURES[id(fn)] = (fn, sig)  # holds fn: its id is never reused meanwhile
    return sig


def begin(
    cfg: Config, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Call:
    """Render the URI and look up the driver's facts; fails before the user's code runs."""
    # In a worker the node, job and session are fixed for the process (asked once); on a
    # driver they are asked each call (it may join another cluster).
    facts = rayshim.worker_facts()
    ctx = ray.get_runtime_context() if facts is not None or rayshim.initialized() else None
    # A direct call (not a Ray task) has no task id; a unique one keeps two direct calls from
    # being taken for two attempts of one task (which may replace each other's runs).
    # (Asked only in a worker: on the driver Ray logs a warning for every call.)
    in_task = ctx if facts is not None else None
    task_id = (in_task.get_task_id() if in_task else None) or f"direct-{uuid.uuid4().hex}"
    if facts is not None:
        node_id, job_id, session = facts[0] or "local", facts[1] or "local", facts[2]
    else:
        node_id = (ctx.get_node_id() if ctx else None) or "local"
        job_id = (ctx.get_job_id() if ctx else None) or "local"
        # Ray task ids repeat across clusters: the session (one per cluster start) and the
        # job make "an earlier attempt of this call" mean this call (DESIGN invariant 7).
        session = rayshim.session_name(ctx) if ctx else "local"
    attempt = rayshim.attempt_number()
    ordinal = ordinal_in_task(task_id, attempt, cfg.function)
    record = driver.lookup(cfg.key)
    if (cfg.backend.capabilities.needs_driver or cfg.driver_held) and record is None:
        raise DestinationNotVisibleError(
            "the driver did not prepare this destination, so this worker cannot prove it is "
            "the one the driver meant",
            uri=redact(cfg.target.uri),
            hint="import raysync and decorate the function in the driver process (the "
            "driver publishes each destination when ray.init() runs or at decoration)",
        )
    values: dict[str, Any] = {
        "call_id": call_id(session, job_id, task_id, cfg.function, ordinal),
        "task_id": task_id,
        "job_id": job_id,
        "node_id": node_id,
        "attempt": attempt,
    }
    if cfg.fields:
        sig = _signature(fn)
        bound = sig.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        for name, value in bound.arguments.items():
            if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                values.update(value)  # fields may name any keyword a **kwargs function takes
            else:
                values[name] = value
    uri = render(cfg.target.uri, values, available=sorted(set(values) - {"self"}))
    target = Target(
        uri,
        cfg.target.scheme,
        cfg.target.options,
        record.cwd if record else (os.getcwd() if driver.is_driver() else None),
    )
    run = {
        "function": cfg.function,
        "session": session,
        "task_id": task_id,
        "job_id": job_id,
        "call": str(ordinal),
        "attempt": attempt,
        "node_id": node_id,
        "hostname": socket.gethostname(),
        "uri": redact(uri),
        "backend": cfg.backend.name,
    }
    call = Call(cfg, target, task_id, run, record.backend_data if record else {})
    if cfg.shard is not None and cfg.shards is not None:
        call.shard = shards.render(cfg.shard, cfg.shards, values, run)
        run.update(shard=call.shard.name, shards=call.shard.count)
    return call


def start(call: Call) -> None:
    """Create the call's workspace. With ``resume``, take the run's lease (a live call
    holding it is a conflict, now) and fill the trees from the run an earlier call left
    (:func:`raysync.resuming.restore`)."""
    cfg = call.cfg
    call.ws = workspace.create(f"{call.task_id[:24]}-{call.run['attempt']}", cfg.trees)
    call.started = call.last_checkpoint = time.perf_counter()
    call.run["started_at"] = now()
    if cfg.sync_every is not None:
        call.run["sync_every"] = cfg.sync_every  # how stale a checkpoint of a live call gets
    if not cfg.resume:
        return
    try:
        call.hold_lease()  # another live call of this cluster holding it: a conflict
        call.ws = resuming.restore(
            cfg.backend, call.target, call.prepared, call.ws, call.run, cfg.conflict
        )
        if call.ws.resumed_from is not None:
            call.checkpoints = call.ws.resumed_from.checkpoint
    except BaseException as e:
        call.release()
        workspace.remove(call.ws)
        # Redacted, without its chain: a store client's error may quote a credential.
        if isinstance(e, RaySyncError):
            raise redact_error(e) from None
        if isinstance(e, Exception):
            raise ExportError(
                f"resuming from the run at {redact(call.target.uri)} failed: "
                + redact(f"{type(e).__name__}: {e}"),
                backend=cfg.backend.name,
                uri=redact(call.target.uri),
                workspace=None,
            ) from None
        raise

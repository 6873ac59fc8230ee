"""Driver-side facts the worker needs, carried through Ray's internal KV store.

A decorated function may be decorated at import time before ``ray.init()``, and it is decorated
again when a worker re-imports its module, so facts captured at decoration time would be the
worker's. Instead the driver *prepares* each decorated target once Ray is up (at decoration if
Ray already runs, otherwise from a post-``ray.init`` hook) and publishes a record keyed by job
id and target key: the driver's cwd and node id, plus what the backend's ``prepare`` returned.
The worker reads that record by the same key.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from raysync import rayshim
from raysync.backend import Capabilities
from raysync.target import Target

_KV_NAMESPACE = "raysync"


@dataclass(frozen=True)
class Prepared:
    """What the driver published for one target in one job."""

    cwd: str
    node_id: str
    hostname: str
    backend_data: dict[str, str] = field(default_factory=dict)


def is_driver() -> bool:
    """True in a Ray driver process (or before ``ray.init``), False inside workers."""
    return rayshim.is_driver()


def _kv_key(job_id: str, target_key: str) -> bytes:
    return f"target:{job_id}:{target_key}".encode()


@dataclass
class _Pending:
    key: str
    target: Target
    prepare: Callable[[Target], Any]
    capabilities: Capabilities


_pending: dict[str, _Pending] = {}
_published: set[tuple[str, str]] = set()
_local: dict[str, Prepared] = {}
#: Records this worker read, by job and key.
_seen: dict[tuple[str, str], Prepared] = {}
_lock = threading.Lock()


def register_target(
    key: str, target: Target, prepare: Callable[[Target], Any], capabilities: Capabilities
) -> None:
    """Remember a decorated target; publish it now if Ray is up on this driver."""
    if not is_driver():
        return
    with _lock:
        _pending[key] = _Pending(key, target, prepare, capabilities)
        # Decorating again (a notebook cell re-run, after a chdir) makes fresh facts: the
        # same key must not keep the first decoration's cwd.
        _local.pop(key, None)
        for published in [p for p in _published if p[1] == key]:
            _published.discard(published)
    if ray.is_initialized():
        publish(key)


def _make_record(pending: _Pending) -> Prepared:
    cwd = os.getcwd()
    target = Target(pending.target.uri, pending.target.scheme, pending.target.options, cwd)
    data = dict(pending.prepare(target)) if pending.capabilities.needs_driver else {}
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    return Prepared(cwd=cwd, node_id=node_id, hostname=socket.gethostname(), backend_data=data)


def publish(key: str) -> None:
    """Prepare and publish one target for the current job (idempotent per job)."""
    job_id = ray.get_runtime_context().get_job_id()
    with _lock:
        pending = _pending.get(key)
        if pending is None or (job_id, key) in _published:
            return
        _published.add((job_id, key))
    record = _make_record(pending)
    _local[key] = record
    rayshim.kv_put(
        _kv_key(job_id, key), json.dumps(record.__dict__).encode(), namespace=_KV_NAMESPACE
    )


def _on_ray_init() -> None:
    if not is_driver():
        return
    with _lock:
        # A new ray.init is a new cluster (job ids restart at 01000000): publish everything again.
        _published.clear()
        _local.clear()
        keys = list(_pending)
    for key in keys:
        publish(key)


def lookup(key: str) -> Prepared | None:
    """The record the driver published for ``key`` in this job, if any.

    On the driver itself (a decorated function called directly) the record is made locally.
    """
    if is_driver():
        record = _local.get(key)
        pending = _pending.get(key)
        if record is None and pending is not None:
            record = _local[key] = _make_record(pending)
        return record
    job_id = ray.get_runtime_context().get_job_id()
    found = _seen.get((job_id, key))
    if found is not None:
        return found  # a job's record never changes: one GCS round trip per worker, not call
    raw = rayshim.kv_get(_kv_key(job_id, key), namespace=_KV_NAMESPACE)
    if raw is None:
        return None
    record = _seen[(job_id, key)] = Prepared(**json.loads(raw))
    return record


def install_init_hook() -> None:
    """Publish pending targets right after ``ray.init()`` on the driver.

    Ray offers no public post-init hook (:func:`raysync.rayshim.add_post_init_hook`). Where
    it is missing, decoration after ``ray.init`` still publishes immediately.
    """
    rayshim.add_post_init_hook(_on_ray_init)

"""Leases: how a call tells the cluster that it is still writing a run.

A call that checkpoints (``sync_every``, :func:`raysync.checkpoint`) or resumes holds a lease
on its rendered URI from then until its final export ends: a small record in the cluster's
internal KV store (the GCS), renewed by a thread every :data:`TTL` / 3 seconds. A call that
dies (its worker SIGKILLed, its node gone) stops renewing, and its lease expires after
:data:`TTL` seconds. ``resume=True`` reads the lease to know whether the run it found is
still being written (:func:`raysync.resuming.restore`): a live lease of another call is a
conflict, never a take-over.

The GCS decides who holds the lease (a put that succeeds only when the key is absent), so two
calls starting at once never both hold it. Outside Ray (a direct call) the leases live in this
process. The key is a hash of the function and the URI: no URI (and no credential in one)
is stored in the KV.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import ray

from raysync import rayshim, redaction, rules
from raysync.errors import RunExistsError

log = redaction.logger("raysync")

_NAMESPACE = "raysync_leases"
#: Seconds a lease lives without renewal (``RAYSYNC_LEASE_SECONDS`` changes it).
TTL = 30.0

_local: dict[bytes, bytes] = {}
_local_lock = threading.Lock()


def ttl() -> float:
    try:
        return max(1.0, float(os.environ.get("RAYSYNC_LEASE_SECONDS", TTL)))
    except ValueError:
        return TTL


def key(function: str, uri: str) -> bytes:
    return hashlib.sha256(f"lease\0{function}\0{uri}".encode()).hexdigest().encode()


def _put_new(k: bytes, v: bytes) -> bool:
    if ray.is_initialized():
        return rayshim.kv_put_new(k, v, namespace=_NAMESPACE)
    with _local_lock:
        if k in _local:
            return False
        _local[k] = v
        return True


def _put(k: bytes, v: bytes) -> None:
    if ray.is_initialized():
        rayshim.kv_put(k, v, namespace=_NAMESPACE)
    else:
        with _local_lock:
            _local[k] = v


def _get(k: bytes) -> bytes | None:
    if ray.is_initialized():
        return rayshim.kv_get(k, namespace=_NAMESPACE)
    with _local_lock:
        return _local.get(k)


def _delete(k: bytes) -> None:
    if ray.is_initialized():
        rayshim.kv_del(k, namespace=_NAMESPACE)
    else:
        with _local_lock:
            _local.pop(k, None)


def holder(k: bytes) -> dict[str, Any] | None:
    """The live lease on ``k``: the holding call's claim record, or ``None`` (no lease, or
    one that expired: its call stopped renewing it)."""
    raw = _get(k)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("expires"), (int, float)):
        return None
    return record if record["expires"] > time.time() else None


class Lease:
    """A held lease, renewed until :meth:`release`."""

    def __init__(self, k: bytes, run: Mapping[str, Any], shown: str) -> None:
        self.key, self.shown = k, shown
        self.record = rules.claim_record(run)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _value(self) -> bytes:
        return json.dumps({**self.record, "expires": time.time() + ttl()}).encode()

    def acquire(self) -> None:
        """Take the lease, or raise :class:`RunExistsError` when another live call holds it.

        An expired lease, or one left by an earlier attempt of this call (Ray retried it, so
        that attempt is over), is taken over."""
        for _ in range(3):
            if _put_new(self.key, self._value()):
                break
            held = holder(self.key)
            if held is not None and not rules.same_call(held, self.record):
                raise RunExistsError(
                    f"another call (task {held.get('task_id') or 'unknown'}, attempt "
                    f"{held.get('attempt')}) is writing this run right now",
                    uri=self.shown,
                    hint="give each call its own output_uri (e.g. add {call_id}), or wait "
                    "for that call to end",
                )
            if held is not None or _get(self.key) is not None:
                _put(self.key, self._value())  # ours, or expired: take it over
                break
        self.thread = threading.Thread(target=self._renew, name="raysync-lease", daemon=True)
        self.thread.start()

    def _renew(self) -> None:
        while not self.stop.wait(ttl() / 3):
            try:
                _put(self.key, self._value())
            except Exception as e:  # noqa: BLE001 - the GCS may be briefly unreachable
                log.warning("raysync: could not renew the lease of %s: %s", self.shown, e)

    def release(self) -> None:
        """Stop renewing and delete the lease, when it is still this call's."""
        if self.thread is None:
            return
        self.stop.set()
        self.thread.join()
        self.thread = None
        try:
            raw = _get(self.key)
            mine = raw is not None and rules.claim_record(json.loads(raw)) == self.record
            if mine:
                _delete(self.key)
        except Exception as e:  # noqa: BLE001 - an unreleased lease expires by itself
            log.debug("raysync: could not release the lease of %s: %s", self.shown, e)

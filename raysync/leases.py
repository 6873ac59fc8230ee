"""Leases: how a call tells the cluster that it is still writing a run.

A call that checkpoints (``sync_every``, :func:`raysync.checkpoint`) or resumes holds a lease
on its run's location (the backend's canonical spelling of it, so that two spellings of one
directory share a lease) from its first checkpoint (from its start, with ``resume``) until
its final export ends: a small record in the cluster's
internal KV store (the GCS), renewed by a thread every :data:`TTL` / 3 seconds. A call that
dies (its worker SIGKILLed, its node gone) stops renewing, and its lease expires after
:data:`TTL` seconds. ``resume=True`` reads the lease to know whether the run it found is
still being written (:func:`raysync.resuming.restore`): a live lease of another call is a
conflict, never a take-over.

The GCS decides who holds the lease (a put that succeeds only when the key is absent, one key
per lease generation), so two calls never both hold it. Outside Ray (a direct call) the
leases live in this process. The key is a hash of the function and the redacted location:
no URI, and no credential, is stored in the KV.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import ray

from raysync import rayshim, redaction, rules
from raysync.errors import LeaseHeldError
from raysync.rules import HINT_OTHER_URI
from raysync.target import redact

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


def key(function: str, location: str) -> bytes:
    """The lease's key prefix: a hash of the function and the run's location (a backend's
    canonical spelling of it, credentials redacted: :func:`location`)."""
    return hashlib.sha256(f"lease\0{function}\0{location}".encode()).hexdigest().encode()


def location(backend: Any, target: Any) -> str:
    """Where the run is, spelled one way whatever the URI's spelling: the backend's
    ``location(target)`` when it has one (a resolved path), else the redacted URI."""
    locate = getattr(backend, "location", None)
    if locate is not None:
        try:
            return str(locate(target))
        except Exception as e:  # noqa: BLE001 - a location it cannot resolve: the URI
            log.debug("raysync: no canonical location for %s: %s", redact(target.uri), e)
    return redact(target.uri)


def _gen_key(base: bytes, gen: int) -> bytes:
    return base + b":" + str(gen).encode()


def _list(base: bytes) -> list[int]:
    prefix = base + b":"
    if ray.is_initialized():
        keys = rayshim.kv_list(prefix, namespace=_NAMESPACE)
    else:
        with _local_lock:
            keys = [k for k in _local if k.startswith(prefix)]
    gens = []
    for k in keys:
        tail = k[len(prefix) :]
        if tail.isdigit():
            gens.append(int(tail))
    return sorted(gens)


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


def _record(k: bytes) -> dict[str, Any] | None:
    raw = _get(k)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("expires"), (int, float)):
        return None
    return record


def holder(base: bytes) -> dict[str, Any] | None:
    """The live lease on ``base``: the holding call's record, or ``None`` (no lease, or one
    that expired: its call stopped renewing it)."""
    gens = _list(base)
    if not gens:
        return None
    record = _record(_gen_key(base, gens[-1]))
    return record if record is not None and record["expires"] > time.time() else None


class Lease:
    """A held lease, renewed until :meth:`release`.

    Leases have generations (``<key>:0``, ``<key>:1``...): a call takes a lease by creating
    the next generation's key with a put that succeeds only when the key is absent, so of
    calls racing for an expired lease exactly one wins. A holder renews only while no newer
    generation exists: a call that stalled past its lease (a long GIL hold, the GCS out of
    reach) finds it lost and never takes it back; it releases only its own generation."""

    def __init__(self, base: bytes, run: Mapping[str, Any], shown: str) -> None:
        self.base, self.shown = base, shown
        self.record = {**rules.claim_record(run), "token": uuid.uuid4().hex}
        self.gen: int | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _value(self) -> bytes:
        return json.dumps({**self.record, "expires": time.time() + ttl()}).encode()

    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseHeldError` when another live call holds
        it. An expired lease, or one left by an earlier attempt of this call (Ray retried
        it, so that attempt is over), is taken over."""
        for _ in range(5):
            gens = _list(self.base)
            nxt = 0
            if gens:
                top = _record(_gen_key(self.base, gens[-1]))
                if (
                    top is not None
                    and top["expires"] > time.time()
                    and not rules.same_call(top, self.record)
                ):
                    raise LeaseHeldError(
                        f"another call (task {top.get('task_id') or 'unknown'}, attempt "
                        f"{top.get('attempt')}) is writing this run right now",
                        uri=self.shown,
                        hint="give each call its own output_uri (e.g. add {call_id}), or wait "
                        f"for that call to end (its lease lapses {ttl():g} s after it dies)",
                    )
                nxt = gens[-1] + 1
            if _put_new(_gen_key(self.base, nxt), self._value()):
                self.gen = nxt
                for g in gens:
                    _delete(_gen_key(self.base, g))  # expired, or an earlier attempt's
                self.thread = threading.Thread(
                    target=self._renew, name="raysync-lease", daemon=True
                )
                self.thread.start()
                return
        raise LeaseHeldError(
            "other calls keep taking this run's lease", uri=self.shown, hint=HINT_OTHER_URI
        )

    def owns(self) -> bool:
        """No newer generation exists and this generation is still ours."""
        if self.gen is None or _get(_gen_key(self.base, self.gen + 1)) is not None:
            return False
        record = _record(_gen_key(self.base, self.gen))
        return record is not None and record.get("token") == self.record["token"]

    def _renew(self) -> None:
        while not self.stop.wait(ttl() / 3):
            try:
                if not self.owns():
                    log.error(
                        "raysync: the lease of %s was taken by another call while this call "
                        "stalled; its next commit may meet a conflict",
                        self.shown,
                    )
                    return
                assert self.gen is not None
                _put(_gen_key(self.base, self.gen), self._value())
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
            if self.owns():
                assert self.gen is not None
                _delete(_gen_key(self.base, self.gen))
        except Exception as e:  # noqa: BLE001 - an unreleased lease expires by itself
            log.debug("raysync: could not release the lease of %s: %s", self.shown, e)

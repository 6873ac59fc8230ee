"""raysync's metrics in Ray's own metrics system (``ray.util.metrics``): they appear on each
node's Prometheus endpoint (``ray.init(_metrics_export_port=...)``, or
``ray start --metrics-export-port``) and so in Ray's dashboard and Grafana.

Every metric is tagged with the backend's name only: never a URI (it may hold a bucket name,
a path or a credential) and never a task id (unbounded cardinality). Outside a Ray worker or
driver, every call here does nothing.

=================================  =========  =============================================
metric (Prometheus name)           type       what
=================================  =========  =============================================
``raysync_exported_bytes``         counter    bytes committed (final exports and checkpoints)
``raysync_exported_files``         counter    files committed
``raysync_exports``                counter    commits, tagged ``status`` (succeeded, failed,
                                              checkpoint)
``raysync_export_errors``          counter    exports that raised (nothing committed)
``raysync_retries``                counter    transient store errors retried
``raysync_export_seconds``         histogram  seconds per export
``raysync_checkpoint_lag_seconds`` gauge      seconds of work not yet in a checkpoint when the
                                              last one committed (the interval it covered)
``raysync_bytes_in_flight``        gauge      bytes of exports running in this process
=================================  =========  =============================================
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

from raysync import rayshim, redaction

log = redaction.logger("raysync")

_lock = threading.RLock()  # in_flight makes its gauge while holding it
_made: dict[str, Any] = {}
_in_flight: dict[str, int] = {}
#: What the in-flight gauge last showed, per backend.
_shown: dict[str, int] = {}
_GAUGE_STEP = 1 << 20
#: The backend of the export running in this context (tags retries).
backend_var: contextvars.ContextVar[str] = contextvars.ContextVar("raysync_backend", default="")

_BOUNDS = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]


def _metric(kind: str, name: str, description: str, tags: tuple[str, ...]) -> Any:
    """The metric ``name``, made once per process (``None`` outside Ray)."""
    found = _made.get(name)
    if found is not None:  # made in this process: Ray was up, and a worker stays connected
        return found if rayshim.initialized() else None
    if not rayshim.initialized():
        return None
    with _lock:
        found = _made.get(name)
        if found is not None:
            return found
        try:
            from ray.util import metrics as m

            if kind == "counter":
                found = m.Counter(name, description=description, tag_keys=tags)
            elif kind == "gauge":
                found = m.Gauge(name, description=description, tag_keys=tags)
            else:
                found = m.Histogram(
                    name, description=description, boundaries=_BOUNDS, tag_keys=tags
                )
        except Exception as e:  # noqa: BLE001 - metrics never fail an export
            log.debug("raysync: metric %s is unavailable: %s", name, e)
            return None
        _made[name] = found
        return found


def _safe(fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - metrics never fail an export
        log.debug("raysync: a metric update failed: %s", e)


def exported(backend: str, status: str, files: int, nbytes: int, seconds: float) -> None:
    """One committed export (a final one, ``succeeded`` or ``failed``, or a checkpoint)."""
    tags = {"backend": backend}
    for name, desc, value in (
        ("raysync_exported_bytes", "Bytes raysync committed", nbytes),
        ("raysync_exported_files", "Files raysync committed", files),
    ):
        c = _metric("counter", name, desc, ("backend",))
        if c is not None and value:
            _safe(c.inc, value, tags)
    c = _metric(
        "counter", "raysync_exports", "Runs and checkpoints committed", ("backend", "status")
    )
    if c is not None:
        _safe(c.inc, 1, {"backend": backend, "status": status})
    h = _metric("histogram", "raysync_export_seconds", "Seconds per export", ("backend",))
    if h is not None:
        _safe(h.observe, seconds, tags)


def failed(backend: str) -> None:
    """An export that raised: nothing was committed."""
    c = _metric("counter", "raysync_export_errors", "Exports that failed", ("backend",))
    if c is not None:
        _safe(c.inc, 1, {"backend": backend})


def retried() -> None:
    """A transient error that is retried (tagged with the running export's backend)."""
    c = _metric("counter", "raysync_retries", "Transient errors retried", ("backend",))
    if c is not None:
        backend = backend_var.get()
        if not backend:  # an upload thread: the one export running here, if only one
            with _lock:
                running = [b for b, n in _in_flight.items() if n > 0]
            backend = running[0] if len(running) == 1 else "unknown"
        _safe(c.inc, 1, {"backend": backend})


def checkpoint_lag(backend: str, seconds: float) -> None:
    g = _metric(
        "gauge",
        "raysync_checkpoint_lag_seconds",
        "Seconds of work the last checkpoint covered",
        ("backend",),
    )
    if g is not None:
        _safe(g.set, seconds, {"backend": backend})


def in_flight(backend: str, delta: int) -> None:
    """Bytes of the exports running in this process, up at the start and down at the end."""
    with _lock:
        now = _in_flight[backend] = max(0, _in_flight.get(backend, 0) + delta)
        # Short exports come and go between two scrapes: the gauge is set when the bytes in
        # flight move by a mebibyte or more, or drop to none (not twice per small call).
        shown = _shown.get(backend, 0)
        if abs(now - shown) < _GAUGE_STEP and (now or not shown):
            return
        _shown[backend] = now
        # Set under the lock: two threads' updates reach the gauge in the order they count.
        g = _metric("gauge", "raysync_bytes_in_flight", "Bytes being exported", ("backend",))
        if g is not None:
            _safe(g.set, now, {"backend": backend})

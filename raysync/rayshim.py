"""Every use of Ray's private API in raysync, in one place, each with why no public API serves.

Checked on Ray 2.60.0 (the version the suite runs on; ``pyproject.toml`` states the floor).
When a Ray upgrade breaks one of these, this module is the only one to change; each function
degrades to a safe answer where it can, and says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray


def remote_function_parts(obj: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The plain function and the ``@ray.remote(...)`` options of a ``RemoteFunction``.

    ``@isolated_export`` stacked above ``@ray.remote`` must wrap the user's function, not the
    remote handle, and then re-apply the same options. Ray exposes neither (``_function`` and
    ``_default_options`` are attributes of ``ray.remote_function.RemoteFunction``)."""
    return obj._function, dict(obj._default_options)


def actor_class_parts(obj: Any) -> tuple[type, dict[str, Any]]:
    """The user's class and the ``@ray.remote(...)`` options of an ``ActorClass``.

    Same reason as :func:`remote_function_parts`: Ray keeps the original class only in
    ``__ray_metadata__.modified_class.__ray_actor_class__``."""
    original = obj.__ray_metadata__.modified_class.__ray_actor_class__
    return original, dict(obj._default_options)


def attempt_number() -> int:
    """Ray's attempt number of the running task (0 for the first try; 0 outside a task).

    The runtime context has no public getter for it; the core worker has
    ``get_current_task_attempt_number``."""
    try:
        core = ray._private.worker.global_worker.core_worker
        return int(core.get_current_task_attempt_number())
    except Exception:  # noqa: BLE001 - outside a task (a direct call on the driver)
        return 0


def session_name(ctx: Any) -> str:
    """The cluster session's name (``session_<date>_<pid>``): unique per cluster start.

    ``RuntimeContext.get_session_name`` is public in newer Ray; older releases have it only
    on the node object."""
    get = getattr(ctx, "get_session_name", None)
    if get is not None:
        return str(get())
    return str(ray._private.worker.global_worker.node.session_name)


def is_driver() -> bool:
    """True in a Ray driver process (or before ``ray.init``), False inside workers.

    Ray has no public "am I a worker?" call; the global worker's ``mode`` tells."""
    worker = ray._private.worker.global_worker
    return bool(getattr(worker, "mode", None) != ray._private.worker.WORKER_MODE)


def initialized() -> bool:
    """``ray.is_initialized()`` without its client-mode wrapper (it runs several times per
    call; ``is_initialized`` itself reads ``global_worker.connected``)."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    if getattr(getattr(worker, "global_worker", None), "connected", False):
        return True
    return bool(ray.is_initialized())  # a Ray Client driver is initialized, not connected


#: In a worker process: (node id, job id, session name, GCS address), fixed for its life.
_WORKER_FACTS: dict[int, tuple[str, str, str, str]] = {}


def worker_facts() -> tuple[str, str, str, str] | None:
    """(node id, job id, session name, GCS address) of this worker process, asked of the
    runtime context once: a Ray worker process serves one job of one cluster on one node for
    its whole life. ``None`` on a driver or outside Ray (a driver can ``ray.shutdown()`` and
    join another cluster, so there the caller asks each time)."""
    if not initialized() or is_driver():
        return None
    pid = os.getpid()
    found = _WORKER_FACTS.get(pid)
    if found is None:
        ctx = ray.get_runtime_context()
        found = (
            str(ctx.get_node_id()),
            str(ctx.get_job_id()),
            session_name(ctx),
            str(ctx.gcs_address),
        )
        _WORKER_FACTS[pid] = found
    return found


def kv_put(key: bytes, value: bytes, *, namespace: str) -> None:
    """Put ``value`` in the cluster's internal KV store (the GCS).

    The driver publishes each destination's facts (its cwd, a backend's visibility token)
    for workers of the same job; Ray's public API has no small cluster-wide store (a named
    actor would be one more process per job)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=namespace)


def kv_get(key: bytes, *, namespace: str) -> bytes | None:
    """Read what :func:`kv_put` stored (``None`` when absent)."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(key, namespace=namespace)
    return None if raw is None else bytes(raw)


def kv_put_new(key: bytes, value: bytes, *, namespace: str) -> bool:
    """Put ``value`` only when ``key`` is absent; True when this call wrote it (the GCS
    decides, so two callers racing for one key never both win)."""
    from ray.experimental import internal_kv

    existed = internal_kv._internal_kv_put(key, value, overwrite=False, namespace=namespace)
    return not existed


def kv_del(key: bytes, *, namespace: str) -> None:
    """Delete ``key`` from the internal KV store (nothing when absent)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, namespace=namespace)


def kv_list(prefix: bytes, *, namespace: str) -> list[bytes]:
    """The keys in the internal KV store that start with ``prefix``."""
    from ray.experimental import internal_kv

    return [bytes(k) for k in internal_kv._internal_kv_list(prefix, namespace=namespace)]


def add_post_init_hook(hook: Callable[[], None]) -> bool:
    """Run ``hook`` right after every ``ray.init()`` on the driver; False when Ray has no
    such list (decoration after ``ray.init`` then publishes at once instead).

    Ray has no public post-init hook; ``ray._private.worker._post_init_hooks`` has existed
    since Ray 1.x."""
    hooks = getattr(ray._private.worker, "_post_init_hooks", None)
    if not isinstance(hooks, list):
        return False
    if hook not in hooks:
        hooks.append(hook)
    return True


def session_dir() -> str | None:
    """This node's Ray session directory (``/tmp/ray/session_...``), where workspaces live
    so that Ray's own clean-up of old sessions removes them; ``None`` without a node.

    The runtime context does not expose the session directory."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return None
    try:
        return str(node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - a node object without it: the caller falls back
        return None

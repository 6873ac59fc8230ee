"""``@isolated_export``: run each call in its own workspace, then export its trees.

The data flow (docs/architecture.md) is one straight line:
decorate (validate, on the driver) → workspace → run → scan → export → ExportResult.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import ray

from raysync import checkpoints, driver, metrics, rayshim, redaction, workspace
from raysync import checksum as checksum_mod
from raysync.backend import Conflict, ExportOutcome
from raysync.calls import Call, begin, now, start
from raysync.checkpoints import Checkpoint, Checkpoints
from raysync.config import Config, make_config
from raysync.errors import (
    ConfigError,
    ExportError,
    RaySyncError,
    TemplateError,
)
from raysync.exporting import export_once
from raysync.hookspecs import ExportBackend
from raysync.identity import function_name
from raysync.lifecycle import prune
from raysync.manifest import FileEntry, Manifest
from raysync.redaction import redact_error
from raysync.result import ExportResult, ExportStats, IsolatedExport
from raysync.target import (
    BUILTIN_FIELDS,
    redact,
    template_fields,
)

log = redaction.logger("raysync")

#: chdir-mode calls in one process take turns: cwd and environment are process-wide.
_CHDIR_LOCK = threading.RLock()
_ASYNC_LOCKS: dict[int, asyncio.Lock] = {}


def isolated_export(
    output_uri: str | None = None,
    *,
    trees: Sequence[str] = ("export", "data", "artifacts"),
    backend: str | ExportBackend | None = None,
    storage_options: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    export_on_failure: bool = True,
    conflict: Conflict = "error",
    chdir: bool = True,
    keep_workspace: bool = False,
    checksum: str = checksum_mod.DEFAULT,
    sync_every: float | None = None,
    validate: Callable[[Any], Any] | None = None,
    resume: bool = False,
    shard: str | None = None,
    shards: int | str | None = None,
    keep_last: int | None = None,
) -> IsolatedExport:
    """Run every call of a Ray task or actor method in a private workspace, then export it.

    :param output_uri: where each run goes: a path (relative to the **driver's** cwd), a
        ``scheme://`` URI served by an installed backend, or ``None`` to return the files by
        value in the result. ``{field}`` placeholders take any argument of the call by name
        and ``{task_id}``, ``{job_id}``, ``{node_id}``, ``{attempt}``.
    :param trees: workspace-relative directories exported after the call.
    :param backend: a backend name (``"local"``) or object; default: chosen by the scheme.
    :param storage_options: options for the backend (see docs/backends.md).
    :param env: extra environment variables set to workspace paths during the call, e.g.
        ``{"TV_ARTIFACTS_DIR": "artifacts"}`` (values are relative to the workspace).
    :param export_on_failure: when the function raises, export the partial trees with
        status ``failed`` before the exception reaches the caller.
    :param conflict: ``"error"`` (default) or ``"overwrite"`` when the run already exists.
    :param chdir: ``True`` (default): the call's cwd and ``RAYSYNC_*`` env vars point at the
        workspace, and calls in one process take turns (threaded and async actors run their
        decorated methods one at a time). ``False``: no cwd or env change, calls run
        concurrently, and code finds its directories with :func:`raysync.current_workspace`.
    :param keep_workspace: keep the workspace after a successful export (for debugging).
    :param checksum: the manifest's per-file checksum: ``"xxh3-128"`` (default; fast, catches
        corruption, not tamper-evident), ``"blake3"`` or ``"sha256"`` (tamper-evident, slower).
        See docs/manifest.md.
    :param sync_every: seconds between checkpoints while the call runs: the trees are
        exported (incrementally: only changed files are sent) and committed with status
        ``running``, so a crash loses at most one interval of work. The final export replaces
        the last checkpoint. ``None`` (default): export once, when the call ends.
    :param validate: ``validate(workspace)`` runs after the function and before the final
        commit; when it raises, the run is not committed as ``succeeded`` and the call raises
        :class:`raysync.errors.ValidationError`.
    :param resume: start from the checkpoint (or failed run) an earlier attempt of the same
        task, or an earlier call that is no longer running, left at the rendered URI: its
        files are copied into the trees (verified) and
        ``raysync.current_workspace().resumed_from`` says which. See docs/usage.md.
    :param shard: with ``shards``: this call exports one shard of the run at ``output_uri``,
        named by this template (``"{rank}"``); the run is committed, all or nothing, when
        all ``shards`` shards have exported. See docs/usage.md, "Many calls, one output".
    :param shards: how many shards the run has: a number or one field (``"{world_size}"``).
    :param keep_last: after each successful commit, remove this function's older
        ``succeeded`` runs under the template's static root beyond the newest N.

    Works on plain functions and methods (put ``@ray.remote`` above it), and on top of an
    existing ``ray.remote`` function or actor class. Every decorated call returns an
    :class:`raysync.ExportResult`.
    """
    cfg = make_config(
        output_uri,
        trees,
        backend,
        storage_options,
        env,
        export_on_failure,
        conflict,
        chdir,
        keep_workspace,
        checksum,
        sync_every,
        validate,
        resume,
        shard,
        shards,
        keep_last,
    )

    def decorate(obj: Any) -> Any:
        return _decorate(obj, cfg)

    return cast(IsolatedExport, decorate)


def _decorate(obj: Any, cfg: Config) -> Any:
    from ray.actor import ActorClass
    from ray.remote_function import RemoteFunction

    if isinstance(obj, RemoteFunction):
        fn, opts = rayshim.remote_function_parts(obj)
        wrapped = _wrap_function(fn, cfg)
        return ray.remote(**opts)(wrapped) if opts else ray.remote(wrapped)
    if isinstance(obj, ActorClass):
        original, opts = rayshim.actor_class_parts(obj)
        sub = type(
            original.__name__,
            (original,),
            {"__module__": original.__module__, "__qualname__": original.__qualname__},
        )
        _wrap_methods(sub, original, cfg)
        return ray.remote(**opts)(sub) if opts else ray.remote(sub)
    if inspect.isclass(obj):
        _wrap_methods(obj, obj, cfg)
        return obj
    if callable(obj):
        return _wrap_function(obj, cfg)
    raise ConfigError(
        f"@isolated_export cannot decorate {obj!r}",
        hint="decorate a function, a method, a class or a ray.remote object",
    )


def _wrap_methods(cls: type, source: type, cfg: Config) -> None:
    """Wrap the public methods of ``source`` onto ``cls``."""
    for name, member in inspect.getmembers(source, inspect.isfunction):
        if not name.startswith("_"):
            setattr(cls, name, _wrap_function(member, cfg))


def _shown(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


def _wrap_function(fn: Callable[..., Any], cfg: Config) -> Callable[..., Any]:
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigError(
            f"{_shown(fn)} is a generator; @isolated_export needs one result per call",
            hint="return a value (e.g. a list) instead",
        )
    sig = inspect.signature(fn)
    params = set(sig.parameters)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    fields = tuple(dict.fromkeys([*template_fields(cfg.target.uri), *cfg.shard_fields()]))
    available = sorted(params | set(BUILTIN_FIELDS))
    if not takes_any:
        for f in fields:
            if f not in params and f not in BUILTIN_FIELDS:
                raise TemplateError(
                    f"field {{{f}}} is not an argument of {_shown(fn)}",
                    template=cfg.target.uri,
                    available=available,
                )
    function = function_name(fn)
    key = hashlib.sha256(f"{function}\0{cfg.target.uri}\0{cfg.backend.name}".encode()).hexdigest()[
        :24
    ]
    call_cfg = Config(**{**cfg.__dict__, "key": key, "function": function, "fields": fields})
    caps = cfg.backend.capabilities
    if cfg.driver_held:  # the driver prepares it with the full target (its credentials)
        caps = dataclasses.replace(caps, needs_driver=True)
    driver.register_target(key, cfg.driver_target or cfg.target, cfg.backend.prepare, caps)

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> ExportResult[Any]:
            return await _run_async(call_cfg, fn, args, kwargs)

        return async_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> ExportResult[Any]:
        return _run_sync(call_cfg, fn, args, kwargs)

    return wrapper


# -- the worker side ------------------------------------------------------------------------


def _export(call: Call, run: dict[str, Any]) -> tuple[list[FileEntry], Manifest, ExportOutcome]:
    """Scan the trees and export them once (:func:`raysync.exporting.export_once`). Digests
    an earlier export of this call computed are reused for files whose fingerprint has not
    changed, so the backend's incremental export can skip them without reading them."""
    assert call.ws is not None
    return export_once(
        call.cfg.backend,
        call.target,
        call.ws.root,
        run,
        trees=call.cfg.trees,
        conflict=call.cfg.conflict,
        prepared=call.prepared,
        checksum=call.cfg.checksum,
        known=call.known,
        shard=call.shard,
    )


def _checkpoint(call: Call) -> Checkpoint:
    """Commit the call's trees as its next checkpoint (the caller holds ``export_lock``)."""
    if call.cfg.backend.capabilities.by_value:
        raise ConfigError(
            "raysync.checkpoint() needs a destination, but this call returns its files by "
            "value when it ends",
            hint="give the decorator an output_uri (a path, s3://...)",
        )
    call.hold_lease()  # a checkpoint is a run in progress: others must know it is live
    n = call.checkpoints + 1
    run = {
        **call.run,
        "status": "running",
        "checkpoint": n,
        "synced_at": now(),
        "ended_at": None,
        "error": None,
    }
    _, _, outcome = _export(call, run)
    metrics.checkpoint_lag(call.cfg.backend.name, time.perf_counter() - call.last_checkpoint)
    call.last_checkpoint = time.perf_counter()
    call.checkpoints = n
    return Checkpoint(n, outcome.uri)  # as the final ExportResult says it


def _checkpoint_now(call: Call) -> Checkpoint:
    """:func:`raysync.checkpoint`, in turn with ``sync_every`` and the final export."""
    with call.export_lock:
        return _checkpoint(call)


def _syncer(call: Call) -> Checkpoints | None:
    """``sync_every``: commit the call's trees as a checkpoint every interval while it runs."""
    every = call.cfg.sync_every
    if every is None:
        return None
    return Checkpoints(every, call.export_lock, lambda: _checkpoint(call), redact(call.target.uri))


def _finish(call: Call, value: Any, error: BaseException | None) -> ExportResult[Any]:
    """Scan and export; the workspace is removed only after a successful commit."""
    assert call.ws is not None
    run_seconds = time.perf_counter() - call.started
    call.run["ended_at"] = now()
    call.run["status"] = "failed" if error is not None else "succeeded"
    call.run["error"] = (  # the manifest never holds a credential (DESIGN invariant 5)
        redact("".join(traceback.format_exception_only(type(error), error)).strip()[:2000])
        if error is not None
        else None
    )
    be = call.cfg.backend
    if call.checkpoints:
        call.run["checkpoints"] = call.checkpoints
    t0 = time.perf_counter()
    try:
        with call.export_lock:
            files, manifest, outcome = _export(call, call.run)
    except RaySyncError as e:
        # Redacted, and without its chain: a store client's error may quote a credential
        # (DESIGN invariant 5), and Ray shows the whole chain on the driver.
        raise redact_error(e).kept_in(str(call.ws.root)) from None
    except Exception as e:  # noqa: BLE001 - re-raised as an ExportError, redacted, chain cut
        raise ExportError(
            redact(f"{type(e).__name__}: {e}"),
            backend=be.name,
            uri=redact(call.target.uri),
            workspace=str(call.ws.root),
        ) from None
    finally:
        call.release()  # the final export is over: the run is no longer in progress
    seconds = time.perf_counter() - t0
    stats = ExportStats(
        files=len(files),
        bytes=manifest.total_bytes,
        seconds=seconds,
        run_seconds=run_seconds,
        extra={**outcome.extra_stats, "checkpoints": call.checkpoints},
    )
    if call.cfg.keep_last and error is None and outcome.committed:
        template = call.target.with_uri(call.cfg.target.uri)  # with the driver's base dir
        prune(be, template, outcome.uri, call.cfg.function, call.cfg.keep_last)
    if not call.cfg.keep_workspace:
        workspace.remove(call.ws)
    return ExportResult(
        value=value,
        uri=outcome.uri,
        backend=be.name,
        manifest=manifest,
        stats=stats,
        payload=outcome.payload,
        _backend_obj=be,
        shard=call.shard.name if call.shard else None,
        committed_run=outcome.committed,
    )


def _on_error(call: Call, error: BaseException) -> None:
    """The function raised: export the partial trees if asked, and tell the user where."""
    assert call.ws is not None
    if not call.cfg.export_on_failure or not isinstance(error, Exception):
        call.release()
        _note(error, f"raysync: the call failed; its workspace is kept in {call.ws.root}")
        return
    try:
        result = _finish(call, None, error)
    except Exception as export_error:  # noqa: BLE001 - the user's exception must win
        _note(error, f"raysync: exporting the partial trees also failed: {export_error}")
        return
    _note(error, f"raysync: the partial trees were exported with status 'failed' to {result.uri}")
    try:
        error.raysync_result = result  # type: ignore[attr-defined]
    except AttributeError:
        pass


def _note(error: BaseException, text: str) -> None:
    add_note = getattr(error, "add_note", None)
    if add_note is not None:
        add_note(text)


def _run_sync(
    cfg: Config, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> ExportResult[Any]:
    call = begin(cfg, fn, args, kwargs)
    try:
        return _run_sync_call(call, cfg, fn, args, kwargs)
    finally:
        call.release()  # the run's lease, whatever happened (normally released already)


def _run_sync_call(
    call: Call,
    cfg: Config,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> ExportResult[Any]:
    lock = _CHDIR_LOCK if cfg.chdir else None
    if lock is not None:
        lock.acquire()
    try:
        start(call)
        assert call.ws is not None
        with workspace.activated(call.ws, cfg.env, chdir=cfg.chdir):
            syncer = _syncer(call)
            try:
                with checkpoints.active(lambda: _checkpoint_now(call)):
                    value = fn(*args, **kwargs)
                cfg.check_output(call.ws)
            except BaseException as e:  # noqa: BLE001 - recorded, then re-raised
                error: BaseException | None = e
            else:
                error = None
            finally:
                if syncer is not None:
                    syncer.close()
    finally:
        if lock is not None:
            lock.release()
    if error is not None:
        _on_error(call, error)
        raise error
    return _finish(call, value, None)


def _async_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _ASYNC_LOCKS.get(id(loop))
    if lock is None:
        lock = _ASYNC_LOCKS[id(loop)] = asyncio.Lock()
    return lock


async def _run_async(
    cfg: Config, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> ExportResult[Any]:
    call = begin(cfg, fn, args, kwargs)
    try:
        return await _run_async_call(call, cfg, fn, args, kwargs)
    finally:
        await asyncio.to_thread(call.release)


async def _run_async_call(
    call: Call,
    cfg: Config,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> ExportResult[Any]:
    error: BaseException | None = None
    value: Any = None
    syncer: Checkpoints | None = None
    # chdir-mode calls take turns (cwd and environment are process-wide); others run at once.
    turn: contextlib.AbstractAsyncContextManager[Any] = (
        _async_lock() if cfg.chdir else contextlib.nullcontext()
    )
    try:
        async with turn:
            await asyncio.to_thread(start, call)  # a resume reads a run: not on the loop
            assert call.ws is not None
            with workspace.activated(call.ws, cfg.env, chdir=cfg.chdir):
                syncer = _syncer(call)
                try:
                    with checkpoints.active(lambda: _checkpoint_now(call)):
                        value = await fn(*args, **kwargs)
                    await asyncio.to_thread(cfg.check_output, call.ws)
                except BaseException as e:  # noqa: BLE001 - recorded, then re-raised
                    error = e
    finally:
        if syncer is not None:
            await asyncio.to_thread(syncer.close)
    if error is not None:
        await asyncio.to_thread(_on_error, call, error)
        raise error
    # Exporting is blocking I/O: keep the actor's event loop free for other calls.
    return await asyncio.to_thread(_finish, call, value, None)

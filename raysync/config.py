"""The configuration of one ``@isolated_export``: every argument checked on the driver at
decoration, before any call runs (bad input is a :class:`raysync.errors.ConfigError` naming
what is wrong and how to fix it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from raysync import checksum as checksum_mod
from raysync.backend import CONFLICT_POLICIES, Conflict
from raysync.errors import ConfigError, ValidationError
from raysync.hookspecs import ExportBackend
from raysync.manifest import tree_names
from raysync.registry import get_registry
from raysync.target import Target, check_template, check_uri_form, template_fields


@dataclass(frozen=True)
class Config:
    target: Target
    trees: tuple[str, ...]
    backend: ExportBackend
    env: Mapping[str, str]
    export_on_failure: bool
    conflict: Conflict
    chdir: bool
    keep_workspace: bool
    checksum: str = checksum_mod.DEFAULT
    sync_every: float | None = None
    #: ``validate(workspace)``: runs after the function, before the final commit.
    validate: Callable[[Any], Any] | None = None
    #: Start from the checkpoint an earlier call left (:mod:`raysync.resuming`).
    resume: bool = False
    #: ``shard`` and ``shards`` templates (:mod:`raysync.shards`).
    shard: str | None = None
    shards: int | str | None = None
    #: After each successful commit, keep only this many runs (:func:`lifecycle.prune`).
    keep_last: int | None = None
    key: str = ""
    function: str = ""
    fields: tuple[str, ...] = field(default_factory=tuple)
    #: The backend keeps this target's credentials on the driver (``KeepsCredentials``):
    #: ``target`` is the worker's copy, and the driver must prepare it.
    driver_held: bool = False
    #: The full target, on the driver only: never pickled with the call (``__getstate__``).
    driver_target: Target | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "driver_target"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in {**state, "driver_target": None}.items():
            object.__setattr__(self, k, v)

    def shard_fields(self) -> list[str]:
        from raysync import shards

        return shards.fields(self.shard, self.shards)

    def check_output(self, ws: Any) -> None:
        """Run ``validate(ws)``; what it raises becomes a :class:`ValidationError` naming it."""
        if self.validate is None:
            return
        name = getattr(self.validate, "__qualname__", repr(self.validate))
        try:
            self.validate(ws)
        except Exception as e:
            raise ValidationError(
                f"validate={name} refused the output: {type(e).__name__}: {e}",
                hint="the run was not committed as succeeded; fix the output or the check",
            ) from e


def make_config(
    output_uri: str | None,
    trees: Sequence[str],
    backend: str | ExportBackend | None,
    storage_options: Mapping[str, Any] | None,
    env: Mapping[str, str] | None,
    export_on_failure: bool,
    conflict: str,
    chdir: bool,
    keep_workspace: bool,
    checksum: str = checksum_mod.DEFAULT,
    sync_every: float | None = None,
    validate: Callable[[Any], Any] | None = None,
    resume: bool = False,
    shard: str | None = None,
    shards: int | str | None = None,
    keep_last: int | None = None,
) -> Config:
    if output_uri is not None and (not isinstance(output_uri, str) or not output_uri.strip()):
        raise ConfigError(
            f"output_uri must be a non-empty string or None, not {output_uri!r}",
            hint="e.g. 'artifacts/runs/{run_id}' or 's3://bucket/runs/{run_id}'",
        )
    if output_uri is not None:
        check_uri_form(output_uri)  # never a local directory named after a mistyped URL
    if isinstance(trees, str):
        raise ConfigError(
            f"trees must be a list of names, not the string {trees!r}",
            hint=f"write trees=[{trees!r}]",
        )
    names = tuple(tree_names(trees))
    if not names:
        raise ConfigError(
            "trees is empty: nothing would be exported",
            hint="name at least one tree, e.g. trees=['export']",
        )
    if conflict not in CONFLICT_POLICIES:
        raise ConfigError(f"conflict={conflict!r} is not one of {CONFLICT_POLICIES}")
    env_map = dict(env or {})
    for k, v in env_map.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise ConfigError(
                f"env entry {k!r}: {v!r} must map a name to a workspace path",
                hint="e.g. env={'TV_ARTIFACTS_DIR': 'artifacts'}",
            )
    registry = get_registry()
    if backend is None:
        be = (
            registry.default()
            if output_uri is None
            else registry.for_scheme(Target.parse(output_uri).scheme)
        )
    elif isinstance(backend, str):
        be = registry.by_name(backend)
    elif isinstance(backend, ExportBackend):
        be = backend
    else:
        raise ConfigError(f"backend={backend!r} is neither a backend name nor a backend object")
    if sync_every is not None:
        if isinstance(sync_every, bool) or not isinstance(sync_every, (int, float)):
            raise ConfigError(f"sync_every must be a number of seconds, not {sync_every!r}")
        if not sync_every > 0:
            raise ConfigError(
                f"sync_every={sync_every!r} must be a positive number of seconds",
                hint="e.g. sync_every=300 for a checkpoint every five minutes, or None",
            )
        if be.capabilities.by_value:
            raise ConfigError(
                f"sync_every needs a destination, but the {be.name!r} backend returns the "
                "files by value when the call ends",
                hint="give an output_uri (a path, s3://...) or drop sync_every",
            )
    if not isinstance(resume, bool):
        raise ConfigError(f"resume must be True or False, not {resume!r}")
    if resume:
        from raysync import resuming

        resuming.check(be)
    target = Target.parse(output_uri or "", storage_options)
    _check_shards(be, target, shard, shards, sync_every, resume, conflict)
    from raysync.lifecycle import check_keep_last

    check_keep_last(be, keep_last, target)
    template_fields(target.uri)  # malformed templates fail here
    check_template(target.uri)  # so do templates that can never name a run
    be.check(target)
    from raysync.hookspecs import KeepsCredentials

    held = be.worker_target(target) if isinstance(be, KeepsCredentials) else None
    return Config(
        target=held or target,
        driver_held=held is not None,
        driver_target=target if held is not None else None,
        trees=names,
        backend=be,
        env=env_map,
        export_on_failure=export_on_failure,
        conflict=cast(Conflict, conflict),
        chdir=chdir,
        keep_workspace=keep_workspace,
        checksum=checksum_mod.check(checksum),
        sync_every=float(sync_every) if sync_every is not None else None,
        validate=_callable(validate),
        resume=resume,
        shard=shard,
        shards=shards,
        keep_last=keep_last,
    )


def _callable(validate: Any) -> Callable[[Any], Any] | None:
    if validate is not None and not callable(validate):
        raise ConfigError(
            f"validate must be a function of the workspace, not {validate!r}",
            hint="e.g. validate=lambda ws: (ws.export_dir / 'model.pt').stat()",
        )
    return cast(Callable[[Any], Any] | None, validate)


def _check_shards(
    be: ExportBackend,
    target: Target,
    shard: str | None,
    shards: int | str | None,
    sync_every: float | None,
    resume: bool,
    conflict: str,
) -> None:
    from raysync import shards as shards_mod

    shards_mod.check_config(shard, shards)
    if shard is None:
        return
    if not be.capabilities.shards:
        raise ConfigError(
            f"the {be.name!r} backend cannot commit one run from many calls (shards)",
            hint="export shards to a path, s3://..., host:// or rsync:// to a mount",
        )
    check = getattr(be, "check_shards", None)
    if check is not None:
        check(target)
    for name, used in (("sync_every", sync_every is not None), ("resume", resume)):
        if used:
            raise ConfigError(
                f"{name} does not work with shards yet: a shard is committed once, when its "
                "call ends",
                hint=f"drop {name}, or give each call its own run",
            )
    if conflict != "error":
        raise ConfigError(
            "conflict='overwrite' does not work with shards: a sharded run is never replaced",
            hint="write each sharded run to a new output_uri",
        )

"""One run from many calls: shards committed all or nothing (``isolated_export(shard=...,
shards=N)``).

Every call exports its trees as one *shard* of the run at the rendered ``output_uri``. A shard
is staged where no reader looks (a hidden area next to or under the run) together with its own
manifest; the shard whose manifest completes the set (all ``N`` names present) merges them
into the run's one manifest, each file naming the shard that wrote it, and commits the run
with the backend's usual commit (a rename, a conditional write), so that two shards finishing
at once commit exactly one run. Until then no reader sees a run (``raysync ls`` shows it as
``incomplete`` with ``k/N`` shards).

- Two shards that write the same path: :class:`~raysync.errors.ShardClashError` naming both
  (checked when a shard is staged and again at the commit); nothing is committed.
- A shard's retry (an earlier attempt of the same call, :func:`raysync.rules.same_call`)
  replaces that shard only; another call exporting a shard name already taken is a conflict.
- A shard exported as ``failed`` (``export_on_failure``) makes the committed run ``failed``,
  with the shards named in ``run.error``.
- The shards of one run share a *set*: the Ray session, the job and the function
  (:func:`set_id`). A shard of another job never completes, or replaces, this job's run.

Backends with ``capabilities.shards`` implement the staging and call :func:`merge` and
:func:`check_clash`; the directory protocol is :func:`raysync.dirrun.export_shard`.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from raysync.backend import Shard
from raysync.errors import ConfigError, IntegrityError, ShardClashError, TemplateError
from raysync.manifest import FileEntry, Manifest
from raysync.rules import claim_record

__all__ = ["Shard", "check_clash", "merge", "set_id"]

#: What a shard name may be (letters, digits, ``._=+-``).
NAME = re.compile(r"[A-Za-z0-9._=+-]{1,128}")
#: What a shard area holds besides the shards: the directory or prefix name.
AREA = ".raysync-shards"


def set_id(run: Mapping[str, Any]) -> str:
    """What the shards of one run share: the Ray session, the job and the function."""
    key = "\0".join(str(run.get(k)) for k in ("session", "job_id", "function"))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def check_config(shard: str | None, shards: int | str | None) -> None:
    """At decoration: both or neither, a template for the name, a count or one field."""
    if shard is None and shards is None:
        return
    if shard is None or shards is None:
        raise ConfigError(
            "shard and shards go together: shard names this call's part, shards how many "
            "parts the run has",
            hint='e.g. shard="{rank}", shards=8 (or shards="{world_size}")',
        )
    if not isinstance(shard, str) or not shard:
        raise ConfigError(f"shard must be a template string such as '{{rank}}', not {shard!r}")
    _fields(shard)
    if isinstance(shards, bool) or not isinstance(shards, (int, str)):
        raise ConfigError(
            f"shards must be a number or a field such as '{{world_size}}': {shards!r}"
        )
    if isinstance(shards, int) and shards < 1:
        raise ConfigError(f"shards={shards} must be at least 1")
    if isinstance(shards, str) and len(_fields(shards)) != 1:
        raise ConfigError(f"shards={shards!r} must be a number or one field, '{{world_size}}'")


def _fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise TemplateError(f"malformed template: {e}", template=template) from None


def fields(shard: str | None, shards: int | str | None) -> list[str]:
    """The call fields the shard templates use (checked against the function's arguments)."""
    out = _fields(shard) if shard else []
    return out + (_fields(shards) if isinstance(shards, str) else [])


def render(
    shard: str, shards: int | str, values: Mapping[str, Any], run: Mapping[str, Any]
) -> Shard:
    """The call's :class:`Shard`: its name and the run's shard count, from the call's values."""
    try:
        name = shard.format_map(values)
        count_text = shards.format_map(values) if isinstance(shards, str) else str(shards)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        raise TemplateError(f"cannot render the shard: {e}", template=shard) from None
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise TemplateError(
            f"shard name {name!r} must be 1-128 letters, digits or ._=+- (not '.' or '..')",
            template=shard,
        )
    try:
        count = int(count_text)
    except ValueError:
        count = 0
    if count < 1 or str(count) != count_text.strip():
        raise TemplateError(
            f"shards rendered to {count_text!r}, not a positive number", template=str(shards)
        )
    return Shard(name, count, set_id(run))


def check_clash(
    name: str, paths: Iterable[str], others: Iterable[tuple[str, Iterable[str]]], uri: str
) -> None:
    """Refuse a shard whose paths another shard of the run also wrote."""
    mine = set(paths)
    for other, theirs in others:
        if other == name:
            continue
        both = mine.intersection(theirs)
        if both:
            path = sorted(both)[0]
            raise ShardClashError(
                f"shards {name!r} and {other!r} both wrote {path!r}"
                + (f" (and {len(both) - 1} more paths)" if len(both) > 1 else "")
                + "; the run is not committed",
                uri=uri,
                shards=(name, other),
                path=path,
            )


def merge(parts: Sequence[Manifest], run: Mapping[str, Any], shard: Shard, uri: str) -> Manifest:
    """The run's one manifest from its shards' manifests (one per shard name, all ``N``):
    every file with the shard that wrote it; ``failed`` when a shard failed."""
    by_name: dict[str, Manifest] = {}
    for m in parts:
        name = m.run.get("shard")
        if not isinstance(name, str) or m.run.get("shards") != shard.count:
            raise IntegrityError(
                f"a shard manifest names shard {name!r} of {m.run.get('shards')!r} shards; "
                f"this run has {shard.count}",
                uri=uri,
                bad=[str(name)],
            )
        if name in by_name:
            raise IntegrityError(f"two shard manifests name shard {name!r}", uri=uri, bad=[name])
        by_name[name] = m
    if len(by_name) != shard.count:
        raise IntegrityError(
            f"{len(by_name)} of {shard.count} shards are present", uri=uri, bad=sorted(by_name)
        )
    names = sorted(by_name)
    for i, name in enumerate(names):
        check_clash(
            name,
            (f.path for f in by_name[name].files),
            ((o, [f.path for f in by_name[o].files]) for o in names[i + 1 :]),
            uri,
        )
    algorithms = {m.checksum for m in by_name.values()}
    if len(algorithms) != 1:
        raise IntegrityError(
            f"shards use different checksums {sorted(algorithms)}", uri=uri, bad=names
        )
    files = [
        FileEntry(f.path, f.size, f.mode, f.digest, pack=f.pack, etag=f.etag, shard=name)
        for name in names
        for f in by_name[name].files
    ]
    files.sort(key=lambda f: f.path)
    failed = [n for n in names if by_name[n].status == "failed"]
    trees = sorted({t for m in by_name.values() for t in m.trees})
    record = {
        **run,
        "shard": None,
        "shards": shard.count,
        "shard_calls": {n: claim_record(by_name[n].run) for n in names},
        "status": "failed" if failed else "succeeded",
        "error": (
            "; ".join(f"shard {n} failed: {by_name[n].run.get('error')}" for n in failed)
            if failed
            else None
        ),
    }
    return Manifest(files=files, run=record, trees=trees, checksum=algorithms.pop())

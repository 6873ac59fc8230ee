"""The shard protocol (:mod:`raysync.shards`) for directory runs: local-copy, rsync to a mount
and host-sync's sink.

Next to the run ``dest`` lies a hidden *area* per shard set,
``.<name>.raysync-shards-<set id>/``, holding for each shard a directory of its files
(``<key>/``) and its manifest (``<key>.json``, written after the files are in place). A
backend stages a shard's files in :func:`stage_dir` (a private directory in the area) its
own way, then calls :func:`commit_shard`: the staged directory becomes the shard (replacing
an earlier attempt of the same call, never another call's shard), and when every shard's
manifest is there, the shard that takes the area's commit lock (``commit.lock``, an exclusive
create) hard-links every shard's files into one staging directory, writes the merged manifest
and renames it into place (:func:`raysync.dirrun.commit_dir`): the run appears whole, once.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from raysync import rules
from raysync.backend import Shard
from raysync.dirrun import check_conflict, commit_dir, read_committed, staging_dir
from raysync.errors import DestinationError, RaySyncError, RunExistsError
from raysync.fsops import makedirs, remove_tree
from raysync.manifest import MANIFEST_NAME, Manifest, safe_join
from raysync.shards import AREA, check_clash, merge

LOCK = "commit.lock"


def area_of(dest: Path, shard: Shard) -> Path:
    return dest.parent / f".{dest.name}{AREA}-{shard.set_id}"


def check_dest(dest: Path, run: dict[str, Any], uri: str) -> None:
    """Before a shard is staged: the run is not committed yet, and the destination holds no
    data that is not a raysync run (:func:`raysync.dirrun.check_conflict`)."""
    if read_committed(dest, uri=uri) is not None:
        raise RunExistsError(
            "this sharded run is already committed; a shard never replaces a committed run",
            uri=uri,
            hint="write the next sharded run to a new output_uri",
        )
    check_conflict(dest, run=run, conflict="error", uri=uri)


def stage_dir(dest: Path, shard: Shard) -> Path:
    """A private directory in the shard area to stage one shard's files in."""
    area = area_of(dest, shard)
    makedirs(area)
    staged = area / f".tmp-{shard.key}-{uuid.uuid4().hex[:8]}"
    staged.mkdir()
    return staged


def _read(path: Path, uri: str) -> Manifest | None:
    try:
        return Manifest.from_bytes(path.read_bytes(), uri=uri)
    except FileNotFoundError:
        return None


def _shards(area: Path, uri: str) -> dict[str, Manifest]:
    """The shard manifests in ``area``, by key."""
    out = {}
    for p in area.glob("*.json"):
        m = _read(p, uri)
        if m is not None:
            out[p.stem] = m
    return out


def commit_shard(staged: Path, dest: Path, manifest: Manifest, shard: Shard, uri: str) -> bool:
    """Make ``staged`` (complete, verified) the shard ``shard`` of the run at ``dest``, then
    commit the run when this shard completes the set. True when this call committed it."""
    area = staged.parent
    run = manifest.run
    mine_json, mine_dir = area / f"{shard.key}.json", area / shard.key
    try:
        earlier = _read(mine_json, uri)
        if earlier is not None:
            if not rules.same_call(earlier.run, run):
                raise RunExistsError(
                    f"shard {shard.name!r} of this run was exported by another call "
                    f"(task {earlier.run.get('task_id')})",
                    uri=uri,
                    hint="give every call its own shard name (e.g. shard='{rank}')",
                )
            mine_json.unlink()  # an earlier attempt of this call: its shard is replaced
        remove_tree(mine_dir)
        others = _shards(area, uri)
        check_clash(
            shard.name,
            (f.path for f in manifest.files),
            ((str(m.run.get("shard")), [f.path for f in m.files]) for m in others.values()),
            uri,
        )
        os.rename(staged, mine_dir)
    except BaseException:
        remove_tree(staged)
        raise
    draft = area / f".{shard.key}.json.{uuid.uuid4().hex[:8]}"
    draft.write_bytes(manifest.to_bytes())
    os.replace(draft, mine_json)  # the shard is in place, whole
    return _try_commit(area, dest, shard, run, uri)


def _try_commit(area: Path, dest: Path, shard: Shard, run: dict[str, Any], uri: str) -> bool:
    parts = _shards(area, uri)
    if len(parts) < shard.count:
        return False
    lock = area / LOCK
    body = json.dumps(rules.claim_record(run)).encode()
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        try:
            holder = json.loads(lock.read_bytes())
        except (OSError, ValueError):
            return False
        if not (isinstance(holder, dict) and rules.same_call(holder, run)):
            return False  # another shard is committing the run
        fd = os.open(lock, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)  # our dead attempt's
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    final = staging_dir(dest)
    try:
        merged = merge(list(parts.values()), run, shard, uri)
        keys = {str(m.run.get("shard")): k for k, m in parts.items()}
        for entry in merged.files:
            src = safe_join(area / keys[str(entry.shard)], entry.path)
            out = safe_join(final, entry.path)
            makedirs(out.parent)
            if src.stat().st_size != entry.size:
                raise DestinationError(f"shard file {entry.path!r} changed in the area", uri=uri)
            try:
                os.link(src, out)
            except OSError:  # no hard links here: a copy
                shutil.copyfile(src, out)
                os.chmod(out, entry.mode & 0o777)
        (final / MANIFEST_NAME).write_bytes(merged.to_bytes())
        decision = check_conflict(dest, run=merged.run, conflict="error", uri=uri)
        if decision.replace:
            raise RunExistsError("this sharded run is already committed", uri=uri)
        commit_dir(final, dest, decision, run=merged.run, conflict="error", uri=uri)
    except BaseException:
        remove_tree(final)
        lock.unlink(missing_ok=True)
        raise
    try:
        remove_tree(area)
    except (OSError, RaySyncError):
        pass  # committed; the area is a leftover for `raysync gc`
    return True


def incomplete(area: Path) -> tuple[str, str] | None:
    """For ``raysync ls``: (the run's directory name, ``"k/N"``) of a shard area."""
    name = area.name[1:].split(AREA + "-", 1)[0]
    parts = _shards(area, str(area))
    counts = {m.run.get("shards") for m in parts.values()}
    total = counts.pop() if len(counts) == 1 else "?"
    return name, f"{len(parts)}/{total}"

"""The shard protocol (:mod:`raysync.shards`) for directory runs: local-copy, rsync to a mount
and host-sync's sink.

Next to the run ``dest`` lies a hidden *area* per shard set,
``.<name>.raysync-shards-<set id>/``, holding for each shard a directory of its files
(``<key>/``) and its manifest (``<key>.json``, written after the files are in place). A
backend stages a shard's files in :func:`stage_dir` (a private directory in the area) its
own way, then calls :func:`commit_shard`. Under the area's lock (``.lock``, a ``flock``: a
holder that dies lets go), the staged directory becomes the shard (replacing an earlier
attempt of the same call, never another call's shard), and when every shard's manifest is
there, the same holder hard-links every shard's files into one staging directory, re-hashes
each against its shard's manifest, writes the merged manifest and renames it into place
(:func:`raysync.dirrun.commit_dir`): the run appears whole, once, and no shard changes while
it is committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raysync import rules
from raysync.backend import Shard
from raysync.copy import hash_entry
from raysync.dirgc import busy
from raysync.dirrun import check_conflict, commit_dir, read_committed, staging_dir
from raysync.errors import ConfigError, IntegrityError, RaySyncError, RunExistsError
from raysync.fsops import makedirs, remove_tree
from raysync.manifest import MANIFEST_NAME, FileEntry, Manifest, safe_join
from raysync.shards import AREA, NAME, check_clash, merge

LOCK = ".lock"  # flock'ed while a shard is swapped in and while the run is committed
_SET_ID = re.compile(r"[0-9a-f]{16}")


def area_of(dest: Path, shard: Shard) -> Path:
    """The shard area of ``shard``'s set next to ``dest`` (its id and name checked: a shard
    that came over the wire never names a path of its own)."""
    if not _SET_ID.fullmatch(shard.set_id) or not NAME.fullmatch(shard.name):
        raise ConfigError(f"not a valid shard: {shard.name!r} of set {shard.set_id!r}")
    if isinstance(shard.count, bool) or not isinstance(shard.count, int) or shard.count < 1:
        raise ConfigError(f"not a valid shard count: {shard.count!r}")
    return dest.parent / f".{dest.name}{AREA}-{shard.set_id}"


@contextlib.contextmanager
def _locked(area: Path) -> Iterator[None]:
    """Hold the area's exclusive lock (a ``flock``: a holder that dies lets go)."""
    fd = os.open(area / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _in_run(dest: Path, shard: Shard, run: dict[str, Any], uri: str) -> Manifest | None:
    """The committed run at ``dest`` when this very call's shard is in it (a retry after
    the commit: nothing to do); a committed run without it is a conflict."""
    committed = read_committed(dest, uri=uri)
    if committed is None:
        return None
    calls = committed.run.get("shard_calls")
    mine = calls.get(shard.name) if isinstance(calls, dict) else None
    if isinstance(mine, dict) and rules.same_call(mine, run):
        return committed
    raise RunExistsError(
        "this sharded run is already committed; a shard never replaces a committed run",
        uri=uri,
        hint="write the next sharded run to a new output_uri",
    )


def check_dest(dest: Path, run: dict[str, Any], uri: str, shard: Shard) -> bool:
    """Before a shard is staged: False when the run is committed with this call's shard in
    it already (a retry after the commit: nothing to export); a committed run without it,
    or data that is not a raysync run at the destination, is refused."""
    if _in_run(dest, shard, run, uri) is not None:
        return False
    check_conflict(dest, run=run, conflict="error", uri=uri)
    return True


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
    """The shard manifests in ``area``, by key (a damaged one is skipped: that shard is not
    there until its call writes it again)."""
    out = {}
    for p in area.glob("*.json"):
        if not re.fullmatch(r"[0-9a-f]{16}", p.stem):
            continue
        try:
            m = _read(p, uri)
        except IntegrityError:
            continue
        if m is not None:
            out[p.stem] = m
    return out


def commit_shard(staged: Path, dest: Path, manifest: Manifest, shard: Shard, uri: str) -> bool:
    """Make ``staged`` (complete, verified) the shard ``shard`` of the run at ``dest``, then
    commit the run when this shard completes the set. True when this call committed it.

    Under the area's lock: the shard is swapped in (replacing an earlier attempt of this
    call, never another call's shard, never while the run is being committed), and the
    committer reads, links, verifies and renames while no shard changes."""
    area = staged.parent
    run = manifest.run
    mine_json, mine_dir = area / f"{shard.key}.json", area / shard.key
    try:
        with _locked(area):
            if _in_run(dest, shard, run, uri) is not None:
                remove_tree(staged)
                return False  # committed meanwhile, with this call's shard
            earlier = _read(mine_json, uri)
            if earlier is not None and not rules.same_call(earlier.run, run):
                raise RunExistsError(
                    f"shard {shard.name!r} of this run was exported by another call "
                    f"(task {earlier.run.get('task_id')})",
                    uri=uri,
                    hint="give every call its own shard name (e.g. shard='{rank}')",
                )
            others = {k: m for k, m in _shards(area, uri).items() if k != shard.key}
            check_clash(
                shard.name,
                (f.path for f in manifest.files),
                ((str(m.run.get("shard")), [f.path for f in m.files]) for m in others.values()),
                uri,
            )
            mine_json.unlink(missing_ok=True)  # an earlier attempt of this call: replaced
            remove_tree(mine_dir)
            os.rename(staged, mine_dir)
            draft = area / f".{shard.key}.json.{uuid.uuid4().hex[:8]}"
            draft.write_bytes(manifest.to_bytes())
            os.replace(draft, mine_json)  # the shard is in place, whole
            return _try_commit(area, dest, shard, run, uri)
    except BaseException:
        remove_tree(staged)
        raise


def _try_commit(area: Path, dest: Path, shard: Shard, run: dict[str, Any], uri: str) -> bool:
    """With the area's lock held: commit the run when every shard is there."""
    parts = _shards(area, uri)
    if len(parts) < shard.count:
        return False
    final = staging_dir(dest)
    final.mkdir()
    try:
        with busy(final):  # gc never takes the run being assembled for a leftover
            _assemble(parts, area, final, dest, run, shard, uri)
    except BaseException:
        remove_tree(final)
        raise
    try:
        remove_tree(area)
    except (OSError, RaySyncError):
        pass  # committed; the area is a leftover for `raysync gc`
    return True


def _assemble(
    parts: dict[str, Manifest],
    area: Path,
    final: Path,
    dest: Path,
    run: dict[str, Any],
    shard: Shard,
    uri: str,
) -> None:
    """Link every shard's files into ``final``, verified, and rename it into place."""
    merged = merge(list(parts.values()), run, shard, uri)
    keys = {str(m.run.get("shard")): k for k, m in parts.items()}
    for entry in merged.files:
        src = safe_join(area / keys[str(entry.shard)], entry.path)
        out = safe_join(final, entry.path)
        makedirs(out.parent)
        try:
            os.link(src, out)
        except OSError:  # no hard links here: a copy
            shutil.copyfile(src, out)
            os.chmod(out, entry.mode & 0o777)
        probe = FileEntry(entry.path, entry.size, entry.mode, source=out)
        hash_entry(probe, merged.checksum)
        if probe.digest != entry.digest:  # every committed file matches (invariant 8)
            raise IntegrityError(
                "a shard's file does not match its shard manifest", uri=uri, bad=[entry.path]
            )
    (final / MANIFEST_NAME).write_bytes(merged.to_bytes())
    decision = check_conflict(dest, run=merged.run, conflict="error", uri=uri)
    if decision.replace:
        raise RunExistsError("this sharded run is already committed", uri=uri)
    commit_dir(final, dest, decision, run=merged.run, conflict="error", uri=uri)


def incomplete(area: Path) -> tuple[str, str] | None:
    """For ``raysync ls``: (the run's directory name, ``"k/N"``) of a shard area."""
    name = area.name[1:].split(AREA + "-", 1)[0]
    parts = _shards(area, str(area))
    counts = {m.run.get("shards") for m in parts.values()}
    total = counts.pop() if len(counts) == 1 else "?"
    return name, f"{len(parts)}/{total}"

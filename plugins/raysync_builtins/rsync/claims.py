"""rsync to a daemon or over ssh: claiming a run, deciding, clearing up (no rename there:
the manifest is the commit)."""

from __future__ import annotations

import json
import os
import random
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raysync import redaction, rules
from raysync.backend import ExportRequest
from raysync.copy import open_source
from raysync.fsops import temporary_dir
from raysync.manifest import MANIFEST_NAME, Manifest
from raysync_builtins.rsync.command import (
    _LISTED,
    CLAIM_NAME,
    Remote,
    Rsync,
    RsyncFailed,
)
from raysync_builtins.rsync.files import (
    _claim_owner,
    _Contended,
    _Hold,
    _parents,
    _rsync_internal,
    transfer,
    unchanged_since_scan,
)

log = redaction.logger("raysync.rsync")


class RemoteRuns:
    """The daemon and ssh half of :class:`raysync_builtins.rsync.RsyncBackend`."""

    def _export_remote(
        self, request: ExportRequest, rsync: Rsync, remote: Remote, uri: str
    ) -> None:
        """Daemon and ssh: prove the directory is ours to write (empty, a run this call may
        replace, or this call's own unfinished attempt), claim it, send the data (the old
        manifest goes first), then the manifest, then drop the claim.

        rsync has no exclusive create, so each call claims under a name of its own
        (``.raysync-claim-<random>``) and then looks again: when it sees another call's claim
        it withdraws (of two calls that claim at once, at least the later one sees the other,
        and neither writes a byte of data before its look)."""
        run = request.manifest.run
        with temporary_dir("raysync-rsync-meta-") as meta:
            (meta / "empty").mkdir()
            mine, stale = self._claim_remote(rsync, remote, uri, run, request.conflict, meta)
            sent = False
            try:
                # Every source readable and unchanged before the old run is touched: a tree
                # that fails here leaves the old run as it was.
                for entry in request.files:
                    os.close(open_source(entry))
                unchanged_since_scan(request.files)
                # Data first: --delete-before removes an old manifest (and a dead attempt's
                # files) before any data changes; --delay-updates puts the new files in place
                # together; claims are protected from the deletion.
                sent = True
                transfer(request, rsync, remote.url() + "/", daemon=True)
                unchanged_since_scan(request.files)
                (meta / MANIFEST_NAME).write_bytes(request.manifest.to_bytes())
                rsync.run_with_retries(
                    ["-a", f"{meta}/{MANIFEST_NAME}", remote.url(MANIFEST_NAME)], "manifest"
                )
            except BaseException:
                # Nothing was committed. Once data went out the old run is gone (its manifest
                # first): empty the directory, which the claim proved ours, so that a retry or
                # another call can take it; before that, only our claim goes.
                self._clear_remote(rsync, remote, meta / "empty", [mine], everything=sent)
                raise
            # The run is committed; drop our claim and those of this call's dead attempts.
            self._clear_remote(rsync, remote, meta / "empty", [mine, *stale], everything=False)

    def _claim_remote(
        self,
        rsync: Rsync,
        remote: Remote,
        uri: str,
        run: Mapping[str, Any],
        conflict: str,
        meta: Path,
    ) -> tuple[str, list[str]]:
        """Claim the run: look (nothing is written where the rules refuse), claim under a new
        name of this call's own, look again. Calls that claim at the same moment see each
        other and both withdraw; each tries again after a random wait, so one of them gets
        the run and the other then finds it claimed or committed. Returns the claim's name
        and the claims this call's dead attempts left."""
        rounds = 5
        body = json.dumps(rules.claim_record(run)).encode()
        mine: str | None = None
        for n in range(rounds):
            last = n == rounds - 1
            try:
                if mine is None:
                    self._decide_remote(rsync, remote, uri, run, conflict, mine=None, wait=not last)
                    mine = f"{CLAIM_NAME}-{secrets.token_hex(8)}"
                    (meta / mine).write_bytes(body)
                    self._send_claim(rsync, remote, meta, mine)
                try:
                    stale = self._decide_remote(
                        rsync, remote, uri, run, conflict, mine=mine, wait=not last
                    )
                    return mine, stale
                except _Hold:
                    time.sleep(random.uniform(0.05, 0.15))  # noqa: S311 - the other withdraws
                except BaseException:
                    self._clear_remote(rsync, remote, meta / "empty", [mine], everything=False)
                    mine = None
                    raise
            except _Contended:
                time.sleep(random.uniform(0.05, 0.2) * 2**n)  # noqa: S311 - jitter
        raise AssertionError("unreachable: the last round raises RunExistsError")

    @staticmethod
    def _send_claim(rsync: Rsync, remote: Remote, meta: Path, mine: str) -> None:
        for tries in range(3):
            try:
                rsync.run_with_retries(["-a", f"{meta}/{mine}", remote.url(mine)], "claim")
                return
            except RsyncFailed as e:
                # Two calls creating the run's new directory at once: rsync's --mkpath of
                # the loser fails with EEXIST; the directory is there now.
                if "File exists" not in e.stderr or tries == 2:
                    raise

    def _decide_remote(
        self,
        rsync: Rsync,
        remote: Remote,
        uri: str,
        run: Mapping[str, Any],
        conflict: str,
        *,
        mine: str | None,
        wait: bool = False,
    ) -> list[str]:
        """Look at the remote run and apply the conflict decision (before claiming, and again
        holding the claim ``mine``); return the claims this call's dead attempts left. With
        ``wait``, another call's claim raises :class:`_Contended` (try again) instead of
        :class:`RunExistsError`."""
        # Holding the claim: no run above, committed or being written.
        inside = self._enclosing_run(rsync, remote) if mine is not None else None
        names = self._list_remote(rsync, remote, recursive=mine is not None)
        top = [n for n in names if "/" not in n]
        claims = [n for n in top if n.startswith(CLAIM_NAME) and n != mine]
        stale: list[str] = []
        for name in claims:
            owner = _claim_owner(self._read_remote_claim(rsync, remote, name, uri))
            if owner is None:
                continue  # gone since the listing (rsync's temporary name of a claim)
            if rules.same_call(owner, run):
                stale.append(name)  # an attempt of this call that died: ours
                continue
            if wait:
                # Two claims at once: the smaller name keeps its claim and looks again, the
                # other withdraws and waits (either way, a call goes on only after a look
                # that shows no other claim).
                raise _Hold if mine is not None and mine < name else _Contended
            rules.decide(
                existing=None,
                occupied=True,
                run=run,
                conflict=conflict,
                uri=uri,
                leftover_owner=owner,
            )
        existing = None
        if MANIFEST_NAME in top:
            data = self._read_remote_json(rsync, remote, MANIFEST_NAME, uri)
            existing = Manifest.from_bytes(data, uri=uri)
        ours = {mine, *stale, *claims, MANIFEST_NAME}
        unlisted: list[str] = []
        if existing is not None and mine is not None:
            listed = {f.path for f in existing.files}
            dirs = {d for f in existing.files for d in _parents(f.path)}
            unlisted = [
                n
                for n in names
                if n not in ours and n not in listed and n not in dirs and not _rsync_internal(n)
            ]
        nested = [
            n
            for n in names
            if "/" in n
            and not _rsync_internal(n)
            and (n.endswith("/" + MANIFEST_NAME) or n.rsplit("/", 1)[-1].startswith(CLAIM_NAME))
        ]
        rules.decide(
            existing=existing,
            inside=inside,
            nested=nested,
            occupied=any(n not in ours for n in top) and not stale,
            run=run,
            conflict=conflict,
            uri=uri,
            leftover_owner=None,
            unlisted=unlisted,
        )
        return stale

    @staticmethod
    def _enclosing_run(rsync: Rsync, remote: Remote) -> str | None:
        """A run (committed, or claimed by a call writing it) in a directory above the run
        (up to the daemon module, or the remote root's first directory), the nearest one.

        One filtered recursive listing from the top directory walks only the chain of
        directories down to the run's parent and shows only their manifests and claims (the
        path holds no wildcard characters: :meth:`Remote.parse` refuses them)."""
        parts = remote.path.strip("/").split("/")
        if len(parts) < 2:
            return None
        lead = "" if remote.mode == "daemon" else "/"
        top = Remote(remote.mode, lead + parts[0], remote.host, remote.port, remote.user)
        chain = ["/".join(parts[1:n]) for n in range(1, len(parts))]  # "" is the top itself
        filters: list[str] = []
        for d in chain:
            at = f"/{d}/" if d else "/"
            filters += [f"--filter=+ {at}{MANIFEST_NAME}", f"--filter=+ {at}{CLAIM_NAME}-*"]
            if d:
                filters.append(f"--filter=+ /{d}/")
        filters.append("--filter=- *")
        try:
            out = rsync.run(["--list-only", "-r", *filters, "--", top.url() + "/"], "look above")
        except RsyncFailed as e:
            if e.code != 23:  # 23: the top directory is not there (a new tree)
                raise
            out = e.stdout
        runs = []
        for m in map(_LISTED.match, out.splitlines()):
            if m is None:
                continue
            name = m.group(1)
            folder, _, base = name.rpartition("/")
            if base == MANIFEST_NAME or base.startswith(CLAIM_NAME):
                runs.append(folder)
        if not runs:
            return None
        nearest = max(runs, key=len)
        return top.url(nearest) if nearest else top.url()

    @staticmethod
    def _read_remote_claim(rsync: Rsync, remote: Remote, name: str, uri: str) -> bytes | None:
        try:
            with temporary_dir("raysync-read-") as tmp:
                rsync.run(["--", remote.url(name), f"{tmp}/"], f"read {name}")
                return (tmp / name).read_bytes()
        except (RsyncFailed, FileNotFoundError):
            return None

    @staticmethod
    def _clear_remote(
        rsync: Rsync, remote: Remote, empty: Path, claims: list[str], *, everything: bool
    ) -> None:
        """Delete ``claims`` (and with ``everything``, all the run directory holds but other
        calls' claims) on the remote side: an rsync of an empty directory with ``--delete``,
        filtered."""
        if everything:  # the first matching rule wins: ours are at risk, others' protected
            chosen = [*(f"--filter=R /{c}" for c in claims), f"--filter=P /{CLAIM_NAME}-*"]
        else:
            chosen = [*(f"--filter=+ /{c}" for c in claims), "--filter=- *"]
        try:
            rsync.run_with_retries(
                ["-r", "--delete", *chosen, f"{empty}/", remote.url() + "/"], "clean up"
            )
        except RsyncFailed as e:
            log.warning("raysync: could not clean up %s after the export: %s", remote.url(), e)

    def _list_remote(self, rsync: Rsync, remote: Remote, *, recursive: bool = False) -> list[str]:
        """The names in the remote run directory (``[]``: missing or empty), with
        ``recursive`` every path below it; a file at the run's path lists as itself, so it
        counts as occupied."""
        try:
            more = ["-r"] if recursive else []
            out = rsync.run(["--list-only", *more, "--", remote.url() + "/"], "list")
        except RsyncFailed as e:
            if e.code == 23 and ("No such file" in e.stderr or "change_dir" in e.stderr):
                return []
            raise
        names = []
        for line in out.splitlines():
            m = _LISTED.match(line)  # other lines are --stats and progress output
            if m and m.group(1) != ".":
                names.append(m.group(1))
        return names

    @staticmethod
    def _read_remote_json(rsync: Rsync, remote: Remote, name: str, uri: str) -> bytes:
        with temporary_dir("raysync-read-") as tmp:
            rsync.run_with_retries(["--", remote.url(name), f"{tmp}/"], f"read {name}")
            return (tmp / name).read_bytes()

"""The life of runs after they are written: remove one (``raysync rm``), apply a retention
policy and clean up after dead exports (``raysync gc``, ``isolated_export(keep_last=N)``), and
compare two runs (``raysync diff``). The backends do the deleting through the optional hooks
:class:`~raysync.hookspecs.DeletesRuns` and :class:`~raysync.hookspecs.CleansLeftovers`;
this module decides *what* goes, and never a run or an export still in progress:

- a committed run is removed only by the policy the user gave (``keep_last``, ``older_than``),
  only when its status is ``succeeded`` (``failed`` runs only when asked), never a checkpoint
  (a call may still be running) and never an ``incomplete`` or ``damaged`` run;
- a leftover is listed by its backend only when the export that made it is gone (a busy mark
  on a staging directory, a lock's heartbeat), and removed only when older than the grace
  period (``incomplete_older_than``).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from raysync.backend import Leftover, RunInfo
from raysync.errors import ConfigError
from raysync.hookspecs import CleansLeftovers, DeletesRuns, ListsRuns
from raysync.manifest import Manifest
from raysync.redaction import logger
from raysync.target import Target, split_scheme, static_prefix

log = logger("raysync")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``"0"``, ``"30s"``, ``"15m"``, ``"12h"``, ``"7d"``, ``"2w"`` (or combined, ``"1h30m"``)
    as seconds."""
    t = text.strip().lower()
    if t in ("0", "0s"):
        return 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise ConfigError(
            f"{text!r} is not a duration", hint="write e.g. 30s, 15m, 12h, 7d or 2w (or 1h30m)"
        )
    return sum(float(n) * _UNITS[u] for n, u in parts)


def age_of(run: RunInfo) -> float | None:
    """Seconds since the run ended, from its manifest's ``ended_at``."""
    if not run.ended_at:
        return None
    try:
        then = datetime.fromisoformat(run.ended_at)
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - then).total_seconds()


@dataclass
class Plan:
    """What ``gc`` removes (or would, with ``--dry-run``) and what it keeps."""

    runs: list[RunInfo] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    kept: list[RunInfo] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(r.bytes or 0 for r in self.runs) + sum(x.bytes for x in self.leftovers)


def need(backend: Any, hook: type, what: str) -> None:
    if not isinstance(backend, hook):
        raise ConfigError(
            f"the {backend.name!r} backend cannot {what}",
            hint="docs/cli.md lists which backends support it",
        )


def choose_runs(
    runs: Sequence[RunInfo],
    *,
    keep_last: int | None,
    older_than: float | None,
    include_failed: bool = False,
    function: str | None = None,
) -> tuple[list[RunInfo], list[RunInfo]]:
    """(runs to remove, runs kept) under the policy. Only ``committed`` runs (and ``failed``
    ones with ``include_failed``), of ``function`` when given, are candidates; newest first by
    ``ended_at``. With both ``keep_last`` and ``older_than``, a run goes only when it is
    outside the newest ``keep_last`` *and* older than ``older_than``."""
    statuses = {"committed", "failed"} if include_failed else {"committed"}
    candidates = [
        r for r in runs if r.status in statuses and (function is None or r.function == function)
    ]
    if keep_last is None and older_than is None:
        return [], list(runs)
    candidates.sort(key=lambda r: r.ended_at or "", reverse=True)
    remove = []
    for i, r in enumerate(candidates):
        beyond = keep_last is None or i >= keep_last
        age = age_of(r)
        old = older_than is None or (age is not None and age >= older_than)
        if beyond and old:
            remove.append(r)
    gone = {r.uri for r in remove}
    return remove, [r for r in runs if r.uri not in gone]


def plan_gc(
    backend: Any,
    target: Target,
    *,
    keep_last: int | None = None,
    older_than: float | None = None,
    incomplete_older_than: float | None = None,
    include_failed: bool = False,
) -> Plan:
    if keep_last is not None and keep_last < 0:
        raise ConfigError(f"--keep-last {keep_last} must be 0 or more")
    plan = Plan()
    if keep_last is not None or older_than is not None:
        need(backend, ListsRuns, "list runs")
        need(backend, DeletesRuns, "delete runs")
        runs = backend.list_runs(target)
        plan.runs, plan.kept = choose_runs(
            runs, keep_last=keep_last, older_than=older_than, include_failed=include_failed
        )
    if incomplete_older_than is not None:
        need(backend, CleansLeftovers, "list what dead exports left")
        plan.leftovers = [
            x for x in backend.list_leftovers(target) if x.age >= incomplete_older_than
        ]
    return plan


def run_target(target: Target, uri: str) -> Target:
    """The target of one run found under ``target`` (same options and base)."""
    return Target(uri, target.scheme, target.options, target.base_dir)


@dataclass(frozen=True)
class Change:
    """One line of ``raysync diff``: ``=`` same, ``+`` only in B, ``-`` only in A, ``*``
    changed (size or digest)."""

    mark: str
    path: str
    size_a: int | None
    size_b: int | None


def diff(a: Manifest, b: Manifest) -> list[Change]:
    """Compare two runs' manifests path by path: size, mode and digest (``?`` for a file of
    the same size when the runs use different checksums: its bytes were not compared)."""
    fa = {f.path: f for f in a.files}
    fb = {f.path: f for f in b.files}
    same_algo = a.checksum == b.checksum
    out = []
    for path in sorted(fa.keys() | fb.keys()):
        x, y = fa.get(path), fb.get(path)
        if x is None:
            out.append(Change("+", path, None, y.size if y else None))
        elif y is None:
            out.append(Change("-", path, x.size, None))
        elif x.size != y.size or x.mode != y.mode or (same_algo and x.digest != y.digest):
            out.append(Change("*", path, x.size, y.size))
        elif not same_algo:
            out.append(Change("?", path, x.size, y.size))
        else:
            out.append(Change("=", path, x.size, y.size))
    return out


def root_target(target: Target) -> Target:
    """The target of a template's static root (where ``keep_last`` looks for runs)."""
    uri = f"{target.scheme}://{target.root}" if "://" in target.uri else target.root
    return Target(uri, target.scheme, target.options, target.base_dir)


def _runs_of_template(template: Target, own_uri: str, runs: Sequence[RunInfo]) -> list[RunInfo]:
    """The runs the template can name: at its depth below its static root, matching its
    literal parts (``exp/{name}/out`` never counts ``exp/best/keep/out`` or ``exp/x``)."""
    path = split_scheme(template.uri)[1]
    root = static_prefix(path)
    suffix = path[len(root) :].lstrip("/")
    pattern = re.compile(
        "".join(
            re.escape(lit) + ("[^/]+" if name is not None else "")
            for lit, name, _, _ in string.Formatter().parse(suffix)
        )
    )
    own = split_scheme(own_uri)[1].rstrip("/")
    depth = suffix.count("/") + 1
    base = "/".join(own.split("/")[:-depth])
    out = []
    for r in runs:
        p = split_scheme(r.uri)[1].rstrip("/")
        if p != own and p.startswith(base + "/") and pattern.fullmatch(p[len(base) + 1 :]):
            out.append(r)
    return out


def prune(backend: Any, template: Target, own_uri: str, function: str, keep_last: int) -> list[str]:
    """``isolated_export(keep_last=N)``: after a commit, keep this call's run and the N-1
    newest other ``succeeded`` runs of ``function`` that the template names; remove the
    rest; the URIs removed. A failure is logged, never raised: the call's run is committed."""
    removed: list[str] = []
    try:
        root = root_target(template)
        others = _runs_of_template(template, own_uri, backend.list_runs(root))
        runs, _ = choose_runs(others, keep_last=keep_last - 1, older_than=None, function=function)
        for run in runs:
            try:
                backend.delete_run(run_target(root, run.uri))
                removed.append(run.uri)
            except Exception as e:  # noqa: BLE001 - another call may prune it at once
                log.warning("raysync: keep_last could not remove %s: %s", run.uri, e)
    except Exception as e:  # noqa: BLE001 - retention never fails a committed call
        log.warning("raysync: keep_last=%d could not list the runs: %s", keep_last, e)
    return removed


def check_keep_last(backend: Any, keep_last: Any, target: Target | None = None) -> None:
    """At decoration: a positive number, and a backend that lists and deletes runs from a
    worker."""
    if keep_last is None:
        return
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ConfigError(f"keep_last must be a positive number of runs, not {keep_last!r}")
    need(backend, ListsRuns, "list runs, which keep_last needs")
    need(backend, DeletesRuns, "delete runs, which keep_last needs")
    check = getattr(backend, "check_keep_last", None)
    if check is not None and target is not None:
        check(target)
    if getattr(backend, "prunes_in_worker", True) is False:
        raise ConfigError(
            f"the {backend.name!r} backend cannot remove old runs from a worker",
            hint="run `raysync gc PREFIX --keep-last N` on the driver's machine instead",
        )

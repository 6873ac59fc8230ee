"""``raysync rm``, ``raysync gc`` and ``raysync diff`` (:mod:`raysync.lifecycle`), registered
on the ``raysync`` command group. Exit codes as every command's (docs/cli.md); ``diff`` exits
1 when the runs differ."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import click

from raysync.cli import _JSON, _STORAGE, _call, _reader, _target, command, printable
from raysync.errors import ConfigError, DestinationError
from raysync.hookspecs import CleansLeftovers, DeletesRuns
from raysync.lifecycle import diff, need, parse_duration, plan_gc, run_target
from raysync.target import redact


def _rm(args: argparse.Namespace) -> int:
    backend, target = _target(args.uri, args.storage_options)
    need(backend, DeletesRuns, "delete runs")
    reader = _reader(args.uri, args.storage_options, "read")
    try:
        manifest = reader.manifest()
    finally:
        reader.close()
    if manifest is None:
        raise DestinationError(
            "there is no committed run here", uri=redact(args.uri), hint="raysync ls lists runs"
        )
    freed = manifest.total_bytes if args.dry_run else backend.delete_run(target)
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        out = {"ok": True, "dry_run": args.dry_run, "removed": redact(args.uri), "bytes": freed}
        print(json.dumps(out, indent=1))
    else:
        print(f"{verb} {printable(redact(args.uri))}: {len(manifest.files)} files, {freed:,} bytes")
    return 0


def _gc(args: argparse.Namespace) -> int:
    backend, target = _target(args.prefix, args.storage_options)
    if not target.path.strip("/").strip("."):
        raise ConfigError(
            f"gc needs a directory or prefix of runs, not {args.prefix!r}",
            hint="give the directory that holds the runs, e.g. artifacts/runs",
        )
    if args.keep_last is None and args.older_than is None and args.incomplete_older_than is None:
        raise ConfigError(
            "gc needs a policy: nothing to remove",
            hint="give --keep-last N, --older-than DURATION and/or --incomplete-older-than "
            "DURATION (add --dry-run to see what would go)",
        )
    plan = plan_gc(
        backend,
        target,
        keep_last=args.keep_last,
        older_than=parse_duration(args.older_than) if args.older_than else None,
        incomplete_older_than=(
            parse_duration(args.incomplete_older_than) if args.incomplete_older_than else None
        ),
        include_failed=args.include_failed,
    )
    errors = []
    if not args.dry_run:
        for run in plan.runs:
            try:
                backend.delete_run(run_target(target, run.uri))
            except Exception as e:  # noqa: BLE001 - the others are still removed; reported
                errors.append(f"{run.uri}: {e}")
        for left in plan.leftovers:
            assert isinstance(backend, CleansLeftovers)
            try:
                backend.delete_leftover(target, left)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{left.uri} ({left.kind}): {e}")
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        out = {
            "ok": not errors,
            "dry_run": args.dry_run,
            "runs": [r.uri for r in plan.runs],
            "leftovers": [{"uri": x.uri, "kind": x.kind, "bytes": x.bytes} for x in plan.leftovers],
            "kept": [r.uri for r in plan.kept],
            "bytes": plan.bytes,
            "errors": [redact(e) for e in errors],
        }
        print(json.dumps(out, indent=1))
    else:
        for r in plan.runs:
            print(f"{verb} run       {printable(r.uri)} ({(r.bytes or 0):,} bytes)")
        for x in plan.leftovers:
            print(f"{verb} leftover  {printable(x.uri)}: {x.kind} ({x.bytes:,} bytes)")
        for problem in errors:
            print(f"raysync: could not remove {printable(redact(problem))}", file=sys.stderr)
        n = len(plan.runs) + len(plan.leftovers)
        print(f"{verb} {n} item(s), {plan.bytes:,} bytes; kept {len(plan.kept)} run(s)")
    return 3 if errors else 0


def _diff(args: argparse.Namespace) -> int:
    manifests = []
    for uri in (args.a, args.b):
        reader = _reader(uri, args.storage_options, "read")
        try:
            m = reader.manifest()
        finally:
            reader.close()
        if m is None:
            raise DestinationError("there is no committed run here", uri=redact(uri))
        manifests.append(m)
    changes = diff(manifests[0], manifests[1])
    counts = {mark: sum(c.mark == mark for c in changes) for mark in "=+-*?"}
    differ = any(counts[m] for m in "+-*?")
    if args.json:
        out = {
            "identical": not differ,
            "counts": {
                "same": counts["="],
                "added": counts["+"],
                "removed": counts["-"],
                "changed": counts["*"],
            },
            "changes": [c.__dict__ for c in changes if c.mark != "=" or args.all],
        }
        print(json.dumps(out, indent=1))
    else:
        for c in changes:
            if c.mark != "=" or args.all:
                print(f"{c.mark} {printable(c.path)}")
        print(
            f"{counts['=']} same, {counts['+']} only in B, {counts['-']} only in A, "
            f"{counts['*']} changed"
            + (
                f", {counts['?']} not compared (the runs use different checksums)"
                if counts["?"]
                else ""
            )
        )
    return 1 if differ else 0


@command.command("rm", help="remove one committed run (its manifest first: it vanishes whole)")
@click.argument("uri")
@_STORAGE
@click.option("--dry-run", is_flag=True, help="say what would be removed, remove nothing")
@_JSON
@click.pass_context
def _rm_cmd(ctx: click.Context, /, **values: Any) -> int:
    return _call(ctx, _rm, json=values.pop("as_json"), **values)


@command.command(
    "gc",
    help="remove committed runs beyond a retention policy and what dead exports left "
    "(staging directories, locks, unlisted objects, incomplete multipart uploads); never a "
    "run or an export in progress. Prints what goes and the bytes freed.",
)
@click.argument("prefix")
@_STORAGE
@click.option("--keep-last", type=int, help="keep the N newest committed runs")
@click.option("--older-than", metavar="DURATION", help="remove committed runs older than this")
@click.option(
    "--incomplete-older-than",
    metavar="DURATION",
    help="remove leftovers of dead exports older than this (0s: all that are dead)",
)
@click.option("--include-failed", is_flag=True, help="failed runs count as committed ones")
@click.option("--dry-run", is_flag=True, help="say what would be removed, remove nothing")
@_JSON
@click.pass_context
def _gc_cmd(ctx: click.Context, /, **values: Any) -> int:
    return _call(ctx, _gc, json=values.pop("as_json"), **values)


@command.command(
    "diff",
    help="compare two runs' manifests: = same, + only in B, - only in A, "
    "* changed; exit 0 when identical, 1 when they differ",
)
@click.argument("a")
@click.argument("b")
@_STORAGE
@click.option("--all", "all", is_flag=True, help="also list the files that are the same")
@_JSON
@click.pass_context
def _diff_cmd(ctx: click.Context, /, **values: Any) -> int:
    return _call(ctx, _diff, json=values.pop("as_json"), **values)

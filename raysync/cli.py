"""The ``raysync`` command (also ``python -m raysync``): backends, ls, verify, pull, doctor,
bench, demo. docs/cli.md describes each.

Exit codes (docs/cli.md): 0 success; 1 a check failed (``verify`` found bad files, no
committed run, a damaged manifest, ``doctor`` found a failing node); 2 usage or configuration
error (bad options or URI, a missing package); 3 the destination cannot be reached, does not
exist or refuses access; 4 an unexpected error (a bug: ``-v`` shows the traceback). No
command prints a traceback otherwise; with ``--json`` an error is a JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from raysync import checksum
from raysync.backend import RunReader
from raysync.errors import (
    ConfigError,
    DestinationError,
    IntegrityError,
    MaterializeError,
    RaySyncError,
)
from raysync.fsops import write_replacing
from raysync.hookspecs import ListsRuns, OpensRuns
from raysync.manifest import MANIFEST_NAME, FileEntry, same_document
from raysync.registry import get_registry, scheme_label
from raysync.result import place_run
from raysync.target import Target, check_uri_form, redact


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``): a name on disk can hold a newline,
    which would otherwise forge rows in a listing."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _backends(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = [
        {
            "name": i.backend.name,
            "schemes": list(i.backend.schemes),
            "schemes_label": scheme_label(i.backend),
            "default": bool(i.backend.default),
            "source": i.source,
            "version": i.version,
            "capabilities": i.backend.capabilities.names(),
        }
        for i in get_registry().backends()
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        schemes = r["schemes_label"] + (" (default)" if r["default"] else "")
        print(f"{r['name']:<8} {r['source']} {r['version']:<8} {schemes}")
        print(f"{'':<8} capabilities: {', '.join(r['capabilities']) or 'none'}")
    return 0


def storage_options_arg(text: str) -> dict[str, Any]:
    """``--storage-options`` (every command that takes it): a JSON object, or a usage error."""
    try:
        options = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": true}'")
    return options


def _target(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, Target]:
    """The backend serving ``uri`` and the target to read, with ``--storage-options``."""
    check_uri_form(uri)  # s3:/x is a mistyped URI, not a local path
    parsed = Target.parse(uri, storage_options or {})
    backend = get_registry().for_scheme(parsed.scheme)
    backend.check(parsed)
    # Relative paths are relative to where the command runs.
    return backend, Target(parsed.uri, parsed.scheme, parsed.options, os.getcwd())


def _reader(uri: str, storage_options: dict[str, Any] | None, what: str) -> RunReader:
    backend, target = _target(uri, storage_options)
    if not isinstance(backend, OpensRuns):
        raise ConfigError(
            f"backend {backend.name!r} cannot {what} runs by URI",
            hint="materialize the ExportResult in Python, then verify the local directory",
        )
    return backend.open_run(target)


def _ls(args: argparse.Namespace) -> int:
    backend, target = _target(args.uri, args.storage_options)
    if not isinstance(backend, ListsRuns):
        raise ConfigError(f"backend {backend.name!r} cannot list runs")
    if target.scheme == "file" and not Path(target.local_path()).exists():
        raise DestinationError(
            "no such directory", uri=redact(args.uri), hint="check the path (it is local)"
        )
    runs = backend.list_runs(target)
    if args.json:
        print(json.dumps([r.__dict__ for r in runs], indent=1))
        return 0
    if not runs:
        print(f"no runs under {redact(args.uri)}")
        return 0
    print(f"{'status':<11} {'files':>7} {'bytes':>14} {'ended':<29} uri")
    for r in runs:
        files = "-" if r.files is None else str(r.files)
        size = "-" if r.bytes is None else f"{r.bytes:,}"
        ended = printable(r.ended_at or "-")
        reason = f"  ({printable(r.reason)})" if r.reason else ""
        if r.shards:
            reason += f"  ({printable(r.shards)} shards)"
        print(f"{r.status:<11} {files:>7} {size:>14} {ended:<29} {printable(r.uri)}{reason}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    reader = _reader(args.uri, args.storage_options, "verify")
    shown = redact(args.uri)
    manifest = reader.manifest()
    if manifest is None:
        return _report(args, {"uri": shown, "ok": False, "error": "no committed run"}, 1)
    bad: list[str] = []
    reader.prefetch(manifest.files)
    try:
        for f in manifest.files:
            h = checksum.new(manifest.checksum)
            size = 0
            try:
                for chunk in reader.read(f):
                    h.update(chunk)
                    size += len(chunk)
            except (OSError, RaySyncError):
                bad.append(f.path)
                continue
            if size != f.size or h.hexdigest() != f.digest:
                bad.append(f.path)
    finally:
        reader.close()
    out = {
        "uri": shown,
        "ok": not bad,
        "files": len(manifest.files),
        "bytes": manifest.total_bytes,
        "bad": bad,
    }
    if args.json:
        return _report(args, out, 1 if bad else 0)
    if bad:
        print(f"FAILED {shown}: {len(bad)} bad file(s)")
        for b in bad:
            print(f"  {b}")
        return 1
    print(f"OK {shown}: {len(manifest.files)} files, {manifest.total_bytes} bytes verified")
    return 0


def _report(args: argparse.Namespace, out: dict[str, Any], code: int) -> int:
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"raysync: {out.get('error')} at {out['uri']}", file=sys.stderr)
    return code


class _Progress:
    """A progress bar on stderr, redrawn in place, with rate and ETA: only on a terminal and
    never in JSON mode (nothing in logs or pipes)."""

    def __init__(self, total: int, label: str, *, quiet: bool = False) -> None:
        self.total, self.label, self.done = max(total, 1), label, 0
        self.shown = sys.stderr.isatty() and not quiet
        self.last = 0.0
        self.t0 = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.shown and now - self.last > 0.2:
            self.last = now
            self._draw(end="\r")

    def _draw(self, end: str) -> None:
        pct = 100 * self.done / self.total
        width = 30
        bar = "#" * int(width * self.done / self.total)
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        eta = f"ETA {int(left // 60)}:{int(left % 60):02d}" if self.done < self.total else ""
        print(
            f"{self.label} [{bar:<{width}}] {pct:5.1f}% {self.done / 1e6:.1f} MB "
            f"{rate / 1e6:.1f} MB/s {eta}\033[K",
            end=end,
            file=sys.stderr,
            flush=True,
        )

    def finish(self) -> None:
        if self.shown:
            self._draw(end="\n")


def _pull(args: argparse.Namespace) -> int:
    reader = _reader(args.uri, args.storage_options, "pull")
    shown = redact(args.uri)
    manifest = reader.manifest()
    if manifest is None:
        return _report(args, {"uri": shown, "ok": False, "error": "no committed run"}, 1)
    progress = _Progress(manifest.total_bytes, "pulling", quiet=args.json)

    def read(entry: FileEntry) -> Iterator[bytes]:
        for chunk in reader.read(entry):
            progress.add(len(chunk))
            yield chunk

    dest = Path(args.dest).absolute()
    written = dest / MANIFEST_NAME
    ok = args.overwrite or not written.exists() or same_document(written.read_bytes(), manifest)
    if not ok:
        raise MaterializeError(
            f"{written} holds another run's manifest; nothing was written",
            hint="pull into an empty directory, or pass --overwrite",
        )
    reader.prefetch(manifest.files)
    try:
        place_run(dest, manifest, read, uri=shown, overwrite=args.overwrite)
        # The manifest too, last: `raysync verify DEST` checks what was pulled.
        write_replacing(written, manifest.to_bytes())
    except MaterializeError as e:
        raise MaterializeError(
            e.message, hint="pull into an empty directory, or pass --overwrite"
        ) from None
    except IntegrityError as e:
        progress.finish()
        out = {"uri": shown, "ok": False, "error": "files do not match the manifest"}
        out["bad"] = e.bad
        if not args.json:
            print(f"FAILED {shown}: {len(e.bad)} bad file(s), nothing written to {dest}")
            for b in e.bad:
                print(f"  {b}")
            return 1
        return _report(args, out, 1)
    finally:
        reader.close()
    progress.finish()
    out = {
        "uri": shown,
        "ok": True,
        "dest": str(dest),
        "files": len(manifest.files),
        "bytes": manifest.total_bytes,
    }
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"OK {shown} -> {dest}: {len(manifest.files)} files, {manifest.total_bytes} bytes")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from raysync.doctor import main as doctor_main

    return doctor_main(
        args.uri,
        address=args.address,
        storage_options=args.storage_options,
        backend=args.backend,
        working_dir=args.working_dir,
        node_ip_address=args.node_ip_address,
        timeout=args.timeout,
        as_json=args.json,
    )


def _demo(args: argparse.Namespace) -> int:
    from raysync.demo import main as demo_main

    return demo_main(args.rest)


def _bench(args: argparse.Namespace) -> int:
    from raysync.bench import main as bench_main

    return bench_main(args.rest)


def _storage_options(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        return storage_options_arg(value)
    except argparse.ArgumentTypeError as e:
        raise click.BadParameter(str(e)) from None


_JSON = click.option("--json", "as_json", is_flag=True, help="machine-readable output (errors too)")
_STORAGE = click.option(
    "--storage-options",
    metavar="JSON",
    callback=_storage_options,
    help="storage_options as a JSON object (prefer credentials from the environment)",
)
_PASS_ON = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


def _call(ctx: click.Context, fn: Any, **values: Any) -> int:
    """Run one command's implementation; every error becomes its exit code and a message."""
    args = argparse.Namespace(verbose=ctx.obj.get("verbose", False), **values)
    try:
        return int(fn(args))
    except KeyboardInterrupt:
        print("raysync: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error is reported, none as a traceback
        return _fail(args, e)


@click.group(
    help="raysync: list, verify and pull runs by URI, check a cluster (doctor), measure "
    "(bench), run the demo. Exit codes: 0 ok, 1 a check failed, 2 usage or configuration, "
    "3 the destination cannot be reached or does not exist, 4 a bug (-v shows the "
    "traceback). docs/cli.md describes each command.",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="raysync", message="raysync %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="log raysync's steps (and tracebacks)")
@click.pass_context
def command(ctx: click.Context, verbose: bool) -> None:
    ctx.obj = {"verbose": verbose}
    if verbose:
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("raysync").setLevel(logging.DEBUG)


@command.command("backends", help="list installed export backends")
@_JSON
@click.pass_context
def _backends_cmd(ctx: click.Context, as_json: bool) -> int:
    return _call(ctx, _backends, json=as_json)


@command.command("ls", help="runs under a prefix: status, files, bytes, time")
@click.argument("uri")
@_STORAGE
@_JSON
@click.pass_context
def _ls_cmd(
    ctx: click.Context, uri: str, storage_options: dict[str, Any] | None, as_json: bool
) -> int:
    return _call(ctx, _ls, uri=uri, storage_options=storage_options, json=as_json)


@command.command("verify", help="re-hash a committed run against its manifest")
@click.argument("uri")
@_STORAGE
@_JSON
@click.pass_context
def _verify_cmd(
    ctx: click.Context, uri: str, storage_options: dict[str, Any] | None, as_json: bool
) -> int:
    return _call(ctx, _verify, uri=uri, storage_options=storage_options, json=as_json)


@command.command("pull", help="download a committed run, verified, all or nothing")
@click.argument("uri")
@click.argument("dest")
@_STORAGE
@click.option("--overwrite", is_flag=True, help="replace differing local files")
@_JSON
@click.pass_context
def _pull_cmd(
    ctx: click.Context,
    uri: str,
    dest: str,
    storage_options: dict[str, Any] | None,
    overwrite: bool,
    as_json: bool,
) -> int:
    return _call(
        ctx,
        _pull,
        uri=uri,
        dest=dest,
        storage_options=storage_options,
        overwrite=overwrite,
        json=as_json,
    )


@command.command(
    "doctor",
    help="check isolation and the destination on every node of a running cluster: on every "
    "alive node, one probe call that must be isolated exports a small run to URI (default: "
    "return-by-value), read back verified. Exit 0 when every node passes, 1 when one fails.",
)
@click.argument("uri", required=False)
@click.option("--address", help="the cluster to connect to (default: auto)")
@_STORAGE
@click.option("--backend", help="a backend name, as isolated_export(backend=...)")
@click.option("--working-dir", help="ship this project as the runtime_env working_dir (no pip)")
@click.option("--node-ip-address", help="this machine's Ray node address, if not inferred")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="for all probes")
@_JSON
@click.pass_context
def _doctor_cmd(ctx: click.Context, /, as_json: bool, **values: Any) -> int:
    return _call(ctx, _doctor, json=as_json, **values)


@command.command("demo", help="run the demo pipeline on a local Ray", context_settings=_PASS_ON)
@click.argument("rest", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def _demo_cmd(ctx: click.Context, rest: tuple[str, ...]) -> int:
    return _call(ctx, _demo, rest=list(rest))


@command.command("bench", help="the same as python -m raysync.bench", context_settings=_PASS_ON)
@click.argument("rest", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def _bench_cmd(ctx: click.Context, rest: tuple[str, ...]) -> int:
    return _call(ctx, _bench, rest=list(rest))


#: What each kind of failure exits with (docs/cli.md, "Exit codes").
EXIT_OK, EXIT_CHECK, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_BUG = 0, 1, 2, 3, 4


def _exit_code(e: BaseException) -> int:
    if isinstance(e, IntegrityError):
        return EXIT_CHECK
    if isinstance(e, ConfigError | ImportError | MaterializeError):
        return EXIT_USAGE  # a bad option, URI or package; a destination to empty or --overwrite
    if isinstance(e, RaySyncError | OSError):
        return EXIT_UNREACHABLE  # refused, missing, denied, unreachable (gaierror is an OSError)
    return EXIT_BUG


def _fail(args: argparse.Namespace, e: BaseException) -> int:
    code = _exit_code(e)
    if isinstance(e, RaySyncError):
        message, hint = str(e).split("\n  fix: ", 1)[0], e.hint
    elif isinstance(e, ImportError):
        message, hint = f"a package is missing: {e}", "install it (docs/backends.md)"
    elif code == EXIT_BUG:
        message = f"unexpected error: {type(e).__name__}: {e}"
        hint = "this is a bug in raysync; run with -v for the traceback and report it"
    else:
        message, hint = f"{type(e).__name__}: {e}", "check the URI, the network and access"
    message, hint = redact(message), redact(hint) if hint else hint
    if getattr(args, "json", False):
        out = {"ok": False, "error": message, "hint": hint, "exit": code}
        print(json.dumps(out, indent=1))
    else:
        print(f"raysync: {message}" + (f"\n  fix: {hint}" if hint else ""), file=sys.stderr)
    if getattr(args, "verbose", False):
        traceback.print_exception(e, file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv``; the exit code (docs/cli.md, "Exit codes")."""
    try:
        code = command.main(args=argv, prog_name="raysync", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.ClickException as e:  # a usage error: exit 2, with click's message
        e.show()
        return EXIT_USAGE if isinstance(e, click.UsageError) else int(e.exit_code)
    except click.exceptions.Abort:
        print("raysync: interrupted", file=sys.stderr)
        return 130
    return int(code) if isinstance(code, int) else EXIT_OK


def run() -> None:
    """The ``raysync`` program: a closed pipe (``raysync ls ... | head``) ends it quietly, as
    it does ``cat``. Shell completion: ``eval "$(_RAYSYNC_COMPLETE=bash_source raysync)"``."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())


from raysync import cli_runs  # noqa: E402, F401 - registers rm, gc and diff on the group

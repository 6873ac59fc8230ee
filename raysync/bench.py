"""``python -m raysync.bench``: raysync's export throughput against the tools users would
otherwise use, measured in one run, interleaved, reported as medians and ratios.

Backends (``--backend``):

- ``fsspec`` against an S3 API: a moto server the bench starts in its own process on
  127.0.0.1 over HTTPS (``pip install 'raysync[bench]'``), or ``--endpoint URL``.
  ``small`` shape: the server's own PUT ceiling (boto3 ``put_object`` from 16 threads, data
  in memory) and naive ``s3fs.put(recursive=True)``; ``large``: boto3's transfer manager.
- ``local`` (local-copy) against ``cp -a`` and ``shutil.copytree``;
- ``rsync`` to a mounted path (a local directory here) against plain ``rsync -a``;
- ``ray``: the decorator's per-call overhead on a local Ray (an empty tree against a bare
  task) and return-by-value throughput (against a task returning the same bytes).

Shapes (``--shape``): ``small``, many 4 KiB files in nested directories; ``large``, a few
large files. Each repetition writes to a fresh destination, and the contenders take turns
(A B C A B C ...); the first contender of each group is the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from raysync.manifest import Manifest, scan

KIB, MIB = 1024, 1024 * 1024


def make_tree(root: Path, shape: str, files: int, large_size: int, large_files: int) -> None:
    """Incompressible files under ``root/export``."""
    base = root / "export"
    if shape == "small":
        for i in range(files):
            d = base / f"d{i % 20:02d}" / f"e{i % 7}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i:06d}.bin").write_bytes(os.urandom(4 * KIB))
    else:
        base.mkdir(parents=True, exist_ok=True)
        for i in range(large_files):
            with open(base / f"large-{i}.bin", "wb") as f:
                for _ in range(large_size // MIB):
                    f.write(os.urandom(MIB))


class S3Bench:
    def __init__(self, endpoint: str, *, verify: bool = True) -> None:
        import boto3
        import s3fs

        self.endpoint = endpoint
        client_kwargs: dict[str, Any] = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        if not verify:
            client_kwargs["verify"] = False
        self.options: dict[str, Any] = {
            "key": "bench",
            "secret": "bench",
            "client_kwargs": client_kwargs,
        }
        self.client = boto3.client(
            "s3",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",  # noqa: S106 - local test server
            **client_kwargs,
        )
        self.bucket = f"raysync-bench-{uuid.uuid4().hex[:8]}"
        self.client.create_bucket(Bucket=self.bucket)
        self.s3fs = s3fs.S3FileSystem(**self.options)

    def prefix(self) -> str:
        return f"run-{uuid.uuid4().hex[:10]}"

    def put_ceiling(self, root: Path) -> None:
        files = [
            (p.relative_to(root).as_posix(), p.read_bytes()) for p in root.rglob("*") if p.is_file()
        ]
        prefix = self.prefix()
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda kv: self.client.put_object(
                        Bucket=self.bucket, Key=f"{prefix}/{kv[0]}", Body=kv[1]
                    ),
                    files,
                )
            )

    def s3fs_put(self, root: Path) -> None:
        self.s3fs.put(str(root / "export"), f"{self.bucket}/{self.prefix()}/export", recursive=True)

    def transfer_manager(self, root: Path) -> None:
        prefix = self.prefix()
        for p in sorted(root.rglob("*")):
            if p.is_file():
                self.client.upload_file(
                    str(p), self.bucket, f"{prefix}/{p.relative_to(root).as_posix()}"
                )

    def raysync(self, root: Path) -> None:
        from raysync.backend import ExportRequest
        from raysync.registry import get_registry
        from raysync.target import Target

        files = scan(root, ["export"])
        manifest = Manifest(
            files=files, run={"status": "succeeded", "task_id": "bench"}, trees=["export"]
        )
        uri = f"s3://{self.bucket}/{self.prefix()}"
        # Through the registry, as the decorator does: the core never imports a backend.
        get_registry().for_scheme("s3").export(
            ExportRequest(
                target=Target(uri, "s3", self.options),
                files=files,
                manifest=manifest,
                workspace=root,
                conflict="error",
                task_id="bench",
            )
        )


def _time(fn: Callable[[Path], None], root: Path) -> float:
    t0 = time.perf_counter()
    fn(root)
    return time.perf_counter() - t0


@contextlib.contextmanager
def moto_server(*, tls: bool = True) -> Iterator[str]:
    """A moto S3 server in its own process on a free 127.0.0.1 port, stopped at the end.

    Its own process, so that its request handling does not compete with the contenders for
    this process's GIL (as a real S3 endpoint would not). With ``tls`` it serves HTTPS with a
    throw-away self-signed certificate, as S3 does: over plain HTTP botocore signs every
    request body with SHA-256, work that real S3 traffic (HTTPS) does not pay.
    """
    if importlib.util.find_spec("moto") is None:
        sys.exit(
            "raysync bench: moto is not installed; pip install 'raysync[bench]' "
            "or pass --endpoint URL of an S3 API"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        + (["--ssl"] if tls else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    unverified = ssl._create_unverified_context()  # noqa: S323 - our own loopback server
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(  # noqa: S310 - http(s) on loopback
                    endpoint + "/moto-api/", timeout=2, context=unverified
                ):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"raysync bench: the moto server did not start on {endpoint}"
                    ) from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class DirBench:
    """Backends that write a directory (local-copy, rsync to a mount) against the tools a
    user would otherwise run: ``cp -a``, ``shutil.copytree``, plain ``rsync -a``."""

    def __init__(self, base: Path) -> None:
        self.rsync = shutil.which("rsync")
        self.cp = shutil.which("cp")
        self.base = Path(tempfile.mkdtemp(prefix="mount-", dir=base))

    def dest(self) -> Path:
        return self.base / f"run-{uuid.uuid4().hex[:10]}"

    def clear(self) -> None:
        """Between timings: remove earlier copies (memory, when the mount is a tmpfs)."""
        for p in self.base.glob("run-*"):
            shutil.rmtree(p)

    def cp_a(self, root: Path) -> None:
        assert self.cp is not None
        subprocess.run([self.cp, "-a", f"{root}/export", str(self.dest())], check=True)

    def copytree(self, root: Path) -> None:
        shutil.copytree(root / "export", self.dest())

    def rsync_a(self, root: Path) -> None:
        assert self.rsync is not None
        subprocess.run([self.rsync, "-a", f"{root}/export/", str(self.dest())], check=True)

    def export(self, root: Path, scheme: str, prefix: str) -> None:
        """One call's export through the registry, as the core does it: the driver's
        ``prepare`` (cheap, repeated here) and the worker's ``export``."""
        from raysync.backend import ExportRequest
        from raysync.registry import get_registry
        from raysync.target import Target

        files = scan(root, ["export"])
        manifest = Manifest(
            files=files, run={"status": "succeeded", "task_id": "bench"}, trees=["export"]
        )
        backend = get_registry().for_scheme(scheme)
        prepared = backend.prepare(Target(f"{prefix}{self.base}/{{run}}", scheme, {}))
        backend.export(
            ExportRequest(
                target=Target(f"{prefix}{self.dest()}", scheme, {}),
                files=files,
                manifest=manifest,
                workspace=root,
                conflict="error",
                task_id="bench",
                prepared=prepared,
            )
        )

    def raysync_local(self, root: Path) -> None:
        self.export(root, "file", "")

    def raysync_rsync(self, root: Path) -> None:
        self.export(root, "rsync", "rsync://")


def run(args: argparse.Namespace) -> dict[str, Any]:
    backends = ["fsspec", "local", "rsync", "ray"] if args.backend == "all" else [args.backend]
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "repeat": args.repeat,
        "backends": {},
    }
    shapes = ["small", "large"] if args.shape == "all" else [args.shape]
    with tempfile.TemporaryDirectory(prefix="raysync-bench-", dir=args.tmp) as tmp:
        if "fsspec" in backends and args.endpoint is None and not importlib.util.find_spec("moto"):
            print(
                "raysync bench: moto is not installed (pip install 'raysync[bench]'); "
                "skipping fsspec, or pass --endpoint URL of an S3 API",
                file=sys.stderr,
            )
        elif "fsspec" in backends:
            with contextlib.ExitStack() as stack:
                own = args.endpoint is None
                endpoint = args.endpoint or stack.enter_context(moto_server(tls=not args.no_tls))
                if own:
                    import urllib3

                    # Our own loopback server's throw-away certificate is not verified.
                    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
                s3 = S3Bench(endpoint, verify=not own)
                target = (
                    f"moto server (own process, {'HTTP' if args.no_tls else 'HTTPS'}) on 127.0.0.1"
                    if own
                    else endpoint
                )
                report["backends"]["fsspec"] = {
                    "target": target,
                    "shapes": {
                        shape: _measure(
                            args,
                            shape,
                            {
                                "s3 PUT ceiling (boto3, 16 threads)": s3.put_ceiling,
                                "s3fs put(recursive=True)": s3.s3fs_put,
                                "raysync fsspec": s3.raysync,
                            }
                            if shape == "small"
                            else {
                                "boto3 transfer manager": s3.transfer_manager,
                                "raysync fsspec": s3.raysync,
                            },
                        )
                        for shape in shapes
                    },
                }
        where = args.tmp or tempfile.gettempdir()
        if "local" in backends:
            d = DirBench(Path(tmp))
            contenders: dict[str, Callable[[Path], None]] = {
                "cp -a": d.cp_a,
                "shutil.copytree": d.copytree,
                "raysync local": d.raysync_local,
            }
            report["backends"]["local"] = {
                "target": f"a local directory (under {where})",
                "shapes": {
                    shape: _measure(args, shape, contenders, between=d.clear) for shape in shapes
                },
            }
        if "rsync" in backends:
            d = DirBench(Path(tmp))
            if d.rsync is None:
                print("raysync bench: rsync is not installed; skipping it", file=sys.stderr)
            else:
                report["backends"]["rsync"] = {
                    "target": f"a local directory as the mount (under {where})",
                    "shapes": {
                        shape: _measure(
                            args,
                            shape,
                            {"rsync -a": d.rsync_a, "raysync rsync": d.raysync_rsync},
                            between=d.clear,
                        )
                        for shape in shapes
                    },
                }
        if "ray" in backends:
            report["backends"]["ray"] = {
                "target": "a local Ray (2 CPUs); files/s is calls/s",
                "shapes": ray_overhead(args),
            }
    return report


def ray_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """The decorator on a real local Ray: per-call overhead (an empty tree against a bare
    task) and return-by-value throughput (against returning the same bytes directly)."""
    import ray

    from raysync import isolated_export

    calls, size = args.calls, args.value_size * MIB
    started = not ray.is_initialized()
    if started:
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
            for _ in range(args.repeat):
                for name, f in group.items():
                    t0 = time.perf_counter()
                    for _ in range(n):
                        ray.get(f.remote())
                    times[name].append(time.perf_counter() - t0)
            out[shape] = _summary(times, n, n * nbytes)  # "files" are calls here
        return out
    finally:
        if started:
            ray.shutdown()


def _measure(
    args: argparse.Namespace,
    shape: str,
    contenders: dict[str, Callable[[Path], None]],
    *,
    between: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time each contender on one tree, interleaved; the first contender is the baseline."""
    with tempfile.TemporaryDirectory(prefix="raysync-bench-tree-", dir=args.tmp) as tmp:
        root = Path(tmp)
        make_tree(root, shape, args.files, args.large_size * MIB, args.large_files)
        nfiles = sum(1 for p in root.rglob("*") if p.is_file())
        nbytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for rep in range(args.repeat):
            for name, fn in contenders.items():
                if between is not None:
                    between()
                times[name].append(_time(fn, root))
                if not args.json:
                    print(
                        f"  {shape}: {name} rep {rep + 1}/{args.repeat}: {times[name][-1]:.2f}s",
                        file=sys.stderr,
                    )
    return _summary(times, nfiles, nbytes)


def _summary(times: dict[str, list[float]], nfiles: int, nbytes: int) -> dict[str, Any]:
    """Medians, rates and ratios to the first contender (the baseline)."""
    baseline = next(iter(times))
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {
            "median_s": med,
            "files_per_s": nfiles / med,
            "mb_per_s": nbytes / 1e6 / med,
            "ratio_to_baseline": statistics.median(times[baseline]) / med,
        }
    return {"files": nfiles, "bytes": nbytes, "baseline": baseline, "results": rows}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['machine']['cpus']} CPUs; median of {report['repeat']}"]
    for backend, b in report["backends"].items():
        lines.append(f"\n== {backend} -> {b['target']}")
        for shape, s in b["shapes"].items():
            lines.append(
                f"\n{shape}: {s['files']} files, {s['bytes'] / 1e6:.1f} MB "
                f"(baseline: {s['baseline']})"
            )
            lines.append(f"  {'contender':<36} {'files/s':>9} {'MB/s':>8} {'ratio':>6}")
            for name, r in s["results"].items():
                lines.append(
                    f"  {name:<36} {r['files_per_s']:>9.1f} {r['mb_per_s']:>8.1f} "
                    f"{r['ratio_to_baseline']:>6.2f}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="raysync bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backend", choices=["fsspec", "local", "rsync", "ray", "all"], default="all"
    )
    parser.add_argument("--calls", type=int, default=200, help="calls per overhead timing")
    parser.add_argument("--value-size", type=int, default=64, help="MiB per by-value call")
    parser.add_argument("--shape", choices=["small", "large", "all"], default="all")
    parser.add_argument("--files", type=int, default=2000, help="files in the small shape")
    parser.add_argument("--large-size", type=int, default=64, help="MiB per large file")
    parser.add_argument("--large-files", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--endpoint", help="S3 API URL (default: a moto server it starts)")
    parser.add_argument(
        "--no-tls", action="store_true", help="serve the moto server over plain HTTP"
    )
    parser.add_argument(
        "--tmp",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,  # noqa: S108 - a choice
        help="where the trees and the rsync 'mount' live (default: /dev/shm, a tmpfs, so "
        "that disk writeback does not swamp the comparison)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = run(args)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

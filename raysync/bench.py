"""``python -m raysync.bench``: raysync's export throughput against the tools users would
otherwise use, measured in one run, interleaved, reported as medians and ratios.

Backends (``--backend``; ``--target URI`` measures against a destination of your own):

- ``local`` (local-copy) against ``cp -a``, ``shutil.copytree`` and fsspec's naive
  ``put(recursive=True)``;
- ``fsspec`` against an S3 API: a moto server the bench starts in its own process on
  127.0.0.1 over HTTPS (``pip install 'raysync[bench]'``), ``--endpoint URL``, or
  ``--target s3://bucket/prefix``. Baselines: the server's own PUT ceiling (boto3
  ``put_object`` from 16 threads, data in memory; trees of small files), naive
  ``s3fs.put(recursive=True)`` and boto3's transfer manager. raysync runs one object per file,
  and in packing mode (``upload_pack_below``) on trees with small files;
- ``rsync`` to a mounted path (a local directory here) against plain ``rsync -a``;
- ``incremental``: re-exporting an unchanged tree (local-copy and fsspec) against a full
  export of it, from the same call (``sync_every``: fingerprints known) and from a retried
  task (every file hashed again);
- ``ray``: the decorator's per-call overhead on a local Ray (an empty tree against a bare
  task) and return-by-value throughput (against a task returning the same bytes).

Shapes (``--shape``): ``small`` (20,000 x 4 KiB in nested directories), ``medium``
(500 x 1 MiB), ``mixed`` (2,000 x 4 KiB + 50 x 1 MiB + 2 x 32 MiB) and, with ``--full``,
``large`` (4 x 256 MiB). Against an S3 API the many-file trees are smaller unless
``--s3-full`` (500 x 4 KiB, 100 x 1 MiB, ...), since a server taking ~200 PUTs/s needs
minutes for 20,000 files. ``--tree NAME=500x4K+2x32M`` measures a tree of your own. All
data is incompressible.

Each repetition writes to a fresh destination, and the contenders take turns
(A B C A B C ...). Reported per contender: median seconds, files/s, MB/s, peak extra memory
(RSS above what the bench held before; for a command, the command's own peak) and the ratio
to the best baseline (the fastest non-raysync contender) and to each baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysync.copy import KnownDigests, fs_type
from raysync.manifest import scan

KIB, MIB = 1024, 1024 * 1024

#: A tree: groups of (count, bytes per file).
Tree = tuple[tuple[int, int], ...]

SHAPES: dict[str, Tree] = {
    "small": ((20_000, 4 * KIB),),
    "medium": ((500, MIB),),
    "mixed": ((2_000, 4 * KIB), (50, MIB), (2, 32 * MIB)),
    "large": ((4, 256 * MIB),),
}
#: Against an S3 API without --full: the same shapes, fewer files.
S3_SHAPES: dict[str, Tree] = {
    "small": ((500, 4 * KIB),),
    "medium": ((100, MIB),),
    "mixed": ((200, 4 * KIB), (10, MIB), (1, 32 * MIB)),
    "large": ((2, 64 * MIB),),
}
#: The incremental measure: 1 GiB with --full, 256 MiB otherwise, in 16 MiB files.
REEXPORT = {True: ((64, 16 * MIB),), False: ((16, 16 * MIB),)}
DEFAULT_SHAPES = ("small", "medium", "mixed")


def parse_tree(spec: str) -> tuple[str, Tree]:
    """``NAME=COUNTxSIZE[+COUNTxSIZE...]`` with sizes like ``4K``, ``1M``, ``2G``, ``100``."""
    name, _, body = spec.partition("=")
    units = {"": 1, "K": KIB, "M": MIB, "G": 1024 * MIB}
    groups = []
    for part in body.split("+"):
        m = re.fullmatch(r"(\d+)x(\d+)([KMG]?)", part.strip(), re.IGNORECASE)
        if not m:
            raise argparse.ArgumentTypeError(
                f"--tree {spec!r}: write NAME=COUNTxSIZE[+COUNTxSIZE...], e.g. small=500x4K"
            )
        groups.append((int(m.group(1)), int(m.group(2)) * units[m.group(3).upper()]))
    if not name or not groups:
        raise argparse.ArgumentTypeError(f"--tree {spec!r}: name the tree, e.g. small=500x4K")
    return name, tuple(groups)


def make_tree(root: Path, tree: Tree) -> None:
    """Incompressible files under ``root/export``: groups of many files in nested dirs."""
    for g, (count, size) in enumerate(tree):
        for i in range(count):
            d = root / "export" / f"g{g}"
            if count > 50:
                d = d / f"d{i % 20:02d}" / f"e{i % 7}"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"f{i:06d}.bin", "wb") as f:
                left = size
                while left:
                    n = min(left, 4 * MIB)
                    f.write(os.urandom(n))
                    left -= n


def tree_totals(tree: Tree) -> tuple[int, int]:
    return sum(c for c, _ in tree), sum(c * s for c, s in tree)


# -- memory --------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_CHILD_PEAK: list[int] = []


def run_child(argv: list[str]) -> None:
    """Run a baseline command; record its own peak RSS (its VmHWM, polled while it runs:
    ``wait4``'s figure would count the bench's own pages the child shared before exec)."""
    proc = subprocess.Popen(argv)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        time.sleep(0.005)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    _CHILD_PEAK.append(peak)  # KiB


def timed(fn: Callable[[], None]) -> tuple[float, float | None]:
    """(seconds, peak extra MiB): this process's RSS high-water mark above its RSS before
    (reset through /proc/self/clear_refs), or a command's own peak."""
    _CHILD_PEAK.clear()
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        resettable = True
    except OSError:
        resettable = False
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak: float | None = None
    hwm = _status_kib("VmHWM")
    if resettable and hwm is not None and before is not None:
        peak = max(0, hwm - before) / 1024
    if _CHILD_PEAK:
        peak = max(peak or 0.0, max(_CHILD_PEAK) / 1024)
    return seconds, peak


# -- contenders ----------------------------------------------------------------------------


def _export(
    root: Path,
    scheme: str,
    uri: str,
    options: dict[str, Any],
    *,
    prepare_uri: str | None = None,
    files: list[Any] | None = None,
    conflict: str = "error",
    task_id: str = "bench",
) -> list[Any]:
    """One call's export through the registry, as the core does it: the driver's
    ``prepare`` (cheap, repeated here) and the worker's ``export``."""
    from raysync.exporting import export_once, prepare
    from raysync.registry import get_registry
    from raysync.rules import run_record
    from raysync.target import Target

    backend = get_registry().for_scheme(scheme)
    files, _, _ = export_once(
        backend,
        Target(uri, scheme, options),
        root,
        run_record("raysync.bench", task_id),
        trees=["export"],
        conflict=conflict,
        prepared=prepare(backend, Target(prepare_uri or uri, scheme, options)),
        files=files,
    )
    return files


class S3Bench:
    """fsspec-blob against an S3 API, and what a user would script by hand."""

    def __init__(self, endpoint: str | None, *, verify: bool = True, base: str = "") -> None:
        import boto3
        import s3fs

        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        if not verify:
            client_kwargs["verify"] = False
        if base:  # --target s3://bucket/prefix: the user's bucket and credentials
            self.options: dict[str, Any] = {"client_kwargs": client_kwargs}
            self.client = boto3.client("s3", **client_kwargs)
            self.bucket, _, self.base = base.partition("/")
        else:
            self.options = {"key": "bench", "secret": "bench", "client_kwargs": client_kwargs}
            self.client = boto3.client(
                "s3",
                aws_access_key_id="bench",
                aws_secret_access_key="bench",  # noqa: S106 - local test server
                **client_kwargs,
            )
            self.bucket, self.base = f"raysync-bench-{uuid.uuid4().hex[:8]}", ""
            self.client.create_bucket(Bucket=self.bucket)
        self.s3fs = s3fs.S3FileSystem(**self.options)
        self.packed = {**self.options, "upload_pack_below": MIB}

    def prefix(self) -> str:
        return "/".join(p for p in (self.base.strip("/"), f"run-{uuid.uuid4().hex[:10]}") if p)

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
        from boto3.s3.transfer import TransferConfig

        prefix = self.prefix()
        paths = [p for p in sorted(root.rglob("*")) if p.is_file()]
        config = TransferConfig()  # 10 threads per file, 8 MiB parts
        # As a user would script it: a few files at a time, each with the transfer manager.
        with ThreadPoolExecutor(10) as pool:
            list(
                pool.map(
                    lambda p: self.client.upload_file(
                        str(p),
                        self.bucket,
                        f"{prefix}/{p.relative_to(root).as_posix()}",
                        Config=config,
                    ),
                    paths,
                )
            )

    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix()}"

    def raysync(self, root: Path) -> None:
        _export(root, "s3", self.uri(), self.options)

    def raysync_packed(self, root: Path) -> None:
        _export(root, "s3", self.uri(), self.packed)


class DirBench:
    """Backends that write a directory (local-copy, rsync to a mount) against the tools a
    user would otherwise run: ``cp -a``, ``shutil.copytree``, fsspec ``put``, ``rsync -a``."""

    def __init__(self, base: Path, *, own: bool = True) -> None:
        self.rsync = shutil.which("rsync")
        self.cp = shutil.which("cp")
        self.base = Path(tempfile.mkdtemp(prefix="mount-", dir=base)) if own else base
        self.base.mkdir(parents=True, exist_ok=True)

    def dest(self) -> Path:
        return self.base / f"run-{uuid.uuid4().hex[:10]}"

    def clear(self) -> None:
        """Between timings: remove earlier copies (memory, when the mount is a tmpfs)."""
        for p in self.base.glob("run-*"):
            shutil.rmtree(p)

    def cp_a(self, root: Path) -> None:
        assert self.cp is not None
        run_child([self.cp, "-a", f"{root}/export", str(self.dest())])

    def copytree(self, root: Path) -> None:
        shutil.copytree(root / "export", self.dest())

    def fsspec_put(self, root: Path) -> None:
        import fsspec

        fsspec.filesystem("file").put(f"{root}/export", str(self.dest()), recursive=True)

    def rsync_a(self, root: Path) -> None:
        assert self.rsync is not None
        run_child([self.rsync, "-a", f"{root}/export/", str(self.dest())])

    def raysync_local(self, root: Path) -> None:
        _export(root, "file", str(self.dest()), {}, prepare_uri=f"{self.base}/{{run}}")

    def raysync_rsync(self, root: Path) -> None:
        _export(
            root, "rsync", f"rsync://{self.dest()}", {}, prepare_uri=f"rsync://{self.base}/{{run}}"
        )


class Reexport:
    """Re-exporting an unchanged tree, against exporting it in full."""

    def __init__(self, scheme: str, new_uri: Callable[[], str], options: dict[str, Any]) -> None:
        self.scheme, self.new_uri, self.options = scheme, new_uri, options
        self.same_call_uri = self.retry_uri = ""
        self.known = KnownDigests()

    def setup(self, root: Path) -> None:
        """Commit the tree once to each re-export destination (not timed)."""
        self.same_call_uri, self.retry_uri = self.new_uri(), self.new_uri()
        began = time.time_ns() + KnownDigests.RACY_NS * 2  # the tree is older than this
        files = _export(root, self.scheme, self.same_call_uri, self.options)
        self.known.remember(files, began)
        _export(root, self.scheme, self.retry_uri, self.options)

    def full(self, root: Path) -> None:
        _export(root, self.scheme, self.new_uri(), self.options)

    def same_call(self, root: Path) -> None:
        files = scan(root, ["export"])
        self.known.apply(files)
        _export(
            root, self.scheme, self.same_call_uri, self.options, files=files, conflict="overwrite"
        )

    def retried_task(self, root: Path) -> None:
        _export(root, self.scheme, self.retry_uri, self.options, conflict="overwrite")


# -- running -------------------------------------------------------------------------------


@dataclass
class Group:
    """One backend on one tree: the contenders, the baselines among them."""

    backend: str
    shape: str
    tree: Tree
    contenders: dict[str, Callable[[Path], None]]
    baselines: list[str]
    between: Callable[[], None] | None = None
    setup: Callable[[Path], None] | None = None
    result: dict[str, Any] = field(default_factory=dict)


class Progress:
    """One line per step on stderr (rewritten in place on a terminal)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet = total, 0, quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()

    def say(self, text: str, *, step: bool = False) -> None:
        if step:
            self.done += 1
        if self.quiet:
            return
        elapsed = time.monotonic() - self.t0
        line = f"[{self.done}/{self.total} {elapsed:5.0f}s] {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:150])
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.tty and not self.quiet:
            sys.stderr.write("\n")


def measure(group: Group, args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Time each contender on one tree, interleaved, with its peak memory."""
    nfiles, nbytes = tree_totals(group.tree)
    label = f"{group.backend} {group.shape}"
    with tempfile.TemporaryDirectory(prefix="raysync-bench-tree-", dir=args.tmp) as tmp:
        root = Path(tmp)
        progress.say(f"{label}: writing {nfiles:,} files, {nbytes / 1e6:,.0f} MB")
        make_tree(root, group.tree)
        if group.setup is not None:
            group.setup(root)
        times: dict[str, list[float]] = {name: [] for name in group.contenders}
        peaks: dict[str, list[float]] = {name: [] for name in group.contenders}
        for rep in range(args.repeat):
            for name, fn in group.contenders.items():
                if group.between is not None:
                    group.between()
                seconds, peak = timed(lambda fn=fn: fn(root))  # type: ignore[misc]
                times[name].append(seconds)
                if peak is not None:
                    peaks[name].append(peak)
                progress.say(f"{label}: {name} {rep + 1}/{args.repeat}: {seconds:.2f}s", step=True)
    return summary(times, nfiles, nbytes, group.baselines, peaks)


def summary(
    times: dict[str, list[float]],
    nfiles: int,
    nbytes: int,
    baselines: Sequence[str],
    peaks: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """Medians, rates, peak memory and ratios to the best baseline and to each baseline."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = min(baselines, key=lambda b: med[b])
    rows = {}
    for name in times:
        peak = (peaks or {}).get(name)
        rows[name] = {
            "median_s": med[name],
            "files_per_s": nfiles / med[name],
            "mb_per_s": nbytes / 1e6 / med[name],
            # The median over repetitions: the first one also pays one-time imports (s3fs,
            # aiobotocore), which are not the export's memory; the maximum is kept too.
            "peak_rss_mib": statistics.median(peak) if peak else None,
            "peak_rss_mib_max": max(peak) if peak else None,
            "ratio_to_best_baseline": med[best] / med[name],
            "ratios": {b: med[b] / med[name] for b in baselines},
        }
    return {
        "files": nfiles,
        "bytes": nbytes,
        "baseline": best,
        "baselines": list(baselines),
        "results": rows,
    }


@contextlib.contextmanager
def moto_server(*, tls: bool = True) -> Iterator[str]:
    """A moto S3 server in its own process on a free 127.0.0.1 port, stopped at the end.

    Its own process, so that its request handling does not compete with the contenders for
    this process's GIL (as a real S3 endpoint would not). With ``tls`` it serves HTTPS with a
    throw-away self-signed certificate, as S3 does: over plain HTTP botocore signs every
    request body with SHA-256, work that real S3 traffic (HTTPS) does not pay.
    """
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


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(tmp: str | None) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = _meminfo_gib()
    tools = {}
    for tool, flag in (("rsync", "--version"), ("cp", "--version")):
        path = shutil.which(tool)
        if path:
            out = subprocess.run([path, flag], capture_output=True, text=True, check=False)
            tools[tool] = out.stdout.splitlines()[0] if out.stdout else "?"
    where = Path(tmp or tempfile.gettempdir())
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tmp": str(where),
        "tmp_fs": fs_type(where),
        "versions": {d: _version(d) for d in ("raysync", "ray", "fsspec", "s3fs", "boto3", "moto")},
        "tools": tools,
    }


def _meminfo_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        return None
    return None


def _shapes(args: argparse.Namespace, s3: bool) -> dict[str, Tree]:
    if args.tree:
        return dict(args.tree)
    if args.shape != "all":
        names = [args.shape]
    else:
        names = [*DEFAULT_SHAPES, "large"] if args.full else list(DEFAULT_SHAPES)
    if not s3 or args.s3_full:
        return {n: SHAPES[n] for n in names}
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
        s3 = _s3(args, stack)
        if s3 is not None and "fsspec" in backends:
            for shape, tree in _shapes(args, s3=True).items():
                c: dict[str, Callable[[Path], None]] = {}
                if all(size < 8 * MIB for _, size in tree):
                    c["S3 PUT ceiling (boto3 put_object, 16 threads)"] = s3.put_ceiling
                c["s3fs put(recursive=True)"] = s3.s3fs_put
                c["boto3 transfer manager"] = s3.transfer_manager
                c["raysync fsspec"] = s3.raysync
                if any(size < MIB for _, size in tree):
                    c["raysync fsspec (packing)"] = s3.raysync_packed
                base = [n for n in c if not n.startswith("raysync")]
                groups.append(Group("fsspec", shape, tree, c, base))
        if s3 is not None and incremental:
            groups.append(_reexport_group("fsspec", Reexport("s3", s3.uri, s3.options), args))
    to_dir = bool(target) and not to_s3 and not target.startswith("rsync://")
    if ("local" in backends or incremental) and (to_dir or not target):
        base_dir = Path(target.removeprefix("file://")) if to_dir else None
        d = DirBench(base_dir or tmp, own=base_dir is None)
        if "local" in backends:
            for shape, tree in _shapes(args, s3=False).items():
                c = {
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
                c = {"rsync -a": d.rsync_a, "raysync rsync": d.raysync_rsync}
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


def _s3(args: argparse.Namespace, stack: contextlib.ExitStack) -> S3Bench | None:
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
    if importlib.util.find_spec("moto") is None:
        print(
            "raysync bench: moto is not installed (pip install 'raysync[bench]'); skipping "
            "fsspec, or pass --endpoint URL or --target s3://bucket/prefix",
            file=sys.stderr,
        )
        return None
    endpoint = stack.enter_context(moto_server(tls=not args.no_tls))
    import urllib3

    # Our own loopback server's throw-away certificate is not verified.
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return S3Bench(endpoint, verify=False)


def _target_label(backend: str, args: argparse.Namespace) -> str:
    where = str(args.target or args.tmp or tempfile.gettempdir())
    if backend.endswith("fsspec"):
        if args.target or args.endpoint:
            return str(args.target or args.endpoint)
        return f"moto server (own process, {'HTTP' if args.no_tls else 'HTTPS'}) on 127.0.0.1"
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
        progress = Progress(
            sum(len(g.contenders) for g in groups) * args.repeat + ray_steps, args.quiet
        )
        try:
            for g in groups:
                entry = report["backends"].setdefault(
                    g.backend, {"target": _target_label(g.backend, args), "shapes": {}}
                )
                entry["shapes"][g.shape] = measure(g, args, progress)
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


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"{m['cpus']} CPUs ({m['cpu'] or 'unknown CPU'}), {m['memory_gib']} GiB, "
        f"trees in {m['tmp']} ({m['tmp_fs'] or '?'}); median of {report['repeat']}"
    ]
    for backend, b in report["backends"].items():
        lines.append(f"\n== {backend} -> {b['target']}")
        for shape, s in b["shapes"].items():
            lines.append(
                f"\n{shape}: {s['files']:,} files, {s['bytes'] / 1e6:,.1f} MB "
                f"(best baseline: {s['baseline']})"
            )
            lines.append(
                f"  {'contender':<46} {'files/s':>10} {'MB/s':>9} {'peak MiB':>9} {'ratio':>6}"
            )
            for name, r in s["results"].items():
                peak = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] is not None else "-"
                lines.append(
                    f"  {name:<46} {r['files_per_s']:>10,.1f} {r['mb_per_s']:>9,.1f} "
                    f"{peak:>9} {r['ratio_to_best_baseline']:>6.2f}"
                )
    return "\n".join(lines)


BACKENDS = ("fsspec", "local", "rsync", "incremental", "ray")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="raysync bench",
        description=__doc__,
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
    parser.add_argument("--endpoint", help="S3 API URL (default: a moto server it starts)")
    parser.add_argument(
        "--no-tls", action="store_true", help="serve the moto server over plain HTTP"
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


if __name__ == "__main__":
    sys.exit(main())

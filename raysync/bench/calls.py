"""``--backend calls``: many short calls at once on a local Ray (issue 20).

N concurrent calls over the workers of a local Ray (``--call-workers`` slots), each writing
``--call-files`` files of ``--call-file-size`` bytes; raysync per backend against the bare Ray
task writing the same files straight into a directory, in one run, interleaved, median of
``--repeat``. Reports calls/s (``files_per_s`` is calls/s here) and the ratio to the bare
task, and raysync's own CPU time per call (direct calls, no Ray: the decorator's work
alone, against the function writing the same files undecorated).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from raysync.bench.measure import Progress, summary


def _writer(files: int, size: int) -> Any:
    def write(out: str) -> None:
        base = Path(out)
        data = os.urandom(size)
        for i in range(files):
            (base / f"f{i:03d}.bin").write_bytes(data)

    return write


def cpu_per_call(tmp: Path, files: int, size: int, n: int = 200) -> dict[str, float]:
    """Milliseconds of CPU per call: the bare function and the decorated one (local-copy and
    by value), direct calls in this process."""
    from raysync import isolated_export

    write = _writer(files, size)

    def bare(i: int) -> None:
        out = tmp / "cpu-bare" / str(i)
        out.mkdir(parents=True)
        write(str(out))

    def body(i: int) -> None:
        write("export")

    runs = str(tmp / "cpu-runs" / "{i}")
    contenders = {
        "bare function": bare,
        "raysync local": isolated_export(runs)(body),
        "raysync by value": isolated_export(None)(body),
    }
    out = {}
    for name, fn in contenders.items():
        fn(-1)  # warm
        t0 = time.process_time()
        for i in range(n):
            fn(i)
        out[name] = (time.process_time() - t0) / n * 1000
    out["raysync local, own work"] = out["raysync local"] - out["bare function"]
    out["raysync by value, own work"] = out["raysync by value"] - out["bare function"]
    return out


def calls_throughput(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    import ray

    from raysync import isolated_export

    n, files, size = args.call_count, args.call_files, args.call_file_size
    tmp = Path(tempfile.mkdtemp(prefix="raysync-calls-", dir=args.tmp))
    # A small project as the working_dir: each call's workspace links the project's entries,
    # and the bench must not measure linking whatever directory it was started in.
    project = tmp / "project"
    project.mkdir()
    (project / "main.py").write_text("# the job's code\n")
    started = not ray.is_initialized()
    if started:
        progress.say(f"calls: starting a local Ray with {args.call_workers} worker slots")
        ray.init(
            address="local",
            _node_ip_address="127.0.0.2",
            include_dashboard=False,
            num_cpus=args.call_workers,
            log_to_driver=False,
            # The session (and so the workspaces) on the same file system as the bare task's
            # directory: the bench compares the work, not two file systems.
            _temp_dir=str(tmp / "ray"),
            configure_logging=False,
            runtime_env={
                "working_dir": str(project),
                "env_vars": {"RAYSYNC_PROGRESS_MIN_BYTES": "0"},
            },
        )
    try:
        write = _writer(files, size)

        def bare(i: int, out: str) -> None:
            d = Path(out) / str(i)
            d.mkdir(parents=True)
            write(str(d))

        def body(i: int, out: str) -> None:
            write("export")

        group = {
            "bare ray task (files to a directory)": ray.remote(bare),
            "raysync local": ray.remote(isolated_export(str(tmp / "local/{r}/{i}"))(_named(body))),
            "raysync by value": ray.remote(isolated_export(None)(body)),
            "raysync host": ray.remote(
                isolated_export(f"host://{tmp}/host/{{r}}/{{i}}")(_named(body))
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in group}
        for name, f in group.items():  # warm every worker
            ray.get([_call(f, name, -1 - k, tmp, "warm") for k in range(args.call_workers)])
        for rep in range(args.repeat):
            for name, f in group.items():
                r = uuid.uuid4().hex[:8]
                t0 = time.perf_counter()
                ray.get([_call(f, name, i, tmp, r) for i in range(n)])
                times[name].append(time.perf_counter() - t0)
                progress.say(
                    f"calls: {name} {rep + 1}/{args.repeat}: {n / times[name][-1]:.0f} calls/s",
                    step=True,
                )
        result = summary(times, n, n * files * size, ["bare ray task (files to a directory)"])
        here = os.getcwd()
        os.chdir(project)  # the direct calls' workspaces link this small project's entries
        try:
            result["cpu_ms_per_call"] = cpu_per_call(tmp, files, size)
        finally:
            os.chdir(here)
        result["shape"] = f"{n} calls x {files} files x {size} B, {args.call_workers} workers"
        med = {k: statistics.median(v) for k, v in times.items()}
        result["host_vs_local"] = med["raysync local"] / med["raysync host"]
        return result
    finally:
        if started:
            ray.shutdown()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _named(body: Any) -> Any:
    """``body`` with the run's name fields (``r``, ``i``) in its signature."""

    def named(i: int, out: str, r: str) -> None:
        body(i, out)

    return named


def _call(f: Any, name: str, i: int, tmp: Path, r: str) -> Any:
    if name.startswith("bare"):
        return f.remote(i, str(tmp / "bare" / r))
    if name == "raysync by value":
        return f.remote(i, "")
    return f.remote(i, "", r)

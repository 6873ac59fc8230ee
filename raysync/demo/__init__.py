"""The README's main job: a Makefile pipeline run as concurrent Ray tasks, each isolated and
exported to the host's ``./artifacts/``, by local copy and by value.

``python -m raysync.demo`` (or ``raysync demo``) runs it on a local Ray bound to loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from raysync.decorator import isolated_export
from raysync.result import ExportResult, collect

PIPELINE_DIR = Path(__file__).parent / "pipeline"


def run_pipeline(profile: str, run_id: str) -> dict[str, Any]:
    """The user's code: runs ``make`` in its cwd and reads back what it wrote there."""
    if shutil.which("make"):
        cmd = [
            "make",
            "--no-print-directory",
            f"PYTHON={sys.executable}",
            f"RUN={run_id}",
            f"PROFILE={profile}",
        ]
    else:  # the pipeline does not need make, only the Makefile's one command
        cmd = [sys.executable, "pipeline.py", "--run", run_id, "--profile", profile]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    metrics: dict[str, Any] = json.loads(Path(f"export/{run_id}/metrics.json").read_text())
    return metrics


@dataclass
class Row:
    run: str
    backend: str
    files: int
    bytes: int
    mb_per_s: float
    where: str


def run_demo(host_dir: Path, *, runs: int = 4, by_value: int = 2) -> list[Row]:
    """Run the demo with ``host_dir`` as the driver's project directory.

    Ray must be up with ``runtime_env={"working_dir": str(PIPELINE_DIR)}`` (see :func:`main`).
    """
    env = {"TV_ARTIFACTS_DIR": "artifacts"}
    to_disk = ray.remote(
        isolated_export("artifacts/runs/{run_id}", env=env, conflict="overwrite")(run_pipeline)
    )
    in_result = ray.remote(isolated_export(None, env=env)(run_pipeline))
    refs = [to_disk.remote("fast", run_id=f"run-{i}") for i in range(runs)]
    refs += [in_result.remote("fast", run_id=f"value-{i}") for i in range(by_value)]
    results: list[ExportResult[Any]] = ray.get(refs)
    collect(results[runs:], host_dir / "artifacts" / "by-value", overwrite=True)
    rows = []
    for r in results:
        where = (
            str(host_dir / "artifacts" / "by-value")
            if r.backend == "value"
            else r.uri.removeprefix("file://")
        )
        rows.append(
            Row(
                r.value["run"],
                r.backend,
                r.stats.files,
                r.stats.bytes,
                r.stats.mb_per_s,
                os.path.relpath(where, host_dir),
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'run':<10} {'backend':<8} {'files':>5} {'bytes':>9} {'MB/s':>8}  where"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.run:<10} {r.backend:<8} {r.files:>5} {r.bytes:>9,} {r.mb_per_s:>8.1f}  {r.where}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="raysync demo", description=__doc__)
    parser.add_argument("--runs", type=int, default=4, help="runs exported by local copy")
    parser.add_argument("--by-value", type=int, default=2, help="runs returned by value")
    args = parser.parse_args(argv)
    host = Path.cwd()
    started = not ray.is_initialized()
    if started:
        # 127.0.0.2 keeps Ray on loopback (Ray rewrites 127.0.0.1 to the outward address).
        ray.init(
            address="local",
            _node_ip_address="127.0.0.2",
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"working_dir": str(PIPELINE_DIR)},
        )
    try:
        rows = run_demo(host, runs=args.runs, by_value=args.by_value)
    finally:
        if started:
            ray.shutdown()
    print(format_table(rows))
    print(
        f"\n{len(rows)} isolated runs exported under {host / 'artifacts'}; "
        "the pipeline's own directory was not written to."
    )
    return 0

"""What the numbers were measured on, and the report as text."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from raysync.fsops import fs_type


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
            cpu = s.get("cpu_ms_per_call")
            if cpu:
                lines.append(
                    "  CPU ms per call (direct calls): "
                    + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
                )
            if "host_vs_local" in s:
                lines.append(f"  host-sync / local-copy calls/s: {s['host_vs_local']:.2f}")
    return "\n".join(lines)

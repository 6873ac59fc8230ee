"""Timing one contender (seconds and peak memory), interleaved repetitions, the summary."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysync.bench.trees import Tree, make_tree, tree_totals


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


def run_child(argv: list[str], env: dict[str, str] | None = None) -> None:
    """Run a baseline command; record its own peak RSS (its VmHWM, polled while it runs:
    ``wait4``'s figure would count the bench's own pages the child shared before exec)."""
    proc = subprocess.Popen(argv, env={**os.environ, **env} if env else None)
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
            # The spread of the repetitions (the chart draws the ratio's range from them).
            "min_s": min(times[name]),
            "max_s": max(times[name]),
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

"""Run ``python -m raysync.bench`` over every backend and shape, keep the JSON report, and
print the Markdown tables that docs/benchmarks.md shows.

    python benchmarks/matrix.py                      # defaults: --repeat 7, results/ here
    python benchmarks/matrix.py --repeat 3 --out /tmp/bench -- --files 500

Arguments after ``--`` go to the bench unchanged. The report lands in
``<out>/bench-<UTC timestamp>.json``; the tables go to stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def tables(report: dict[str, Any]) -> str:
    """Markdown: one table per backend, a row per contender and shape, ratio to baseline."""
    m = report["machine"]
    lines = [
        f"Machine: {m['cpus']} CPUs, Python {m['python']}, {m['platform']}; "
        f"median of {report['repeat']} repetitions.",
    ]
    for backend, b in report["backends"].items():
        lines += [
            "",
            f"### {backend} → {b['target']}",
            "",
            "| shape | contender | files/s | MB/s | ratio |",
            "|-------|-----------|--------:|-----:|------:|",
        ]
        for shape, s in b["shapes"].items():
            label = f"{s['files']:,} files, {s['bytes'] / 1e6:,.1f} MB ({shape})"
            for i, (name, r) in enumerate(s["results"].items()):
                lines.append(
                    f"| {label if i == 0 else ''} | {name} | {r['files_per_s']:,.1f} "
                    f"| {r['mb_per_s']:,.1f} | {r['ratio_to_baseline']:.2f} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results")))
    args = parser.parse_args(argv)
    proc = subprocess.run(
        [sys.executable, "-m", "raysync.bench", "--repeat", str(args.repeat), "--json", *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    report = json.loads(proc.stdout)
    report["machine"]["node"] = platform.node()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"bench-{stamp}.json"
    path.write_text(json.dumps(report, indent=1))
    print(tables(report))
    print(f"\n(report: {path})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

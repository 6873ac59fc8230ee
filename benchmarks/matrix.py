"""Run ``python -m raysync.bench`` over every backend and shape, keep the JSON report, draw
the chart and print (or write into docs/benchmarks.md) the Markdown tables and the targets.

    python benchmarks/matrix.py                          # --repeat 5, results/ here
    python benchmarks/matrix.py --docs -- --full         # regenerate docs/benchmarks.md
    python benchmarks/matrix.py --repeat 3 --out /tmp/b -- --backend local --shape small
    python benchmarks/matrix.py --from results/bench-….json --docs   # no new run

Arguments after ``--`` go to the bench unchanged. The report lands in
``<out>/bench-<UTC timestamp>.json`` with the chart next to it (``.png``, needs
matplotlib: ``pip install 'raysync[bench]'``). ``--docs`` replaces the generated part of
docs/benchmarks.md (between its ``matrix:begin``/``matrix:end`` markers) and writes the
chart to docs/img/benchmarks.png.
"""

# ruff: noqa: RUF001 - the tables and the chart write the multiplication sign on purpose
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"
GIB = 1024**3


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    v = m.get("versions", {})
    versions = ", ".join(f"{k} {x}" for k, x in v.items() if x)
    tools = "; ".join(m.get("tools", {}).values())
    return (
        f"Machine: {m['cpus']} CPUs ({m.get('cpu') or 'unknown'}), {m.get('memory_gib')} GiB, "
        f"{m['platform']}, Python {m['python']}; trees and local destinations in "
        f"{m.get('tmp')} ({m.get('tmp_fs') or '?'}). {versions}. {tools}. "
        f"Median of {report['repeat']} interleaved repetitions"
        + (", full-size trees (`--full`)." if report.get("full") else ".")
    )


def tables(report: dict[str, Any]) -> str:
    """Markdown: one table per backend, a row per contender and shape."""
    lines = [machine_line(report)]
    for backend, b in report["backends"].items():
        lines += [
            "",
            f"### {backend} → {b['target']}",
            "",
            "| shape | contender | files/s | MB/s | peak extra MiB | × best baseline |",
            "|-------|-----------|--------:|-----:|---------------:|----------------:|",
        ]
        for shape, s in b["shapes"].items():
            label = f"{s['files']:,} files, {s['bytes'] / 1e6:,.1f} MB ({shape})"
            for i, (name, r) in enumerate(s["results"].items()):
                peak = "" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:,.0f}"
                shown = f"**{name}**" if name.startswith("raysync") else name
                lines.append(
                    f"| {label if i == 0 else ''} | {shown} | {r['files_per_s']:,.1f} "
                    f"| {r['mb_per_s']:,.1f} | {peak} | {r['ratio_to_best_baseline']:.2f} |"
                )
    return "\n".join(lines)


def _row(report: dict[str, Any], backend: str, shape: str, name: str) -> dict[str, Any] | None:
    s = report["backends"].get(backend, {}).get("shapes", {}).get(shape)
    return None if s is None else s["results"].get(name)


def targets(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, measured, goal, met) for every target of the performance issue."""
    out: list[tuple[str, str, str, str]] = []

    def ratio(label: str, backend: str, shape: str, name: str, to: str | None, goal: float):
        r = _row(report, backend, shape, name)
        if r is None or (to is not None and to not in r["ratios"]):
            out.append((label, "not measured in this run", f"≥ {goal}", "—"))
            return
        value = r["ratio_to_best_baseline"] if to is None else r["ratios"][to]
        out.append((label, f"{value:.2f}", f"≥ {goal}", "yes" if value >= goal else "**no**"))

    for shape in ("large", "medium"):
        ratio(
            f"local-copy, {shape}: × fastest of cp -a, copytree, fsspec put",
            "local", shape, "raysync local", None, 0.8,
        )  # fmt: skip
    ratio("local-copy, small: × shutil.copytree", "local", "small", "raysync local",
          "shutil.copytree", 1.0)  # fmt: skip
    ratio("local-copy, small (stretch): × cp -a", "local", "small", "raysync local", "cp -a", 0.8)
    server = (
        "rclone" if "rclone" in report["backends"].get("fsspec", {}).get("target", "") else "moto"
    )
    for shape in ("small", "medium", "large"):
        ratio(f"fsspec → {server}, {shape}: × the fastest client (obstore, s5cmd, boto3, s3fs)",
              "fsspec", shape, "raysync fsspec", None, 0.8)  # fmt: skip
    ratio("fsspec packing, small: × naive s3fs put", "fsspec", "small",
          "raysync fsspec (packing)", "s3fs put(recursive=True)", 5.0)  # fmt: skip
    download = report["backends"].get("fsspec download", {}).get("shapes", {})
    for shape in download:
        ratio(f"fsspec download ({shape}): raysync pull × the fastest client's GET",
              "fsspec download", shape, "raysync pull (verified)", None, 0.8)  # fmt: skip
    ratio("rsync, large: × rsync -a", "rsync", "large", "raysync rsync", "rsync -a", 1.0)
    ray = report["backends"].get("ray", {}).get("shapes", {}).get("overhead")
    if ray is None:
        out.append(("decorator overhead per call", "not measured in this run", "≤ 15 ms", "—"))
    else:
        rows, calls = ray["results"], ray["files"]
        ms = (rows["raysync, empty tree, by value"]["median_s"]
              - rows["bare ray task"]["median_s"]) / calls * 1000  # fmt: skip
        out.append(("decorator overhead per call (empty tree)", f"{ms:.1f} ms", "≤ 15 ms",
                    "yes" if ms <= 15 else "**no**"))  # fmt: skip
    for backend in ("incremental local", "incremental fsspec"):
        s = report["backends"].get(backend, {}).get("shapes", {}).get("re-export")
        for name in ("re-export unchanged, same call (sync_every)",
                     "re-export unchanged, retried task"):  # fmt: skip
            label = f"{backend}: {name.removeprefix('re-export unchanged, ')}, of a full export"
            if s is None:
                out.append((label, "not measured in this run", "≤ 10%", "—"))
                continue
            frac = 1 / s["results"][name]["ratio_to_best_baseline"]
            size = f" ({s['bytes'] / GIB:.2g} GiB tree)"
            out.append((label + size, f"{frac:.1%}", "≤ 10%", "yes" if frac <= 0.10 else "**no**"))
    for backend, shape, name in (
        ("local", "large", "raysync local"),
        ("fsspec", "large", "raysync fsspec"),
        ("incremental local", "re-export", "full export"),
        ("incremental fsspec", "re-export", "full export"),
    ):
        s = report["backends"].get(backend, {}).get("shapes", {}).get(shape)
        r = None if s is None else s["results"].get(name)
        label = f"peak extra RSS, {backend} {shape} ({name})"
        if r is None or r.get("peak_rss_mib") is None:
            out.append((label, "not measured in this run", "≤ 200 MiB", "—"))
            continue
        label += f", {s['bytes'] / GIB:.2g} GiB tree"  # type: ignore[index]
        peak = r["peak_rss_mib"]
        out.append((label, f"{peak:.0f} MiB", "≤ 200 MiB", "yes" if peak <= 200 else "**no**"))
    return out


def targets_table(report: dict[str, Any]) -> str:
    lines = ["| target | measured | goal | met? |", "|--------|---------:|-----:|------|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(report)]
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    """One panel per backend: each raysync contender's throughput as a multiple of the best
    baseline of its shape (1.0 = as fast as the fastest tool a user would otherwise run), the
    whisker the range over the repetitions. Every contender's figures are in the tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for backend, b in report["backends"].items():
        rows = []
        for shape, s in b["shapes"].items():
            best = s["results"][s["baseline"]]["median_s"]
            for name, r in s["results"].items():
                if name.startswith("raysync") or name.startswith("re-export"):
                    lo = best / r.get("max_s", r["median_s"])
                    hi = best / r.get("min_s", r["median_s"])
                    label = f"{shape}: {name.removeprefix('raysync ')}"
                    rows.append((label, r["ratio_to_best_baseline"], lo, hi))
        if rows:
            panels.append((backend, b["target"], rows))
    height = sum(0.28 * len(rows) + 0.75 for _, _, rows in panels) + 0.8
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(9, height),
        squeeze=False,
        gridspec_kw={"height_ratios": [len(r) + 1.5 for _, _, r in panels]},
    )
    for ax, (backend, target, rows) in zip(axes[:, 0], panels, strict=True):
        labels = [r[0] for r in rows]
        values = [r[1] for r in rows]
        err = [[v - r[2] for v, r in zip(values, rows, strict=True)],
               [r[3] - v for v, r in zip(values, rows, strict=True)]]  # fmt: skip
        colors = ["tab:orange" if v >= 1.0 else "tab:red" if v < 0.8 else "tab:olive"
                  for v in values]  # fmt: skip
        # Linear up to 3x: a 150x re-export would flatten every other bar; its label says it.
        top = min(max(max(values), 1.0) * 1.15, 3.3)
        shown = [min(v, top) for v in values]
        err[1] = [0.0 if v > top else e for v, e in zip(values, err[1], strict=True)]
        ax.barh(range(len(rows)), shown, xerr=err, color=colors, ecolor="black", capsize=2)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.axvline(0.8, color="gray", linewidth=0.6, linestyle=":")
        ax.set_xlim(0, top * 1.12)
        ax.set_title(f"{backend} → {target}", fontsize=9, loc="left")
        for i, (v, x) in enumerate(zip(values, shown, strict=True)):
            ax.text(x, i, f"  {v:.2f}×", va="center", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(
        "raysync as a multiple of the fastest tool a user would otherwise run"
        " (1.0: as fast; dotted: 0.8; whiskers: the range over the repetitions)",
        fontsize=9,
    )
    # The whole machine line, wrapped, with room kept for it below the panels.
    footer = textwrap.fill(machine_line(report), 200)
    bottom = (footer.count("\n") + 1) * 0.1 / fig.get_figheight() + 0.004
    fig.text(0.01, 0.003, footer, fontsize=5, va="bottom")
    fig.tight_layout(rect=(0, bottom, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(report: dict[str, Any], docs: Path = DOCS) -> None:
    img = docs.parent / "img" / "benchmarks.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    chart(report, img)
    text = docs.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{docs} has no {BEGIN} … {END} markers to replace")
    stamp = report.get("measured_at", "")
    body = "\n\n".join(
        [
            BEGIN,
            f"Generated by `benchmarks/matrix.py` from a run of {stamp}. {machine_line(report)}",
            "#### Targets",
            targets_table(report),
            "#### Chart",
            f"![throughput as a multiple of the best baseline]({img.relative_to(docs.parent)})",
            "#### Every measurement",
            tables(report).split("\n", 1)[1].strip(),
            END,
        ]
    )
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    docs.write_text(head + body + tail)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results")))
    parser.add_argument("--from", dest="source", help="use this JSON report; run nothing")
    parser.add_argument("--docs", action="store_true", help="rewrite docs/benchmarks.md")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.source:
        path = Path(args.source)
        report = json.loads(path.read_text())
    else:
        proc = subprocess.run(
            [sys.executable, "-m", "raysync.bench", "--repeat", str(args.repeat), "--json",
             *extra],
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            return proc.returncode
        report = json.loads(proc.stdout)
        report["machine"]["node"] = platform.node()
        now = datetime.now(timezone.utc)
        report["measured_at"] = now.strftime("%Y-%m-%d %H:%M UTC")
        path = out / f"bench-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
        path.write_text(json.dumps(report, indent=1))
    chart(report, path.with_suffix(".png"))
    print(tables(report))
    print("\n#### Targets\n\n" + targets_table(report))
    if args.docs:
        write_docs(report)
        print(f"\n(wrote {DOCS} and its chart)", file=sys.stderr)
    print(f"\n(report: {path}; chart: {path.with_suffix('.png')})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

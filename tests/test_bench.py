"""The bench runs and its JSON report is well-formed (speed is not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import stop_ray


def test_bench_runs_every_backend_and_shape_and_reports_ratios() -> None:
    stop_ray()  # the bench starts its own local Ray: one cluster at a time
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "raysync.bench",
            "--files",
            "30",
            "--large-size",
            "6",
            "--large-files",
            "1",
            "--repeat",
            "1",
            "--calls",
            "5",
            "--value-size",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    backends = report["backends"]
    fsspec, local, rsync = (backends[b]["shapes"] for b in ("fsspec", "local", "rsync"))
    for shapes in (fsspec, local, rsync):
        small, large = shapes["small"], shapes["large"]
        assert small["files"] == 30 and small["bytes"] == 30 * 4096
        assert large["files"] == 1 and large["bytes"] == 6 * 1024 * 1024
        assert small["results"][small["baseline"]]["ratio_to_baseline"] == 1.0
        for shape in (small, large):
            for row in shape["results"].values():
                assert row["median_s"] > 0 and row["files_per_s"] > 0 and row["mb_per_s"] > 0
    assert set(fsspec["small"]["results"]) == {
        "s3 PUT ceiling (boto3, 16 threads)",
        "s3fs put(recursive=True)",
        "raysync fsspec",
    }
    assert set(rsync["large"]["results"]) == {"rsync -a", "raysync rsync"}
    assert set(local["small"]["results"]) == {"cp -a", "shutil.copytree", "raysync local"}
    ray_shapes = backends["ray"]["shapes"]
    assert ray_shapes["overhead"]["files"] == 5
    assert ray_shapes["by value"]["bytes"] == 3 * 1024 * 1024  # 3 calls of 1 MiB
    for shape in ray_shapes.values():
        for row in shape["results"].values():
            assert row["median_s"] > 0 and row["files_per_s"] > 0


def test_the_benchmark_matrix_script_writes_the_report_and_the_tables(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "matrix.py"
    bench = ["--backend", "local", "--files", "20", "--large-size", "2", "--large-files", "1"]
    proc = subprocess.run(
        [sys.executable, str(script), "--repeat", "1", "--out", str(tmp_path), "--", *bench],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report_file,) = tmp_path.glob("bench-*.json")
    report = json.loads(report_file.read_text())
    assert list(report["backends"]) == ["local"]
    assert "### local" in proc.stdout and "| raysync local |" in proc.stdout
    assert proc.stdout.count("| cp -a |") == 2 and "20 files" in proc.stdout  # per shape

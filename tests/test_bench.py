"""The bench runs and its JSON report is well-formed (speed is not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import stop_ray


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raysync.bench", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_bench_runs_every_backend_and_shape_and_reports_ratios_and_memory() -> None:
    stop_ray()  # the bench starts its own local Ray: one cluster at a time
    proc = _bench(
        "--tree", "small=30x4K",
        "--tree", "mixed=10x4K+1x6M",
        "--repeat", "1",
        "--calls", "5",
        "--value-size", "1",
        "--call-count", "16",
        "--call-workers", "2",
        "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["machine"]["cpus"] >= 1 and report["machine"]["tmp_fs"]
    assert report["machine"]["versions"]["ray"]
    assert "[" in proc.stderr and "raysync local 1/1" in proc.stderr  # the progress display
    backends = report["backends"]
    assert set(backends) == {
        "fsspec", "fsspec download", "local", "rsync", "incremental fsspec", "incremental local",
        "ray", "calls",
    }  # fmt: skip
    (calls,) = backends["calls"]["shapes"].values()
    assert calls["files"] == 16 and calls["baseline"].startswith("bare ray task")
    assert set(calls["results"]) == {
        "bare ray task (files to a directory)", "raysync local", "raysync by value",
        "raysync host",
    }  # fmt: skip
    assert all(r["files_per_s"] > 0 for r in calls["results"].values())
    assert calls["cpu_ms_per_call"]["raysync local"] > calls["cpu_ms_per_call"]["bare function"]
    assert calls["host_vs_local"] > 0
    assert backends["fsspec"]["target"].startswith("rclone serve s3 (own process, HTTPS)")
    for name in ("fsspec", "local", "rsync"):
        shapes = backends[name]["shapes"]
        small, mixed = shapes["small"], shapes["mixed"]
        assert small["files"] == 30 and small["bytes"] == 30 * 4096
        assert mixed["files"] == 11 and mixed["bytes"] == 10 * 4096 + 6 * 1024 * 1024
        for shape in (small, mixed):
            best = shape["results"][shape["baseline"]]
            assert best["ratio_to_best_baseline"] == 1.0
            assert shape["baseline"] in shape["baselines"]
            for row in shape["results"].values():
                assert row["median_s"] > 0 and row["files_per_s"] > 0 and row["mb_per_s"] > 0
                assert row["peak_rss_mib"] is not None and row["peak_rss_mib"] >= 0
                assert set(row["ratios"]) == set(shape["baselines"])
    fs_small = backends["fsspec"]["shapes"]["small"]["results"]
    assert set(fs_small) == {
        "S3 PUT ceiling (boto3 put_object, 16 threads)",
        "s3fs put(recursive=True)",
        "boto3 transfer manager",
        "obstore put, 32 in flight",
        "s5cmd cp, 256 workers",
        "raysync fsspec",
        "raysync fsspec (engine=fsspec: s3fs)",
        "raysync fsspec (packing)",
        "raysync fsspec (credentials=driver)",
    }
    assert "S3 PUT ceiling (boto3 put_object, 16 threads)" in fs_small  # small files only
    # The download group pulls the last tree back, checked, against the clients' GETs.
    pulled = backends["fsspec download"]["shapes"]["mixed"]
    assert pulled["files"] == 11
    assert set(pulled["results"]) == {
        "obstore get, 32 in flight",
        "s5cmd cp (download), 256 workers",
        "raysync pull (verified)",
    }
    assert pulled["baselines"] == ["obstore get, 32 in flight", "s5cmd cp (download), 256 workers"]
    local_small = backends["local"]["shapes"]["small"]
    assert local_small["baselines"] == ["cp -a", "shutil.copytree", "fsspec put(recursive=True)"]
    assert set(backends["rsync"]["shapes"]["mixed"]["results"]) == {"rsync -a", "raysync rsync"}
    for name in ("incremental fsspec", "incremental local"):
        rows = backends[name]["shapes"]["re-export"]["results"]
        assert list(rows) == [
            "full export",
            "re-export unchanged, same call (sync_every)",
            "re-export unchanged, retried task",
        ]
    ray_shapes = backends["ray"]["shapes"]
    assert ray_shapes["overhead"]["files"] == 5
    assert ray_shapes["by value"]["bytes"] == 3 * 1024 * 1024  # 3 calls of 1 MiB
    for shape in ray_shapes.values():
        for row in shape["results"].values():
            assert row["median_s"] > 0 and row["files_per_s"] > 0


def test_bench_measures_a_target_directory_of_the_users_and_refuses_bad_trees(
    tmp_path: Path,
) -> None:
    proc = _bench("--target", str(tmp_path / "mnt"), "--tree", "t=20x1K", "--repeat", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert set(report["backends"]) == {"local", "incremental local"}
    assert str(tmp_path / "mnt") in report["backends"]["local"]["target"]
    assert (tmp_path / "mnt").is_dir()
    bad = _bench("--tree", "small=lots")
    assert bad.returncode == 2 and "COUNTxSIZE" in bad.stderr


def test_the_benchmark_matrix_script_writes_the_report_the_tables_and_the_chart(
    tmp_path: Path,
) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "matrix.py"
    bench = ["--backend", "local", "--tree", "small=20x4K", "--tree", "big=1x2M"]
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
    assert "### local" in proc.stdout and "| **raysync local** |" in proc.stdout
    assert "| local-copy, small: \u00d7 shutil.copytree |" in proc.stdout  # the targets table
    assert proc.stdout.count("| cp -a |") == 2 and "20 files" in proc.stdout  # per shape
    (chart,) = tmp_path.glob("bench-*.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000

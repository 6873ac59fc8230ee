"""The README's main job, run as a user would: `python -m raysync.demo` in a fresh directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from raysync.demo import PIPELINE_DIR
from raysync.manifest import MANIFEST_NAME, Manifest, verify_files
from tests.conftest import snapshot, stop_ray


def test_demo_exports_every_run_to_host_artifacts(tmp_path: Path) -> None:
    stop_ray()  # the demo starts its own local Ray; run one cluster at a time
    before = snapshot(PIPELINE_DIR)
    proc = subprocess.run(
        [sys.executable, "-m", "raysync.demo", "--runs", "3", "--by-value", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["run", "backend", "files", "bytes", "MB/s", "where"]
    table = [line.split() for line in lines[2:7]]
    assert [row[:2] for row in table] == [
        ["run-0", "local"],
        ["run-1", "local"],
        ["run-2", "local"],
        ["value-0", "value"],
        ["value-1", "value"],
    ]
    for i in range(3):
        run = tmp_path / "artifacts" / "runs" / f"run-{i}"
        manifest = Manifest.from_bytes((run / MANIFEST_NAME).read_bytes())
        verify_files(manifest, run, uri=str(run))
        assert json.loads((run / f"export/run-{i}/metrics.json").read_text())["run"] == f"run-{i}"
        assert (run / f"artifacts/summaries/runs/run-{i}/summary.json").is_file()
    for i in range(2):
        by_value = tmp_path / "artifacts" / "by-value"
        assert (by_value / f"export/value-{i}/metrics.json").is_file()
        assert (by_value / f"data/value-{i}/samples.csv").is_file()
    assert snapshot(PIPELINE_DIR) == before  # the pipeline's own directory was not written to

"""A raising call, export_on_failure, and Ray retries after a worker dies mid-call."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from raysync import isolated_export
from raysync.manifest import MANIFEST_NAME, Manifest, verify_files
from tests.conftest import files_under


class PipelineFailed(Exception):
    pass


def test_raising_call_gives_the_users_exception_and_exports_partial_trees(
    ray_wd: Path, host: Path
) -> None:
    @ray.remote(max_retries=0)
    @isolated_export("failed/{run_id}")
    def run(run_id: str) -> None:
        Path("export/partial.json").write_text('{"step": 1}')
        raise PipelineFailed(f"step 2 of {run_id} broke")

    with pytest.raises(PipelineFailed, match="step 2 of r1 broke") as info:
        ray.get(run.remote("r1"))
    run_dir = host / "failed" / "r1"
    got = files_under(run_dir)
    assert got["export/partial.json"] == b'{"step": 1}'
    manifest = Manifest.from_bytes(got[MANIFEST_NAME])
    assert manifest.status == "failed"
    assert "PipelineFailed: step 2 of r1 broke" in manifest.run["error"]
    verify_files(manifest, run_dir, uri=str(run_dir))
    assert f"exported with status 'failed' to file://{run_dir}" in str(info.value)


def test_without_export_on_failure_nothing_is_committed_and_workspace_is_kept(
    ray_wd: Path, host: Path
) -> None:
    @ray.remote(max_retries=0)
    @isolated_export("failed/{run_id}", export_on_failure=False)
    def run(run_id: str) -> None:
        Path("export/partial.json").write_text("kept")
        raise PipelineFailed("no")

    with pytest.raises(PipelineFailed) as info:
        ray.get(run.remote("r2"))
    assert not (host / "failed" / "r2").exists()
    text = str(info.value)
    kept = Path(text.split("its workspace is kept in ", 1)[1].split()[0])
    assert (kept / "export" / "partial.json").read_text() == "kept"


def test_retry_after_worker_death_commits_exactly_the_second_attempts_files(
    ray_wd: Path, host: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    marker_dir = tmp_path_factory.mktemp("marker")

    @ray.remote(max_retries=2, retry_exceptions=False)
    @isolated_export("retried/{run_id}")
    def run(run_id: str, marker: str) -> int:
        first = not os.path.exists(marker)
        Path("export/common.txt").write_text("first" if first else "second")
        if first:
            Path(f"export/only-first-{run_id}.txt").write_text("must not be committed")
            Path(marker).write_text("died once")
            os._exit(1)  # the worker dies: Ray retries the task in a new worker
        Path("export/only-second.txt").write_text("ok")
        return 2

    r = ray.get(run.remote("r3", str(marker_dir / "died")))
    assert r.value == 2
    got = files_under(host / "retried" / "r3")
    manifest = Manifest.from_bytes(got.pop(MANIFEST_NAME))
    assert got == {"export/common.txt": b"second", "export/only-second.txt": b"ok"}
    assert manifest.run["attempt"] == 1
    assert r.manifest.run["attempt"] == 1

"""Incremental export and ``sync_every`` checkpoints: real Ray, real files, a real S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from raysync import isolated_export
from raysync.errors import ConfigError
from raysync.manifest import MANIFEST_NAME, Manifest
from tests.conftest import committed, files_under, s3_options


def _wait_for(run: Path, status: str, timeout: float = 30.0) -> Manifest:
    """Poll (bounded) until the run at ``run`` is committed with ``status``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            m = Manifest.from_bytes((run / MANIFEST_NAME).read_bytes())
        except (OSError, ValueError):
            m = None
        if m is not None and m.status == status:
            return m
        time.sleep(0.05)
    raise TimeoutError(f"no {status} manifest at {run} after {timeout} s")


def test_a_crash_keeps_the_last_checkpoint_committed_and_verifiable(
    host: Path, tmp_path: Path
) -> None:
    out = host / "runs"

    @ray.remote(max_retries=0)
    @isolated_export("runs/{run_id}", sync_every=0.3, checksum="blake3")
    def long_job(run_id: str, runs: str) -> None:
        Path("export/epoch-1.ckpt").write_bytes(os.urandom(300_000))
        Path("data/log.txt").write_text("epoch 1 done\n")
        _wait_for(Path(runs) / run_id, "running")  # a checkpoint holds epoch 1
        os._exit(1)  # the node dies during epoch 2

    with pytest.raises(ray.exceptions.RayError):
        ray.get(long_job.remote("crash", str(out)))
    m = committed(out / "crash")  # verifies every file against the manifest
    assert m.status == "running" and m.run["checkpoint"] >= 1 and m.checksum == "blake3"
    assert sorted(f.path for f in m.files) == ["data/log.txt", "export/epoch-1.ckpt"]
    # The CLI lists it as a checkpoint, and verifies it with its blake3 digests.
    cli = [sys.executable, "-m", "raysync"]
    ls = subprocess.run([*cli, "ls", str(out)], capture_output=True, text=True, check=True)
    assert "checkpoint" in ls.stdout and "crash" in ls.stdout
    subprocess.run([*cli, "verify", str(out / "crash")], check=True, capture_output=True)


def test_the_final_export_sends_only_what_changed_since_the_last_checkpoint(
    host: Path,
) -> None:
    @ray.remote(max_retries=0)
    @isolated_export("runs/{run_id}", sync_every=0.5)
    def job(run_id: str, runs: str) -> int:
        for i in range(20):
            Path(f"export/shard-{i:02d}.bin").write_bytes(bytes([i]) * (50_000 + i))
        m = _wait_for(Path(runs) / run_id, "running")
        assert len(m.files) == 20
        Path("export/shard-07.bin").write_bytes(b"rewritten")  # changed
        Path("export/extra.txt").write_text("new")  # added
        os.remove("export/shard-19.bin")  # removed
        return m.run["checkpoint"]

    r = ray.get(job.remote("inc", str(host / "runs")))
    run = host / "runs" / "inc"
    m = committed(run)
    assert m.status == "succeeded" and m.run["checkpoints"] >= r.value >= 1
    assert r.stats.extra["reused_files"] == 18  # 20 - changed - removed
    assert r.stats.extra["reused_bytes"] == sum(50_000 + i for i in range(19) if i != 7)
    got = files_under(run)
    assert got["export/shard-07.bin"] == b"rewritten" and got["export/extra.txt"] == b"new"
    assert "export/shard-19.bin" not in got
    assert got["export/shard-03.bin"] == bytes([3]) * 50_003


def test_a_retried_task_re_sends_only_the_files_its_first_attempt_did_not_commit(
    host: Path,
) -> None:
    """No checkpoints: the first attempt commits, the retry (same task) replaces the run and
    links every file whose size and digest the committed manifest already records."""

    @ray.remote(max_retries=0)
    @isolated_export("runs/{run_id}", conflict="overwrite")
    def job(run_id: str, variant: str) -> str:
        for i in range(10):
            Path(f"data/{i}.bin").write_bytes(bytes([i]) * 200_000)
        Path("export/variant.txt").write_text(variant)
        return variant

    first = ray.get(job.remote("retry", "aaaa"))
    assert first.stats.extra["reused_files"] == 0
    second = ray.get(job.remote("retry", "bbbb"))  # same size, other bytes
    assert second.stats.extra["reused_files"] == 10
    run = host / "runs" / "retry"
    assert committed(run).run["task_id"] == second.manifest.run["task_id"]
    assert files_under(run)["export/variant.txt"] == b"bbbb"


def test_s3_re_export_uploads_only_changed_objects(
    ray_wd: Path, bucket: str, fault_proxy: Any
) -> None:
    @ray.remote(max_retries=0)
    @isolated_export(
        f"s3://{bucket}/inc/{{run_id}}",
        conflict="overwrite",
        storage_options=s3_options(fault_proxy.url),
    )
    def job(run_id: str, changed: str) -> None:
        for i in range(30):
            Path(f"export/{i}.json").write_text(f'{{"i": {i}}}')
        Path("export/changed.txt").write_text(changed)

    ray.get(job.remote("r1", "first"))
    fault_proxy.reset()
    r = ray.get(job.remote("r1", "second!"))
    data_puts = [
        p for m, p, s in fault_proxy.log if m == "PUT" and s < 300 and "/inc/r1/export/" in p
    ]
    assert data_puts and all(p.endswith("/export/changed.txt") for p in data_puts)
    assert r.stats.extra["reused_files"] == 30
    back = files_under(r.materialize(ray_wd / "out" / "s3-inc"))
    assert back["export/changed.txt"] == b"second!" and back["export/29.json"] == b'{"i": 29}'


def test_sync_every_is_checked_at_decoration() -> None:
    with pytest.raises(ConfigError, match="positive number of seconds"):
        isolated_export("runs/{x}", sync_every=0)
    with pytest.raises(ConfigError, match="number of seconds"):
        isolated_export("runs/{x}", sync_every="5")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="returns the files by value"):
        isolated_export(None, sync_every=60)


@pytest.mark.parametrize(
    ("template", "runs"),
    [("rsync://{host}/mnt/{{run_id}}", "mnt"), ("host://out/{{run_id}}", "out")],
    ids=["rsync-mount", "host-sync"],
)
def test_directory_backends_link_unchanged_files_and_send_the_rest(
    host: Path, template: str, runs: str
) -> None:
    """rsync to a mount (staging next to the run) and host-sync (the driver's sink)."""

    @ray.remote(max_retries=0)
    @isolated_export(template.format(host=host), conflict="overwrite")
    def job(run_id: str, changed: str) -> None:
        for i in range(8):
            Path(f"data/{i}.bin").write_bytes(bytes([i]) * 300_000)
        Path("export/changed.txt").write_text(changed)

    first = ray.get(job.remote("r", "one"))
    assert first.stats.extra["reused_files"] == 0
    second = ray.get(job.remote("r", "two!"))
    assert second.stats.extra["reused_files"] == 8
    assert second.stats.extra["reused_bytes"] == 8 * 300_000
    run = host / runs / "r"
    m = committed(run)
    assert m.run["task_id"] == second.manifest.run["task_id"]
    got = files_under(run)
    assert got["export/changed.txt"] == b"two!" and got["data/7.bin"] == bytes([7]) * 300_000
    assert not [p for p in (host / runs).iterdir() if "staging" in p.name]

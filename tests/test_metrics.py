"""raysync's metrics in Ray's Prometheus endpoint (issue 20): totals of files and bytes per
backend, exports by status, and never a URI or a secret in a label."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import pytest
import ray

from raysync import isolated_export
from tests.conftest import METRICS_PORT_VAR, NODE_IP, s3_options

CANARY = "canary-secret-4f1c9e"


def _scrape() -> str:
    port = os.environ[METRICS_PORT_VAR]
    with urllib.request.urlopen(f"http://{NODE_IP}:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _total(text: str, name: str, workers: set[str], **labels: str) -> float:
    """The sum of ``name`` with ``labels`` over the series of ``workers`` (Ray labels each
    worker's series with its id)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(f"ray_{name}_total{{"):
            continue
        worker = re.search(r'WorkerId="([0-9a-f]+)"', line)
        if worker is None or worker.group(1) not in workers:
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_exports_show_in_rays_prometheus_endpoint_tagged_by_backend_only(
    ray_wd: Path, tmp_path: Path, moto_endpoint: str, bucket: str
) -> None:
    # Fresh workers (their own runtime_env): their counters start at zero.
    fresh = {"env_vars": {"RAYSYNC_TEST_METRICS": tmp_path.name}}

    @ray.remote(max_retries=0, runtime_env=fresh)
    @isolated_export(str(tmp_path / "runs/{name}"))
    def local_call(name: str) -> str:
        Path("export/a.bin").write_bytes(b"a" * 1000)
        Path("export/b.bin").write_bytes(b"b" * 500)
        return str(ray.get_runtime_context().get_worker_id())

    options = {**s3_options(moto_endpoint), "secret": CANARY}

    @ray.remote(max_retries=0, runtime_env=fresh)
    @isolated_export(f"s3://{bucket}/runs/{{name}}", storage_options=options)
    def s3_call(name: str) -> str:
        Path("export/c.bin").write_bytes(b"c" * 300)
        return str(ray.get_runtime_context().get_worker_id())

    results = ray.get([local_call.remote(f"m{i}") for i in range(3)], timeout=120)
    workers = {r.value for r in results}
    workers.add(ray.get(s3_call.remote("s"), timeout=120).value)
    deadline = time.monotonic() + 60
    while True:
        text = _scrape()
        files = _total(text, "raysync_exported_files", workers, backend="local")
        if files >= 6 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert files == 6
    assert _total(text, "raysync_exported_bytes", workers, backend="local") == 3 * 1500
    assert _total(text, "raysync_exports", workers, backend="local", status="succeeded") == 3
    assert _total(text, "raysync_exported_bytes", workers, backend="fsspec") == 300
    assert re.search(r'ray_raysync_export_seconds_bucket\{[^}]*backend="local"', text)
    raysync_lines = [line for line in text.splitlines() if "raysync_" in line]
    for needle in (CANARY, bucket, str(tmp_path), "runs/m", "testing-key-id"):
        assert not any(needle in line for line in raysync_lines), needle


def test_metrics_do_nothing_outside_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    from raysync import metrics, rayshim

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(rayshim, "initialized", lambda: False)
    monkeypatch.setattr(metrics, "_made", {})
    metrics.exported("local", "succeeded", 1, 1, 0.1)
    metrics.failed("local")
    metrics.retried()
    metrics.in_flight("local", 10)
    assert metrics._made == {}

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


def _total(text: str, name: str, **labels: str) -> float:
    """The sum over every worker's series of ``name`` with ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(f"ray_{name}_total{{") and not line.startswith(f"ray_{name}{{"):
            continue
        if line.startswith(f"ray_{name}{{") and f"ray_{name}_total{{" in text:
            continue  # the gauge Ray also exports for a counter: count the counter once
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_exports_show_in_rays_prometheus_endpoint_tagged_by_backend_only(
    ray_wd: Path, tmp_path: Path, moto_endpoint: str, bucket: str
) -> None:
    before = _scrape()
    files0 = _total(before, "raysync_exported_files", backend="local")
    bytes0 = _total(before, "raysync_exported_bytes", backend="local")
    ok0 = _total(before, "raysync_exports", backend="local", status="succeeded")

    @ray.remote(max_retries=0)
    @isolated_export(str(tmp_path / "runs/{name}"))
    def local_call(name: str) -> None:
        Path("export/a.bin").write_bytes(b"a" * 1000)
        Path("export/b.bin").write_bytes(b"b" * 500)

    options = {**s3_options(moto_endpoint), "secret": CANARY}

    @ray.remote(max_retries=0)
    @isolated_export(f"s3://{bucket}/runs/{{name}}", storage_options=options)
    def s3_call(name: str) -> None:
        Path("export/c.bin").write_bytes(b"c" * 300)

    ray.get([local_call.remote(f"m{i}") for i in range(3)], timeout=120)
    ray.get(s3_call.remote("s"), timeout=120)
    deadline = time.monotonic() + 60
    while True:
        text = _scrape()
        files = _total(text, "raysync_exported_files", backend="local") - files0
        if files >= 6 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert files == 6
    assert _total(text, "raysync_exported_bytes", backend="local") - bytes0 == 3 * 1500
    assert _total(text, "raysync_exports", backend="local", status="succeeded") - ok0 == 3
    assert re.search(r'ray_raysync_export_seconds_bucket\{[^}]*backend="local"', text)
    assert re.search(r'ray_raysync_exported_bytes_total\{[^}]*backend="fsspec"', text)
    raysync_lines = [line for line in text.splitlines() if "raysync_" in line]
    for needle in (CANARY, bucket, str(tmp_path), "runs/m", "testing-key-id"):
        assert not any(needle in line for line in raysync_lines), needle


def test_metrics_do_nothing_outside_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    from raysync import metrics

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(metrics, "_made", {})
    metrics.exported("local", "succeeded", 1, 1, 0.1)
    metrics.failed("local")
    metrics.retried()
    metrics.in_flight("local", 10)
    assert metrics._made == {}

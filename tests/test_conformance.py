"""Every built-in backend passes raysync.testing's conformance suite, unchanged."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from raysync.testing import BackendConformance, ConformanceTarget
from tests.conftest import RsyncDaemon, s3_options


class TestLocalCopy(BackendConformance):
    backend_name = "local"

    @pytest.fixture
    def conformance_target(self, tmp_path: Path) -> ConformanceTarget:
        return ConformanceTarget(uri="runs/{run}", base_dir=tmp_path / "driver")


class TestReturnByValue(BackendConformance):
    backend_name = "value"

    @pytest.fixture
    def conformance_target(self) -> ConformanceTarget:
        return ConformanceTarget(uri="return://{run}", has_destination=False)


class TestFsspecMemory(BackendConformance):
    backend_name = "fsspec"

    @pytest.fixture
    def conformance_target(self) -> ConformanceTarget:
        return ConformanceTarget(
            uri=f"memory://conformance-{uuid.uuid4().hex[:8]}/{{run}}",
            bad_option={"upload_no_such_option": 1},
        )


class TestFsspecS3(BackendConformance):
    backend_name = "fsspec"

    @pytest.fixture
    def conformance_target(self, moto_endpoint: str, bucket: str) -> ConformanceTarget:
        return ConformanceTarget(
            uri=f"s3://{bucket}/runs/{{run}}",
            storage_options=s3_options(moto_endpoint),
            bad_option={"upload_no_such_option": 1},
        )


class TestFsspecS3Packed(BackendConformance):
    """Packing mode: small files go into tar archives (tiny ones here, so a run spans several)."""

    backend_name = "fsspec"

    @pytest.fixture
    def conformance_target(self, bucket: str, moto_endpoint: str) -> ConformanceTarget:
        return ConformanceTarget(
            uri=f"s3://{bucket}/packed/{{run}}",
            storage_options=s3_options(
                moto_endpoint, upload_pack_below=1 << 20, upload_pack_size=4096
            ),
            bad_option={"upload_no_such_option": 1},
        )


class TestRsyncMount(BackendConformance):
    backend_name = "rsync"

    @pytest.fixture
    def conformance_target(self, tmp_path: Path) -> ConformanceTarget:
        return ConformanceTarget(uri=f"rsync://{tmp_path}/mount/runs/{{run}}")


class TestRsyncDaemon(BackendConformance):
    backend_name = "rsync"

    @pytest.fixture
    def conformance_target(self, rsync_daemon: RsyncDaemon) -> ConformanceTarget:
        return ConformanceTarget(uri=f"{rsync_daemon.url}/runs/conformance/{{run}}")


class TestHostSync(BackendConformance):
    backend_name = "host"

    @pytest.fixture
    def conformance_target(self, host: Path) -> ConformanceTarget:
        return ConformanceTarget(uri="host://runs/{run}", base_dir=host)


class TestHostSyncThroughTheSink(BackendConformance):
    """The same guarantees when every run goes through a sink actor (``direct=False``: what
    a worker on another node does)."""

    backend_name = "host"

    @pytest.fixture
    def conformance_target(self, host: Path) -> ConformanceTarget:
        return ConformanceTarget(
            uri="host://runs/{run}", storage_options={"direct": False}, base_dir=host
        )

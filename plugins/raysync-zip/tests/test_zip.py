"""raysync-zip passes raysync's backend conformance suite, reused unchanged."""

from __future__ import annotations

import uuid

import pytest

from raysync.testing import BackendConformance, ConformanceTarget


class TestZipBackend(BackendConformance):
    backend_name = "zip"

    @pytest.fixture
    def conformance_target(self) -> ConformanceTarget:
        return ConformanceTarget(
            uri=f"zip+memory://zip-conformance-{uuid.uuid4().hex[:8]}/{{run}}.zip",
            bad_option={"zip_no_such_option": 1},
        )

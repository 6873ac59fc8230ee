"""``raysync.wait_run``: wait in the driver until a run is committed (a sharded run's last
shard, a call running elsewhere), with a bounded timeout."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from raysync.errors import ConfigError, RunTimeoutError
from raysync.hookspecs import OpensRuns
from raysync.manifest import Manifest
from raysync.registry import get_registry
from raysync.target import Target, check_uri_form, redact


def wait_run(
    uri: str,
    timeout: float = 600.0,
    *,
    storage_options: Mapping[str, Any] | None = None,
    poll: float = 0.5,
) -> Manifest:
    """Wait until the run at ``uri`` is committed and return its manifest.

    ``uri`` is a run's URI as :class:`raysync.ExportResult` gives it (or a path, relative to
    this process's cwd). A checkpoint (status ``running``) is not the end: the wait goes on
    until the final manifest, ``succeeded`` or ``failed`` (check ``manifest.status``).

    :raises RunTimeoutError: no committed run after ``timeout`` seconds.
    """
    check_uri_form(uri)
    parsed = Target.parse(uri, storage_options or {})
    backend = get_registry().for_scheme(parsed.scheme)
    if not isinstance(backend, OpensRuns):
        raise ConfigError(f"backend {backend.name!r} cannot read runs by URI, so cannot wait")
    target = Target(parsed.uri, parsed.scheme, parsed.options, os.getcwd())
    deadline = time.monotonic() + timeout
    while True:
        reader = backend.open_run(target)
        try:
            manifest = reader.manifest()
        finally:
            reader.close()
        if manifest is not None and manifest.status != "running":
            return manifest
        left = deadline - time.monotonic()
        if left <= 0:
            raise RunTimeoutError(
                f"no committed run at {redact(uri)} after {timeout:g} s",
                hint="raysync ls shows how many shards a sharded run has; wait longer, or "
                "look at the calls that write it",
            )
        time.sleep(min(poll, left))

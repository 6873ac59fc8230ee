"""Progress of long exports (issue 16): the kit's copy and hash helpers report every byte they
read, so an export reports its whole tree whatever the backend; in a Ray task a large export
draws Ray's ``tqdm_ray`` bar (in the driver's terminal), elsewhere nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import ray

from raysync.copy import reporting
from raysync.exporting import _progress_bar, export_once, prepare
from raysync.registry import get_registry
from raysync.rules import run_record
from raysync.target import Target


def _tree(root: Path) -> int:
    sizes = [0, 1, 4096, 3 * 1024 * 1024 + 7, 20 * 1024 * 1024 + 3]  # small, large, empty
    for i, n in enumerate(sizes):
        p = root / "export" / f"d{i % 2}" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(n))
    return sum(sizes)


@pytest.mark.parametrize(
    ("scheme", "uri"),
    [
        ("file", "{tmp}/dest/run"),
        ("memory", "memory://progress-{tmp_name}/run"),
        ("return", None),
        ("rsync", "rsync://{tmp}/mount/run"),
    ],
)
def test_an_export_reports_every_byte_of_its_tree_once(
    scheme: str, uri: str | None, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    total = _tree(work)
    registry = get_registry()
    backend = registry.default() if uri is None else registry.for_scheme(scheme)
    where = (uri or "").format(tmp=tmp_path, tmp_name=tmp_path.name)
    target = Target(where, scheme, {})
    root = Target(where.rsplit("/", 1)[0] + "/{x}", scheme, {}) if uri else target
    seen: list[int] = []
    with reporting(seen.append):
        export_once(
            backend,
            target,
            work,
            run_record("progress", scheme),
            trees=["export"],
            prepared=prepare(backend, root),
        )
    assert sum(seen) == total


def test_a_large_export_in_a_ray_task_draws_tqdm_ray_and_none_elsewhere(ray_wd: Path) -> None:
    @ray.remote(max_retries=0)
    def inside() -> list[Any]:
        small = _progress_bar(10, Target("runs/x", "file", {}))
        with small as nothing:
            pass
        os.environ["RAYSYNC_PROGRESS_MIN_BYTES"] = "10"
        try:
            with _progress_bar(10, Target("runs/x", "file", {})) as sink:
                sink(4)
                return [nothing, type(sink.__self__).__module__]  # type: ignore[union-attr]
        finally:
            del os.environ["RAYSYNC_PROGRESS_MIN_BYTES"]

    assert ray.get(inside.remote()) == [None, "ray.experimental.tqdm_ray"]
    with _progress_bar(10**12, Target("runs/x", "file", {})) as sink:  # the driver: no bar
        assert sink is None

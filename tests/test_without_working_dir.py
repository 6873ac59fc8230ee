"""No runtime_env working_dir: tasks start in the driver's cwd; raysync still isolates them,
warns once per worker process and never writes output trees into the host project."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import ray

from raysync import isolated_export
from tests.conftest import ensure_ray, snapshot


def test_calls_without_working_dir_are_isolated_and_warn_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "host-project"
    project.mkdir()
    (project / "input.txt").write_text("from the host")
    monkeypatch.chdir(project)
    ensure_ray(None)
    before = snapshot(project)

    @isolated_export(None)
    def inner(i: int) -> tuple[str, str]:
        Path(f"export/out-{i}.txt").write_text(str(i))
        return os.getcwd(), Path("input.txt").read_text()

    @ray.remote
    def outer() -> dict[str, object]:
        start = os.getcwd()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = [inner(i) for i in range(2)]
        return {
            "start": start,
            "cwds": [r.value[0] for r in results],
            "inputs": [r.value[1] for r in results],
            "files": [[f.path for f in r.manifest.files] for r in results],
            "warnings": [str(w.message) for w in caught if "working_dir" in str(w.message)],
        }

    r = ray.get(outer.remote())
    assert r["start"] == str(project)  # what Ray does without a working_dir
    assert all(c != str(project) for c in r["cwds"]) and r["cwds"][0] != r["cwds"][1]
    assert r["inputs"] == ["from the host", "from the host"]  # the project is visible
    assert r["files"] == [["export/out-0.txt"], ["export/out-1.txt"]]
    assert len(r["warnings"]) == 1 and "runtime_env" in r["warnings"][0]
    assert snapshot(project) == before  # no output tree was written into the host project


def test_a_worker_whose_cwd_does_not_exist_gets_an_empty_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a node where the raylet started in a directory that is not there (or was
    # deleted): os.getcwd() fails; the call still gets its workspace, with nothing linked.
    from raysync import workspace

    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ws = workspace.create("t-0", ("export", "data"))
    assert ws.source is None
    assert sorted(p.name for p in ws.root.iterdir()) == ["data", "export"]
    with workspace.activated(ws, {}, chdir=True):
        assert os.getcwd() == str(ws.root)
        Path("export/x.txt").write_text("x")
    assert os.getcwd() == str(ws.root.parent)  # the old cwd cannot be restored
    assert (ws.root / "export" / "x.txt").read_text() == "x"
    workspace.remove(ws)


def test_direct_calls_on_a_driver_with_ray_up_print_no_ray_warnings(
    ray_wd: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: Any
) -> None:
    """A decorated function called in the driver (a notebook, a test) while Ray runs: Ray's
    runtime context warns for every worker-only question asked there; raysync asks none."""

    @isolated_export(str(tmp_path / "runs" / "{name}"))
    def step(name: str) -> str:
        Path("export/a.txt").write_text(name)
        return name

    capfd.readouterr()
    with caplog.at_level("WARNING"):
        assert [step(name=f"r{i}").value for i in range(3)] == ["r0", "r1", "r2"]
    said = capfd.readouterr().err + caplog.text
    assert "only available when the process is a worker" not in said, said[-2000:]
    assert sorted(p.name for p in (tmp_path / "runs").glob("r*")) == ["r0", "r1", "r2"]

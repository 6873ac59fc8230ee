"""DESIGN invariant 1 on a real local Ray: each call has its own private workspace."""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray

from raysync import isolated_export
from raysync.manifest import MANIFEST_NAME, Manifest, verify_files
from tests.conftest import files_under, shared_pkg_dir, snapshot


def test_call_cwd_is_neither_driver_cwd_nor_shared_package(ray_wd: Path) -> None:
    @ray.remote
    @isolated_export(None)
    def where() -> dict[str, object]:
        return {
            "cwd": os.getcwd(),
            "sees_code": Path("Makefile").is_file() and Path("inputs/config.txt").is_file(),
            "trees_empty": [os.listdir(t) for t in ("export", "data", "artifacts")],
        }

    pkg = shared_pkg_dir()
    res = ray.get(where.remote()).value
    cwd = Path(str(res["cwd"]))
    assert cwd != Path(os.getcwd())  # not the driver's cwd
    assert cwd != pkg and not cwd.is_relative_to(pkg)  # not the shared _ray_pkg_ dir
    assert pkg.name.startswith("_ray_pkg_")
    assert res["sees_code"] is True  # the working_dir's files are visible
    assert res["trees_empty"] == [[], [], []]


def test_eight_concurrent_calls_export_exactly_their_own_files(ray_wd: Path, host: Path) -> None:
    pkg = shared_pkg_dir()
    before = snapshot(pkg)

    @ray.remote
    @isolated_export("runs/{i}")
    def write(i: int) -> int:
        import helper  # a module of the working_dir: must not leave __pycache__ behind

        Path("export").mkdir(exist_ok=True)
        Path("export/same.txt").write_text(f"call {i}\n" * (i + 1))
        time.sleep(0.3)  # overlap with the other calls
        Path(f"data/only-{i}.bin").write_bytes(os.urandom(1000 + i))
        # Read back after the others had time to write the same relative path.
        assert Path("export/same.txt").read_text() == f"call {i}\n" * (i + 1)
        return int(helper.double(i))

    results = ray.get([write.remote(i) for i in range(8)])
    assert [r.value for r in results] == [2 * i for i in range(8)]
    for i, r in enumerate(results):
        run = host / "runs" / str(i)
        assert r.uri == f"file://{run}"
        got = files_under(run)
        assert set(got) == {"export/same.txt", f"data/only-{i}.bin", MANIFEST_NAME}
        assert got["export/same.txt"] == (f"call {i}\n" * (i + 1)).encode()
        assert len(got[f"data/only-{i}.bin"]) == 1000 + i
        manifest = Manifest.from_bytes(got[MANIFEST_NAME])
        verify_files(manifest, run, uri=r.uri)
        assert manifest.status == "succeeded"
    assert snapshot(pkg) == before  # the shared unpacked dir holds nothing they created
    assert not any(p.name == "__pycache__" for p in pkg.rglob("*"))


def test_seed_validation_artifacts_arrive_in_host_artifacts(ray_wd: Path, host: Path) -> None:
    """Seed §4.3: working dir is not host_cwd, and the artifacts land in host's artifacts/."""
    from raysync.demo import run_pipeline

    task = ray.remote(
        isolated_export("artifacts/{run_id}", env={"TV_ARTIFACTS_DIR": "artifacts"})(run_pipeline)
    )
    results = ray.get([task.remote("fast", run_id=f"r{i}") for i in range(3)])
    for i, r in enumerate(results):
        run = host / "artifacts" / f"r{i}"
        got = files_under(run)
        assert f"export/r{i}/metrics.json" in got
        assert f"data/r{i}/samples.csv" in got
        assert f"artifacts/summaries/runs/r{i}/summary.json" in got
        assert str(host) not in got[f"export/r{i}/config.json"].decode()  # ran elsewhere
        verify_files(Manifest.from_bytes(got[MANIFEST_NAME]), run, uri=r.uri)
        assert r.value["run"] == f"r{i}"


def test_env_vars_set_during_call_and_restored_after_it_and_after_errors(ray_wd: Path) -> None:
    @isolated_export(None, env={"TV_ARTIFACTS_DIR": "artifacts"})
    def inner(fail: bool) -> dict[str, str]:
        seen = {k: v for k, v in os.environ.items() if k.startswith(("RAYSYNC_", "TV_"))}
        seen["cwd"] = os.getcwd()
        if fail:
            raise KeyError("boom")
        return seen

    @ray.remote
    def outer() -> dict[str, object]:
        cwd0, env0 = os.getcwd(), dict(os.environ)
        ok = inner(False).value
        after_ok = (os.getcwd(), dict(os.environ))
        try:
            inner(True)
        except KeyError:
            pass
        return {
            "cwd0": cwd0,
            "env0": env0,
            "ok": ok,
            "after_ok": after_ok,
            "after_err": (os.getcwd(), dict(os.environ)),
        }

    r = ray.get(outer.remote())
    ok = r["ok"]
    ws = Path(ok["RAYSYNC_WORKSPACE"])
    assert ok["cwd"] == str(ws)
    assert ok["RAYSYNC_EXPORT_DIR"] == str(ws / "export")
    assert ok["RAYSYNC_DATA_DIR"] == str(ws / "data")
    assert ok["RAYSYNC_ARTIFACTS_DIR"] == str(ws / "artifacts")
    assert ok["TV_ARTIFACTS_DIR"] == str(ws / "artifacts")
    assert r["after_ok"] == (r["cwd0"], r["env0"])
    assert r["after_err"] == (r["cwd0"], r["env0"])


def test_workspace_is_removed_after_commit_and_kept_on_request(ray_wd: Path, host: Path) -> None:
    @ray.remote
    def probe(keep: bool) -> tuple[str, bool]:
        @isolated_export(None, keep_workspace=keep)
        def f() -> str:
            Path("export/x").write_text("x")
            return os.getcwd()

        ws = f().value
        return ws, Path(ws).exists()

    assert ray.get(probe.remote(False))[1] is False
    ws, exists = ray.get(probe.remote(True))
    assert exists and (Path(ws) / "export" / "x").read_text() == "x"


def test_builtin_template_fields_name_the_task_and_attempt(ray_wd: Path, host: Path) -> None:
    @ray.remote
    @isolated_export("ids/{job_id}/{node_id}/{task_id}-{attempt}")
    def f() -> None:
        Path("export/x").write_text("x")

    r = ray.get(f.remote())
    run = r.manifest.run
    expected = host / "ids" / run["job_id"] / run["node_id"] / f"{run['task_id']}-0"
    assert r.uri == f"file://{expected}"
    assert (expected / "export" / "x").read_text() == "x"
    assert run["node_id"] == ray.get_runtime_context().get_node_id()  # one node here
